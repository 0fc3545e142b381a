// A multi-node dve cluster for tests (test/cluster/): N node processes on loopback
// sharing disk files and a metadata file, each started as
//
//   timeout -s KILL <lifetime> node bin/dve.js node start --id N --config DIR/dve.yaml
//           --state-dir DIR/state --log-level debug
//
// with its stdout and stderr (JSON log lines) captured per incarnation. The rig writes
// the configuration with real free ports (a multi-node configuration cannot use port 0:
// peers must know each other's mesh ports), starts, stops (SIGTERM), kills (SIGKILL) and
// restarts nodes, waits for conditions on a node's `status` (the object `dve status
// --json` prints) with a deadline, wraps the admin CLI, and greps the nodes' logs.
//
// Nothing outlives the rig: `close()` SIGKILLs every node process it started (each runs
// in its own process group under `timeout`, which also bounds its life), and a worker
// that exits early kills whatever is left from a process 'exit' handler.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { AdminClient } from '../../src/admin/client.js';
import type { NodeInfo, NodeStatus } from '../../src/engine/admin-api.js';
import { exitStatus, formatCmd, run, sleep, type RunResult } from './exec.js';
import { freePorts } from './ports.js';
import { HOST, REPO_ROOT } from './server.js';

export const DVE_BIN = path.join(REPO_ROOT, 'bin/dve.js');
export type MemberState = NodeInfo['state'];

// ---------------------------------------------------------------- processes left behind

