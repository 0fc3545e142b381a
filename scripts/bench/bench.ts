/**
 * `npm run bench`: fio (nbd engine) against dve and peer NBD servers that all serve
 * the same backing file, interleaved job by job, with each server's CPU time per I/O;
 * then (the "engine" part, on by default) the same jobs against volumes of a dve node.
 *
 *   node --import tsx scripts/bench/bench.ts [--runtime S] [--ramp S] [--size SIZE]
 *        [--jobs 1,3] [--servers dve,nbdkit,qemu-nbd,nbd-server] [--seed N]
 *        [--engine-only | --no-engine] [--engine-jobs LIST|all] [--stripe-size SIZE]
 *        [--json FILE] [--readme] [--keep]
 *
 * For every job, each server in turn is started fresh on its own free loopback port,
 * probed with nbdinfo, measured with one fio run, and stopped. The server's CPU time
 * is read from /proc/PID/stat (utime+stime of its process tree, plus cutime+cstime of
 * reaped children) over exactly fio's measurement window: from `ramp` seconds after
 * fio reports its connection until fio exits.
 *
 * The engine part runs one node (`dve node start --id 1 --config`, four sparse 2 GiB disk files, 4 MiB
 * extents) for the whole run, creates a linear, a 2-way mirrored and a 2-column striped
 * volume of --size through the admin API, copies the backing file into each (nbdcopy)
 * and checks it reads back identically. Each job then runs against `dve serve` on the
 * backing file and against the volumes in turn (the node's pid for CPU), and the
 * volume's fast-path counters (GET /v1/volumes/NAME: fp.hits, fp.faults) are read at
 * the start and end of the measured window: FP share = Δhits / (Δhits + Σ Δfaults).
 */
import { spawn } from 'node:child_process';
import { randomFillSync, randomInt } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { AdminClient } from '../../src/admin/client.js';
import type { FpStatisticsView, VolumeCreateRequest, VolumeInfo } from '../../src/engine/admin-api.js';
import { fmt, formatMarkdownTable, formatTable, ratio, REPO_ROOT, shellLine, type Align } from './lib.js';

// ---------------------------------------------------------------- configuration

type ServerName = 'dve' | 'nbdkit' | 'qemu-nbd' | 'nbd-server';
const ALL_SERVERS: readonly ServerName[] = ['dve', 'nbdkit', 'qemu-nbd', 'nbd-server'];
const PEERS: readonly ServerName[] = ALL_SERVERS.filter((s) => s !== 'dve');

/** The engine part's volumes; `Target` is anything fio is pointed at. */
type VolumeKind = 'linear' | 'mirror' | 'striped';
const VOLUME_KINDS: readonly VolumeKind[] = ['linear', 'mirror', 'striped'];
type Target = ServerName | VolumeKind;

interface JobSpec {
  id: number;
  label: string;
  rw: string;
  bs: string;
  iodepth: number;
  extra: readonly string[];
}

const JOBS: readonly JobSpec[] = [
  { id: 1, label: '4k randread QD1', rw: 'randread', bs: '4k', iodepth: 1, extra: [] },
  { id: 2, label: '4k randread QD32', rw: 'randread', bs: '4k', iodepth: 32, extra: [] },
  { id: 3, label: '4k randwrite QD32', rw: 'randwrite', bs: '4k', iodepth: 32, extra: [] },
  { id: 4, label: '64k randrw 70/30 QD16', rw: 'randrw', bs: '64k', iodepth: 16, extra: ['--rwmixread=70'] },
  { id: 5, label: '1M seq read QD8', rw: 'read', bs: '1M', iodepth: 8, extra: [] },
  { id: 6, label: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, extra: [] },
];

/** The mirror is compared with linear on the write jobs only (reads go to one side, like linear). */
const MIRROR_JOBS: readonly number[] = [3, 6];
/**
 * When the whole run would take longer than ENGINE_BUDGET_SEC, the striped volume runs
 * only these jobs (linear runs every job: it shares the `dve serve` baseline with the
 * peer table; the mirror runs the write jobs).
 */
const REDUCED_STRIPED_JOBS: readonly number[] = [3, 4, 5, 6];
const ENGINE_BUDGET_SEC = 8 * 60;
const ENGINE_DISKS = 4;
const ENGINE_DISK_BYTES = 2 * 1024 ** 3;
const ENGINE_METADATA = '16M';
const ENGINE_EXTENT = '4M';
const GiB = 1024 ** 3;

const EXPORT_NAME = 'bench';
const LOOPBACK = '127.0.0.1';
const READY_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 5_000;
const MiB = 1024 * 1024;

interface Options {
  runtime: number;
  ramp: number;
  sizeBytes: number;
  seed: number;
  jobs: JobSpec[];
  servers: ServerName[];
  /** Run the peer table (false with --engine-only). */
  peers: boolean;
  /** Run the engine part (false with --no-engine). */
  engine: boolean;
  /** --engine-jobs: the engine part's jobs, overriding the automatic choice. */
  engineJobs?: JobSpec[];
  /** --stripe-size for the striped volume (default: the engine's, 64 KiB). */
  stripeBytes?: number;
  jsonFile?: string;
  readme: boolean;
  keep: boolean;
}

const USAGE = `usage: npm run bench -- [options]   (or: node --import tsx scripts/bench/bench.ts [options])
  --runtime S       measured seconds per job per server (default 10)
  --ramp S          fio ramp_time before measuring (default 2)
  --size SIZE       backing file size, e.g. 512M, 1G (default 1G)
  --jobs LIST       subset of jobs by number, e.g. 1,3 (default all):
${JOBS.map((j) => `                      ${j.id}. ${j.label}`).join('\n')}
  --servers LIST    subset of ${ALL_SERVERS.join(',')} (default all)
  --seed N          fio --randseed (default random, printed in the header)
  --engine-only     run only the engine part (dve serve vs linear, mirror, striped volumes)
  --no-engine       skip the engine part
  --engine-jobs L   the engine part's jobs, e.g. 2,3 or "all" (default: --jobs; the
                    striped volume runs only ${REDUCED_STRIPED_JOBS.join(',')} when the whole run would exceed
                    ~${ENGINE_BUDGET_SEC / 60} min); the mirror runs only write jobs ${MIRROR_JOBS.join(',')}
  --stripe-size S   stripe width of the striped volume (default: the engine's, 64K)
  --json FILE       write raw results (including fio's per-direction stats)
  --readme          rewrite the bench:begin/bench:end section of README.md
  --keep            keep the temporary directory (backing file, server configs)`;

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      runtime: { type: 'string', default: '10' },
      ramp: { type: 'string', default: '2' },
      size: { type: 'string', default: '1G' },
      seed: { type: 'string' },
      jobs: { type: 'string' },
      servers: { type: 'string' },
      'engine-only': { type: 'boolean', default: false },
      'no-engine': { type: 'boolean', default: false },
      'engine-jobs': { type: 'string' },
      'stripe-size': { type: 'string' },
      json: { type: 'string' },
      readme: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (values['engine-only'] && values['no-engine']) throw new UsageError('--engine-only and --no-engine exclude each other');
  const engineJobs = values['engine-jobs'] === undefined || values['engine-jobs'] === 'all'
    ? (values['engine-jobs'] === 'all' ? [...JOBS] : undefined)
    : selectJobs(values['engine-jobs'], '--engine-jobs');
  let stripeBytes: number | undefined;
  if (values['stripe-size'] !== undefined) {
    stripeBytes = parseBytes(values['stripe-size'], '--stripe-size');
    if (stripeBytes < 4096 || (stripeBytes & (stripeBytes - 1)) !== 0) throw new UsageError('--stripe-size must be a power of two, at least 4K');
  }
  return {
    runtime: positiveInt(values.runtime, '--runtime'),
    ramp: nonNegativeInt(values.ramp, '--ramp'),
    sizeBytes: parseSize(values.size),
    seed: values.seed === undefined ? randomInt(1, 2 ** 31) : positiveInt(values.seed, '--seed'),
    jobs: selectJobs(values.jobs, '--jobs'),
    servers: selectServers(values.servers),
    peers: !values['engine-only'],
    engine: !values['no-engine'],
    engineJobs,
    stripeBytes,
    jsonFile: values.json,
    readme: values.readme,
    keep: values.keep,
  };
}

