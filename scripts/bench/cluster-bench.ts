/**
 * `npm run bench:cluster`: what the cluster costs.
 *
 *   node --import tsx scripts/bench/cluster-bench.ts [--runtime S] [--ramp S] [--quick]
 *        [--lock-seconds S] [--mesh-nodes 2|3] [--only locks|fp] [--volumes mirror,linear]
 *        [--jobs randread,randwrite,seqwrite] [--seed N] [--json] [--readme] [--keep]
 *
 * Part 1, oplocks in process: N `Mesh` instances on real loopback TCP (ephemeral
 * ports, highest id started first so every dialer finds its peer listening) and one
 * `Coordinator` per node over a shared in-memory journal store (a Map, as the shared
 * metadata area would be) with hooks that do nothing (revoke resolves at once). Every
 * case runs sequential operations for --lock-seconds (or a cap of operations) and
 * records each operation's latency and the coordinators' `stats.messagesSent` (all
 * nodes summed) and journal writes over the loop:
 *   - uncontended withAcquired on one lock nobody else touches (re-acquire is local),
 *   - uncontended hold/unhold (non-volatile: a journal write to grant, one to clear),
 *   - contended: node 1 and node 2 alternately withAcquired the same lock (handover),
 *   - each of them on a fresh lock every time (join + share + acquire from scratch).
 * All nodes share one event loop: a "round trip" is an in-process loopback TCP round
 * trip plus both sides' processing, on the same core.
 *
 * Part 2, fast-path throughput of a volume exported by 2 nodes vs 1: a real 3-node
 * cluster as processes (`node bin/dve.js node start --id N --config F --state-dir D`,
 * all three sharing 4 sparse 2 GiB disk files and the metadata area, fixed free
 * loopback ports), a 2-way mirrored and a linear 1 GiB volume created with
 * `dve volume create`, each prefilled once through node 1 (fio 1M sequential write).
 * Then for every volume and job, fio (nbd engine, time based) runs
 *   (i)   one node (node 1), one fio with 2 jobs on disjoint halves of the volume,
 *   (ii)  two nodes (1 and 2), one fio job each, on the same disjoint halves,
 *   (iii) two nodes, one fio job each, both over the WHOLE volume (same range: for a
 *         mirror, writes ping-pong the mirror-write oplocks of the extents).
 * IOPS and MB/s are summed over both fio runs; the ratio is against (i). Each node's
 * oplock messages (GET /v1/status cluster.messages.sent), CPU time and FP counters of
 * the volume are read before and after every cell. A cell starts once no node holds
 * non-volatile oplocks any more (the previous writer's mirror-write extents are let go
 * by the engine's idle sweep, every 10 s), so it does not measure the previous cell's
 * handover; it starts anyway after 30 s and the report says so.
 *
 * Every process started here (nodes, fio) is stopped by pid, also on error or SIGINT.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import pino from 'pino';
import { Mesh } from '../../cluster/mesh.js';
import { Coordinator, type JournalStore, type NodeJournal } from '../../cluster/coordinator.js';
import type { NodeStatus, VolumeInfo } from '../../src/engine/admin-api.js';
import {
  checkInterrupted, describeEnvironment, DISK_BYTES, DISKS, EXTENT, fioFirstJob, flushFiles, fmt, fmtLoad, formatMarkdownTable,
  formatTable, GiB, handleSignals, interrupted, loadAvg, log, LOOPBACK, METADATA, p99Ns, ratio, REPO_ROOT, run, runDve, setLogName,
  shellLine, spawnNode, stopAllChildren, stopCluster, waitJoined, waitVolumeEverywhere, writeClusterConfig,
  type Align, type Cluster, type ClusterNode, type Environment,
} from './lib.js';

// ---------------------------------------------------------------- configuration

setLogName('cluster-bench');

const SECRET = `cluster-bench-secret-${process.pid}-${Date.now()}`;
const HEARTBEAT_MS = 200;
const PEER_TIMEOUT_MS = 3000;
const CLUSTER_NODES = 3;
const VOLUME_BYTES = GiB;
/** Fresh-lock cases create one oplock per operation: cap them so the machines stay small. */
const FRESH_LOCK_CAP = 3000;
const SAME_LOCK_CAP = 200_000;

/** Linux's USER_HZ: /proc/PID/stat counts CPU time in these. */
const CLK_TCK = 100;
type VolumeKind = 'mirror' | 'linear';
const VOLUME_KINDS: readonly VolumeKind[] = ['mirror', 'linear'];
const VOLUME_NAME: Record<VolumeKind, string> = { mirror: 'bmirror', linear: 'blinear' };
const VOLUME_LAYOUT: Record<VolumeKind, string> = { mirror: 'mirrored', linear: 'linear' };

interface JobSpec {
  key: string;
  label: string;
  rw: string;
  bs: string;
  iodepth: number;
}

const JOBS: readonly JobSpec[] = [
  { key: 'randread', label: '4k randread QD32', rw: 'randread', bs: '4k', iodepth: 32 },
  { key: 'randwrite', label: '4k randwrite QD32', rw: 'randwrite', bs: '4k', iodepth: 32 },
  { key: 'seqwrite', label: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8 },
];

type Mode = 'one-node' | 'two-disjoint' | 'two-same';
const MODES: readonly Mode[] = ['one-node', 'two-disjoint', 'two-same'];
const MODE_LABEL: Record<Mode, string> = {
  'one-node': '1 node, 2 jobs (halves)',
  'two-disjoint': '2 nodes, 1 job each (halves)',
  'two-same': '2 nodes, 1 job each (same range)',
};

interface Options {
  runtime: number;
  ramp: number;
  lockSeconds: number;
  meshNodes: number;
  quick: boolean;
  locks: boolean;
  fp: boolean;
  volumes: VolumeKind[];
  jobs: JobSpec[];
  seed: number;
  json: boolean;
  readme: boolean;
  keep: boolean;
}