/** Process groups (timeout + node) still running, killed if the worker exits without cleaning up. */
const liveGroups = new Set<number>();
process.on('exit', () => {
  for (const g of liveGroups) {
    try {
      process.kill(-g, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
});

function signalQuietly(pid: number | null | undefined, sig: NodeJS.Signals): void {
  if (!pid) return;
  try {
    process.kill(pid, sig);
  } catch {
    /* gone */
  }
}

/** The parent pid of `pid` (from /proc), or null. */
function parentPid(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // pid (comm) state ppid …; comm may contain spaces and parentheses: parse after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(rest[1]);
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- ports and configuration

export { freePorts };

export interface NodePorts {
  id: number;
  nbd: number;
  admin: number;
  mesh: number;
}

export interface ClusterRigOptions {
  /** Node ids 1…nodes (default 3). */
  nodes?: number;
  /** Mesh heartbeat and peer timeout, ms (default 200 / 1500). */
  heartbeatMs?: number;
  peerTimeoutMs?: number;
  /** Default: a fresh random one (at least 16 characters). */
  secret?: string;
  /** Sparse file disks (default d1, d2 of 1G). */
  disks?: { id: string; size: string }[];
  extentSize?: string;
  metadataSize?: string;
  logLevel?: string;
  /** Hard limit on each node process's life (timeout -s KILL), default 300 s. */
  lifetimeSec?: number;
  /** Prefix of the temp directory under os.tmpdir(). */
  prefix?: string;
}

// ---------------------------------------------------------------- one node process

/** One incarnation of a node: the process started by one `start()`. */
export interface RigProcess {
  id: number;
  incarnation: number;
  /** The `timeout` process (its own process group: timeout + the node). */
  wrapperPid: number;
  /** The node process (from its pid file), once known. */
  pid: number | null;
  cmdline: string;
  configPath: string;
  /** stdout and stderr interleaved (tail, capped). */
  output(): string;
  alive(): boolean;
  /** Exit status once exited (128+N for signal N), else null. */
  exitCode(): number | null;
  /** Resolves to the exit status. */
  exited: Promise<number>;
}

interface ProcState extends RigProcess {
  child: ChildProcess;
  out: string;
  status: number | null;
}

const OUTPUT_LIMIT = 4 * 1024 * 1024;

export interface StartOptions {
  /** Another configuration file (e.g. with a wrong secret); default the rig's. */
  configPath?: string;
  /** Wait until the node serves (its node file names its pid); default true. */
  wait?: boolean;
  timeoutMs?: number;
}

export interface WaitResult {
  status: NodeStatus;
  /** How long the wait took. */
  ms: number;
}

/** One parsed JSON log line (pino), with its index in the node's combined output. */
export interface LogLine {
  msg?: string;
  level?: number;
  [k: string]: unknown;
}

export class ClusterRig {
  readonly dir: string;
  readonly configPath: string;
  readonly stateDir: string;
  readonly ids: number[];
  readonly heartbeatMs: number;
  readonly peerTimeoutMs: number;
  secret: string;
  ports: NodePorts[] = [];
  private readonly opts: Required<Omit<ClusterRigOptions, 'secret' | 'prefix'>>;
  /** Every incarnation of every node, oldest first. */
  private readonly procs = new Map<number, ProcState[]>();
  private closed = false;

  private constructor(o: ClusterRigOptions) {
    this.dir = mkdtempSync(path.join(tmpdir(), o.prefix ?? 'dve-cluster-'));
    this.configPath = path.join(this.dir, 'dve.yaml');
    this.stateDir = path.join(this.dir, 'state');
    this.opts = {
      nodes: o.nodes ?? 3,
      heartbeatMs: o.heartbeatMs ?? 200,
      peerTimeoutMs: o.peerTimeoutMs ?? 1500,
      disks: o.disks ?? [{ id: 'd1', size: '1G' }, { id: 'd2', size: '1G' }],
      extentSize: o.extentSize ?? '4M',
      metadataSize: o.metadataSize ?? '16M',
      logLevel: o.logLevel ?? 'debug',
      lifetimeSec: o.lifetimeSec ?? 300,
    };
    this.heartbeatMs = this.opts.heartbeatMs;
    this.peerTimeoutMs = this.opts.peerTimeoutMs;
    this.ids = Array.from({ length: this.opts.nodes }, (_, i) => i + 1);
    this.secret = o.secret ?? `test-secret-${process.pid}-${Math.random().toString(36).slice(2, 12)}`;
    for (const id of this.ids) this.procs.set(id, []);
  }

  /** Writes the configuration (fresh free ports) in a new temp directory. Nothing is started. */
  static async create(o: ClusterRigOptions = {}): Promise<ClusterRig> {
    if (!existsSync(path.join(REPO_ROOT, 'dist/src/cli/main.js'))) {
      throw new Error('dist/src/cli/main.js is missing: build first (npx tsc -p tsconfig.json)');
    }
    const rig = new ClusterRig(o);
    mkdirSync(rig.stateDir, { recursive: true });
    await rig.pickPorts();
    return rig;
  }

  private async pickPorts(): Promise<void> {
    const p = await freePorts(3 * this.ids.length);
    this.ports = this.ids.map((id, i) => ({ id, nbd: p[3 * i]!, admin: p[3 * i + 1]!, mesh: p[3 * i + 2]! }));
    this.writeConfig(this.configPath);
  }

  /** Writes a configuration for this cluster to `file` (the rig's own by default), optionally with another secret. */
  writeConfig(file: string, over: { secret?: string } = {}): string {
    const lines = [
      `cluster: { name: test, secret: ${JSON.stringify(over.secret ?? this.secret)}, heartbeat: ${this.heartbeatMs}, peerTimeout: ${this.peerTimeoutMs} }`,
      'nodes:',
      ...this.ports.map((n) => `  - { id: ${n.id}, nbd: "${HOST}:${n.nbd}", admin: "${HOST}:${n.admin}", mesh: "${HOST}:${n.mesh}" }`),
      'disks:',
      ...this.opts.disks.map((d) => `  - { id: ${d.id}, path: ${d.id}.img, size: ${d.size} }`),
      `metadata: { path: meta.img, size: ${this.opts.metadataSize} }`,
      `extentSize: ${this.opts.extentSize}`,
      '',
    ];
    writeFileSync(file, lines.join('\n'));
    return file;
  }

  portsOf(id: number): NodePorts {
    const p = this.ports.find((x) => x.id === id);
    if (!p) throw new Error(`no node ${id} in the rig (${this.ids.join(', ')})`);
    return p;
  }

  /** nbd://127.0.0.1:PORT/NAME of node `id`. */
  uri(id: number, volume: string): string {
    return `nbd://${HOST}:${this.portsOf(id).nbd}/${encodeURIComponent(volume)}`;
  }

  admin(id: number, timeoutMs = 10_000): AdminClient {
    return new AdminClient({ host: HOST, port: this.portsOf(id).admin }, { timeoutMs });
  }

  /** The admin API's status object from node `id` (what `dve status --json --node id` prints). */
  status(id: number): Promise<NodeStatus> {
    return this.admin(id).status();
  }

  // ---------------------------------------------------------------- processes

  /** The newest incarnation of node `id` (alive or not), or null if never started. */
  current(id: number): RigProcess | null {
    return this.procs.get(id)?.at(-1) ?? null;
  }

  running(id: number): boolean {
    return this.current(id)?.alive() ?? false;
  }

  /** Starts node `id` (in the foreground under `timeout`); by default waits until it serves. */
  async start(id: number, o: StartOptions = {}): Promise<RigProcess> {
    if (this.closed) throw new Error('the rig is closed');
    if (this.running(id)) throw new Error(`node ${id} is already running (pid ${this.current(id)!.pid})`);
    const configPath = o.configPath ?? this.configPath;
    const args = ['-s', 'KILL', String(this.opts.lifetimeSec), process.execPath, DVE_BIN, 'node', 'start',
      '--id', String(id), '--config', configPath, '--state-dir', this.stateDir, '--log-level', this.opts.logLevel];
    const cmdline = formatCmd('timeout', args);
    // timeout puts itself and the node in a process group of their own.
    const child = spawn('timeout', args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, DVE_LOG_LEVEL: this.opts.logLevel } });
    const list = this.procs.get(id)!;
    let resolveExit!: (code: number) => void;
    const exited = new Promise<number>((r) => (resolveExit = r));
    const p: ProcState = {
      id, incarnation: list.length + 1, wrapperPid: child.pid ?? 0, pid: null, cmdline, configPath, child, out: '', status: null,
      output: () => p.out,
      alive: () => p.status === null,
      exitCode: () => p.status,
      exited,
    };
    list.push(p);
    if (child.pid) liveGroups.add(child.pid);
    const append = (c: Buffer): void => {
      p.out += c.toString('utf8');
      if (p.out.length > OUTPUT_LIMIT) p.out = p.out.slice(-OUTPUT_LIMIT);
    };
    child.stdout!.on('data', append);
    child.stderr!.on('data', append);
    child.on('error', (e) => {
      p.out += `\n[spawn error] ${e.message}\n`;
      if (p.status === null) {
        p.status = 127;
        resolveExit(127);
      }
    });
    child.on('exit', (code, signal) => {
      if (child.pid) liveGroups.delete(child.pid);
      if (p.status === null) {
        p.status = exitStatus(code, signal);
        resolveExit(p.status);
      }
    });
    if (o.wait === false) {
      await this.learnPid(p, o.timeoutMs ?? 15_000);
      return p;
    }
    await this.waitServing(p, o.timeoutMs ?? 30_000);
    return p;
  }

  /** The node's pid, from its pid file once that names a child of our `timeout`. */
  private async learnPid(p: ProcState, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const file = path.join(this.stateDir, `node-${p.id}.pid`);
    while (p.pid === null) {
      try {
        const pid = Number(readFileSync(file, 'utf8').trim());
        if (pid > 0 && parentPid(pid) === p.wrapperPid) p.pid = pid;
      } catch {
        /* not yet */
      }
      if (p.pid !== null) return;
      if (p.status !== null) throw new Error(`node ${p.id} exited with status ${p.status} before it wrote its pid file\n${p.cmdline}\n${tail(p.out)}`);
      if (Date.now() > deadline) throw new Error(`node ${p.id} wrote no pid file within ${timeoutMs} ms\n${p.cmdline}\n${tail(p.out)}`);
      await sleep(20);
    }
  }

  /** Until the node file names the node's pid and the node printed its banner. */
  private async waitServing(p: ProcState, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const file = path.join(this.stateDir, `node-${p.id}.json`);
    for (;;) {
      if (p.status !== null) throw new Error(`node ${p.id} exited with status ${p.status} before it served\n${p.cmdline}\n${tail(p.out)}`);
      const m = new RegExp(`dve node: node ${p.id} \\(pid (\\d+)\\)`).exec(p.out);
      if (m) {
        const pid = Number(m[1]);
        try {
          if (JSON.parse(readFileSync(file, 'utf8')).pid === pid) {
            p.pid = pid;
            return;
          }
        } catch {
          /* not written yet */
        }
      }
      if (Date.now() > deadline) throw new Error(`node ${p.id} did not serve within ${timeoutMs} ms\n${p.cmdline}\n${tail(p.out)}`);
      await sleep(25);
    }
  }

  /**
   * Starts every node that is not running, at once, and waits until each serves. A port
   * taken by someone else between picking and binding (EADDRINUSE) on the first start
   * makes it pick new ports and try again.
   */
  async startAll(timeoutMs = 30_000): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      const ids = this.ids.filter((id) => !this.running(id));
      const fresh = ids.length === this.ids.length && [...this.procs.values()].every((l) => l.length === 0);
      const results = await Promise.allSettled(ids.map((id) => this.start(id, { timeoutMs })));
      const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed.length === 0) return;
      const portClash = failed.some((r) => /EADDRINUSE/.test(String(r.reason?.message)));
      if (!fresh || !portClash || attempt >= 3) throw failed[0]!.reason;
      for (const id of this.ids) await this.kill(id);
      for (const l of this.procs.values()) l.length = 0;
      rmSync(this.stateDir, { recursive: true, force: true });
      mkdirSync(this.stateDir, { recursive: true });
      await this.pickPorts();
    }
  }

  /** SIGTERM, wait (SIGKILL after graceMs); resolves to the exit status (null if it was not running). */
  async stop(id: number, graceMs = 10_000): Promise<number | null> {
    const p = this.procs.get(id)?.at(-1);
    if (!p || p.status !== null) return p?.status ?? null;
    if (p.pid) signalQuietly(p.pid, 'SIGTERM');
    else signalQuietly(p.wrapperPid, 'SIGTERM');
    const timer = setTimeout(() => signalQuietly(-p.wrapperPid, 'SIGKILL'), graceMs);
    const code = await p.exited;
    clearTimeout(timer);
    return code;
  }

  /** SIGKILL the node process (a crash); resolves to the exit status (137), null if it was not running. */
  async kill(id: number): Promise<number | null> {
    const p = this.procs.get(id)?.at(-1);
    if (!p || p.status !== null) return p?.status ?? null;
    if (p.pid) signalQuietly(p.pid, 'SIGKILL');
    else signalQuietly(-p.wrapperPid, 'SIGKILL');
    const timer = setTimeout(() => signalQuietly(-p.wrapperPid, 'SIGKILL'), 5000);
    const code = await p.exited;
    clearTimeout(timer);
    return code;
  }

  async restart(id: number, o: StartOptions = {}): Promise<RigProcess> {
    await this.stop(id);
    return this.start(id, o);
  }

  /** SIGKILLs everything and removes the temp directory. */
  async close(): Promise<void> {
    this.closed = true;
    for (const list of this.procs.values()) {
      for (const p of list) if (p.status === null) signalQuietly(-p.wrapperPid, 'SIGKILL');
    }
    await Promise.all([...this.procs.values()].flat().map((p) => Promise.race([p.exited, sleep(10_000)])));
    rmSync(this.dir, { recursive: true, force: true });
  }

  // ---------------------------------------------------------------- status

  /**
   * Polls `status` from node `observer` every `intervalMs` until `pred` returns true;
   * `pred` may return a string saying what it still waits for (used in the error). A
   * status that fails to answer counts as not yet. Throws after timeoutMs.
   */
  async waitFor(observer: number, what: string, pred: (s: NodeStatus) => boolean | string, timeoutMs = 15_000, intervalMs = 50): Promise<WaitResult> {
    const started = Date.now();
    const deadline = started + timeoutMs;
    let last = 'no answer yet';
    for (;;) {
      try {
        const s = await this.admin(observer, Math.max(1000, Math.min(5000, deadline - Date.now()))).status();
        const r = pred(s);
        if (r === true) return { status: s, ms: Date.now() - started };
        last = typeof r === 'string' ? r : `nodes ${summarizeNodes(s)}`;
      } catch (e) {
        last = `status failed: ${(e as Error).message}`;
      }
      if (Date.now() > deadline) throw new Error(`node ${observer}: ${what}: not within ${timeoutMs} ms (last: ${last})`);
      await sleep(intervalMs);
    }
  }

  /** The state node `observer` gives node `id` (its own entry is 'online'). */
  static stateOf(s: NodeStatus, id: number): MemberState | 'absent' {
    return s.nodes.find((n) => n.id === id)?.state ?? 'absent';
  }

  /** Waits until `observer` reports node `id` in `state`. */
  waitForState(observer: number, id: number, state: MemberState, timeoutMs = 15_000): Promise<WaitResult> {
    return this.waitFor(observer, `node ${id} ${state}`, (s) => ClusterRig.stateOf(s, id) === state || `node ${id} is ${ClusterRig.stateOf(s, id)}`, timeoutMs);
  }

  /** Waits until each of `ids` (default all) sees itself online and every other one of them joined. */
  async waitAllJoined(ids: number[] = this.ids, timeoutMs = 20_000): Promise<number> {
    const started = Date.now();
    await Promise.all(ids.map((obs) => this.waitFor(obs, `nodes ${ids.join(',')} joined`, (s) => {
      const bad = ids.filter((id) => ClusterRig.stateOf(s, id) !== (id === obs ? 'online' : 'joined'));
      return bad.length === 0 || `nodes ${summarizeNodes(s)}`;
    }, timeoutMs)));
    return Date.now() - started;
  }

  /** Starts whatever node is not running and waits until all are joined (a test's starting point). */
  async ensureAllJoined(timeoutMs = 30_000): Promise<void> {
    if (this.ids.some((id) => !this.running(id))) await this.startAll();
    await this.waitAllJoined(this.ids, timeoutMs);
  }

  // ---------------------------------------------------------------- CLI

  /** `node bin/dve.js ARGS --state-dir STATE [--node N]` under timeout -s KILL. */
  cli(args: string[], o: { node?: number; timeoutSec?: number } = {}): Promise<RunResult> {
    const full = [DVE_BIN, ...args, '--state-dir', this.stateDir];
    if (o.node !== undefined) full.push('--node', String(o.node));
    return run(process.execPath, full, { timeoutSec: o.timeoutSec ?? 60, cwd: REPO_ROOT });
  }

  /** `dve ARGS --json`, parsed; throws with the command's output unless it exits 0 with JSON. */
  async cliJson<T = any>(args: string[], o: { node?: number; timeoutSec?: number } = {}): Promise<T> {
    const r = await this.cli([...args, '--json'], o);
    if (r.code !== 0) throw new Error(`${r.cmdline} → exit ${r.code}\n${r.stdout}\n${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  }

  // ---------------------------------------------------------------- logs

  /** Everything node `id` printed, all incarnations in order (each headed by a marker line). */
  output(id: number): string {
    return (this.procs.get(id) ?? []).map((p) => `=== node ${id} incarnation ${p.incarnation} (pid ${p.pid ?? '?'}, exit ${p.exitCode() ?? 'running'}) ===\n${p.out}`).join('');
  }

  /** A position in node `id`'s log: pass it to logLines/waitForLog to look only at what came later. */
  mark(id: number): LogMark {
    const list = this.procs.get(id) ?? [];
    const p = list.at(-1);
    return { incarnation: p?.incarnation ?? 0, offset: p?.out.length ?? 0 };
  }

  /** Node `id`'s JSON log lines (all incarnations; since a mark when given). */
  logLines(id: number, since?: LogMark): LogLine[] {
    const out: LogLine[] = [];
    for (const p of this.procs.get(id) ?? []) {
      if (since && p.incarnation < since.incarnation) continue;
      const text = since && p.incarnation === since.incarnation ? p.out.slice(since.offset) : p.out;
      for (const line of text.split('\n')) {
        if (!line.startsWith('{')) continue;
        try {
          out.push(JSON.parse(line) as LogLine);
        } catch {
          /* a partial last line */
        }
      }
    }
    return out;
  }

  /** Log lines of node `id` whose msg matches `msg` (and `filter`, when given). */
  grep(id: number, msg: RegExp | string, o: { since?: LogMark; filter?: (l: LogLine) => boolean } = {}): LogLine[] {
    return this.logLines(id, o.since).filter((l) => typeof l.msg === 'string'
      && (typeof msg === 'string' ? l.msg === msg : msg.test(l.msg)) && (o.filter ? o.filter(l) : true));
  }

  /** Waits until node `id` logs a matching line; resolves to the matches. */
  async waitForLog(id: number, msg: RegExp | string, o: { since?: LogMark; filter?: (l: LogLine) => boolean; timeoutMs?: number } = {}): Promise<LogLine[]> {
    const deadline = Date.now() + (o.timeoutMs ?? 10_000);
    for (;;) {
      const hits = this.grep(id, msg, o);
      if (hits.length > 0) return hits;
      if (Date.now() > deadline) throw new Error(`node ${id} logged no ${String(msg)} within ${o.timeoutMs ?? 10_000} ms`);
      await sleep(50);
    }
  }

  /** The tail of every node's log without debug and trace lines, for a failing test. */
  describe(lines = 60): string {
    return this.ids.map((id) => {
      const kept = this.output(id).split('\n').filter((l) => !/^\{"level":(10|20),/.test(l));
      return `--- node ${id}: last ${lines} lines above debug ---\n${kept.slice(-lines).join('\n')}`;
    }).join('\n');
  }
}

export interface LogMark {
  incarnation: number;
  offset: number;
}

/** "1 online, 2 joined, 3 evicted". */
export function summarizeNodes(s: NodeStatus): string {
  return s.nodes.map((n) => `${n.id} ${n.state}`).join(', ');
}

function tail(s: string, max = 6000): string {
  return s.length <= max ? s : `…${s.slice(-max)}`;
}
