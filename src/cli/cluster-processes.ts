/**
 * The process plumbing shared by `dve up`, `dve down` and `dve node start|stop|kill`:
 * where a node's pid file and log live in the state directory, claiming and reading pid
 * files, spawning a node process (`dve node start --id N`), waiting for it to come up
 * (its node file names its pid) and signalling nodes and waiting for them to go.
 *
 * Files in the state directory:
 *   node-N.pid   the node process (written by `dve node start` before the engine
 *                opens, removed when it stops; a file naming a dead pid is stale)
 *   node-N.json  written by the node once it serves (src/admin/node-file.ts)
 *   node-N.log   stdout and stderr of a node started in the background (appended)
 *   dve.pid      the foreground `dve up` supervisor
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { processAlive } from '../util/process.js';
import { nodeFilePath, readNodeFiles, type NodeFileInfo } from '../admin/node-file.js';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function nodePidPath(stateDir: string, id: number): string {
  return path.join(stateDir, `node-${id}.pid`);
}

export function nodeLogPath(stateDir: string, id: number): string {
  return path.join(stateDir, `node-${id}.log`);
}

export function supervisorPidPath(stateDir: string): string {
  return path.join(stateDir, 'dve.pid');
}

/** The pid a pid file names, or null (missing, empty, not a number). */
export function readPid(file: string): number | null {
  try {
    const pid = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/** The pid a pid file names when that process is alive (not a zombie), else null. */
export function livePid(file: string): number | null {
  const pid = readPid(file);
  return pid !== null && processAlive(pid) ? pid : null;
}

/** Removes a pid file only while it still names `pid` (never someone else's). */
export function removePidFileIf(file: string, pid: number): void {
  if (readPid(file) === pid) fs.rmSync(file, { force: true });
}

/**
 * Writes `pid` into `file` unless a live process already holds it: returns null when
 * claimed, else the holder's pid. The file appears whole (hard link of a temp file), and
 * two claimants cannot both win while the file exists; a stale file is replaced.
 */
export function claimPidFile(file: string, pid: number = process.pid): number | null {
  const tmp = `${file}.${pid}.tmp`;
  fs.writeFileSync(tmp, `${pid}\n`);
  try {
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        fs.linkSync(tmp, file);
        return null;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
      const holder = readPid(file);
      if (holder === pid) return null;
      if (holder !== null && processAlive(holder)) return holder;
      fs.rmSync(file, { force: true }); // stale: its process is gone
    }
    throw new Error(`could not claim ${file}: it keeps changing under us (another start at the same time?)`);
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

export interface NodePid {
  id: number;
  pid: number;
}

const PID_NAME = /^node-(\d+)\.pid$/;

/**
 * The nodes whose pid file names a live process, by id. Pid files of dead processes
 * (a SIGKILLed node) are removed on the way, with the node file if it names the same pid.
 */
export function liveNodePids(stateDir: string): NodePid[] {
  let names: string[];
  try {
    names = fs.readdirSync(stateDir);
  } catch {
    return [];
  }
  const out: NodePid[] = [];
  for (const name of names) {
    const m = PID_NAME.exec(name);
    if (!m) continue;
    const id = Number(m[1]);
    const pid = readPid(path.join(stateDir, name));
    if (pid !== null && processAlive(pid)) out.push({ id, pid });
    else if (pid !== null) forgetNode(stateDir, id, pid);
  }
  return out.sort((a, b) => a.id - b.id);
}

/** After node `id` (process `pid`) is gone: remove its pid file and node file if they still name it. */
export function forgetNode(stateDir: string, id: number, pid: number): void {
  removePidFileIf(nodePidPath(stateDir, id), pid);
  const nodeFile = nodeFilePath(stateDir, id);
  try {
    if ((JSON.parse(fs.readFileSync(nodeFile, 'utf8')) as { pid?: unknown }).pid === pid) fs.rmSync(nodeFile, { force: true });
  } catch {
    /* missing or unreadable: nothing to forget */
  }
}

/** Resolves true once `pid` is gone (or a zombie), false if it is still alive after timeoutMs. */
export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processAlive(pid)) {
    if (Date.now() >= deadline) return false;
    await sleep(50);
  }
  return true;
}

export function signal(pid: number, sig: NodeJS.Signals): boolean {
  try {
    process.kill(pid, sig);
    return true;
  } catch {
    return false;
  }
}

export interface StopResult extends NodePid {
  stopped: boolean;
}

/**
 * Sends `sig` to every node at once, waits up to timeoutMs for each to go, and
 * forgets (pid file, node file) the ones that went.
 */
export async function signalNodes(stateDir: string, nodes: NodePid[], sig: NodeJS.Signals, timeoutMs: number): Promise<StopResult[]> {
  for (const n of nodes) signal(n.pid, sig);
  return Promise.all(nodes.map(async (n) => {
    const stopped = await waitForExit(n.pid, timeoutMs);
    if (stopped) forgetNode(stateDir, n.id, n.pid);
    return { ...n, stopped };
  }));
}

/** The last `lines` lines of a node log, from its latest start only. */
export function logTail(file: string, lines = 40): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return `(no log at ${file})`;
  }
  const start = text.lastIndexOf(LOG_HEADER);
  if (start >= 0) text = text.slice(text.indexOf('\n', start) + 1);
  const all = text.trimEnd().split('\n');
  const tail = all.slice(-lines).join('\n');
  return tail === '' ? '(the log is empty)' : tail;
}

