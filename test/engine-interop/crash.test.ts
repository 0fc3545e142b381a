// SIGKILL + restart under fio load loses no acknowledged write. fio (nbd engine,
// randwrite 4k, iodepth 16, crc32c verify headers, no verify pass) writes to a
// mirrored volume and saves its verify state (how many writes it issued and which of
// the last ones completed); the node is SIGKILLed mid-run, restarted on the same state
// directory and configuration, and fio replays the workload in verify-only mode with
// that state: every write fio saw acknowledged must read back. The mirror sides must be
// equal afterwards: a write in flight at the crash may have reached one side only, and
// then the two sides answer the same read differently unless something reconciles them.
// The crash is repeated a few times (each round its own fio seed) to give that window
// a fair chance.
import test from 'ava';
import type { ExecutionContext } from 'ava';
import path from 'node:path';
import { copyFileSync, existsSync, openSync, readFileSync, readSync, closeSync } from 'node:fs';
import { sleep, tempDir } from '../helpers/exec.js';
import { MiB } from '../helpers/clients.js';
import {
  CleanupStack, type EngineNode, type ProcessControl, compareFiles, describeFio, fileDisks, fio, logEngineNodesOnFailure,
  startEngineNode, startTcpRelay, writeEngineConfig,
} from '../helpers/engine-node.js';
import type { VerifyReport } from '../../src/engine/admin-api.js';

logEngineNodesOnFailure(test);

const SIZE = 256 * MiB;
const DEPTH = 16;
const ROUNDS = 10;
const BLOCK = 4096;

/** The header of fio's verify state file (verify-state.h, format 3): depth, writes issued, completions listed. */
function readVerifyState(file: string): { version: number; depth: number; numberio: number; comps: number[] } {
  const b = readFileSync(file);
  const version = Number(b.readBigUInt64LE(0));
  const noComps = Number(b.readBigUInt64LE(24));
  const depth = b.readUInt32LE(32);
  const numberio = Number(b.readBigUInt64LE(40));
  const compsAt = 24 + 8 + 4 + 4 + 8 + 8 + 8 + 48 + 64; // thread_io_list: …, rand state (use64 + 6 x u64), name[64]
  const comps: number[] = [];
  for (let i = 0; i < noComps && compsAt + i * 16 + 16 <= b.length; i++) comps.push(Number(b.readBigUInt64LE(compsAt + i * 16 + 8)));
  return { version, depth, numberio, comps };
}

function readBlock(file: string, offset: number, length = 32): string {
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b.toString('hex');
  } finally {
    closeSync(fd);
  }
}

interface RoundResult {
  round: number;
  issued: number;
  verifiedBlocks: number;
  verifyOk: boolean;
  mismatches: VerifyReport['mismatches'];
  detail: string;
}

