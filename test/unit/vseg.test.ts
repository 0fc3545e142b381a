import test from 'ava';
import type { ExecutionContext } from 'ava';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import { Rmap } from '../../src/map/rmap.js';
import { RedirectTable } from '../../src/map/redirect.js';
import type { RedirectEntry, RedirectTableJSON, StorageDescriptor } from '../../src/map/redirect.js';
import { VolumeMap, Vseg } from '../../src/map/vseg.js';
import type { VolumeMapJSON } from '../../src/map/vseg.js';

function throwsNaming(t: ExecutionContext, fn: () => unknown, name: string): void {
  t.throws(fn, { instanceOf: RangeError, message: new RegExp(`(^|[^\\w.])${name.replace('.', '\\.')}\\b`) }, `should name ${name}: ${fn.toString()}`);
}

function linear(disk: string, offsetBytes: number, generation = 0, originBytes = 0): RedirectEntry {
  return { storage: { kind: 'linear', at: { disk, offsetBytes } }, faultOnRead: false, faultOnWrite: false, generation, originBytes };
}

// ================================================================ RedirectTable

test('RedirectTable: add / get / replace / release with lowest-free reuse', (t) => {
  const tab = new RedirectTable();
  t.is(tab.add(linear('a', 0)), 0);
  t.is(tab.add(linear('b', 0)), 1);
  t.is(tab.add(linear('c', 0)), 2);
  t.is(tab.add(linear('d', 0)), 3);
  t.is(tab.size, 4);
  t.deepEqual(tab.get(1), linear('b', 0));
  tab.replace(1, linear('B', 512, 7));
  t.deepEqual(tab.get(1), linear('B', 512, 7));
  tab.release(2);
  tab.release(0);
  t.is(tab.size, 2);
  t.is(tab.capacity, 4);
  t.false(tab.has(0));
  t.true(tab.has(1));
  t.deepEqual([...tab.entries()].map(([i]) => i), [1, 3]);
  t.is(tab.add(linear('e', 0)), 0, 'lowest free slot first');
  t.is(tab.add(linear('f', 0)), 2);
  t.is(tab.add(linear('g', 0)), 4, 'then a new slot');
  t.is(tab.indexOf(linear('f', 0)), 2);
  t.is(tab.indexOf(linear('zz', 0)), -1);
  tab.checkInvariants();
});

test('RedirectTable: stored entries are frozen copies', (t) => {
  const tab = new RedirectTable();
  const e = linear('a', 4096);
  const i = tab.add(e);
  (e.storage as { kind: 'linear'; at: { disk: string; offsetBytes: number } }).at.offsetBytes = 1;
  e.faultOnRead = true;
  t.deepEqual(tab.get(i), linear('a', 4096), 'later changes to the argument do not leak in');
  t.true(Object.isFrozen(tab.get(i)));
  t.throws(() => {
    (tab.get(i).storage as { at: { offsetBytes: number } }).at.offsetBytes = 5;
  }, { instanceOf: TypeError });
  t.is(tab.get(i), tab.get(i), 'get does not copy');
});

test('RedirectTable: JSON round trip keeps indexes and free slots', (t) => {
  const tab = new RedirectTable();
  const stripes: StorageDescriptor = {
    kind: 'striped-mirrored',
    stripeBytes: 65536,
    columns: [
      [{ disk: 'a', offsetBytes: 0 }, { disk: 'b', offsetBytes: 0 }],
      [{ disk: 'c', offsetBytes: 8192 }, { disk: 'd', offsetBytes: 8192 }],
    ],
  };
  tab.add(linear('a', 0));
  tab.add({ storage: stripes, faultOnRead: true, faultOnWrite: true, generation: 42, originBytes: -4096 });
  tab.add({ storage: { kind: 'journal', at: { disk: 'j', offsetBytes: 1 << 20 }, lengthBytes: 1 << 20 }, faultOnRead: false, faultOnWrite: true, generation: 1, originBytes: 0 });
  tab.add({ storage: { kind: 'mirrored', sides: [{ disk: 'a', offsetBytes: 0 }, { disk: 'b', offsetBytes: 0 }] }, faultOnRead: false, faultOnWrite: false, generation: 0, originBytes: 0 });
  tab.release(0);
  tab.release(2);
  const json = JSON.parse(JSON.stringify(tab)) as RedirectTableJSON;
  t.is(json.slots.length, 4);
  t.is(json.slots[0], null);
  t.is(json.slots[2], null);
  const back = RedirectTable.fromJSON(json);
  back.checkInvariants();
  t.deepEqual(back.toJSON(), tab.toJSON());
  t.deepEqual(back.get(1).storage, stripes);
  t.is(back.add(linear('x', 0)), 0);
  t.is(back.add(linear('y', 0)), 2);
  t.is(back.add(linear('z', 0)), 4);
});

