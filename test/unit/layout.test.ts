import test from 'ava';
import fc from 'fast-check';

import {
  chooseReadSide,
  describe,
  extentSizeOnDisk,
  mapRange,
  placementsOf,
  spansOnePiece,
  validateDescriptor,
} from '../../src/storage/layout.js';
import type { Piece, Placement, SideState, StorageDescriptor } from '../../src/storage/layout.js';

const KiB = 1024;
const MiB = 1024 * KiB;
type Kind = StorageDescriptor['kind'];
const KINDS: Kind[] = ['linear', 'striped', 'mirrored', 'striped-mirrored', 'journal'];

// ---------------------------------------------------------------- generators

interface Case {
  desc: StorageDescriptor;
  extentBytes: number;
}

/**
 * A valid descriptor of the given kind for an extent of `extentBytes`. With
 * `packed`, placements share disks and sit back to back (column c at
 * base + c * sizeOnDisk), so any overlap in the arithmetic shows up as two logical
 * bytes on one physical byte; mirror sides still use distinct disks (side s on
 * disk "s<s>").
 */
function build(
  kind: Kind,
  o: { stripeBytes: number; columns: number; sides: number; extentBytes: number; base: number; packed: boolean },
): StorageDescriptor {
  const dummy = (): Placement => ({ disk: 'x', offsetBytes: 0 });
  const skeleton: StorageDescriptor =
    kind === 'striped' || kind === 'striped-mirrored'
      ? { kind: 'striped', stripeBytes: o.stripeBytes, columns: Array.from({ length: o.columns }, dummy) }
      : { kind: 'linear', at: dummy() };
  const size = extentSizeOnDisk(skeleton, o.extentBytes);
  const at = (c: number, s: number): Placement =>
    o.packed
      ? { disk: `s${s}`, offsetBytes: o.base + c * size }
      : { disk: `c${c}s${s}`, offsetBytes: o.base + 4096 * c + 512 * s };
  switch (kind) {
    case 'linear':
      return { kind, at: at(0, 0) };
    case 'journal':
      return { kind, at: at(0, 0), lengthBytes: o.extentBytes };
    case 'mirrored':
      return { kind, sides: Array.from({ length: o.sides }, (_, s) => at(0, s)) };
    case 'striped':
      return { kind, stripeBytes: o.stripeBytes, columns: Array.from({ length: o.columns }, (_, c) => at(c, 0)) };
    case 'striped-mirrored':
      return {
        kind,
        stripeBytes: o.stripeBytes,
        columns: Array.from({ length: o.columns }, (_, c) => Array.from({ length: o.sides }, (_, s) => at(c, s))),
      };
  }
}

function caseArb(kind: Kind, maxExtent = 64 * KiB): fc.Arbitrary<Case> {
  return fc
    .record({
      stripeBytes: fc.constantFrom(512, 1024, 2048, 4096),
      columns: fc.integer({ min: 2, max: 4 }),
      sides: fc.integer({ min: 2, max: 3 }),
      extentBytes: fc.oneof(fc.constant(maxExtent), fc.integer({ min: 1, max: maxExtent })),
      base: fc.integer({ min: 0, max: 64 * KiB }),
      packed: fc.boolean(),
    })
    .map((o) => ({ desc: build(kind, o), extentBytes: o.extentBytes }));
}

/** A range inside [0, extentBytes]. */
function rangeIn(extentBytes: number): fc.Arbitrary<{ rel: number; len: number }> {
  return fc
    .tuple(fc.integer({ min: 0, max: extentBytes }), fc.integer({ min: 0, max: extentBytes }))
    .map(([a, b]) => ({ rel: Math.min(a, b), len: Math.abs(a - b) }));
}

const isStriped = (d: StorageDescriptor): d is Extract<StorageDescriptor, { stripeBytes: number }> =>
  d.kind === 'striped' || d.kind === 'striped-mirrored';

/** Targets a piece of `column` must have. */
function expectedTargets(d: StorageDescriptor, column: number): Placement[] {
  switch (d.kind) {
    case 'linear':
    case 'journal':
      return [d.at];
    case 'mirrored':
      return d.sides;
    case 'striped':
      return [d.columns[column]!];
    case 'striped-mirrored':
      return d.columns[column]!;
  }
}

