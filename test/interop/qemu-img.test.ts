// qemu-img convert / compare through the server.
import test from 'ava';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { describeResult, mustRun, run, tempDir } from '../helpers/exec.js';
import { startTestServer, logServersOnFailure, crashMessage } from '../helpers/server.js';
import { makeSparseFile, pwriteFile, qemuIo, sha256File, writeRandomFile, MiB } from '../helpers/clients.js';

logServersOnFailure(test);

test.serial('qemu-img convert file → nbd, compare, convert nbd → file, cmp', async (t) => {
  const dir = tempDir(t);
  const size = 48 * MiB;
  // Source: data, holes, explicitly written zeroes and unaligned bits.
  const src = path.join(dir, 'src.img');
  makeSparseFile(src, size);
  pwriteFile(src, 0, randomBytes(4 * MiB));
  pwriteFile(src, 12 * MiB, randomBytes(1 * MiB));
  pwriteFile(src, 16 * MiB, Buffer.alloc(1 * MiB)); // allocated zeroes
  pwriteFile(src, 20 * MiB + 123, randomBytes(777_777));
  pwriteFile(src, size - 4096 - 5, randomBytes(4096 + 5)); // up to the very end
  // Target: filled with garbage, so convert must really write the zero regions too.
  const target = path.join(dir, 'target.img');
  writeRandomFile(target, size);
  const srv = await startTestServer(t, target);

  await mustRun('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, srv.uri], { timeoutSec: 60 });
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, srv.uri], { timeoutSec: 60 });
  t.is(cmp.code, 0, describeResult(cmp));
  t.regex(cmp.stdout, /Images are identical/);

  const out = path.join(dir, 'out.img');
  await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', srv.uri, out], { timeoutSec: 60 });
  const c = await run('cmp', [src, out], { timeoutSec: 30 });
  t.is(c.code, 0, describeResult(c));
  t.is(await sha256File(out), await sha256File(src));

  // compare is not vacuous: one changed byte through the server is noticed.
  const w = await qemuIo(srv.uri, ['write -P 0x01 31457280 1']);
  t.is(w.code, 0, describeResult(w));
  const cmp2 = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, srv.uri], { timeoutSec: 60 });
  t.is(cmp2.code, 1, describeResult(cmp2));
  t.regex(cmp2.stdout, /Content mismatch at offset 31457280/, describeResult(cmp2));
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('qemu-img info and map see the export', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  makeSparseFile(file, 20 * MiB);
  pwriteFile(file, 4 * MiB, randomBytes(2 * MiB));
  const srv = await startTestServer(t, file);
  const info = JSON.parse((await mustRun('qemu-img', ['info', '--output=json', '-f', 'raw', srv.uri], { timeoutSec: 30 })).stdout);
  t.is(info['virtual-size'], 20 * MiB);
  const map: Array<{ start: number; length: number; data: boolean; zero: boolean }> = JSON.parse(
    (await mustRun('qemu-img', ['map', '--output=json', '-f', 'raw', srv.uri], { timeoutSec: 30 })).stdout,
  );
  let pos = 0;
  for (const e of map) {
    t.is(e.start, pos);
    pos += e.length;
    const overlaps = e.start < 6 * MiB && 4 * MiB < e.start + e.length;
    if (overlaps) t.true(e.data && !e.zero, `written range mapped as ${JSON.stringify(e)}`);
  }
  t.is(pos, 20 * MiB);
  t.true(map.some((e) => e.zero), `some range is reported as zero: ${JSON.stringify(map)}`);
  t.true(srv.alive(), crashMessage(srv));
});
