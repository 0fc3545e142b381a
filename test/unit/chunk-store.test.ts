import test from 'ava';
import type { ExecutionContext } from 'ava';
import fc from 'fast-check';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import zlib from 'node:zlib';

import {
  CHUNK_HEADER_BYTES,
  ChunkStore,
  DATA_OFFSET,
  DEFAULT_CHUNK_BYTES,
  MetadataCorruptError,
  MetadataSuperblockError,
  SUPERBLOCK_SLOT_BYTES,
  crc32,
  crc32Fallback,
} from '../../src/meta/chunk-store.js';
import { FileMetaDevice } from '../../src/meta/metadata-area.js';
import { SimulatedCrash, SimulatedMetaDevice, seededRng } from '../support/sim-meta-device.js';
import type { TearMode } from '../support/sim-meta-device.js';
import type { SuperblockFault } from '../../src/meta/chunk-store.js';

const UUID = '0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';

function simFor(chunkBytes: number, chunkCount: number, slack = 0): SimulatedMetaDevice {
  return new SimulatedMetaDevice(ChunkStore.requiredBytes(chunkBytes, chunkCount) + slack);
}

function copyOffset(store: ChunkStore, id: number, copy: 0 | 1): number {
  return DATA_OFFSET + (2 * id + copy) * store.chunkBytes;
}

async function rejectsCorrupt(t: ExecutionContext, p: Promise<unknown>, chunkId: number): Promise<MetadataCorruptError> {
  const err = await t.throwsAsync(p, { instanceOf: MetadataCorruptError });
  t.is(err!.code, 'EDVE_META_CORRUPT');
  t.is(err!.chunkId, chunkId);
  t.regex(err!.message, new RegExp(`chunk ${chunkId}\\b`));
  return err!;
}

// ---------------------------------------------------------------------------------
// checksum

test('crc32: the table-driven fallback matches zlib.crc32 and the CRC-32 check value', (t) => {
  t.is(crc32Fallback(Buffer.from('123456789')), 0xcbf43926);
  t.is(crc32(Buffer.from('123456789')), 0xcbf43926);
  t.is(crc32Fallback(Buffer.alloc(0)), 0);
  const z = (zlib as { crc32?: (d: Uint8Array, v?: number) => number }).crc32;
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.uint8Array({ maxLength: 300 }), (a, b) => {
      const whole = crc32Fallback(Buffer.concat([a, b]));
      if (crc32Fallback(b, crc32Fallback(a)) !== whole) return false;
      if (crc32(b, crc32(a)) !== whole) return false;
      return typeof z !== 'function' || z(Buffer.concat([a, b])) >>> 0 === whole;
    }),
  );
});

// ---------------------------------------------------------------------------------
// format / open

test('format then open: same geometry and uuid, every chunk empty', async (t) => {
  const dev = simFor(4096, 8, 1000);
  const formatted = await ChunkStore.format(dev, { chunkBytes: 4096, chunkCount: 8, uuid: UUID });
  t.is(formatted.chunkCount, 8);
  t.is(formatted.capacityBytes, 4096 - CHUNK_HEADER_BYTES);
  const store = await ChunkStore.open(dev);
  t.is(store.chunkCount, 8);
  t.is(store.chunkBytes, 4096);
  t.is(store.capacityBytes, 4096 - CHUNK_HEADER_BYTES);
  t.is(store.uuid, UUID);
  t.is(store.superblockState, 'ok');
  for (let id = 0; id < 8; id++) {
    t.is(await store.readChunk(id), null);
    t.is(await store.generation(id), 0);
  }
  const scan = await store.scan();
  t.deepEqual(
    scan.map((s) => [s.id, s.generation, s.state]),
    Array.from({ length: 8 }, (_, id) => [id, 0, 'empty']),
  );
});