function positiveInt(text: string, flag: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${flag} must be a positive integer, got "${text}"`);
  return n;
}

function nonNegativeInt(text: string, flag: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`${flag} must be a non-negative integer, got "${text}"`);
  return n;
}

/** "1G", "512M", "1GiB", "1073741824" -> bytes; must be a whole number of MiB, >= 16 MiB. */
function parseSize(text: string): number {
  const bytes = parseBytes(text, '--size');
  if (bytes % MiB !== 0 || bytes < 16 * MiB) throw new UsageError(`--size must be a multiple of 1 MiB and >= 16 MiB`);
  return bytes;
}

function parseBytes(text: string, flag: string): number {
  const m = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(text.trim());
  if (!m) throw new UsageError(`${flag}: cannot parse "${text}" (try 1G, 512M, 64K)`);
  const exponent = ' kmgt'.indexOf((m[2] || ' ').toLowerCase());
  return Number(m[1]) * 1024 ** exponent;
}

function splitList(text: string): string[] {
  return text.split(',').map((s) => s.trim()).filter((s) => s !== '');
}

function selectJobs(text: string | undefined, flag: string): JobSpec[] {
  if (text === undefined) return [...JOBS];
  return [...new Set(splitList(text))].map((id) => {
    const job = JOBS.find((j) => String(j.id) === id);
    if (!job) throw new UsageError(`${flag}: no job "${id}" (jobs are 1..${JOBS.length})`);
    return job;
  });
}

function selectServers(text: string | undefined): ServerName[] {
  if (text === undefined) return [...ALL_SERVERS];
  return splitList(text).map((name) => {
    const server = ALL_SERVERS.find((s) => s === name);
    if (!server) throw new UsageError(`--servers: unknown server "${name}" (known: ${ALL_SERVERS.join(', ')})`);
    return server;
  });
}

class UsageError extends Error {}

// ---------------------------------------------------------------- processes

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion (bounded by `timeout -s KILL` where it matters). */
function run(command: string, args: readonly string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', (err) => resolve({ code: null, stdout, stderr: stderr + err.message }));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Every process this script started and has not yet seen stop, for cleanup on SIGINT. */
const livePids = new Set<number>();

/** Set by SIGINT/SIGTERM: the run unwinds, stopping what it started, and exits 130. */
let interruptedBy: NodeJS.Signals | undefined;

function checkInterrupted(): void {
  if (interruptedBy !== undefined) throw new Error(`interrupted by ${interruptedBy}`);
}

interface ProcStat {
  pid: number;
  ppid: number;
  state: string;
  ticks: number; // utime + stime + cutime + cstime
}

/** Parses /proc/PID/stat; fields after the ")" that closes comm start at field 3. */
function readStat(pid: number): ProcStat | undefined {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const field = (n: number): number => Number(f[n - 3]);
  return { pid, ppid: field(4), state: f[0] ?? '?', ticks: field(14) + field(15) + field(16) + field(17) };
}

function allStats(): ProcStat[] {
  const stats: ProcStat[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = readStat(Number(entry));
    if (stat) stats.push(stat);
  }
  return stats;
}

function descendants(root: number, stats: ProcStat[] = allStats()): ProcStat[] {
  const found: ProcStat[] = [];
  const frontier = [root];
  while (frontier.length > 0) {
    const parent = frontier.pop();
    for (const s of stats) {
      if (s.ppid === parent) {
        found.push(s);
        frontier.push(s.pid);
      }
    }
  }
  return found;
}

/**
 * CPU clock ticks used so far by a server: utime+stime of the process (which already
 * sums its threads) and of every live descendant, plus cutime+cstime, so children that
 * exited and were reaped during the window (nbd-server forks one per connection) count.
 */
function cpuTicks(rootPid: number): { ticks: number; processes: number } {
  const stats = allStats();
  const root = stats.find((s) => s.pid === rootPid);
  if (!root) throw new Error(`server process ${rootPid} has gone away`);
  const tree = [root, ...descendants(rootPid, stats)];
  return { ticks: tree.reduce((sum, s) => sum + s.ticks, 0), processes: tree.length };
}

function isGone(pid: number): boolean {
  const stat = readStat(pid);
  return stat === undefined || stat.state === 'Z' || stat.state === 'X';
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

async function waitGone(pids: readonly number[], timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (pids.every(isGone)) return true;
    await sleep(25);
  }
  return pids.every(isGone);
}

/** SIGTERM the root, then SIGKILL anything of its tree still alive after a grace period. */
async function stopProcessTree(rootPid: number): Promise<void> {
  const pids = [rootPid, ...descendants(rootPid).map((s) => s.pid)];
  signal(rootPid, 'SIGTERM');
  if (!(await waitGone(pids, STOP_TIMEOUT_MS))) {
    for (const pid of pids) if (!isGone(pid)) signal(pid, 'SIGKILL');
    await waitGone(pids, STOP_TIMEOUT_MS);
  }
  for (const pid of pids) livePids.delete(pid);
}

function getFreePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, LOOPBACK, () => {
      const address = srv.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error('no free port'))));
    });
  });
}

/** Keeps the last `limit` characters of a stream, for error messages. */
class Tail {
  private text = '';
  constructor(private readonly limit = 4000) {}
  push(chunk: Buffer | string): void {
    this.text = (this.text + chunk.toString()).slice(-this.limit);
  }
  toString(): string {
    return this.text.trim();
  }
}

// ---------------------------------------------------------------- servers

interface LaunchContext {
  file: string;
  port: number;
  dir: string;
}

interface LaunchPlan {
  command: string;
  args: string[];
  /** The command daemonizes: it exits 0 once the server runs, whose PID is in this file. */
  pidFile?: string;
  /** Wait for a line on stdout containing this before probing with nbdinfo. */
  readyText?: string;
}

interface ServerDef {
  version(): Promise<string>;
  plan(ctx: LaunchContext): LaunchPlan;
}

const SERVER_DEFS: Record<ServerName, ServerDef> = {
  // dve does no user-space caching and acknowledges a write once pwrite returns.
  dve: {
    version: dveVersion,
    plan: ({ file, port }) => ({
      command: process.execPath,
      args: [path.join(REPO_ROOT, 'bin/dve.js'), 'serve', file, '--port', String(port), '--export', EXPORT_NAME],
      readyText: 'nbd://',
    }),
  },
  // file plugin: pread/pwrite on the page cache, no flush unless the client asks; default 16 threads.
  nbdkit: {
    version: () => firstLine(['nbdkit', '--version']),
    plan: ({ file, port }) => ({
      command: 'nbdkit',
      args: ['-f', '-i', LOOPBACK, '-p', String(port), '-e', EXPORT_NAME, 'file', file],
    }),
  },
  // Defaults spelled out: cache=writeback (pwrite, no fsync per write) and aio=threads,
  // the same durability contract as dve and nbdkit. --persistent: survive the nbdinfo probe.
  'qemu-nbd': {
    version: () => firstLine(['qemu-nbd', '--version']),
    plan: ({ file, port }) => ({
      command: 'qemu-nbd',
      args: ['-f', 'raw', '-b', LOOPBACK, '-p', String(port), '-x', EXPORT_NAME, '--persistent', '--shared=16',
        '--cache=writeback', '--aio=threads', file],
    }),
  },
  // nbd-server's foreground mode (-d) serves a single connection and exits, and fio
  // connects twice (size probe, then the job), so it runs as the daemon it normally is;
  // it forks one child per connection, which cpuTicks() follows via the process tree.
  'nbd-server': {
    version: async () => (await firstLine(['nbd-server', '-V'])).replace(/^This is nbd-server version /, 'nbd-server '),
    plan: ({ file, port, dir }) => {
      const conf = path.join(dir, `nbd-server-${port}.conf`);
      const pidFile = path.join(dir, `nbd-server-${port}.pid`);
      fs.writeFileSync(conf, [
        '[generic]',
        `port = ${port}`,
        `listenaddr = ${LOOPBACK}`,
        `[${EXPORT_NAME}]`,
        `exportname = ${file}`,
        '',
      ].join('\n'));
      return { command: 'nbd-server', args: ['-C', conf, '-p', pidFile], pidFile };
    },
  },
};

interface RunningServer {
  name: Target;
  pid: number;
  uri: string;
  commandLine: string;
  output: Tail;
}

function uriFor(port: number): string {
  return `nbd://${LOOPBACK}:${port}/${EXPORT_NAME}`;
}

/** Starts a server and returns once it answers an NBD handshake with the right size. */
async function spawnServer(name: ServerName, ctx: LaunchContext, sizeBytes: number): Promise<RunningServer> {
  const plan = SERVER_DEFS[name].plan(ctx);
  const output = new Tail();
  const child = spawn(plan.command, plan.args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const childPid = child.pid;
  if (childPid !== undefined) livePids.add(childPid);
  const exited = new Promise<string>((resolve) => {
    child.on('error', (err) => resolve(err.message));
    child.on('exit', (code, sig) => {
      if (childPid !== undefined) livePids.delete(childPid);
      resolve(sig ? `killed by ${sig}` : `exited with code ${code}`);
    });
  });
  let stdoutText = '';
  const readySeen = new Promise<void>((resolve) => {
    child.stdout.on('data', (d: Buffer) => {
      output.push(d);
      if (plan.readyText === undefined) return;
      stdoutText = (stdoutText + d.toString()).slice(-4096);
      if (stdoutText.includes(plan.readyText)) resolve();
    });
  });
  child.stderr.on('data', (d: Buffer) => output.push(d));
  const server: RunningServer = {
    name,
    pid: child.pid ?? -1,
    uri: uriFor(ctx.port),
    commandLine: shellLine(plan.command === process.execPath ? 'node' : plan.command, plan.args),
    output,
  };
  try {
    if (plan.pidFile !== undefined) {
      server.pid = await waitDaemon(plan.pidFile, exited);
      livePids.add(server.pid);
    }
    if (plan.readyText !== undefined) await waitForText(server.name, plan.readyText, readySeen, exited);
    await waitReady(server, plan.pidFile === undefined ? exited : undefined, sizeBytes);
    return server;
  } catch (err) {
    if (server.pid > 0) await stopProcessTree(server.pid);
    if (childPid !== undefined && childPid !== server.pid) await stopProcessTree(childPid);
    const detail = output.toString();
    throw new Error(`${(err as Error).message}${detail ? `\n    server output: ${detail.replace(/\n/g, '\n    ')}` : ''}`);
  }
}

/** For a daemonizing server: the launcher must exit 0, then the daemon's PID is in pidFile. */
async function waitDaemon(pidFile: string, exited: Promise<string>): Promise<number> {
  const how = await Promise.race([exited, sleep(READY_TIMEOUT_MS).then(() => 'timed out')]);
  if (how !== 'exited with code 0') throw new Error(`launcher ${how}`);
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const pid = Number(fs.existsSync(pidFile) ? fs.readFileSync(pidFile, 'utf8').trim() : NaN);
    if (Number.isInteger(pid) && pid > 0) return pid;
    await sleep(50);
  }
  throw new Error(`no PID in ${pidFile}`);
}

/** For a server that announces itself on stdout (dve prints its nbd:// URI). */
async function waitForText(name: Target, text: string, seen: Promise<void>, exited: Promise<string>): Promise<void> {
  const how = await Promise.race([seen.then(() => 'ready'), exited, sleep(READY_TIMEOUT_MS).then(() => 'timed out')]);
  if (how !== 'ready') throw new Error(`${name} ${how} before printing "${text}"`);
}

