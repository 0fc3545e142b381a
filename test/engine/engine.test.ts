/**
 * The engine in-process over real sparse files: volumes of every layout served by
 * their fast paths, the CP's splitting, persistence across a restart, corruption
 * detection, operator errors, grow and delete, and degraded mirrors with fast resync.
 */
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { Engine } from '../../src/engine/engine.js';
import { validateConfig, type Config } from '../../src/config/config.js';
import type { Backend } from '../../src/storage/backend.js';
import { AdminError, type Layout } from '../../src/engine/admin-api.js';

const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });

function makeConfig(dir: string, disks = 4, diskSize = '256M'): Config {
  return validateConfig({
    nodes: [{ id: 1, nbd: '127.0.0.1:0', admin: '127.0.0.1:0', mesh: '127.0.0.1:0' }],
    disks: Array.from({ length: disks }, (_, i) => ({ id: `d${i + 1}`, path: `d${i + 1}.img`, size: diskSize })),
    metadata: { path: 'meta.img', size: '16M' },
    extentSize: '1M',
  }, 'test', dir);
}

async function open(t: { teardown(f: () => unknown): void }, dir?: string): Promise<{ engine: Engine; dir: string; config: Config }> {
  const d = dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'dve-engine-'));
  const config = makeConfig(d);
  const engine = await Engine.open({ config, nodeId: 1, log });
  if (!dir) t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return { engine, dir: d, config };
}

const io = (f: (done: (r: number) => void) => void): Promise<number> => new Promise((r) => f(r));
const backendOf = (e: Engine, name: string): Backend => e.exports.lookup(name)!.backend;

/** Data that names its own offset: a read through the wrong mapping shows. */
function pattern(offset: number, length: number, tag: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 8) b.writeUInt32BE(((offset + i) / 8) >>> 0, i), b.writeUInt32BE(tag, i + 4);
  return b;
}

for (const layout of ['linear', 'striped', 'mirrored', 'striped-mirrored'] as Layout[]) {
  test(`${layout}: writes and reads across extent and stripe boundaries; FP serves the steady state`, async (t) => {
    const { engine } = await open(t);
    t.teardown(() => engine.close());
    const info = await engine.createVolume({ name: 'v', sizeBytes: 24 * MiB, layout, stripeBytes: 64 * 1024 });
    t.is(info.sizeBytes, 24 * MiB);
    const b = backendOf(engine, 'v');
    // Unaligned pieces crossing 64 KiB stripes and 1 MiB allocation extents.
    const cases = [[0, 4096], [65536 - 512, 1024], [MiB - 3000, 6000], [5 * MiB + 17, 300_000], [24 * MiB - 4096, 4096]];
    for (const [off, len] of cases) t.is(await io((d) => b.write(pattern(off!, len!, 7), off!, false, d)), 0, `write ${off}`);
    for (const [off, len] of cases) {
      const r = Buffer.alloc(len!);
      t.is(await io((d) => b.read(r, off!, d)), 0);
      t.true(r.equals(pattern(off!, len!, 7)), `read back ${off}+${len}`);
    }
    // Steady state: aligned 4 KiB reads inside one stripe are FP hits.
    const before = engine.showVolume('v').fp.hits;
    for (let i = 0; i < 200; i++) await io((d) => b.read(Buffer.alloc(4096), (i * 4096) % (16 * MiB), d));
    const after = engine.showVolume('v').fp;
    t.is(after.hits - before, 200, 'every steady-state read served by the FP');
    if (layout.includes('mirrored')) t.deepEqual((await engine.verifyVolume('v')).mismatches, []);
  });
}

test('a request spanning extents is split by the CP (SPANS fault) and stays correct', async (t) => {
  const { engine } = await open(t);
  t.teardown(() => engine.close());
  await engine.createVolume({ name: 'lin', sizeBytes: 8 * MiB, layout: 'linear', disks: ['d1', 'd2'] });
  await engine.createVolume({ name: 'str', sizeBytes: 8 * MiB, layout: 'striped', stripeBytes: 4096 });
  const b = backendOf(engine, 'str');
  const data = pattern(1000, 3 * 4096, 3);
  t.is(await io((d) => b.write(data, 1000, false, d)), 0);
  const r = Buffer.alloc(data.length);
  t.is(await io((d) => b.read(r, 1000, d)), 0);
  t.true(r.equals(data));
  t.true(engine.showVolume('str').fp.faults.spans! >= 2);
});

