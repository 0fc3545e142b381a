// A real failing mirror side. Disk d2 is a loop device over a file that nbdkit serves
// through its error filter (nbdkit --filter=error file FILE error-file=TRIGGER
// error=EIO), attached with nbdfuse + losetup. A mirrored volume lives on d1 and d2.
// While fio writes (and verifies), TRIGGER appears and every I/O to d2 fails with EIO:
// the host must see no error (writes, reads, flushes), the engine marks d2 failed and
// the volume degraded, and the data reads back correctly. Then TRIGGER goes, d2 comes
// back online, the resync task copies the extents written while it was away (fast
// resync: only those), and verify finds the sides equal.
//
// d2 is a block device that the engine writes through the kernel's page cache, so what
// d2 really holds is checked past the caches too: d2's cached pages are written back and
// dropped (loop device and FUSE file) before reading, and at the end d1's file is
// compared byte for byte with nbdkit's backing file, after the node has stopped and the
// loop device is gone.
//
// Two tests: (1) the failure starts under a pure write load (the brief's scenario);
// (2) the failure is there when the load starts and d2 is uncached, so the engine's
// first read of d2 fails at once: the degrade / resync / verify machinery end to end.
import test from 'ava';
import type { ExecutionContext } from 'ava';
import path from 'node:path';
import { existsSync, writeFileSync, rmSync } from 'node:fs';
import { describeResult, run, sleep, tempDir } from '../helpers/exec.js';
import { makeSparseFile, MiB } from '../helpers/clients.js';
import {
  CleanupStack, attachLoop, compareFiles, describeFio, fio, logEngineNodesOnFailure, qemuIoOk, startEngineNode, startErrorDisk,
  startNbdfuse, volumeOf, waitForTask, writeEngineConfig,
  type EngineNode, type ErrorDisk, type FuseFile, type LoopDevice,
} from '../helpers/engine-node.js';

logEngineNodesOnFailure(test);

const DISK = 512 * MiB;
const SIZE = 128 * MiB;
const E = 4 * MiB;
/** fio writes here while d2 fails: allocation extents 8…15. */
const FIO_OFFSET = 32 * MiB;
const FIO_SIZE = 32 * MiB;
/** Written once more while degraded: extent 25. */
const LATE_OFFSET = 100 * MiB + 64 * 1024;
const VOLUME = 'mirror';

/**
 * Soft checks: every expectation of the scenario is checked and recorded, and the test
 * fails at the end with the whole list, so one run shows everything that went wrong
 * (AVA 6 stops a test at its first failed assertion).
 */
class Findings {
  readonly problems: string[] = [];
  check(ok: boolean, what: string): boolean {
    if (!ok) this.problems.push(what);
    return ok;
  }
  assertNone(t: ExecutionContext): void {
    t.deepEqual(this.problems, [], `${this.problems.length} expectation(s) failed:\n- ${this.problems.join('\n- ')}`);
  }
}

interface Rig {
  dir: string;
  cleanup: CleanupStack;
  errDisk: ErrorDisk;
  fuse: FuseFile;
  loop: LoopDevice;
  backing: string;
  node: EngineNode;
  uri: string;
}