/** Everything a correct split of [rel, rel+len) must satisfy; returns a problem or null. */
function tilingProblem(d: StorageDescriptor, rel: number, len: number, pieces: Piece[]): string | null {
  if (len === 0) return pieces.length === 0 ? null : 'pieces for an empty range';
  let pos = rel;
  let buf = 0;
  for (const p of pieces) {
    if (p.relativeBytes !== pos) return `gap/overlap at ${pos}: piece starts at ${p.relativeBytes}`;
    if (p.bufferOffsetBytes !== buf) return `buffer offset ${p.bufferOffsetBytes}, expected ${buf}`;
    if (!(p.lengthBytes > 0)) return 'empty piece';
    if (isStriped(d)) {
      const k = Math.floor(p.relativeBytes / d.stripeBytes);
      if (Math.floor((p.relativeBytes + p.lengthBytes - 1) / d.stripeBytes) !== k) return 'piece crosses a stripe';
      if (p.column !== k % d.columns.length) return `stripe ${k} on column ${p.column}`;
      const within = p.relativeBytes - k * d.stripeBytes;
      if (p.columnOffsetBytes !== Math.floor(k / d.columns.length) * d.stripeBytes + within) return 'column offset';
    } else if (p.column !== 0 || p.columnOffsetBytes !== p.relativeBytes) {
      return 'unstriped piece not at column 0, relative offset';
    }
    const want = expectedTargets(d, p.column);
    if (JSON.stringify(p.targets) !== JSON.stringify(want)) return `targets ${JSON.stringify(p.targets)}`;
    if (p.physicalOffsets.length !== p.targets.length) return 'physicalOffsets not aligned with targets';
    for (let i = 0; i < p.targets.length; i++) {
      if (p.physicalOffsets[i] !== p.targets[i]!.offsetBytes + p.columnOffsetBytes) return 'physical offset';
    }
    pos += p.lengthBytes;
    buf += p.lengthBytes;
  }
  if (pos !== rel + len || buf !== len) return `pieces cover ${buf} of ${len} bytes`;
  return null;
}

// ---------------------------------------------------------------- examples

test('linear, journal and mirrored map to one piece at placement + relative offset', (t) => {
  const lin: StorageDescriptor = { kind: 'linear', at: { disk: 'd1', offsetBytes: 5 * MiB } };
  t.deepEqual(mapRange(lin, 4096, 8192), [
    {
      column: 0,
      relativeBytes: 4096,
      lengthBytes: 8192,
      targets: [{ disk: 'd1', offsetBytes: 5 * MiB }],
      physicalOffsets: [5 * MiB + 4096],
      columnOffsetBytes: 4096,
      bufferOffsetBytes: 0,
    },
  ]);
  const mir: StorageDescriptor = {
    kind: 'mirrored',
    sides: [
      { disk: 'a', offsetBytes: 0 },
      { disk: 'b', offsetBytes: MiB },
      { disk: 'c', offsetBytes: 2 * MiB },
    ],
  };
  const [p] = mapRange(mir, 100, 50);
  t.deepEqual(p!.targets, mir.sides);
  t.deepEqual(p!.physicalOffsets, [100, MiB + 100, 2 * MiB + 100]);
  const j: StorageDescriptor = { kind: 'journal', at: { disk: 'd1', offsetBytes: 1000 }, lengthBytes: 4096 };
  t.deepEqual(mapRange(j, 96, 4000)[0]!.physicalOffsets, [1096]);
  t.throws(() => mapRange(j, 97, 4000), { instanceOf: RangeError, message: /past the end of the journal extent \(4096 bytes\)/ });
  t.false(spansOnePiece(j, 97, 4000));
  t.true(spansOnePiece(j, 96, 4000));
  t.deepEqual(mapRange(lin, 0, 0), []);
  t.throws(() => mapRange(lin, -1, 1), { instanceOf: RangeError });
  t.throws(() => mapRange(lin, 0.5, 1), { instanceOf: RangeError });
  t.throws(() => mapRange(lin, 4000, 200, 4096), { instanceOf: RangeError, message: /past the end of the linear extent/ });
});

