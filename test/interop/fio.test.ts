// fio's libnbd engine: parallel connections, deep queues, verified random writes.
import test from 'ava';
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { describeResult, run, tempDir } from '../helpers/exec.js';
import { startTestServer, logServersOnFailure, crashMessage } from '../helpers/server.js';
import { makeSparseFile, MiB } from '../helpers/clients.js';
import type { ExecutionContext } from 'ava';

logServersOnFailure(test);

async function fio(t: ExecutionContext, uri: string, outDir: string, name: string, opts: string[]): Promise<any[]> {
  const jsonFile = path.join(outDir, `${name}.json`);
  const r = await run(
    'fio',
    // No verify state files (fio would drop local-NAME-N-verify.state into its cwd); cwd is the temp dir anyway.
    ['--thread', '--ioengine=nbd', `--uri=${uri}`, `--name=${name}`, '--verify_state_save=0', '--output-format=json', `--output=${jsonFile}`, ...opts],
    { timeoutSec: 60, cwd: outDir },
  );
  t.is(r.code, 0, describeResult(r));
  t.notRegex(r.stdout + r.stderr, /verify|bad magic|crc32c|error/i, describeResult(r));
  let parsed: any;
  try {
    // The nbd engine prints "fio: connected to NBD server" lines ahead of the JSON.
    const text = readFileSync(jsonFile, 'utf8');
    parsed = JSON.parse(text.slice(text.indexOf('{')));
  } catch (e) {
    t.fail(`fio JSON output unreadable (${(e as Error).message})\n${describeResult(r)}`);
    return [];
  }
  return parsed.jobs ?? [];
}

test.serial('fio randwrite 4k, iodepth 16, 4 jobs on 4 regions, crc32c verify', async (t) => {
  const dir = tempDir(t);
  const disk = path.join(dir, 'disk.img');
  makeSparseFile(disk, 64 * MiB);
  const srv = await startTestServer(t, disk);
  const jobs = await fio(t, srv.uri, dir, 'randwrite4k', [
    '--rw=randwrite', '--bs=4k', '--iodepth=16', '--numjobs=4', '--offset_increment=16M', '--size=16M',
    '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
  ]);
  t.is(jobs.length, 4, 'one JSON entry per job');
  for (const j of jobs) {
    t.is(j.error, 0, `job ${j.jobname} error`);
    t.is(j.write.io_bytes, 16 * MiB, `job ${j.jobname} wrote its whole region`);
    t.is(j.read.io_bytes, 16 * MiB, `job ${j.jobname} read everything back to verify`);
    t.is(j.write.short_ios ?? 0, 0);
    t.is(j.read.short_ios ?? 0, 0);
  }
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('fio randwrite --bsrange=512-128k (unaligned mixed sizes), crc32c verify', async (t) => {
  const dir = tempDir(t);
  const disk = path.join(dir, 'disk.img');
  makeSparseFile(disk, 32 * MiB);
  const srv = await startTestServer(t, disk);
  const jobs = await fio(t, srv.uri, dir, 'bsrange', [
    '--rw=randwrite', '--bsrange=512-128k', '--iodepth=8', '--numjobs=2', '--offset_increment=16M', '--size=16M',
    '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
  ]);
  t.is(jobs.length, 2);
  for (const j of jobs) {
    t.is(j.error, 0, `job ${j.jobname} error`);
    t.true(j.write.io_bytes > 8 * MiB, `job ${j.jobname} wrote ${j.write.io_bytes} bytes`);
    t.is(j.read.io_bytes, j.write.io_bytes, `job ${j.jobname} verified every byte it wrote`);
    t.true(j.write.total_ios > 100);
  }
  t.true(srv.alive(), crashMessage(srv));
});
