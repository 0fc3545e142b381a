import test from 'ava';
import fc from 'fast-check';

import { ExtentAllocator } from '../../src/alloc/allocator.js';
import type { AllocateResult, Extent } from '../../src/alloc/allocator.js';

const MiB = 1024 * 1024;
const EXT = 4 * MiB;

function ok(r: AllocateResult): Extract<AllocateResult, { ok: true }> {
  if (!r.ok) throw new Error(`expected success, got: ${r.error}`);
  return r;
}

function err(r: AllocateResult): string {
  if (r.ok) throw new Error(`expected failure, got ${JSON.stringify(r.extents)}`);
  return r.error;
}

function count(extents: Extent[], extentBytes = EXT): number {
  return extents.reduce((s, e) => s + e.lengthBytes / extentBytes, 0);
}

/** Extent indices touched, as "disk:offset" strings, one per extent. */
function keys(extents: Extent[], extentBytes = EXT): string[] {
  const out: string[] = [];
  for (const e of extents) {
    for (let o = e.offsetBytes; o < e.offsetBytes + e.lengthBytes; o += extentBytes) out.push(`${e.disk}:${o}`);
  }
  return out;
}

test('constructor validates the extent size and counts extents after the reserved area', (t) => {
  t.throws(() => new ExtentAllocator([], 3 * MiB), { message: /power of two/ });
  t.throws(() => new ExtentAllocator([], 32 * 1024), { message: /at least 64 KiB/ });
  t.notThrows(() => new ExtentAllocator([], 64 * 1024));
  const a = new ExtentAllocator([{ id: 'd1', sizeBytes: 100 * MiB + 5, reservedBytes: 1 * MiB }]);
  t.is(a.extentBytes, EXT);
  // floor((100 MiB + 5 - 1 MiB) / 4 MiB) = 24
  t.deepEqual(a.usage(), [{ disk: 'd1', sizeBytes: 100 * MiB + 5, extents: 24, freeExtents: 24 }]);
  t.is(a.freeBytes(), 24 * EXT);
  t.throws(() => new ExtentAllocator([{ id: 'd1', sizeBytes: 10, reservedBytes: 20 }]), { message: /exceeds/ });
  t.throws(
    () =>
      new ExtentAllocator([
        { id: 'd1', sizeBytes: 10 * MiB, reservedBytes: 0 },
        { id: 'd1', sizeBytes: 10 * MiB, reservedBytes: 0 },
      ]),
    { message: /d1 is already known/ },
  );
});

test('allocations start after the reserved area, are extent-aligned and contiguous', (t) => {
  const a = new ExtentAllocator([{ id: 'd1', sizeBytes: 64 * MiB, reservedBytes: MiB }]);
  const r = ok(a.allocate(3));
  t.deepEqual(r.extents, [{ disk: 'd1', offsetBytes: MiB, lengthBytes: 3 * EXT }]);
  t.deepEqual(r.groups, [r.extents]);
  const r2 = ok(a.allocate(2));
  t.deepEqual(r2.extents, [{ disk: 'd1', offsetBytes: MiB + 3 * EXT, lengthBytes: 2 * EXT }]);
  t.is(a.freeBytes('d1'), (15 - 5) * EXT);
  t.true(a.isUsed('d1', MiB));
  t.false(a.isUsed('d1', MiB + 5 * EXT));
});

test('prefers the disk with the most free space, then fills across disks', (t) => {
  const a = new ExtentAllocator([
    { id: 'small', sizeBytes: 8 * EXT, reservedBytes: 0 },
    { id: 'big', sizeBytes: 20 * EXT, reservedBytes: 0 },
  ]);
  const r = ok(a.allocate(4));
  t.deepEqual(r.extents, [{ disk: 'big', offsetBytes: 0, lengthBytes: 4 * EXT }]);
  // 24 free in all: 8 on small, 16 on big → 16 from big first, then 4 from small
  const r2 = ok(a.allocate(20));
  t.deepEqual(
    r2.groups.map((g) => [g[0]!.disk, count(g)]),
    [
      ['big', 16],
      ['small', 4],
    ],
  );
  t.is(a.freeBytes(), 4 * EXT);
});