/**
 * Polls `nbdinfo --size` (each try bounded by `timeout -s KILL 10`) until the export
 * answers with the expected size. `exited` settles if the server process (when it is
 * our direct child) exits; a daemon is checked through /proc instead.
 */
async function waitReady(server: RunningServer, exited: Promise<string> | undefined, sizeBytes: number): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let died: string | undefined;
  void exited?.then((how) => (died = how));
  const alive = (): boolean => (exited ? died === undefined : !isGone(server.pid));
  let last = '';
  while (Date.now() < deadline) {
    if (!alive()) throw new Error(`${server.name} ${died ?? 'died'} before accepting connections`);
    const probe = await run('timeout', ['-s', 'KILL', '10', 'nbdinfo', '--size', server.uri]);
    if (probe.code === 0) {
      const size = Number(probe.stdout.trim());
      if (size !== sizeBytes) throw new Error(`${server.name} reports size ${size}, expected ${sizeBytes}`);
      return;
    }
    last = probe.stderr.trim();
    await sleep(100);
  }
  throw new Error(`${server.name} not accepting connections after ${READY_TIMEOUT_MS / 1000}s: ${last}`);
}

// ---------------------------------------------------------------- fio

interface DirectionStats {
  iops: number;
  bw_bytes: number;
  total_ios: number;
  runtime: number;
  clat_ns: { percentile?: Record<string, number> };
}

interface FioJob {
  error: number;
  read: DirectionStats;
  write: DirectionStats;
  mixed?: DirectionStats;
}

interface Measurement {
  job: number;
  jobLabel: string;
  server: Target;
  iops: number;
  mbPerSec: number;
  p99Us: number;
  totalIos: number;
  cpuTicks: number;
  cpuWindowSec: number;
  cpuUsPerIo: number;
  serverCpuPercent: number;
  serverProcesses: number;
  /** 1-minute load average right after the fio run (other work on the machine skews results). */
  loadAvg: number;
  serverCommand: string;
  fioCommand: string;
  fio: { read: DirectionStats; write: DirectionStats };
  /** Engine volumes: the fast-path counters over the measured window. */
  fp?: FpWindow;
  /** Engine volumes: the volume's state when the window ended (ok, degraded, resyncing). */
  volumeState?: string;
}

