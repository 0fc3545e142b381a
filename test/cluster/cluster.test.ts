// A real 3-node cluster (test/helpers/cluster.ts): three `dve node start` processes on
// loopback sharing two sparse disk files and a metadata file, heartbeat 200 ms, peer
// timeout 1.5 s. The tests share the cluster and run in order; each starts by bringing
// every node up and waiting until all three see each other joined, so one failure does
// not cascade.
//
//   0. nodes started together on fresh files agree on the disks
//   1. data written through node 1 reads back identically through nodes 2 and 3
//   2. a volume created through node 2 shows up in nodes 1 and 3 (exported by 1, 2, 3)
//   3. fio --verify=crc32c through two nodes at once into interleaved 64 KiB zones of
//      the same extents of one mirrored volume; cross-node verify; mirror sides agree
//   4. SIGKILL of a node holding mirror-write oplocks under fio from it and from node 1:
//      eviction time, survivors keep serving, reconciliation, no acknowledged write of
//      the dead node lost, sides agree; the restarted node rejoins and serves
//   5. a node with the wrong cluster secret is refused and never joins; the right one does
//   6. garbage and oversized frames on every mesh port: every node keeps serving
//   7. admin CLI errors against the cluster (--node 9)
import test, { type ExecutionContext } from 'ava';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { describeResult, mustRun, sleep } from '../helpers/exec.js';
import { MiB, KiB, nbdinfoJson, qemuIo, sha256 } from '../helpers/clients.js';
import { CleanupStack, describeFio, fio, startTcpRelay, type FioRun, type ProcessControl } from '../helpers/engine-node.js';
import { ClusterRig, summarizeNodes, type LogLine } from '../helpers/cluster.js';
import type { NodeStatus, VerifyReport } from '../../src/engine/admin-api.js';

const HEARTBEAT = 200;
const PEER_TIMEOUT = 1500;
const fileStarted = Date.now();
let rig: ClusterRig;

test.before(async (t) => {
  const t0 = Date.now();
  rig = await ClusterRig.create({ nodes: 3, heartbeatMs: HEARTBEAT, peerTimeoutMs: PEER_TIMEOUT, prefix: 'dve-cluster-test-' });
  await rig.startAll();
  const serving = Date.now() - t0;
  const joined = await rig.waitAllJoined();
  t.log(`3 nodes serving after ${serving} ms, all joined ${joined} ms later (${rig.dir})`);
});

test.after.always(async () => {
  if (rig) await rig.close();
});

test.afterEach.always((t) => {
  if (!t.passed && rig) t.log(rig.describe(80));
});

test.after((t) => {
  t.log(`whole file: ${((Date.now() - fileStarted) / 1000).toFixed(1)} s`);
});

function fioDir(name: string): string {
  const d = path.join(rig.dir, 'fio', name);
  mkdirSync(d, { recursive: true });
  return d;
}

async function createVolume(t: ExecutionContext, name: string, size: string, via: number): Promise<void> {
  const r = await rig.cli(['volume', 'create', name, '--size', size, '--layout', 'mirrored'], { node: via });
  t.is(r.code, 0, describeResult(r));
  t.regex(r.stdout, new RegExp(`created volume ${name}`), describeResult(r));
}

/** `dve volume verify NAME --json` through node `via`: the report, and that the text form says the sides agree. */
async function verifySides(t: ExecutionContext, name: string, via: number, sizeBytes: number): Promise<VerifyReport> {
  const rep = await rig.cliJson<VerifyReport>(['volume', 'verify', name], { node: via, timeoutSec: 120 });
  t.deepEqual(rep.mismatches, [], `volume ${name}: mirror sides differ: ${JSON.stringify(rep.mismatches.slice(0, 8))}`);
  t.is(rep.comparedBytes, sizeBytes, `volume ${name}: every byte compared`);
  const text = await rig.cli(['volume', 'verify', name], { node: via, timeoutSec: 120 });
  t.is(text.code, 0, describeResult(text));
  t.regex(text.stdout, /mirror sides agree/, describeResult(text));
  return rep;
}

/** Reads a whole export into a file with nbdcopy; returns the file's bytes. */
async function readAll(uri: string, file: string): Promise<Buffer> {
  await mustRun('nbdcopy', [uri, file], { timeoutSec: 60 });
  return readFileSync(file);
}