test('format defaults: 64 KiB chunks, as many as fit, a random uuid', async (t) => {
  const dev = new SimulatedMetaDevice(ChunkStore.requiredBytes(DEFAULT_CHUNK_BYTES, 5) + DEFAULT_CHUNK_BYTES);
  const a = await ChunkStore.format(dev);
  t.is(a.chunkBytes, 64 * 1024);
  t.is(a.chunkCount, 5);
  t.is(ChunkStore.maxChunkCount(dev.sizeBytes), 5);
  t.regex(a.uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  const b = await ChunkStore.format(dev);
  t.not(a.uuid, b.uuid);
  t.is((await ChunkStore.open(dev)).uuid, b.uuid);
});

test('format refuses bad geometry and a device too small', async (t) => {
  const dev = simFor(4096, 4);
  await t.throwsAsync(ChunkStore.format(dev, { chunkBytes: 4096, chunkCount: 5 }), {
    instanceOf: RangeError,
    message: /5 chunks of 4096 bytes need \d+ bytes, device has \d+/,
  });
  await t.throwsAsync(ChunkStore.format(dev, { chunkBytes: 1000, chunkCount: 1 }), { instanceOf: RangeError, message: /multiple of 512/ });
  await t.throwsAsync(ChunkStore.format(dev, { chunkBytes: 4096, chunkCount: 0 }), { instanceOf: RangeError, message: /chunkCount 0/ });
  await t.throwsAsync(ChunkStore.format(dev, { chunkBytes: 4096, chunkCount: 1, uuid: 'nope' }), { instanceOf: TypeError });
  t.is(dev.writeCount, 0, 'nothing written when the arguments are bad');
});

test('reformat replaces the old area: old values are gone, chunks read empty', async (t) => {
  const dev = simFor(2048, 6);
  const old = await ChunkStore.format(dev, { chunkBytes: 2048, chunkCount: 6 });
  for (let id = 0; id < 6; id++) await old.writeChunk(id, { id, pad: Buffer.alloc(1500, id) });
  const fresh = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 12 });
  const reopened = await ChunkStore.open(dev);
  t.is(reopened.uuid, fresh.uuid);
  t.is(reopened.chunkCount, 12);
  for (let id = 0; id < 12; id++) t.is(await reopened.readChunk(id), null);
  t.true((await reopened.scan()).every((s) => s.state === 'empty'));
});

// ---------------------------------------------------------------------------------
// reads and writes

const valueArb = fc.oneof(
  fc.jsonValue(),
  fc.uint8Array({ maxLength: 600 }).map((a) => Buffer.from(a)),
  fc.array(fc.oneof(fc.integer(), fc.string(), fc.boolean(), fc.constant(null)), { maxLength: 40 }),
  fc.record({
    name: fc.string(),
    size: fc.maxSafeNat(),
    blocks: fc.array(
      fc.record({ lba: fc.nat(), len: fc.nat(), bytes: fc.uint8Array({ maxLength: 32 }).map((a) => Buffer.from(a)) }, { noNullPrototype: true }),
      { maxLength: 10 },
    ),
  }, { noNullPrototype: true }),
);

test('write/read many chunks with assorted payloads, also after reopening', async (t) => {
  await fc.assert(
    fc.asyncProperty(fc.array(fc.tuple(fc.nat({ max: 15 }), valueArb), { minLength: 1, maxLength: 40 }), async (writes) => {
      const dev = simFor(4096, 16);
      const store = await ChunkStore.format(dev, { chunkBytes: 4096, chunkCount: 16 });
      const expected = new Map<number, unknown>();
      for (const [id, value] of writes) {
        await store.writeChunk(id, value);
        expected.set(id, value);
        if (!isDeepStrictEqual(await store.readChunk(id), value)) return false;
      }
      const again = await ChunkStore.open(dev);
      for (let id = 0; id < 16; id++) {
        const got = await again.readChunk(id);
        if (!isDeepStrictEqual(got, expected.has(id) ? expected.get(id) : null)) {
          t.log({ id, got, want: expected.get(id) });
          return false;
        }
      }
      const scan = await again.scan();
      return scan.every((s) => s.state === (expected.has(s.id) ? 'ok' : 'empty'));
    }),
    { numRuns: 60 },
  );
  t.pass();
});

test('each write increases the generation by one, alternating copies', async (t) => {
  const dev = simFor(1024, 3);
  const store = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 3 });
  t.is(await store.generation(1), 0);
  for (let i = 1; i <= 6; i++) {
    await store.writeChunk(1, { i });
    t.is(await store.generation(1), i);
    t.deepEqual(await store.readChunkEntry(1), { value: { i }, generation: i });
    // The copy just written holds generation i; the other still holds i - 1.
    const hdr = dev.snapshot(copyOffset(store, 1, (i - 1) % 2 === 0 ? 0 : 1), CHUNK_HEADER_BYTES);
    t.is(Number(hdr.readBigUInt64LE(8)), i);
  }
  const reopened = await ChunkStore.open(dev);
  t.is(await reopened.generation(1), 6);
  await reopened.writeChunk(1, 'seven');
  t.is(await reopened.generation(1), 7);
  t.is(await reopened.generation(0), 0);
  const scan = await reopened.scan();
  t.deepEqual(scan[1], { id: 1, generation: 7, state: 'ok', copies: ['ok', 'ok'] });
});

test('every write is followed by a sync before it resolves', async (t) => {
  const dev = simFor(1024, 2);
  const store = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 2 });
  const writes0 = dev.writeCount;
  const syncs0 = dev.syncCount;
  await store.writeChunk(0, 'a');
  t.is(dev.writeCount - writes0, 1);
  t.is(dev.syncCount - syncs0, 1);
  t.is(dev.unsyncedWrites, 0);
});