/** nbdkit (error filter) → nbdfuse → loop device as d2, a file as d1, a node, a mirrored volume filled with 0x5a. */
async function setUp(t: ExecutionContext, prefix: string): Promise<Rig> {
  const dir = tempDir(t, prefix);
  const cleanup = new CleanupStack(t);
  const backing = path.join(dir, 'd2-backing.img');
  makeSparseFile(backing, DISK);
  const errDisk = await startErrorDisk(cleanup, dir, backing);
  const fuse = await startNbdfuse(cleanup, errDisk.uri, path.join(dir, 'd2-fuse'), DISK);
  const loop = await attachLoop(cleanup, fuse.file);
  t.log(`d2 is ${loop.dev} over ${fuse.file} over nbdkit ${errDisk.uri}`);
  const configPath = writeEngineConfig(dir, {
    disks: [
      { id: 'd1', path: 'disks/d1.img', size: '512M' },
      { id: 'd2', path: loop.dev },
    ],
  });
  const node = await startEngineNode(t, cleanup, { configPath, stateDir: path.join(dir, 'state') });
  const d2 = (await node.admin.listDisks()).find((d) => d.id === 'd2');
  t.like(d2, { blockDevice: true, state: 'online', sizeBytes: DISK });
  const created = await node.admin.createVolume({ name: VOLUME, sizeBytes: SIZE, layout: 'mirrored', disks: ['d1', 'd2'] });
  t.deepEqual(created.disks, ['d1', 'd2']);
  const uri = node.uri(VOLUME);
  // Baseline on both sides: the whole volume 0x5a, flushed.
  await qemuIoOk(t, uri, [`write -P 0x5a 0 ${SIZE}`, 'flush'], 90);
  t.deepEqual((await node.admin.verifyVolume(VOLUME)).mismatches, [], 'sides equal before the failure');
  return { dir, cleanup, errDisk, fuse, loop, backing, node, uri };
}

/**
 * Write back and drop d2's cached pages, so the next reads of d2 reach nbdkit: the loop
 * device's own cache (blockdev --flushbufs) and the cache of the FUSE file under it
 * (dd iflag=nocache count=0: POSIX_FADV_DONTNEED over the whole file).
 */
async function dropCache(t: ExecutionContext, rig: Rig): Promise<void> {
  const r = await run('blockdev', ['--flushbufs', rig.loop.dev], { timeoutSec: 30 });
  const d = await run('dd', [`if=${rig.fuse.file}`, 'iflag=nocache', 'count=0', 'status=none'], { timeoutSec: 30 });
  t.log(`dropped d2's caches: blockdev --flushbufs ${rig.loop.dev} exit ${r.code}${r.stderr ? ` (${r.stderr.trim()})` : ''}; dd iflag=nocache exit ${d.code}${d.stderr ? ` (${d.stderr.trim()})` : ''}`);
}

/**
 * fio job "degrade": randwrite 4k over the fio range with crc32c verify (and any extra
 * jobs after it); TRIGGER is created once ≈1000 I/Os went through, or before fio starts.
 */
async function fioWithFailure(t: ExecutionContext, f: Findings, rig: Rig, extraJobs: string[], triggerFirst: boolean): Promise<void> {
  if (triggerFirst) writeFileSync(rig.errDisk.trigger, '');
  const hits0 = (await rig.node.admin.showVolume(VOLUME)).fp.hits;
  const job = fio(rig.uri, rig.dir, 'degrade', [
    '--rw=randwrite', '--bs=4k', '--iodepth=8', `--offset=${FIO_OFFSET}`, `--size=${FIO_SIZE}`, '--rate_iops=3000',
    '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0',
    ...extraJobs,
  ], 90);
  if (!triggerFirst) {
    const deadline = Date.now() + 20_000;
    while ((await rig.node.admin.showVolume(VOLUME)).fp.hits - hits0 < 1000 && Date.now() < deadline) await sleep(50);
    writeFileSync(rig.errDisk.trigger, '');
  }
  const triggeredAt = Date.now();
  const r = await job;
  if (!triggerFirst) t.true(Date.now() - triggeredAt > 300, 'fio was still running after the trigger');
  const jobs: any[] = r.json?.jobs ?? [];
  const j = jobs[0];
  f.check(r.result.code === 0 && jobs.length > 0 && jobs.every((x) => x.error === 0) && !/verify:|bad magic|crc32c|error/i.test(r.result.stdout + r.result.stderr),
    `fio must see no error while d2 fails:\n${describeFio(r)}`);
  f.check(j?.write?.io_bytes === FIO_SIZE && j?.read?.io_bytes === FIO_SIZE, `fio wrote and verified its whole range: ${describeFio(r)}`);
  t.log(`fio: ${jobs.map((x) => `${x.jobname} wrote ${x.write?.io_bytes} read ${x.read?.io_bytes}`).join('; ')}; nbdkit injected ${(rig.errDisk.output().match(/injecting EIO/g) ?? []).length} errors so far`);
}