function fioJob(r: FioRun): any {
  return r.json?.jobs?.[0] ?? null;
}

function fioOk(t: ExecutionContext, r: FioRun, what: string): void {
  const j = fioJob(r);
  t.is(r.result.code, 0, `${what}:\n${describeFio(r)}`);
  t.is(j?.error, 0, `${what}: err=${j?.error}\n${describeFio(r)}`);
}

// ---------------------------------------------------------------- 0

test.serial('three nodes started at once on fresh files: every node sees both disks at their configured size', async (t) => {
  // The nodes of the before hook were started together on disk files that did not
  // exist yet, so they raced to create them.
  const views = await Promise.all(rig.ids.map((id) => rig.status(id)));
  for (const [i, s] of views.entries()) {
    t.deepEqual(s.disks.map((d) => ({ id: d.id, state: d.state, extents: d.extents })),
      [{ id: 'd1', state: 'online', extents: 256 }, { id: 'd2', state: 'online', extents: 256 }],
      `node ${i + 1}'s view of the disks (1 GiB files, 4 MiB extents)`);
  }
});

// ---------------------------------------------------------------- 1

test.serial('data written through node 1 reads back identically through nodes 2 and 3', async (t) => {
  await rig.ensureAllJoined();
  const name = 'shared1';
  const size = 32 * MiB;
  await createVolume(t, name, '32M', 1);
  const dir = fioDir('t1');
  // Random data over the whole volume (8 extents), then a qemu-io pattern write on top.
  const data = randomBytes(size);
  const src = path.join(dir, 'src.img');
  writeFileSync(src, data);
  let t0 = Date.now();
  await mustRun('nbdcopy', ['--flush', src, rig.uri(1, name)], { timeoutSec: 60 });
  const wroteMs = Date.now() - t0;
  // Two patterns, each straddling a 4 MiB extent boundary.
  const patOff = 3 * MiB + 4 * KiB;
  const patLen = 2 * MiB;
  const pat2Off = 8 * MiB - 64 * KiB;
  const pat2Len = 128 * KiB;
  const w = await qemuIo(rig.uri(1, name), [`write -P 0x5a ${patOff} ${patLen}`, `write -P 0xc3 ${pat2Off} ${pat2Len}`, 'flush']);
  t.is(w.code, 0, describeResult(w));
  t.notRegex(w.stdout + w.stderr, /fail|error/i, describeResult(w));
  data.fill(0x5a, patOff, patOff + patLen);
  data.fill(0xc3, pat2Off, pat2Off + pat2Len);
  const want = sha256(data);

  for (const id of [2, 3, 1]) {
    t0 = Date.now();
    const got = await readAll(rig.uri(id, name), path.join(dir, `read-${id}.img`));
    t.is(got.length, size);
    t.is(sha256(got), want, `the bytes read through node ${id} differ from what was written through node 1`);
    const r = await qemuIo(rig.uri(id, name), [`read -P 0x5a ${patOff} ${patLen}`, `read -P 0xc3 ${pat2Off} ${pat2Len}`], { readOnly: true });
    t.is(r.code, 0, describeResult(r));
    t.notRegex(r.stdout + r.stderr, /fail|error|mismatch/i, `node ${id}: ${describeResult(r)}`);
    t.log(`node ${id}: read 32 MiB in ${Date.now() - t0} ms, sha256 matches`);
  }
  t.log(`wrote 32 MiB through node 1 in ${wroteMs} ms`);
});

// ---------------------------------------------------------------- 2