function fioArgs(job: JobSpec, uri: string, opts: Options): string[] {
  return [
    `--name=job${job.id}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--thread',
    '--numjobs=1',
    `--rw=${job.rw}`,
    ...job.extra,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    '--norandommap',
    `--randseed=${opts.seed}`,
    '--time_based',
    `--runtime=${opts.runtime}`,
    `--ramp_time=${opts.ramp}`,
    '--group_reporting',
    '--unified_rw_reporting=both',
    '--output-format=json',
  ];
}

/** fio prints "fio: connected to NBD server" once its job connection is up; I/O starts then. */
const FIO_CONNECTED = 'connected to NBD server';

/**
 * Runs fio under `timeout -s KILL (runtime+ramp+60)` and samples the server's CPU ticks
 * when the ramp ends and again after fio exits (and the server's per-connection
 * children, if any, have been reaped). `onWindowStart` runs right after the first sample.
 */
async function runFio(job: JobSpec, server: RunningServer, opts: Options, clkTck: number,
  onWindowStart?: () => void): Promise<Measurement> {
  const args = fioArgs(job, server.uri, opts);
  const bound = String(opts.runtime + opts.ramp + 60);
  const child = spawn('timeout', ['-s', 'KILL', bound, 'fio', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  if (child.pid !== undefined) livePids.add(child.pid);
  let stdout = '';
  const stderr = new Tail();
  let start: { ticks: number; processes: number; at: number } | undefined;
  let startError: Error | undefined;
  let timer: NodeJS.Timeout | undefined;
  const armWindow = (): void => {
    timer ??= setTimeout(() => {
      try {
        start = { ...cpuTicks(server.pid), at: performance.now() };
        onWindowStart?.();
      } catch (err) {
        startError = err as Error;
      }
    }, opts.ramp * 1000);
  };
  child.stdout.on('data', (d: Buffer) => {
    stdout += d.toString();
    if (stdout.includes(FIO_CONNECTED)) armWindow();
  });
  child.stderr.on('data', (d: Buffer) => stderr.push(d));
  const code = await new Promise<number | null>((resolve) => {
    child.on('error', (err) => {
      stderr.push(err.message);
      resolve(null);
    });
    child.on('close', (c) => resolve(c));
  });
  const end = performance.now();
  clearTimeout(timer);
  if (child.pid !== undefined) livePids.delete(child.pid);

  const fioCommand = shellLine('timeout', ['-s', 'KILL', bound, 'fio', ...args]);
  if (code !== 0) throw new Error(`fio exited with ${code}: ${stderr.toString() || stdout.slice(0, 2000)}`);
  if (startError) throw startError;
  if (!start) throw new Error(`fio finished before its ramp ended (no "${FIO_CONNECTED}" seen?)`);
  await settleChildren(server.pid, start.processes);
  const stop = cpuTicks(server.pid);

  const fioJob = parseFioJson(stdout);
  const total = fioJob.mixed ?? combineDirections(fioJob.read, fioJob.write);
  const ticks = stop.ticks - start.ticks;
  const windowSec = (end - start.at) / 1000;
  return {
    job: job.id,
    jobLabel: job.label,
    server: server.name,
    iops: total.iops,
    mbPerSec: total.bw_bytes / 1e6,
    p99Us: (total.clat_ns.percentile?.['99.000000'] ?? NaN) / 1000,
    totalIos: total.total_ios,
    cpuTicks: ticks,
    cpuWindowSec: windowSec,
    cpuUsPerIo: total.total_ios > 0 ? ((ticks / clkTck) * 1e6) / total.total_ios : NaN,
    serverCpuPercent: (100 * ticks) / clkTck / windowSec,
    serverProcesses: stop.processes,
    loadAvg: os.loadavg()[0] ?? 0,
    serverCommand: server.commandLine,
    fioCommand,
    fio: { read: fioJob.read, write: fioJob.write },
  };
}

/** Waits (up to 1 s) until per-connection children that appeared during the run are reaped. */
async function settleChildren(rootPid: number, expected: number): Promise<void> {
  const deadline = Date.now() + 1000;
  while (Date.now() < deadline && cpuTicks(rootPid).processes > expected) await sleep(20);
}

/** fio's nbd engine prints a line before the JSON document; parse from the first "{" line. */
function parseFioJson(stdout: string): FioJob {
  const at = stdout.search(/^\{/m);
  if (at < 0) throw new Error(`no JSON in fio output: ${stdout.slice(0, 500)}`);
  const doc = JSON.parse(stdout.slice(at)) as { jobs?: FioJob[] };
  const job = doc.jobs?.[0];
  if (!job) throw new Error('fio JSON has no jobs');
  if (job.error !== 0) throw new Error(`fio job error ${job.error}`);
  return job;
}

function combineDirections(read: DirectionStats, write: DirectionStats): DirectionStats {
  const p99 = Math.max(read.clat_ns.percentile?.['99.000000'] ?? 0, write.clat_ns.percentile?.['99.000000'] ?? 0);
  return {
    iops: read.iops + write.iops,
    bw_bytes: read.bw_bytes + write.bw_bytes,
    total_ios: read.total_ios + write.total_ios,
    runtime: Math.max(read.runtime, write.runtime),
    clat_ns: { percentile: { '99.000000': p99 } },
  };
}

// ---------------------------------------------------------------- environment

interface Environment {
  date: string;
  nproc: number;
  cpuModel: string;
  memGiB: number;
  kernel: string;
  clkTck: number;
  /** 1-minute load average before the run: other work on the machine skews the numbers. */
  loadAvg: number;
  versions: Record<string, string>;
}

async function firstLine(command: readonly string[]): Promise<string> {
  const [cmd, ...args] = command;
  if (cmd === undefined) return 'unknown';
  const r = await run(cmd, args);
  const line = `${r.stdout}\n${r.stderr}`.split('\n').map((l) => l.trim()).find((l) => l !== '');
  return r.code === 0 && line ? line : 'not available';
}

async function describeEnvironment(servers: readonly ServerName[]): Promise<Environment> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const clk = await run('getconf', ['CLK_TCK']);
  const versions: Record<string, string> = {
    fio: await firstLine(['fio', '--version']),
    node: process.version,
    nbdinfo: await firstLine(['nbdinfo', '--version']),
  };
  for (const s of servers) {
    versions[s] = await SERVER_DEFS[s].version();
  }
  return {
    date: new Date().toISOString(),
    nproc: os.availableParallelism(),
    cpuModel: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? os.cpus()[0]?.model ?? 'unknown',
    memGiB: Math.round(os.totalmem() / 1024 ** 3),
    kernel: `${os.type()} ${os.release()}`,
    clkTck: Number(clk.stdout.trim()) || 100,
    loadAvg: os.loadavg()[0] ?? 0,
    versions,
  };
}

async function dveVersion(): Promise<string> {
  const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version?: string };
  const rev = await run('git', ['-C', REPO_ROOT, 'rev-parse', '--short', 'HEAD']);
  return `dve ${pkg.version ?? '?'}${rev.code === 0 ? ` (git ${rev.stdout.trim()})` : ''}`;
}

/** Writes non-zero random data once; every server then serves this same file. */
function createBackingFile(file: string, sizeBytes: number): void {
  const chunk = Buffer.alloc(MiB);
  const fd = fs.openSync(file, 'w');
  try {
    for (let offset = 0; offset < sizeBytes; offset += MiB) {
      randomFillSync(chunk);
      fs.writeSync(fd, chunk, 0, MiB, offset);
    }
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Writes back what the last server dirtied, so the next one starts from a clean page cache. */
function flushBackingFile(file: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

// ---------------------------------------------------------------- reporting

interface Report {
  headers: string[];
  rows: string[][];
  align: Align[];
}

function resultsReport(results: readonly Measurement[], failures: readonly Failure[], jobs: readonly JobSpec[],
  servers: readonly ServerName[]): Report {
  const rows: string[][] = [];
  for (const job of jobs) {
    for (const server of servers) {
      const m = results.find((r) => r.job === job.id && r.server === server);
      const failed = failures.find((f) => f.job === job.id && f.server === server);
      if (m) {
        rows.push([`${job.id}. ${job.label}`, server, fmt(m.iops, 0), fmt(m.mbPerSec, 1), fmt(m.p99Us, 0),
          fmt(m.cpuUsPerIo, 2), fmt(m.serverCpuPercent, 0)]);
      } else if (failed) {
        rows.push([`${job.id}. ${job.label}`, server, 'failed', '', '', '', '']);
      }
    }
  }
  return {
    headers: ['job', 'server', 'IOPS', 'MB/s', 'p99 µs', 'CPU µs/IO', 'CPU %'],
    rows,
    align: ['l', 'l', 'r', 'r', 'r', 'r', 'r'],
  };
}

/** dve relative to nbdkit and to the best peer per job (highest IOPS, lowest CPU per I/O). */
function ratioReport(results: readonly Measurement[], jobs: readonly JobSpec[]): Report {
  const rows: string[][] = [];
  for (const job of jobs) {
    const of = (s: ServerName): Measurement | undefined => results.find((r) => r.job === job.id && r.server === s);
    const dve = of('dve');
    const nbdkit = of('nbdkit');
    const peers = PEERS.map(of).filter((m): m is Measurement => m !== undefined);
    const fastest = [...peers].sort((a, b) => b.iops - a.iops)[0];
    const leanest = [...peers].sort((a, b) => a.cpuUsPerIo - b.cpuUsPerIo)[0];
    rows.push([
      `${job.id}. ${job.label}`,
      ratio(dve?.iops, nbdkit?.iops),
      ratio(dve?.cpuUsPerIo, nbdkit?.cpuUsPerIo),
      fastest ? `${ratio(dve?.iops, fastest.iops)} (${fastest.server})` : 'n/a',
      leanest ? `${ratio(dve?.cpuUsPerIo, leanest.cpuUsPerIo)} (${leanest.server})` : 'n/a',
    ]);
  }
  return {
    headers: ['job', 'IOPS dve/nbdkit', 'CPU/IO dve/nbdkit', 'IOPS dve/best peer', 'CPU/IO dve/best peer'],
    rows,
    align: ['l', 'r', 'r', 'r', 'r'],
  };
}

function methodText(opts: Options, env: Environment): string[] {
  return [
    `${env.versions.fio} with its nbd engine (libnbd), one connection (--numjobs=1 --thread), --time_based ` +
      `--runtime=${opts.runtime} --ramp_time=${opts.ramp} --norandommap --randseed=${opts.seed}; ` +
      'the same options against every server.',
    `Backing file: ${formatBytes(opts.sizeBytes)} of random data, one file shared by all servers, in the page cache ` +
      '(this measures per-request server overhead, not the disk); fdatasync between runs.',
    'Each server is started fresh per job on its own loopback port; jobs are interleaved (for each job, every server in turn).',
    'CPU µs/IO = server CPU (utime+stime from /proc/PID/stat, all threads and child processes) over the measured ' +
      'window (ramp end to fio exit) / I/Os fio completed in that window. CPU % = server CPU / window wall time ' +
      `(${env.nproc} cores shared with fio).`,
    'p99 = 99th percentile completion latency (clat), reads and writes together. MB/s = 10^6 bytes/s.',
  ];
}

/** First line of an error, plus the first line of server output that names an error. */
function briefly(error: string): string {
  const [head = '', ...rest] = error.split('\n').map((l) => l.trim());
  const cause = rest.find((l) => /error/i.test(l) && !l.startsWith('at '));
  return cause ? `${head} (${cause})` : head;
}

function formatBytes(n: number): string {
  if (n % 1024 ** 3 === 0) return `${n / 1024 ** 3} GiB`;
  return n % MiB === 0 || n >= MiB ? `${n / MiB} MiB` : `${n / 1024} KiB`;
}

interface Failure {
  job: number;
  server: Target;
  error: string;
}

// ---------------------------------------------------------------- engine reporting

/** "load average 1.27 at start, up to 8.66 during the run": other work skews the numbers. */
function loadText(env: Environment, results: readonly Measurement[]): string {
  const peak = Math.max(env.loadAvg, ...results.map((r) => r.loadAvg));
  return `load average ${env.loadAvg.toFixed(2)} at start, up to ${peak.toFixed(2)} during the run`;
}

const TARGET_LABEL: Record<VolumeKind | 'dve', string> = { dve: 'serve', linear: 'linear', mirror: 'mirror', striped: 'striped' };

/** A fraction as a percentage, never rounded up to 100% unless it is 1. */
function formatShare(x: number | undefined): string {
  if (x === undefined || !Number.isFinite(x)) return 'n/a';
  if (x === 1) return '100%';
  return `${(Math.floor(x * 10_000) / 100).toFixed(2)}%`;
}

function formatFaults(faults: Record<string, number>): string {
  const parts = Object.entries(faults).filter(([, n]) => n !== 0).map(([k, n]) => `${k} ${fmt(n, 0)}`);
  return parts.length > 0 ? parts.join(', ') : 'none';
}

/** The jobs the engine part ran, in job order. */
function engineJobList(jobs: EngineJobs): JobSpec[] {
  return JOBS.filter((j) => VOLUME_KINDS.some((k) => jobs[k].includes(j)));
}

function engineResultsReport(results: readonly Measurement[], failures: readonly Failure[], jobs: EngineJobs): Report {
  const rows: string[][] = [];
  for (const job of engineJobList(jobs)) {
    const targets: Target[] = ['dve', ...VOLUME_KINDS.filter((k) => jobs[k].includes(job))];
    for (const t of targets) {
      const label = TARGET_LABEL[t as VolumeKind | 'dve'];
      const m = results.find((r) => r.job === job.id && r.server === t);
      if (m) {
        rows.push([`${job.id}. ${job.label}`, label, fmt(m.iops, 0), fmt(m.mbPerSec, 1), fmt(m.p99Us, 0),
          fmt(m.cpuUsPerIo, 2), fmt(m.serverCpuPercent, 0), m.fp ? formatShare(m.fp.share) : '']);
      } else if (failures.some((f) => f.job === job.id && f.server === t)) {
        rows.push([`${job.id}. ${job.label}`, label, 'failed', '', '', '', '', '']);
      }
    }
  }
  return {
    headers: ['job', 'target', 'IOPS', 'MB/s', 'p99 µs', 'CPU µs/IO', 'CPU %', 'FP share'],
    rows,
    align: ['l', 'l', 'r', 'r', 'r', 'r', 'r', 'r'],
  };
}

function engineRatioReport(results: readonly Measurement[], jobs: EngineJobs): Report {
  const rows: string[][] = [];
  for (const job of engineJobList(jobs)) {
    const of = (t: Target): Measurement | undefined => results.find((r) => r.job === job.id && r.server === t);
    const serve = of('dve');
    const linear = of('linear');
    const pair = (k: VolumeKind, base: Measurement | undefined): string[] => {
      if (!jobs[k].includes(job)) return ['–', '–'];
      const m = of(k);
      return [ratio(m?.iops, base?.iops), ratio(m?.cpuUsPerIo, base?.cpuUsPerIo)];
    };
    rows.push([`${job.id}. ${job.label}`, ...pair('linear', serve), ...pair('mirror', linear), ...pair('striped', linear)]);
  }
  return {
    headers: ['job', 'IOPS linear/serve', 'CPU/IO linear/serve', 'IOPS mirror/linear', 'CPU/IO mirror/linear',
      'IOPS striped/linear', 'CPU/IO striped/linear'],
    rows,
    align: ['l', 'r', 'r', 'r', 'r', 'r', 'r'],
  };
}

function fpReport(results: readonly Measurement[], engine: EngineState): Report {
  const rows: string[][] = [];
  for (const vol of engine.node?.volumes.values() ?? []) {
    const runs = results.filter((r) => r.server === vol.kind && r.fp !== undefined);
    if (runs.length === 0) continue;
    const fp = sumFp(runs.map((r) => r.fp!));
    const i = vol.info;
    const shape = i.layout === 'striped' ? `striped ${i.columns} × ${formatBytes(i.stripeBytes ?? 0)}`
      : i.layout === 'mirrored' ? `mirrored × ${i.copies}` : i.layout;
    rows.push([vol.kind, shape, i.disks.join(','), String(i.extents), i.state, fmt(runs.reduce((n, r) => n + r.totalIos, 0), 0),
      fmt(fp.hits, 0), fmt(fp.faultTotal, 0), formatShare(fp.share), formatFaults(fp.faults)]);
  }
  return {
    headers: ['volume', 'layout', 'disks', 'extents', 'state at end', 'fio I/Os', 'FP hits', 'faults', 'FP share', 'faults by class'],
    rows,
    align: ['l', 'l', 'l', 'r', 'l', 'r', 'r', 'r', 'r', 'l'],
  };
}

/** One line per goal: linear/serve ≥ 0.95x, mirror/linear ≥ 0.8x on writes, FP share 100%. */
function engineAims(results: readonly Measurement[], engine: EngineState): string[] {
  const jobs = engine.plan.jobs;
  const of = (job: JobSpec, t: Target): Measurement | undefined => results.find((r) => r.job === job.id && r.server === t);
  const check = (what: string, aim: number, kind: VolumeKind, base: Target): string | undefined => {
    const pairs = jobs[kind].map((j) => ({ j, m: of(j, kind), b: of(j, base) }))
      .filter((x): x is { j: JobSpec; m: Measurement; b: Measurement } => x.m !== undefined && x.b !== undefined);
    if (pairs.length === 0) return undefined;
    const below = pairs.filter((x) => x.m.iops / x.b.iops < aim);
    return `${what} IOPS ≥ ${fmt(aim, 2)}x: met on ${pairs.length - below.length} of ${pairs.length} job(s)` +
      (below.length > 0 ? ` (below: ${below.map((x) => `job ${x.j.id} ${ratio(x.m.iops, x.b.iops)}`).join(', ')})` : '');
  };
  const lines = [
    check('linear/serve', 0.95, 'linear', 'dve'),
    check('mirror/linear (writes)', 0.8, 'mirror', 'linear'),
  ].filter((l): l is string => l !== undefined);
  const shares = [...(engine.node?.volumes.values() ?? [])].map((v) => {
    const runs = results.filter((r) => r.server === v.kind && r.fp !== undefined);
    return runs.length > 0 ? `${v.kind} ${formatShare(sumFp(runs.map((r) => r.fp!)).share)}` : undefined;
  }).filter((x): x is string => x !== undefined);
  if (shares.length > 0) lines.push(`FP share 100% in steady state: ${shares.join(', ')}`);
  const notOk = [...(engine.node?.volumes.values() ?? [])].filter((v) => v.info.state !== 'ok');
  for (const v of notOk) {
    const first = results.find((r) => r.server === v.kind && r.volumeState !== undefined && r.volumeState !== 'ok');
    lines.push(`volume ${v.kind} is ${v.info.state} at the end${first ? ` (first seen after job ${first.job})` : ''}`);
  }
  const logged = engine.node?.logLines ?? [];
  if (logged.length > 0) {
    lines.push(`the node logged ${logged.length} warning/error line(s)${logged.length >= 200 ? ' or more' : ''}; first: ${logged[0]}`);
  }
  return lines;
}

function engineSetupText(opts: Options, engine: EngineState): string {
  const node = engine.node;
  const vols = [...(node?.volumes.values() ?? [])].map((v) => {
    const i = v.info;
    const how = i.layout === 'striped' ? `${i.columns} columns × ${formatBytes(i.stripeBytes ?? 0)} stripes`
      : i.layout === 'mirrored' ? `${i.copies} copies` : 'one disk';
    return `\`${v.kind}\` (${i.layout}, ${how}, on ${i.disks.join(' and ')})`;
  });
  const command = 'node bin/dve.js up --state-dir TMP --config TMP/dve.yaml --log-level warn';
  return `One dve node for the whole run, \`${command}\`, ` +
    `configured with NBD and admin ports 0 (the real ones read from TMP/node-1.json), ${ENGINE_DISKS} sparse disk files of ` +
    `${formatBytes(node?.diskBytes ?? engineDiskBytes(opts.sizeBytes))} under /var/tmp, metadata ${ENGINE_METADATA}, extent size ` +
    `${ENGINE_EXTENT}. Volumes of ${formatBytes(opts.sizeBytes)} created through the admin API: ${vols.join(', ')}; each filled ` +
    'once from the backing file with nbdcopy and read back through the node byte-identical before any measurement. ' +
    '`serve` is `dve serve` on the backing file, started fresh per job (the `dve` rows of the table above when both run).';
}

