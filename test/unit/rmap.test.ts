import test from 'ava';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import { HOLE, Rmap } from '../../src/map/rmap.js';
import type { RmapExtent, RmapJSON } from '../../src/map/rmap.js';

/** Extents of `r` as [start, length, redirect] triples, after checking invariants. */
function shape(r: Rmap): [number, number, number][] {
  r.checkInvariants();
  return r.extents().map((e) => [e.startBytes, e.lengthBytes, e.redirect]);
}

// ---------------------------------------------------------------- model

/** Maximal runs of equal values in model[start, start+length) (holes = -1 included). */
function modelRuns(model: Int32Array, start: number, length: number): RmapExtent[] {
  const out: RmapExtent[] = [];
  for (let i = start; i < start + length; i++) {
    const last = out[out.length - 1];
    if (last && last.redirect === model[i]) last.lengthBytes++;
    else out.push({ startBytes: i, lengthBytes: 1, redirect: model[i]! });
  }
  return out;
}

const SIZE = 256;
const anyRange = fc
  .tuple(fc.nat(SIZE - 1), fc.nat(SIZE - 1))
  .map(([a, b]) => ({ start: Math.min(a, b), length: Math.abs(a - b) + 1 }));
const shortRange = fc
  .nat(SIZE - 1)
  .chain((start) => fc.integer({ min: 1, max: Math.min(16, SIZE - start) }).map((length) => ({ start, length })));
const range = fc.oneof(anyRange, shortRange);
const op = fc.oneof(
  fc.record({ kind: fc.constant('map' as const), range, redirect: fc.integer({ min: 0, max: 3 }), probe: range }),
  fc.record({ kind: fc.constant('unmap' as const), range, probe: range }),
);
type Op = typeof op extends fc.Arbitrary<infer T> ? T : never;

function apply(r: Rmap, o: Op, scale = 1): void {
  if (o.kind === 'map') r.map(o.range.start * scale, o.range.length * scale, o.redirect);
  else r.unmap(o.range.start * scale, o.range.length * scale);
}

test('property: Rmap agrees with a per-byte model under random map/unmap', (t) => {
  fc.assert(
    fc.property(fc.array(op, { maxLength: 40 }), (ops) => {
      const r = new Rmap(SIZE);
      const model = new Int32Array(SIZE).fill(HOLE);
      for (const o of ops) {
        apply(r, o);
        model.fill(o.kind === 'map' ? o.redirect : HOLE, o.range.start, o.range.start + o.range.length);

        r.checkInvariants();
        for (let off = 0; off < SIZE; off++) {
          const i = r.lookup(off);
          if (model[off] === HOLE) {
            assert.equal(i, -1, `offset ${off} should be a hole`);
          } else {
            assert.ok(i >= 0, `offset ${off} should be mapped`);
            assert.equal(r.redirectOf(i), model[off], `redirect at ${off}`);
            assert.ok(r.startOf(i) <= off && off < r.startOf(i) + r.lengthOf(i), `extent ${i} contains ${off}`);
          }
        }
        const runs = modelRuns(model, 0, SIZE).filter((e) => e.redirect !== HOLE);
        assert.equal(r.count, runs.length, 'coalesced: one extent per run');
        assert.deepEqual(r.extents(), runs);
        assert.deepEqual(r.extentsIn(o.probe.start, o.probe.length), modelRuns(model, o.probe.start, o.probe.length));
        assert.deepEqual(r.extentsIn(o.range.start, o.range.length), modelRuns(model, o.range.start, o.range.length));
      }
      const back = Rmap.fromJSON(JSON.parse(JSON.stringify(r)) as RmapJSON);
      assert.deepEqual(back.toJSON(), r.toJSON());
    }),
    { numRuns: 1000 },
  );
  t.pass();
});

test('property: offsets near 2^52 behave like the small model scaled up', (t) => {
  const scale = 2 ** 44; // SIZE * scale = 2^52
  fc.assert(
    fc.property(fc.array(op, { maxLength: 25 }), (ops) => {
      const small = new Rmap(SIZE);
      const big = new Rmap(SIZE * scale);
      for (const o of ops) {
        apply(small, o);
        apply(big, o, scale);
        big.checkInvariants();
      }
      const s = small.toJSON();
      assert.deepEqual(big.toJSON(), {
        sizeBytes: SIZE * scale,
        startBytes: s.startBytes.map((x) => x * scale),
        lengthBytes: s.lengthBytes.map((x) => x * scale),
        redirects: s.redirects,
      });
      for (let k = 0; k < 16; k++) {
        const off = Math.floor((k * SIZE) / 16);
        assert.equal(big.lookup(off * scale + scale - 1), small.lookup(off));
      }
    }),
    { numRuns: 150 },
  );
  t.pass();
});