test.serial('a volume created through node 2 appears in the status of nodes 1 and 3, exported by nodes 1, 2, 3', async (t) => {
  await rig.ensureAllJoined();
  const name = 'made-on-2';
  const t0 = Date.now();
  await createVolume(t, name, '64M', 2);
  for (const id of [1, 3]) {
    const deadline = Date.now() + 10_000;
    let s: NodeStatus | null = null;
    for (;;) {
      // The CLI, as an operator runs it: `dve status --json --node N`.
      s = await rig.cliJson<NodeStatus>(['status'], { node: id });
      const v = s.volumes.find((x) => x.name === name);
      if (v && JSON.stringify(v.nodes) === '[1,2,3]') break;
      if (Date.now() > deadline) break;
      await sleep(100);
    }
    const v = s!.volumes.find((x) => x.name === name);
    t.truthy(v, `node ${id}'s status lists no volume ${name}: ${s!.volumes.map((x) => x.name).join(', ')}`);
    t.deepEqual(v?.nodes, [1, 2, 3], `node ${id}: volume ${name} exported by`);
    t.is(v?.sizeBytes, 64 * MiB);
    t.is(v?.layout, 'mirrored');
    t.is(s!.nodes.find((n) => n.id === id)?.state, 'online');
    t.log(`node ${id} lists ${name} with nodes [${v?.nodes}] ${Date.now() - t0} ms after the create`);
  }
  for (const id of [1, 2, 3]) {
    const info = await nbdinfoJson(rig.uri(id, name));
    t.is(info.exports?.[0]?.['export-size'], 64 * MiB, `nbdinfo through node ${id}`);
  }
});

// ---------------------------------------------------------------- 3

test.serial('fio --verify=crc32c through nodes 1 and 2 at once, interleaved 64 KiB zones of the same extents: both verify, sides agree', async (t) => {
  await rig.ensureAllJoined();
  const name = 'fio2';
  await createVolume(t, name, '64M', 1);
  const dir = fioDir('t3');
  // Sequential writes in 64 KiB zones every 128 KiB: job a writes [0,64K), [128K,192K) …,
  // job b (offset 64K) the zones between, so both walk the same 4 MiB extents at the
  // same time. (With rw=randwrite, zonerange=128k would spread each job's offsets over
  // the whole 128 KiB, and the two jobs would overwrite each other's blocks.)
  const workload = (offset: string) => ['--rw=write', '--bs=4k', '--size=16m', `--offset=${offset}`, '--zonemode=strided', '--zonesize=64k',
    '--zonerange=128k', '--verify=crc32c', '--verify_fatal=1'];
  const t0 = Date.now();
  const [a, b] = await Promise.all([
    fio(rig.uri(1, name), dir, 'zone-a', [...workload('0'), '--iodepth=8'], 120),
    fio(rig.uri(2, name), dir, 'zone-b', [...workload('64k'), '--iodepth=8'], 120),
  ]);
  const ms = Date.now() - t0;
  fioOk(t, a, 'fio through node 1');
  fioOk(t, b, 'fio through node 2');
  t.is(fioJob(a)?.write?.io_bytes, 16 * MiB);
  t.is(fioJob(b)?.write?.io_bytes, 16 * MiB);
  t.log(`two fio jobs (16 MiB each, verified) through nodes 1 and 2: ${ms} ms`);
  // Each job's data read back and verified through the third node.
  const t1 = Date.now();
  const [va, vb] = await Promise.all([
    fio(rig.uri(3, name), dir, 'zone-a', [...workload('0'), '--verify_only', '--iodepth=8'], 120),
    fio(rig.uri(3, name), dir, 'zone-b', [...workload('64k'), '--verify_only', '--iodepth=8'], 120),
  ]);
  fioOk(t, va, 'verify-only of job a through node 3');
  fioOk(t, vb, 'verify-only of job b through node 3');
  t.is(fioJob(va)?.read?.io_bytes, 16 * MiB, describeFio(va));
  t.is(fioJob(vb)?.read?.io_bytes, 16 * MiB, describeFio(vb));
  t.log(`both jobs verified through node 3: ${Date.now() - t1} ms`);
  await verifySides(t, name, 3, 64 * MiB);
});

// ---------------------------------------------------------------- 4

/** The header of fio's verify state file (verify-state.h, format 3): depth, writes issued. */
function readVerifyState(file: string): { depth: number; numberio: number } {
  const b = readFileSync(file);
  return { depth: b.readUInt32LE(32), numberio: Number(b.readBigUInt64LE(40)) };
}