test('RedirectTable: clone is independent', (t) => {
  const tab = new RedirectTable();
  tab.add(linear('a', 0));
  const c = tab.clone();
  c.release(0);
  c.add(linear('b', 0));
  t.deepEqual(tab.get(0), linear('a', 0));
  t.deepEqual(c.get(0), linear('b', 0));
});

test('RedirectTable: bad indexes and malformed entries are RangeErrors', (t) => {
  const tab = new RedirectTable();
  tab.add(linear('a', 0));
  tab.add(linear('b', 0));
  tab.release(1);
  for (const bad of [-1, 1, 2, 0.5, NaN]) {
    throwsNaming(t, () => tab.get(bad), 'i');
    throwsNaming(t, () => tab.replace(bad, linear('c', 0)), 'i');
    throwsNaming(t, () => tab.release(bad), 'i');
  }
  const good = linear('a', 0);
  const cases: [string, unknown][] = [
    ['entry.storage', { ...good, storage: { kind: 'raid5' } }],
    ['entry.storage', { ...good, storage: null }],
    ['entry.faultOnRead', { ...good, faultOnRead: 1 }],
    ['entry.faultOnWrite', { ...good, faultOnWrite: undefined }],
    ['entry.generation', { ...good, generation: -1 }],
    ['entry.generation', { ...good, generation: 1.5 }],
    ['entry.originBytes', { ...good, originBytes: 0.5 }],
    ['entry.originBytes', { ...good, originBytes: undefined }],
    ['entry', null],
  ];
  for (const [name, e] of cases) {
    throwsNaming(t, () => tab.add(e as RedirectEntry), name);
    throwsNaming(t, () => tab.replace(0, e as RedirectEntry), name);
  }
  t.is(tab.size, 1, 'failed calls change nothing');
  t.deepEqual(tab.get(0), good);
  tab.checkInvariants();
});

// ================================================================ Vseg / VolumeMap examples

/** A volume of 3 VSEGs: [0,100) [100,250) [250,300). */
function threeVsegs(): VolumeMap {
  const a = new Vseg(0, 100);
  const ea = a.redirects.add(linear('d0', 0));
  a.rmap.map(0, 100, ea);
  const b = new Vseg(100, 150);
  const eb0 = b.redirects.add(linear('d1', 0));
  const eb1 = b.redirects.add(linear('d2', 1000, 3, 40)); // storage allocated for [40, 80)
  b.rmap.map(0, 150, eb0);
  b.rmap.map(40, 40, eb1);
  b.rmap.unmap(120, 10);
  const c = new Vseg(250, 50);
  return new VolumeMap([a, b, c]);
}

test('VolumeMap: sizes, findVseg at every boundary', (t) => {
  const m = threeVsegs();
  m.checkInvariants();
  t.is(m.sizeBytes, 300);
  t.is(m.vsegs.length, 3);
  t.is(m.findVseg(0), 0);
  t.is(m.findVseg(99), 0);
  t.is(m.findVseg(100), 1);
  t.is(m.findVseg(249), 1);
  t.is(m.findVseg(250), 2);
  t.is(m.findVseg(299), 2);
  for (const bad of [-1, 300, 1.5, NaN]) throwsNaming(t, () => m.findVseg(bad), 'offsetBytes');
  t.is(new VolumeMap().sizeBytes, 0);
  throwsNaming(t, () => new VolumeMap().findVseg(0), 'offsetBytes');
});