const USAGE = `usage: npm run bench:cluster -- [options]   (or: node --import tsx scripts/bench/cluster-bench.ts [options])
  --runtime S        seconds per fio cell (default 10; --quick: 3)
  --ramp S           fio ramp time before the measured window (default 1)
  --lock-seconds S   seconds per oplock case (default 3; --quick: 1)
  --mesh-nodes N     nodes of the in-process oplock part, 2 or 3 (default 3)
  --quick            short runs: --runtime 3 --lock-seconds 1 unless given
  --only PART        locks (oplock part only) or fp (cluster fio part only)
  --volumes LIST     mirror,linear (default both)
  --jobs LIST        randread,randwrite,seqwrite (default all)
  --seed N           fio random seed (default 4242)
  --json             print the results as JSON on stdout (tables go to stderr)
  --readme           print markdown tables instead of plain ones
  --keep             keep the temporary directory (config, disks, node logs)`;

class UsageError extends Error {}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      runtime: { type: 'string' },
      ramp: { type: 'string' },
      'lock-seconds': { type: 'string' },
      'mesh-nodes': { type: 'string' },
      quick: { type: 'boolean', default: false },
      only: { type: 'string' },
      volumes: { type: 'string' },
      jobs: { type: 'string' },
      seed: { type: 'string' },
      json: { type: 'boolean', default: false },
      readme: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  const quick = values.quick ?? false;
  const num = (text: string | undefined, flag: string, dflt: number, min: number): number => {
    if (text === undefined) return dflt;
    const n = Number(text);
    if (!Number.isFinite(n) || n < min) throw new UsageError(`${flag} must be a number >= ${min}, got ${JSON.stringify(text)}`);
    return n;
  };
  const only = values.only;
  if (only !== undefined && only !== 'locks' && only !== 'fp') throw new UsageError(`--only must be locks or fp, got ${JSON.stringify(only)}`);
  const meshNodes = num(values['mesh-nodes'], '--mesh-nodes', 3, 2);
  if (meshNodes !== 2 && meshNodes !== 3) throw new UsageError('--mesh-nodes must be 2 or 3');
  const list = (text: string | undefined): string[] | undefined => text?.split(',').map((s) => s.trim()).filter((s) => s !== '');
  const volumes = list(values.volumes) ?? [...VOLUME_KINDS];
  for (const v of volumes) if (!VOLUME_KINDS.includes(v as VolumeKind)) throw new UsageError(`unknown volume ${JSON.stringify(v)} (mirror, linear)`);
  const jobKeys = list(values.jobs) ?? JOBS.map((j) => j.key);
  const jobs = jobKeys.map((k) => {
    const j = JOBS.find((x) => x.key === k);
    if (!j) throw new UsageError(`unknown job ${JSON.stringify(k)} (${JOBS.map((x) => x.key).join(', ')})`);
    return j;
  });
  return {
    runtime: Math.round(num(values.runtime, '--runtime', quick ? 3 : 10, 1)),
    ramp: Math.round(num(values.ramp, '--ramp', 1, 0)),
    lockSeconds: num(values['lock-seconds'], '--lock-seconds', quick ? 1 : 3, 0.1),
    meshNodes,
    quick,
    locks: only !== 'fp',
    fp: only !== 'locks',
    volumes: volumes as VolumeKind[],
    jobs,
    seed: Math.round(num(values.seed, '--seed', 4242, 0)),
    json: values.json ?? false,
    readme: values.readme ?? false,
    keep: values.keep ?? false,
  };
}

// ---------------------------------------------------------------- small helpers

async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    checkInterrupted();
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(5);
  }
}

interface LatencyStats {
  ops: number;
  seconds: number;
  opsPerSec: number;
  meanUs: number;
  p50Us: number;
  p99Us: number;
  maxUs: number;
}

function latencyStats(us: readonly number[], seconds: number): LatencyStats {
  const sorted = [...us].sort((a, b) => a - b);
  const pick = (q: number): number => (sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!);
  return {
    ops: sorted.length,
    seconds,
    opsPerSec: seconds > 0 ? sorted.length / seconds : NaN,
    meanUs: sorted.length === 0 ? NaN : sorted.reduce((a, b) => a + b, 0) / sorted.length,
    p50Us: pick(0.5),
    p99Us: pick(0.99),
    maxUs: sorted.length === 0 ? NaN : sorted[sorted.length - 1]!,
  };
}

// ---------------------------------------------------------------- part 1: oplocks in process

interface LockNode {
  id: number;
  mesh: Mesh;
  coord: Coordinator;
}

interface LockCase {
  key: string;
  label: string;
  /** What one operation is. */
  op: string;
  latency: LatencyStats;
  /** Mesh messages sent by all coordinators over the loop (stats.messagesSent, summed). */
  messages: number;
  messagesPerOp: number;
  /** Per node: messages it sent over the loop. */
  messagesByNode: Record<string, number>;
  /** Oplock messages over the loop by message type (join, share, acquire, release, ack, nak, ...). */
  messagesByType: Record<string, number>;
  journalWrites: number;
  journalWritesPerOp: number;
}

interface LockPart {
  nodes: number;
  tickMs: number;
  ackTimeoutMs: number;
  heartbeatMs: number;
  peerTimeoutMs: number;
  cases: LockCase[];
  /** Warnings and errors the meshes and coordinators logged. */
  logged: string[];
  selfEvicted: number[];
  error?: string;
}