test.serial('SIGKILL of a node holding mirror-write oplocks under fio: evicted in time, survivors serve, extents reconciled, no acknowledged write lost; it rejoins', async (t) => {
  await rig.ensureAllJoined();
  const cleanup = new CleanupStack(t);
  const name = 'kill4';
  const size = 64 * MiB;
  await createVolume(t, name, '64M', 1);
  const dir = fioDir('t4');
  const before1 = await rig.status(1);
  const evictionsBefore = before1.cluster?.recovery.evictions ?? 0;
  const reconciledBefore = before1.cluster?.recovery.reconciledExtents ?? 0;
  // Random 4 KiB writes in interleaved 64 KiB zones (a: even zones through node 1, b:
  // odd zones through node 2; fio's strided mode finishes one zone before the next, so
  // both walk extents 0, 1, 2 … together and pass their mirror-write oplocks back and
  // forth), paced so that both still write when node 2 dies and after it is evicted.
  // A second job through node 2 (b2) keeps writing extent 10, which nobody else
  // touches: node 2 holds that extent's oplock (a record in its journal) until it dies,
  // so the evictor has at least that extent to reconcile, whatever the ping-pong of
  // the shared ones was at the kill. (Status counts a node's records over all volumes,
  // and node 2 may still hold some of earlier tests' volumes: not a usable signal.)
  const SOLO_EXTENT = 10;
  const zones = ['--rw=randwrite', '--bs=4k', '--zonemode=strided', '--zonesize=64k', '--zonerange=64k', '--zoneskip=64k', '--verify=crc32c'];
  const jobA = [...zones, '--size=8m', '--offset=0', '--randseed=4711', '--iodepth=8', '--rate=2m', '--verify_fatal=1'];
  const jobB = [...zones, '--size=12m', '--offset=64k', '--randseed=815', '--iodepth=8'];
  const jobB2 = ['--rw=randwrite', '--bs=4k', '--size=4m', `--offset=${SOLO_EXTENT * 4}m`, '--randseed=99', '--iodepth=4', '--verify=crc32c'];
  // The writer's per-job options; a verify-only replay of the same jobs uses the same.
  const jobsB = (extra: string[], writer = false) => [...jobB, ...(writer ? ['--rate=2m'] : []), ...extra, '--name=dead-b2', ...jobB2,
    ...(writer ? ['--rate=512k'] : []), ...extra];
  // fio b reaches node 2 through a relay that turns the crash's connection reset into an
  // orderly end of stream (fio's nbd engine can hang on a reset; see startTcpRelay).
  const relay = await startTcpRelay(cleanup, rig.portsOf(2).nbd);
  const control: ProcessControl = {};
  const mark1 = rig.mark(1);
  const writerA = fio(rig.uri(1, name), dir, 'surv-a', jobA, 120);
  const writerB = fio(`nbd://127.0.0.1:${relay.port}/${name}`, dir, 'dead-b', jobsB(['--do_verify=0', '--verify_state_save=1'], true), 120, control);

  // Kill node 2 1.5 s into the runs, once both nodes' fast paths served writes of the
  // volume and node 2 holds mirror-write oplocks (records in its journal).
  const startedAt = Date.now();
  const deadline = startedAt + 15_000;
  let ready = false;
  let self2: NodeStatus['nodes'][number] | undefined;
  let hits = [0, 0];
  await sleep(1500);
  while (Date.now() < deadline) {
    try {
      hits = [(await rig.admin(1).showVolume(name)).fp.hits, (await rig.admin(2).showVolume(name)).fp.hits];
      self2 = (await rig.status(2)).nodes.find((n) => n.id === 2);
      ready = hits[0]! > 0 && hits[1]! > 0 && (self2?.journalRecords ?? 0) > 0;
    } catch {
      ready = false;
    }
    if (ready) break;
    await sleep(20);
  }
  t.true(ready, `node 2 never served writes of ${name} and held mirror-write oplocks under fio: fp hits ${hits}, ${JSON.stringify(self2)}`);
  const killedAt = Date.now();
  const code = await rig.kill(2);
  t.is(code, 137, 'node 2 died of SIGKILL');
  t.log(`killed node 2 ${killedAt - startedAt} ms into the fio runs (FP hits: node 1 ${hits[0]}, node 2 ${hits[1]}), holding ${self2?.journalRecords} journal record(s) (all volumes), oplocks ${JSON.stringify(self2?.oplocks)}`);

  // Nodes 1 and 3 both report node 2 evicted within peerTimeout + 3 s of the kill.
  const limit = PEER_TIMEOUT + 3000;
  const seen = await Promise.all([1, 3].map(async (obs) => {
    await rig.waitFor(obs, 'node 2 evicted', (s) => ClusterRig.stateOf(s, 2) === 'evicted' || `node 2 is ${ClusterRig.stateOf(s, 2)}`, limit + 5000, 25);
    return Date.now() - killedAt;
  }));
  t.log(`node 2 evicted in the view of node 1 after ${seen[0]} ms, of node 3 after ${seen[1]} ms (limit ${limit} ms)`);
  for (const [i, obs] of [1, 3].entries()) t.true(seen[i]! <= limit, `node ${obs} saw node 2 evicted only after ${seen[i]} ms`);

  // fio through node 1 finishes: every write verified.
  const a = await writerA;
  fioOk(t, a, 'fio through node 1 (the survivor), across the eviction');
  t.is(fioJob(a)?.write?.io_bytes, 8 * MiB, describeFio(a));
  t.log(`fio through node 1 done ${Date.now() - killedAt} ms after the kill (${Math.round((fioJob(a)?.job_runtime ?? 0))} ms runtime), err=${fioJob(a)?.error}`);

  // fio through the dead node ends (its relay ends the stream); SIGTERM if it does not notice.
  let b = await Promise.race([writerB, sleep(8000).then(() => null)]);
  if (!b) {
    control.signal?.('SIGTERM');
    b = await Promise.race([writerB, sleep(5000).then(() => null)]);
    if (!b) control.signal?.('SIGKILL');
    b ??= await writerB;
  }
  await relay.close();

  // The evictor (node 1, the lowest live id) logged the eviction as its own and reconciled
  // the dead node's mirror extents.
  const evicted = rig.grep(1, 'peer evicted', { since: mark1, filter: (l: LogLine) => l.node === 2 && l.mine === true });
  t.true(evicted.length >= 1, 'node 1 logged "peer evicted" for node 2 as the evictor');
  const reconciled = await rig.waitForLog(1, 'mirror extent reconciled', { since: mark1, filter: (l) => l.volume === name && l.extent === SOLO_EXTENT, timeoutMs: 10_000 })
    .catch(() => [] as LogLine[]);
  t.true(reconciled.length >= 1, `node 1 logged "mirror extent reconciled" for extent ${SOLO_EXTENT} of ${name}, which node 2 held when it died`);
  const s1 = await rig.status(1);
  t.is(s1.cluster?.evictor, 1);
  t.true((s1.cluster?.recovery.evictions ?? 0) > evictionsBefore, `node 1 counts the eviction: ${JSON.stringify(s1.cluster?.recovery)}`);
  const all = rig.grep(1, 'mirror extent reconciled', { since: mark1 });
  t.is((s1.cluster?.recovery.reconciledExtents ?? 0) - reconciledBefore, all.length, `node 1 counts the extents it reconciled: ${JSON.stringify(s1.cluster?.recovery)}`);
  t.log(`evictor node 1: node 2 evicted with ${String(evicted[0]?.records)} record(s); reconciled ${all.map((l) => `${String(l.volume)}[${String(l.extent)}]`).join(' ')}`);

  // Every write fio saw node 2 acknowledge before it died reads back through node 1.
  const stateFiles = ['local-dead-b-0-verify.state', 'local-dead-b2-1-verify.state'].map((f) => path.join(dir, f));
  for (const f of stateFiles) t.true(existsSync(f), `fio b saved its verify state ${path.basename(f)}:\n${describeFio(b)}`);
  if (stateFiles.every((f) => existsSync(f))) {
    const issued = stateFiles.map((f) => readVerifyState(f).numberio);
    t.true(issued[0]! > 0 && issued[0]! < (12 * MiB) / (4 * KiB), `fio b was killed mid-run: ${issued[0]} writes issued`);
    t.true(issued[1]! > 0, `fio b2 wrote before the kill: ${issued[1]} writes issued`);
    const v = await fio(rig.uri(1, name), dir, 'dead-b', jobsB(['--iodepth=1', '--verify_only', '--verify_state_load=1', '--verify_state_save=0', '--verify_fatal=1']), 60);
    const bad = (v.json?.jobs ?? []).filter((j: any) => j.error !== 0);
    t.true(v.result.code === 0 && (v.json?.jobs?.length ?? 0) === 2 && bad.length === 0, `node 2's acknowledged writes read back through node 1:\n${describeFio(v)}`);
    const verified = (v.json?.jobs ?? []).map((j: any) => (j.read?.io_bytes ?? 0) / 4096);
    t.log(`fio through node 2: ${issued.join(' + ')} writes issued before the kill (exit ${b.result.code}); ${verified.join(' + ')} blocks verified through node 1`);
  }

  await verifySides(t, name, 1, size);

  // Node 2 comes back: joined again in everyone's view, and serves reads.
  const r0 = Date.now();
  await rig.start(2);
  const served = Date.now() - r0;
  const joinedMs = await rig.waitAllJoined();
  t.log(`node 2 restarted: serving after ${served} ms, joined in every view ${joinedMs} ms later`);
  const info = await nbdinfoJson(rig.uri(2, name));
  t.is(info.exports?.[0]?.['export-size'], size);
  const via1 = await readAll(rig.uri(1, name), path.join(dir, 'via1.img'));
  const via2 = await readAll(rig.uri(2, name), path.join(dir, 'via2.img'));
  t.is(sha256(via2), sha256(via1), 'node 2 (restarted) reads the same bytes as node 1');
  const q = await qemuIo(rig.uri(2, name), ['read 0 1M'], { readOnly: true });
  t.is(q.code, 0, describeResult(q));
});