test('striped: stripe k goes to column k % columns at floor(k / columns) * stripe + within', (t) => {
  const d: StorageDescriptor = {
    kind: 'striped',
    stripeBytes: 4096,
    columns: [
      { disk: 'a', offsetBytes: 0 },
      { disk: 'b', offsetBytes: 8192 },
      { disk: 'c', offsetBytes: 0 },
    ],
  };
  // stripe 4 → column 1, row 1
  const [p] = mapRange(d, 4 * 4096 + 10, 100);
  t.is(p!.column, 1);
  t.is(p!.columnOffsetBytes, 4096 + 10);
  t.deepEqual(p!.physicalOffsets, [8192 + 4096 + 10]);
  // a request spanning stripes 2..4 splits into three pieces on columns 2, 0, 1
  const ps = mapRange(d, 2 * 4096 + 4000, 4096 + 200);
  t.deepEqual(
    ps.map((x) => [x.column, x.relativeBytes, x.lengthBytes, x.bufferOffsetBytes, x.physicalOffsets[0]]),
    [
      [2, 2 * 4096 + 4000, 96, 0, 4000],
      [0, 3 * 4096, 4096, 96, 4096],
      [1, 4 * 4096, 104, 4192, 8192 + 4096],
    ],
  );
  t.false(spansOnePiece(d, 2 * 4096 + 4000, 4096 + 200));
  t.true(spansOnePiece(d, 4096, 4096));
  t.false(spansOnePiece(d, 4096, 4097));
  // offsets past 2^32 stay exact
  const far = 2 ** 40 + 3 * 4096 + 1;
  const [q] = mapRange(d, far, 1);
  const k = Math.floor(far / 4096);
  t.is(q!.column, k % 3);
  t.is(q!.columnOffsetBytes, Math.floor(k / 3) * 4096 + 1);
});

test('striped-mirrored: each piece goes to every side of its column', (t) => {
  const d: StorageDescriptor = {
    kind: 'striped-mirrored',
    stripeBytes: 512,
    columns: [
      [
        { disk: 'a', offsetBytes: 0 },
        { disk: 'b', offsetBytes: 0 },
      ],
      [
        { disk: 'c', offsetBytes: 1024 },
        { disk: 'd', offsetBytes: 0 },
      ],
    ],
  };
  const ps = mapRange(d, 256, 1024);
  t.deepEqual(
    ps.map((p) => [p.column, p.targets.map((x) => x.disk), p.physicalOffsets]),
    [
      [0, ['a', 'b'], [256, 256]],
      [1, ['c', 'd'], [1024, 0]],
      [0, ['a', 'b'], [512, 512]],
    ],
  );
});

test('extentSizeOnDisk per kind', (t) => {
  const p = { disk: 'a', offsetBytes: 0 };
  const q = { disk: 'b', offsetBytes: 0 };
  const r = { disk: 'c', offsetBytes: 0 };
  t.is(extentSizeOnDisk({ kind: 'linear', at: p }, 4 * MiB), 4 * MiB);
  t.is(extentSizeOnDisk({ kind: 'mirrored', sides: [p, q] }, 4 * MiB), 4 * MiB);
  t.is(extentSizeOnDisk({ kind: 'journal', at: p, lengthBytes: MiB }, 4 * MiB), MiB);
  t.is(extentSizeOnDisk({ kind: 'striped', stripeBytes: 64 * KiB, columns: [p, q] }, 4 * MiB), 2 * MiB);
  t.is(extentSizeOnDisk({ kind: 'striped-mirrored', stripeBytes: 64 * KiB, columns: [[p, q], [r, p], [q, r], [p, r]] }, 4 * MiB), MiB);
  // partial last row: column 0 holds the extra
  const s3: StorageDescriptor = { kind: 'striped', stripeBytes: 512, columns: [p, q, r] };
  t.is(extentSizeOnDisk(s3, 3 * 512 + 1), 513);
  t.is(extentSizeOnDisk(s3, 3 * 512 + 700), 1024);
  t.is(extentSizeOnDisk(s3, 100), 100);
  t.throws(() => extentSizeOnDisk(s3, -1), { instanceOf: RangeError });
});

