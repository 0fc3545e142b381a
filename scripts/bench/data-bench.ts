/**
 * `npm run bench:data`: what the data services cost (snapshots, clones, migration,
 * crash reconciliation), measured with fio's nbd engine against real node processes.
 *
 *   node --import tsx scripts/bench/data-bench.ts [--runtime S] [--ramp S] [--quick]
 *        [--parts cow,snap,migrate,recon] [--regions 16,64,256] [--first-writes N]
 *        [--seed N] [--json] [--readme] [--keep]
 *
 * Parts 1-3 run on a 1-node cluster (`node bin/dve.js node start --id 1 --config F
 * --state-dir D`, 4 sparse 2 GiB disk files, metadata 16M, 4M extents) with one
 * mirrored 1 GiB volume `o`, prefilled once with fio 1M sequential writes:
 *
 *  1. Copy-on-write first-write penalty: 4k randwrite QD32 on the plain volume (a);
 *     `snapshot create o s1` and at once the same fio (b, units being pushed; s1's
 *     sharedBytes after it); the same again (c, steady). Directly: fio QD1 4k writes
 *     with a 4 MiB stride (`--rw=write:4092k --number_ios=N`, every I/O the first
 *     write to its unit) on the plain volume and over a fresh snapshot `sfw`.
 *  2. Snapshot and clone throughput: 4k randread QD32 on the origin, on `sfw` (every
 *     unit shared: read through the origin) and on sfw after `snapshot complete sfw`
 *     (which copies what the first writes left shared: its MB/s), on s1 after (b)/(c),
 *     and on s1 after `snapshot complete s1` finished (often nothing is left to copy:
 *     (b) and (c) push most units); `clone create s1 c1`, then 4k randwrite QD32 on
 *     c1 (first writes copy units: redirect-on-write) vs on the plain volume, again on
 *     c1 (steady), and 4k randread QD32 on c1.
 *  3. Migration under load: `migrate o --to X,Y` (the two disks o is not on) while fio
 *     4k randwrite QD16 runs on o; the task is polled every 0.5 s (GET /v1/status, what
 *     `status --json` prints); MB/s of the migration and fio IOPS during it (from fio's
 *     IOPS log, over the task's start..finish) vs before; then the migration back
 *     without load.
 *
 *  With 2 GiB disks a clone of s1 does not fit while o is on the same disks as s1
 *  (derived volumes are allocated on their base's disks: o + s1 fill d1,d2); the
 *  bench then runs the clone cells after the loaded migration has moved o away, and
 *  says so in the report.
 *
 * Part 4 runs on a 3-node cluster (heartbeat 200 ms, peer timeout 1500 ms): a
 * mirrored 1 GiB volume; per region size K MiB, fio 4k randwrite QD16 through node 2
 * over [0, K MiB) for 3 s, `node kill 2`, wait until node 1 reports node 2 `evicted`,
 * and report node 1's cluster.recovery.reconciledExtents/Bytes deltas vs K/4 extents
 * dirty, the time from the kill (node 2's exit) to the eviction, `volume verify`, and
 * the time node 2 takes to rejoin after `node start --id 2`.
 *
 * Every process started here (nodes, fio, CLI calls) is stopped by pid, also on error
 * or SIGINT.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import type { NodeStatus, TaskInfo, VerifyReport, VolumeInfo } from '../../src/engine/admin-api.js';
import {
  checkInterrupted, describeEnvironment, DISK_BYTES, DISK_IDS, DISKS, EXTENT, fioFirstJob, flushFiles, fmt, fmtLoad, formatMarkdownTable,
  formatTable, GiB, handleSignals, interrupted, loadAvg, log, LOOPBACK, METADATA, MiB, p99Ns, ratio, REPO_ROOT, runDve, setLogName,
  shellLine, signal, spawnNode, start, stopAllChildren, stopCluster, waitJoined, waitVolumeEverywhere, writeClusterConfig,
  type Align, type Cluster, type ClusterNode, type Environment, type RunResult,
} from './lib.js';

// ---------------------------------------------------------------- configuration

setLogName('data-bench');

const SECRET = `data-bench-secret-${process.pid}-${Date.now()}`;
const HEARTBEAT_MS = 200;
const PEER_TIMEOUT_MS = 1500;
const EXTENT_BYTES = 4 * MiB;
const VOLUME_BYTES = GiB;
const TASK_TIMEOUT_MS = 180_000;
const POLL_MS = 500;
const RECON_FIO_SECONDS = 3;
const RECON_QD = 16;
const IOPS_LOG_MS = 250;

type PartKey = 'cow' | 'snap' | 'migrate' | 'recon';
const PARTS: readonly PartKey[] = ['cow', 'snap', 'migrate', 'recon'];

interface Options {
  runtime: number;
  ramp: number;
  quick: boolean;
  parts: PartKey[];
  regions: number[];
  firstWrites: number;
  seed: number;
  json: boolean;
  readme: boolean;
  keep: boolean;
}

const USAGE = `usage: npm run bench:data -- [options]   (or: node --import tsx scripts/bench/data-bench.ts [options])
  --runtime S        seconds per fio cell (default 10; --quick: 3)
  --ramp S           fio ramp time before the measured window of steady cells (default 1)
  --quick            short runs: --runtime 3, regions 16,64 unless given
  --parts LIST       cow,snap,migrate,recon (default all)
  --regions LIST     region sizes in MiB of the reconciliation rounds (default 16,64,256)
  --first-writes N   first writes per direct copy-on-write measurement (default 200, at most 256)
  --seed N           fio random seed (default 4242)
  --json             print the results as JSON on stdout (tables go to stderr)
  --readme           print markdown tables instead of plain ones
  --keep             keep the temporary directory (configs, disks, node logs, fio logs)`;

class UsageError extends Error {}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      runtime: { type: 'string' },
      ramp: { type: 'string' },
      quick: { type: 'boolean', default: false },
      parts: { type: 'string' },
      regions: { type: 'string' },
      'first-writes': { type: 'string' },
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
  const num = (text: string | undefined, flag: string, dflt: number, min: number, max = Infinity): number => {
    if (text === undefined) return dflt;
    const n = Number(text);
    if (!Number.isFinite(n) || n < min || n > max) throw new UsageError(`${flag} must be a number from ${min} to ${max}, got ${JSON.stringify(text)}`);
    return n;
  };
  const list = (text: string | undefined): string[] | undefined => text?.split(',').map((s) => s.trim()).filter((s) => s !== '');
  const parts = list(values.parts) ?? [...PARTS];
  for (const p of parts) if (!PARTS.includes(p as PartKey)) throw new UsageError(`unknown part ${JSON.stringify(p)} (${PARTS.join(', ')})`);
  const regions = (list(values.regions) ?? (quick ? ['16', '64'] : ['16', '64', '256'])).map((r) => {
    const n = Number(r);
    if (!Number.isInteger(n) || n < 4 || n % 4 !== 0 || n * MiB > VOLUME_BYTES) throw new UsageError(`--regions: ${JSON.stringify(r)} must be a multiple of 4 MiB from 4 to ${VOLUME_BYTES / MiB}`);
    return n;
  });
  return {
    runtime: Math.round(num(values.runtime, '--runtime', quick ? 3 : 10, 1)),
    ramp: Math.round(num(values.ramp, '--ramp', 1, 0)),
    quick,
    parts: PARTS.filter((p) => parts.includes(p)),
    regions,
    firstWrites: Math.round(num(values['first-writes'], '--first-writes', 200, 1, VOLUME_BYTES / EXTENT_BYTES)),
    seed: Math.round(num(values.seed, '--seed', 4242, 0)),
    json: values.json ?? false,
    readme: values.readme ?? false,
    keep: values.keep ?? false,
  };
}

// ---------------------------------------------------------------- small helpers

interface Table { headers: string[]; rows: string[][]; align: Align[] }

function mib(bytes: number | undefined): string {
  return bytes === undefined || !Number.isFinite(bytes) ? 'n/a' : `${fmt(bytes / MiB, 0)} MiB`;
}

function errText(err: unknown): string {
  return (err as Error).message.split('\n')[0]!.slice(0, 300);
}

// ---------------------------------------------------------------- cluster processes

function writeConfig(dir: string, label: string, nodeCount: number): Promise<Cluster> {
  return writeClusterConfig(dir, {
    writtenBy: 'scripts/bench/data-bench.ts', name: `data-bench-${label}`, label, nodeCount,
    secret: SECRET, heartbeatMs: HEARTBEAT_MS, peerTimeoutMs: PEER_TIMEOUT_MS,
  });
}

/** Commands of the dve CLI this run used (TMP for the temporary directory). */
const cliCommands: string[] = [];