test('VolumeMap: resolve walks VSEG → extent → entry and computes offsets', (t) => {
  const m = threeVsegs();
  const r = m.resolve(150)!; // VSEG 1, relative 50, in the [40, 80) extent
  t.truthy(r);
  t.is(r.vsegIndex, 1);
  t.is(r.vseg, m.vsegs[1]);
  t.is(r.extentIndex, 1);
  t.is(r.redirectIndex, 1);
  t.deepEqual(r.entry, linear('d2', 1000, 3, 40));
  t.is(r.vsegRelativeBytes, 50);
  t.is(r.extentOffsetBytes, 10);
  t.is(r.extentRemainingBytes, 30);
  t.is(r.relativeBytes, 10);
  t.is(m.resolve(100 + 120), null, 'unmapped hole');
  t.is(m.resolve(250), null, 'empty VSEG');
  const s = m.resolve(100 + 130)!;
  t.is(s.relativeBytes, 130, 'origin 0: descriptor offset is the VSEG-relative offset');
  t.is(s.extentOffsetBytes, 0);
  t.is(s.extentRemainingBytes, 20);
  for (const bad of [-1, 300, 0.5]) throwsNaming(t, () => m.resolve(bad), 'offsetBytes');
});

test('resolve: trimming an extent in the rmap does not move its bytes', (t) => {
  const v = new Vseg(0, 200);
  const e = v.redirects.add(linear('d', 8192, 0, 100)); // storage allocated for [100, 200)
  v.rmap.map(100, 100, e);
  const m = new VolumeMap([v]);
  t.is(m.resolve(170)!.relativeBytes, 70);
  v.rmap.map(100, 50, v.redirects.add(linear('other', 0, 0, 100)));
  const r = m.resolve(170)!;
  t.is(r.extentOffsetBytes, 20, 'the extent now starts at 150');
  t.is(r.relativeBytes, 70, 'but byte 170 still lives at descriptor offset 70');
});

test('VolumeMap: construction and append demand contiguity', (t) => {
  throwsNaming(t, () => new VolumeMap([new Vseg(10, 10)]), 'vseg.startBytes');
  throwsNaming(t, () => new VolumeMap([new Vseg(0, 10), new Vseg(11, 10)]), 'vseg.startBytes');
  const m = new VolumeMap([new Vseg(0, 10)]);
  throwsNaming(t, () => m.append(new Vseg(5, 10)), 'vseg.startBytes');
  t.is(m.append(new Vseg(10, 30)), 1);
  t.is(m.sizeBytes, 40);
  t.is(m.findVseg(39), 1);
  m.checkInvariants();
});

