// Starts the NBD server under test: `dve serve` (default) or nbdkit's file plugin as a
// reference implementation (DVE_INTEROP_SERVER=nbdkit), so the same interop tests run
// against either.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ExecutionContext, TestFn } from 'ava';
import { exitStatus, formatCmd, sleep, uniqueName } from './exec.js';

export type ServerKind = 'dve' | 'nbdkit';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const HOST = '127.0.0.1';

/** The server kind chosen by DVE_INTEROP_SERVER (default 'dve'). */
export function serverKind(): ServerKind {
  const v = (process.env.DVE_INTEROP_SERVER ?? 'dve').trim().toLowerCase();
  if (v === '' || v === 'dve') return 'dve';
  if (v === 'nbdkit') return 'nbdkit';
  throw new Error(`DVE_INTEROP_SERVER must be 'dve' or 'nbdkit', not ${JSON.stringify(v)}`);
}

export interface ServerOptions {
  /** Export name; a unique one is made up when absent. */
  exportName?: string;
  /** Size for a backing file that does not exist yet (dve: --size; nbdkit: the file is created sparse). */
  size?: number;
  readOnly?: boolean;
  /** How long to wait for the server to listen (default 30 s). */
  startTimeoutSec?: number;
}

export interface NbdServer {
  kind: ServerKind;
  /** nbd://127.0.0.1:PORT/NAME */
  uri: string;
  host: string;
  port: number;
  exportName: string;
  pid: number;
  /** The command line that started it. */
  cmdline: string;
  /** False once the process has exited (e.g. crashed). */
  alive(): boolean;
  /** Exit status once exited (128+N for signal N), else null. */
  exitCode(): number | null;
  /** What it printed so far (stdout and stderr, interleaved, tail). */
  output(): string;
  /** SIGTERM, wait for exit (SIGKILL after 10 s); resolves to the exit status (128+N for signal N). */
  stop(): Promise<number>;
}

const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of live) {
    try {
      child.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
});

const OUTPUT_LIMIT = 256 * 1024;

interface Proc {
  child: ChildProcess;
  cmdline: string;
  output(): string;
  exited: Promise<number>;
  status: { code: number | null };
}

function spawnServer(cmd: string, args: string[], onStdoutLine?: (line: string) => void): Proc {
  const child = spawn(cmd, args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: process.env });
  live.add(child);
  let out = '';
  const append = (s: string) => {
    out += s;
    if (out.length > OUTPUT_LIMIT) out = out.slice(-OUTPUT_LIMIT);
  };
  let pending = '';
  child.stdout!.on('data', (c: Buffer) => {
    const s = c.toString('utf8');
    append(s);
    if (!onStdoutLine) return;
    pending += s;
    let nl: number;
    while ((nl = pending.indexOf('\n')) >= 0) {
      onStdoutLine(pending.slice(0, nl));
      pending = pending.slice(nl + 1);
    }
    if (pending.length > 0) onStdoutLine(pending); // a line may come without its newline yet
  });
  child.stderr!.on('data', (c: Buffer) => append(c.toString('utf8')));
  const status = { code: null as number | null };
  const exited = new Promise<number>((resolve) => {
    child.on('error', (e) => {
      append(`\n[spawn error] ${e.message}\n`);
      status.code = 127;
      live.delete(child);
      resolve(127);
    });
    child.on('exit', (code, signal) => {
      status.code = exitStatus(code, signal);
      live.delete(child);
      resolve(status.code);
    });
  });
  return { child, cmdline: formatCmd(cmd, args), output: () => out, exited, status };
}

async function stopProc(p: Proc): Promise<number> {
  if (p.status.code !== null) return p.status.code;
  p.child.kill('SIGTERM');
  const timer = setTimeout(() => {
    if (p.status.code === null) p.child.kill('SIGKILL');
  }, 10_000);
  const code = await p.exited;
  clearTimeout(timer);
  return code;
}

function makeServer(kind: ServerKind, p: Proc, port: number, exportName: string): NbdServer {
  return {
    kind,
    uri: `nbd://${HOST}:${port}/${exportName}`,
    host: HOST,
    port,
    exportName,
    pid: p.child.pid!,
    cmdline: p.cmdline,
    alive: () => p.status.code === null,
    exitCode: () => p.status.code,
    output: p.output,
    stop: () => stopProc(p),
  };
}

function startError(what: string, p: Proc): Error {
  return new Error(`${what}\ncommand: ${p.cmdline}\n--- server output ---\n${p.output().slice(-8000)}`);
}