/** fio --verify_only over the fio range (reads alternate between live sides). */
async function verifyFioRange(t: ExecutionContext, f: Findings, rig: Rig, what: string): Promise<void> {
  const v = await fio(rig.uri, rig.dir, 'degrade', [
    '--rw=randwrite', '--bs=4k', '--iodepth=8', `--offset=${FIO_OFFSET}`, `--size=${FIO_SIZE}`,
    '--verify=crc32c', '--verify_only', '--verify_fatal=0', '--verify_state_save=0',
  ], 60);
  const bad = (v.result.stdout + v.result.stderr).split('\n').filter((l) => /verify:|bad magic|crc32c/i.test(l));
  t.log(`${what}: fio --verify_only over the range written while d2 failed: exit ${v.result.code}, ${bad.length} bad blocks reported`);
  f.check(v.result.code === 0, `${what}: fio --verify_only over the range written while d2 failed: exit ${v.result.code}, ${bad.length} bad blocks reported, e.g.\n${bad.slice(0, 6).join('\n')}`);
}

/** Online d2, wait for its resync; returns the finished task or null when none was started. */
/**
 * `failedAt`: 'io' when the engine saw d2's error on an I/O (it then knows exactly which
 * extents d2 missed: only those are copied); 'flush' when the error only showed at
 * write-back (a buffered block device): writes since d2's last good flush may be lost
 * anywhere in the activity log, so the resync copies those extents, up to the volume.
 */
async function onlineAndResync(t: ExecutionContext, f: Findings, rig: Rig, failedAt: 'io' | 'flush' = 'io'): Promise<{ doneBytes: number; totalBytes: number } | null> {
  if (existsSync(rig.errDisk.trigger)) rmSync(rig.errDisk.trigger);
  const task = await rig.node.admin.onlineDisk('d2');
  if (!f.check(task !== null, `POST /v1/disks/d2/online started no resync task (answer ${JSON.stringify(task)})`)) return null;
  const done = await waitForTask(rig.node.admin, task!.id, 60_000);
  f.check(done.state === 'done', `resync task: ${JSON.stringify(done)}`);
  const dirtiedExtents = FIO_SIZE / E + 1; // extents 8…15 and the late write's extent 25
  t.log(`resync: copied ${done.doneBytes} bytes (${done.doneBytes / MiB} MiB) of a ${SIZE / MiB} MiB volume (${((100 * done.doneBytes) / SIZE).toFixed(1)}%); totalBytes ${done.totalBytes}; extents written while degraded: ${dirtiedExtents} (${(dirtiedExtents * E) / MiB} MiB); ${done.startedAt} → ${done.finishedAt}`);
  f.check(done.doneBytes > 0, 'the resync copied nothing');
  if (failedAt === 'io') f.check(done.doneBytes <= dirtiedExtents * E, `fast resync copies only extents written while degraded: ${done.doneBytes} > ${dirtiedExtents * E}`);
  else f.check(done.doneBytes <= SIZE, `resync copies at most the volume: ${done.doneBytes} > ${SIZE}`);
  return done;
}

