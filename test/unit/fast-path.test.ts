/**
 * The fast path against a scripted CP and in-memory disks: every fault class, the
 * primitives (remap, stripe, write-split), pending-I/O timestamps and drains, and
 * the bounded mapping cache.
 */
import test from 'ava';
import os from 'node:os';
import { FastPath } from '../../src/fp/fast-path.js';
import { FaultClass, type CpApi, type FpMapping, type MissAnswer, type UpstreamIo } from '../../src/fp/api.js';
import { MemoryBackend } from '../../src/storage/memory-backend.js';
import { FaultInjectingBackend } from '../../src/storage/fault-injection.js';
import type { Backend } from '../../src/storage/backend.js';

const MiB = 1024 * 1024;
const EIO = -os.constants.errno.EIO;

class ScriptedCp implements CpApi {
  misses: [number, number][] = [];
  queued: { io: UpstreamIo; why: FaultClass }[] = [];
  onMiss: (off: number, len: number) => MissAnswer = () => ({ kind: 'QUEUE' });
  fp!: FastPath;
  mappingMiss(_v: string, off: number, len: number): MissAnswer {
    this.misses.push([off, len]);
    return this.onMiss(off, len);
  }
  queueIo(_v: string, io: UpstreamIo, why: FaultClass): void {
    this.queued.push({ io, why });
  }
  flushFailures: string[][] = [];
  flushFailed(_v: string, disks: string[], done: (r: number) => void): void {
    this.flushFailures.push(disks);
    done(0);
  }
}

function setup(n = 3): { fp: FastPath; cp: ScriptedCp; disks: Map<string, MemoryBackend>; faulty: Map<string, FaultInjectingBackend> } {
  const disks = new Map<string, MemoryBackend>();
  const faulty = new Map<string, FaultInjectingBackend>();
  for (let i = 1; i <= n; i++) {
    const m = new MemoryBackend(16 * MiB, false, `d${i}`);
    disks.set(`d${i}`, m);
    faulty.set(`d${i}`, new FaultInjectingBackend(m));
  }
  const cp = new ScriptedCp();
  const fp = new FastPath('vol', 8 * MiB, cp, faulty as Map<string, Backend>);
  cp.fp = fp;
  return { fp, cp, disks, faulty };
}

const io = (f: (done: (r: number) => void) => void): Promise<number> => new Promise((resolve) => f(resolve));
const linear = (start: number, len: number, disk: string, at: number, extra: Partial<FpMapping> = {}): FpMapping => ({
  startBytes: start, lengthBytes: len, relativeStartBytes: 0, redirectId: 1, storage: { kind: 'linear', at: { disk, offsetBytes: at } },
  faultOnRead: false, faultOnWrite: false, ...extra,
});

test('remap: a linear mapping serves reads and writes at the right disk offset without the CP', async (t) => {
  const { fp, cp, disks } = setup();
  fp.addMapping(linear(0, 4 * MiB, 'd2', 1 * MiB));
  const data = Buffer.alloc(4096, 0xab);
  t.is(await io((d) => fp.write(data, 8192, false, d)), 0);
  t.true(disks.get('d2')!.data.subarray(MiB + 8192, MiB + 8192 + 4096).equals(data));
  const back = Buffer.alloc(4096);
  t.is(await io((d) => fp.read(back, 8192, d)), 0);
  t.true(back.equals(data));
  t.is(cp.queued.length + cp.misses.length, 0);
  t.is(fp.statistics().hits, 2);
});

test('mapping miss: the CP answers CONTINUE after FPAddMapping, and the I/O goes on', async (t) => {
  const { fp, cp, disks } = setup();
  cp.onMiss = () => {
    fp.addMapping(linear(0, 8 * MiB, 'd1', 0));
    return { kind: 'CONTINUE' };
  };
  disks.get('d1')!.data.fill(7, 0, 512);
  const b = Buffer.alloc(512);
  t.is(await io((d) => fp.read(b, 0, d)), 0);
  t.true(b.equals(Buffer.alloc(512, 7)));
  t.deepEqual(cp.misses, [[0, 512]]);
  t.is(fp.statistics().faults[FaultClass.MAPPING_MISS], 1);
});

