/**
 * `dve serve` as a user runs it: argument errors name the bad argument, a Unix
 * socket works, SIGTERM finishes in-flight requests and exits 0, and SIGKILL loses
 * no acknowledged write.
 */
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { run, tempDir, uniqueName } from '../helpers/exec.js';
import { REPO_ROOT, startServer } from '../helpers/server.js';
import { qemuIo, nbdinfoJson } from '../helpers/clients.js';

const DVE = path.join(REPO_ROOT, 'bin/dve.js');

function dve(args: string[], timeoutSec = 20) {
  return run(process.execPath, [DVE, ...args], { timeoutSec });
}

test('serve: a bad --size names the option and the text', async (t) => {
  const dir = tempDir(t);
  const r = await dve(['serve', path.join(dir, 'x.img'), '--size', '12 parsecs']);
  t.not(r.code, 0);
  t.regex(r.stderr, /--size: "12 parsecs" is not a size/);
  t.false(fs.existsSync(path.join(dir, 'x.img')), 'nothing was created');
});

test('serve: a bad --port names the option', async (t) => {
  const dir = tempDir(t);
  const r = await dve(['serve', path.join(dir, 'x.img'), '--size', '1M', '--port', '70000']);
  t.not(r.code, 0);
  t.regex(r.stderr, /--port.*"70000" is not a TCP port/);
});

test('serve: a missing file without --size says how to create it', async (t) => {
  const dir = tempDir(t);
  const r = await dve(['serve', path.join(dir, 'missing.img')]);
  t.is(r.code, 1);
  t.regex(r.stderr, /missing\.img does not exist \(give --size/);
});

test('serve: a directory is refused with a clear error', async (t) => {
  const dir = tempDir(t);
  const r = await dve(['serve', dir]);
  t.is(r.code, 1);
  t.regex(r.stderr, /neither a regular file nor a block device/);
});

test('serve: an unknown --log-level is refused', async (t) => {
  const dir = tempDir(t);
  const r = await dve(['serve', path.join(dir, 'x.img'), '--size', '1M', '--log-level', 'chatty']);
  t.not(r.code, 0);
  t.regex(r.stderr, /--log-level.*chatty/);
});

test('serve: --size accepts 512M, creates a sparse file, prints the URI and how to attach', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'vol.img');
  const child = spawn(process.execPath, [DVE, 'serve', file, '--size', '512M', '--port', '0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => child.kill('SIGKILL'));
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  for (let i = 0; i < 100 && !out.includes('QEMU'); i++) await new Promise((r) => setTimeout(r, 50));
  t.regex(out, /nbd:\/\/127\.0\.0\.1:\d+\/vol\.img/);
  t.regex(out, /nbd-client 127\.0\.0\.1 \d+ \/dev\/nbd0 -N vol\.img/);
  t.regex(out, /nbdfuse .* losetup/);
  t.regex(out, /qemu-system-x86_64 -drive file=nbd:\/\//);
  const st = fs.statSync(file);
  t.is(st.size, 512 * 1024 * 1024);
  t.true(st.blocks * 512 < 1024 * 1024, 'sparse');
});

test('serve: --unix serves on a Unix socket, --read-only is honoured', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'ro.img');
  fs.writeFileSync(file, Buffer.alloc(1024 * 1024, 7));
  const sock = path.join(dir, 'nbd.sock');
  const child = spawn(process.execPath, [DVE, 'serve', file, '--unix', sock, '--read-only', '--export', 'ro'], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => child.kill('SIGKILL'));
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  for (let i = 0; i < 100 && !out.includes('nbd+unix'); i++) await new Promise((r) => setTimeout(r, 50));
  const uri = `nbd+unix:///ro?socket=${sock}`;
  t.true(out.includes(uri), out);
  const info = await nbdinfoJson(uri);
  t.is(info.exports[0]['export-size'], 1024 * 1024);
  t.true(info.exports[0].is_read_only);
  const w = await qemuIo(uri, ['write -P 1 0 4k']);
  t.not(w.code, 0);
  t.true(fs.readFileSync(file).equals(Buffer.alloc(1024 * 1024, 7)));
});

test('serve: SIGTERM finishes in-flight requests, syncs and exits 0', async (t) => {
  const dir = tempDir(t);
  const srv = await startServer('dve', path.join(dir, 'term.img'), { size: 64 * 1024 * 1024, exportName: uniqueName('term') });
  // A writer with many requests in flight; stop the server while it runs.
  const writer = qemuIo(srv.uri, ['aio_write -P 0x3c 0 16M', 'aio_write -P 0x3d 16M 16M', 'aio_flush'], { timeoutSec: 30 });
  await new Promise((r) => setTimeout(r, 150));
  const status = await srv.stop();
  t.is(status, 0);
  const w = await writer;
  // Whatever the client saw acknowledged is in the file: if it reported success, all of it is.
  if (w.code === 0) {
    const data = fs.readFileSync(path.join(dir, 'term.img'));
    t.true(data.subarray(0, 16 << 20).every((b) => b === 0x3c));
    t.true(data.subarray(16 << 20, 32 << 20).every((b) => b === 0x3d));
  } else {
    t.pass('the client was cut off before finishing; nothing more to check');
  }
});

test('serve: SIGKILL loses no acknowledged write', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'kill.img');
  const name = uniqueName('kill');
  const srv = await startServer('dve', file, { size: 32 * 1024 * 1024, exportName: name });
  const w = await qemuIo(srv.uri, ['write -P 0x77 0 4M', 'write -P 0x78 8M 1M']);
  t.is(w.code, 0, w.stderr);
  process.kill(srv.pid, 'SIGKILL');
  await srv.stop();
  const data = fs.readFileSync(file);
  t.true(data.subarray(0, 4 << 20).every((b) => b === 0x77));
  t.true(data.subarray(8 << 20, 9 << 20).every((b) => b === 0x78));
  // And it serves the same bytes again after a restart.
  const again = await startServer('dve', file, { exportName: name });
  t.teardown(() => again.stop());
  const r = await qemuIo(again.uri, ['read -P 0x77 0 4M', 'read -P 0x78 8M 1M']);
  t.is(r.code, 0, r.stdout + r.stderr);
});

// `dve up` / `dve down` (the main job: a process per node) are covered in cluster-cli.test.ts.