test('a payload over capacity is a RangeError naming the chunk and sizes; exactly full fits', async (t) => {
  const dev = simFor(4096, 2);
  const store = await ChunkStore.format(dev, { chunkBytes: 4096, chunkCount: 2 });
  t.is(store.capacityBytes, 4064);
  // A Buffer of n bytes (256..65535) encodes as bin16: 3 bytes of header.
  await store.writeChunk(1, Buffer.alloc(4061, 7));
  t.deepEqual(await store.readChunk(1), Buffer.alloc(4061, 7));
  const err = await t.throwsAsync(store.writeChunk(1, Buffer.alloc(4062)), { instanceOf: RangeError });
  t.regex(err!.message, /chunk 1\b/);
  t.regex(err!.message, /4065 bytes/);
  t.regex(err!.message, /capacity of 4064 bytes/);
  t.deepEqual(await store.readChunk(1), Buffer.alloc(4061, 7), 'the failed write changed nothing');
  t.is(await store.generation(1), 1);
});

test('chunk ids outside the area are RangeErrors', async (t) => {
  const store = await ChunkStore.format(simFor(1024, 2), { chunkBytes: 1024, chunkCount: 2 });
  await t.throwsAsync(store.readChunk(2), { instanceOf: RangeError, message: /chunk id 2 is out of range/ });
  await t.throwsAsync(store.writeChunk(-1, 1), { instanceOf: RangeError });
  await t.throwsAsync(store.generation(1.5), { instanceOf: RangeError });
});

test('concurrent writes to one chunk are serialized: all resolve in call order, the last wins', async (t) => {
  const dev = new SimulatedMetaDevice(ChunkStore.requiredBytes(2048, 4), seededRng(7));
  const store = await ChunkStore.format(dev, { chunkBytes: 2048, chunkCount: 4 });
  const busy = new Set<number>();
  let overlaps = 0;
  const realWrite = dev.write.bind(dev);
  dev.write = async (buf, off) => {
    const id = Math.floor((off - DATA_OFFSET) / (2 * 2048));
    if (busy.has(id)) overlaps++;
    busy.add(id);
    try {
      await realWrite(buf, off);
      await new Promise<void>((r) => setImmediate(r));
    } finally {
      busy.delete(id);
    }
  };
  const order: string[] = [];
  const ps: Promise<void>[] = [];
  for (let i = 0; i < 10; i++) {
    ps.push(store.writeChunk(2, { i }).then(() => void order.push(`2:${i}`)));
    ps.push(store.writeChunk(3, { i }).then(() => void order.push(`3:${i}`)));
  }
  await Promise.all(ps);
  t.is(overlaps, 0, 'two writes of one chunk were never on the device at once');
  t.deepEqual(
    order.filter((o) => o.startsWith('2:')),
    Array.from({ length: 10 }, (_, i) => `2:${i}`),
  );
  t.deepEqual(await store.readChunk(2), { i: 9 });
  t.deepEqual(await store.readChunk(3), { i: 9 });
  t.is(await store.generation(2), 10);
  const reopened = await ChunkStore.open(dev);
  t.deepEqual(await reopened.readChunkEntry(2), { value: { i: 9 }, generation: 10 });
});

test('a read queued behind writes sees them (read-your-writes)', async (t) => {
  const dev = new SimulatedMetaDevice(ChunkStore.requiredBytes(1024, 1), seededRng(3));
  const store = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 1 });
  void store.writeChunk(0, 'first');
  void store.writeChunk(0, 'second');
  t.is(await store.readChunk(0), 'second');
  await store.idle();
});

test('a value is encoded at call time: mutating it afterwards does not change what is written', async (t) => {
  const store = await ChunkStore.format(simFor(1024, 1), { chunkBytes: 1024, chunkCount: 1 });
  const v = { list: [1, 2] };
  const p = store.writeChunk(0, v);
  v.list.push(3);
  await p;
  t.deepEqual(await store.readChunk(0), { list: [1, 2] });
});

// ---------------------------------------------------------------------------------
// crash safety

interface WriteOp {
  chunk: number;
  size: number;
}

const crashScenario = fc.record({
  chunkCount: fc.integer({ min: 1, max: 4 }),
  rounds: fc.array(
    fc.record({
      // Groups run one after another; the writes in a group are issued together.
      groups: fc.array(fc.array(fc.record({ chunk: fc.nat({ max: 3 }), size: fc.nat({ max: 1900 }) }), { minLength: 1, maxLength: 3 }), {
        minLength: 1,
        maxLength: 6,
      }),
      crashAt: fc.nat({ max: 40 }),
    }),
    { minLength: 1, maxLength: 3 },
  ),
  seed: fc.integer(),
  mode: fc.constantFrom<TearMode>('prefix', 'sectors'),
  shuffle: fc.boolean(),
});

