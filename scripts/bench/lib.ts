/**
 * What the cluster benchmarks (cluster-bench.ts, data-bench.ts) share, and the table
 * formatting bench.ts shares with them: the children a script starts (tracked by pid,
 * stopped on error or a signal), free loopback ports, a real cluster as node processes
 * (config file, `dve node start` per node, waiting for node-N.json and for the peers to
 * join), the host description and the plain and markdown tables.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { AdminClient } from '../../src/admin/client.js';

// ---------------------------------------------------------------- configuration

export const LOOPBACK = '127.0.0.1';
export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;
/** The benchmark clusters: 4 sparse 2 GiB disk files shared by every node, metadata 16M, 4M extents. */
export const DISKS = 4;
export const DISK_IDS = Array.from({ length: DISKS }, (_, i) => `d${i + 1}`);
export const DISK_BYTES = 2 * GiB;
export const METADATA = '16M';
export const EXTENT = '4M';
export const READY_TIMEOUT_MS = 60_000;
export const STOP_GRACE_MS = 10_000;

export const REPO_ROOT = findRepoRoot(path.dirname(fileURLToPath(import.meta.url)));

export function findRepoRoot(start: string): string {
  let dir = start;
  while (!fs.existsSync(path.join(dir, 'package.json'))) {
    const up = path.dirname(dir);
    if (up === dir) throw new Error(`no package.json above ${start}`);
    dir = up;
  }
  return dir;
}

// ---------------------------------------------------------------- progress and signals

let logName = 'bench';

/** Names the script in its progress lines ("NAME: ..."). */
export function setLogName(name: string): void {
  logName = name;
}