/** Stop the node, detach d2 (writing back the loop device's cache), compare d1 with nbdkit's backing file. */
async function compareDisksAtRest(t: ExecutionContext, f: Findings, rig: Rig): Promise<void> {
  t.is(await rig.node.stop(), 0, 'node stopped cleanly');
  await rig.loop.detach();
  await rig.fuse.unmount();
  const d1 = path.join(rig.dir, 'disks/d1.img');
  const diff = compareFiles(d1, rig.backing, SIZE);
  t.log(`d1 vs d2's backing file over the volume's ${SIZE / MiB} MiB: ${diff.blocks} 4 KiB blocks differ ${JSON.stringify(diff.ranges)}`);
  f.check(diff.blocks === 0, `d1 and d2's backing file must hold the same volume bytes (both fresh disks place the sides at the same offsets): ${diff.blocks} 4 KiB blocks (${(diff.blocks * 4) / 1024} MiB) differ, first ranges ${JSON.stringify(diff.ranges)}`);
}

test.serial('mirror side failing with EIO under fio randwrite: no host error (writes, flush), d2 failed, degraded, data intact past the cache; online → fast resync; verify clean', async (t) => {
  const started = Date.now();
  const f = new Findings();
  const rig = await setUp(t, 'dve-mirror-fail-w-');
  await fioWithFailure(t, f, rig, [], false);

  // A host flush while d2 fails: must succeed (one live side holds everything).
  const fl = await run('qemu-io', ['-f', 'raw', rig.uri, '-c', 'flush'], { timeoutSec: 30 });
  t.log(`host FLUSH while d2 fails: exit ${fl.code}`);
  f.check(fl.code === 0 && !/error|fail/i.test(fl.stdout + fl.stderr), `host FLUSH while d2 fails returned an error:\n${describeResult(fl)}\nnode log: ${rig.node.output().split('\n').filter((l) => /FLUSH/.test(l)).join('\n')}`);

  // The engine noticed: d2 failed, the volume degraded.
  let status = await rig.node.admin.status();
  const d2State = status.disks.find((d) => d.id === 'd2')?.state;
  t.log(`after fio and a flush: d2 ${d2State}, volume ${volumeOf(status, VOLUME).state}; nbdkit injected ${(rig.errDisk.output().match(/injecting EIO/g) ?? []).length} errors`);
  f.check(d2State === 'failed', `d2 state after writes and a flush to a failing d2 is ${d2State}, expected failed`);
  f.check(volumeOf(status, VOLUME).state === 'degraded', `volume state is ${volumeOf(status, VOLUME).state}, expected degraded`);

  // More host I/O while d2 fails: writes and a flush succeed, old data reads back.
  const late = await run('qemu-io', ['-f', 'raw', rig.uri, '-c', `write -P 0xc3 ${LATE_OFFSET} ${MiB}`, '-c', 'flush'], { timeoutSec: 30 });
  f.check(late.code === 0 && !/error|fail/i.test(late.stdout + late.stderr), `write + flush while degraded:\n${describeResult(late)}`);
  // What the host reads must not depend on d2's page cache.
  await dropCache(t, rig);
  await verifyFioRange(t, f, rig, 'while d2 fails (d2 page cache dropped)');
  const reads = await run('qemu-io', ['-f', 'raw', rig.uri,
    '-c', `read -P 0x5a 0 ${FIO_OFFSET}`,
    '-c', `read -P 0x5a ${FIO_OFFSET + FIO_SIZE} ${LATE_OFFSET - FIO_OFFSET - FIO_SIZE}`,
    '-c', `read -P 0xc3 ${LATE_OFFSET} ${MiB}`], { timeoutSec: 30 });
  f.check(reads.code === 0 && !/error|fail/i.test(reads.stdout + reads.stderr), `pattern reads while d2 fails:\n${describeResult(reads)}`);

  // d2 heals and comes back: fast resync, then the sides are equal.
  await onlineAndResync(t, f, rig, 'flush');
  status = await rig.node.admin.status();
  f.check(volumeOf(status, VOLUME).state === 'ok', `volume state after online: ${volumeOf(status, VOLUME).state}`);
  await dropCache(t, rig);
  const rep = await rig.node.admin.verifyVolume(VOLUME);
  t.log(`verify after d2 came back (d2 page cache dropped): ${JSON.stringify(rep.mismatches)}`);
  f.check(rep.mismatches.length === 0, `verify after d2 came back (d2's page cache dropped): mismatches ${JSON.stringify(rep.mismatches)}`);
  await verifyFioRange(t, f, rig, 'after d2 came back');
  await compareDisksAtRest(t, f, rig);
  t.log(`total ${((Date.now() - started) / 1000).toFixed(1)} s`);
  f.assertNone(t);
});