function valueOf(w: number, size: number): { w: number; pad: Buffer } {
  const pad = Buffer.alloc(size);
  for (let i = 0; i < size; i++) pad[i] = (w * 31 + i) & 0xff;
  return { w, pad };
}

/** How often the crash checks saw each outcome (to show the property is not vacuous). */
interface CrashStats {
  inFlightOld: number;
  inFlightNew: number;
  oneCopyBad: number;
}

function newStats(): CrashStats {
  return { inFlightOld: 0, inFlightNew: 0, oneCopyBad: 0 };
}

async function checkCrashScenario(
  stats: CrashStats,
  scenario: {
    chunkCount: number;
    rounds: { groups: WriteOp[][]; crashAt: number }[];
    seed: number;
    mode: TearMode;
    shuffle: boolean;
  },
  sequential: boolean,
): Promise<string | null> {
  const { chunkCount, seed, mode } = scenario;
  const rng = seededRng(seed);
  const chunkBytes = 2048;
  let dev = new SimulatedMetaDevice(ChunkStore.requiredBytes(chunkBytes, chunkCount), scenario.shuffle ? seededRng(seed ^ 0x5a5a) : null);
  await ChunkStore.format(dev, { chunkBytes, chunkCount });
  const values = new Map<number, unknown>([[-1, null]]);
  /** Per chunk: which write indexes (-1 = never written) a read may return now. */
  let allowed: Set<number>[] = Array.from({ length: chunkCount }, () => new Set([-1]));
  let nextW = 0;

  for (const [r, round] of scenario.rounds.entries()) {
    const store = await ChunkStore.open(dev);
    // Whatever the store holds now is the committed state this round builds on.
    const committed: number[] = [];
    for (let c = 0; c < chunkCount; c++) {
      let got: unknown;
      try {
        got = await store.readChunk(c);
      } catch (e) {
        return `round ${r}: chunk ${c} threw ${(e as Error).message}`;
      }
      const w = got === null ? -1 : (got as { w: number }).w;
      if (!allowed[c]!.has(w) || !isDeepStrictEqual(got, values.get(w))) {
        return `round ${r}: chunk ${c} read ${JSON.stringify(w)}, allowed ${JSON.stringify([...allowed[c]!])}`;
      }
      tally(stats, allowed[c]!, w);
      committed.push(w);
    }
    const scan = await store.scan();
    stats.oneCopyBad += scan.filter((s) => s.state === 'one-copy-bad').length;
    const bad = scan.find((s) => s.state === 'corrupt');
    if (bad) return `round ${r}: scan says chunk ${bad.id} is corrupt`;

    // Issue this round's writes with a power cut armed somewhere among the device ops.
    dev.crashAfter(round.crashAt);
    const issued: { w: number; chunk: number; acked: boolean }[] = [];
    for (const group of round.groups) {
      const ops = sequential ? group.slice(0, 1) : group;
      const ps = ops.map((op) => {
        const chunk = op.chunk % chunkCount;
        const w = nextW++;
        const value = valueOf(w, op.size);
        values.set(w, value);
        const rec = { w, chunk, acked: false };
        issued.push(rec);
        return store.writeChunk(chunk, value).then(
          () => {
            rec.acked = true;
          },
          (e: unknown) => {
            if (!(e instanceof SimulatedCrash)) throw e;
          },
        );
      });
      await Promise.all(ps);
      if (dev.crashed) break;
    }
    await store.idle();

    // What each chunk may read after the crash: its last acknowledged value (or the
    // committed one), or any write issued after that which was not acknowledged.
    allowed = [];
    for (let c = 0; c < chunkCount; c++) {
      const mine = issued.filter((i) => i.chunk === c);
      let lastAck = -1;
      mine.forEach((i, k) => {
        if (i.acked) lastAck = k;
      });
      const set = new Set<number>([lastAck >= 0 ? mine[lastAck]!.w : committed[c]!]);
      for (const i of mine.slice(lastAck + 1)) if (!i.acked) set.add(i.w);
      allowed.push(set);
    }
    if (sequential) {
      const inFlight = issued.filter((i) => !i.acked).length;
      if (inFlight > 1) return `sequential round had ${inFlight} unacknowledged writes`;
    }
    dev = dev.crash(rng, mode);
  }
  // Final reopen and check.
  const store = await ChunkStore.open(dev);
  for (let c = 0; c < chunkCount; c++) {
    let got: unknown;
    try {
      got = await store.readChunk(c);
    } catch (e) {
      return `final: chunk ${c} threw ${(e as Error).message}`;
    }
    const w = got === null ? -1 : (got as { w: number }).w;
    if (!allowed[c]!.has(w) || !isDeepStrictEqual(got, values.get(w))) {
      return `final: chunk ${c} read ${w}, allowed ${JSON.stringify([...allowed[c]!])}`;
    }
    tally(stats, allowed[c]!, w);
  }
  const scan = await store.scan();
  stats.oneCopyBad += scan.filter((s) => s.state === 'one-copy-bad').length;
  if (scan.some((s) => s.state === 'corrupt')) return 'final scan found a corrupt chunk';
  return null;
}

