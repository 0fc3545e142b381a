/**
 * The activity log of mirrored volumes: a crash with writes in flight leaves sides
 * that differ only inside logged extents, and a restart reconciles exactly those; an
 * idle sweep retires extents once they are durable.
 */
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { validateConfig } from '../../src/config/config.js';

process.env.DVE_ACTIVITY_SWEEP_MS = '300';
const { Engine } = await import('../../src/engine/engine.js');

const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });
const io = (f: (done: (r: number) => void) => void): Promise<number> => new Promise((r) => f(r));

function config(dir: string) {
  return validateConfig({
    nodes: [{ id: 1, nbd: '127.0.0.1:0', admin: '127.0.0.1:0', mesh: '127.0.0.1:0' }],
    disks: [{ id: 'd1', path: 'd1.img', size: '64M' }, { id: 'd2', path: 'd2.img', size: '64M' }],
    metadata: { path: 'meta.img', size: '16M' },
    extentSize: '1M',
  }, 'test', dir);
}

test('a restart reconciles exactly the extents in the activity log', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-al-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const a = await Engine.open({ config: config(dir), nodeId: 1, log });
  await a.createVolume({ name: 'm', sizeBytes: 16 * MiB, layout: 'mirrored' });
  const b = a.exports.lookup('m')!.backend;
  // Writes to extents 3 and 9 put them in the activity log.
  t.is(await io((d) => b.write(Buffer.alloc(4096, 1), 3 * MiB, false, d)), 0);
  t.is(await io((d) => b.write(Buffer.alloc(4096, 2), 9 * MiB + 8192, false, d)), 0);
  // A "crash" with a write in flight that reached one side only (extent 9), and damage
  // outside the log (extent 12) that reconciliation must not touch.
  const fd = fs.openSync(path.join(dir, 'd2.img'), 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 0x77), 0, 4096, 9 * MiB + 65536);
  fs.writeSync(fd, Buffer.alloc(512, 0x66), 0, 512, 12 * MiB);
  fs.closeSync(fd);
  // No close(): the process died. A new engine opens the same files.
  const again = await Engine.open({ config: config(dir), nodeId: 1, log });
  t.teardown(() => again.close());
  const rep = await again.verifyVolume('m');
  t.deepEqual(rep.mismatches.map((m) => Math.floor(m.offsetBytes / MiB)), [12], 'the logged extent was reconciled, the unlogged one was not touched');
  const r = Buffer.alloc(4096);
  t.is(await io((d) => again.exports.lookup('m')!.backend.read(r, 9 * MiB + 8192, d)), 0);
  t.true(r.equals(Buffer.alloc(4096, 2)), 'acknowledged data intact');
});

test('the first write to an extent faults once; an idle sweep retires it and the next write faults again', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-al-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const e = await Engine.open({ config: config(dir), nodeId: 1, log });
  t.teardown(() => e.close());
  await e.createVolume({ name: 'm', sizeBytes: 8 * MiB, layout: 'mirrored' });
  const b = e.exports.lookup('m')!.backend;
  const fow = (): number => e.showVolume('m').fp.faults['fault-on-write']!;
  for (let i = 0; i < 20; i++) t.is(await io((d) => b.write(Buffer.alloc(4096, i), 2 * MiB + i * 4096, false, d)), 0);
  t.is(fow(), 1, 'one fault for twenty writes to one extent');
  await new Promise((r) => setTimeout(r, 900)); // a few sweeps
  t.is(await io((d) => b.write(Buffer.alloc(4096, 9), 2 * MiB, false, d)), 0);
  t.is(fow(), 2, 'after the sweep the extent had left the log');
  t.deepEqual((await e.verifyVolume('m')).mismatches, []);
});