test('spread splits evenly across distinct disks, one group per disk', (t) => {
  const a = new ExtentAllocator([
    { id: 'd1', sizeBytes: 10 * EXT, reservedBytes: 0 },
    { id: 'd2', sizeBytes: 30 * EXT, reservedBytes: 0 },
    { id: 'd3', sizeBytes: 20 * EXT, reservedBytes: 0 },
  ]);
  const r = ok(a.allocate(6, { spread: 3 }));
  t.is(r.groups.length, 3);
  t.deepEqual(r.groups.map((g) => g[0]!.disk), ['d2', 'd3', 'd1']); // most free first
  for (const g of r.groups) {
    t.is(new Set(g.map((e) => e.disk)).size, 1);
    t.is(count(g), 2);
  }
  t.deepEqual(r.extents, r.groups.flat());
  // mirror pair restricted to two disks
  const m = ok(a.allocate(8, { spread: 2, disks: ['d1', 'd3'] }));
  t.deepEqual(m.groups.map((g) => [g[0]!.disk, count(g)]), [
    ['d3', 4],
    ['d1', 4],
  ]);
  // spread 1 keeps everything on one disk
  const one = ok(a.allocate(5, { spread: 1 }));
  t.is(one.groups.length, 1);
  t.is(count(one.groups[0]!), 5);
});

test('spread picks another disk when the fullest one cannot hold a column', (t) => {
  const a = new ExtentAllocator([
    { id: 'd1', sizeBytes: 2 * EXT, reservedBytes: 0 },
    { id: 'd2', sizeBytes: 3 * EXT, reservedBytes: 0 },
    { id: 'd3', sizeBytes: 3 * EXT, reservedBytes: 0 },
  ]);
  const r = ok(a.allocate(6, { spread: 2 }));
  t.deepEqual(r.groups.map((g) => g[0]!.disk), ['d2', 'd3']);
  t.is(a.freeBytes('d1'), 2 * EXT);
});

test('errors name the problem', (t) => {
  const a = new ExtentAllocator([
    { id: 'd1', sizeBytes: 3 * EXT, reservedBytes: 0 },
    { id: 'd2', sizeBytes: 40 * EXT, reservedBytes: 0 },
  ]);
  t.is(
    err(a.allocate(12, { spread: 2 })),
    'not enough space: need 12 extents of 4 MiB on 2 distinct disks (6 each), disks d1 (3 free), d2 (40 free)',
  );
  t.is(err(a.allocate(1, { disks: ['d1', 'd9'] })), 'unknown disk d9');
  t.is(err(a.allocate(44)), 'not enough space: need 44 extents of 4 MiB, disks d1 (3 free), d2 (40 free)');
  t.regex(err(a.allocate(6, { spread: 3 })), /^not enough disks: need 6 extents of 4 MiB on 3 distinct disks but only 2 are eligible: d1 \(3 free\), d2 \(40 free\)$/);
  t.is(err(a.allocate(7, { spread: 2 })), 'extent count 7 is not a multiple of spread 2');
  t.regex(err(a.allocate(0)), /positive integer/);
  t.regex(err(a.allocate(1.5)), /positive integer/);
  t.regex(err(a.allocate(2, { spread: 0 })), /spread 0 must be a positive integer/);
  t.is(err(a.allocate(1, { disks: [] })), 'no disks to allocate from');
  t.throws(() => a.freeBytes('nope'), { message: 'unknown disk nope' });
});

test('a failed allocation changes nothing (all or nothing)', (t) => {
  const a = new ExtentAllocator([
    { id: 'd1', sizeBytes: 5 * EXT, reservedBytes: 0 },
    { id: 'd2', sizeBytes: 9 * EXT, reservedBytes: 0 },
    { id: 'd3', sizeBytes: 2 * EXT, reservedBytes: 0 },
  ]);
  ok(a.allocate(1, { disks: ['d2'] }));
  const before = JSON.stringify(a);
  err(a.allocate(16)); // 15 free in all, 1 short
  err(a.allocate(12, { spread: 3 })); // d3 cannot hold 4
  err(a.allocate(12, { spread: 2 })); // d2 holds 6, d1 only 5
  err(a.allocate(8, { spread: 2, contiguous: true, disks: ['d1', 'd3'] }));
  t.is(JSON.stringify(a), before);
  err(a.allocate(4, { disks: ['d1', 'd9'] }));
  t.is(JSON.stringify(a), before);
});