async function lockPart(opts: Options): Promise<LockPart> {
  const logged: string[] = [];
  const logger = pino({ level: 'warn', base: null }, {
    write: (s: string) => {
      if (logged.length >= 100) return;
      try {
        const o = JSON.parse(s) as Record<string, unknown>;
        const { level, time: _t, msg, ...rest } = o;
        logged.push(`${level === 40 ? 'WARN' : level === 50 ? 'ERROR' : `level ${String(level)}`} ${String(msg)} ${JSON.stringify(rest)}`.slice(0, 400));
      } catch {
        logged.push(s.trim().slice(0, 400));
      }
    },
  });
  const part: LockPart = {
    nodes: opts.meshNodes, tickMs: 50, ackTimeoutMs: PEER_TIMEOUT_MS, heartbeatMs: HEARTBEAT_MS, peerTimeoutMs: PEER_TIMEOUT_MS,
    cases: [], logged, selfEvicted: [],
  };
  const ids = Array.from({ length: opts.meshNodes }, (_, i) => i + 1);
  const journals = new Map<number, NodeJournal>();
  let journalWrites = 0;
  const store: JournalStore = {
    read: async (node) => structuredClone(journals.get(node) ?? { node, boot: 0, records: [], heldBy: null }),
    write: async (j) => {
      journalWrites++;
      journals.set(j.node, structuredClone(j));
    },
  };
  const nodes = new Map<number, LockNode>();
  const meshes: Mesh[] = [];
  const sentByType = new Map<string, number>();
  try {
    // Highest id first: a node dials only higher ids, which are then already listening
    // (lower ids get a placeholder endpoint that is never dialed).
    for (const id of [...ids].sort((a, b) => b - a)) {
      const mesh = new Mesh({
        nodeId: id, secret: SECRET, listen: { host: LOOPBACK, port: 0 }, log: logger.child({ node: id }),
        heartbeatMs: HEARTBEAT_MS, peerTimeoutMs: PEER_TIMEOUT_MS,
        peers: ids.filter((p) => p !== id).map((p) => ({ id: p, endpoint: { host: LOOPBACK, port: nodes.get(p)?.mesh.port ?? 0 } })),
      });
      meshes.push(mesh);
      // Count oplock messages by their type (join, share, acquire, ack, ...) as they leave.
      const send = mesh.send.bind(mesh);
      mesh.send = (peer, type, body) => {
        if (type === 'op') {
          const t = String((body as { type?: unknown } | null)?.type ?? '?');
          sentByType.set(t, (sentByType.get(t) ?? 0) + 1);
        }
        return send(peer, type, body);
      };
      await mesh.start();
      const coord = new Coordinator({ nodeId: id, peers: ids, mesh, journals: store, log: logger.child({ node: id }), ackTimeoutMs: PEER_TIMEOUT_MS });
      coord.hooks = {
        revoke: async () => {},
        cleanup: async () => {},
        wanted: (lock) => coord.unhold(lock),
        selfEvicted: () => void part.selfEvicted.push(id),
      };
      nodes.set(id, { id, mesh, coord });
    }
    await waitFor(() => ids.every((a) => ids.every((b) => a === b || nodes.get(a)!.mesh.isUp(b))), 10_000, 'every mesh peer up');
    for (const id of ids) {
      const c = nodes.get(id)!.coord;
      const boot = await c.bootJournal();
      await c.replayed(boot.records);
      c.start();
    }
    await waitFor(() => ids.every((id) => nodes.get(id)!.coord.livePeers().length === ids.length - 1), 15_000, 'every coordinator sees its peers up');
    log(`locks: ${ids.length} meshes and coordinators up (ports ${meshes.map((m) => m.port).join(', ')})`);

    const a = nodes.get(1)!.coord;
    const b = nodes.get(2)!.coord;
    const sent = (): number[] => ids.map((id) => nodes.get(id)!.coord.stats.messagesSent);
    const budgetMs = opts.lockSeconds * 1000;

    /** Runs `op(i)` sequentially for the budget (or `cap` operations), timing the `timed` part. */
    const measure = async (key: string, label: string, opText: string, cap: number,
      op: (i: number) => Promise<number>): Promise<void> => {
      checkInterrupted();
      // Let the previous case's trailing messages (releases, unshares) settle first.
      await sleep(100);
      const sent0 = sent();
      const types0 = new Map(sentByType);
      const writes0 = journalWrites;
      const lat: number[] = [];
      const t0 = performance.now();
      for (let i = 0; i < cap && performance.now() - t0 < budgetMs; i++) lat.push(await op(i));
      const seconds = (performance.now() - t0) / 1000;
      // Messages a step sends leave asynchronously: let the last operation's go out.
      await sleep(50);
      const sent1 = sent();
      const byNode: Record<string, number> = {};
      ids.forEach((id, k) => (byNode[String(id)] = sent1[k]! - sent0[k]!));
      const messages = Object.values(byNode).reduce((x, y) => x + y, 0);
      const latency = latencyStats(lat, seconds);
      const writes = journalWrites - writes0;
      const byType: Record<string, number> = {};
      for (const [t, k] of sentByType) if (k - (types0.get(t) ?? 0) > 0) byType[t] = k - (types0.get(t) ?? 0);
      part.cases.push({
        key, label, op: opText, latency, messages, messagesPerOp: messages / Math.max(1, latency.ops), messagesByNode: byNode, messagesByType: byType,
        journalWrites: writes, journalWritesPerOp: writes / Math.max(1, latency.ops),
      });
      log(`locks: ${label}: ${latency.ops} ops, ${fmt(latency.opsPerSec, 0)}/s, p50 ${fmt(latency.p50Us, 1)} µs, p99 ${fmt(latency.p99Us, 1)} µs, ${messages} messages`);
    };
    const timed = async (f: () => Promise<unknown>): Promise<number> => {
      const t = performance.now();
      await f();
      return (performance.now() - t) * 1000;
    };
    const noop = async (): Promise<void> => {};

    // (a) Uncontended, same lock: the first acquisition (untimed) joins and shares; after
    // that node 1 stays Sharing between operations and re-acquires without asking.
    await a.withAcquired('bench.u[0]', { restrictive: true }, noop);
    await measure('uncontended-same', 'uncontended withAcquired, same lock', 'withAcquired (node 1)', SAME_LOCK_CAP,
      () => timed(() => a.withAcquired('bench.u[0]', { restrictive: true }, noop)));
    await measure('uncontended-fresh', 'uncontended withAcquired, fresh lock each time', 'withAcquired (node 1)', FRESH_LOCK_CAP,
      (i) => timed(() => a.withAcquired(`bench.uf[${i}]`, { restrictive: true }, noop)));

    // (b) Non-volatile hold + unhold: journal write before the grant, cleared at release.
    await a.hold('bench.h[0]');
    a.unhold('bench.h[0]');
    await measure('hold-same', 'uncontended hold+unhold, same lock', 'hold + unhold (node 1)', SAME_LOCK_CAP,
      () => timed(async () => {
        await a.hold('bench.h[0]');
        a.unhold('bench.h[0]');
      }));
    await measure('hold-fresh', 'uncontended hold+unhold, fresh lock each time', 'hold + unhold (node 1)', FRESH_LOCK_CAP,
      (i) => timed(async () => {
        await a.hold(`bench.hf[${i}]`);
        a.unhold(`bench.hf[${i}]`);
      }));

    // (c) Contended: nodes 1 and 2 take turns on one lock; every operation is a handover
    // (the other node shares the lock and has to revoke).
    await a.withAcquired('bench.c[0]', { restrictive: true }, noop);
    await b.withAcquired('bench.c[0]', { restrictive: true }, noop);
    await measure('contended-same', 'contended handover (nodes 1,2 alternate), same lock', 'withAcquired, alternating node 1 / node 2', SAME_LOCK_CAP,
      (i) => timed(() => (i % 2 === 0 ? a : b).withAcquired('bench.c[0]', { restrictive: true }, noop)));
    // (d) Contended, fresh lock: node 1 takes lock i from scratch (untimed), then node 2
    // takes it over (timed: join + share + acquire, node 1 revokes).
    await measure('contended-fresh', 'contended handover, fresh lock each time', 'node 2 withAcquired of a lock node 1 just released (node 1\'s own from-scratch acquire untimed, its messages counted)', FRESH_LOCK_CAP,
      async (i) => {
        await a.withAcquired(`bench.cf[${i}]`, { restrictive: true }, noop);
        return timed(() => b.withAcquired(`bench.cf[${i}]`, { restrictive: true }, noop));
      });
  } catch (err) {
    part.error = (err as Error).message;
    log(`locks: FAILED: ${part.error}`);
  } finally {
    for (const n of nodes.values()) await n.coord.stop().catch(() => {});
    for (const m of meshes) await m.stop().catch(() => {});
  }
  return part;
}

