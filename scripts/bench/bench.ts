/**
 * `npm run bench`: fio (nbd engine) against dve and peer NBD servers that all serve
 * the same backing file, interleaved job by job, with each server's CPU time per I/O.
 *
 *   node --import tsx scripts/bench/bench.ts [--runtime S] [--ramp S] [--size SIZE]
 *        [--jobs 1,3] [--servers dve,nbdkit,qemu-nbd,nbd-server] [--seed N]
 *        [--json FILE] [--readme] [--keep]
 *
 * For every job, each server in turn is started fresh on its own free loopback port,
 * probed with nbdinfo, measured with one fio run, and stopped. The server's CPU time
 * is read from /proc/PID/stat (utime+stime of its process tree, plus cutime+cstime of
 * reaped children) over exactly fio's measurement window: from `ramp` seconds after
 * fio reports its connection until fio exits.
 */
import { spawn } from 'node:child_process';
import { randomFillSync, randomInt } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

// ---------------------------------------------------------------- configuration

type ServerName = 'dve' | 'nbdkit' | 'qemu-nbd' | 'nbd-server';
const ALL_SERVERS: readonly ServerName[] = ['dve', 'nbdkit', 'qemu-nbd', 'nbd-server'];
const PEERS: readonly ServerName[] = ALL_SERVERS.filter((s) => s !== 'dve');

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
  return {
    runtime: positiveInt(values.runtime, '--runtime'),
    ramp: nonNegativeInt(values.ramp, '--ramp'),
    sizeBytes: parseSize(values.size),
    seed: values.seed === undefined ? randomInt(1, 2 ** 31) : positiveInt(values.seed, '--seed'),
    jobs: selectJobs(values.jobs),
    servers: selectServers(values.servers),
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
  const m = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(text.trim());
  if (!m) throw new UsageError(`--size: cannot parse "${text}" (try 1G, 512M)`);
  const exponent = ' kmgt'.indexOf((m[2] || ' ').toLowerCase());
  const bytes = Number(m[1]) * 1024 ** exponent;
  if (bytes % MiB !== 0 || bytes < 16 * MiB) throw new UsageError(`--size must be a multiple of 1 MiB and >= 16 MiB`);
  return bytes;
}

function splitList(text: string): string[] {
  return text.split(',').map((s) => s.trim()).filter((s) => s !== '');
}