test('free returns extents for reuse; freeing twice or misaligned throws and changes nothing', (t) => {
  const a = new ExtentAllocator([{ id: 'd1', sizeBytes: 10 * EXT + MiB, reservedBytes: MiB }]);
  const x = ok(a.allocate(3)).extents;
  const y = ok(a.allocate(2)).extents;
  t.is(a.freeBytes(), 5 * EXT);
  a.free(x);
  t.is(a.freeBytes(), 8 * EXT);
  // best fit: the 3-extent hole is reused rather than the 5-extent tail
  t.deepEqual(ok(a.allocate(3)).extents, x);
  a.free(x);
  t.throws(() => a.free(x), { message: `extent d1@${MiB} is not allocated` });
  const before = JSON.stringify(a);
  // first item valid, second not: nothing may change
  t.throws(() => a.free([...y, { disk: 'd1', offsetBytes: MiB, lengthBytes: EXT }]), { message: /is not allocated/ });
  t.throws(() => a.free([{ disk: 'd1', offsetBytes: MiB + 4096, lengthBytes: EXT }]), { message: /not on an extent boundary/ });
  t.throws(() => a.free([{ disk: 'd1', offsetBytes: 0, lengthBytes: EXT }]), { message: /reserved metadata area/ });
  t.throws(() => a.free([{ disk: 'd1', offsetBytes: MiB + 3 * EXT, lengthBytes: 100 }]), { message: /not a multiple of the extent size/ });
  t.throws(() => a.free([{ disk: 'd1', offsetBytes: MiB + 9 * EXT, lengthBytes: 2 * EXT }]), { message: /runs past the last extent/ });
  t.throws(() => a.free([{ disk: 'd9', offsetBytes: MiB, lengthBytes: EXT }]), { message: 'unknown disk d9' });
  t.throws(() => a.free([y[0]!, y[0]!]), { message: /listed twice/ });
  t.is(JSON.stringify(a), before);
  a.free(y);
  t.is(a.freeBytes(), 10 * EXT);
});

test('contiguous: each group is one run, skipping fragmented disks', (t) => {
  const a = new ExtentAllocator([
    { id: 'frag', sizeBytes: 12 * EXT, reservedBytes: 0 },
    { id: 'tidy', sizeBytes: 8 * EXT, reservedBytes: 0 },
  ]);
  // fragment 'frag': used at even extents → six 1-extent holes
  a.markUsed([0, 2, 4, 6, 8, 10].map((i) => ({ disk: 'frag', offsetBytes: i * EXT, lengthBytes: EXT })));
  t.is(a.freeBytes('frag'), 6 * EXT);
  // after this, 'tidy' has 7 free in one run and 'frag' 6 free in 1-extent holes
  a.markUsed([{ disk: 'tidy', offsetBytes: 7 * EXT, lengthBytes: EXT }]);
  const r = ok(a.allocate(3, { contiguous: true }));
  t.deepEqual(r.extents, [{ disk: 'tidy', offsetBytes: 0, lengthBytes: 3 * EXT }]);
  // without contiguous, the disk with most free is used even if fragmented
  const b = ok(a.allocate(3));
  t.is(b.extents.length, 3);
  t.true(b.extents.every((e) => e.disk === 'frag' && e.lengthBytes === EXT));
  t.regex(
    err(a.allocate(4, { spread: 2, contiguous: true })),
    /^not enough contiguous space: need 4 extents of 4 MiB on 2 distinct disks \(2 each, in one run\), disks frag \(3 free, largest run 1\), tidy \(4 free, largest run 4\)$/,
  );
  t.regex(err(a.allocate(5, { contiguous: true })), /^not enough contiguous space: need 5 extents of 4 MiB in one run/);
});