// ---------------------------------------------------------------- part 2: the cluster as processes

async function createVolume(c: Cluster, kind: VolumeKind): Promise<{ info: VolumeInfo; command: string }> {
  const args = ['volume', 'create', VOLUME_NAME[kind], '--size', `${VOLUME_BYTES / GiB}G`, '--layout', VOLUME_LAYOUT[kind], '--state-dir', c.stateDir, '--node', '1', '--json'];
  const r = await runDve(args, 120);
  if (r.code !== 0) throw new Error(`dve ${args.join(' ')} failed (${r.code}): ${(r.stderr || r.stdout).trim()}`);
  const info = JSON.parse(r.stdout) as VolumeInfo;
  // Every node exports every volume: wait until nodes 2 and 3 serve it too.
  await waitVolumeEverywhere(c, info.name);
  return { info, command: shellLine('node', ['bin/dve.js', ...args.map((a) => a.replace(`${c.dir}/`, 'TMP/'))]) };
}

function uriOf(n: ClusterNode, volume: string): string {
  return `nbd://${LOOPBACK}:${n.nbd}/${volume}`;
}

interface DirectionStats {
  iops: number;
  bw_bytes: number;
  total_ios: number;
  clat_ns: { percentile?: Record<string, number> };
}

interface FioJob {
  error: number;
  read: DirectionStats;
  write: DirectionStats;
}

interface FioPart {
  node: number;
  numjobs: number;
  offset: number;
  size: number;
  iops: number;
  mbPerSec: number;
  p99Us: number;
  totalIos: number;
  command: string;
}

function parseFioJson(stdout: string): FioJob {
  return fioFirstJob<FioJob>(stdout, 500).job;
}

interface FioRun {
  node: ClusterNode;
  numjobs: number;
  offset: number;
  size: number;
  seed: number;
}

function fioArgs(job: JobSpec, uri: string, r: FioRun, opts: Options, timeBased: boolean): string[] {
  return [
    `--name=${job.key}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--thread',
    `--numjobs=${r.numjobs}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    `--offset=${r.offset}`,
    `--size=${r.size}`,
    ...(r.numjobs > 1 ? [`--offset_increment=${r.size}`] : []),
    '--norandommap',
    `--randseed=${r.seed}`,
    ...(timeBased ? ['--time_based', `--runtime=${opts.runtime}`, `--ramp_time=${opts.ramp}`] : []),
    '--group_reporting',
    '--output-format=json',
  ];
}

async function runFio(job: JobSpec, volume: string, r: FioRun, opts: Options, timeBased = true): Promise<FioPart> {
  const args = fioArgs(job, uriOf(r.node, volume), r, opts, timeBased);
  const bound = String(timeBased ? opts.runtime + opts.ramp + 60 : 600);
  const res = await run('timeout', ['-s', 'KILL', bound, 'fio', ...args]);
  const command = shellLine('timeout', ['-s', 'KILL', bound, 'fio', ...args]);
  if (res.code !== 0) throw new Error(`fio (node ${r.node.id}) exited with ${res.code}: ${res.stderr.trim().slice(-1000) || res.stdout.trim().slice(0, 300)}`);
  const j = parseFioJson(res.stdout);
  const p99 = p99Ns(j);
  return {
    node: r.node.id, numjobs: r.numjobs, offset: r.offset, size: r.size,
    iops: j.read.iops + j.write.iops,
    mbPerSec: (j.read.bw_bytes + j.write.bw_bytes) / 1e6,
    p99Us: p99 / 1000,
    totalIos: j.read.total_ios + j.write.total_ios,
    command,
  };
}

interface NodeWindow {
  node: number;
  /** The node process's CPU use over the cell (100 = one core), start-up and ramp included. */
  cpuPercent: number;
  oplockMessagesSent: number;
  fpHits: number;
  fpFaults: Record<string, number>;
  fpShare: number;
}