function tally(stats: CrashStats, allowed: Set<number>, got: number): void {
  if (allowed.size < 2) return;
  if (got === allowed.values().next().value) stats.inFlightOld++;
  else stats.inFlightNew++;
}

test('crash property: one write at a time, power cut between or during writes (torn)', async (t) => {
  const stats = newStats();
  await fc.assert(
    fc.asyncProperty(crashScenario, async (scenario) => {
      const problem = await checkCrashScenario(stats, scenario, true);
      if (problem) t.log(problem);
      return problem === null;
    }),
    { numRuns: 300 },
  );
  t.log(stats);
  t.true(stats.inFlightOld > 0 && stats.inFlightNew > 0 && stats.oneCopyBad > 0, 'crashes hit writes in flight, and tore some');
});

test('crash property: concurrent writes to several chunks, power cut anywhere, torn writes', async (t) => {
  const stats = newStats();
  await fc.assert(
    fc.asyncProperty(crashScenario, async (scenario) => {
      const problem = await checkCrashScenario(stats, scenario, false);
      if (problem) t.log(problem);
      return problem === null;
    }),
    { numRuns: 300 },
  );
  t.log(stats);
  t.true(stats.inFlightOld > 0 && stats.inFlightNew > 0 && stats.oneCopyBad > 0, 'crashes hit writes in flight, and tore some');
});

test('crash property: a power cut during format leaves no area, the new empty one, or the old one intact', async (t) => {
  await fc.assert(
    fc.asyncProperty(fc.nat({ max: 30 }), fc.integer(), fc.boolean(), async (crashAt, seed, hadOld) => {
      const dev = simFor(1024, 8);
      let oldUuid: string | null = null;
      if (hadOld) {
        const old = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 8 });
        oldUuid = old.uuid;
        for (let id = 0; id < 8; id++) await old.writeChunk(id, `old ${id}`);
      }
      dev.crashAfter(crashAt);
      let newUuid: string | null = null;
      try {
        newUuid = (await ChunkStore.format(dev, { chunkBytes: 512, chunkCount: 12 })).uuid;
      } catch (e) {
        if (!(e instanceof SimulatedCrash)) throw e;
      }
      const after = dev.crash(seededRng(seed));
      let store: ChunkStore;
      try {
        store = await ChunkStore.open(after);
      } catch (e) {
        // No area at all is fine only if format had not finished.
        return e instanceof MetadataSuperblockError && e.reason === 'bad-magic' && newUuid === null;
      }
      const scan = await store.scan();
      if (scan.some((s) => s.state === 'corrupt')) return false;
      if (store.uuid === oldUuid) {
        for (let id = 0; id < 8; id++) if ((await store.readChunk(id)) !== `old ${id}`) return false;
        return newUuid === null;
      }
      if (store.chunkCount !== 12) return false;
      for (let id = 0; id < 12; id++) if ((await store.readChunk(id)) !== null) return false;
      return true;
    }),
    { numRuns: 200 },
  );
  t.pass();
});

// ---------------------------------------------------------------------------------
// corruption

test('one corrupt copy: the other copy is used, scan says one-copy-bad, the next write repairs it', async (t) => {
  const dev = simFor(1024, 3);
  const store = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 3 });
  await store.writeChunk(1, 'v1'); // copy A, generation 1
  await store.writeChunk(1, 'v2'); // copy B, generation 2

  // Damage the older copy (A): the newest value is still read.
  dev.corrupt(copyOffset(store, 1, 0) + CHUNK_HEADER_BYTES, 0xee);
  const fresh = await ChunkStore.open(dev);
  t.is(await fresh.readChunk(1), 'v2');
  let scan = await fresh.scan();
  t.deepEqual(scan[1], { id: 1, generation: 2, state: 'one-copy-bad', copies: ['bad-crc', 'ok'] });
  t.is(scan[0]!.state, 'empty');
  // The next write goes to the bad copy and heals the chunk.
  await fresh.writeChunk(1, 'v3');
  scan = await fresh.scan();
  t.deepEqual(scan[1], { id: 1, generation: 3, state: 'ok', copies: ['ok', 'ok'] });
  t.is(await (await ChunkStore.open(dev)).readChunk(1), 'v3');

  // Damage the newer copy (A, generation 3): the read falls back to the previous value.
  dev.corrupt(copyOffset(store, 1, 0) + 9, 0x7f); // inside the generation field
  const again = await ChunkStore.open(dev);
  t.is(await again.readChunk(1), 'v2');
  t.is((await again.scan())[1]!.state, 'one-copy-bad');
});