function engineMethodText(opts: Options, engine: EngineState): string[] {
  const j = engine.plan.jobs;
  const ids = (k: VolumeKind): string => j[k].map((x) => x.id).join(',') || 'none';
  return [
    `Jobs: linear ${ids('linear')}; mirror ${ids('mirror')} (the write jobs: a mirror reads from one side, like linear); ` +
      `striped ${ids('striped')}.${engine.plan.reducedNote ? ` Smaller set: ${engine.plan.reducedNote}.` : ''}`,
    'Same fio jobs and options as above; per job, `serve` and then each volume in turn, back to back. The node is not ' +
      'restarted between runs; fio opens a new connection for each. The disk files are fdatasync-ed after every run.',
    'CPU µs/IO and CPU % are the node process\'s (all threads) over the measured window, as for the servers above.',
    'FP share = Δhits / (Δhits + Σ Δfaults) of the volume\'s fast-path counters (GET /v1/volumes/NAME → fp), read when ' +
      'the ramp ends and after fio exits: the share of I/O the fast path served without the control path. A mapping ' +
      'miss counts as a fault even though the FP then serves the I/O itself.',
  ];
}

function engineSection(opts: Options, env: Environment, results: readonly Measurement[], failures: readonly Failure[],
  engine: EngineState): string {
  const lines = ['### Engine volumes', ''];
  if (!opts.peers) {
    lines.push(`_Generated on ${env.date.slice(0, 10)} by \`${reproduceCommand(opts)} --readme\`; ` +
      `${env.nproc} × ${env.cpuModel}, Node ${env.versions.node}, ${loadText(env, results)}._`, '');
  }
  if (engine.error !== undefined) {
    lines.push(`Not measured: ${briefly(engine.error)}`);
    return lines.join('\n');
  }
  lines.push(engineSetupText(opts, engine), '');
  const main = engineResultsReport(results, failures, engine.plan.jobs);
  const ratios = engineRatioReport(results, engine.plan.jobs);
  const fp = fpReport(results, engine);
  lines.push(formatMarkdownTable(main.headers, main.rows, main.align), '',
    formatMarkdownTable(ratios.headers, ratios.rows, ratios.align), '',
    'Ratios: IOPS above 1 and CPU/IO below 1 favour the first-named target. Aims: linear/serve ≥ 0.95x, ' +
      'mirror/linear ≥ 0.8x on writes, FP share 100%.', '',
    formatMarkdownTable(fp.headers, fp.rows, fp.align), '',
    ...engineAims(results, engine).map((l) => `- ${l}`), '');
  const failed = failures.filter((f) => !isServer(f.server) || f.server === 'dve');
  for (const f of failed) lines.push(`- job ${f.job} ${f.server} failed: ${briefly(f.error)}`);
  if (failed.length > 0) lines.push('');
  lines.push('How it was measured:', '', ...engineMethodText(opts, engine).map((l) => `- ${l}`));
  return lines.join('\n');
}

// ---------------------------------------------------------------- README

function peerSection(opts: Options, env: Environment, results: readonly Measurement[], failures: readonly Failure[],
  skipped: ReadonlyMap<ServerName, string>): string {
  const main = resultsReport(results, failures, opts.jobs, opts.servers);
  const ratios = ratioReport(results, opts.jobs);
  const v = env.versions;
  const lines = [
    `_Generated on ${env.date.slice(0, 10)} by \`${reproduceCommand(opts)} --readme\`._`,
    '',
    `Machine: ${env.nproc} × ${env.cpuModel}, ${env.memGiB} GiB RAM, ${env.kernel}, Node ${v.node}, ` +
      `${loadText(env, results)}. ` +
      `Peers: ${PEERS.filter((p) => v[p] !== undefined).map((p) => v[p]).join(', ')}; ${v.fio}.`,
    '',
    formatMarkdownTable(main.headers, main.rows, main.align),
    '',
  ];
  if (results.some((r) => r.server === 'dve')) {
    lines.push(formatMarkdownTable(ratios.headers, ratios.rows, ratios.align), '',
      'Ratios: IOPS above 1 and CPU/IO below 1 favour dve; "best peer" is the peer with the highest IOPS ' +
      '(resp. lowest CPU/IO) on that job.', '');
  }
  for (const [server, why] of skipped) lines.push(`- ${server} not measured: ${briefly(why)}`);
  if (skipped.size > 0) lines.push('');
  lines.push('How it was measured:', '', ...methodText(opts, env).map((l) => `- ${l}`));
  return lines.join('\n');
}

const BEGIN = '<!-- bench:begin -->';
const END = '<!-- bench:end -->';
const ENGINE_HEADING = '### Engine volumes';
const README_FILE = path.join(REPO_ROOT, 'README.md');