/** One crash: fio through a relay, SIGKILL at ≈8000 writes, restart, verify sides, verify-only replay. */
async function crashRound(t: ExecutionContext, cleanup: CleanupStack, o: { dir: string; configPath: string; stateDir: string; name: string; round: number; node: EngineNode }): Promise<{ result: RoundResult; node: EngineNode }> {
  const { dir, name, round } = o;
  const job = `crash${round}`;
  const workload = ['--rw=randwrite', '--bs=4k', `--size=${SIZE}`, '--verify=crc32c', `--randseed=${round * 7919}`];
  // fio reaches the node through a relay that turns the crash's connection reset into an
  // orderly end of stream (see startTcpRelay: fio's nbd engine can hang on a reset).
  const relay = await startTcpRelay(cleanup, o.node.nbdPort);
  const control: ProcessControl = {};
  const hits0 = (await o.node.admin.showVolume(name)).fp.hits;
  const writer = fio(`nbd://127.0.0.1:${relay.port}/${name}`, dir, job, [
    ...workload, `--iodepth=${DEPTH}`, '--do_verify=0', '--verify_state_save=1', '--runtime=40',
  ], 60, control);
  const deadline = Date.now() + 25_000;
  let hits = 0;
  while (Date.now() < deadline) {
    hits = (await o.node.admin.showVolume(name)).fp.hits - hits0;
    if (hits >= 8000) break;
    await sleep(50);
  }
  // Not right after an admin answer (the node would be between NBD batches): somewhere
  // in the middle of its I/O.
  await sleep(3 + Math.random() * 40);
  t.is(await o.node.kill(), 137, 'the node died of SIGKILL');
  // If fio does not notice (see startTcpRelay), SIGTERM makes it end its jobs the normal
  // way and save its state; SIGKILL if even that does not work (the test then fails below).
  let termSent = false;
  let w = await Promise.race([writer, sleep(8000).then(() => null)]);
  if (!w) {
    termSent = true;
    control.signal?.('SIGTERM');
    w = await Promise.race([writer, sleep(5000).then(() => null)]);
    if (!w) control.signal?.('SIGKILL');
    w ??= await writer;
  }
  await relay.close();
  t.not(w.result.code, 0, `fio should fail when its server is killed:\n${describeFio(w)}`);
  const inflight = [...w.result.stderr.matchAll(/write offset=(\d+)/g)].map((m) => Number(m[1]));
  const stateFile = path.join(dir, `local-${job}-0-verify.state`);
  t.true(existsSync(stateFile), `fio saved its verify state (${stateFile}); fio exit ${w.result.code}${termSent ? ' after SIGTERM' : ''}:\n${describeFio(w)}`);
  copyFileSync(stateFile, `${stateFile}.saved`);
  const st = readVerifyState(stateFile);
  t.is(st.depth, DEPTH);
  t.true(st.numberio > 1000 && st.numberio < SIZE / BLOCK, `the kill landed mid-run: ${st.numberio} writes issued of ${SIZE / BLOCK}`);

  // Restart on the same state directory and configuration.
  const node = await startEngineNode(t, cleanup, { configPath: o.configPath, stateDir: o.stateDir });
  const v = await node.admin.showVolume(name);
  t.is(v.sizeBytes, SIZE);

  // Mirror sides after the crash, before anything else touches the volume.
  const rep = await node.admin.verifyVolume(name);
  let detail = '';
  if (rep.mismatches.length > 0) {
    // Which 4 KiB blocks, exactly (both fresh disks hold the sides at the same offsets)?
    const d1 = path.join(dir, 'disks/d1.img');
    const d2 = path.join(dir, 'disks/d2.img');
    const diff = compareFiles(d1, d2, SIZE, 16);
    const blocks = diff.ranges.flatMap((r) => Array.from({ length: r.lengthBytes / BLOCK }, (_, i) => r.offsetBytes + i * BLOCK));
    detail = `${diff.blocks} differing 4 KiB block(s) between d1 and d2: ` + blocks.slice(0, 8).map((b) =>
      `${b} (${inflight.includes(b) ? 'a write in flight at the kill, failed to fio' : 'NOT among the writes fio saw fail'}; d1 ${readBlock(d1, b)} d2 ${readBlock(d2, b)})`).join('; ');
    // Two reads of the same block, one after the other, go to alternate sides.
    const b0 = blocks[0];
    if (b0 !== undefined) {
      const { qemuIo, parseQemuHexdump } = await import('../helpers/clients.js');
      const r = await qemuIo(node.uri(name), [`read -v ${b0} 16`, `read -v ${b0} 16`], { timeoutSec: 30 });
      const bytes = parseQemuHexdump(r.stdout);
      detail += `; the host read ${b0} twice in one session: ${Buffer.from(bytes.slice(0, 16)).toString('hex')} then ${Buffer.from(bytes.slice(16, 32)).toString('hex')}`;
    }
  }

  // Verify-only replay with the saved state. iodepth 1: fio decides which of the last
  // `depth` writes completed by counting verified reads, which only lines up with the
  // write order when one read is in flight at a time.
  const verifier = await fio(node.uri(name), dir, job, [
    ...workload, '--iodepth=1', '--verify_only', '--verify_state_load=1', '--verify_state_save=0', '--verify_fatal=1',
  ], 90);
  const vj = verifier.json?.jobs?.[0];
  const verifiedBlocks = (vj?.read?.io_bytes ?? 0) / BLOCK;
  const verifyOk = verifier.result.code === 0 && vj?.error === 0;
  t.true(verifyOk, `round ${round}: every write fio saw completed must read back after SIGKILL + restart:\n${describeFio(verifier)}`);
  t.true(verifiedBlocks >= st.numberio - DEPTH && verifiedBlocks <= st.numberio, `round ${round}: verified ${verifiedBlocks} blocks of ${st.numberio} issued`);
  const result: RoundResult = { round, issued: st.numberio, verifiedBlocks, verifyOk, mismatches: rep.mismatches, detail };
  t.log(`round ${round}: killed after ${hits} FP I/Os; fio exit ${w.result.code}${termSent ? ' (after SIGTERM)' : ''}, ${st.numberio} writes issued, ${inflight.length} failed in flight; restart: volume ${v.state}; verify mismatches ${JSON.stringify(rep.mismatches)}${detail ? ` — ${detail}` : ''}; verify-only: ${verifiedBlocks} blocks OK=${verifyOk}`);
  return { result, node };
}

test.serial(`SIGKILL under fio randwrite (iodepth 16) on a mirrored volume, restart (x${ROUNDS}): every acknowledged write reads back; mirror sides equal`, async (t) => {
  const started = Date.now();
  const dir = tempDir(t, 'dve-crash-');
  const cleanup = new CleanupStack(t);
  const configPath = writeEngineConfig(dir, { disks: fileDisks(2, '1G') });
  const stateDir = path.join(dir, 'state');
  let node = await startEngineNode(t, cleanup, { configPath, stateDir });
  const name = 'crashvol';
  await node.admin.createVolume({ name, sizeBytes: SIZE, layout: 'mirrored' });

  const results: RoundResult[] = [];
  for (let round = 1; round <= ROUNDS; round++) {
    const r = await crashRound(t, cleanup, { dir, configPath, stateDir, name, round, node });
    node = r.node;
    results.push(r.result);
  }
  const diverged = results.filter((r) => r.mismatches.length > 0);
  t.log(`total ${((Date.now() - started) / 1000).toFixed(1)} s; ${results.length} crashes, sides diverged after ${diverged.length}, every acknowledged write read back after ${results.filter((r) => r.verifyOk).length}`);
  t.true(node.alive());
  t.deepEqual(diverged.map((r) => ({ round: r.round, mismatches: r.mismatches, detail: r.detail })), [],
    'mirror sides differ after SIGKILL + restart: a write in flight at the crash reached one side only, and nothing reconciled the sides on restart');
});