// ---------------------------------------------------------------- 5

test.serial('a node with the wrong cluster secret is refused and never joins; with the right secret it joins', async (t) => {
  await rig.ensureAllJoined();
  const pids = [1, 2].map((id) => rig.current(id)!.pid);
  // Node 3 leaves (graceful stop); the others stop seeing it joined.
  t.is(await rig.stop(3), 0, 'node 3 stopped gracefully');
  await Promise.all([1, 2].map((obs) => rig.waitFor(obs, 'node 3 not joined', (s) => ClusterRig.stateOf(s, 3) !== 'joined', 10_000)));
  const badConfig = rig.writeConfig(path.join(rig.dir, 'wrong-secret.yaml'), { secret: `wrong-${rig.secret}` });
  const marks = [1, 2].map((id) => rig.mark(id));
  const t0 = Date.now();
  const bad = await rig.start(3, { configPath: badConfig, wait: false });

  // Watch for 4 s: nodes 1 and 2 never list node 3 as joined.
  const observed: string[] = [];
  while (Date.now() - t0 < 4000) {
    for (const obs of [1, 2]) {
      const s = await rig.status(obs);
      const st = ClusterRig.stateOf(s, 3);
      if (!observed.includes(`${obs}:${st}`)) observed.push(`${obs}:${st}`);
      t.not(st, 'joined', `node ${obs} lists the wrong-secret node 3 as joined: ${summarizeNodes(s)}`);
    }
    await sleep(100);
  }
  const refusal = /proof mismatch from node 3|wrong cluster secret/;
  for (const [i, id] of [1, 2].entries()) {
    const lines = rig.grep(id, /refused/, { since: marks[i], filter: (l) => refusal.test(String(l.reason)) });
    t.true(lines.length >= 1, `node ${id} logged a refusal of node 3's proof`);
    if (lines[0]) t.log(`node ${id}: ${lines.length} refusal(s), first: ${lines[0].msg}: ${String(lines[0].reason)}`);
  }
  const ownRefusals = rig.grep(3, /refused/, { filter: (l) => refusal.test(String(l.reason)) && l.pid === bad.pid });
  t.true(ownRefusals.length >= 1, 'the wrong-secret node 3 refused its peers too');
  // It cannot join; if it serves at all, it serves alone (no peer joined in its view).
  if (existsSync(path.join(rig.stateDir, 'node-3.json')) && bad.alive()) {
    const s3 = await rig.status(3).catch(() => null);
    if (s3) t.deepEqual(s3.nodes.filter((n) => n.state === 'joined').map((n) => n.id), [], `the wrong-secret node sees peers joined: ${summarizeNodes(s3)}`);
  }
  t.log(`wrong-secret node 3 (pid ${bad.pid}) after 4 s: ${bad.alive() ? 'still running (retrying)' : `exited ${bad.exitCode()}`}; states seen: ${observed.join(' ')}`);
  await rig.kill(3);

  const t1 = Date.now();
  await rig.start(3);
  const joinedMs = await rig.waitAllJoined();
  t.log(`node 3 with the right secret: serving after ${Date.now() - t1 - joinedMs} ms, all joined ${joinedMs} ms later`);
  t.deepEqual([1, 2].map((id) => rig.current(id)!.pid), pids, 'nodes 1 and 2 kept running');
  t.true(rig.running(1) && rig.running(2));
});