test('markUsed rebuilds the live state; JSON round trips', (t) => {
  const disks = [
    { id: 'a', sizeBytes: 50 * EXT + 12345, reservedBytes: 12345 },
    { id: 'b', sizeBytes: 30 * EXT, reservedBytes: EXT },
    { id: 'c', sizeBytes: 17 * EXT, reservedBytes: 0 },
  ];
  const live = new ExtentAllocator(disks);
  const owned: Extent[][] = [];
  for (const [n, spread] of [[6, 2], [5, undefined], [9, 3], [4, 1], [2, 2]] as const) {
    owned.push(ok(live.allocate(n, spread ? { spread } : {})).extents);
  }
  live.free(owned[1]!);
  live.free(owned[3]!);
  const persisted = [owned[0]!, owned[2]!, owned[4]!].flat();

  const rebuilt = new ExtentAllocator(disks);
  rebuilt.markUsed(persisted);
  t.deepEqual(rebuilt.toJSON(), live.toJSON());
  t.deepEqual(rebuilt.usage(), live.usage());
  t.is(rebuilt.freeBytes(), live.freeBytes());
  t.deepEqual(keys(rebuilt.usedExtents()).sort(), keys(persisted).sort());
  t.throws(() => rebuilt.markUsed([persisted[0]!]), { message: /already in use/ });

  const copy = ExtentAllocator.fromJSON(JSON.parse(JSON.stringify(live)));
  t.deepEqual(copy.toJSON(), live.toJSON());
  // the copy allocates exactly as the original would
  t.deepEqual(copy.allocate(7, { spread: 1 }), live.allocate(7, { spread: 1 }));
  t.throws(() => ExtentAllocator.fromJSON({ version: 2 }), { message: /version: 1/ });
  t.throws(
    () => ExtentAllocator.fromJSON({ version: 1, extentBytes: EXT, disks: [{ id: 'x', sizeBytes: EXT, reservedBytes: 0, used: [[0, 2]] }] }),
    { message: /runs past the last extent/ },
  );
});

test('addDisk and removeDisk', (t) => {
  const a = new ExtentAllocator([{ id: 'd1', sizeBytes: 4 * EXT, reservedBytes: 0 }]);
  t.regex(err(a.allocate(2, { spread: 2 })), /not enough disks/);
  a.addDisk({ id: 'd2', sizeBytes: 4 * EXT, reservedBytes: 0 });
  t.deepEqual(a.diskIds, ['d1', 'd2']);
  const r = ok(a.allocate(2, { spread: 2 }));
  t.throws(() => a.addDisk({ id: 'd2', sizeBytes: EXT, reservedBytes: 0 }), { message: /already known/ });
  t.throws(() => a.removeDisk('d2'), { message: 'cannot remove disk d2: 1 extent still in use' });
  t.throws(() => a.removeDisk('d9'), { message: 'unknown disk d9' });
  a.free(r.groups.find((g) => g[0]!.disk === 'd2')!);
  a.removeDisk('d2');
  t.deepEqual(a.diskIds, ['d1']);
  t.is(a.freeBytes(), 3 * EXT);
  // a disk too small for one extent has none, and is never chosen
  a.addDisk({ id: 'tiny', sizeBytes: EXT - 1, reservedBytes: 0 });
  t.is(a.usage().find((u) => u.disk === 'tiny')!.extents, 0);
  t.regex(err(a.allocate(1, { disks: ['tiny'] })), /tiny \(0 free\)/);
});

test('large disks: offsets beyond 4 GiB stay exact', (t) => {
  const TiB = 1024 * 1024 * MiB;
  const a = new ExtentAllocator([{ id: 'big', sizeBytes: 2 * TiB, reservedBytes: MiB }]);
  t.is(a.usage()[0]!.extents, (2 * TiB - MiB - (2 * TiB - MiB) % EXT) / EXT);
  a.markUsed([{ disk: 'big', offsetBytes: MiB, lengthBytes: TiB }]);
  const r = ok(a.allocate(2));
  t.deepEqual(r.extents, [{ disk: 'big', offsetBytes: MiB + TiB, lengthBytes: 2 * EXT }]);
  t.true(r.extents[0]!.offsetBytes > 2 ** 32);
});

