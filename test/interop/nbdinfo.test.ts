// nbdinfo (libnbd) against the server: handshake metadata, export listing, base:allocation.
import test from 'ava';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { run, mustRun, tempDir, uniqueName } from '../helpers/exec.js';
import { startTestServer, logServersOnFailure, crashMessage, HOST } from '../helpers/server.js';
import { makeSparseFile, pwriteFile, nbdinfoJson, MiB, KiB } from '../helpers/clients.js';
import { randomBytes } from 'node:crypto';

logServersOnFailure(test);

function onlyExport(info: any): any {
  if (!Array.isArray(info.exports) || info.exports.length !== 1) {
    throw new Error(`expected exactly one export in nbdinfo output, got ${JSON.stringify(info.exports)}`);
  }
  return info.exports[0];
}

test.serial('nbdinfo --json: size, export name and read-write capability flags', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  const size = 40 * MiB + 12 * KiB; // deliberately not a power of two
  makeSparseFile(file, size);
  const name = uniqueName('info-rw');
  const srv = await startTestServer(t, file, { exportName: name });

  const info = await nbdinfoJson(srv.uri);
  t.is(info.protocol, 'newstyle-fixed');
  t.true(info.structured, 'structured replies negotiated');
  const e = onlyExport(info);
  t.is(e['export-name'], name);
  t.is(e['export-size'], size);
  t.is(e.is_read_only, false, 'is_read_only');
  for (const flag of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_cache', 'can_df', 'can_multi_conn']) {
    t.is(e[flag], true, flag);
  }
  t.true(Array.isArray(e.contexts) && e.contexts.includes('base:allocation'), `contexts ${JSON.stringify(e.contexts)} include base:allocation`);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('nbdinfo --json: a backing file created with a given size exports that size', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'new.img');
  const size = 24 * MiB;
  t.false(existsSync(file));
  const srv = await startTestServer(t, file, { size });
  const e = onlyExport(await nbdinfoJson(srv.uri));
  t.is(e['export-size'], size);
  t.is(e['export-name'], srv.exportName);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('nbdinfo --json: read-only export reports is_read_only and no trim/zero', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'ro.img');
  makeSparseFile(file, 8 * MiB);
  const srv = await startTestServer(t, file, { readOnly: true });
  const e = onlyExport(await nbdinfoJson(srv.uri));
  t.is(e['export-name'], srv.exportName);
  t.is(e['export-size'], 8 * MiB);
  t.is(e.is_read_only, true, 'is_read_only');
  t.is(e.can_trim, false, 'can_trim');
  t.is(e.can_zero, false, 'can_zero');
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('nbdinfo --list lists the export (name and size)', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'list.img');
  makeSparseFile(file, 16 * MiB);
  const name = uniqueName('listed');
  const srv = await startTestServer(t, file, { exportName: name });

  const r = await mustRun('nbdinfo', ['--list', '--json', `nbd://${HOST}:${srv.port}`], { timeoutSec: 30 });
  const info = JSON.parse(r.stdout);
  const names = (info.exports ?? []).map((x: any) => x['export-name']);
  t.true(names.includes(name), `--list output names ${JSON.stringify(names)} include ${name}`);
  const e = info.exports.find((x: any) => x['export-name'] === name);
  t.is(e?.['export-size'], 16 * MiB);

  const plain = await mustRun('nbdinfo', ['--list', `nbd://${HOST}:${srv.port}`], { timeoutSec: 30 });
  t.regex(plain.stdout, new RegExp(`export="${name}"`));
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('nbdinfo refuses an export name the server does not have', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'named.img');
  makeSparseFile(file, 4 * MiB);
  const srv = await startTestServer(t, file);
  const r = await run('nbdinfo', ['--json', `nbd://${HOST}:${srv.port}/${uniqueName('no-such-export')}`], { timeoutSec: 30 });
  t.not(r.code, 0, `nbdinfo on an unknown export name should fail:\n${r.stdout}\n${r.stderr}`);
  // The server must still serve its real export afterwards.
  const e = onlyExport(await nbdinfoJson(srv.uri));
  t.is(e['export-name'], srv.exportName);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('nbdinfo --map: sparse file reports holes and the written data region, never data as a hole', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'sparse.img');
  const size = 32 * MiB;
  const dataOff = 8 * MiB;
  const dataLen = 1 * MiB;
  makeSparseFile(file, size);
  pwriteFile(file, dataOff, randomBytes(dataLen));
  const srv = await startTestServer(t, file);

  const r = await mustRun('nbdinfo', ['--map', '--json', srv.uri], { timeoutSec: 30 });
  const extents: Array<{ offset: number; length: number; type: number; description: string }> = JSON.parse(r.stdout);
  t.true(Array.isArray(extents) && extents.length > 0, r.stdout);

  // The extents tile the whole export in order.
  let pos = 0;
  for (const x of extents) {
    t.is(x.offset, pos, `extent starts where the previous ended: ${JSON.stringify(extents)}`);
    t.true(x.length > 0);
    pos = x.offset + x.length;
  }
  t.is(pos, size, 'extents cover the whole export');

  // Written data must never be reported as a hole or as reading zero.
  for (const x of extents) {
    const overlaps = x.offset < dataOff + dataLen && dataOff < x.offset + x.length;
    if (overlaps) t.is(x.type & 3, 0, `extent ${JSON.stringify(x)} overlaps written data at [${dataOff}, ${dataOff + dataLen}) but is flagged hole/zero`);
  }
  // There is at least one hole/zero region (outside the data) and a data region.
  t.true(
    extents.some((x) => (x.type & 1) === 1 && (x.offset + x.length <= dataOff || x.offset >= dataOff + dataLen)),
    `a hole is reported outside the data: ${JSON.stringify(extents)}`,
  );
  t.true(extents.some((x) => (x.type & 3) === 0), `a data region is reported: ${JSON.stringify(extents)}`);

  // The plain text form says the same.
  const plain = await mustRun('nbdinfo', ['--map', srv.uri], { timeoutSec: 30 });
  t.regex(plain.stdout, /hole,zero/);
  t.regex(plain.stdout, /\bdata\b/);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('server exits promptly on SIGTERM after serving clients', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'term.img');
  makeSparseFile(file, 4 * MiB);
  const srv = await startTestServer(t, file);
  await nbdinfoJson(srv.uri);
  t.true(srv.alive(), crashMessage(srv));
  const started = Date.now();
  const code = await srv.stop();
  t.true(code === 0 || code === 143, `exit status after SIGTERM: ${code} (137 = needed SIGKILL after 10 s)\n${srv.output().slice(-4000)}`);
  t.true(Date.now() - started < 10_000, 'exited within 10 s of SIGTERM');
});