async function dveCli(c: Cluster, args: string[], timeoutSec = 120): Promise<RunResult> {
  const full = [...args, '--state-dir', c.stateDir];
  const line = shellLine('node', ['bin/dve.js', ...full.map((a) => a.replace(`${c.dir}/`, 'TMP/'))]);
  if (!cliCommands.includes(line)) cliCommands.push(line);
  return runDve(full, timeoutSec);
}

/** Runs a dve command with --json and parses its output; throws with the CLI's message. */
async function dveJson<T>(c: Cluster, args: string[], timeoutSec = 120): Promise<T> {
  const r = await dveCli(c, [...args, '--json'], timeoutSec);
  if (r.code !== 0) throw new Error(`dve ${args.join(' ')} failed (${r.code}): ${(r.stderr || r.stdout).trim().slice(0, 400)}`);
  return JSON.parse(r.stdout) as T;
}

async function createVolume(c: Cluster, name: string): Promise<VolumeInfo> {
  const info = await dveJson<VolumeInfo>(c, ['volume', 'create', name, '--size', `${VOLUME_BYTES / GiB}G`, '--layout', 'mirrored', '--node', '1']);
  await waitVolumeEverywhere(c, name);
  return info;
}

/** Polls a task (on node `n`) every POLL_MS until it is no longer running. */
async function waitTask(n: ClusterNode, id: string, samples?: { atMs: number; doneBytes: number; rate: number }[]): Promise<TaskInfo> {
  const deadline = Date.now() + TASK_TIMEOUT_MS;
  for (;;) {
    checkInterrupted();
    const s = await n.client.status().catch(() => null);
    const t = s?.tasks.find((x) => x.id === id);
    if (t) {
      samples?.push({ atMs: Date.now(), doneBytes: t.doneBytes, rate: t.rateBytesPerSec });
      if (t.state !== 'running') return t;
    }
    if (Date.now() > deadline) throw new Error(`task ${id} still ${t?.state ?? 'missing'} after ${TASK_TIMEOUT_MS / 1000} s`);
    await sleep(POLL_MS);
  }
}

// ---------------------------------------------------------------- fio

interface FioSpec {
  name: string;
  uri: string;
  rw: string;
  bs: string;
  iodepth: number;
  offset?: number;
  size: number;
  seed: number;
  /** Time based: seconds (and ramp); otherwise it runs to --size or --number_ios. */
  runtime?: number;
  ramp?: number;
  numberIos?: number;
  /** Prefix of a per-IOPS_LOG_MS IOPS log. */
  iopsLog?: string;
}

interface FioResult {
  iops: number;
  mbPerSec: number;
  /** 99th percentile completion latency, reads and writes (the worse). */
  p99Us: number;
  /** Mean total latency (submission + completion) of the direction that did I/O. */
  latMeanUs: number;
  totalIos: number;
  runtimeSec: number;
  /** Wall-clock ms when the job's I/O started (fio's report time less job_runtime), for the IOPS log. */
  jobStartMs?: number;
  command: string;
}

interface DirectionStats {
  iops: number;
  bw_bytes: number;
  total_ios: number;
  runtime: number;
  clat_ns: { percentile?: Record<string, number> };
  lat_ns: { mean: number };
}

function fioArgs(s: FioSpec): string[] {
  return [
    `--name=${s.name}`, '--ioengine=nbd', `--uri=${s.uri}`, '--thread',
    `--rw=${s.rw}`, `--bs=${s.bs}`, `--iodepth=${s.iodepth}`, `--offset=${s.offset ?? 0}`, `--size=${s.size}`,
    '--norandommap', `--randseed=${s.seed}`,
    ...(s.numberIos !== undefined ? [`--number_ios=${s.numberIos}`] : []),
    ...(s.runtime !== undefined ? ['--time_based', `--runtime=${s.runtime}`, ...(s.ramp ? [`--ramp_time=${s.ramp}`] : [])] : []),
    ...(s.iopsLog !== undefined ? [`--write_iops_log=${s.iopsLog}`, `--log_avg_msec=${IOPS_LOG_MS}`] : []),
    '--output-format=json',
  ];
}

function parseFio(stdout: string, command: string): FioResult {
  const { doc, job: j } = fioFirstJob<{ error: number; job_runtime?: number; read: DirectionStats; write: DirectionStats }>(stdout, 300);
  const p99 = p99Ns(j);
  const main = j.write.total_ios >= j.read.total_ios ? j.write : j.read;
  return {
    iops: j.read.iops + j.write.iops,
    mbPerSec: (j.read.bw_bytes + j.write.bw_bytes) / 1e6,
    p99Us: p99 / 1000,
    latMeanUs: main.lat_ns.mean / 1000,
    totalIos: j.read.total_ios + j.write.total_ios,
    runtimeSec: Math.max(j.read.runtime, j.write.runtime) / 1000,
    jobStartMs: doc.timestamp_ms !== undefined && j.job_runtime !== undefined ? doc.timestamp_ms - j.job_runtime : undefined,
    command,
  };
}