// ---------------------------------------------------------------- 6

interface Probe {
  what: string;
  /** Time until the node closed the connection, or null if it did not within the limit. */
  closedAfterMs: number | null;
}

/** Connects, sends `chunks` (then half-closes when `end`), and waits for the node to close the connection. */
function probe(port: number, what: string, chunks: Buffer[], o: { end?: boolean; limitMs?: number } = {}): Promise<Probe> {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const s = net.connect({ host: '127.0.0.1', port });
    let done = false;
    const finish = (closed: boolean): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      resolve({ what, closedAfterMs: closed ? Date.now() - t0 : null });
    };
    const timer = setTimeout(() => finish(false), o.limitMs ?? 8000);
    s.on('error', () => { /* reset by the node: closed */ });
    s.on('close', () => finish(true));
    s.on('data', () => { /* the node's hello */ });
    s.on('connect', () => {
      for (const c of chunks) s.write(c);
      if (o.end) s.end();
    });
  });
}

function frame(payload: Buffer, length = payload.length): Buffer {
  const h = Buffer.alloc(4);
  h.writeUInt32BE(length);
  return Buffer.concat([h, payload]);
}

test.serial('garbage and oversized frames on every node\'s mesh port: every node keeps serving and the cluster stays joined', async (t) => {
  await rig.ensureAllJoined();
  const name = 'garbage6';
  await createVolume(t, name, '16M', 1);
  const w = await qemuIo(rig.uri(1, name), ['write -P 0x77 1M 2M', 'flush']);
  t.is(w.code, 0, describeResult(w));
  const before = await Promise.all(rig.ids.map((id) => rig.status(id)));
  const pids = rig.ids.map((id) => rig.current(id)!.pid);
  const marks = rig.ids.map((id) => rig.mark(id));
  const { Packr } = await import('msgpackr');
  const packr = new Packr({ useRecords: false });
  const t0 = Date.now();

  const results = await Promise.all(rig.ids.map(async (id) => {
    const port = rig.portsOf(id).mesh;
    // A peer this node accepts connections from (a lower id), else any other.
    const peer = id === 1 ? 2 : 1;
    const singles = await Promise.all([
      probe(port, 'random bytes', [randomBytes(4096)]),
      probe(port, 'valid length, junk msgpack', [frame(Buffer.concat([Buffer.from([0xc1]), randomBytes(63)]))]),
      probe(port, 'valid length, msgpack not a map', [frame(packr.pack([1, 2, 3]))]),
      probe(port, 'valid msgpack map, wrong protocol version', [frame(packr.pack({ v: 99, t: 'hello', c: 0, b: {} }))]),
      probe(port, 'hello from an unknown node id', [frame(packr.pack({ v: 1, t: 'hello', c: 0, b: { node: 42, nonce: randomBytes(32) } }))]),
      probe(port, `hello claiming node ${id}'s own id`, [frame(packr.pack({ v: 1, t: 'hello', c: 0, b: { node: id, nonce: randomBytes(32) } }))]),
      probe(port, `hello as node ${peer}, then silence`, [frame(packr.pack({ v: 1, t: 'hello', c: 0, b: { node: peer, nonce: randomBytes(32) } }))]),
      probe(port, `hello as node ${peer} with a forged proof`, [
        frame(packr.pack({ v: 1, t: 'hello', c: 0, b: { node: peer, nonce: randomBytes(32) } })),
        frame(packr.pack({ v: 1, t: 'proof', c: 0, b: { proof: randomBytes(32) } })),
      ]),
      probe(port, 'data frame before authentication', [frame(packr.pack({ v: 1, t: 'msg', c: 0, b: { s: 1, t: 'op', d: {} } }))]),
      probe(port, 'length prefix of 100 MB', [frame(randomBytes(1024), 100 * 1024 * 1024)]),
      probe(port, 'length prefix 0xffffffff', [frame(Buffer.alloc(0), 0xffffffff)]),
      probe(port, 'empty frame', [frame(Buffer.alloc(0))]),
      probe(port, 'truncated frame, then close', [frame(randomBytes(50), 200)], { end: true }),
      probe(port, 'half a length prefix, then close', [Buffer.from([0, 0])], { end: true }),
      probe(port, 'silence (no hello)', []),
    ]);
    // Many at once: more than the 32 connections the mesh lets authenticate at a time.
    const t1 = Date.now();
    const many = await Promise.all(Array.from({ length: 60 }, (_, i) => probe(port, `flood ${i}`,
      i % 3 === 0 ? [randomBytes(512)] : i % 3 === 1 ? [frame(randomBytes(100), 5_000_000)] : [frame(randomBytes(20), 100)], { limitMs: 10_000 })));
    return { id, singles, many, manyMs: Date.now() - t1 };
  }));
  t.log(`garbage sent to 3 mesh ports in ${Date.now() - t0} ms`);

  for (const r of results) {
    for (const p of r.singles) t.not(p.closedAfterMs, null, `node ${r.id} left the connection open: ${p.what}`);
    const open = r.many.filter((p) => p.closedAfterMs === null).length;
    t.is(open, 0, `node ${r.id}: ${open} of ${r.many.length} flood connections left open`);
    t.log(`node ${r.id}: ${r.singles.map((p) => `${p.what} ${p.closedAfterMs} ms`).join('; ')}; flood of ${r.many.length}: all closed within ${Math.max(...r.many.map((p) => p.closedAfterMs ?? 0))} ms`);
  }

  // Each node logged what it refused.
  for (const [i, id] of rig.ids.entries()) {
    const lines = rig.grep(id, /mesh connection refused|mesh protocol error/, { since: marks[i] });
    t.true(lines.length >= 10, `node ${id} logged ${lines.length} refusals`);
  }

  // Every node still serves: status answers, NBD reads through each node, all joined, same processes.
  const joinedMs = await rig.waitAllJoined(rig.ids, 10_000);
  for (const [i, id] of rig.ids.entries()) {
    t.true(rig.running(id), `node ${id} is still running`);
    t.is(rig.current(id)!.pid, pids[i], `node ${id} was not restarted`);
    const s = await rig.status(id);
    t.deepEqual(s.nodes.map((n) => n.state), rig.ids.map((x) => (x === id ? 'online' : 'joined')), `node ${id}: ${summarizeNodes(s)}`);
    t.is(s.cluster?.recovery.evictions, before[i]!.cluster?.recovery.evictions, `node ${id} saw no new eviction`);
    const r = await qemuIo(rig.uri(id, name), ['read -P 0x77 1M 2M', 'read -P 0 0 1M'], { readOnly: true });
    t.is(r.code, 0, describeResult(r));
    t.notRegex(r.stdout + r.stderr, /fail|error|mismatch/i, `node ${id}: ${describeResult(r)}`);
    const cli = await rig.cli(['status'], { node: id });
    t.is(cli.code, 0, describeResult(cli));
  }
  t.log(`afterwards: all joined (checked in ${joinedMs} ms), reads through every node verified`);
});

// ---------------------------------------------------------------- 7

test.serial('admin errors against the cluster: --node 9 is named as not running (exit 1)', async (t) => {
  await rig.ensureAllJoined();
  const cases: [string, string[]][] = [
    ['status', ['status']],
    ['status --json', ['status', '--json']],
    ['volume create', ['volume', 'create', 'nine', '--size', '16M', '--layout', 'mirrored']],
    ['volume verify', ['volume', 'verify', 'shared1']],
  ];
  for (const [what, args] of cases) {
    const r = await rig.cli(args, { node: 9 });
    t.is(r.code, 1, `${what}: ${describeResult(r)}`);
    t.regex(r.stderr, /node 9 is not running/, `${what}: ${describeResult(r)}`);
    t.regex(r.stderr, /running: 1, 2, 3/, `${what}: ${describeResult(r)}`);
  }
  // Nothing was created anywhere.
  const s = await rig.status(2);
  t.false(s.volumes.some((v) => v.name === 'nine'));
  // An operating error from a live node: exit 1 with the node's message.
  const r = await rig.cli(['volume', 'verify', 'no-such-volume'], { node: 3 });
  t.is(r.code, 1, describeResult(r));
  t.regex(r.stderr, /no-such-volume/, describeResult(r));
});