test('property: chunkIndexesOf lists exactly the chunks the range touches', (t) => {
  fc.assert(
    fc.property(range, fc.integer({ min: 1, max: 300 }), ({ start, length }, chunk) => {
      const expected = new Set<number>();
      for (let b = start; b < start + length; b++) expected.add(Math.floor(b / chunk));
      assert.deepEqual(new Rmap(SIZE).chunkIndexesOf(start, length, chunk), [...expected]);
    }),
    { numRuns: 300 },
  );
  t.pass();
});

// ---------------------------------------------------------------- examples

test('a new rmap is one hole', (t) => {
  const r = new Rmap(100);
  t.is(r.sizeBytes, 100);
  t.is(r.count, 0);
  t.is(r.lookup(0), -1);
  t.is(r.lookup(99), -1);
  t.deepEqual(r.extentsIn(0, 100), [{ startBytes: 0, lengthBytes: 100, redirect: HOLE }]);
  t.deepEqual(shape(r), []);
});

test('map then lookup at the edges; accessors', (t) => {
  const r = new Rmap(100);
  r.map(10, 20, 7);
  t.deepEqual(shape(r), [[10, 20, 7]]);
  t.is(r.lookup(9), -1);
  t.is(r.lookup(10), 0);
  t.is(r.lookup(29), 0);
  t.is(r.lookup(30), -1);
  t.is(r.startOf(0), 10);
  t.is(r.lengthOf(0), 20);
  t.is(r.endOf(0), 30);
  t.is(r.redirectOf(0), 7);
  r.map(0, 100, 1);
  t.deepEqual(shape(r), [[0, 100, 1]]);
  t.is(r.lookup(99), 0);
});

test('map inside an extent splits it in three', (t) => {
  const r = new Rmap(100);
  r.map(0, 100, 0);
  r.map(40, 10, 1);
  t.deepEqual(shape(r), [[0, 40, 0], [40, 10, 1], [50, 50, 0]]);
  t.is(r.lookup(39), 0);
  t.is(r.lookup(40), 1);
  t.is(r.lookup(50), 2);
});

test('map trims the extents it overlaps at either end and swallows the ones inside', (t) => {
  const r = new Rmap(100);
  r.map(0, 20, 0);
  r.map(30, 10, 1);
  r.map(50, 10, 2);
  r.map(70, 20, 3);
  r.map(10, 70, 4);
  t.deepEqual(shape(r), [[0, 10, 0], [10, 70, 4], [80, 10, 3]]);
});

test('map exactly over an extent replaces it', (t) => {
  const r = new Rmap(100);
  r.map(0, 10, 0);
  r.map(10, 10, 1);
  r.map(20, 10, 2);
  r.map(10, 10, 5);
  t.deepEqual(shape(r), [[0, 10, 0], [10, 10, 5], [20, 10, 2]]);
});

test('map coalesces with a touching left neighbour, right neighbour, or both', (t) => {
  const r = new Rmap(100);
  r.map(0, 10, 1);
  r.map(10, 10, 1);
  t.deepEqual(shape(r), [[0, 20, 1]], 'left');
  r.map(30, 10, 1);
  r.map(25, 5, 1);
  t.deepEqual(shape(r), [[0, 20, 1], [25, 15, 1]], 'right');
  r.map(20, 5, 1);
  t.deepEqual(shape(r), [[0, 40, 1]], 'both: the gap filled');
  r.map(40, 10, 2);
  t.deepEqual(shape(r), [[0, 40, 1], [40, 10, 2]], 'different redirect: no coalescing');
  r.map(41, 3, 1);
  t.deepEqual(shape(r), [[0, 40, 1], [40, 1, 2], [41, 3, 1], [44, 6, 2]], 'not touching an equal extent');
  r.map(40, 1, 1);
  t.deepEqual(shape(r), [[0, 44, 1], [44, 6, 2]]);
});

test('map over an equal-redirect extent it partly overlaps grows that extent', (t) => {
  const r = new Rmap(100);
  r.map(10, 20, 3);
  r.map(20, 30, 3);
  t.deepEqual(shape(r), [[10, 40, 3]]);
  r.map(0, 15, 3);
  t.deepEqual(shape(r), [[0, 50, 3]]);
  r.map(5, 10, 3);
  t.deepEqual(shape(r), [[0, 50, 3]], 'mapping a sub-range to the same redirect changes nothing');
});