test('an empty chunk with one damaged copy still reads empty (one-copy-bad)', async (t) => {
  const dev = simFor(1024, 2);
  const store = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 2 });
  dev.corrupt(copyOffset(store, 0, 1), 0x00); // first magic byte of copy B
  t.is(await store.readChunk(0), null);
  t.deepEqual((await store.scan())[0], { id: 0, generation: 0, state: 'one-copy-bad', copies: ['ok', 'bad-magic'] });
});

test('both copies corrupt: MetadataCorruptError naming the chunk and the reason', async (t) => {
  const dev = simFor(1024, 4);
  const store = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 4 });
  for (let id = 0; id < 4; id++) {
    await store.writeChunk(id, { id });
    await store.writeChunk(id, { id, again: true });
  }
  // chunk 2: bad crc in A, bad magic in B
  dev.corrupt(copyOffset(store, 2, 0) + CHUNK_HEADER_BYTES + 1, 0x99);
  dev.corrupt(copyOffset(store, 2, 1), 0x13);
  const fresh = await ChunkStore.open(dev);
  const err = await rejectsCorrupt(t, fresh.readChunk(2), 2);
  t.is(err.reason, 'bad-crc');
  t.deepEqual(err.copies, ['bad-crc', 'bad-magic']);
  t.regex(err.message, /bad-crc/);
  await rejectsCorrupt(t, fresh.generation(2), 2);
  // other chunks are unaffected
  t.deepEqual(await fresh.readChunk(3), { id: 3, again: true });
  const scan = await fresh.scan();
  t.deepEqual(
    scan.map((s) => s.state),
    ['ok', 'ok', 'corrupt', 'ok'],
  );
  // a write still succeeds (to copy A) and the chunk reads again
  await fresh.writeChunk(2, 'rewritten');
  t.is(await fresh.readChunk(2), 'rewritten');
  t.is((await fresh.scan())[2]!.state, 'one-copy-bad');
});

test('a copy that belongs to another chunk is rejected as wrong-id', async (t) => {
  const dev = simFor(1024, 4);
  const store = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 4 });
  await store.writeChunk(0, 'zero');
  await store.writeChunk(3, 'three');
  await store.writeChunk(3, 'three again');
  // A misdirected write: both copies of chunk 3 overwritten with chunk 0's copy A.
  const alien = dev.snapshot(copyOffset(store, 0, 0), 1024);
  dev.poke(copyOffset(store, 3, 0), alien);
  dev.poke(copyOffset(store, 3, 1), alien);
  const fresh = await ChunkStore.open(dev);
  const err = await rejectsCorrupt(t, fresh.readChunk(3), 3);
  t.is(err.reason, 'wrong-id');
  t.is(await fresh.readChunk(0), 'zero');
});

test('a torn copy next to a never-written (all-zero) copy is corruption; two all-zero copies read empty', async (t) => {
  const dev = simFor(1024, 2);
  const store = await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 2 });
  dev.poke(copyOffset(store, 0, 0), Buffer.alloc(2048)); // both copies of chunk 0 zeroed
  dev.poke(copyOffset(store, 1, 0), Buffer.alloc(1024)); // chunk 1: A zeroed, B garbage
  dev.poke(copyOffset(store, 1, 1), Buffer.alloc(64, 0xab));
  const fresh = await ChunkStore.open(dev);
  t.is(await fresh.readChunk(0), null);
  const err = await rejectsCorrupt(t, fresh.readChunk(1), 1);
  t.is(err.reason, 'bad-magic');
  t.deepEqual(err.copies, ['blank', 'bad-magic']);
  const scan = await fresh.scan();
  t.deepEqual(
    scan.map((s) => [s.state, s.copies]),
    [
      ['empty', ['blank', 'blank']],
      ['corrupt', ['blank', 'bad-magic']],
    ],
  );
  await fresh.writeChunk(0, 'first');
  t.is(await fresh.readChunk(0), 'first');
  t.deepEqual((await fresh.scan())[0], { id: 0, generation: 1, state: 'ok', copies: ['ok', 'blank'] });
});

// ---------------------------------------------------------------------------------
// superblock

async function openError(t: ExecutionContext, dev: SimulatedMetaDevice, reason: SuperblockFault, message: RegExp): Promise<void> {
  const err = await t.throwsAsync(ChunkStore.open(dev), { instanceOf: MetadataSuperblockError });
  t.is(err!.code, 'EDVE_META_SUPERBLOCK');
  t.is(err!.reason, reason);
  t.regex(err!.message, message);
}