test('validateDescriptor names the problem', (t) => {
  const p = (disk: string, offsetBytes = 0): Placement => ({ disk, offsetBytes });
  t.is(validateDescriptor({ kind: 'linear', at: p('a') }), null);
  t.is(validateDescriptor({ kind: 'journal', at: p('a'), lengthBytes: MiB }), null);
  t.is(validateDescriptor({ kind: 'striped', stripeBytes: 512, columns: [p('a'), p('b')] }), null);
  t.is(validateDescriptor({ kind: 'mirrored', sides: [p('a'), p('b')] }), null);
  t.is(validateDescriptor({ kind: 'striped-mirrored', stripeBytes: 4096, columns: [[p('a'), p('b')], [p('c'), p('a', 8192)]] }), null);

  t.regex(validateDescriptor({ kind: 'striped', stripeBytes: 256, columns: [p('a'), p('b')] })!, /stripeBytes 256 must be a power of two of at least 512/);
  t.regex(validateDescriptor({ kind: 'striped', stripeBytes: 1536, columns: [p('a'), p('b')] })!, /power of two/);
  t.regex(validateDescriptor({ kind: 'striped', stripeBytes: 512, columns: [p('a')] })!, /at least 2 columns, got 1/);
  t.regex(validateDescriptor({ kind: 'mirrored', sides: [p('a')] })!, /at least 2 sides, got 1/);
  t.regex(validateDescriptor({ kind: 'mirrored', sides: [p('a'), p('a', MiB)] })!, /two sides on disk a; mirror sides must be on distinct disks/);
  t.regex(
    validateDescriptor({ kind: 'striped-mirrored', stripeBytes: 512, columns: [[p('a'), p('b')], [p('c'), p('c', 4096)]] })!,
    /column 1: two sides on disk c/,
  );
  t.regex(validateDescriptor({ kind: 'striped-mirrored', stripeBytes: 512, columns: [[p('a'), p('b')], [p('c'), p('d'), p('e')]] })!, /column 1 has 3 sides, column 0 has 2/);
  t.regex(validateDescriptor({ kind: 'striped-mirrored', stripeBytes: 512, columns: [[p('a'), p('b')]] })!, /at least 2 columns/);
  t.regex(validateDescriptor({ kind: 'linear', at: p('a', -1) })!, /offsetBytes -1 is not a non-negative integer/);
  t.regex(validateDescriptor({ kind: 'linear', at: p('a', 1.5) })!, /offsetBytes 1.5/);
  t.regex(validateDescriptor({ kind: 'linear', at: p('') })!, /disk must be a non-empty string/);
  t.regex(validateDescriptor({ kind: 'journal', at: p('a'), lengthBytes: 0 })!, /lengthBytes 0 must be a positive integer/);
  t.regex(validateDescriptor({ kind: 'raid5' } as unknown as StorageDescriptor)!, /unknown storage descriptor kind "raid5"/);
});

test('describe and placementsOf', (t) => {
  const p = (disk: string, offsetBytes = 0): Placement => ({ disk, offsetBytes });
  t.is(describe({ kind: 'linear', at: p('d1', 4096) }), 'linear d1@4096');
  t.is(describe({ kind: 'journal', at: p('d1'), lengthBytes: MiB }), 'journal d1@0 (1 MiB)');
  t.is(describe({ kind: 'mirrored', sides: [p('a'), p('b', 512)] }), 'mirrored [a@0 | b@512]');
  t.is(describe({ kind: 'striped', stripeBytes: 64 * KiB, columns: [p('a'), p('b'), p('c')] }), 'striped 64 KiB x 3 [a@0, b@0, c@0]');
  const sm: StorageDescriptor = { kind: 'striped-mirrored', stripeBytes: 512, columns: [[p('a'), p('b')], [p('c'), p('d')]] };
  t.is(describe(sm), 'striped-mirrored 512 B x 2 [(a@0 | b@0), (c@0 | d@0)]');
  t.deepEqual(placementsOf(sm).map((x) => x.disk), ['a', 'b', 'c', 'd']);
});

// ---------------------------------------------------------------- properties