test('map where the overwritten extents coalesce on one side and are trimmed on the other', (t) => {
  const r = new Rmap(100);
  r.map(0, 30, 1);
  r.map(30, 30, 2);
  r.map(20, 20, 2);
  t.deepEqual(shape(r), [[0, 20, 1], [20, 40, 2]]);
  r.map(10, 20, 1);
  t.deepEqual(shape(r), [[0, 30, 1], [30, 30, 2]]);
});

test('unmap splits, trims and removes', (t) => {
  const r = new Rmap(100);
  r.map(0, 100, 0);
  r.unmap(40, 10);
  t.deepEqual(shape(r), [[0, 40, 0], [50, 50, 0]]);
  t.is(r.lookup(45), -1);
  r.unmap(30, 30);
  t.deepEqual(shape(r), [[0, 30, 0], [60, 40, 0]]);
  r.unmap(0, 30);
  t.deepEqual(shape(r), [[60, 40, 0]]);
  r.unmap(0, 50);
  t.deepEqual(shape(r), [[60, 40, 0]], 'unmapping a hole is a no-op');
  r.unmap(0, 100);
  t.deepEqual(shape(r), []);
});

test('extentsIn clips extents and reports holes in order', (t) => {
  const r = new Rmap(100);
  r.map(10, 10, 1);
  r.map(20, 10, 2);
  r.map(50, 10, 3);
  t.deepEqual(r.extentsIn(15, 40), [
    { startBytes: 15, lengthBytes: 5, redirect: 1 },
    { startBytes: 20, lengthBytes: 10, redirect: 2 },
    { startBytes: 30, lengthBytes: 20, redirect: HOLE },
    { startBytes: 50, lengthBytes: 5, redirect: 3 },
  ]);
  t.deepEqual(r.extentsIn(12, 3), [{ startBytes: 12, lengthBytes: 3, redirect: 1 }]);
  t.deepEqual(r.extentsIn(60, 40), [{ startBytes: 60, lengthBytes: 40, redirect: HOLE }]);
  t.deepEqual(r.extentsIn(0, 11), [
    { startBytes: 0, lengthBytes: 10, redirect: HOLE },
    { startBytes: 10, lengthBytes: 1, redirect: 1 },
  ]);
});

test('chunkIndexesOf: the fixed-size chunks a range covers', (t) => {
  const r = new Rmap(1000);
  t.deepEqual(r.chunkIndexesOf(0, 1, 100), [0]);
  t.deepEqual(r.chunkIndexesOf(0, 100, 100), [0]);
  t.deepEqual(r.chunkIndexesOf(99, 2, 100), [0, 1]);
  t.deepEqual(r.chunkIndexesOf(150, 300, 100), [1, 2, 3, 4]);
  t.deepEqual(r.chunkIndexesOf(0, 1000, 1000), [0]);
  t.deepEqual(r.chunkIndexesOf(999, 1, 7), [142]);
});

test('fromExtents: later extents overwrite earlier ones, holes skipped, neighbours coalesce', (t) => {
  const r = Rmap.fromExtents(50, [
    { startBytes: 0, lengthBytes: 20, redirect: 1 },
    { startBytes: 20, lengthBytes: 10, redirect: 1 },
    { startBytes: 5, lengthBytes: 5, redirect: HOLE },
    { startBytes: 25, lengthBytes: 10, redirect: 2 },
  ]);
  t.deepEqual(shape(r), [[0, 25, 1], [25, 10, 2]]);
});

test('JSON round trip and clone independence', (t) => {
  const r = new Rmap(2 ** 40);
  r.map(0, 4096, 0);
  r.map(2 ** 39, 2 ** 30, 1);
  r.map(2 ** 40 - 512, 512, 2);
  const json = JSON.parse(JSON.stringify(r)) as RmapJSON;
  t.deepEqual(json, {
    sizeBytes: 2 ** 40,
    startBytes: [0, 2 ** 39, 2 ** 40 - 512],
    lengthBytes: [4096, 2 ** 30, 512],
    redirects: [0, 1, 2],
  });
  const back = Rmap.fromJSON(json);
  t.deepEqual(back.toJSON(), r.toJSON());
  t.is(back.lookup(2 ** 39 + 5), 1);

  const c = r.clone();
  c.unmap(0, 2 ** 40);
  t.is(c.count, 0);
  t.is(r.count, 3);
  json.startBytes[0] = 99; // toJSON hands out copies
  t.is(back.startOf(0), 0);
});