/** The current bench section of README.md, split into the peer part and the engine part. */
function currentSection(): { peers?: string; engine?: string } {
  const current = fs.existsSync(README_FILE) ? fs.readFileSync(README_FILE, 'utf8') : '';
  const b = current.indexOf(BEGIN);
  const e = current.indexOf(END, b);
  if (b < 0 || e < 0) return {};
  const body = current.slice(b + BEGIN.length, e).trim();
  const at = body.search(/^### Engine volumes\s*$/m);
  if (at < 0) return { peers: body || undefined };
  return { peers: body.slice(0, at).trim() || undefined, engine: body.slice(at).trim() };
}

/** The new section: the parts this run measured, and what README.md had for the others. */
function readmeSection(opts: Options, env: Environment, results: readonly Measurement[], failures: readonly Failure[],
  skipped: ReadonlyMap<ServerName, string>, engine: EngineState): string {
  const old = currentSection();
  const peers = opts.peers ? peerSection(opts, env, results, failures, skipped) : old.peers;
  const eng = opts.engine ? engineSection(opts, env, results, failures, engine) : old.engine;
  return [peers, eng].filter((x): x is string => x !== undefined && x !== '').join('\n\n');
}

/**
 * Replaces only the marked section of README.md; the text around it belongs to others.
 * Without README.md, creates one holding just a heading and the section.
 */
function updateReadme(section: string): string {
  const file = README_FILE;
  const block = `${BEGIN}\n${section}\n${END}`;
  const current = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : undefined;
  let next: string;
  if (current === undefined) {
    next = `## Benchmarks\n\n${block}\n`;
  } else {
    const b = current.indexOf(BEGIN);
    const e = current.indexOf(END, b);
    next = b >= 0 && e >= 0
      ? current.slice(0, b) + block + current.slice(e + END.length)
      : `${current.trimEnd()}\n\n${block}\n`;
  }
  fs.writeFileSync(file, next);
  return file;
}

// ---------------------------------------------------------------- main

function reproduceCommand(opts: Options): string {
  const parts = [`npm run bench -- --seed ${opts.seed} --runtime ${opts.runtime} --ramp ${opts.ramp} ` +
    `--size ${opts.sizeBytes / MiB}M --jobs ${opts.jobs.map((j) => j.id).join(',')}`];
  if (opts.peers) parts.push(`--servers ${opts.servers.join(',')}`);
  if (!opts.peers) parts.push('--engine-only');
  if (!opts.engine) parts.push('--no-engine');
  if (opts.engine && opts.engineJobs !== undefined) parts.push(`--engine-jobs ${opts.engineJobs.map((j) => j.id).join(',')}`);
  if (opts.engine && opts.stripeBytes !== undefined) parts.push(`--stripe-size ${opts.stripeBytes / 1024}K`);
  return parts.join(' ');
}

function printHeader(opts: Options, env: Environment, file: string, plan: EnginePlan): void {
  const ids = (js: readonly JobSpec[]): string => js.map((j) => j.id).join(',') || 'none';
  const lines = [
    `dve bench  ${env.date}`,
    `seed ${opts.seed}  runtime ${opts.runtime}s  ramp ${opts.ramp}s  size ${formatBytes(opts.sizeBytes)}  ` +
      (opts.peers ? `jobs ${ids(opts.jobs)}  servers ${opts.servers.join(',')}` : 'peer table: not run (--engine-only)'),
    opts.engine
      ? `engine: linear ${ids(plan.jobs.linear)}, mirror ${ids(plan.jobs.mirror)}, striped ${ids(plan.jobs.striped)} ` +
        '(vs dve serve)' + (plan.reducedNote ? `\n  smaller set: ${plan.reducedNote}` : '')
      : 'engine: not run (--no-engine)',
    `machine: ${env.nproc} x ${env.cpuModel}, ${env.memGiB} GiB, ${env.kernel}, CLK_TCK ${env.clkTck}, ` +
      `load average ${env.loadAvg.toFixed(2)}`,
    `versions: ${Object.entries(env.versions).map(([k, v]) => `${k}: ${v}`).join('; ')}`,
    `backing file: ${file}`,
    `estimated time: ${fmt(plan.estimateSec / 60, 1)} min`,
    `reproduce: ${reproduceCommand(opts)}`,
  ];
  console.log(lines.join('\n'));
  console.log('');
}

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

/** One cell of the matrix: fresh server, readiness probe, one fio run, stop. */
async function measure(name: ServerName, job: JobSpec, ctx: Omit<LaunchContext, 'port'>, opts: Options,
  clkTck: number): Promise<Measurement> {
  const port = await getFreePort();
  const server = await spawnServer(name, { ...ctx, port }, opts.sizeBytes);
  try {
    checkInterrupted();
    return await runFio(job, server, opts, clkTck);
  } catch (err) {
    const detail = server.output.toString();
    throw new Error(`${(err as Error).message}${detail ? `\n    server output: ${detail}` : ''}`);
  } finally {
    await stopProcessTree(server.pid);
    flushBackingFile(ctx.file);
  }
}

// ---------------------------------------------------------------- engine volumes

/** A volume's fast-path counters over one measured window (or summed over several). */
interface FpWindow {
  hits: number;
  /** Δ per fault class, only the classes that moved. */
  faults: Record<string, number>;
  faultTotal: number;
  /** Δhits / (Δhits + Σ Δfaults); NaN when the window saw no I/O. */
  share: number;
}

function fpWindow(hits: number, faults: Record<string, number>): FpWindow {
  const faultTotal = Object.values(faults).reduce((a, b) => a + b, 0);
  return { hits, faults, faultTotal, share: hits + faultTotal > 0 ? hits / (hits + faultTotal) : NaN };
}

function fpDelta(before: FpStatisticsView, after: FpStatisticsView): FpWindow {
  const faults: Record<string, number> = {};
  for (const [k, n] of Object.entries(after.faults)) {
    const d = n - (before.faults[k] ?? 0);
    if (d !== 0) faults[k] = d;
  }
  return fpWindow(after.hits - before.hits, faults);
}

function sumFp(windows: readonly FpWindow[]): FpWindow {
  const faults: Record<string, number> = {};
  for (const w of windows) for (const [k, n] of Object.entries(w.faults)) faults[k] = (faults[k] ?? 0) + n;
  return fpWindow(windows.reduce((a, w) => a + w.hits, 0), faults);
}

interface EngineVolume {
  kind: VolumeKind;
  request: VolumeCreateRequest;
  /** As the node reported it after the prefill. */
  info: VolumeInfo;
  uri: string;
  prefillSec: number;
}

interface EngineNode {
  pid: number;
  stateDir: string;
  configFile: string;
  diskFiles: string[];
  diskBytes: number;
  client: AdminClient;
  commandLine: string;
  output: Tail;
  volumes: Map<VolumeKind, EngineVolume>;
  /** Lines the node logged (it runs at --log-level warn, so each one matters), the first 200. */
  logLines: string[];
  /** How the node ended, if it did. */
  exited(): string | undefined;
}

/** A pino JSON line as "LEVEL msg {fields}"; anything else as it is. */
function nodeLogLine(line: string): string {
  try {
    const o = JSON.parse(line) as Record<string, unknown>;
    const { level, time: _time, msg, pid: _pid, hostname: _host, ...rest } = o;
    const name = ({ 40: 'WARN', 50: 'ERROR', 60: 'FATAL' } as Record<string, string>)[String(level)] ?? `level ${String(level)}`;
    return `${name} ${String(msg)} ${JSON.stringify(rest)}`.slice(0, 500);
  } catch {
    return line.slice(0, 500);
  }
}

/** Which jobs each volume runs. */
type EngineJobs = Record<VolumeKind, JobSpec[]>;

interface EnginePlan {
  jobs: EngineJobs;
  /** Set when the striped volume runs fewer jobs than --jobs, and why. */
  reducedNote?: string;
  /** Estimated wall time of the whole run with this plan. */
  estimateSec: number;
}

const NO_ENGINE_JOBS: EngineJobs = { linear: [], mirror: [], striped: [] };

/**
 * Seconds a run costs beyond runtime + ramp (fio start-up, flush; for a server also its
 * start, nbdinfo probe and stop), and seconds per GiB to copy a volume in and verify it:
 * measured on a 2-core machine.
 */
const SERVER_RUN_OVERHEAD_SEC = 1.0;
const VOLUME_RUN_OVERHEAD_SEC = 0.3;
const PREFILL_SEC_PER_GIB = 8;

function engineJobsFor(base: readonly JobSpec[], stripedIds?: readonly number[]): EngineJobs {
  return {
    linear: [...base],
    mirror: base.filter((j) => MIRROR_JOBS.includes(j.id)),
    striped: stripedIds === undefined ? [...base] : base.filter((j) => stripedIds.includes(j.id)),
  };
}

/**
 * The engine part's jobs: --engine-jobs if given, else --jobs, with the striped volume
 * cut down to REDUCED_STRIPED_JOBS when the whole run would exceed the budget.
 */
function planEngine(opts: Options): EnginePlan {
  if (!opts.engine) return { jobs: NO_ENGINE_JOBS, estimateSec: estimateSeconds(opts, NO_ENGINE_JOBS) };
  const full = engineJobsFor(opts.engineJobs ?? opts.jobs);
  const estimateSec = estimateSeconds(opts, full);
  if (opts.engineJobs !== undefined || estimateSec <= ENGINE_BUDGET_SEC) return { jobs: full, estimateSec };
  const reduced = engineJobsFor(opts.jobs, REDUCED_STRIPED_JOBS);
  if (reduced.striped.length === full.striped.length) return { jobs: full, estimateSec };
  return {
    jobs: reduced,
    estimateSec: estimateSeconds(opts, reduced),
    reducedNote: `the striped volume runs jobs ${reduced.striped.map((j) => j.id).join(',') || '(none)'} only: with every ` +
      `job the whole run would take about ${fmt(estimateSec / 60, 1)} min, over the ~${ENGINE_BUDGET_SEC / 60} min ` +
      'budget (--engine-jobs all runs every job)',
  };
}

/** Every job the run visits, in order: --jobs (peer table), then jobs only the engine part runs. */
function loopJobs(opts: Options, jobs: EngineJobs): JobSpec[] {
  const out = opts.peers ? [...opts.jobs] : [];
  for (const j of JOBS) {
    if (!out.includes(j) && VOLUME_KINDS.some((k) => jobs[k].includes(j))) out.push(j);
  }
  return out;
}

/**
 * What one job measures, in order: the peer servers as given, with the engine volumes
 * right after `dve serve` (their baseline, so the two are measured back to back).
 */
function targetsFor(job: JobSpec, opts: Options, jobs: EngineJobs): Target[] {
  const volumes = VOLUME_KINDS.filter((k) => jobs[k].includes(job));
  const peerJob = opts.peers && opts.jobs.includes(job);
  const servers = peerJob ? opts.servers : [];
  const out: Target[] = [];
  if (volumes.length > 0 && !servers.includes('dve')) out.push('dve', ...volumes);
  for (const s of servers) {
    out.push(s);
    if (s === 'dve') out.push(...volumes);
  }
  return out;
}

function estimateSeconds(opts: Options, jobs: EngineJobs): number {
  let sec = 0;
  for (const job of loopJobs(opts, jobs)) {
    for (const t of targetsFor(job, opts, jobs)) {
      sec += opts.runtime + opts.ramp + (isServer(t) ? SERVER_RUN_OVERHEAD_SEC : VOLUME_RUN_OVERHEAD_SEC);
    }
  }
  const gib = opts.sizeBytes / GiB;
  const volumes = VOLUME_KINDS.filter((k) => jobs[k].length > 0).length;
  return sec + 4 * gib + (volumes > 0 ? 2 + volumes * PREFILL_SEC_PER_GIB * gib : 0);
}

function roundUp(n: number, unit: number): number {
  return Math.ceil(n / unit) * unit;
}

/** 2 GiB, or more when --size needs it: d3 holds one mirror side and one stripe column. */
function engineDiskBytes(sizeBytes: number): number {
  const extent = parseBytes(ENGINE_EXTENT, 'extent');
  return Math.max(ENGINE_DISK_BYTES, roundUp(sizeBytes, extent) + roundUp(Math.ceil(sizeBytes / 2), extent));
}

function volumeRequests(opts: Options): Record<VolumeKind, VolumeCreateRequest> {
  const sizeBytes = opts.sizeBytes;
  return {
    linear: { name: 'linear', sizeBytes, layout: 'linear', disks: ['d1'] },
    mirror: { name: 'mirror', sizeBytes, layout: 'mirrored', copies: 2, disks: ['d2', 'd3'] },
    striped: {
      name: 'striped', sizeBytes, layout: 'striped', columns: 2, disks: ['d3', 'd4'],
      ...(opts.stripeBytes === undefined ? {} : { stripeBytes: opts.stripeBytes }),
    },
  };
}

/**
 * Starts one node (`dve node start --id 1`) on a fresh state directory with a configuration that asks for any
 * free ports, waits for its node file (the real ports), and creates the volumes the
 * plan needs. The node runs until the end of the bench.
 */
async function startEngineNode(dir: string, opts: Options, kinds: readonly VolumeKind[]): Promise<EngineNode> {
  const stateDir = path.join(dir, 'engine');
  fs.mkdirSync(path.join(stateDir, 'disks'), { recursive: true });
  const diskBytes = engineDiskBytes(opts.sizeBytes);
  const diskFiles = Array.from({ length: ENGINE_DISKS }, (_, i) => path.join(stateDir, 'disks', `d${i + 1}.img`));
  const configFile = path.join(stateDir, 'dve.yaml');
  fs.writeFileSync(configFile, [
    '# written by scripts/bench/bench.ts: one node, ports chosen by the kernel, sparse disk files',
    'cluster:',
    '  name: bench',
    'nodes:',
    '  - id: 1',
    `    nbd: "${LOOPBACK}:0"`,
    `    admin: "${LOOPBACK}:0"`,
    `    mesh: "${LOOPBACK}:0"`,
    'disks:',
    ...diskFiles.map((f, i) => `  - { id: d${i + 1}, path: ${JSON.stringify(f)}, size: ${diskBytes / MiB}M }`),
    'metadata:',
    `  path: ${JSON.stringify(path.join(stateDir, 'meta.img'))}`,
    `  size: ${ENGINE_METADATA}`,
    `extentSize: ${ENGINE_EXTENT}`,
    '',
  ].join('\n'));
  const args = [path.join(REPO_ROOT, 'bin/dve.js'), 'node', 'start', '--id', '1', '--state-dir', stateDir, '--config', configFile, '--log-level', 'warn'];
  const output = new Tail();
  const child = spawn(process.execPath, args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const pid = child.pid;
  let ended: string | undefined;
  child.on('error', (err) => (ended ??= err.message));
  child.on('exit', (code, sig) => {
    if (pid !== undefined) livePids.delete(pid);
    ended ??= sig ? `killed by ${sig}` : `exited with code ${code}`;
  });
  const logLines: string[] = [];
  let partial = '';
  child.stdout.on('data', (d: Buffer) => output.push(d));
  child.stderr.on('data', (d: Buffer) => {
    output.push(d);
    const lines = (partial + d.toString()).split('\n');
    partial = lines.pop() ?? '';
    for (const raw of lines) {
      if (raw.trim() === '') continue;
      const line = nodeLogLine(raw.trim());
      if (logLines.length < 200) logLines.push(line);
      log(`engine: node says: ${line}`);
    }
  });
  if (pid === undefined) throw new Error('could not start the dve node');
  livePids.add(pid);
  try {
    const nodeFile = path.join(stateDir, 'node-1.json');
    const deadline = Date.now() + READY_TIMEOUT_MS;
    let admin: { host: string; port: number } | undefined;
    while (admin === undefined) {
      checkInterrupted();
      if (ended !== undefined) throw new Error(`the dve node ${ended} before writing ${nodeFile}`);
      if (Date.now() > deadline) throw new Error(`no ${nodeFile} after ${READY_TIMEOUT_MS / 1000}s`);
      try {
        const info = JSON.parse(fs.readFileSync(nodeFile, 'utf8')) as { pid?: number; admin?: { host: string; port: number } };
        if (info.pid !== pid) throw new Error(`${nodeFile} names pid ${info.pid}, not the node started (${pid})`);
        admin = info.admin;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT' && !(err instanceof SyntaxError)) throw err;
        await sleep(50);
      }
    }
    const client = new AdminClient(admin, { timeoutMs: 15_000 });
    const requests = volumeRequests(opts);
    const volumes = new Map<VolumeKind, EngineVolume>();
    for (const kind of kinds) {
      const info = await client.createVolume(requests[kind]);
      const uri = info.uris[0];
      if (uri === undefined) throw new Error(`volume ${info.name} has no NBD URI`);
      volumes.set(kind, { kind, request: requests[kind], info, uri, prefillSec: 0 });
    }
    return {
      pid, stateDir, configFile, diskFiles, diskBytes, client, output, volumes, logLines,
      commandLine: shellLine('node', args.map((a) => a.replace(`${REPO_ROOT}/`, ''))),
      exited: () => ended,
    };
  } catch (err) {
    await stopProcessTree(pid);
    const detail = output.toString();
    throw new Error(`${(err as Error).message}${detail ? `\n    node output: ${detail.replace(/\n/g, '\n    ')}` : ''}`);
  }
}

/**
 * Copies the backing file into a volume with nbdcopy, reads it back through the node
 * and compares it with the file byte for byte, then writes the disks back (fdatasync)
 * so the measurements start with nothing dirty.
 */
async function prefillVolume(node: EngineNode, vol: EngineVolume, file: string): Promise<void> {
  const t0 = performance.now();
  const copy = await run('timeout', ['-s', 'KILL', '600', 'nbdcopy', file, vol.uri]);
  if (copy.code !== 0) throw new Error(`nbdcopy ${file} ${vol.uri} failed (${copy.code}): ${copy.stderr.trim()}`);
  const check = await run('timeout', ['-s', 'KILL', '600', 'sh', '-c', 'nbdcopy "$1" - | cmp - "$2"', 'sh', vol.uri, file]);
  if (check.code !== 0) {
    throw new Error(`volume ${vol.info.name} does not read back what was copied in: ${`${check.stdout} ${check.stderr}`.trim()}`);
  }
  flushFiles(node.diskFiles);
  vol.info = await node.client.showVolume(vol.info.name);
  vol.prefillSec = (performance.now() - t0) / 1000;
}

function flushFiles(files: readonly string[]): void {
  for (const f of files) if (fs.existsSync(f)) flushBackingFile(f);
}

/** One engine cell: one fio run against a volume of the running node, with its FP counters. */
async function measureVolume(node: EngineNode, kind: VolumeKind, job: JobSpec, opts: Options,
  clkTck: number): Promise<Measurement> {
  const how = node.exited();
  if (how !== undefined) throw new Error(`the dve node ${how}`);
  const vol = node.volumes.get(kind);
  if (!vol) throw new Error(`no ${kind} volume`);
  const server: RunningServer = { name: kind, pid: node.pid, uri: vol.uri, commandLine: node.commandLine, output: node.output };
  let before: Promise<FpStatisticsView | Error> | undefined;
  try {
    const m = await runFio(job, server, opts, clkTck, () => {
      before = node.client.showVolume(vol.info.name).then((v) => v.fp, (err: unknown) => err as Error);
    });
    const after = await node.client.showVolume(vol.info.name);
    const start = await before;
    if (start === undefined) throw new Error('no FP counters from the start of the window');
    if (start instanceof Error) throw start;
    m.fp = fpDelta(start, after.fp);
    m.volumeState = after.state;
    vol.info = after;
    m.serverCommand = `${node.commandLine}  # volume ${vol.info.name} (${vol.uri})`;
    return m;
  } catch (err) {
    const detail = node.output.toString();
    const ended = node.exited();
    throw new Error(`${(err as Error).message}${ended ? ` (the dve node ${ended})` : ''}` +
      `${detail ? `\n    node output: ${detail}` : ''}`);
  } finally {
    flushFiles(node.diskFiles);
  }
}

interface EngineState {
  plan: EnginePlan;
  node?: EngineNode;
  /** Why the engine part did not run, if it did not. */
  error?: string;
  /** How the node stopped at the end (SIGTERM: graceful stop). */
  stopNote?: string;
}

/** SIGTERM (the node's graceful stop), SIGKILL if it has not exited after 10 s; says which. */
async function stopEngineNode(node: EngineNode): Promise<string> {
  const t0 = performance.now();
  signal(node.pid, 'SIGTERM');
  const graceful = await waitGone([node.pid], 10_000);
  if (!graceful) {
    signal(node.pid, 'SIGKILL');
    await waitGone([node.pid], STOP_TIMEOUT_MS);
  }
  livePids.delete(node.pid);
  const sec = fmt((performance.now() - t0) / 1000, 1);
  return graceful ? `stopped on SIGTERM in ${sec} s (${node.exited() ?? 'exited'})` : `did not stop within 10 s of SIGTERM; killed`;
}

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  const plan = planEngine(opts);
  const measured = new Set<ServerName>(opts.peers ? opts.servers : []);
  if (VOLUME_KINDS.some((k) => plan.jobs[k].length > 0)) measured.add('dve');
  const env = await describeEnvironment(ALL_SERVERS.filter((s) => measured.has(s)));
  const dir = fs.mkdtempSync('/var/tmp/dve-bench-');
  const file = path.join(dir, 'backing.img');
  installSignalHandlers(dir, opts.keep);
  printHeader(opts, env, file, plan);
  if (env.loadAvg > 0.5) log(`warning: load average ${env.loadAvg.toFixed(2)} before the run; other work will skew the results`);

  const results: Measurement[] = [];
  const failures: Failure[] = [];
  const skipped = new Map<ServerName, string>();
  const engine: EngineState = { plan };
  const started = performance.now();
  try {
    log(`writing ${formatBytes(opts.sizeBytes)} of random data to ${file} ...`);
    createBackingFile(file, opts.sizeBytes);
    const kinds = VOLUME_KINDS.filter((k) => plan.jobs[k].length > 0);
    if (kinds.length > 0) {
      try {
        log(`engine: starting a dve node and creating volumes ${kinds.join(', ')} ...`);
        engine.node = await startEngineNode(dir, opts, kinds);
        for (const vol of engine.node.volumes.values()) {
          checkInterrupted();
          await prefillVolume(engine.node, vol, file);
          log(`engine: ${vol.info.name}: ${vol.info.layout} on ${vol.info.disks.join(',')}, ${vol.info.extents} extent(s), ` +
            `prefilled from the backing file and verified in ${fmt(vol.prefillSec, 1)} s, state ${vol.info.state}`);
        }
      } catch (err) {
        checkInterrupted();
        engine.error = (err as Error).message;
        log(`engine: NOT MEASURED: ${engine.error}`);
        if (engine.node) await stopProcessTree(engine.node.pid);
        engine.node = undefined;
        engine.plan = { ...plan, jobs: NO_ENGINE_JOBS };
      }
    }
    const jobs = engine.plan.jobs;
    for (const job of loopJobs(opts, jobs)) {
      for (const target of targetsFor(job, opts, jobs)) {
        checkInterrupted();
        const tag = `[job ${job.id} ${job.label}] ${target.padEnd(10)}`;
        if (isServer(target)) {
          if (skipped.has(target)) continue;
          const attempted = results.some((r) => r.server === target) || failures.some((f) => f.server === target);
          try {
            const m = await measure(target, job, { file, dir }, opts, env.clkTck);
            results.push(m);
            log(`${tag} ${fmt(m.iops, 0).padStart(9)} IOPS  p99 ${fmt(m.p99Us, 0)} µs  CPU ${fmt(m.cpuUsPerIo, 2)} µs/IO`);
          } catch (err) {
            checkInterrupted();
            const error = (err as Error).message;
            if (!attempted) {
              // Never got going: leave it out of the rest of the run rather than retrying.
              skipped.set(target, error);
              log(`[job ${job.id} ${job.label}] SKIPPING ${target} for this run: ${error}`);
            } else {
              failures.push({ job: job.id, server: target, error });
              log(`[job ${job.id} ${job.label}] ${target} FAILED: ${error}`);
            }
          }
        } else if (engine.node) {
          try {
            const m = await measureVolume(engine.node, target, job, opts, env.clkTck);
            results.push(m);
            log(`${tag} ${fmt(m.iops, 0).padStart(9)} IOPS  p99 ${fmt(m.p99Us, 0)} µs  CPU ${fmt(m.cpuUsPerIo, 2)} µs/IO  ` +
              `FP ${formatShare(m.fp?.share)}${m.fp && m.fp.faultTotal > 0 ? ` (${formatFaults(m.fp.faults)})` : ''}` +
              (m.volumeState !== undefined && m.volumeState !== 'ok' ? `  volume ${m.volumeState.toUpperCase()}` : ''));
          } catch (err) {
            checkInterrupted();
            const error = (err as Error).message;
            failures.push({ job: job.id, server: target, error });
            log(`${tag} FAILED: ${error}`);
          }
        }
      }
    }
  } finally {
    if (engine.node && interruptedBy === undefined) {
      engine.stopNote = await stopEngineNode(engine.node);
      log(`engine: the dve node ${engine.stopNote}`);
    }
    await stopAll();
    if (!opts.keep) fs.rmSync(dir, { recursive: true, force: true });
  }
  const elapsedSec = (performance.now() - started) / 1000;

  printResults(opts, env, results, failures, skipped, engine, elapsedSec);
  if (opts.jsonFile !== undefined) {
    fs.writeFileSync(opts.jsonFile, `${JSON.stringify({
      options: { ...opts, jobs: opts.jobs.map((j) => j.id), engineJobs: opts.engineJobs?.map((j) => j.id) },
      environment: env, elapsedSec, results, failures, skipped: Object.fromEntries(skipped),
      engine: {
        jobs: Object.fromEntries(VOLUME_KINDS.map((k) => [k, engine.plan.jobs[k].map((j) => j.id)])),
        reducedNote: engine.plan.reducedNote,
        error: engine.error,
        stop: engine.stopNote,
        nodeLog: engine.node?.logLines ?? [],
        volumes: engine.node ? [...engine.node.volumes.values()].map((v) => ({
          kind: v.kind, request: v.request, info: v.info, prefillSec: v.prefillSec,
          fp: sumFp(results.filter((r) => r.server === v.kind && r.fp).map((r) => r.fp!)),
        })) : [],
      },
    }, null, 2)}\n`);
    log(`raw results written to ${opts.jsonFile}`);
  }
  if (opts.readme) log(`updated ${updateReadme(readmeSection(opts, env, results, failures, skipped, engine))}`);
  return results.length > 0 ? 0 : 1;
}

function isServer(t: Target): t is ServerName {
  return (ALL_SERVERS as readonly string[]).includes(t);
}

function printResults(opts: Options, env: Environment, results: readonly Measurement[], failures: readonly Failure[],
  skipped: ReadonlyMap<ServerName, string>, engine: EngineState, elapsedSec: number): void {
  if (opts.peers) {
    const main = resultsReport(results, failures, opts.jobs, opts.servers);
    console.log(formatTable(main.headers, main.rows, main.align));
    console.log('');
    if (results.some((r) => r.server === 'dve')) {
      const ratios = ratioReport(results, opts.jobs);
      console.log(formatTable(ratios.headers, ratios.rows, ratios.align));
      console.log('');
    }
  }
  for (const [server, why] of skipped) console.log(`${server} not measured: ${briefly(why)}`);
  for (const f of failures) console.log(`job ${f.job} ${f.server} failed: ${briefly(f.error)}`);
  if (skipped.size > 0 || failures.length > 0) console.log('');
  const commands = new Map<Target, Measurement>();
  for (const r of results) if (!commands.has(r.server)) commands.set(r.server, r);
  console.log('commands (first job):');
  for (const [server, m] of commands) console.log(`  ${server}: ${m.serverCommand}`);
  const first = results[0];
  if (first) console.log(`  fio: ${first.fioCommand}`);
  console.log('');
  if (opts.peers) {
    for (const l of methodText(opts, env)) console.log(`- ${l}`);
    console.log('');
  }
  if (opts.engine) {
    console.log('Engine volumes');
    console.log('');
    if (engine.error !== undefined) {
      console.log(`not measured: ${engine.error}`);
    } else {
      const main = engineResultsReport(results, failures, engine.plan.jobs);
      const ratios = engineRatioReport(results, engine.plan.jobs);
      const fp = fpReport(results, engine);
      console.log(formatTable(main.headers, main.rows, main.align));
      console.log('');
      console.log(formatTable(ratios.headers, ratios.rows, ratios.align));
      console.log('');
      console.log(formatTable(fp.headers, fp.rows, fp.align));
      console.log('');
      for (const l of engineAims(results, engine)) console.log(`aim: ${l}`);
      console.log('');
      console.log(engineSetupText(opts, engine));
      for (const l of engineMethodText(opts, engine)) console.log(`- ${l}`);
    }
    console.log('');
  }
  console.log(`elapsed ${fmt(elapsedSec / 60, 1)} min (estimated ${fmt(engine.plan.estimateSec / 60, 1)}), ` +
    `${loadText(env, results)}, ${fmt(os.loadavg()[0] ?? 0, 2)} at the end`);
}

async function stopAll(): Promise<void> {
  await Promise.all([...livePids].map((pid) => stopProcessTree(pid)));
}

/**
 * On SIGINT/SIGTERM: stop every process started so far (so fio and the server return at
 * once), and let main() unwind through its finally block; a second signal, or a run that
 * does not unwind within 20 s, kills what is left and exits immediately.
 */
function installSignalHandlers(dir: string, keep: boolean): void {
  const forceExit = (): void => {
    for (const pid of livePids) signal(pid, 'SIGKILL');
    if (!keep) fs.rmSync(dir, { recursive: true, force: true });
    process.exit(130);
  };
  const onSignal = (sig: NodeJS.Signals): void => {
    if (interruptedBy !== undefined) return forceExit();
    interruptedBy = sig;
    log(`\n${sig}: stopping ${livePids.size} process(es) and cleaning up`);
    void stopAll();
    setTimeout(forceExit, 20_000).unref();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
}

main().then(
  (code) => process.exit(interruptedBy === undefined ? code : 130),
  (err: unknown) => {
    if (interruptedBy !== undefined) process.exit(130);
    if (err instanceof UsageError) {
      log(`${err.message}\n${USAGE}`);
      process.exit(2);
    }
    log(err instanceof Error ? (err.stack ?? err.message) : String(err));
    void stopAll().finally(() => process.exit(1));
  },
);