/** Progress goes to stderr; stdout carries the report (or the JSON with --json). */
export function log(line: string): void {
  process.stderr.write(`${logName}: ${line}\n`);
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Every child this script started and has not yet seen exit. */
export const children = new Map<number, { what: string; child: ChildProcess }>();
let interruptedBy: NodeJS.Signals | undefined;

export function interrupted(): boolean {
  return interruptedBy !== undefined;
}

export function checkInterrupted(): void {
  if (interruptedBy !== undefined) throw new Error(`interrupted by ${interruptedBy}`);
}

/** On SIGINT or SIGTERM: note it (checkInterrupted throws from then on) and end the running `timeout` children. */
export function handleSignals(): void {
  const onSignal = (sig: NodeJS.Signals): void => {
    if (interruptedBy !== undefined) return;
    interruptedBy = sig;
    log(`${sig}: stopping what was started`);
    // fio runs under `timeout`, which passes SIGTERM on to fio: the cell ends at once.
    for (const [pid, c] of children) if (c.what.startsWith('timeout')) signal(pid, 'SIGTERM');
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
}

// ---------------------------------------------------------------- processes

export function track(child: ChildProcess, what: string): void {
  const pid = child.pid;
  if (pid === undefined) return;
  children.set(pid, { what, child });
  child.once('exit', () => children.delete(pid));
}

/** Starts a command; `done` resolves when it has exited (callers bound it with `timeout -s KILL`). */
export function start(command: string, args: readonly string[]): { pid: number | undefined; done: Promise<RunResult> } {
  const child = spawn(command, args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  track(child, `${command} ${args.slice(0, 4).join(' ')}`);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<RunResult>((resolve) => {
    child.on('error', (err) => resolve({ code: null, stdout, stderr: stderr + err.message }));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
  return { pid: child.pid, done };
}

/** Runs a command to completion (callers bound it with `timeout -s KILL`). */
export function run(command: string, args: readonly string[]): Promise<RunResult> {
  return start(command, args).done;
}

/** Runs `node bin/dve.js ARGS` under `timeout -s KILL`. */
export function runDve(args: readonly string[], timeoutSec: number): Promise<RunResult> {
  return run('timeout', ['-s', 'KILL', String(timeoutSec), process.execPath, path.join(REPO_ROOT, 'bin/dve.js'), ...args]);
}

export function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

export function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

/** SIGTERM (graceful), then SIGKILL after the grace; says how it ended. */
export async function stopPid(pid: number, graceMs = STOP_GRACE_MS): Promise<string> {
  if (!alive(pid)) return 'already exited';
  signal(pid, 'SIGTERM');
  const deadline = Date.now() + graceMs;
  while (Date.now() < deadline) {
    if (!alive(pid)) return 'stopped (SIGTERM)';
    await sleep(25);
  }
  signal(pid, 'SIGKILL');
  for (let i = 0; i < 200 && alive(pid); i++) await sleep(25);
  return alive(pid) ? 'still alive after SIGKILL' : 'killed (SIGKILL after the grace)';
}

export async function stopAllChildren(): Promise<void> {
  await Promise.all([...children.keys()].map((pid) => stopPid(pid, 3000)));
}

/** `count` distinct ports that were free on loopback a moment ago (held together, so distinct). */
export async function freePorts(count: number): Promise<number[]> {
  const servers: net.Server[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const s = net.createServer();
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.listen(0, LOOPBACK, () => resolve());
      });
      servers.push(s);
    }
    return servers.map((s) => (s.address() as net.AddressInfo).port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
}

export function shellLine(command: string, args: readonly string[]): string {
  return [command, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

/** fsyncs the files that exist (the shared disk files, before a measurement). */
export function flushFiles(files: readonly string[]): void {
  for (const f of files) {
    if (!fs.existsSync(f)) continue;
    const fd = fs.openSync(f, 'r+');
    try {
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
}

// ---------------------------------------------------------------- cluster processes

export interface ClusterNode {
  id: number;
  nbd: number;
  admin: number;
  mesh: number;
  pid: number;
  client: AdminClient;
  commandLine: string;
  /** Lines the node logged at warn and above (the first 200, over every start). */
  logLines: string[];
  logFile: string;
  exited(): string | undefined;
  /** performance.now() when the current process exited. */
  exitedAt?: number;
  starts: number;
  stopNote?: string;
}

export interface Cluster {
  /** Names the cluster in progress lines ('' for none). */
  label: string;
  dir: string;
  stateDir: string;
  configFile: string;
  diskFiles: string[];
  nodes: ClusterNode[];
}

/** A pino JSON line as "LEVEL msg {fields}"; anything else as it is. */
export function nodeLogLine(line: string): string {
  try {
    const o = JSON.parse(line) as Record<string, unknown>;
    const { level, time: _time, msg, pid: _pid, hostname: _host, ...rest } = o;
    const name = ({ 40: 'WARN', 50: 'ERROR', 60: 'FATAL' } as Record<string, string>)[String(level)] ?? `level ${String(level)}`;
    return `${name} ${String(msg)} ${JSON.stringify(rest)}`.slice(0, 500);
  } catch {
    return line.slice(0, 500);
  }
}

export interface ClusterSpec {
  /** The script writing the config, for its first comment line. */
  writtenBy: string;
  /** The cluster's name in the config. */
  name: string;
  /** See Cluster.label. */
  label: string;
  nodeCount: number;
  secret: string;
  heartbeatMs: number;
  peerTimeoutMs: number;
}

/** Writes DIR/dve.yaml: the nodes on fixed free loopback ports, sharing the sparse disk files and metadata area in DIR. */
export async function writeClusterConfig(dir: string, spec: ClusterSpec): Promise<Cluster> {
  const { nodeCount } = spec;
  const stateDir = path.join(dir, 'state');
  fs.mkdirSync(path.join(dir, 'disks'), { recursive: true });
  fs.mkdirSync(stateDir, { recursive: true });
  const ports = await freePorts(3 * nodeCount);
  const diskFiles = DISK_IDS.map((id) => path.join(dir, 'disks', `${id}.img`));
  const configFile = path.join(dir, 'dve.yaml');
  const specs = Array.from({ length: nodeCount }, (_, i) => ({ id: i + 1, nbd: ports[3 * i]!, admin: ports[3 * i + 1]!, mesh: ports[3 * i + 2]! }));
  fs.writeFileSync(configFile, [
    `# written by ${spec.writtenBy}: ${nodeCount} node(s) on loopback, fixed free ports, shared sparse disk files`,
    `cluster: { name: ${spec.name}, secret: ${JSON.stringify(spec.secret)}, heartbeat: ${spec.heartbeatMs}, peerTimeout: ${spec.peerTimeoutMs} }`,
    'nodes:',
    ...specs.map((n) => `  - { id: ${n.id}, nbd: "${LOOPBACK}:${n.nbd}", admin: "${LOOPBACK}:${n.admin}", mesh: "${LOOPBACK}:${n.mesh}" }`),
    'disks:',
    ...diskFiles.map((f, i) => `  - { id: ${DISK_IDS[i]}, path: ${JSON.stringify(f)}, size: ${DISK_BYTES / MiB}M }`),
    'metadata:',
    `  path: ${JSON.stringify(path.join(dir, 'meta.img'))}`,
    `  size: ${METADATA}`,
    `extentSize: ${EXTENT}`,
    '',
  ].join('\n'));
  return {
    label: spec.label, dir, stateDir, configFile, diskFiles,
    nodes: specs.map((s) => ({
      ...s, pid: 0, client: new AdminClient({ host: LOOPBACK, port: s.admin }, { timeoutMs: 15_000 }), commandLine: '',
      logLines: [], logFile: path.join(dir, `node-${s.id}.log`), exited: () => undefined, starts: 0,
    })),
  };
}

/** Starts one node in the foreground as our child (its log to DIR/node-N.log), returns once its node file names it. */
export function spawnNode(c: Cluster, n: ClusterNode): Promise<void> {
  const args = [path.join(REPO_ROOT, 'bin/dve.js'), 'node', 'start', '--id', String(n.id), '--config', c.configFile, '--state-dir', c.stateDir, '--log-level', 'warn'];
  n.commandLine = shellLine('node', args.map((a) => a.replace(`${REPO_ROOT}/`, '').replace(`${c.dir}/`, 'TMP/')));
  const out = fs.openSync(n.logFile, 'a');
  const child = spawn(process.execPath, args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  track(child, `node ${n.id}`);
  n.starts++;
  const startNo = n.starts;
  let ended: string | undefined;
  n.exitedAt = undefined;
  child.on('error', (err) => (ended ??= err.message));
  child.on('exit', (code, sig) => {
    ended ??= sig ? `killed by ${sig}` : `exited with code ${code}`;
    if (n.starts === startNo) n.exitedAt = performance.now();
  });
  // Everything goes to DIR/node-N.log; pino lines (warn and above at this log level) and
  // anything on stderr are also kept for the report. The start-up banner on stdout is not.
  const partial = { out: '', err: '' };
  const onData = (stream: 'out' | 'err') => (d: Buffer): void => {
    fs.writeSync(out, d);
    const lines = (partial[stream] + d.toString()).split('\n');
    partial[stream] = lines.pop() ?? '';
    for (const raw of lines) {
      const text = raw.trim();
      if (text === '' || (stream === 'out' && !text.startsWith('{'))) continue;
      const line = `${startNo > 1 ? `(start ${startNo}) ` : ''}${nodeLogLine(text)}`;
      if (n.logLines.length < 200) n.logLines.push(line);
      if (n.logLines.length <= 20) log(`${c.label === '' ? '' : `${c.label} `}node ${n.id} says: ${line}`);
    }
  };
  child.stdout.on('data', onData('out'));
  child.stderr.on('data', onData('err'));
  child.on('close', () => fs.closeSync(out));
  if (child.pid === undefined) throw new Error(`could not start node ${n.id}`);
  n.pid = child.pid;
  n.exited = () => ended;
  const nodeFile = path.join(c.stateDir, `node-${n.id}.json`);
  return (async () => {
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      checkInterrupted();
      if (ended !== undefined) throw new Error(`node ${n.id} ${ended} before writing ${nodeFile} (log: ${n.logFile})`);
      if (Date.now() > deadline) throw new Error(`node ${n.id}: no ${nodeFile} after ${READY_TIMEOUT_MS / 1000}s (log: ${n.logFile})`);
      try {
        const info = JSON.parse(fs.readFileSync(nodeFile, 'utf8')) as { pid?: number };
        if (info.pid === n.pid) return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT' && !(err instanceof SyntaxError)) throw err;
      }
      await sleep(50);
    }
  })();
}

export async function stopCluster(c: Cluster): Promise<void> {
  await Promise.all(c.nodes.map(async (n) => {
    if (n.pid <= 0) return;
    const how = await stopPid(n.pid);
    n.stopNote = n.exited() !== undefined && how === 'already exited' ? `had ${n.exited()} before the end` : how;
  }));
}

/** Every node sees every other node joined, with quorum. */
export async function waitJoined(c: Cluster): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (const n of c.nodes) {
    for (;;) {
      checkInterrupted();
      const how = n.exited();
      if (how !== undefined) throw new Error(`node ${n.id} ${how}`);
      const s = await n.client.status().catch(() => null);
      const joined = s?.nodes.filter((x) => x.id !== n.id && x.state === 'joined').length ?? 0;
      if (s && joined === c.nodes.length - 1 && (s.cluster === undefined || s.cluster.quorum)) break;
      if (Date.now() > deadline) throw new Error(`node ${n.id} does not see its peers joined: ${JSON.stringify(s?.nodes.map((x) => [x.id, x.state]))}`);
      await sleep(100);
    }
  }
}

/** Every node exports every volume: waits until each one serves `name`. */
export async function waitVolumeEverywhere(c: Cluster, name: string): Promise<void> {
  for (const n of c.nodes) {
    const deadline = Date.now() + 20_000;
    while (!(await n.client.showVolume(name).then(() => true, () => false))) {
      checkInterrupted();
      if (Date.now() > deadline) throw new Error(`node ${n.id} does not know volume ${name} 20 s after it was created`);
      await sleep(100);
    }
  }
}

// ---------------------------------------------------------------- fio

/** The first job of fio's JSON output (after any lines fio printed before it); throws on a job error. */
export function fioFirstJob<J extends { error: number }>(stdout: string, excerpt: number): { doc: { timestamp_ms?: number }; job: J } {
  const at = stdout.search(/^\{/m);
  if (at < 0) throw new Error(`no JSON in fio output: ${stdout.slice(0, excerpt)}`);
  const doc = JSON.parse(stdout.slice(at)) as { timestamp_ms?: number; jobs?: J[] };
  const job = doc.jobs?.[0];
  if (!job) throw new Error('fio JSON has no jobs');
  if (job.error !== 0) throw new Error(`fio job error ${job.error}`);
  return { doc, job };
}

/** The worse 99th percentile completion latency of reads and writes, in ns (0 without either). */
export function p99Ns(j: { read: { clat_ns: { percentile?: Record<string, number> } }; write: { clat_ns: { percentile?: Record<string, number> } } }): number {
  return Math.max(j.read.clat_ns.percentile?.['99.000000'] ?? 0, j.write.clat_ns.percentile?.['99.000000'] ?? 0);
}

// ---------------------------------------------------------------- host

export function loadAvg(): [number, number, number] {
  const [a = 0, b = 0, c = 0] = os.loadavg();
  return [a, b, c];
}

export function fmtLoad(l: readonly number[]): string {
  return l.map((x) => x.toFixed(2)).join(' ');
}

export interface Environment {
  date: string;
  nproc: number;
  cpuModel: string;
  memGiB: number;
  kernel: string;
  node: string;
  fio: string;
  loadBefore: [number, number, number];
  loadAfter?: [number, number, number];
  seconds?: number;
}

export async function describeEnvironment(): Promise<Environment> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const fio = await run('fio', ['--version']);
  return {
    date: new Date().toISOString(),
    nproc: os.availableParallelism(),
    cpuModel: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? os.cpus()[0]?.model ?? 'unknown',
    memGiB: Math.round(os.totalmem() / GiB),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    fio: fio.code === 0 ? fio.stdout.trim() : 'not available',
    loadBefore: loadAvg(),
  };
}

// ---------------------------------------------------------------- tables

export type Align = 'l' | 'r';

export function formatTable(headers: readonly string[], rows: readonly string[][], align: readonly Align[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]): string =>
    cells.map((c, i) => (align[i] === 'r' ? c.padStart(widths[i] ?? 0) : c.padEnd(widths[i] ?? 0))).join('  ').trimEnd();
  return [line(headers), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

export function formatMarkdownTable(headers: readonly string[], rows: readonly string[][], align: readonly Align[]): string {
  const sep = align.map((a) => (a === 'r' ? '---:' : ':---'));
  return [headers, sep, ...rows].map((r) => `| ${r.join(' | ')} |`).join('\n');
}

export function fmt(n: number | undefined, digits: number): string {
  if (n === undefined || !Number.isFinite(n)) return 'n/a';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export function ratio(a: number | undefined, b: number | undefined): string {
  return a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0 ? 'n/a' : `${fmt(a / b, 2)}x`;
}