interface Cell {
  volume: VolumeKind;
  job: string;
  jobLabel: string;
  mode: Mode;
  iops: number;
  mbPerSec: number;
  /** Worst p99 completion latency of the fio runs. */
  p99Us: number;
  parts: FioPart[];
  /** Per node of the cluster: oplock messages it sent and its FP counters of the volume over the cell. */
  nodes: NodeWindow[];
  loadAvg: number;
  volumeStates: string[];
  /** Seconds waited before the cell for every node to let go of its mirror-write oplocks. */
  settleSec: number;
  /** Set when the wait ran out: what was still held. */
  settleNote?: string;
  error?: string;
}

const SETTLE_TIMEOUT_MS = 30_000;

/**
 * Waits until no node holds non-volatile oplocks (mirror-write extents, journal):
 * the previous cell's writers keep theirs until the engine's idle sweep (every 10 s)
 * lets them go, and a cell that starts while another node holds them measures the
 * handover too. Bounded: a cell starts anyway after SETTLE_TIMEOUT_MS (and says so).
 */
async function settle(c: Cluster): Promise<{ ok: boolean; seconds: number; note: string }> {
  const t0 = performance.now();
  const deadline = Date.now() + SETTLE_TIMEOUT_MS;
  let held: string[] = [];
  for (;;) {
    checkInterrupted();
    held = [];
    for (const n of c.nodes) {
      const s = await n.client.status();
      const records = s.nodes.find((x) => x.id === n.id)?.journalRecords ?? 0;
      if (records > 0) held.push(`node ${n.id}: ${records}`);
    }
    const seconds = (performance.now() - t0) / 1000;
    if (held.length === 0) return { ok: true, seconds, note: '' };
    if (Date.now() > deadline) return { ok: false, seconds, note: `still held after ${fmt(seconds, 0)} s: ${held.join(', ')}` };
    await sleep(250);
  }
}

/** utime + stime of a process in clock ticks (a node is one process; its threads are included). */
function cpuTicks(pid: number): number {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch {
    return NaN;
  }
}

interface Snapshot {
  node: number;
  ticks: number;
  at: number;
  sent: number;
  hits: number;
  faults: Record<string, number>;
  state: string;
}

async function snapshot(c: Cluster, volume: string): Promise<Snapshot[]> {
  return Promise.all(c.nodes.map(async (n) => {
    const s: NodeStatus = await n.client.status();
    const v = s.volumes.find((x) => x.name === volume);
    return { node: n.id, ticks: cpuTicks(n.pid), at: performance.now(), sent: s.cluster?.messages.sent ?? NaN, hits: v?.fp.hits ?? NaN, faults: { ...(v?.fp.faults ?? {}) }, state: v?.state ?? 'missing' };
  }));
}

function windows(before: Snapshot[], after: Snapshot[]): NodeWindow[] {
  return after.map((a) => {
    const b = before.find((x) => x.node === a.node)!;
    const faults: Record<string, number> = {};
    for (const [k, n] of Object.entries(a.faults)) {
      const d = n - (b.faults[k] ?? 0);
      if (d !== 0) faults[k] = d;
    }
    const hits = a.hits - b.hits;
    const ft = Object.values(faults).reduce((x, y) => x + y, 0);
    const cpuPercent = (100 * (a.ticks - b.ticks) / CLK_TCK) / ((a.at - b.at) / 1000);
    return { node: a.node, cpuPercent, oplockMessagesSent: a.sent - b.sent, fpHits: hits, fpFaults: faults, fpShare: hits + ft > 0 ? hits / (hits + ft) : NaN };
  });
}

function plan(c: Cluster, mode: Mode, opts: Options): FioRun[] {
  const [n1, n2] = c.nodes as [ClusterNode, ClusterNode];
  const half = VOLUME_BYTES / 2;
  switch (mode) {
    case 'one-node':
      return [{ node: n1, numjobs: 2, offset: 0, size: half, seed: opts.seed }];
    case 'two-disjoint':
      return [
        { node: n1, numjobs: 1, offset: 0, size: half, seed: opts.seed },
        { node: n2, numjobs: 1, offset: half, size: half, seed: opts.seed + 1 },
      ];
    case 'two-same':
      return [
        { node: n1, numjobs: 1, offset: 0, size: VOLUME_BYTES, seed: opts.seed },
        { node: n2, numjobs: 1, offset: 0, size: VOLUME_BYTES, seed: opts.seed + 1 },
      ];
  }
}

async function measureCell(c: Cluster, kind: VolumeKind, job: JobSpec, mode: Mode, opts: Options): Promise<Cell> {
  const volume = VOLUME_NAME[kind];
  const cell: Cell = {
    volume: kind, job: job.key, jobLabel: job.label, mode, iops: NaN, mbPerSec: NaN, p99Us: NaN, parts: [], nodes: [], loadAvg: NaN, volumeStates: [],
    settleSec: 0,
  };
  try {
    for (const n of c.nodes) {
      const how = n.exited();
      if (how !== undefined) throw new Error(`node ${n.id} ${how}`);
    }
    const settled = await settle(c);
    cell.settleSec = settled.seconds;
    if (!settled.ok) cell.settleNote = settled.note;
    const before = await snapshot(c, volume);
    const parts = await Promise.all(plan(c, mode, opts).map((r) => runFio(job, volume, r, opts)));
    const after = await snapshot(c, volume);
    cell.parts = parts;
    cell.iops = parts.reduce((s, p) => s + p.iops, 0);
    cell.mbPerSec = parts.reduce((s, p) => s + p.mbPerSec, 0);
    cell.p99Us = Math.max(...parts.map((p) => p.p99Us));
    cell.nodes = windows(before, after);
    cell.volumeStates = after.map((s) => `${s.node}:${s.state}`);
  } catch (err) {
    cell.error = (err as Error).message;
    for (const n of c.nodes) {
      const how = n.exited();
      if (how !== undefined) cell.error += ` (node ${n.id} ${how})`;
    }
  } finally {
    cell.loadAvg = loadAvg()[0];
    flushFiles(c.diskFiles);
  }
  const split = cell.parts.length > 1 ? ` (${cell.parts.map((p) => `node ${p.node}: ${fmt(p.iops, 0)}`).join(', ')})` : '';
  log(`fp: ${kind} ${job.label} ${MODE_LABEL[mode]}: ${cell.error ? `FAILED: ${cell.error}` : `${fmt(cell.iops, 0)} IOPS, ${fmt(cell.mbPerSec, 1)} MB/s${split}`}`);
  return cell;
}