/** Starts fio (bounded by `timeout -s KILL`); `stop()` ends it early (SIGINT: fio still reports). */
function startFio(s: FioSpec, boundSec: number): { stop(): void; done: Promise<FioResult> } {
  const args = ['-s', 'KILL', String(boundSec), 'fio', ...fioArgs(s)];
  const command = shellLine('timeout', args).replace(/--uri=nbd:\/\/[^ ]+\/(\S+)/, '--uri=nbd://127.0.0.1:PORT/$1').replace(/--write_iops_log=\S+/, '--write_iops_log=TMP/LOG');
  const p = start('timeout', args);
  let stopped = false;
  const done = p.done.then((r) => {
    // SIGINT: timeout passes it on; fio stops its jobs and prints the JSON (exit code may be non-zero).
    if (r.code !== 0 && !(stopped && /^\{/m.test(r.stdout))) {
      throw new Error(`fio ${s.name} exited with ${r.code}: ${r.stderr.trim().slice(-600) || r.stdout.trim().slice(0, 300)}`);
    }
    return parseFio(r.stdout, command);
  });
  return {
    stop: () => {
      stopped = true;
      if (p.pid !== undefined) signal(p.pid, 'SIGINT');
    },
    done,
  };
}

function runFio(s: FioSpec): Promise<FioResult> {
  const bound = s.runtime !== undefined ? s.runtime + (s.ramp ?? 0) + 60 : 300;
  return startFio(s, bound).done;
}

/** Entries of fio's IOPS log: [ms since job start, IOPS over the preceding interval]. */
function readIopsLog(prefix: string): { tMs: number; iops: number }[] {
  const file = `${prefix}_iops.1.log`;
  if (!fs.existsSync(file)) return [];
  return fs.readFileSync(file, 'utf8').split('\n').map((l) => l.split(',').map((x) => Number(x.trim())))
    .filter((f) => f.length >= 2 && Number.isFinite(f[0]) && Number.isFinite(f[1])).map((f) => ({ tMs: f[0]!, iops: f[1]! }));
}

// ---------------------------------------------------------------- results

interface Cell {
  key: string;
  label: string;
  volume: string;
  job: string;
  result?: FioResult;
  /** Bytes the snapshot/clone still shared before and after the cell. */
  sharedBefore?: number;
  sharedAfter?: number;
  /** The volume's fast-path counters over the cell (hits, faults by class, CP-dispatched I/O). */
  fp?: { hits: number; faults: Record<string, number>; cpDispatched: number };
  note?: string;
  error?: string;
  load: number;
}

interface MigrationRun {
  label: string;
  from: string[];
  to: string[];
  underLoad: boolean;
  task?: TaskInfo;
  seconds?: number;
  mbPerSec?: number;
  /** The task's own rateBytesPerSec at the end. */
  taskRateMbPerSec?: number;
  samples: { atMs: number; doneBytes: number; rate: number }[];
  /** fio IOPS inside the task's window (from the IOPS log), and over fio's whole run. */
  fioDuringIops?: number;
  fioDuringWindows?: number;
  fio?: FioResult;
  error?: string;
  load: number;
}

interface CompleteRun {
  snapshot: string;
  /** The task's startedAt..finishedAt. */
  seconds: number;
  mbPerSec: number;
  task: TaskInfo;
}

interface OnePart {
  prefill?: { seconds: number; mbPerSec: number; command: string };
  cells: Cell[];
  snapshotCreateMs?: number;
  /** snapshot complete of sfw (what the first writes left shared) and of s1 (after (b)/(c)). */
  completes: CompleteRun[];
  clone?: { attemptedAt: string; error?: string; deferred: boolean; ranAfter?: string };
  migrations: MigrationRun[];
  /** Disks of o (before migrating). */
  originDisks?: string[];
  nodeCommand?: string;
  nodeLogs: string[];
  nodeStop?: string;
  errors: string[];
}

interface ReconRound {
  regionMiB: number;
  dirtyExtents: number;
  fio?: FioResult;
  reconciledExtents?: number;
  reconciledBytes?: number;
  killToEvictMs?: number;
  verify?: { ok: boolean; mismatches: number; comparedBytes: number };
  rejoinSec?: number;
  error?: string;
  load: number;
}

interface ReconPart {
  rounds: ReconRound[];
  nodeCommands: string[];
  nodeLogs: Record<string, string[]>;
  nodeStops: Record<string, string>;
  finalRecovery?: { reconciledExtents: number; reconciledBytes: number; evictions: number };
  errors: string[];
}

// ---------------------------------------------------------------- parts 1-3: one node

const ORIGIN = 'o';

async function onePart(opts: Options, dir: string): Promise<OnePart> {
  const part: OnePart = { cells: [], completes: [], migrations: [], nodeLogs: [], errors: [] };
  const c = await writeConfig(path.join(dir, 'one'), 'one-node', 1);
  const n1 = c.nodes[0]!;
  const uri = (v: string): string => `nbd://${LOOPBACK}:${n1.nbd}/${v}`;
  const shared = async (v: string): Promise<number | undefined> => (await n1.client.showVolume(v).catch(() => undefined))?.sharedBytes;
  const R = opts.runtime;
  let seed = opts.seed;
  const fpOf = async (v: string): Promise<VolumeInfo['fp'] | undefined> => (await n1.client.showVolume(v).catch(() => undefined))?.fp;
  const fpDelta = (a: VolumeInfo['fp'] | undefined, b: VolumeInfo['fp'] | undefined): Cell['fp'] => {
    if (!a || !b) return undefined;
    const faults: Record<string, number> = {};
    for (const [k, n] of Object.entries(b.faults)) if (n - (a.faults[k] ?? 0) !== 0) faults[k] = n - (a.faults[k] ?? 0);
    return { hits: b.hits - a.hits, faults, cpDispatched: b.cpDispatched - a.cpDispatched };
  };
  /** snapshot complete NAME, waited for; timed by the task's own startedAt..finishedAt. */
  const complete = async (snap: string): Promise<void> => {
    const task = await dveJson<TaskInfo>(c, ['snapshot', 'complete', snap]);
    const final = await waitTask(n1, task.id);
    const seconds = (Date.parse(final.finishedAt ?? new Date().toISOString()) - Date.parse(final.startedAt)) / 1000;
    part.completes.push({ snapshot: snap, seconds, mbPerSec: final.doneBytes / Math.max(0.001, seconds) / 1e6, task: final });
    if (final.state !== 'done') part.errors.push(`snapshot complete ${snap}: task ${final.state}: ${final.message ?? ''}`);
    log(`snapshot complete ${snap}: ${mib(final.doneBytes)} in ${fmt(seconds, 2)} s (${final.state})`);
  };
  const has = (p: PartKey): boolean => opts.parts.includes(p);

  /** One fio cell; failures are recorded, not thrown. */
  const cell = async (key: string, label: string, volume: string, job: 'randwrite' | 'randread', iodepth: number,
    o: { ramp?: number; sharedOf?: string; note?: string } = {}): Promise<Cell> => {
    checkInterrupted();
    const ce: Cell = { key, label, volume, job: `4k ${job} QD${iodepth}`, note: o.note, load: NaN };
    try {
      if (o.sharedOf) ce.sharedBefore = await shared(o.sharedOf);
      const fp0 = await fpOf(volume);
      ce.result = await runFio({ name: key, uri: uri(volume), rw: job, bs: '4k', iodepth, size: VOLUME_BYTES, seed: seed++, runtime: R, ramp: o.ramp ?? opts.ramp });
      ce.fp = fpDelta(fp0, await fpOf(volume));
      if (o.sharedOf) ce.sharedAfter = await shared(o.sharedOf);
    } catch (err) {
      ce.error = errText(err);
    } finally {
      ce.load = loadAvg()[0];
      flushFiles(c.diskFiles);
    }
    part.cells.push(ce);
    const sh = o.sharedOf ? `, ${o.sharedOf} shared ${mib(ce.sharedBefore)} -> ${mib(ce.sharedAfter)}` : '';
    log(`${label}: ${ce.error ? `FAILED: ${ce.error}` : `${fmt(ce.result!.iops, 0)} IOPS, p99 ${fmt(ce.result!.p99Us, 0)} µs${sh}`}`);
    return ce;
  };

  /** N QD1 4k writes with a 4 MiB stride: each the first write to its unit since `snapshot`. */
  const firstWrites = async (key: string, label: string, sharedOf?: string): Promise<void> => {
    checkInterrupted();
    const ce: Cell = { key, label, volume: ORIGIN, job: `4k write, 4 MiB stride, QD1, ${opts.firstWrites} I/Os`, load: NaN };
    try {
      if (sharedOf) ce.sharedBefore = await shared(sharedOf);
      const fp0 = await fpOf(ORIGIN);
      ce.result = await runFio({
        name: key, uri: uri(ORIGIN), rw: `write:${EXTENT_BYTES / 1024 - 4}k`, bs: '4k', iodepth: 1, size: VOLUME_BYTES, seed: seed++, numberIos: opts.firstWrites,
      });
      ce.fp = fpDelta(fp0, await fpOf(ORIGIN));
      if (sharedOf) ce.sharedAfter = await shared(sharedOf);
    } catch (err) {
      ce.error = errText(err);
    } finally {
      ce.load = loadAvg()[0];
      flushFiles(c.diskFiles);
    }
    part.cells.push(ce);
    log(`${label}: ${ce.error ? `FAILED: ${ce.error}` : `${ce.result!.totalIos} writes, mean ${fmt(ce.result!.latMeanUs, 0)} µs, p99 ${fmt(ce.result!.p99Us, 0)} µs`}`);
  };

  const cloneCells = async (): Promise<void> => {
    await cell('clone-write-first', 'clone c1: 4k randwrite QD32, first writes (units copied from s1)', 'c1', 'randwrite', 32, { ramp: 0, sharedOf: 'c1' });
    await cell('clone-plain-write', 'plain volume o: 4k randwrite QD32 (next to the clone cells)', ORIGIN, 'randwrite', 32);
    await cell('clone-write-steady', 'clone c1: 4k randwrite QD32, again (steady)', 'c1', 'randwrite', 32, { sharedOf: 'c1' });
    await cell('clone-read', 'clone c1: 4k randread QD32', 'c1', 'randread', 32, { sharedOf: 'c1' });
    // c1 is done: its space goes back (the migration back needs it).
    await dveJson(c, ['snapshot', 'delete', 'c1']).catch((err) => part.errors.push(`snapshot delete c1: ${errText(err)}`));
  };

  try {
    if (!fs.existsSync(path.join(REPO_ROOT, 'dist/src/cli/main.js'))) throw new Error('dist/src/cli/main.js is missing: build first (npx tsc -p tsconfig.json)');
    await spawnNode(c, n1);
    part.nodeCommand = n1.commandLine;
    await waitJoined(c);
    const info = await createVolume(c, ORIGIN);
    part.originDisks = info.disks;
    const p0 = performance.now();
    const pre = await runFio({ name: 'prefill', uri: uri(ORIGIN), rw: 'write', bs: '1M', iodepth: 8, size: VOLUME_BYTES, seed });
    part.prefill = { seconds: (performance.now() - p0) / 1000, mbPerSec: pre.mbPerSec, command: pre.command };
    flushFiles(c.diskFiles);
    log(`one-node: volume ${ORIGIN} (mirrored, on ${info.disks.join(',')}) prefilled in ${fmt(part.prefill.seconds, 1)} s (${fmt(pre.mbPerSec, 0)} MB/s)`);

    // ---- 1. copy-on-write, and the reads that need a fully shared snapshot
    if (has('cow')) await cell('cow-plain', '(a) plain volume o: 4k randwrite QD32', ORIGIN, 'randwrite', 32);
    if (has('snap')) await cell('read-origin', 'origin o: 4k randread QD32', ORIGIN, 'randread', 32);
    if (has('cow')) await firstWrites('first-plain', 'first write per unit, no snapshot');
    if (has('cow') || has('snap')) {
      await dveJson(c, ['snapshot', 'create', ORIGIN, 'sfw']);
      if (has('snap')) await cell('read-snap-shared', 'snapshot sfw (every unit shared, read through o): 4k randread QD32', 'sfw', 'randread', 32, { sharedOf: 'sfw' });
      if (has('cow')) await firstWrites('first-snap', 'first write per unit over a fresh snapshot (pushes the unit)', 'sfw');
      if (has('snap')) {
        await complete('sfw');
        await cell('read-snap-sfw-complete', 'snapshot sfw after snapshot complete sfw: 4k randread QD32', 'sfw', 'randread', 32, { sharedOf: 'sfw' });
      }
      // o + one snapshot fill o's two disks: sfw goes before s1 is taken.
      await dveJson(c, ['snapshot', 'delete', 'sfw']);
      const t0 = performance.now();
      await dveJson(c, ['snapshot', 'create', ORIGIN, 's1']);
      part.snapshotCreateMs = performance.now() - t0;
      log(`snapshot s1 created in ${fmt(part.snapshotCreateMs, 0)} ms (CLI round trip)`);
    }
    if (has('cow')) {
      await cell('cow-during', '(b) o right after snapshot create s1: 4k randwrite QD32 (units pushed)', ORIGIN, 'randwrite', 32, { ramp: 0, sharedOf: 's1' });
      await cell('cow-steady', '(c) o again: 4k randwrite QD32 (steady)', ORIGIN, 'randwrite', 32, { sharedOf: 's1' });
    }

    // ---- 2. snapshot reads, completion, clone
    if (has('snap')) {
      await cell('read-snap', 'snapshot s1 after (b)/(c): 4k randread QD32', 's1', 'randread', 32, { sharedOf: 's1' });
      await complete('s1');
      await cell('read-snap-complete', 'snapshot s1 after snapshot complete: 4k randread QD32', 's1', 'randread', 32, { sharedOf: 's1' });
      part.clone = { attemptedAt: 'after snapshot complete s1', deferred: false };
      try {
        await dveJson(c, ['clone', 'create', 's1', 'c1']);
        await cloneCells();
      } catch (err) {
        part.clone.error = errText(err);
        part.clone.deferred = /ENOSPC|not enough space/i.test(part.clone.error);
        log(`clone create s1 c1 failed: ${part.clone.error}${part.clone.deferred ? ' (retried once the migration has moved o off these disks)' : ''}`);
      }
    }

    // ---- 3. migration
    if (has('migrate')) {
      // A snapshot still sharing units blocks the migration: complete it first.
      const s1 = await n1.client.showVolume('s1').catch(() => undefined);
      if (s1 && (s1.sharedBytes ?? 0) > 0) await complete('s1');
      const from = (await n1.client.showVolume(ORIGIN)).disks;
      const to = DISK_IDS.filter((d) => !from.includes(d)).slice(0, 2);
      await cell('mig-before', 'o before the migration: 4k randwrite QD16', ORIGIN, 'randwrite', 16);
      part.migrations.push(await migrate(c, opts, dir, ORIGIN, from, to, true, seed++));
      if (part.clone?.deferred) {
        part.clone.ranAfter = `the loaded migration (o on ${to.join(',')}, s1 alone on ${from.join(',')})`;
        try {
          await dveJson(c, ['clone', 'create', 's1', 'c1']);
          part.clone.error = `${part.clone.error} (first attempt; the retry worked)`;
          await cloneCells();
        } catch (err) {
          part.clone.error = `${part.clone.error}; retry: ${errText(err)}`;
        }
      }
      part.migrations.push(await migrate(c, opts, dir, ORIGIN, to, from, false, seed++));
    }
  } catch (err) {
    part.errors.push(errText(err));
    log(`one-node: FAILED: ${errText(err)}`);
  } finally {
    await stopCluster(c);
    part.nodeLogs = n1.logLines;
    part.nodeStop = n1.stopNote ?? 'not started';
  }
  return part;
}

async function migrate(c: Cluster, opts: Options, dir: string, volume: string, from: string[], to: string[], underLoad: boolean, seed: number): Promise<MigrationRun> {
  const n1 = c.nodes[0]!;
  const m: MigrationRun = { label: `${volume} ${from.join(',')} -> ${to.join(',')}${underLoad ? ', fio 4k randwrite QD16 on it' : ', no load'}`, from, to, underLoad, samples: [], load: NaN };
  let fio: { stop(): void; done: Promise<FioResult> } | undefined;
  const logPrefix = path.join(dir, `mig-${to.join('')}`);
  try {
    checkInterrupted();
    if (underLoad) {
      fio = startFio({ name: 'migload', uri: `nbd://${LOOPBACK}:${n1.nbd}/${volume}`, rw: 'randwrite', bs: '4k', iodepth: 16, size: VOLUME_BYTES, seed, runtime: 600, iopsLog: logPrefix }, 660);
      fio.done.catch(() => {});
      await sleep(1500); // connected and past its start-up
    }
    const task = await dveJson<TaskInfo>(c, ['migrate', volume, '--to', to.join(',')]);
    const final = await waitTask(n1, task.id, m.samples);
    m.task = final;
    if (final.state !== 'done') throw new Error(`migration task ${final.state}: ${final.message ?? ''}`);
    const t0 = Date.parse(final.startedAt);
    const t1 = Date.parse(final.finishedAt ?? new Date().toISOString());
    m.seconds = (t1 - t0) / 1000;
    m.mbPerSec = final.doneBytes / Math.max(0.001, m.seconds) / 1e6;
    m.taskRateMbPerSec = final.rateBytesPerSec / 1e6;
    if (fio) {
      fio.stop();
      m.fio = await fio.done;
      const logEntries = readIopsLog(logPrefix);
      if (m.fio.jobStartMs !== undefined) {
        const inside = logEntries.filter((e) => m.fio!.jobStartMs! + e.tMs - IOPS_LOG_MS >= t0 && m.fio!.jobStartMs! + e.tMs <= t1);
        if (inside.length > 0) {
          m.fioDuringIops = inside.reduce((s, e) => s + e.iops, 0) / inside.length;
          m.fioDuringWindows = inside.length;
        }
      }
    }
  } catch (err) {
    m.error = errText(err);
    fio?.stop();
    await fio?.done.catch(() => undefined);
  } finally {
    m.load = loadAvg()[0];
    flushFiles(c.diskFiles);
  }
  log(`migrate ${m.label}: ${m.error ? `FAILED: ${m.error}` : `${mib(m.task?.doneBytes)} in ${fmt(m.seconds, 1)} s = ${fmt(m.mbPerSec, 1)} MB/s${m.fio ? `; fio ${fmt(m.fioDuringIops, 0)} IOPS during (whole run ${fmt(m.fio.iops, 0)})` : ''}`}`);
  return m;
}

// ---------------------------------------------------------------- part 4: reconciliation

const RECON_VOLUME = 'r';

async function reconPart(opts: Options, dir: string): Promise<ReconPart> {
  const part: ReconPart = { rounds: [], nodeCommands: [], nodeLogs: {}, nodeStops: {}, errors: [] };
  const c = await writeConfig(path.join(dir, 'recon'), 'recon', 3);
  const [n1, n2] = c.nodes as [ClusterNode, ClusterNode, ClusterNode];
  const recovery = async (): Promise<{ reconciledExtents: number; reconciledBytes: number; evictions: number }> => {
    const s: NodeStatus = await n1.client.status();
    return s.cluster?.recovery ?? { reconciledExtents: NaN, reconciledBytes: NaN, evictions: NaN };
  };
  try {
    await Promise.all(c.nodes.map((n) => spawnNode(c, n)));
    part.nodeCommands = c.nodes.map((n) => n.commandLine);
    await waitJoined(c);
    await createVolume(c, RECON_VOLUME);
    log(`recon: 3 nodes joined, volume ${RECON_VOLUME} (mirrored 1 GiB) created`);
    let seed = opts.seed + 1000;
    for (const k of opts.regions) {
      checkInterrupted();
      const round: ReconRound = { regionMiB: k, dirtyExtents: (k * MiB) / EXTENT_BYTES, load: NaN };
      part.rounds.push(round);
      try {
        const before = await recovery();
        round.fio = await runFio({
          name: `recon${k}`, uri: `nbd://${LOOPBACK}:${n2.nbd}/${RECON_VOLUME}`, rw: 'randwrite', bs: '4k', iodepth: RECON_QD, offset: 0, size: k * MiB,
          seed: seed++, runtime: RECON_FIO_SECONDS,
        });
        const kill = await dveCli(c, ['node', 'kill', '2'], 30);
        if (kill.code !== 0) throw new Error(`dve node kill 2 failed (${kill.code}): ${(kill.stderr || kill.stdout).trim().slice(0, 300)}`);
        for (let i = 0; i < 100 && n2.exitedAt === undefined; i++) await sleep(10);
        const killedAt = n2.exitedAt ?? performance.now();
        const deadline = Date.now() + 30_000;
        for (;;) {
          checkInterrupted();
          const s = await n1.client.status().catch(() => null);
          if (s?.nodes.find((x) => x.id === 2)?.state === 'evicted') break;
          if (Date.now() > deadline) throw new Error(`node 1 does not report node 2 evicted 30 s after the kill: ${JSON.stringify(s?.nodes.map((x) => [x.id, x.state]))}`);
          await sleep(20);
        }
        round.killToEvictMs = performance.now() - killedAt;
        // Reconciliation finishes before the journal is released; let the counters settle.
        let last = await recovery();
        for (let stable = 0, i = 0; stable < 4 && i < 60; i++) {
          await sleep(250);
          const now = await recovery();
          stable = now.reconciledExtents === last.reconciledExtents && now.reconciledBytes === last.reconciledBytes ? stable + 1 : 0;
          last = now;
        }
        round.reconciledExtents = last.reconciledExtents - before.reconciledExtents;
        round.reconciledBytes = last.reconciledBytes - before.reconciledBytes;
        const v = await dveCli(c, ['volume', 'verify', RECON_VOLUME, '--node', '1', '--json'], 300);
        try {
          const rep = JSON.parse(v.stdout) as VerifyReport;
          round.verify = { ok: v.code === 0 && rep.mismatches.length === 0, mismatches: rep.mismatches.length, comparedBytes: rep.comparedBytes };
        } catch {
          throw new Error(`dve volume verify failed (${v.code}): ${(v.stderr || v.stdout).trim().slice(0, 300)}`);
        }
        const r0 = performance.now();
        await spawnNode(c, n2);
        await waitJoined(c);
        round.rejoinSec = (performance.now() - r0) / 1000;
      } catch (err) {
        round.error = errText(err);
        // Bring node 2 back for the next round if it is down.
        if (n2.exited() !== undefined) await spawnNode(c, n2).then(() => waitJoined(c)).catch((e) => part.errors.push(`restarting node 2: ${errText(e)}`));
      } finally {
        round.load = loadAvg()[0];
      }
      log(`recon ${k} MiB: ${round.error ? `FAILED: ${round.error}` : `${round.reconciledExtents} extents (${mib(round.reconciledBytes)}) reconciled vs ${round.dirtyExtents} dirty; kill -> evicted ${fmt(round.killToEvictMs, 0)} ms; verify ${round.verify?.ok ? 'equal' : `${round.verify?.mismatches} mismatches`}; rejoin ${fmt(round.rejoinSec, 1)} s`}`);
    }
    part.finalRecovery = await recovery().catch(() => undefined);
  } catch (err) {
    part.errors.push(errText(err));
    log(`recon: FAILED: ${errText(err)}`);
  } finally {
    await stopCluster(c);
    for (const n of c.nodes) {
      part.nodeLogs[String(n.id)] = n.logLines;
      part.nodeStops[String(n.id)] = n.stopNote ?? 'not started';
    }
  }
  return part;
}

// ---------------------------------------------------------------- reporting

function cellOf(one: OnePart | undefined, key: string): Cell | undefined {
  return one?.cells.find((c) => c.key === key);
}

function cellTable(cells: readonly Cell[], base: (c: Cell) => Cell | undefined): Table {
  return {
    headers: ['cell', 'volume', 'job', 'IOPS', 'MB/s', 'p99 µs', 'mean lat µs', 'vs baseline', 'shared before → after', 'FP share', 'load'],
    align: ['l', 'l', 'l', 'r', 'r', 'r', 'r', 'r', 'l', 'r', 'r'],
    rows: cells.map((c) => {
      if (c.error !== undefined || !c.result) return [c.label, c.volume, c.job, 'failed', '', '', '', '', (c.error ?? '').slice(0, 80), '', fmt(c.load, 1)];
      const faults = c.fp ? Object.values(c.fp.faults).reduce((x, y) => x + y, 0) : 0;
      const b = base(c);
      return [
        c.label, c.volume, c.job, fmt(c.result.iops, 0), fmt(c.result.mbPerSec, 1), fmt(c.result.p99Us, 0), fmt(c.result.latMeanUs, 0),
        b && b !== c ? ratio(c.result.iops, b.result?.iops) : b === c ? '1.00x' : '',
        c.sharedBefore !== undefined || c.sharedAfter !== undefined ? `${mib(c.sharedBefore)} → ${mib(c.sharedAfter)}` : '',
        c.fp && c.fp.hits + faults > 0 ? `${fmt((100 * c.fp.hits) / (c.fp.hits + faults), 1)}%` : 'n/a', fmt(c.load, 1),
      ];
    }),
  };
}

/** Per cell: the volume's FP faults by class and CP-dispatched I/O over it. */
function faultLines(cells: readonly Cell[]): string[] {
  return cells.filter((c) => c.fp && (Object.keys(c.fp.faults).length > 0 || c.fp.cpDispatched > 0)).map((c) =>
    `${c.label}: ${c.fp!.hits} FP hits; faults ${Object.entries(c.fp!.faults).map(([k, n]) => `${k} ${n}`).join(', ') || 'none'}; CP-dispatched ${c.fp!.cpDispatched}`);
}

function summaryTable(one: OnePart | undefined, recon: ReconPart | undefined): Table {
  const rows: string[][] = [];
  const iops = (k: string): number | undefined => cellOf(one, k)?.result?.iops;
  const p99 = (k: string): number | undefined => cellOf(one, k)?.result?.p99Us;
  const add = (what: string, value: string, compare = ''): void => void rows.push([what, value, compare]);
  if (cellOf(one, 'cow-plain')) {
    add('CoW (a) plain o, 4k randwrite QD32', `${fmt(iops('cow-plain'), 0)} IOPS, p99 ${fmt(p99('cow-plain'), 0)} µs`);
    add('CoW (b) right after snapshot create s1', `${fmt(iops('cow-during'), 0)} IOPS, p99 ${fmt(p99('cow-during'), 0)} µs`, `${ratio(iops('cow-during'), iops('cow-plain'))} of (a); s1 still shared ${mib(cellOf(one, 'cow-during')?.sharedAfter)} after it`);
    add('CoW (c) steady', `${fmt(iops('cow-steady'), 0)} IOPS, p99 ${fmt(p99('cow-steady'), 0)} µs`, `${ratio(iops('cow-steady'), iops('cow-plain'))} of (a); s1 still shared ${mib(cellOf(one, 'cow-steady')?.sharedAfter)} after it`);
  }
  const fp = cellOf(one, 'first-plain')?.result;
  const fs_ = cellOf(one, 'first-snap')?.result;
  if (fp || fs_) {
    add('first write to a unit, no snapshot (QD1 mean)', `${fmt(fp?.latMeanUs, 0)} µs`);
    add('first write to a unit over a snapshot (QD1 mean)', `${fmt(fs_?.latMeanUs, 0)} µs`, fp && fs_ ? `+${fmt((fs_.latMeanUs - fp.latMeanUs) / 1000, 1)} ms per unit pushed (${ratio(fs_.latMeanUs, fp.latMeanUs)})` : '');
  }
  if (cellOf(one, 'read-origin')) {
    const base = iops('read-origin');
    add('randread QD32 origin o', `${fmt(base, 0)} IOPS`);
    add('randread QD32 snapshot, every unit shared (sfw)', `${fmt(iops('read-snap-shared'), 0)} IOPS`, `${ratio(iops('read-snap-shared'), base)} of origin`);
    add('randread QD32 snapshot s1 after (b)/(c)', `${fmt(iops('read-snap'), 0)} IOPS`, `${ratio(iops('read-snap'), base)} of origin; shared ${mib(cellOf(one, 'read-snap')?.sharedBefore)}`);
    add('randread QD32 s1 after snapshot complete', `${fmt(iops('read-snap-complete'), 0)} IOPS`, `${ratio(iops('read-snap-complete'), base)} of origin`);
    add('randread QD32 sfw after snapshot complete', `${fmt(iops('read-snap-sfw-complete'), 0)} IOPS`, `${ratio(iops('read-snap-sfw-complete'), base)} of origin; ${ratio(iops('read-snap-sfw-complete'), iops('read-snap-shared'))} of sfw fully shared`);
    for (const k of one?.completes ?? []) {
      add(`snapshot complete ${k.snapshot}`, k.task.doneBytes === 0 ? 'nothing left to copy' : `${mib(k.task.doneBytes)} in ${fmt(k.seconds, 2)} s`, k.task.doneBytes === 0 ? '' : `${fmt(k.mbPerSec, 0)} MB/s`);
    }
  }
  if (cellOf(one, 'clone-write-first')) {
    const base = iops('clone-plain-write');
    add('randwrite QD32 plain o (clone baseline)', `${fmt(base, 0)} IOPS`);
    add('randwrite QD32 clone c1, first writes', `${fmt(iops('clone-write-first'), 0)} IOPS, p99 ${fmt(p99('clone-write-first'), 0)} µs`, `${ratio(iops('clone-write-first'), base)} of plain; c1 shared ${mib(cellOf(one, 'clone-write-first')?.sharedAfter)} after it`);
    add('randwrite QD32 clone c1, steady', `${fmt(iops('clone-write-steady'), 0)} IOPS`, `${ratio(iops('clone-write-steady'), base)} of plain; c1 shared ${mib(cellOf(one, 'clone-write-steady')?.sharedAfter)} after it`);
    add('randread QD32 clone c1', `${fmt(iops('clone-read'), 0)} IOPS`, `${ratio(iops('clone-read'), iops('read-origin'))} of origin read`);
  } else if (one?.clone?.error) {
    add('clone create s1 c1', 'failed', one.clone.error.slice(0, 120));
  }
  for (const m of one?.migrations ?? []) {
    if (m.underLoad) {
      const before = iops('mig-before');
      add(`migrate ${m.from.join(',')} → ${m.to.join(',')} under fio load`, m.error ? `failed: ${m.error.slice(0, 80)}` : `${fmt(m.mbPerSec, 1)} MB/s (${fmt(m.seconds, 1)} s)`,
        `fio randwrite QD16: ${fmt(before, 0)} IOPS before, ${fmt(m.fioDuringIops, 0)} during (${ratio(m.fioDuringIops, before)})`);
    } else {
      add(`migrate ${m.from.join(',')} → ${m.to.join(',')} without load`, m.error ? `failed: ${m.error.slice(0, 80)}` : `${fmt(m.mbPerSec, 1)} MB/s (${fmt(m.seconds, 1)} s)`);
    }
  }
  for (const r of recon?.rounds ?? []) {
    add(`reconcile after kill, ${r.regionMiB} MiB dirty region (${r.dirtyExtents} extents)`, r.error ? `failed: ${r.error.slice(0, 80)}` : `${r.reconciledExtents} extents, ${mib(r.reconciledBytes)}`,
      r.error ? '' : `kill → evicted ${fmt(r.killToEvictMs, 0)} ms; verify ${r.verify?.ok ? 'equal' : `${r.verify?.mismatches ?? '?'} mismatch(es)`}; rejoin ${fmt(r.rejoinSec, 1)} s`);
  }
  return { headers: ['what', 'measured', 'compared'], align: ['l', 'l', 'l'], rows };
}

function report(opts: Options, env: Environment, one: OnePart | undefined, recon: ReconPart | undefined): string {
  const table = (t: Table): string => (opts.readme ? formatMarkdownTable(t.headers, t.rows, t.align) : formatTable(t.headers, t.rows, t.align));
  const h = (title: string): string => (opts.readme ? `#### ${title}` : `== ${title}`);
  const bullet = (l: string): string => (opts.readme ? `- ${l}` : `  - ${l}`);
  const out: string[] = [];
  if (one) {
    const cells = (keys: string[]): Cell[] => keys.map((k) => cellOf(one, k)).filter((c): c is Cell => c !== undefined);
    const cow = cells(['cow-plain', 'cow-during', 'cow-steady', 'first-plain', 'first-snap']);
    const all = one.cells;
    if (cow.length > 0) {
      out.push(h('Copy-on-write first-write penalty (1 node, mirrored 1 GiB volume o)'), '');
      out.push(table(cellTable(cow, (c) => (c.key.startsWith('first') ? cellOf(one, 'first-plain') : cellOf(one, 'cow-plain')))), '');
      out.push('"vs baseline": IOPS against (a), resp. the plain first-write row (for the QD1 rows compare the mean latency).', '');
    }
    const snap = cells(['read-origin', 'read-snap-shared', 'read-snap-sfw-complete', 'read-snap', 'read-snap-complete', 'clone-write-first', 'clone-plain-write', 'clone-write-steady', 'clone-read']);
    if (snap.length > 0) {
      out.push(h('Snapshot and clone throughput vs the plain volume'), '');
      out.push(table(cellTable(snap, (c) => (c.job.includes('randread') ? cellOf(one, 'read-origin') : cellOf(one, 'clone-plain-write')))), '');
      for (const k of one.completes) out.push(`snapshot complete ${k.snapshot}: ${mib(k.task.doneBytes)} still shared, copied in ${fmt(k.seconds, 2)} s (${fmt(k.mbPerSec, 0)} MB/s, task ${k.task.state}).`);
      if (one.clone?.error) out.push(`clone create s1 c1 ${one.clone.attemptedAt}: ${one.clone.error}${one.clone.ranAfter ? `. The clone cells ran after ${one.clone.ranAfter}.` : ''}`);
      out.push('');
    }
    if (one.migrations.length > 0) {
      out.push(h('Online migration of o'), '');
      const before = cellOf(one, 'mig-before');
      out.push(table({
        headers: ['migration', 'moved', 'seconds', 'MB/s', 'task rate MB/s', 'fio IOPS before', 'fio IOPS during', 'during/before', 'fio whole run', 'p99 µs', 'load'],
        align: ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
        rows: one.migrations.map((m) => m.error !== undefined ? [m.label, 'failed', m.error.slice(0, 80), '', '', '', '', '', '', '', fmt(m.load, 1)] : [
          m.label, mib(m.task?.doneBytes), fmt(m.seconds, 1), fmt(m.mbPerSec, 1), fmt(m.taskRateMbPerSec, 1),
          m.underLoad ? fmt(before?.result?.iops, 0) : '', m.underLoad ? fmt(m.fioDuringIops, 0) : '', m.underLoad ? ratio(m.fioDuringIops, before?.result?.iops) : '',
          m.fio ? fmt(m.fio.iops, 0) : '', m.fio ? fmt(m.fio.p99Us, 0) : '', fmt(m.load, 1),
        ]),
      }), '');
      for (const m of one.migrations) {
        if (m.samples.length > 0) out.push(bullet(`${m.label}: progress every ${POLL_MS} ms (MiB done): ${m.samples.map((s) => fmt(s.doneBytes / MiB, 0)).join(' ')}`));
      }
      out.push('');
    }
    const fl = faultLines(all);
    if (fl.length > 0) out.push('Fast-path faults of the volume over each cell (GET /v1/volumes/NAME fp, before/after):', ...fl.map(bullet), '');
    if (one.errors.length > 0) out.push('Errors (1-node part):', ...one.errors.map(bullet), '');
    out.push(one.nodeLogs.length > 0 ? 'Node log, 1-node cluster (warn and above, first lines):' : 'Node log, 1-node cluster: nothing at warn or above.');
    out.push(...one.nodeLogs.slice(0, 15).map(bullet), ...(one.nodeLogs.length > 15 ? [bullet(`... ${one.nodeLogs.length - 15} more`)] : []));
    out.push(`Node stop: ${one.nodeStop ?? 'n/a'}`, '');
  }
  if (recon) {
    out.push(h('Reconciliation after a crash (3 nodes; node 2 writes, is killed, node 1 evicts it)'), '');
    out.push(table({
      headers: ['region', 'extents dirty', 'fio IOPS (node 2)', 'reconciled extents', 'reconciled bytes', 'kill → evicted ms', 'verify', 'rejoin s', 'load'],
      align: ['r', 'r', 'r', 'r', 'r', 'r', 'l', 'r', 'r'],
      rows: recon.rounds.map((r) => r.error !== undefined ? [`${r.regionMiB} MiB`, String(r.dirtyExtents), 'failed', r.error.slice(0, 80), '', '', '', '', fmt(r.load, 1)] : [
        `${r.regionMiB} MiB`, String(r.dirtyExtents), fmt(r.fio?.iops, 0), String(r.reconciledExtents), mib(r.reconciledBytes), fmt(r.killToEvictMs, 0),
        r.verify?.ok ? 'equal' : `${r.verify?.mismatches ?? '?'} mismatch(es)`, fmt(r.rejoinSec, 1), fmt(r.load, 1),
      ]),
    }), '');
    if (recon.finalRecovery) out.push(`Node 1 at the end: ${recon.finalRecovery.evictions} eviction(s), ${recon.finalRecovery.reconciledExtents} extent(s) reconciled (${mib(recon.finalRecovery.reconciledBytes)}).`, '');
    if (recon.errors.length > 0) out.push('Errors (reconciliation part):', ...recon.errors.map(bullet), '');
    const logged = Object.entries(recon.nodeLogs).filter(([, l]) => l.length > 0);
    if (logged.length > 0) {
      out.push('Node logs, 3-node cluster (warn and above, first lines):');
      for (const [id, lines] of logged) out.push(...lines.slice(0, 10).map((l) => bullet(`node ${id}: ${l}`)), ...(lines.length > 10 ? [bullet(`node ${id}: ... ${lines.length - 10} more`)] : []));
    } else {
      out.push('Node logs, 3-node cluster: nothing at warn or above.');
    }
    out.push(`Node stops: ${Object.entries(recon.nodeStops).map(([id, s]) => `node ${id} ${s}`).join(', ')}`, '');
  }
  out.push(h('Summary'), '', table(summaryTable(one, recon)), '');
  out.push('How it was measured:', '', ...methodLines(opts, env, one, recon).map(bullet), '');
  return out.join('\n');
}

function commandFlags(opts: Options): string {
  const parts: string[] = [];
  if (opts.quick) parts.push('--quick');
  parts.push(`--runtime ${opts.runtime}`, `--ramp ${opts.ramp}`);
  if (opts.parts.length !== PARTS.length) parts.push(`--parts ${opts.parts.join(',')}`);
  if (opts.parts.includes('recon')) parts.push(`--regions ${opts.regions.join(',')}`);
  if (opts.firstWrites !== 200) parts.push(`--first-writes ${opts.firstWrites}`);
  if (opts.seed !== 4242) parts.push(`--seed ${opts.seed}`);
  if (opts.json) parts.push('--json');
  if (opts.readme) parts.push('--readme');
  return parts.join(' ');
}

function methodLines(opts: Options, env: Environment, one: OnePart | undefined, recon: ReconPart | undefined): string[] {
  const lines = [
    `Machine: ${env.nproc} CPUs (${env.cpuModel}), ${env.memGiB} GiB, ${env.kernel}; ${env.node}; ${env.fio}. ` +
      `Load average (1/5/15 min) before: ${fmtLoad(env.loadBefore)}, after: ${env.loadAfter ? fmtLoad(env.loadAfter) : 'n/a'}` +
      `${env.seconds !== undefined ? `; the whole run took ${fmt(env.seconds, 0)} s` : ''}. fio and every node share these CPUs (the load column is the 1-minute load average at the end of each cell).`,
    `Command: node --import tsx scripts/bench/data-bench.ts ${commandFlags(opts)}`.trimEnd(),
    `Disks: ${DISKS} sparse ${DISK_BYTES / GiB} GiB files, a ${METADATA} metadata area, ${EXTENT} extents (a unit = one extent, the volumes have one column); ` +
      `cluster heartbeat ${HEARTBEAT_MS} ms, peer timeout ${PEER_TIMEOUT_MS} ms.`,
    `fio: nbd engine (one NBD connection), --thread, --norandommap; cells are time based (--runtime=${opts.runtime}, --ramp_time=${opts.ramp}, except (b) and the clone's first-write cell: no ramp, so the pushes/copies at the start are measured). ` +
      'p99 = 99th percentile completion latency; mean lat = total latency (submit + complete); MB/s = 10^6 bytes/s; FP share = the volume\'s fp.hits / (hits + faults) over the cell. Disk files are fdatasync\'ed after every cell.',
  ];
  if (one) {
    lines.push(
      `1-node cluster: ${one.nodeCommand ?? 'node bin/dve.js node start --id 1 ...'}; volume o: node bin/dve.js volume create o --size 1G --layout mirrored (on ${one.originDisks?.join(',') ?? '?'}), ` +
        `prefilled with fio 1M sequential writes QD8${one.prefill ? ` in ${fmt(one.prefill.seconds, 1)} s (${fmt(one.prefill.mbPerSec, 0)} MB/s)` : ''}.`,
      `First write per unit: fio --rw=write:${EXTENT_BYTES / 1024 - 4}k --bs=4k --iodepth=1 --number_ios=${opts.firstWrites} on o (each write at +4 MiB: a different unit), once with no snapshot and once right after ` +
        '`snapshot create o sfw` (each write pushes its unit into sfw first). sfw is also where the "every unit shared" snapshot read ran (before the first writes); it is deleted before s1 is taken, ' +
        `because o and one snapshot fill o's two disks. ${one.snapshotCreateMs !== undefined ? `\`snapshot create o s1\` took ${fmt(one.snapshotCreateMs, 0)} ms (CLI, process start included) before (b) started.` : ''}`,
      `Tasks (snapshot complete, migrate) are polled every ${POLL_MS} ms through GET /v1/status of node 1 (what \`dve status --json\` prints). Migration MB/s = the task's doneBytes (volume bytes; a mirrored volume writes each twice) ` +
        `over its startedAt..finishedAt; fio IOPS "during" = mean of fio's ${IOPS_LOG_MS} ms IOPS log intervals that lie inside that window (fio starts 1.5 s before the migration and is stopped with SIGINT when it is done).`,
    );
  }
  if (recon) {
    lines.push(
      `3-node cluster: ${recon.nodeCommands[0] ?? 'node bin/dve.js node start --id 1 ...'} and likewise for 2 and 3; volume r mirrored 1 GiB (never prefilled). ` +
        `Per round: fio 4k randwrite QD${RECON_QD} through node 2 over [0, K MiB) for ${RECON_FIO_SECONDS} s, then \`node bin/dve.js node kill 2\` at once; kill → evicted is from node 2's exit (seen by this script, its parent) ` +
        'to node 1\'s GET /v1/status first showing node 2 "evicted" (polled every 20 ms); reconciled extents/bytes are the deltas of node 1\'s cluster.recovery counters once stable for 1 s; ' +
        '`volume verify r --node 1` afterwards; node 2 is started again and the round ends when every node sees the others joined.',
    );
  }
  if (cliCommands.length > 0) lines.push(`dve commands used: ${cliCommands.slice(0, 30).join('; ')}`);
  return lines;
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
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-data-bench-'));
  const env = await describeEnvironment();
  const t0 = performance.now();
  log(`${env.nproc} CPUs, load average ${fmtLoad(env.loadBefore)}; temporary directory ${dir}`);
  let one: OnePart | undefined;
  let recon: ReconPart | undefined;
  try {
    if (opts.parts.some((p) => p !== 'recon')) one = await onePart(opts, dir);
    checkInterrupted();
    if (opts.parts.includes('recon')) recon = await reconPart(opts, dir);
  } catch (err) {
    log(`FAILED: ${(err as Error).message}`);
  } finally {
    await stopAllChildren();
    if (!opts.keep) fs.rmSync(dir, { recursive: true, force: true });
    else log(`kept ${dir}`);
  }
  env.loadAfter = loadAvg();
  env.seconds = (performance.now() - t0) / 1000;
  const text = report(opts, env, one, recon);
  if (opts.json) {
    process.stderr.write(`${text}\n`);
    process.stdout.write(`${JSON.stringify({ environment: env, options: opts, one, recon, cliCommands }, null, 2)}\n`);
  } else {
    process.stdout.write(`${text}\n`);
  }
  const failed = (one?.errors.length ?? 0) > 0 || (one?.cells.some((c) => c.error !== undefined) ?? false) || (one?.migrations.some((m) => m.error !== undefined) ?? false) ||
    (recon?.errors.length ?? 0) > 0 || (recon?.rounds.some((r) => r.error !== undefined || r.verify?.ok === false) ?? false);
  return interrupted() ? 130 : failed ? 1 : 0;
}

main().then((code) => process.exit(code), (err: Error) => {
  process.stderr.write(`data-bench: ${err.stack ?? err.message}\n`);
  void stopAllChildren().finally(() => process.exit(1));
});