test('open: a blank or foreign device is not a metadata area', async (t) => {
  await openError(t, new SimulatedMetaDevice(1 << 16), 'bad-magic', /not a dve metadata area.*DVEMETA1.*blank/);
  const foreign = new SimulatedMetaDevice(1 << 16);
  foreign.poke(0, Buffer.from('\x7fELF garbage garbage garbage'));
  foreign.poke(SUPERBLOCK_SLOT_BYTES, Buffer.from('EFI PART'));
  await openError(t, foreign, 'bad-magic', /not a dve metadata area.*bad-magic/);
  await openError(t, new SimulatedMetaDevice(100), 'size-mismatch', /too small/);
});

test('open: another format version is refused by number', async (t) => {
  const dev = simFor(1024, 2);
  await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 2 });
  dev.corrupt(8, 2);
  dev.corrupt(SUPERBLOCK_SLOT_BYTES + 8, 2);
  await openError(t, dev, 'bad-version', /format version 2; this dve reads version 1/);
});

test('open: one damaged superblock copy is tolerated, both is corruption', async (t) => {
  const dev = simFor(1024, 2);
  await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 2, uuid: UUID });
  dev.corrupt(30, 0x55); // inside copy 0's uuid
  const store = await ChunkStore.open(dev);
  t.is(store.superblockState, 'one-copy-bad');
  t.is(store.uuid, UUID);
  dev.corrupt(SUPERBLOCK_SLOT_BYTES + 17, 0x55); // inside copy 1's chunkBytes
  await openError(t, dev, 'corrupt', /superblock is corrupt: both copies fail.*bad-crc.*bad-crc/);
});

test('open: a device smaller than the area is a size mismatch', async (t) => {
  const dev = simFor(1024, 8);
  await ChunkStore.format(dev, { chunkBytes: 1024, chunkCount: 8 });
  const short = new SimulatedMetaDevice(dev.snapshot(0, dev.sizeBytes - 512));
  await openError(t, short, 'size-mismatch', new RegExp(`needs ${dev.sizeBytes} bytes \\(8 chunks of 1024\\) but the device has only ${dev.sizeBytes - 512}`));
});

test('open: superblock copies from two different areas disagree', async (t) => {
  const a = simFor(1024, 8);
  await ChunkStore.format(a, { chunkBytes: 1024, chunkCount: 8 });
  const b = simFor(1024, 8);
  await ChunkStore.format(b, { chunkBytes: 1024, chunkCount: 4 });
  a.poke(SUPERBLOCK_SLOT_BYTES, b.snapshot(SUPERBLOCK_SLOT_BYTES, 512));
  await openError(t, a, 'copies-disagree', /superblock copies disagree/);
});

// ---------------------------------------------------------------------------------
// FileMetaDevice

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-chunk-store-'));
test.after.always(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

test('FileMetaDevice: a metadata area in a real file survives close and reopen', async (t) => {
  const file = path.join(tmpRoot, 'sub', 'meta.img');
  const sizeBytes = ChunkStore.requiredBytes(DEFAULT_CHUNK_BYTES, 6);
  const dev = await FileMetaDevice.open(file, { sizeBytes, create: true });
  t.teardown(() => dev.close());
  t.is(fs.statSync(file).size, sizeBytes);
  const store = await ChunkStore.format(dev, { chunkCount: 6 });
  const big = Buffer.alloc(store.capacityBytes - 5, 0x42);
  await store.writeChunk(0, { disks: [{ id: 1, path: '/dev/loop0' }] });
  await store.writeChunk(5, big);
  await store.writeChunk(5, [1, 2, 3]);
  await dev.close();

  const dev2 = await FileMetaDevice.open(file);
  t.teardown(() => dev2.close());
  t.is(dev2.sizeBytes, sizeBytes);
  const again = await ChunkStore.open(dev2);
  t.is(again.uuid, store.uuid);
  t.deepEqual(await again.readChunk(0), { disks: [{ id: 1, path: '/dev/loop0' }] });
  t.deepEqual(await again.readChunk(5), [1, 2, 3]);
  t.is(await again.generation(5), 2);
  t.is(await again.readChunk(3), null);
  // Flip a byte of chunk 0's only written copy on disk: both copies now fail or fall back.
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, Buffer.from([0xff]), 0, 1, DATA_OFFSET + CHUNK_HEADER_BYTES + 2);
  fs.closeSync(fd);
  again.invalidate();
  t.is(await again.readChunk(0), null, 'falls back to the generation-0 copy');
  t.deepEqual((await again.scan())[0]!.copies, ['bad-crc', 'ok']);
});