for (const kind of KINDS) {
  test(`property (${kind}): pieces exactly tile the request buffer`, (t) => {
    // journal ranges must fit in the journal; the others are unbounded
    const big = kind === 'journal' ? 64 * KiB : 2 ** 45;
    fc.assert(
      fc.property(
        caseArb(kind),
        fc.integer({ min: 0, max: big }),
        fc.integer({ min: 0, max: 256 * KiB }),
        ({ desc, extentBytes }, relRaw, lenRaw) => {
          let rel = relRaw;
          let len = lenRaw;
          if (kind === 'journal') {
            rel = relRaw % (extentBytes + 1);
            len = lenRaw % (extentBytes - rel + 1);
          }
          const pieces = mapRange(desc, rel, len);
          const problem = tilingProblem(desc, rel, len, pieces);
          if (problem) throw new Error(`${describe(desc)} [${rel}+${len}]: ${problem}`);
          if (spansOnePiece(desc, rel, len) !== (pieces.length === 1)) throw new Error('spansOnePiece disagrees');
        },
      ),
      { numRuns: 300 },
    );
    t.pass();
  });

  test(`property (${kind}): the map is injective and stays inside each placement's allocation`, (t) => {
    fc.assert(
      fc.property(caseArb(kind), fc.array(rangeIn(64 * KiB), { maxLength: 8 }), ({ desc, extentBytes }, ranges) => {
        t.is(validateDescriptor(desc), null);
        const size = extentSizeOnDisk(desc, extentBytes);
        const placements = placementsOf(desc);
        // per disk: physical byte → logical byte + 1 (0 = unmapped)
        const disks = new Map<string, Int32Array>();
        for (const pl of placements) {
          const cur = disks.get(pl.disk);
          const need = pl.offsetBytes + size;
          if (!cur || cur.length < need) {
            const next = new Int32Array(Math.max(need, cur?.length ?? 0));
            if (cur) next.set(cur);
            disks.set(pl.disk, next);
          }
        }
        const used = new Map<Placement, number>(); // highest in-allocation byte used + 1
        const phys0 = new Float64Array(extentBytes); // logical → physical on target 0
        for (const p of mapRange(desc, 0, extentBytes)) {
          for (let i = 0; i < p.targets.length; i++) {
            const pl = p.targets[i]!;
            const start = p.physicalOffsets[i]!;
            if (start < pl.offsetBytes || start + p.lengthBytes > pl.offsetBytes + size) {
              throw new Error(`${describe(desc)}: piece at ${start}+${p.lengthBytes} outside ${pl.disk}@${pl.offsetBytes}+${size}`);
            }
            used.set(pl, Math.max(used.get(pl) ?? 0, start + p.lengthBytes - pl.offsetBytes));
            const map = disks.get(pl.disk)!;
            for (let j = 0; j < p.lengthBytes; j++) {
              const prev = map[start + j]!;
              if (prev !== 0) {
                throw new Error(`${describe(desc)}: ${pl.disk}@${start + j} holds logical ${prev - 1} and ${p.relativeBytes + j}`);
              }
              map[start + j] = p.relativeBytes + j + 1;
              if (i === 0) phys0[p.relativeBytes + j] = start + j;
            }
          }
        }
        // every placement is used, and the busiest one needs exactly extentSizeOnDisk
        // (a striped extent shorter than one stripe row leaves the last columns empty)
        const full = !isStriped(desc) || extentBytes >= desc.stripeBytes * desc.columns.length;
        if (full && placements.some((pl) => !used.has(pl))) throw new Error('a placement received no data');
        if (Math.max(...used.values()) !== size) throw new Error('extentSizeOnDisk is not tight');
        // sub-requests agree with the whole-extent map
        for (const { rel, len } of ranges) {
          if (rel + len > extentBytes) continue;
          for (const p of mapRange(desc, rel, len, extentBytes)) {
            for (let j = 0; j < p.lengthBytes; j++) {
              if (p.physicalOffsets[0]! + j !== phys0[p.relativeBytes + j]) throw new Error('sub-request disagrees');
            }
          }
        }
      }),
      { numRuns: 60 },
    );
  });
}

test('property: spansOnePiece iff mapRange gives exactly one piece, near stripe boundaries too', (t) => {
  const kindArb = fc.constantFrom<Kind>(...KINDS);
  fc.assert(
    fc.property(
      kindArb.chain((k) => caseArb(k)),
      fc.integer({ min: 0, max: 40 }),
      fc.integer({ min: -3, max: 3 }),
      fc.integer({ min: 0, max: 5000 }),
      ({ desc }, stripeNo, nudge, len) => {
        const s = isStriped(desc) ? desc.stripeBytes : 512;
        const rel = Math.max(0, stripeNo * s + nudge);
        const bounded = desc.kind === 'journal' && rel + len > desc.lengthBytes;
        const n = bounded ? -1 : mapRange(desc, rel, len).length;
        return spansOnePiece(desc, rel, len) === (n === 1);
      },
    ),
    { numRuns: 1000 },
  );
  t.pass();
});