const LOG_HEADER = '=== dve node start';

/** bin/dve.js of this installation (dist/src/cli/ → ../../../bin). */
export function dveBin(): string {
  return fileURLToPath(new URL('../../../bin/dve.js', import.meta.url));
}

export interface NodeSpawnOptions {
  stateDir: string;
  id: number;
  port: number;
  bind: string;
  logLevel: string;
  config?: string;
  /** Keep a pipe on the node's stdin: it stops when this process (its supervisor) goes. */
  supervised: boolean;
}

export interface SpawnedNode {
  id: number;
  child: ChildProcess;
  pid: number;
  logPath: string;
  /** Exit code or signal once it exited (set by an 'exit' listener), else null. */
  exit: { code: number | null; signal: NodeJS.Signals | null } | null;
}

/**
 * Starts `dve node start --id N …` in its own session (a terminal's Ctrl-C reaches only
 * the supervisor, which forwards it once), stdout and stderr appended to node-N.log.
 */
export function spawnNode(o: NodeSpawnOptions): SpawnedNode {
  const logPath = nodeLogPath(o.stateDir, o.id);
  const args = [dveBin(), 'node', 'start', '--id', String(o.id), '--state-dir', o.stateDir,
    '--port', String(o.port), '--bind', o.bind, '--log-level', o.logLevel];
  if (o.config) args.push('--config', path.resolve(o.config));
  if (o.supervised) args.push('--supervised');
  fs.appendFileSync(logPath, `${LOG_HEADER} --id ${o.id}: ${new Date().toISOString()} (by pid ${process.pid}) ===\n`);
  const out = fs.openSync(logPath, 'a');
  let child: ChildProcess;
  try {
    child = spawn(process.execPath, args, {
      detached: true,
      stdio: [o.supervised ? 'pipe' : 'ignore', out, out],
    });
  } finally {
    fs.closeSync(out);
  }
  const node: SpawnedNode = { id: o.id, child, pid: child.pid ?? 0, logPath, exit: null };
  child.on('exit', (code, sig) => {
    node.exit = { code, signal: sig };
  });
  child.on('error', () => {
    node.exit ??= { code: 127, signal: null };
  });
  // A supervisor that dies closes the pipe; the node notices and stops. Nothing is written to it.
  child.stdin?.on('error', () => { /* the node is gone */ });
  return node;
}

export function describeExit(exit: { code: number | null; signal: NodeJS.Signals | null }): string {
  return exit.signal ? `signal ${exit.signal}` : `code ${exit.code}`;
}

/** Shell convention: the code, or 128 + the signal number. */
export function exitStatus(exit: { code: number | null; signal: NodeJS.Signals | null }): number {
  if (exit.code !== null) return exit.code;
  return 128 + (exit.signal ? os.constants.signals[exit.signal] ?? 0 : 0);
}

/**
 * Node `id` serves as process `pid` when its pid file and its node file both name that
 * pid: returns the node file then, else null. `files` saves re-reading the directory.
 */
export function nodeUp(stateDir: string, id: number, pid: number, files: NodeFileInfo[] = readNodeFiles(stateDir)): NodeFileInfo | null {
  if (readPid(nodePidPath(stateDir, id)) !== pid) return null;
  return files.find((n) => n.id === id && n.pid === pid) ?? null;
}

/**
 * Waits until node `id` serves as process `pid` (see nodeUp). Resolves to its node
 * file, or to null when `gone()` says the process exited first; rejects after timeoutMs.
 */
export async function waitForNodeUp(stateDir: string, id: number, pid: number, timeoutMs: number, gone: () => boolean): Promise<NodeFileInfo | null> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = nodeUp(stateDir, id, pid);
    if (info) return info;
    if (gone()) return null;
    if (Date.now() >= deadline) throw new Error(`node ${id} (pid ${pid}) did not come up within ${Math.round(timeoutMs / 1000)} s`);
    await sleep(50);
  }
}

/** "127.0.0.1:10809"; a wildcard listen address is reached on loopback. */
export function reachable(e: { host: string; port: number }): { host: string; port: number } {
  const host = e.host === '0.0.0.0' || e.host === '' ? '127.0.0.1' : e.host === '::' ? '::1' : e.host;
  return { host, port: e.port };
}

export function indent(text: string, prefix = '  '): string {
  return text.split('\n').map((l) => prefix + l).join('\n');
}