test('mapping miss: IGNORE completes with the CP\'s result; QUEUE hands the I/O to the CP', async (t) => {
  const { fp, cp } = setup();
  cp.onMiss = () => ({ kind: 'IGNORE', result: EIO });
  t.is(await io((d) => fp.read(Buffer.alloc(512), 0, d)), EIO);
  cp.onMiss = () => ({ kind: 'QUEUE' });
  const r = io((d) => fp.read(Buffer.alloc(512), 0, d));
  t.is(cp.queued.length, 1);
  cp.queued[0]!.io.complete(0); // FPQueueIOComplete
  t.is(await r, 0);
});

test('fault-on-read and fault-on-write go to the CP with their class', async (t) => {
  const { fp, cp } = setup();
  fp.addMapping(linear(0, MiB, 'd1', 0, { faultOnWrite: true }));
  fp.addMapping(linear(MiB, MiB, 'd1', MiB, { faultOnRead: true }));
  const w = io((d) => fp.write(Buffer.alloc(512), 0, false, d));
  const r = io((d) => fp.read(Buffer.alloc(512), MiB, d));
  t.deepEqual(cp.queued.map((q) => q.why), [FaultClass.FAULT_ON_WRITE, FaultClass.FAULT_ON_READ]);
  // Reads of the first and writes of the second still take the fast path.
  t.is(await io((d) => fp.read(Buffer.alloc(512), 0, d)), 0);
  t.is(await io((d) => fp.write(Buffer.alloc(512), MiB, false, d)), 0);
  for (const q of cp.queued) q.io.complete(0);
  t.is(await w, 0);
  t.is(await r, 0);
});

test('a request spanning two mappings faults SPANS; so does one crossing a stripe', async (t) => {
  const { fp, cp } = setup();
  fp.addMapping(linear(0, MiB, 'd1', 0));
  fp.addMapping({ startBytes: MiB, lengthBytes: 4 * MiB, relativeStartBytes: 0, redirectId: 2, faultOnRead: false, faultOnWrite: false,
    storage: { kind: 'striped', stripeBytes: 64 * 1024, columns: [{ disk: 'd1', offsetBytes: 4 * MiB }, { disk: 'd2', offsetBytes: 0 }] } });
  void io((d) => fp.read(Buffer.alloc(8192), MiB - 4096, d));
  void io((d) => fp.read(Buffer.alloc(8192), MiB + 64 * 1024 - 4096, d));
  t.deepEqual(cp.queued.map((q) => q.why), [FaultClass.SPANS, FaultClass.SPANS]);
});

test('stripe: each stripe lands on its column at the RAID0 offset', async (t) => {
  const { fp, disks } = setup();
  const stripe = 64 * 1024;
  fp.addMapping({ startBytes: 0, lengthBytes: 4 * MiB, relativeStartBytes: 0, redirectId: 1, faultOnRead: false, faultOnWrite: false,
    storage: { kind: 'striped', stripeBytes: stripe, columns: [{ disk: 'd1', offsetBytes: 0 }, { disk: 'd2', offsetBytes: MiB }] } });
  for (let k = 0; k < 6; k++) {
    t.is(await io((d) => fp.write(Buffer.alloc(stripe, k + 1), k * stripe, false, d)), 0);
  }
  for (let k = 0; k < 6; k++) {
    const disk = disks.get(k % 2 === 0 ? 'd1' : 'd2')!;
    const base = (k % 2 === 0 ? 0 : MiB) + Math.floor(k / 2) * stripe;
    t.true(disk.data.subarray(base, base + stripe).equals(Buffer.alloc(stripe, k + 1)), `stripe ${k}`);
  }
});