test('property: mirrored pieces target every side at side + offset', (t) => {
  fc.assert(
    fc.property(caseArb('mirrored'), fc.nat(2 ** 40), fc.integer({ min: 1, max: MiB }), ({ desc }, rel, len) => {
      if (desc.kind !== 'mirrored') return false;
      const pieces = mapRange(desc, rel, len);
      return (
        pieces.length === 1 &&
        pieces[0]!.targets.length === desc.sides.length &&
        desc.sides.every((s, i) => pieces[0]!.targets[i] === s && pieces[0]!.physicalOffsets[i] === s.offsetBytes + rel)
      );
    }),
  );
  t.pass();
});

// ---------------------------------------------------------------- read balancing

const stateArb = fc.constantFrom<SideState>('live', 'dead', 'resyncing');

test('chooseReadSide: -1 when no side is live; never a dead or resyncing side', (t) => {
  t.is(chooseReadSide([], 'round-robin', 0), -1);
  t.is(chooseReadSide([{ state: 'dead' }, { state: 'resyncing' }], 'round-robin', 5), -1);
  t.is(chooseReadSide([{ state: 'dead' }, { state: 'resyncing' }], 'cost', 5), -1);
  t.is(chooseReadSide([{ state: 'dead', costUs: 1 }, { state: 'live', costUs: 900 }], 'cost', 0), 1);
  fc.assert(
    fc.property(
      fc.array(fc.record({ state: stateArb, costUs: fc.option(fc.nat(1000), { nil: undefined }) }), { maxLength: 6 }),
      fc.constantFrom<'round-robin' | 'cost'>('round-robin', 'cost'),
      fc.integer(),
      (sides, policy, counter) => {
        const i = chooseReadSide(sides, policy, counter);
        if (!sides.some((s) => s.state === 'live')) return i === -1;
        return i >= 0 && i < sides.length && sides[i]!.state === 'live';
      },
    ),
    { numRuns: 1000 },
  );
  t.pass();
});

test('chooseReadSide: round-robin balances over the live sides', (t) => {
  fc.assert(
    fc.property(fc.array(stateArb, { minLength: 1, maxLength: 6 }), fc.nat(1000), (states, start) => {
      const live = states.map((s, i) => (s === 'live' ? i : -1)).filter((i) => i >= 0);
      if (live.length === 0) return true;
      const sides = states.map((state) => ({ state }));
      const hits = new Map<number, number>();
      const rounds = 5;
      for (let c = start; c < start + rounds * live.length; c++) {
        const i = chooseReadSide(sides, 'round-robin', c);
        hits.set(i, (hits.get(i) ?? 0) + 1);
      }
      return hits.size === live.length && live.every((i) => hits.get(i) === rounds);
    }),
  );
  // consecutive counters alternate
  const two = [{ state: 'live' as const }, { state: 'dead' as const }, { state: 'live' as const }];
  t.deepEqual([0, 1, 2, 3].map((c) => chooseReadSide(two, 'round-robin', c)), [0, 2, 0, 2]);
});

test('chooseReadSide: cost picks the cheapest live side, ties round-robin, unknown cost last', (t) => {
  const sides = [
    { state: 'live' as const, costUs: 50 },
    { state: 'live' as const, costUs: 20 },
    { state: 'resyncing' as const, costUs: 1 },
    { state: 'live' as const, costUs: 20 },
    { state: 'live' as const },
  ];
  t.deepEqual([0, 1, 2, 3].map((c) => chooseReadSide(sides, 'cost', c)), [1, 3, 1, 3]);
  t.is(chooseReadSide([{ state: 'live' }, { state: 'live', costUs: 10_000 }], 'cost', 0), 1);
  // no costs known: round-robin
  t.deepEqual([0, 1, 2].map((c) => chooseReadSide([{ state: 'live' }, { state: 'live' }], 'cost', c)), [0, 1, 0]);
});