test('Vseg: constructor RangeErrors and invariant checks', (t) => {
  for (const bad of [-1, 0.5, NaN]) throwsNaming(t, () => new Vseg(bad, 10), 'startBytes');
  for (const bad of [0, -1, 0.5, NaN]) throwsNaming(t, () => new Vseg(0, bad), 'lengthBytes');
  throwsNaming(t, () => new Vseg(0, 10, new Rmap(11)), 'rmap.sizeBytes');

  const dangling = new Vseg(0, 10);
  dangling.rmap.map(0, 5, 3);
  t.throws(() => dangling.checkInvariants(), { instanceOf: assert.AssertionError, message: /not a live entry/ });

  const beforeOrigin = new Vseg(0, 10);
  beforeOrigin.rmap.map(2, 5, beforeOrigin.redirects.add(linear('d', 0, 0, 4)));
  t.throws(() => beforeOrigin.checkInvariants(), { instanceOf: assert.AssertionError, message: /before its entry's origin/ });

  const released = new Vseg(0, 10);
  released.rmap.map(0, 10, released.redirects.add(linear('d', 0)));
  released.checkInvariants();
  released.redirects.release(0);
  t.throws(() => released.checkInvariants(), { instanceOf: assert.AssertionError });
});

test('split: moves right-only entries, copies shared ones, shifts origins', (t) => {
  const v = new Vseg(0, 100);
  const shared = v.redirects.add(linear('s', 0));
  const leftOnly = v.redirects.add(linear('l', 0, 0, 10));
  const rightOnly = v.redirects.add(linear('r', 500, 0, 70));
  const unused = v.redirects.add(linear('u', 0));
  v.rmap.map(0, 100, shared);
  v.rmap.map(10, 10, leftOnly);
  v.rmap.map(70, 20, rightOnly);
  const m = new VolumeMap([v]);
  const before = Array.from({ length: 100 }, (_, off) => m.resolve(off));

  t.is(m.split(60), 1);
  m.checkInvariants();
  const [l, r] = m.vsegs as [Vseg, Vseg];
  t.is(l.startBytes, 0);
  t.is(l.lengthBytes, 60);
  t.is(r.startBytes, 60);
  t.is(r.lengthBytes, 40);
  t.deepEqual([...l.redirects.entries()].map(([i]) => i), [shared, leftOnly, unused], 'right-only entry released on the left');
  t.deepEqual([...r.redirects.entries()].map(([, e]) => e), [linear('s', 0, 0, -60), linear('r', 500, 0, 10)]);
  t.deepEqual(l.rmap.extents().map((e) => [e.startBytes, e.lengthBytes]), [[0, 10], [10, 10], [20, 40]]);
  t.deepEqual(r.rmap.extents().map((e) => [e.startBytes, e.lengthBytes, e.redirect]), [[0, 10, 0], [10, 20, 1], [30, 10, 0]]);
  for (let off = 0; off < 100; off++) {
    const a = before[off]!;
    const b = m.resolve(off)!;
    t.is(b.relativeBytes, a.relativeBytes);
    t.deepEqual(b.entry.storage, a.entry.storage);
  }
  t.is(m.resolve(65)!.extentRemainingBytes, 5, 'the extent crossing the cut was cut');
  t.is(v.lengthBytes, 100, 'the old Vseg object is untouched');
  t.is(v.rmap.count, 5);

  throwsNaming(t, () => m.split(60), 'atBytes');
  throwsNaming(t, () => m.split(0), 'atBytes');
  throwsNaming(t, () => m.split(100), 'offsetBytes');
  throwsNaming(t, () => m.split(-5), 'offsetBytes');
});

test('merge undoes split exactly; merge RangeErrors', (t) => {
  const m = threeVsegs();
  const json = m.toJSON();
  for (const at of [1, 40, 50, 79, 80, 120, 125, 130, 149]) {
    m.split(100 + at);
    m.checkInvariants();
    t.is(m.vsegs.length, 4);
    const merged = m.merge(1);
    m.checkInvariants();
    t.is(merged, m.vsegs[1]);
    t.deepEqual(m.toJSON(), json, `split at ${at} then merge`);
  }
  for (const bad of [-1, 2, 3, 0.5, NaN]) throwsNaming(t, () => m.merge(bad), 'i');
  throwsNaming(t, () => new VolumeMap([new Vseg(0, 10)]).merge(0), 'i');
});

test('merge of independently built VSEGs: equal entries unify and touching extents coalesce', (t) => {
  const a = new Vseg(0, 50);
  a.rmap.map(0, 50, a.redirects.add(linear('d', 0)));
  const b = new Vseg(50, 50);
  b.redirects.add(linear('elsewhere', 0));
  b.rmap.map(0, 30, b.redirects.add(linear('d', 0, 0, -50))); // continues a's storage
  const m = new VolumeMap([a, b]);
  m.merge(0);
  m.checkInvariants();
  const v = m.vsegs[0]!;
  t.deepEqual(v.rmap.extents(), [{ startBytes: 0, lengthBytes: 80, redirect: 0 }]);
  t.deepEqual([...v.redirects.entries()], [[0, linear('d', 0)], [1, linear('elsewhere', 0, 0, 50)]]);
  t.is(m.resolve(79)!.relativeBytes, 79);
  t.is(m.resolve(80), null);
});

test('VolumeMap JSON round trip', (t) => {
  const m = threeVsegs();
  const json = JSON.parse(JSON.stringify(m)) as VolumeMapJSON;
  const back = VolumeMap.fromJSON(json);
  t.deepEqual(back.toJSON(), m.toJSON());
  for (let off = 0; off < m.sizeBytes; off++) {
    const a = m.resolve(off);
    const b = back.resolve(off);
    t.deepEqual(b && { ...b, vseg: null }, a && { ...a, vseg: null });
  }
  const broken = structuredClone(json);
  broken.vsegs[1]!.rmap.redirects[0] = 9;
  t.throws(() => VolumeMap.fromJSON(broken), { instanceOf: assert.AssertionError });
  const gap = structuredClone(json);
  gap.vsegs.splice(1, 1);
  t.throws(() => VolumeMap.fromJSON(gap), { instanceOf: RangeError });
});

// ================================================================ property: restructuring preserves resolve()

interface SegOp {
  a: number;
  b: number;
  unmap: boolean;
  reuse: number;
  originAtStart: boolean;
  kind: number;
  disk: number;
  off: number;
}
interface SegSpec {
  length: number;
  ops: SegOp[];
}

const segOp: fc.Arbitrary<SegOp> = fc.record({
  a: fc.nat(1000),
  b: fc.nat(1000),
  unmap: fc.boolean(),
  reuse: fc.nat(4),
  originAtStart: fc.boolean(),
  kind: fc.nat(3),
  disk: fc.nat(2),
  off: fc.nat(1 << 20),
});
const segSpec: fc.Arbitrary<SegSpec> = fc.record({
  length: fc.integer({ min: 1, max: 80 }),
  ops: fc.array(segOp, { maxLength: 10 }),
});

function storageFor(o: SegOp): StorageDescriptor {
  const at = { disk: `d${o.disk}`, offsetBytes: o.off };
  switch (o.kind) {
    case 0:
      return { kind: 'linear', at };
    case 1:
      return { kind: 'mirrored', sides: [at, { disk: 'm', offsetBytes: o.off }] };
    case 2:
      return { kind: 'striped', stripeBytes: 512, columns: [at, { disk: 's', offsetBytes: 0 }] };
    default:
      return { kind: 'journal', at, lengthBytes: 4096 };
  }
}

/** A VSEG built by random map/unmap; every entry it creates is distinct (unique generation). */
function buildVseg(start: number, spec: SegSpec, counter: { n: number }): Vseg {
  const v = new Vseg(start, spec.length);
  for (const o of spec.ops) {
    const x = o.a % spec.length;
    const y = o.b % spec.length;
    const lo = Math.min(x, y);
    const len = Math.abs(x - y) + 1;
    if (o.unmap) {
      v.rmap.unmap(lo, len);
      continue;
    }
    const usable = [...v.redirects.entries()].filter(([, e]) => e.originBytes <= lo);
    const idx =
      o.reuse < usable.length
        ? usable[o.reuse]![0]
        : v.redirects.add({
            storage: storageFor(o),
            faultOnRead: o.kind === 3,
            faultOnWrite: o.disk === 2,
            generation: counter.n++,
            originBytes: o.originAtStart ? lo : 0,
          });
    v.rmap.map(lo, len, idx);
  }
  v.checkInvariants();
  return v;
}

function buildVolume(specs: SegSpec[], counter: { n: number }): VolumeMap {
  const m = new VolumeMap();
  for (const s of specs) m.append(buildVseg(m.sizeBytes, s, counter));
  return m;
}

/** What a byte means, independent of how the volume is cut: its entry (minus origin) and descriptor offset. */
type Meaning = { entry: Omit<RedirectEntry, 'originBytes'>; relativeBytes: number } | null;
function meaning(m: VolumeMap, off: number): Meaning {
  const r = m.resolve(off);
  if (!r) return null;
  const { originBytes: _, ...entry } = r.entry;
  return { entry, relativeBytes: r.relativeBytes };
}

/** Checks every byte against `expected`, and that extentRemainingBytes is consistent byte to byte. */
function checkVolume(m: VolumeMap, expected: Meaning[]): void {
  m.checkInvariants();
  assert.equal(m.sizeBytes, expected.length);
  let prev: ReturnType<VolumeMap['resolve']> = null;
  for (let off = 0; off < m.sizeBytes; off++) {
    assert.deepEqual(meaning(m, off), expected[off], `byte ${off}`);
    const r = m.resolve(off);
    if (r) {
      assert.ok(r.extentRemainingBytes >= 1);
      assert.ok(off + r.extentRemainingBytes <= r.vseg.endBytes, 'extent ends inside its VSEG');
      assert.equal(r.vseg.rmap.startOf(r.extentIndex) + r.extentOffsetBytes, r.vsegRelativeBytes);
      if (prev && prev.extentRemainingBytes > 1) {
        assert.equal(r.vseg, prev.vseg);
        assert.equal(r.extentIndex, prev.extentIndex);
        assert.equal(r.extentRemainingBytes, prev.extentRemainingBytes - 1);
      } else {
        assert.equal(r.extentOffsetBytes, 0, 'a new extent starts here');
      }
    } else if (prev) {
      assert.equal(prev.extentRemainingBytes, 1, 'an extent ended before this hole');
    }
    prev = r;
  }
}

type VolOp = { kind: 'split'; at: number } | { kind: 'merge'; i: number } | { kind: 'append'; seg: SegSpec };
const volOp: fc.Arbitrary<VolOp> = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant('split' as const), at: fc.nat(10_000) }), weight: 3 },
  { arbitrary: fc.record({ kind: fc.constant('merge' as const), i: fc.nat(10) }), weight: 3 },
  { arbitrary: fc.record({ kind: fc.constant('append' as const), seg: segSpec }), weight: 1 },
);

