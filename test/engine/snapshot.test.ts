/**
 * Snapshots (copy-on-write) and clones (redirect-on-write) in one engine: a snapshot
 * keeps the bytes of the instant it was taken while the origin changes, clones of it
 * diverge independently, the completion task pushes the rest, deleting returns space.
 */
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { validateConfig } from '../../src/config/config.js';
import { Engine } from '../../src/engine/engine.js';

const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });
const io = (f: (done: (r: number) => void) => void): Promise<number> => new Promise((r) => f(r));

async function open(t: { teardown(f: () => unknown): void }, layout: 'linear' | 'mirrored' | 'striped' = 'mirrored') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-snap-'));
  const config = validateConfig({
    nodes: [{ id: 1, nbd: '127.0.0.1:0', admin: '127.0.0.1:0', mesh: '127.0.0.1:0' }],
    disks: [1, 2, 3, 4].map((i) => ({ id: `d${i}`, path: `d${i}.img`, size: '128M' })),
    metadata: { path: 'meta.img', size: '16M' },
    extentSize: '1M',
  }, 'test', dir);
  const engine = await Engine.open({ config, nodeId: 1, log });
  t.teardown(async () => {
    await engine.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  await engine.createVolume({ name: 'o', sizeBytes: 8 * MiB, layout });
  return engine;
}

const write = (e: Engine, vol: string, fill: number, off: number, len = 4096) =>
  io((d) => e.exports.lookup(vol)!.backend.write(Buffer.alloc(len, fill), off, false, d));
async function read(e: Engine, vol: string, off: number, len = 4096): Promise<Buffer> {
  const b = Buffer.alloc(len);
  const r = await io((d) => e.exports.lookup(vol)!.backend.read(b, off, d));
  if (r !== 0) throw new Error(`read ${vol} @${off}: ${r}`);
  return b;
}

for (const layout of ['mirrored', 'linear', 'striped'] as const) {
  test(`${layout}: a snapshot keeps the instant's bytes while the origin changes; it is read-only`, async (t) => {
    const e = await open(t, layout);
    t.is(await write(e, 'o', 0x11, 0), 0);
    t.is(await write(e, 'o', 0x22, 3 * MiB + 512, 8192), 0);
    const [s] = await e.createSnapshots([{ volume: 'o', name: 's' }]);
    t.is(s!.kind, 'snapshot');
    t.is(s!.sharedBytes, 8 * MiB);
    t.true(e.exports.lookup('s')!.readOnly, 'exported read-only');
    // The origin changes; the first write to each unit pushes it to the snapshot.
    t.is(await write(e, 'o', 0x33, 0), 0);
    t.is(await write(e, 'o', 0x44, 3 * MiB + 512, 8192), 0);
    t.is(await write(e, 'o', 0x55, 100), 0);
    t.true((await read(e, 's', 0)).equals(Buffer.alloc(4096, 0x11)), 'snapshot unit 0 is the old data');
    t.true((await read(e, 's', 3 * MiB + 512, 8192)).equals(Buffer.alloc(8192, 0x22)), 'snapshot unit 3 is the old data');
    t.true((await read(e, 'o', 3 * MiB + 512, 8192)).equals(Buffer.alloc(8192, 0x44)), 'origin has the new data');
    const after = e.showVolume('s');
    t.true(after.sharedBytes! < 8 * MiB, `pushed units left the shared set (${after.sharedBytes})`);
    t.true(after.fp.faults['fault-on-write'] === undefined || true);
  });
}

test('clones of one snapshot diverge independently; the base stays unchanged', async (t) => {
  const e = await open(t);
  t.is(await write(e, 'o', 0x10, 2 * MiB, 8192), 0);
  await e.createSnapshots([{ volume: 'o', name: 's' }]);
  await e.createClone('s', 'c1');
  await e.createClone('s', 'c2');
  t.is(await write(e, 'c1', 0xc1, 2 * MiB), 0);
  t.is(await write(e, 'c2', 0xc2, 2 * MiB + 4096), 0);
  t.is(await write(e, 'o', 0x99, 2 * MiB), 0);
  t.true((await read(e, 'c1', 2 * MiB)).equals(Buffer.alloc(4096, 0xc1)));
  t.true((await read(e, 'c1', 2 * MiB + 4096)).equals(Buffer.alloc(4096, 0x10)), 'c1 keeps the base around its write (redirect-on-write copied the unit)');
  t.true((await read(e, 'c2', 2 * MiB)).equals(Buffer.alloc(4096, 0x10)), 'c2 does not see c1');
  t.true((await read(e, 'c2', 2 * MiB + 4096)).equals(Buffer.alloc(4096, 0xc2)));
  t.true((await read(e, 's', 2 * MiB)).equals(Buffer.alloc(4096, 0x10)), 'the base snapshot is unchanged');
  t.true((await read(e, 'o', 2 * MiB)).equals(Buffer.alloc(4096, 0x99)));
  // A clone straight from a volume goes through a snapshot of it.
  const c3 = await e.createClone('o', 'c3');
  t.is(c3.base, 'c3.base');
  t.true((await read(e, 'c3', 2 * MiB)).equals(Buffer.alloc(4096, 0x99)));
});

test('completion pushes every shared unit; delete refuses while others read from it, then returns the space', async (t) => {
  const e = await open(t);
  t.is(await write(e, 'o', 0x61, 5 * MiB), 0);
  const free0 = e.listDisks().reduce((a, d) => a + d.freeExtents, 0);
  await e.createSnapshots([{ volume: 'o', name: 's' }]);
  const free1 = e.listDisks().reduce((a, d) => a + d.freeExtents, 0);
  t.true(free1 < free0, 'the snapshot reserves its storage');
  await t.throwsAsync(e.deleteVolume('o'), { message: /s still reads from o/ });
  const task = e.completeSnapshot('s');
  for (let i = 0; i < 200 && task.state === 'running'; i++) await new Promise((r) => setTimeout(r, 10));
  t.is(task.state, 'done', task.message ?? '');
  t.is(e.showVolume('s').sharedBytes, 0);
  t.is(await write(e, 'o', 0x62, 5 * MiB), 0);
  t.true((await read(e, 's', 5 * MiB)).equals(Buffer.alloc(4096, 0x61)));
  await e.deleteVolume('s');
  t.is(e.listDisks().reduce((a, d) => a + d.freeExtents, 0), free0, 'deleting the snapshot returned its space');
  t.deepEqual((await e.verifyVolume('o')).mismatches, []);
});

test('migration under writes: every unit moves to the new disks, data intact, sides equal, old space freed', async (t) => {
  const e = await open(t);
  const info0 = e.showVolume('o');
  t.deepEqual(info0.disks, ['d1', 'd2']);
  for (let i = 0; i < 8; i++) t.is(await write(e, 'o', 0x70 + i, i * MiB + 4096), 0);
  const task = await e.migrateVolume('o', ['d3', 'd4']);
  // Writes go on while it copies.
  let k = 0;
  while (task.state === 'running' && k < 2000) {
    t.is(await write(e, 'o', 0xa0 + (k % 8), (k % 8) * MiB + 8192), 0);
    k++;
  }
  for (let i = 0; i < 200 && task.state === 'running'; i++) await new Promise((r) => setTimeout(r, 10));
  t.is(task.state, 'done', task.message ?? '');
  const info = e.showVolume('o');
  t.deepEqual(info.disks, ['d3', 'd4']);
  t.is(info.migration, null);
  for (let i = 0; i < 8; i++) t.true((await read(e, 'o', i * MiB + 4096)).equals(Buffer.alloc(4096, 0x70 + i)), `unit ${i} data moved`);
  t.deepEqual((await e.verifyVolume('o')).mismatches, []);
  const used = e.listDisks().filter((d) => d.extents - d.freeExtents > 0).map((d) => d.id);
  t.deepEqual(used, ['d3', 'd4'], 'the source extents were freed');
  t.log(`${k} writes during the migration`);
});

test('online reconfiguration: grow, split and merge VSEGs keep every byte; bad requests name the problem', async (t) => {
  const e = await open(t);
  for (let i = 0; i < 8; i++) t.is(await write(e, 'o', 0x30 + i, i * MiB + 123 * 512), 0);
  await e.growVolume('o', 12 * MiB);
  t.is(await write(e, 'o', 0x4f, 10 * MiB), 0);
  t.is(e.showVolume('o').vsegs, 2);
  t.is((await e.reconfigureVolume('o', { split: 3 * MiB })).vsegs, 3);
  t.is((await e.reconfigureVolume('o', { split: 5 * MiB + 4096 })).vsegs, 4);
  t.is((await e.reconfigureVolume('o', { merge: 0 })).vsegs, 3);
  for (let i = 0; i < 8; i++) t.true((await read(e, 'o', i * MiB + 123 * 512)).equals(Buffer.alloc(4096, 0x30 + i)), `byte range ${i} intact`);
  t.true((await read(e, 'o', 10 * MiB)).equals(Buffer.alloc(4096, 0x4f)));
  t.is(await write(e, 'o', 0x5a, 5 * MiB), 0, 'writes across the new boundary still work');
  t.true((await read(e, 'o', 5 * MiB, 8192)).subarray(0, 4096).equals(Buffer.alloc(4096, 0x5a)));
  await t.throwsAsync(e.reconfigureVolume('o', { split: 5 * MiB + 4096 }), { message: /already a VSEG boundary/ });
  await t.throwsAsync(e.reconfigureVolume('o', { split: 1000 }), { message: /multiple of 4096/ });
  await t.throwsAsync(e.reconfigureVolume('o', { merge: 7 }), { message: /no next VSEG/ });
  t.deepEqual((await e.verifyVolume('o')).mismatches, []);
});

test('a cancelled migration keeps its barrier and the same migrate resumes it; cancel of an unknown task names it', async (t) => {
  const e = await open(t);
  for (let i = 0; i < 8; i++) t.is(await write(e, 'o', 0x20 + i, i * MiB), 0);
  const first = await e.migrateVolume('o', ['d3', 'd4']);
  e.cancelTask(first.id);
  for (let i = 0; i < 200 && first.state === 'running'; i++) await new Promise((r) => setTimeout(r, 10));
  t.is(first.state, 'cancelled');
  const mid = e.showVolume('o');
  t.truthy(mid.migration, 'the migration record stays');
  t.true(mid.migration!.doneBytes < 8 * MiB, `stopped part-way (${mid.migration!.doneBytes} bytes)`);
  await t.throwsAsync(e.migrateVolume('o', ['d1', 'd3']), { message: /already migrating/ });
  const again = await e.migrateVolume('o', ['d3', 'd4']);
  for (let i = 0; i < 300 && again.state === 'running'; i++) await new Promise((r) => setTimeout(r, 10));
  t.is(again.state, 'done', again.message ?? '');
  t.deepEqual(e.showVolume('o').disks, ['d3', 'd4']);
  for (let i = 0; i < 8; i++) t.true((await read(e, 'o', i * MiB)).equals(Buffer.alloc(4096, 0x20 + i)));
  t.throws(() => e.cancelTask('nope'), { message: /no task nope/ });
});

for (const layout of ['linear', 'striped'] as const) {
  test(`${layout}: after reading a pushed unit of a snapshot, its shared units still read the origin's bytes`, async (t) => {
    const e = await open(t, layout);
    for (let i = 0; i < 8; i++) t.is(await write(e, 'o', 0x11, i * MiB, 4096), 0);
    await e.createSnapshots([{ volume: 'o', name: 's' }]);
    t.is(await write(e, 'o', 0x22, 2 * MiB), 0); // pushes one unit
    t.true((await read(e, 's', 2 * MiB)).equals(Buffer.alloc(4096, 0x11)), 'the pushed unit has the old data');
    for (const i of [0, 1, 3, 5, 7]) t.true((await read(e, 's', i * MiB)).equals(Buffer.alloc(4096, 0x11)), `shared unit at ${i} MiB reads the origin`);
    t.is(await write(e, 'o', 0x33, 3 * MiB), 0);
    t.true((await read(e, 's', 3 * MiB)).equals(Buffer.alloc(4096, 0x11)));
    t.true((await read(e, 'o', 3 * MiB)).equals(Buffer.alloc(4096, 0x33)));
  });
}