test('metadata persists: a reopened engine serves the same volumes and bytes', async (t) => {
  const { engine, dir } = await open(t);
  await engine.createVolume({ name: 'keep', sizeBytes: 6 * MiB, layout: 'striped-mirrored', stripeBytes: 4096 });
  await engine.createVolume({ name: 'lin', sizeBytes: 3 * MiB, layout: 'linear' });
  await engine.growVolume('lin', 9 * MiB);
  t.is(await io((d) => backendOf(engine, 'keep').write(pattern(12345, 70000, 9), 12345, true, d)), 0);
  t.is(await io((d) => backendOf(engine, 'lin').write(pattern(8 * MiB, 4096, 9), 8 * MiB, true, d)), 0);
  const disksBefore = engine.listDisks();
  await engine.close();
  const again = await Engine.open({ config: makeConfig(dir), nodeId: 1, log });
  t.teardown(() => again.close());
  t.deepEqual(again.listVolumes().map((v) => [v.name, v.sizeBytes, v.layout, v.vsegs]).sort(), [['keep', 6 * MiB, 'striped-mirrored', 1], ['lin', 9 * MiB, 'linear', 2]]);
  t.deepEqual(again.listDisks().map((d) => d.freeExtents), disksBefore.map((d) => d.freeExtents), 'the allocator is rebuilt from the maps');
  const r = Buffer.alloc(70000);
  t.is(await io((d) => backendOf(again, 'keep').read(r, 12345, d)), 0);
  t.true(r.equals(pattern(12345, 70000, 9)));
  const r2 = Buffer.alloc(4096);
  t.is(await io((d) => backendOf(again, 'lin').read(r2, 8 * MiB, d)), 0);
  t.true(r2.equals(pattern(8 * MiB, 4096, 9)));
});

test('a corrupted metadata chunk is detected and reported, never used', async (t) => {
  const { engine, dir } = await open(t);
  await engine.createVolume({ name: 'x', sizeBytes: 2 * MiB, layout: 'linear' });
  await engine.close();
  // Chunk 65 (the first after the 64 node journals) holds the volume header: damage both of its copies.
  const meta = path.join(dir, 'meta.img');
  const fd = fs.openSync(meta, 'r+');
  const chunkBytes = 65536;
  for (const copy of [0, 1]) fs.writeSync(fd, Buffer.alloc(64, 0x5a), 0, 64, 8192 + (2 * 65 + copy) * chunkBytes + 40);
  fs.closeSync(fd);
  const err = await t.throwsAsync(Engine.open({ config: makeConfig(dir), nodeId: 1, log }));
  t.regex(err!.message, /chunk 65/);
});

test('wrong input gets an error naming the problem and changes nothing', async (t) => {
  const { engine } = await open(t);
  t.teardown(() => engine.close());
  const free = (): number[] => engine.listDisks().map((d) => d.freeExtents);
  const before = free();
  const cases: [Parameters<Engine['createVolume']>[0], string, RegExp][] = [
    [{ name: 'a', sizeBytes: MiB, layout: 'linear', disks: ['d9'] }, 'EINVAL', /unknown disk d9/],
    [{ name: 'a', sizeBytes: 4096 * MiB, layout: 'linear' }, 'ENOSPC', /not enough space/],
    [{ name: 'a', sizeBytes: 0, layout: 'linear' }, 'EINVAL', /size 0/],
    [{ name: 'bad name!', sizeBytes: MiB, layout: 'linear' }, 'EINVAL', /volume name/],
    [{ name: 'a', sizeBytes: MiB, layout: 'mirrored', copies: 5 }, 'ENOSPC', /needs 5 distinct online disks/],
    [{ name: 'a', sizeBytes: MiB, layout: 'raid7' as Layout }, 'EINVAL', /layout "raid7"/],
    [{ name: 'a', sizeBytes: MiB, layout: 'striped', stripeBytes: 3000 }, 'EINVAL', /stripe size/],
  ];
  for (const [req, code, re] of cases) {
    const e = await t.throwsAsync(engine.createVolume(req));
    t.true(e instanceof AdminError, String(e));
    t.is((e as AdminError).code, code, e!.message);
    t.regex(e!.message, re);
  }
  t.deepEqual(free(), before);
  t.is(engine.listVolumes().length, 0);
  await engine.createVolume({ name: 'dup', sizeBytes: MiB, layout: 'linear' });
  t.is(((await t.throwsAsync(engine.createVolume({ name: 'dup', sizeBytes: MiB, layout: 'linear' }))) as AdminError).code, 'EEXIST');
  t.is(((await t.throwsAsync(engine.growVolume('dup', 1000))) as AdminError).code, 'EINVAL');
  t.is(((await t.throwsAsync(engine.deleteVolume('nope'))) as AdminError).code, 'ENOENT');
  t.is(((await t.throwsAsync(engine.offlineDisk(engine.showVolume('dup').disks[0]!))) as AdminError).code, 'EBUSY', 'a linear volume has no other copy');
});