function selectJobs(text: string | undefined): JobSpec[] {
  if (text === undefined) return [...JOBS];
  return splitList(text).map((id) => {
    const job = JOBS.find((j) => String(j.id) === id);
    if (!job) throw new UsageError(`--jobs: no job "${id}" (jobs are 1..${JOBS.length})`);
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

const REPO_ROOT = findRepoRoot(path.dirname(fileURLToPath(import.meta.url)));

function findRepoRoot(start: string): string {
  for (let dir = start; ; dir = path.dirname(dir)) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    if (path.dirname(dir) === dir) throw new Error(`no package.json above ${start}`);
  }
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
  name: ServerName;
  pid: number;
  uri: string;
  commandLine: string;
  output: Tail;
}

function uriFor(port: number): string {
  return `nbd://${LOOPBACK}:${port}/${EXPORT_NAME}`;
}

function shellLine(command: string, args: readonly string[]): string {
  return [command, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
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
async function waitForText(name: ServerName, text: string, seen: Promise<void>, exited: Promise<string>): Promise<void> {
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
  server: ServerName;
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
 * children, if any, have been reaped).
 */
async function runFio(job: JobSpec, server: RunningServer, opts: Options, clkTck: number): Promise<Measurement> {
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

type Align = 'l' | 'r';

function formatTable(headers: readonly string[], rows: readonly string[][], align: readonly Align[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]): string =>
    cells.map((c, i) => (align[i] === 'r' ? c.padStart(widths[i] ?? 0) : c.padEnd(widths[i] ?? 0))).join('  ').trimEnd();
  return [line(headers), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

function formatMarkdownTable(headers: readonly string[], rows: readonly string[][], align: readonly Align[]): string {
  const sep = align.map((a) => (a === 'r' ? '---:' : ':---'));
  return [headers, sep, ...rows].map((r) => `| ${r.join(' | ')} |`).join('\n');
}

function fmt(n: number, digits: number): string {
  if (!Number.isFinite(n)) return 'n/a';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function ratio(a: number | undefined, b: number | undefined): string {
  return a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0 ? 'n/a' : `${fmt(a / b, 2)}x`;
}

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
  return n % 1024 ** 3 === 0 ? `${n / 1024 ** 3} GiB` : `${n / MiB} MiB`;
}

interface Failure {
  job: number;
  server: ServerName;
  error: string;
}

function readmeSection(opts: Options, env: Environment, results: readonly Measurement[], failures: readonly Failure[],
  skipped: ReadonlyMap<ServerName, string>): string {
  const main = resultsReport(results, failures, opts.jobs, opts.servers);
  const ratios = ratioReport(results, opts.jobs);
  const v = env.versions;
  const lines = [
    `_Generated on ${env.date.slice(0, 10)} by \`${reproduceCommand(opts)} --readme\`._`,
    '',
    `Machine: ${env.nproc} × ${env.cpuModel}, ${env.memGiB} GiB RAM, ${env.kernel}, Node ${v.node}, ` +
      `load average ${env.loadAvg.toFixed(2)} at start. ` +
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

/**
 * Replaces only the marked section of README.md; the text around it belongs to others.
 * Without README.md, creates one holding just a heading and the section.
 */
function updateReadme(section: string): string {
  const file = path.join(REPO_ROOT, 'README.md');
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
  return `npm run bench -- --seed ${opts.seed} --runtime ${opts.runtime} --ramp ${opts.ramp} ` +
    `--size ${opts.sizeBytes / MiB}M --jobs ${opts.jobs.map((j) => j.id).join(',')} --servers ${opts.servers.join(',')}`;
}

function printHeader(opts: Options, env: Environment, file: string): void {
  const lines = [
    `dve bench  ${env.date}`,
    `seed ${opts.seed}  runtime ${opts.runtime}s  ramp ${opts.ramp}s  size ${formatBytes(opts.sizeBytes)}  ` +
      `jobs ${opts.jobs.map((j) => j.id).join(',')}  servers ${opts.servers.join(',')}`,
    `machine: ${env.nproc} x ${env.cpuModel}, ${env.memGiB} GiB, ${env.kernel}, CLK_TCK ${env.clkTck}, ` +
      `load average ${env.loadAvg.toFixed(2)}`,
    `versions: ${Object.entries(env.versions).map(([k, v]) => `${k}: ${v}`).join('; ')}`,
    `backing file: ${file}`,
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

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  const env = await describeEnvironment(opts.servers);
  const dir = fs.mkdtempSync('/var/tmp/dve-bench-');
  const file = path.join(dir, 'backing.img');
  installSignalHandlers(dir, opts.keep);
  printHeader(opts, env, file);
  if (env.loadAvg > 0.5) log(`warning: load average ${env.loadAvg.toFixed(2)} before the run; other work will skew the results`);

  const results: Measurement[] = [];
  const failures: Failure[] = [];
  const skipped = new Map<ServerName, string>();
  try {
    log(`writing ${formatBytes(opts.sizeBytes)} of random data to ${file} ...`);
    createBackingFile(file, opts.sizeBytes);
    for (const job of opts.jobs) {
      for (const name of opts.servers) {
        checkInterrupted();
        if (skipped.has(name)) continue;
        const attempted = results.some((r) => r.server === name) || failures.some((f) => f.server === name);
        try {
          const m = await measure(name, job, { file, dir }, opts, env.clkTck);
          results.push(m);
          log(`[job ${job.id} ${job.label}] ${name.padEnd(10)} ${fmt(m.iops, 0).padStart(9)} IOPS  ` +
            `p99 ${fmt(m.p99Us, 0)} µs  CPU ${fmt(m.cpuUsPerIo, 2)} µs/IO`);
        } catch (err) {
          checkInterrupted();
          const error = (err as Error).message;
          if (!attempted) {
            // Never got going: leave it out of the rest of the run rather than retrying.
            skipped.set(name, error);
            log(`[job ${job.id} ${job.label}] SKIPPING ${name} for this run: ${error}`);
          } else {
            failures.push({ job: job.id, server: name, error });
            log(`[job ${job.id} ${job.label}] ${name} FAILED: ${error}`);
          }
        }
      }
    }
  } finally {
    await stopAll();
    if (!opts.keep) fs.rmSync(dir, { recursive: true, force: true });
  }

  printResults(opts, env, results, failures, skipped);
  if (opts.jsonFile !== undefined) {
    fs.writeFileSync(opts.jsonFile, `${JSON.stringify({ options: { ...opts, jobs: opts.jobs.map((j) => j.id) },
      environment: env, results, failures, skipped: Object.fromEntries(skipped) }, null, 2)}\n`);
    log(`raw results written to ${opts.jsonFile}`);
  }
  if (opts.readme) log(`updated ${updateReadme(readmeSection(opts, env, results, failures, skipped))}`);
  return results.length > 0 ? 0 : 1;
}

function printResults(opts: Options, env: Environment, results: readonly Measurement[], failures: readonly Failure[],
  skipped: ReadonlyMap<ServerName, string>): void {
  const main = resultsReport(results, failures, opts.jobs, opts.servers);
  console.log(formatTable(main.headers, main.rows, main.align));
  console.log('');
  if (results.some((r) => r.server === 'dve')) {
    const ratios = ratioReport(results, opts.jobs);
    console.log(formatTable(ratios.headers, ratios.rows, ratios.align));
    console.log('');
  }
  for (const [server, why] of skipped) console.log(`${server} not measured: ${briefly(why)}`);
  for (const f of failures) console.log(`job ${f.job} ${f.server} failed: ${briefly(f.error)}`);
  if (skipped.size > 0 || failures.length > 0) console.log('');
  const commands = new Map<ServerName, Measurement>();
  for (const r of results) if (!commands.has(r.server)) commands.set(r.server, r);
  console.log('commands (first job):');
  for (const [server, m] of commands) console.log(`  ${server}: ${m.serverCommand}`);
  const first = results[0];
  if (first) console.log(`  fio: ${first.fioCommand}`);
  console.log('');
  for (const l of methodText(opts, env)) console.log(`- ${l}`);
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