interface FpPart {
  cells: Cell[];
  nodeCommands: string[];
  volumeCommands: string[];
  prefill: { volume: VolumeKind; seconds: number; mbPerSec: number; command: string }[];
  nodeLogs: Record<string, string[]>;
  nodeStops: Record<string, string>;
  finalStatus?: { node: number; messagesSent: number; messagesReceived: number; rejected: number; evictions: number; oplocks: Record<string, number> | undefined; journalRecords: number | undefined }[];
  error?: string;
}

async function fpPart(opts: Options, dir: string): Promise<FpPart> {
  const part: FpPart = { cells: [], nodeCommands: [], volumeCommands: [], prefill: [], nodeLogs: {}, nodeStops: {} };
  let cluster: Cluster | undefined;
  try {
    if (!fs.existsSync(path.join(REPO_ROOT, 'dist/src/cli/main.js'))) {
      throw new Error('dist/src/cli/main.js is missing: build first (npx tsc -p tsconfig.json)');
    }
    const c = await writeClusterConfig(dir, {
      writtenBy: 'scripts/bench/cluster-bench.ts', name: 'cluster-bench', label: '', nodeCount: CLUSTER_NODES,
      secret: SECRET, heartbeatMs: HEARTBEAT_MS, peerTimeoutMs: PEER_TIMEOUT_MS,
    });
    cluster = c;
    const t0 = performance.now();
    await Promise.all(c.nodes.map((n) => spawnNode(c, n)));
    part.nodeCommands = c.nodes.map((n) => n.commandLine);
    log(`fp: 3 node processes serving in ${fmt((performance.now() - t0) / 1000, 1)} s (pids ${c.nodes.map((n) => n.pid).join(', ')})`);
    await waitJoined(c);
    for (const kind of opts.volumes) {
      const { command } = await createVolume(c, kind);
      part.volumeCommands.push(command);
      // Prefill once through node 1 so that reads hit written extents.
      const prefillJob: JobSpec = { key: 'prefill', label: 'prefill', rw: 'write', bs: '1M', iodepth: 8 };
      const p0 = performance.now();
      const r = await runFio(prefillJob, VOLUME_NAME[kind], { node: c.nodes[0]!, numjobs: 1, offset: 0, size: VOLUME_BYTES, seed: opts.seed }, opts, false);
      const seconds = (performance.now() - p0) / 1000;
      part.prefill.push({ volume: kind, seconds, mbPerSec: r.mbPerSec, command: r.command.replace(/--uri=\S+/, '--uri=nbd://127.0.0.1:PORT1/NAME') });
      flushFiles(c.diskFiles);
      log(`fp: volume ${VOLUME_NAME[kind]} (${VOLUME_LAYOUT[kind]}) created and prefilled in ${fmt(seconds, 1)} s (${fmt(r.mbPerSec, 0)} MB/s)`);
    }
    for (const kind of opts.volumes) {
      for (const job of opts.jobs) {
        for (const mode of MODES) {
          checkInterrupted();
          part.cells.push(await measureCell(c, kind, job, mode, opts));
        }
      }
    }
    part.finalStatus = await Promise.all(c.nodes.map(async (n) => {
      const s = await n.client.status();
      const self = s.nodes.find((x) => x.id === n.id);
      return {
        node: n.id, messagesSent: s.cluster?.messages.sent ?? NaN, messagesReceived: s.cluster?.messages.received ?? NaN,
        rejected: s.cluster?.messages.rejected ?? NaN, evictions: s.cluster?.recovery.evictions ?? NaN,
        oplocks: self?.oplocks, journalRecords: self?.journalRecords,
      };
    })).catch(() => undefined);
  } catch (err) {
    part.error = (err as Error).message;
    log(`fp: FAILED: ${part.error}`);
  } finally {
    if (cluster) {
      await stopCluster(cluster);
      for (const n of cluster.nodes) {
        part.nodeLogs[String(n.id)] = n.logLines;
        part.nodeStops[String(n.id)] = n.stopNote ?? 'not started';
      }
    }
  }
  return part;
}

// ---------------------------------------------------------------- reporting

function lockTable(p: LockPart): { headers: string[]; rows: string[][]; align: Align[] } {
  return {
    headers: ['case', 'ops', 'ops/s', 'mean µs', 'p50 µs', 'p99 µs', 'max µs', 'msgs/op', 'journal writes/op'],
    align: ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
    rows: p.cases.map((c) => [
      c.label, String(c.latency.ops), fmt(c.latency.opsPerSec, 0), fmt(c.latency.meanUs, 1), fmt(c.latency.p50Us, 1),
      fmt(c.latency.p99Us, 1), fmt(c.latency.maxUs, 0), fmt(c.messagesPerOp, 2), fmt(c.journalWritesPerOp, 2),
    ]),
  };
}

function fpTable(cells: readonly Cell[]): { headers: string[]; rows: string[][]; align: Align[] } {
  const base = (c: Cell): Cell | undefined => cells.find((x) => x.volume === c.volume && x.job === c.job && x.mode === 'one-node');
  return {
    headers: ['volume', 'job', 'how', 'IOPS', 'MB/s', 'vs 1 node', 'per fio (IOPS)', 'p99 µs', 'oplock msgs', 'FP share', 'node CPU % (1/2/3)', 'load'],
    align: ['l', 'l', 'l', 'r', 'r', 'r', 'l', 'r', 'r', 'r', 'r', 'r'],
    rows: cells.map((c) => {
      if (c.error !== undefined) return [c.volume, c.jobLabel, MODE_LABEL[c.mode], 'failed', '', '', c.error.split('\n')[0]!.slice(0, 80), '', '', '', '', fmt(c.loadAvg, 1)];
      const msgs = c.nodes.reduce((s, n) => s + n.oplockMessagesSent, 0);
      const hits = c.nodes.reduce((s, n) => s + n.fpHits, 0);
      const faults = c.nodes.reduce((s, n) => s + Object.values(n.fpFaults).reduce((x, y) => x + y, 0), 0);
      return [
        c.volume, c.jobLabel, MODE_LABEL[c.mode], fmt(c.iops, 0), fmt(c.mbPerSec, 1),
        c.mode === 'one-node' ? '1.00x' : ratio(c.iops, base(c)?.iops),
        c.parts.length > 1 ? c.parts.map((p) => `n${p.node} ${fmt(p.iops, 0)}`).join(' / ') : `n${c.parts[0]?.node ?? '?'} ${fmt(c.iops, 0)}`,
        fmt(c.p99Us, 0), String(msgs), hits + faults > 0 ? `${fmt((100 * hits) / (hits + faults), 1)}%` : 'n/a',
        c.nodes.map((n) => fmt(n.cpuPercent, 0)).join(' / '), fmt(c.loadAvg, 1),
      ];
    }),
  };
}