test('write-split: acknowledged only when every live side has it; reads skip dead sides', async (t) => {
  const { fp, disks, faulty } = setup();
  for (const f of faulty.values()) f.latencyMs = 0;
  faulty.get('d2')!.latencyMs = 30;
  fp.addMapping({ startBytes: 0, lengthBytes: 4 * MiB, relativeStartBytes: 0, redirectId: 1, faultOnRead: false, faultOnWrite: false,
    storage: { kind: 'mirrored', sides: [{ disk: 'd1', offsetBytes: 0 }, { disk: 'd2', offsetBytes: 0 }, { disk: 'd3', offsetBytes: 0 }] },
    sideStates: ['live', 'live', 'dead'] });
  const data = Buffer.alloc(4096, 0x42);
  let acked = false;
  const w = io((d) => fp.write(data, 0, false, d)).then((r) => ((acked = true), r));
  await new Promise((r) => setTimeout(r, 10));
  t.false(acked, 'not acknowledged while the slow side has not answered');
  t.is(await w, 0);
  t.true(disks.get('d1')!.data.subarray(0, 4096).equals(data));
  t.true(disks.get('d2')!.data.subarray(0, 4096).equals(data));
  t.true(disks.get('d3')!.data.subarray(0, 4096).equals(Buffer.alloc(4096)), 'the dead side is not written');
  for (let i = 0; i < 6; i++) await io((d) => fp.read(Buffer.alloc(512), 0, d));
  t.is(faulty.get('d3')!.injected, 0);
  t.is(disks.get('d3')!.reads, 0, 'no read from a dead side');
  t.true(disks.get('d1')!.reads >= 2 && disks.get('d2')!.reads >= 2, 'reads are balanced');
});

test('serialization: a mirrored write overlapping one in flight faults to the CP', async (t) => {
  const { fp, cp, faulty } = setup();
  faulty.get('d1')!.latencyMs = 20;
  fp.addMapping({ startBytes: 0, lengthBytes: MiB, relativeStartBytes: 0, redirectId: 1, faultOnRead: false, faultOnWrite: false,
    storage: { kind: 'mirrored', sides: [{ disk: 'd1', offsetBytes: 0 }, { disk: 'd2', offsetBytes: 0 }] } });
  const first = io((d) => fp.write(Buffer.alloc(8192, 1), 0, false, d));
  void io((d) => fp.write(Buffer.alloc(4096, 2), 4096, false, d));
  const disjoint = io((d) => fp.write(Buffer.alloc(4096, 3), 65536, false, d));
  t.deepEqual(cp.queued.map((q) => q.why), [FaultClass.SERIALIZATION]);
  t.is(await first, 0);
  t.is(await disjoint, 0);
});

test('downstream error: a failed side faults the write to the CP with the failed side recorded', async (t) => {
  const { fp, cp, faulty } = setup();
  faulty.get('d2')!.fail('write', EIO, 1);
  fp.addMapping({ startBytes: 0, lengthBytes: MiB, relativeStartBytes: 0, redirectId: 1, faultOnRead: false, faultOnWrite: false,
    storage: { kind: 'mirrored', sides: [{ disk: 'd1', offsetBytes: 0 }, { disk: 'd2', offsetBytes: 0 }] } });
  const w = io((d) => fp.write(Buffer.alloc(512, 9), 0, false, d));
  await new Promise((r) => setTimeout(r, 5));
  t.is(cp.queued.length, 1);
  t.is(cp.queued[0]!.why, FaultClass.DOWNSTREAM_ERROR);
  t.deepEqual((cp.queued[0]!.io as unknown as { failedPlacements: number[] }).failedPlacements, [1]);
  cp.queued[0]!.io.complete(0);
  t.is(await w, 0);
  // A linear read error also faults.
  fp.addMapping(linear(MiB, MiB, 'd3', 0));
  faulty.get('d3')!.fail('read', EIO, 1);
  void io((d) => fp.read(Buffer.alloc(512), MiB, d));
  await new Promise((r) => setTimeout(r, 5));
  t.is(cp.queued[1]!.why, FaultClass.DOWNSTREAM_ERROR);
});

test('revoke then drain: waits only for I/O that arrived before the revocation and overlaps', async (t) => {
  const { fp, faulty } = setup();
  faulty.get('d1')!.latencyMs = 40;
  fp.addMapping(linear(0, 4 * MiB, 'd1', 0));
  const slow = io((d) => fp.read(Buffer.alloc(512), 0, d));
  const revokedAt = fp.removeMapping(0, MiB);
  t.is(fp.queryPendingIos(revokedAt).length, 1);
  t.is(fp.queryPendingIos(revokedAt, 2 * MiB, MiB).length, 0, 'no overlap, nothing to wait for');
  let drained = false;
  const d = fp.drain(revokedAt, 0, MiB).then(() => (drained = true));
  await new Promise((r) => setTimeout(r, 10));
  t.false(drained);
  await slow;
  await d;
  t.true(drained);
});

