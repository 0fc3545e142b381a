// qemu-io (QEMU's block layer NBD client) against the server.
import test from 'ava';
import path from 'node:path';
import { describeResult, tempDir } from '../helpers/exec.js';
import { startTestServer, logServersOnFailure, crashMessage, type NbdServer } from '../helpers/server.js';
import { qemuIo, parseQemuHexdump, makeSparseFile, MiB } from '../helpers/clients.js';
import type { ExecutionContext } from 'ava';

logServersOnFailure(test);

async function serve(t: ExecutionContext, size = 16 * MiB, readOnly = false): Promise<NbdServer> {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  makeSparseFile(file, size);
  return startTestServer(t, file, { readOnly });
}

/** Runs qemu-io and asserts it succeeded and reported no failed verification or I/O error. */
async function io(t: ExecutionContext, srv: NbdServer, commands: string[]): Promise<string> {
  const r = await qemuIo(srv.uri, commands);
  const bad = /Pattern verification failed|failed:|error/i;
  t.true(r.code === 0 && !bad.test(r.stdout) && !bad.test(r.stderr), describeResult(r));
  return r.stdout;
}

test.serial('write -P then read -P, in the same and in a new connection', async (t) => {
  const srv = await serve(t);
  const out = await io(t, srv, ['write -P 0xab 0 1M', 'read -P 0xab 0 1M', 'read -P 0 1M 1M']);
  t.regex(out, /wrote 1048576\/1048576 bytes at offset 0/);
  t.regex(out, /read 1048576\/1048576 bytes at offset 0/);
  await io(t, srv, ['read -P 0xab 0 1M', 'read -P 0 1M 15M']);
  // A wrong expectation must be caught (guards against a vacuous pattern check).
  const wrong = await qemuIo(srv.uri, ['read -P 0xac 0 4k']);
  t.true(wrong.code !== 0 || /Pattern verification failed/.test(wrong.stdout + wrong.stderr), describeResult(wrong));
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('aio_write / aio_read with several requests in flight, aio_flush', async (t) => {
  const srv = await serve(t);
  const writes: string[] = [];
  const reads: string[] = [];
  for (let i = 0; i < 16; i++) {
    const pat = `0x${(0x50 + i).toString(16)}`;
    writes.push(`aio_write -P ${pat} ${1 * MiB + i * 64 * 1024} 64k`);
    reads.push(`aio_read -P ${pat} ${1 * MiB + i * 64 * 1024} 64k`);
  }
  const out = await io(t, srv, [...writes, 'aio_flush', ...reads, 'aio_flush']);
  t.is((out.match(/wrote 65536\/65536 bytes/g) ?? []).length, 16, out);
  t.is((out.match(/read 65536\/65536 bytes/g) ?? []).length, 16, out);
  // Verify again synchronously over a new connection.
  await io(t, srv, [
    'read -P 0x50 1M 64k',
    `read -P 0x5f ${1 * MiB + 15 * 64 * 1024} 64k`,
    'read -P 0 0 1M',
    `read -P 0 ${2 * MiB} 1M`,
  ]);
  for (let i = 0; i < 16; i++) await io(t, srv, [`read -P 0x${(0x50 + i).toString(16)} ${1 * MiB + i * 64 * 1024} 64k`]);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('aio_write 0x5a 1M 64k + aio_flush, flush, FUA write (write -f)', async (t) => {
  const srv = await serve(t);
  await io(t, srv, ['aio_write -P 0x5a 1M 64k', 'aio_flush', 'flush', 'write -f -P 0x33 4M 64k', 'flush', 'read -P 0x33 4M 64k']);
  await io(t, srv, ['read -P 0x5a 1M 64k', 'read -P 0x33 4M 64k', 'read -P 0 5M 64k']);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('discard, write -z and write -z -u zero exactly their range', async (t) => {
  const srv = await serve(t);
  // Fill 0..4M with a non-zero pattern so zeroing is observable.
  await io(t, srv, ['write -P 0xee 0 4M']);
  // NB: the NBD spec leaves trimmed data unspecified; a file-backed server that punches
  // holes (dve, nbdkit's file plugin) reads zeroes there.
  await io(t, srv, ['discard 0 64k', 'read -P 0 0 64k', 'read -P 0xee 64k 64k']);
  await io(t, srv, ['write -z 2M 128k', 'read -P 0 2M 128k', 'read -P 0xee 1920k 128k', 'read -P 0xee 2176k 128k']);
  await io(t, srv, ['write -z -u 3M 128k', 'read -P 0 3M 128k', 'read -P 0xee 2944k 128k', 'read -P 0xee 3200k 128k']);
  // Unaligned zeroing: [1M+1000, 1M+4000).
  await io(t, srv, ['write -z 1049576 3000', 'read -P 0 1049576 3000', 'read -P 0xee 1M 1000', 'read -P 0xee 1052576 4000']);
  const dump = parseQemuHexdump(await io(t, srv, ['read -v 1049571 10', 'read -v 1052571 10']));
  t.deepEqual(dump, [0xee, 0xee, 0xee, 0xee, 0xee, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xee, 0xee, 0xee, 0xee, 0xee]);
  // Everything persists over a new connection.
  await io(t, srv, ['read -P 0 0 64k', 'read -P 0 2M 128k', 'read -P 0 3M 128k', 'read -P 0xee 1056768 960k', 'read -P 0 4M 12M']);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('512-byte-unaligned writes change exactly the bytes written', async (t) => {
  const srv = await serve(t);
  await io(t, srv, ['write -P 0xab 0 64k', 'write -P 0x11 1000 3000', 'write -P 0x22 4097 1', 'write -f -P 0x33 60001 7']);
  const out = await io(t, srv, ['read -v 990 20', 'read -v 3995 10', 'read -v 4095 4', 'read -v 59999 11']);
  t.deepEqual(parseQemuHexdump(out), [
    ...Array(10).fill(0xab), ...Array(10).fill(0x11), // 990..1009
    ...Array(5).fill(0x11), ...Array(5).fill(0xab), // 3995..4004
    0xab, 0xab, 0x22, 0xab, // 4095..4098
    0xab, 0xab, ...Array(7).fill(0x33), 0xab, 0xab, // 59999..60009
  ]);
  await io(t, srv, ['read -P 0xab 0 1000', 'read -P 0x11 1000 3000', 'read -P 0xab 4000 97', 'read -P 0xab 4098 55903', 'read -P 0 64k 64k']);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('read-only export: writes fail and the data is untouched', async (t) => {
  const srv = await serve(t, 4 * MiB, true);
  const ro = await qemuIo(srv.uri, ['write -P 0xab 0 64k'], { readOnly: true });
  t.not(ro.code, 0, describeResult(ro));
  t.regex(ro.stdout + ro.stderr, /Operation not permitted|read-only|Permission denied/i, describeResult(ro));
  // Opening a read-only export read-write must not succeed either (qemu checks the export flags).
  const rw = await qemuIo(srv.uri, ['write -P 0xab 0 64k']);
  t.not(rw.code, 0, describeResult(rw));
  t.notRegex(rw.stdout, /wrote \d+/, describeResult(rw));
  const check = await qemuIo(srv.uri, ['read -P 0 0 4M'], { readOnly: true });
  t.is(check.code, 0, describeResult(check));
  t.notRegex(check.stdout + check.stderr, /Pattern verification failed/);
  t.true(srv.alive(), crashMessage(srv));
});