function faultsText(cells: readonly Cell[]): string[] {
  const lines: string[] = [];
  for (const c of cells) {
    if (c.error !== undefined) continue;
    const per = c.nodes.filter((n) => n.fpHits > 0 || Object.keys(n.fpFaults).length > 0 || n.oplockMessagesSent > 0)
      .map((n) => `node ${n.node}: ${n.oplockMessagesSent} msgs, hits ${n.fpHits}${Object.keys(n.fpFaults).length ? `, faults ${JSON.stringify(n.fpFaults)}` : ''}`);
    if (per.length > 0) lines.push(`${c.volume} ${c.jobLabel}, ${MODE_LABEL[c.mode]}: ${per.join('; ')}`);
  }
  return lines;
}

function methodLines(opts: Options, env: Environment, locks: LockPart | undefined, fp: FpPart | undefined): string[] {
  const lines = [
    `Machine: ${env.nproc} CPUs (${env.cpuModel}), ${env.memGiB} GiB, ${env.kernel}; ${env.node}; ${env.fio}. ` +
      `Load average (1/5/15 min) before: ${fmtLoad(env.loadBefore)}, after: ${env.loadAfter ? fmtLoad(env.loadAfter) : 'n/a'}.`,
    `Command: node --import tsx scripts/bench/cluster-bench.ts ${commandFlags(opts)}`.trimEnd(),
  ];
  if (locks) {
    lines.push(
      `Oplocks: ${locks.nodes} Mesh instances over loopback TCP in this one process (heartbeat ${locks.heartbeatMs} ms, peer timeout ${locks.peerTimeoutMs} ms), ` +
      `one Coordinator each (tick ${locks.tickMs} ms, ack timeout ${locks.ackTimeoutMs} ms) over a shared in-memory journal store, hooks that do nothing ` +
      `(revoke resolves at once). Each case runs sequential operations for ${opts.lockSeconds} s (at most ${FRESH_LOCK_CAP} for fresh locks). ` +
      'msgs/op: mesh messages sent by all coordinators (stats.messagesSent) over the loop per operation; journal writes/op: JournalStore.write calls per operation. ' +
      'All nodes share one event loop, so a round trip includes both sides\' processing on one core.',
    );
  }
  if (fp) {
    lines.push(
      `Cluster: 3 node processes (${fp.nodeCommands[0] ?? 'node bin/dve.js node start ...'} and likewise for 2 and 3), heartbeat ${HEARTBEAT_MS} ms, peer timeout ${PEER_TIMEOUT_MS} ms, ` +
      `sharing ${DISKS} sparse ${DISK_BYTES / GiB} GiB disk files and a ${METADATA} metadata area, ${EXTENT} extents; volumes (${fp.volumeCommands.join('; ')}) ` +
      'prefilled once through node 1 with fio 1M sequential writes.',
      `fio: nbd engine, --thread, --time_based --runtime=${opts.runtime} --ramp_time=${opts.ramp}, --norandommap, one NBD connection per fio job. ` +
      '1 node: one fio on node 1 with --numjobs=2 --size=512M --offset_increment=512M (the two halves); 2 nodes (halves): one fio per node, node 1 on the first half, node 2 on the second; ' +
      '2 nodes (same range): both over the whole volume with different seeds. IOPS and MB/s are summed over the fio runs; "vs 1 node" is the IOPS ratio to the 1-node row; ' +
      'oplock msgs: cluster.messages.sent of all three nodes over the cell (GET /v1/status before/after, so it includes a few seconds of fio start-up and ramp); ' +
      'FP share: the volume\'s fp.hits / (hits + faults) summed over the nodes; node CPU %: utime+stime of each node process over the same window (100 = one core). ' +
      'fio and all three nodes share the machine\'s CPUs, so 2 nodes can only scale if one node was not already using them; load: 1-minute load average at the end of the cell. ' +
      'Disk files are fdatasync\'ed after every cell, and before each cell the bench waits (up to 30 s) until no node holds non-volatile oplocks (status journalRecords 0: ' +
      'the engine\'s idle sweep releases mirror-write extents every 10 s), so a cell does not start with the previous cell\'s writer holding its extents.',
    );
  }
  return lines;
}

function commandFlags(opts: Options): string {
  const parts: string[] = [];
  if (opts.quick) parts.push('--quick');
  parts.push(`--runtime ${opts.runtime}`, `--ramp ${opts.ramp}`, `--lock-seconds ${opts.lockSeconds}`, `--mesh-nodes ${opts.meshNodes}`);
  if (!opts.locks) parts.push('--only fp');
  if (!opts.fp) parts.push('--only locks');
  if (opts.volumes.length !== VOLUME_KINDS.length) parts.push(`--volumes ${opts.volumes.join(',')}`);
  if (opts.jobs.length !== JOBS.length) parts.push(`--jobs ${opts.jobs.map((j) => j.key).join(',')}`);
  if (opts.json) parts.push('--json');
  if (opts.readme) parts.push('--readme');
  return parts.join(' ');
}