test('the mapping cache is bounded and evicts the least recently used', async (t) => {
  const disks = new Map<string, Backend>([['d1', new MemoryBackend(MiB)]]);
  const cp = new ScriptedCp();
  const fp = new FastPath('vol', MiB, cp, disks, 4);
  for (let i = 0; i < 4; i++) fp.addMapping(linear(i * 4096, 4096, 'd1', i * 4096));
  await io((d) => fp.read(Buffer.alloc(512), 0, d)); // touch the first
  fp.addMapping(linear(5 * 4096, 4096, 'd1', 5 * 4096));
  t.is(fp.statistics().cachedMappings, 4);
  await io((d) => fp.read(Buffer.alloc(512), 0, d));
  t.is(cp.misses.length, 0, 'the recently used one stayed');
  void io((d) => fp.read(Buffer.alloc(512), 4096, d));
  t.deepEqual(cp.misses, [[4096, 512]], 'the least recently used one went');
});

test('remap honours relativeStartBytes: a trimmed extent still finds its bytes', async (t) => {
  const { fp, disks } = setup();
  // The extent starts 64 KiB into the storage its redirect entry describes.
  fp.addMapping({ ...linear(MiB, MiB, 'd1', 2 * MiB), relativeStartBytes: 65536 });
  t.is(await io((d) => fp.write(Buffer.alloc(512, 0x11), MiB, false, d)), 0);
  t.true(disks.get('d1')!.data.subarray(2 * MiB + 65536, 2 * MiB + 65536 + 512).equals(Buffer.alloc(512, 0x11)));
});

test('a resyncing side takes writes but gives no reads; striped mirrors track sides per column', async (t) => {
  const { fp, disks } = setup(4);
  fp.addMapping({ startBytes: 0, lengthBytes: 4 * MiB, relativeStartBytes: 0, redirectId: 1, faultOnRead: false, faultOnWrite: false,
    storage: { kind: 'striped-mirrored', stripeBytes: 65536, columns: [
      [{ disk: 'd1', offsetBytes: 0 }, { disk: 'd2', offsetBytes: 0 }],
      [{ disk: 'd3', offsetBytes: 0 }, { disk: 'd4', offsetBytes: 0 }],
    ] },
    sideStates: ['live', 'resyncing', 'live', 'dead'] });
  // Column 0 (d1 live, d2 resyncing): a write reaches both.
  t.is(await io((d) => fp.write(Buffer.alloc(4096, 1), 0, false, d)), 0);
  t.true(disks.get('d1')!.data.subarray(0, 4096).equals(Buffer.alloc(4096, 1)));
  t.true(disks.get('d2')!.data.subarray(0, 4096).equals(Buffer.alloc(4096, 1)));
  // Column 1 (d3 live, d4 dead): only d3.
  t.is(await io((d) => fp.write(Buffer.alloc(4096, 2), 65536, false, d)), 0);
  t.true(disks.get('d3')!.data.subarray(0, 4096).equals(Buffer.alloc(4096, 2)));
  t.true(disks.get('d4')!.data.subarray(0, 4096).equals(Buffer.alloc(4096)));
  const d2reads = disks.get('d2')!.reads;
  for (let i = 0; i < 6; i++) t.is(await io((d) => fp.read(Buffer.alloc(512), 0, d)), 0);
  t.is(disks.get('d2')!.reads, d2reads, 'no read from the resyncing side');
});

test('read balancing by per-side cost: only the cheapest live sides are read', async (t) => {
  const { fp, disks } = setup(3);
  fp.addMapping({ startBytes: 0, lengthBytes: MiB, relativeStartBytes: 0, redirectId: 1, faultOnRead: false, faultOnWrite: false,
    storage: { kind: 'mirrored', sides: [{ disk: 'd1', offsetBytes: 0 }, { disk: 'd2', offsetBytes: 0 }, { disk: 'd3', offsetBytes: 0 }] },
    sideCosts: [10, 1, 1] });
  for (let i = 0; i < 8; i++) t.is(await io((d) => fp.read(Buffer.alloc(512), 0, d)), 0);
  t.is(disks.get('d1')!.reads, 0, 'the expensive side is not read');
  t.is(disks.get('d2')!.reads, 4);
  t.is(disks.get('d3')!.reads, 4);
});