test.serial('mirror side failing with EIO seen on reads (d2 uncached) under fio randwrite + randread: no host error, degraded, data intact; online → fast resync copies only dirtied extents; verify clean', async (t) => {
  const started = Date.now();
  const f = new Findings();
  const rig = await setUp(t, 'dve-mirror-fail-rw-');
  // Nothing of d2 in the page cache and TRIGGER there before the load starts: the first
  // read of d2 reaches nbdkit and fails, so the engine sees the failure at once.
  await dropCache(t, rig);
  // Beside the writer, a reader over the untouched start of the volume (reads alternate sides).
  await fioWithFailure(t, f, rig, ['--name=reader', '--rw=randread', '--bs=4k', '--iodepth=4', '--offset=0', `--size=${8 * MiB}`, '--rate_iops=1000'], true);
  t.regex(rig.errDisk.output(), /injecting EIO/, 'nbdkit injected errors');

  let status = await rig.node.admin.status();
  f.check(status.disks.find((d) => d.id === 'd2')?.state === 'failed', `d2 state: ${JSON.stringify(status.disks.map((d) => [d.id, d.state]))}`);
  f.check(status.disks.find((d) => d.id === 'd1')?.state === 'online', 'd1 online');
  f.check(volumeOf(status, VOLUME).state === 'degraded', `volume state ${volumeOf(status, VOLUME).state}`);
  f.check(/disk failed, mirror degraded/.test(rig.node.output()), 'the node logged the degradation');

  // More host I/O while degraded: writes and a flush succeed, everything reads back.
  await qemuIoOk(t, rig.uri, [`write -P 0xc3 ${LATE_OFFSET} ${MiB}`, 'flush']);
  await verifyFioRange(t, f, rig, 'degraded');
  await qemuIoOk(t, rig.uri, [
    `read -P 0x5a 0 ${FIO_OFFSET}`,
    `read -P 0x5a ${FIO_OFFSET + FIO_SIZE} ${LATE_OFFSET - FIO_OFFSET - FIO_SIZE}`,
    `read -P 0xc3 ${LATE_OFFSET} ${MiB}`,
    `read -P 0x5a ${LATE_OFFSET + MiB} ${SIZE - LATE_OFFSET - MiB}`,
  ]);

  const done = await onlineAndResync(t, f, rig);
  if (done) f.check(done.doneBytes >= MiB, 'the resync copied at least the late write');
  status = await rig.node.admin.status();
  f.check(status.disks.find((d) => d.id === 'd2')?.state === 'online', 'd2 online after online');
  f.check(volumeOf(status, VOLUME).state === 'ok', `volume state after the resync: ${volumeOf(status, VOLUME).state}`);
  await dropCache(t, rig);
  const rep = await rig.node.admin.verifyVolume(VOLUME);
  f.check(rep.mismatches.length === 0 && rep.comparedBytes === SIZE, `verify after the resync (d2's page cache dropped): ${JSON.stringify(rep)}`);
  await verifyFioRange(t, f, rig, 'after resync');
  await qemuIoOk(t, rig.uri, [`read -P 0x5a 0 ${FIO_OFFSET}`, `read -P 0xc3 ${LATE_OFFSET} ${MiB}`]);
  await compareDisksAtRest(t, f, rig);
  t.log(`total ${((Date.now() - started) / 1000).toFixed(1)} s`);
  f.assertNone(t);
});