function report(opts: Options, env: Environment, locks: LockPart | undefined, fp: FpPart | undefined): string {
  const table = (t: { headers: string[]; rows: string[][]; align: Align[] }): string =>
    opts.readme ? formatMarkdownTable(t.headers, t.rows, t.align) : formatTable(t.headers, t.rows, t.align);
  const h = (title: string): string => (opts.readme ? `### ${title}` : `== ${title}`);
  const bullet = (l: string): string => (opts.readme ? `- ${l}` : `  - ${l}`);
  const out: string[] = [];
  if (locks) {
    out.push(h(`Oplock acquire latency (${locks.nodes} nodes in process, loopback mesh)`), '');
    if (locks.error !== undefined) out.push(`Not completed: ${locks.error}`, '');
    if (locks.cases.length > 0) out.push(table(lockTable(locks)), '');
    const perOp = (k: number, ops: number): string => fmt(k / Math.max(1, ops), 2);
    const byNode = locks.cases.map((c) => `${c.label} (${c.op}): ${c.messages} messages over ${c.latency.ops} ops; ` +
      `by node ${Object.entries(c.messagesByNode).map(([n, k]) => `${n}: ${perOp(k, c.latency.ops)}`).join(', ')} per op; ` +
      `by type ${Object.keys(c.messagesByType).length === 0 ? 'none' : Object.entries(c.messagesByType).map(([t, k]) => `${t} ${perOp(k, c.latency.ops)}`).join(', ')} per op; ` +
      `${c.journalWrites} journal writes`);
    out.push('Messages over each loop:', ...byNode.map(bullet), '');
    if (locks.logged.length > 0) out.push('Logged by the meshes/coordinators (warn and above):', ...locks.logged.slice(0, 20).map(bullet), '');
    if (locks.selfEvicted.length > 0) out.push(`Self-evicted: nodes ${locks.selfEvicted.join(', ')}`, '');
  }
  if (fp) {
    out.push(h('FP throughput: a volume exported by 2 nodes vs 1 (3-node cluster, processes)'), '');
    if (fp.error !== undefined) out.push(`Not completed: ${fp.error.split('\n')[0]}`, '');
    if (fp.cells.length > 0) out.push(table(fpTable(fp.cells)), '');
    if (fp.prefill.length > 0) out.push(`Prefill through node 1: ${fp.prefill.map((p) => `${p.volume} ${fmt(p.seconds, 1)} s (${fmt(p.mbPerSec, 0)} MB/s)`).join(', ')}`, '');
    const unsettled = fp.cells.filter((c) => c.settleNote !== undefined);
    if (unsettled.length > 0) out.push('Cells that started while mirror-write oplocks were still held:', ...unsettled.map((c) => bullet(`${c.volume} ${c.jobLabel}, ${MODE_LABEL[c.mode]}: ${c.settleNote}`)), '');
    const waited = fp.cells.filter((c) => c.settleSec >= 0.5);
    if (waited.length > 0) out.push(`Waited for held oplocks to be swept before: ${waited.map((c) => `${c.volume} ${c.job} ${c.mode} ${fmt(c.settleSec, 1)} s`).join(', ')}`, '');
    const ft = faultsText(fp.cells);
    if (ft.length > 0) out.push('Per node over each cell (oplock messages sent, FP hits and faults of the volume):', ...ft.map(bullet), '');
    const logged = Object.entries(fp.nodeLogs).filter(([, l]) => l.length > 0);
    if (logged.length > 0) {
      out.push('Node logs (warn and above, first lines):');
      for (const [id, lines] of logged) out.push(...lines.slice(0, 10).map((l) => bullet(`node ${id}: ${l}`)), ...(lines.length > 10 ? [bullet(`node ${id}: ... ${lines.length - 10} more`)] : []));
      out.push('');
    } else {
      out.push('Node logs: nothing at warn or above.', '');
    }
    if (fp.finalStatus) {
      out.push(`At the end: ${fp.finalStatus.map((s) => `node ${s.node} sent ${s.messagesSent}, received ${s.messagesReceived}, rejected ${s.rejected}, evictions ${s.evictions}, journal records ${s.journalRecords ?? '?'}`).join('; ')}`);
    }
    out.push(`Node stops: ${Object.entries(fp.nodeStops).map(([id, s]) => `node ${id} ${s}`).join(', ')}`, '');
  }
  out.push(opts.readme ? 'How it was measured:' : 'How it was measured:', '', ...methodLines(opts, env, locks, fp).map(bullet), '');
  return out.join('\n');
}

// ---------------------------------------------------------------- main

async function main(): Promise<number> {
  let opts: Options;
  try {
    opts = parseOptions(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }
  handleSignals();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-cluster-bench-'));
  const env = await describeEnvironment();
  log(`${env.nproc} CPUs, load average ${fmtLoad(env.loadBefore)}; temporary directory ${dir}`);
  let locks: LockPart | undefined;
  let fp: FpPart | undefined;
  try {
    if (opts.locks) locks = await lockPart(opts);
    checkInterrupted();
    if (opts.fp) fp = await fpPart(opts, dir);
  } catch (err) {
    log(`FAILED: ${(err as Error).message}`);
  } finally {
    await stopAllChildren();
    if (!opts.keep) fs.rmSync(dir, { recursive: true, force: true });
    else log(`kept ${dir}`);
  }
  env.loadAfter = loadAvg();
  const text = report(opts, env, locks, fp);
  if (opts.json) {
    process.stderr.write(`${text}\n`);
    process.stdout.write(`${JSON.stringify({ environment: env, options: { ...opts, jobs: opts.jobs.map((j) => j.key) }, locks, fp }, null, 2)}\n`);
  } else {
    process.stdout.write(`${text}\n`);
  }
  const failed = locks?.error !== undefined || fp?.error !== undefined || (fp?.cells.some((c) => c.error !== undefined) ?? false);
  return interrupted() ? 130 : failed ? 1 : 0;
}

main().then((code) => process.exit(code), (err: Error) => {
  process.stderr.write(`cluster-bench: ${err.stack ?? err.message}\n`);
  void stopAllChildren().finally(() => process.exit(1));
});