test('grow adds a VSEG online; delete frees the space and removes the export', async (t) => {
  const { engine } = await open(t);
  t.teardown(() => engine.close());
  const free0 = engine.listDisks().reduce((a, d) => a + d.freeExtents, 0);
  await engine.createVolume({ name: 'g', sizeBytes: 4 * MiB, layout: 'mirrored' });
  const b = backendOf(engine, 'g');
  t.is(await io((d) => b.write(pattern(0, 4 * MiB, 1), 0, false, d)), 0);
  await engine.growVolume('g', 10 * MiB);
  t.is(b.sizeBytes, 10 * MiB);
  t.is(engine.showVolume('g').vsegs, 2);
  t.is(await io((d) => b.write(pattern(4 * MiB - 2048, 8192, 2), 4 * MiB - 2048, false, d)), 0, 'a write across the old end');
  const r = Buffer.alloc(4 * MiB - 2048);
  t.is(await io((d) => b.read(r, 0, d)), 0);
  t.true(r.equals(pattern(0, 4 * MiB - 2048, 1)));
  t.deepEqual((await engine.verifyVolume('g')).mismatches, []);
  await engine.deleteVolume('g');
  t.is(engine.exports.lookup('g'), undefined);
  t.is(engine.listDisks().reduce((a, d) => a + d.freeExtents, 0), free0);
});

test('offline a mirror side: writes go on, first write per extent faults once; online resyncs only dirtied extents', async (t) => {
  const { engine } = await open(t);
  t.teardown(() => engine.close());
  await engine.createVolume({ name: 'm', sizeBytes: 32 * MiB, layout: 'mirrored', disks: ['d1', 'd2'] });
  const b = backendOf(engine, 'm');
  t.is(await io((d) => b.write(pattern(0, 32 * MiB, 1), 0, false, d)), 0);
  await engine.offlineDisk('d2');
  t.is(engine.showVolume('m').state, 'degraded');
  // Dirty 3 allocation extents (1 MiB each) with several writes each.
  for (const e of [2, 7, 30]) {
    for (let k = 0; k < 4; k++) t.is(await io((d) => b.write(pattern(e * MiB + k * 4096, 4096, 2), e * MiB + k * 4096, false, d)), 0);
  }
  t.is(engine.showVolume('m').fp.faults['fault-on-write'], 3, 'one fault-on-write per dirtied extent');
  const task = await engine.onlineDisk('d2');
  t.truthy(task);
  for (let i = 0; i < 200 && engine.status().tasks[0]!.state === 'running'; i++) await new Promise((r) => setTimeout(r, 10));
  const done = engine.status().tasks[0]!;
  t.is(done.state, 'done');
  t.is(done.doneBytes, 3 * MiB, 'copied exactly the dirtied extents');
  t.is(engine.showVolume('m').state, 'ok');
  t.deepEqual((await engine.verifyVolume('m')).mismatches, []);
  // Reads now balance over both sides again and return the newest data.
  const r = Buffer.alloc(4096);
  for (let i = 0; i < 4; i++) {
    t.is(await io((d) => b.read(r, 7 * MiB + 4096, d)), 0);
    t.true(r.equals(pattern(7 * MiB + 4096, 4096, 2)));
  }
});