test('FileMetaDevice: a region at an offset leaves the rest of the file alone', async (t) => {
  const file = path.join(tmpRoot, 'disk.img');
  const offsetBytes = 1 << 20;
  const sizeBytes = ChunkStore.requiredBytes(4096, 4);
  fs.writeFileSync(file, Buffer.alloc(offsetBytes + sizeBytes + 4096, 0x5c));
  const dev = await FileMetaDevice.open(file, { offsetBytes, sizeBytes });
  t.teardown(() => dev.close());
  const store = await ChunkStore.format(dev, { chunkBytes: 4096 });
  t.is(store.chunkCount, 4);
  await store.writeChunk(3, 'last');
  await t.throwsAsync(dev.read(Buffer.alloc(1), sizeBytes), { instanceOf: RangeError, message: /outside/ });
  await dev.close();
  const all = fs.readFileSync(file);
  t.true(all.subarray(0, offsetBytes).equals(Buffer.alloc(offsetBytes, 0x5c)));
  t.true(all.subarray(offsetBytes + sizeBytes).equals(Buffer.alloc(4096, 0x5c)));
  t.is(all.toString('latin1', offsetBytes, offsetBytes + 8), 'DVEMETA1');
  const dev2 = await FileMetaDevice.open(file, { offsetBytes, sizeBytes, readOnly: true });
  t.teardown(() => dev2.close());
  t.is(await (await ChunkStore.open(dev2)).readChunk(3), 'last');
  await t.throwsAsync(dev2.write(Buffer.alloc(1), 0), { message: /read-only/ });
});

test('FileMetaDevice: clear errors for a missing file and a region past the end', async (t) => {
  const missing = path.join(tmpRoot, 'missing.img');
  await t.throwsAsync(FileMetaDevice.open(missing), { message: /does not exist \(pass create/ });
  await t.throwsAsync(FileMetaDevice.open(missing, { create: true }), { message: /no size given/ });
  const file = path.join(tmpRoot, 'small.img');
  fs.writeFileSync(file, Buffer.alloc(8192));
  await t.throwsAsync(FileMetaDevice.open(file, { offsetBytes: 4096, sizeBytes: 8192 }), {
    instanceOf: RangeError,
    message: /\[4096, 12288\) runs past the end of file .* \(8192 bytes\); pass create/,
  });
  await t.throwsAsync(FileMetaDevice.open(file, { offsetBytes: 8192 }), { instanceOf: RangeError, message: /at or past the end/ });
  const grown = await FileMetaDevice.open(file, { offsetBytes: 4096, sizeBytes: 8192, create: true });
  t.teardown(() => grown.close());
  t.is(fs.statSync(file).size, 12288);
  await openErrorFile(t, grown);
});

async function openErrorFile(t: ExecutionContext, dev: FileMetaDevice): Promise<void> {
  const err = await t.throwsAsync(ChunkStore.open(dev), { instanceOf: MetadataSuperblockError });
  t.is(err!.reason, 'bad-magic');
}

function sh(cmd: string, args: string[]): string {
  return execFileSync('timeout', ['-s', 'KILL', '20', cmd, ...args], { encoding: 'utf8', timeout: 30_000 }).trim();
}

test('FileMetaDevice: on a loop device, a region inside works and one past the end is refused', async (t) => {
  if (process.getuid?.() !== 0) {
    t.log('not root: loop device test skipped');
    t.pass();
    return;
  }
  const size = 4 << 20;
  const file = path.join(tmpRoot, 'loop-backing.img');
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, size);
  let loop: string;
  try {
    loop = sh('losetup', ['-f', '--show', file]);
  } catch (err) {
    t.log(`losetup unavailable, loop device test skipped: ${(err as Error).message}`);
    t.pass();
    return;
  }
  t.teardown(() => {
    try {
      sh('losetup', ['-d', loop]);
    } catch {
      // best effort
    }
  });
  await t.throwsAsync(FileMetaDevice.open(loop, { offsetBytes: 1 << 20, sizeBytes: 4 << 20 }), {
    instanceOf: RangeError,
    message: new RegExp(`\\[1048576, 5242880\\) runs past the end of block device ${loop} \\(4194304 bytes\\)`),
  });
  await t.throwsAsync(FileMetaDevice.open(loop, { offsetBytes: 1 << 20, sizeBytes: 4 << 20, create: true }), {
    message: /past the end of block device/,
  });
  const dev = await FileMetaDevice.open(loop, { offsetBytes: 1 << 20 });
  t.teardown(() => dev.close());
  t.true(dev.isBlockDevice);
  t.is(dev.sizeBytes, 3 << 20);
  const store = await ChunkStore.format(dev, { chunkBytes: 64 * 1024 });
  t.is(store.chunkCount, Math.floor(((3 << 20) - DATA_OFFSET) / (128 * 1024)));
  await store.writeChunk(store.chunkCount - 1, { on: 'loop' });
  const reopened = await ChunkStore.open(dev);
  t.deepEqual(await reopened.readChunk(store.chunkCount - 1), { on: 'loop' });
});