test('property: split / merge / append preserve what every byte resolves to', (t) => {
  fc.assert(
    fc.property(fc.array(segSpec, { minLength: 1, maxLength: 3 }), fc.array(volOp, { maxLength: 15 }), (specs, ops) => {
      const counter = { n: 0 };
      const m = buildVolume(specs, counter);
      const expected = Array.from({ length: m.sizeBytes }, (_, off) => meaning(m, off));
      checkVolume(m, expected);
      for (const o of ops) {
        if (o.kind === 'split') {
          const at = o.at % m.sizeBytes;
          const k = m.findVseg(at);
          if (m.vsegs[k]!.startBytes === at) {
            assert.throws(() => m.split(at), RangeError);
            continue;
          }
          assert.equal(m.split(at), k + 1);
        } else if (o.kind === 'merge') {
          if (m.vsegs.length < 2) {
            assert.throws(() => m.merge(0), RangeError);
            continue;
          }
          m.merge(o.i % (m.vsegs.length - 1));
        } else {
          const seg = buildVseg(m.sizeBytes, o.seg, counter);
          m.append(seg);
          for (let off = seg.startBytes; off < seg.endBytes; off++) expected.push(meaning(m, off));
        }
        checkVolume(m, expected);
      }
      const back = VolumeMap.fromJSON(JSON.parse(JSON.stringify(m)) as VolumeMapJSON);
      assert.deepEqual(back.toJSON(), m.toJSON());
      checkVolume(back, expected);
    }),
    { numRuns: 300 },
  );
  t.pass();
});

test('property: split at any inner offset then merge gives back the same map', (t) => {
  fc.assert(
    fc.property(segSpec, fc.nat(1000), (spec, rawAt) => {
      fc.pre(spec.length > 1);
      const m = buildVolume([spec], { n: 0 });
      const json = m.toJSON();
      const rmapCount = m.vsegs[0]!.rmap.count;
      const at = 1 + (rawAt % (spec.length - 1));
      m.split(at);
      m.checkInvariants();
      const left = m.vsegs[0]!;
      const right = m.vsegs[1]!;
      // Every entry a side's table holds beyond the original left-only set is used by that side.
      const used = (v: Vseg) => new Set(v.rmap.extents().map((e) => e.redirect));
      for (const [i] of right.redirects.entries()) assert.ok(used(right).has(i), 'right table holds only entries it uses');
      assert.ok(left.rmap.count + right.rmap.count >= rmapCount);
      assert.ok(left.rmap.count + right.rmap.count <= rmapCount + 1, 'at most one extent is cut');
      m.merge(0);
      m.checkInvariants();
      assert.deepEqual(m.toJSON(), json);
    }),
    { numRuns: 500 },
  );
  t.pass();
});
