// Process helpers for the interop suite: every external client runs under
// `timeout -s KILL N`, so a hung client can never hang the test run (or CI).
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { ExecutionContext } from 'ava';

export interface RunOptions {
  /** Hard limit: the command (and its process group) is SIGKILLed after this many seconds. */
  timeoutSec: number;
  /** Written to the command's stdin (stdin is closed afterwards; /dev/null when absent). */
  input?: string | Buffer;
  /** Extra environment variables, merged over process.env. */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

export interface RunResult {
  /** Exit status; 128+N when killed by signal N (137 = SIGKILL, e.g. by `timeout`). */
  code: number;
  stdout: string;
  stderr: string;
  /** True when `timeout` had to kill the command. */
  timedOut: boolean;
  /** Human-readable command line, for messages. */
  cmdline: string;
  elapsedMs: number;
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGABRT: 6, SIGKILL: 9, SIGSEGV: 11, SIGPIPE: 13, SIGTERM: 15 };

/** Exit status in shell convention: the code, or 128+signal number. */
export function exitStatus(code: number | null, signal: NodeJS.Signals | null): number {
  if (code !== null) return code;
  return 128 + (signal ? (SIGNALS[signal] ?? 0) : 0);
}

export function quoteArg(a: string): string {
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

export function formatCmd(cmd: string, args: readonly string[]): string {
  return [cmd, ...args].map(quoteArg).join(' ');
}

/** Runs `timeout -s KILL <timeoutSec> cmd args…` and collects its output. Never rejects on a non-zero exit. */
export function run(cmd: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
  const timeoutSec = Math.max(1, Math.ceil(opts.timeoutSec));
  const cmdline = formatCmd(cmd, args);
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn('timeout', ['-s', 'KILL', String(timeoutSec), cmd, ...args], {
      env: opts.env ? { ...process.env, ...opts.env } : process.env,
      cwd: opts.cwd,
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (c: Buffer) => out.push(c));
    child.stderr!.on('data', (c: Buffer) => err.push(c));
    child.on('error', reject);
    if (opts.input !== undefined) {
      child.stdin!.on('error', () => { /* the command may exit without reading all of it */ });
      child.stdin!.end(opts.input);
    }
    child.on('close', (code, signal) => {
      const status = exitStatus(code, signal);
      const elapsedMs = Date.now() - started;
      resolve({
        code: status,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        timedOut: status === 137 && elapsedMs >= timeoutSec * 1000 - 50,
        cmdline,
        elapsedMs,
      });
    });
  });
}

function tail(s: string, max = 6000): string {
  return s.length <= max ? s : `…(${s.length - max} chars cut)…\n${s.slice(-max)}`;
}

/** Describes a finished command: command line, status, stdout and stderr (tails). */
export function describeResult(r: RunResult): string {
  const why = r.timedOut ? `killed after its ${Math.round(r.elapsedMs / 1000)} s time limit` : `exit status ${r.code}`;
  return `${r.cmdline}\n→ ${why}\n--- stdout ---\n${tail(r.stdout)}\n--- stderr ---\n${tail(r.stderr)}`;
}

export class CommandError extends Error {
  constructor(readonly result: RunResult) {
    super(`command failed: ${describeResult(result)}`);
    this.name = 'CommandError';
  }
}

/** Like run(), but throws a CommandError (with stdout/stderr) unless the exit status is 0. */
export async function mustRun(cmd: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new CommandError(r);
  return r;
}

/** Mount points at or below `dir` (from /proc/self/mounts), deepest first. */
export function mountsUnder(dir: string): string[] {
  const root = path.resolve(dir);
  let text = '';
  try {
    text = readFileSync('/proc/self/mounts', 'utf8');
  } catch {
    return [];
  }
  const decode = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  return text
    .split('\n')
    .map((line) => line.split(' ')[1])
    .filter((m): m is string => !!m)
    .map(decode)
    .filter((m) => m === root || m.startsWith(root + '/'))
    .sort((a, b) => b.length - a.length);
}

/**
 * Makes a fresh directory under the system temp dir and removes it when the test ends
 * (t.teardown; teardowns run last-registered-first, so things created later inside it are
 * cleaned up before it). If something is still mounted below it, it is lazily unmounted
 * first, and the directory is left in place rather than deleted through a live mount.
 */
export function tempDir(t: ExecutionContext, prefix = 'dve-interop-'): string {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  t.teardown(async () => {
    for (const m of mountsUnder(dir)) {
      await run('umount', ['-l', m], { timeoutSec: 20 });
    }
    if (mountsUnder(dir).length > 0) {
      console.error(`[interop] leaving ${dir} in place: still mounted: ${mountsUnder(dir).join(', ')}`);
      return;
    }
    if (existsSync(dir)) rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/** Unique, URI-safe name (export names, file names). */
let uniqueCounter = 0;
export function uniqueName(prefix: string): string {
  uniqueCounter += 1;
  return `${prefix}-${process.pid}-${uniqueCounter}-${Math.random().toString(36).slice(2, 8)}`;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
