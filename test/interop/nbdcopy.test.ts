// nbdcopy (libnbd) with multi-conn and many requests in flight.
import test from 'ava';
import path from 'node:path';
import { describeResult, mustRun, run, tempDir } from '../helpers/exec.js';
import { startTestServer, logServersOnFailure, crashMessage } from '../helpers/server.js';
import { makeSparseFile, sha256File, writeRandomFile, MiB } from '../helpers/clients.js';

logServersOnFailure(test);

test.serial('nbdcopy --connections=4 --requests=16 file → nbd, nbdcopy nbd → file, sha256 equal', async (t) => {
  const dir = tempDir(t);
  const size = 64 * MiB;
  const src = path.join(dir, 'src.bin');
  const srcSum = writeRandomFile(src, size);
  const disk = path.join(dir, 'disk.img');
  makeSparseFile(disk, size);
  const srv = await startTestServer(t, disk);

  const up = await mustRun('nbdcopy', ['--connections=4', '--requests=16', src, srv.uri], { timeoutSec: 90 });
  t.is(up.code, 0);
  const out = path.join(dir, 'out.bin');
  await mustRun('nbdcopy', ['--connections=4', '--requests=16', srv.uri, out], { timeoutSec: 90 });
  t.is(await sha256File(out), srcSum, 'data read back through the server equals what was written');
  // And a single-connection, synchronous-ish read of the same data agrees.
  const out1 = path.join(dir, 'out1.bin');
  await mustRun('nbdcopy', ['--connections=1', '--requests=1', srv.uri, out1], { timeoutSec: 90 });
  t.is(await sha256File(out1), srcSum);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('nbdcopy of a sparse source zeroes the target regions (write zeroes / trim path)', async (t) => {
  const dir = tempDir(t);
  const size = 32 * MiB;
  const disk = path.join(dir, 'disk.img');
  writeRandomFile(disk, size); // garbage the copy must overwrite, holes included
  const src = path.join(dir, 'sparse.bin');
  makeSparseFile(src, size);
  const srv = await startTestServer(t, disk);

  await mustRun('nbdcopy', ['--connections=4', '--requests=16', src, srv.uri], { timeoutSec: 60 });
  const out = path.join(dir, 'out.bin');
  await mustRun('nbdcopy', [srv.uri, out], { timeoutSec: 60 });
  t.is(await sha256File(out), await sha256File(src), 'the export reads as all zeroes after copying a sparse file');
  const c = await run('cmp', [src, out], { timeoutSec: 30 });
  t.is(c.code, 0, describeResult(c));
  t.true(srv.alive(), crashMessage(srv));
});