test('checkInvariants (via fromJSON) rejects each kind of broken rmap', (t) => {
  const bad: [string, RmapJSON][] = [
    ['unsorted', { sizeBytes: 100, startBytes: [50, 0], lengthBytes: [10, 10], redirects: [0, 1] }],
    ['overlapping', { sizeBytes: 100, startBytes: [0, 5], lengthBytes: [10, 10], redirects: [0, 1] }],
    ['zero-length', { sizeBytes: 100, startBytes: [0], lengthBytes: [0], redirects: [0] }],
    ['negative length', { sizeBytes: 100, startBytes: [10], lengthBytes: [-5], redirects: [0] }],
    ['out of bounds', { sizeBytes: 100, startBytes: [95], lengthBytes: [10], redirects: [0] }],
    ['negative start', { sizeBytes: 100, startBytes: [-1], lengthBytes: [10], redirects: [0] }],
    ['uncoalesced', { sizeBytes: 100, startBytes: [0, 10], lengthBytes: [10, 10], redirects: [3, 3] }],
    ['bad redirect', { sizeBytes: 100, startBytes: [0], lengthBytes: [10], redirects: [-1] }],
    ['fractional', { sizeBytes: 100, startBytes: [0.5], lengthBytes: [10], redirects: [0] }],
    ['ragged arrays', { sizeBytes: 100, startBytes: [0, 20], lengthBytes: [10], redirects: [0, 1] }],
  ];
  for (const [what, json] of bad) {
    t.throws(() => Rmap.fromJSON(json), { instanceOf: assert.AssertionError }, what);
  }
  t.throws(() => Rmap.fromJSON({ sizeBytes: 0, startBytes: [], lengthBytes: [], redirects: [] }), { instanceOf: RangeError });
  // The same layout with a gap, or touching but different redirects, is fine.
  t.notThrows(() => Rmap.fromJSON({ sizeBytes: 100, startBytes: [0, 11], lengthBytes: [10, 10], redirects: [3, 3] }));
  t.notThrows(() => Rmap.fromJSON({ sizeBytes: 100, startBytes: [0, 10], lengthBytes: [10, 90], redirects: [3, 4] }));
});

// ---------------------------------------------------------------- RangeErrors

function throwsNaming(t: import('ava').ExecutionContext, fn: () => unknown, name: string): void {
  t.throws(fn, { instanceOf: RangeError, message: new RegExp(`\\b${name}\\b`) }, `${fn.toString()} should name ${name}`);
}

test('constructor rejects a bad sizeBytes', (t) => {
  for (const bad of [0, -1, 1.5, NaN, Infinity, 2 ** 53]) throwsNaming(t, () => new Rmap(bad), 'sizeBytes');
});

test('lookup rejects offsets outside [0, size) and non-integers', (t) => {
  const r = new Rmap(100);
  for (const bad of [-1, 100, 1e9, 0.5, NaN, -0.5]) throwsNaming(t, () => r.lookup(bad), 'offsetBytes');
});

test('accessors reject bad extent indexes', (t) => {
  const r = new Rmap(100);
  r.map(0, 10, 0);
  for (const bad of [-1, 1, 0.5, NaN]) {
    throwsNaming(t, () => r.startOf(bad), 'i');
    throwsNaming(t, () => r.lengthOf(bad), 'i');
    throwsNaming(t, () => r.endOf(bad), 'i');
    throwsNaming(t, () => r.redirectOf(bad), 'i');
  }
});

test('map, unmap, extentsIn and chunkIndexesOf reject bad ranges', (t) => {
  const r = new Rmap(100);
  const calls: [string, (s: number, l: number) => unknown][] = [
    ['map', (s, l) => r.map(s, l, 0)],
    ['unmap', (s, l) => r.unmap(s, l)],
    ['extentsIn', (s, l) => r.extentsIn(s, l)],
    ['chunkIndexesOf', (s, l) => r.chunkIndexesOf(s, l, 10)],
  ];
  for (const [, call] of calls) {
    for (const s of [-1, 100, 1.5, NaN]) throwsNaming(t, () => call(s, 1), 'startBytes');
    for (const l of [0, -1, 1.5, NaN]) throwsNaming(t, () => call(0, l), 'lengthBytes');
    throwsNaming(t, () => call(90, 11), 'lengthBytes'); // runs past the end
    t.notThrows(() => call(90, 10));
  }
  r.checkInvariants();
});

test('map rejects a bad redirect; chunkIndexesOf a bad chunkBytes', (t) => {
  const r = new Rmap(100);
  for (const bad of [-1, 1.5, NaN, 2 ** 53]) throwsNaming(t, () => r.map(0, 10, bad), 'redirect');
  for (const bad of [0, -1, 1.5, NaN]) throwsNaming(t, () => r.chunkIndexesOf(0, 10, bad), 'chunkBytes');
  t.deepEqual(shape(r), [], 'failed calls change nothing');
});