test('verify reports ranges where mirror sides differ', async (t) => {
  const { engine, dir } = await open(t);
  t.teardown(() => engine.close());
  await engine.createVolume({ name: 'm', sizeBytes: 4 * MiB, layout: 'mirrored', disks: ['d1', 'd2'] });
  t.deepEqual((await engine.verifyVolume('m')).mismatches, []);
  // Scribble on one side behind the engine's back.
  const fd = fs.openSync(path.join(dir, 'd2.img'), 'r+');
  fs.writeSync(fd, Buffer.alloc(512, 0xee), 0, 512, 2 * MiB);
  fs.closeSync(fd);
  const rep = await engine.verifyVolume('m');
  t.is(rep.mismatches.length, 1);
  t.true(rep.mismatches[0]!.offsetBytes <= 2 * MiB && rep.mismatches[0]!.offsetBytes + rep.mismatches[0]!.lengthBytes > 2 * MiB);
});

test('write journal: every write is also a checksummed record; a full region faults and the CP swaps', async (t) => {
  const { engine, dir } = await open(t);
  await engine.createVolume({ name: 'j', sizeBytes: 16 * MiB, layout: 'mirrored', disks: ['d1', 'd2'], journalBytes: 2 * MiB });
  const b = backendOf(engine, 'j');
  // 40 writes of 64 KiB: more than one 2 MiB region holds (each record is 64 KiB + 512).
  for (let i = 0; i < 40; i++) t.is(await io((d) => b.write(pattern(i * 65536, 65536, i), i * 65536, false, d)), 0);
  // One write larger than an FP record: the CP cuts it into records.
  t.is(await io((d) => b.write(pattern(8 * MiB, 3 * MiB, 99), 8 * MiB, false, d)), 0);
  const info = engine.showVolume('j');
  t.truthy(info.journal);
  t.true(info.journal!.swaps >= 2, `swaps ${info.journal!.swaps}`);
  t.true(info.fp.faults['journal-full']! >= 1);
  t.is(info.journal!.nextSequence, 1 + 40 + 3);
  // The active region's records read back in sequence with the data that was written.
  const { scanJournal } = await import('../../src/journal/write-journal.js');
  const { FileBackend } = await import('../../src/storage/file-backend.js');
  const hdrChunk = await (async () => {
    await engine.close();
    const again = await Engine.open({ config: makeConfig(dir), nodeId: 1, log });
    const j = again.showVolume('j').journal!;
    t.is(j.nextSequence, 1 + 40 + 3, 'the head is found again after a restart');
    // Writes go on with the next sequence numbers.
    t.is(await io((d) => backendOf(again, 'j').write(Buffer.alloc(4096, 7), 0, false, d)), 0);
    t.is(again.showVolume('j').journal!.nextSequence, 1 + 40 + 3 + 1);
    await again.close();
    return j;
  })();
  t.true(hdrChunk.usedBytes > 0);
  const disk = FileBackend.open(path.join(dir, 'd1.img'));
  const disk2 = FileBackend.open(path.join(dir, 'd2.img'));
  t.teardown(async () => { await disk.close(); await disk2.close(); });
  // Find the active region by scanning every region start of both disks for the newest sequence.
  let best: { seq: number; records: number } = { seq: 0, records: 0 };
  for (const d of [disk, disk2]) {
    for (let off = 0; off < 256 * MiB; off += MiB) {
      const { records } = await scanJournal(d, { disk: 'x', offsetBytes: off, lengthBytes: 2 * MiB });
      if (records.length > 0 && records.at(-1)!.sequence > best.seq) {
        best = { seq: records.at(-1)!.sequence, records: records.length };
        for (const r of records) {
          if (r.sequence === 1 + 40 + 3) t.true(r.data.equals(Buffer.alloc(4096, 7)));
          if (r.offsetBytes >= 8 * MiB && r.sequence <= 43) t.true(r.data.equals(pattern(r.offsetBytes, r.lengthBytes, 99)));
        }
      }
    }
  }
  t.is(best.seq, 44, 'the newest record on disk is the last write');
});