type Op =
  | { op: 'alloc'; count: number; spread?: number; disks?: string[]; contiguous: boolean }
  | { op: 'free'; pick: number };

test('property: random allocate/free never hands out an extent twice and freeBytes stays consistent', (t) => {
  const EB = 64 * 1024;
  const diskIds = ['d0', 'd1', 'd2', 'd3'];
  const opArb: fc.Arbitrary<Op> = fc.oneof(
    fc.record({
      op: fc.constant('alloc' as const),
      count: fc.integer({ min: 1, max: 12 }),
      spread: fc.option(fc.integer({ min: 1, max: 4 }), { nil: undefined }),
      disks: fc.option(fc.subarray(diskIds, { minLength: 1 }), { nil: undefined }),
      contiguous: fc.boolean(),
    }),
    fc.record({ op: fc.constant('free' as const), pick: fc.nat() }),
  );
  fc.assert(
    fc.property(
      fc.array(fc.record({ extents: fc.integer({ min: 0, max: 20 }), reserved: fc.integer({ min: 0, max: 3 * EB }) }), {
        minLength: 1,
        maxLength: 4,
      }),
      fc.array(opArb, { maxLength: 60 }),
      (specs, ops) => {
        const disks = specs.map((s, i) => ({ id: diskIds[i]!, sizeBytes: s.reserved + s.extents * EB + 7, reservedBytes: s.reserved }));
        const a = new ExtentAllocator(disks, EB);
        const total = specs.reduce((s, d) => s + d.extents, 0);
        const owners: Extent[][] = [];
        const owned = new Set<string>();
        for (const o of ops) {
          if (o.op === 'alloc') {
            const valid = o.disks ? o.disks.filter((d) => disks.some((x) => x.id === d)) : undefined;
            const before = JSON.stringify(a);
            const count = o.spread ? o.count * o.spread : o.count;
            const r = a.allocate(count, { spread: o.spread, disks: valid, contiguous: o.contiguous });
            if (!r.ok) {
              if (JSON.stringify(a) !== before) return false; // all or nothing
              continue;
            }
            const got = keys(r.extents, EB);
            if (got.length !== count) return false;
            for (const k of got) {
              if (owned.has(k)) return false; // handed out twice
              owned.add(k);
            }
            for (const e of r.extents) {
              const d = disks.find((x) => x.id === e.disk)!;
              if (e.offsetBytes < d.reservedBytes || (e.offsetBytes - d.reservedBytes) % EB !== 0) return false;
              if (e.offsetBytes + e.lengthBytes > d.reservedBytes + specs[diskIds.indexOf(d.id)]!.extents * EB) return false;
              if (valid && !valid.includes(e.disk)) return false;
            }
            if (o.spread) {
              if (r.groups.length !== o.spread) return false;
              const gd = r.groups.map((g) => g[0]!.disk);
              if (new Set(gd).size !== o.spread) return false;
              for (const g of r.groups) {
                if (!g.every((e) => e.disk === g[0]!.disk) || count / o.spread !== keys(g, EB).length) return false;
              }
            }
            if (o.contiguous && !r.groups.every((g) => g.length === 1)) return false;
            owners.push(r.extents);
          } else if (owners.length > 0) {
            const [victim] = owners.splice(o.pick % owners.length, 1);
            a.free(victim!);
            for (const k of keys(victim!, EB)) owned.delete(k);
          }
          if (a.freeBytes() !== (total - owned.size) * EB) return false;
          for (const d of disks) {
            const mine = [...owned].filter((k) => k.startsWith(`${d.id}:`)).length;
            const u = a.usage().find((x) => x.disk === d.id)!;
            if (a.freeBytes(d.id) !== (u.extents - mine) * EB || u.freeExtents !== u.extents - mine) return false;
          }
        }
        // the state rebuilds from what is owned
        const rebuilt = new ExtentAllocator(disks, EB);
        rebuilt.markUsed(owners.flat());
        return JSON.stringify(rebuilt) === JSON.stringify(a);
      },
    ),
    { numRuns: 300 },
  );
  t.pass();
});