async function startDve(file: string, exportName: string, opts: ServerOptions): Promise<NbdServer> {
  const args = [path.join(REPO_ROOT, 'bin/dve.js'), 'serve', file, '--port', '0', '--export', exportName];
  if (opts.size !== undefined) args.push('--size', String(opts.size));
  if (opts.readOnly) args.push('--read-only');
  let found: { port: number; name: string } | undefined;
  let notify: (() => void) | undefined;
  const p = spawnServer(process.execPath, args, (line) => {
    if (found) return;
    const m = /nbd:\/\/127\.0\.0\.1:(\d+)\/([A-Za-z0-9._~%-]*)/.exec(line);
    if (m) {
      found = { port: Number(m[1]), name: decodeURIComponent(m[2]!) };
      notify?.();
    }
  });
  const timeoutMs = (opts.startTimeoutSec ?? 30) * 1000;
  const listening = new Promise<void>((resolve) => {
    notify = resolve;
    if (found) resolve();
  });
  let timer: NodeJS.Timeout | undefined;
  const outcome = await Promise.race([
    listening.then(() => 'listening' as const),
    p.exited.then(() => 'exited' as const),
    new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), timeoutMs))),
  ]);
  clearTimeout(timer);
  if (outcome !== 'listening' || !found) {
    await stopProc(p);
    throw startError(
      outcome === 'exited'
        ? `dve serve exited (status ${p.status.code}) before printing nbd://127.0.0.1:PORT/${exportName}`
        : `dve serve did not print nbd://127.0.0.1:PORT/${exportName} within ${timeoutMs / 1000} s`,
      p,
    );
  }
  if (found.name !== exportName) {
    await stopProc(p);
    throw startError(`dve serve printed export name ${JSON.stringify(found.name)}, expected ${JSON.stringify(exportName)}`, p);
  }
  return makeServer('dve', p, found.port, exportName);
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, HOST, () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host: HOST, port });
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.on('connect', () => done(true));
    sock.on('error', () => done(false));
  });
}

/**
 * nbdkit's file plugin, plus two filters so it advertises what dve advertises:
 * - exportname: NBD_OPT_LIST reports the export name (plain `-e` only matters with --run),
 *   and other export names are refused, as a single-export server should;
 * - nozero fastzeromode=slow: the file plugin does not offer fast zero on a regular file;
 *   this advertises NBD_FLAG_SEND_FAST_ZERO and fails every fast-zero request with ENOTSUP,
 *   which the NBD spec allows (zeroing without the fast flag still goes to the plugin).
 */
async function startNbdkit(file: string, exportName: string, opts: ServerOptions): Promise<NbdServer> {
  if (opts.size !== undefined && !existsSync(file)) {
    writeFileSync(file, '');
    truncateSync(file, opts.size);
  }
  const deadline = Date.now() + (opts.startTimeoutSec ?? 30) * 1000;
  let lastError: Error | undefined;
  for (let attempt = 0; attempt < 5 && Date.now() < deadline; attempt++) {
    const port = await freePort();
    const pidFile = path.join(path.dirname(file), `.nbdkit-${uniqueName('pid')}`);
    const args = ['-f', '-i', HOST, '-p', String(port), '-e', exportName, '-P', pidFile];
    if (opts.readOnly) args.push('-r');
    args.push('--filter=exportname');
    if (!opts.readOnly) args.push('--filter=nozero');
    args.push('file', file, `exportname=${exportName}`, `default-export=${exportName}`, 'exportname-list=explicit', 'exportname-strict=true');
    if (!opts.readOnly) args.push('zeromode=plugin', 'fastzeromode=slow');
    const p = spawnServer('nbdkit', args);
    // nbdkit writes the pid file once it is ready to accept connections.
    while (p.status.code === null && Date.now() < deadline) {
      if (existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '' && (await canConnect(port))) {
        return makeServer('nbdkit', p, port, exportName);
      }
      await sleep(50);
    }
    lastError = startError(
      p.status.code === null ? 'nbdkit did not start accepting connections in time' : `nbdkit exited with status ${p.status.code}`,
      p,
    );
    await stopProc(p);
    if (!/address already in use|bind/i.test(p.output())) break; // only a lost port race is worth a retry
  }
  throw lastError ?? new Error('nbdkit did not start');
}

/** Starts an NBD server of the given kind exporting `file`. */
export async function startServer(kind: ServerKind, file: string, opts: ServerOptions = {}): Promise<NbdServer> {
  const exportName = opts.exportName ?? uniqueName('exp');
  if (!/^[A-Za-z0-9._~-]+$/.test(exportName)) throw new Error(`export name must be URI-safe: ${exportName}`);
  return kind === 'dve' ? startDve(file, exportName, opts) : startNbdkit(file, exportName, opts);
}

export interface InteropContext {
  servers?: NbdServer[];
}

/**
 * startServer() with the kind from DVE_INTEROP_SERVER, stopped by t.teardown. The server is
 * remembered in t.context so logServersOnFailure() can show its output when the test fails.
 */
export async function startTestServer(t: ExecutionContext, file: string, opts: ServerOptions = {}): Promise<NbdServer> {
  const srv = await startServer(serverKind(), file, opts);
  const ctx = t.context as InteropContext;
  (ctx.servers ??= []).push(srv);
  t.teardown(async () => {
    await srv.stop();
  });
  return srv;
}

/** Registers an afterEach.always hook that logs the servers' output (and exit status) for failed tests. */
export function logServersOnFailure(test: TestFn<any>): void {
  test.afterEach.always((t) => {
    if (t.passed) return;
    for (const srv of (t.context as InteropContext).servers ?? []) {
      t.log(`server ${srv.kind} pid ${srv.pid} (${srv.cmdline}) exit status ${srv.exitCode()}\n--- server output (tail) ---\n${srv.output().slice(-6000)}`);
    }
  });
}

/** Message for asserting the server survived what a test did to it. */
export function crashMessage(srv: NbdServer): string {
  return `server ${srv.kind} (pid ${srv.pid}) exited with status ${srv.exitCode()} during the test\n${srv.output().slice(-4000)}`;
}
