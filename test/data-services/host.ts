// Host-side plumbing for the data-services tests (test/data-services/): what
// test/helpers/engine-node.ts has, plus read-only attaches (nbdfuse -r + losetup -r),
// mounts with options, whole-export checksums streamed from nbdcopy, little python3-libnbd
// programs, and fio's IOPS logs.
//
// Every external command runs under `timeout -s KILL`; everything attached is undone
// from a CleanupStack (and, should the worker die, from a process 'exit' handler).
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { describeResult, exitStatus, mountsUnder, mustRun, run, sleep, type RunResult } from '../helpers/exec.js';
import type { CleanupStack } from '../helpers/cleanup.js';
import { killQuietly, onExit, startNbdfuse, syncRun, type FuseFile } from '../helpers/engine-node.js';

/** SIGKILL a process group (our own children run in their own groups). */
function killGroup(pid: number | undefined, sig: NodeJS.Signals = 'SIGKILL'): void {
  if (pid) killQuietly(-pid, sig);
}

export function isMounted(dir: string): boolean {
  return mountsUnder(dir).includes(path.resolve(dir));
}

// ---------------------------------------------------------------- checksums of exports

export interface ExportSum {
  sha256: string;
  bytes: number;
  ms: number;
}

/** `nbdcopy URI -` streamed into sha256 (nothing lands on disk). */
export function sha256OfExport(uri: string, timeoutSec = 90): Promise<ExportSum> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn('timeout', ['-s', 'KILL', String(timeoutSec), 'nbdcopy', uri, '-'], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const off = onExit(() => killGroup(child.pid));
    const h = createHash('sha256');
    let bytes = 0;
    let err = '';
    child.stdout!.on('data', (c: Buffer) => {
      h.update(c);
      bytes += c.length;
    });
    child.stderr!.on('data', (c: Buffer) => (err += c.toString()));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      off();
      const st = exitStatus(code, signal);
      if (st !== 0) reject(new Error(`nbdcopy ${uri} - → exit ${st}${st === 137 ? ` (killed after ${timeoutSec} s?)` : ''}\n${err}`));
      else resolve({ sha256: h.digest('hex'), bytes, ms: Date.now() - started });
    });
  });
}

/** `nbdcopy URI null:`: how long reading the whole export takes. */
export async function timeRead(uri: string, timeoutSec = 90): Promise<{ ms: number; r: RunResult }> {
  const r = await run('nbdcopy', [uri, 'null:'], { timeoutSec });
  if (r.code !== 0) throw new Error(`reading ${uri}: ${describeResult(r)}`);
  return { ms: r.elapsedMs, r };
}

export function mibPerSec(bytes: number, ms: number): number {
  return Math.round((bytes / (1024 * 1024)) / (ms / 1000));
}

// ---------------------------------------------------------------- python3-libnbd

/**
 * Debian's libnbd Python module is importable only by the system interpreter (a pyenv
 * python3 may come first on PATH).
 */
export const SYSTEM_PYTHON = '/usr/bin/python3';

/** Runs a python3-libnbd program (`import nbd` works); argv after the script. */
export async function python(script: string, args: string[], timeoutSec = 60): Promise<RunResult> {
  const r = await run(SYSTEM_PYTHON, ['-c', script, ...args], { timeoutSec });
  if (/No module named '?nbd/.test(r.stderr)) throw new Error(`python3-libnbd is missing (Debian package python3-libnbd):\n${r.stderr}`);
  return r;
}

/** The little-endian u64 at `offset` of each export, read in one python process. */
export async function readU64s(uris: string[], offset = 0): Promise<number[]> {
  const r = await python(
    'import nbd, struct, sys\nout = []\nfor u in sys.argv[2:]:\n    h = nbd.NBD(); h.connect_uri(u)\n    out.append(struct.unpack("<Q", h.pread(8, int(sys.argv[1])))[0])\n    h.shutdown()\nprint(" ".join(map(str, out)))\n',
    [String(offset), ...uris],
  );
  if (r.code !== 0) throw new Error(describeResult(r));
  return r.stdout.trim().split(/\s+/).map(Number);
}

// ---------------------------------------------------------------- nbdfuse (optionally read-only) + loop

export type { FuseFile };

/** `nbdfuse [-r] MOUNTDIR URI` (own process group, under timeout -s KILL), waiting for MOUNTDIR/nbd of `expectedSize` bytes. */
export function startFuse(cleanup: CleanupStack, uri: string, fuseDir: string, expectedSize: number, o: { readOnly?: boolean; lifetimeSec?: number } = {}): Promise<FuseFile> {
  return startNbdfuse(cleanup, uri, fuseDir, expectedSize, { lifetimeSec: 300, ...o });
}

export interface BlockDevice {
  dev: string;
  fuse: FuseFile;
  /** Loop device, then nbdfuse, strictly. */
  detach(): Promise<void>;
}

/** nbdfuse [-r] + `losetup -f --show [-r] --direct-io=off`: a block device over an NBD URI. */
export async function attachBlock(cleanup: CleanupStack, uri: string, fuseDir: string, size: number, o: { readOnly?: boolean } = {}): Promise<BlockDevice> {
  const fuse = await startFuse(cleanup, uri, fuseDir, size, o);
  const r = await mustRun('losetup', ['-f', '--show', ...(o.readOnly ? ['-r'] : []), '--direct-io=off', fuse.file], { timeoutSec: 30 });
  const dev = r.stdout.trim();
  if (!/^\/dev\/loop\d+$/.test(dev)) throw new Error(`losetup printed ${JSON.stringify(r.stdout)}`);
  const offExit = onExit(() => syncRun('losetup', ['-d', dev]));
  const dismiss = cleanup.push(`losetup -d ${dev}`, async () => {
    await run('losetup', ['-d', dev], { timeoutSec: 20 });
    offExit();
  });
  return {
    dev,
    fuse,
    async detach() {
      await mustRun('losetup', ['-d', dev], { timeoutSec: 30 });
      dismiss();
      offExit();
      // The loop device lets go of the file asynchronously: retry the FUSE unmount a little.
      await fuse.unmount();
    },
  };
}

export interface Mount {
  dir: string;
  umount(): Promise<void>;
}

/** `mount -t ext4 [-o OPTS] DEV DIR`. */
export async function mountFs(cleanup: CleanupStack, dev: string, dir: string, options?: string): Promise<Mount> {
  mkdirSync(dir, { recursive: true });
  await mustRun('mount', ['-t', 'ext4', ...(options ? ['-o', options] : []), dev, dir], { timeoutSec: 30 });
  const offExit = onExit(() => syncRun('umount', ['-l', dir]));
  const dismiss = cleanup.push(`umount ${dir}`, async () => {
    await run('fsfreeze', ['-u', dir], { timeoutSec: 10 }); // in case a test stopped while it was frozen
    if (isMounted(dir)) await run('umount', ['-l', dir], { timeoutSec: 20 });
    offExit();
  });
  return {
    dir,
    async umount() {
      await mustRun('umount', [dir], { timeoutSec: 60 });
      dismiss();
      offExit();
    },
  };
}

/** df -B1 for a mount point: { sizeBytes, usedBytes } of the filesystem. */
export async function dfBytes(dir: string): Promise<{ sizeBytes: number; usedBytes: number; text: string }> {
  const r = await mustRun('df', ['-B1', '--output=size,used', dir], { timeoutSec: 20 });
  const [size, used] = r.stdout.trim().split('\n').at(-1)!.trim().split(/\s+/).map(Number);
  return { sizeBytes: size!, usedBytes: used!, text: r.stdout.trim() };
}

// ---------------------------------------------------------------- fio's IOPS log

/** Samples of fio's --write_iops_log (file PREFIX_iops.1.log): [ms since start, IOPS]. */
export function readIopsLog(dir: string, prefix: string): [number, number][] {
  const f = readdirSync(dir).find((n) => n.startsWith(`${prefix}_iops`) && n.endsWith('.log'));
  if (!f) return [];
  return readFileSync(path.join(dir, f), 'utf8').split('\n').filter((l) => l.trim()).map((l) => {
    const [ms, v] = l.split(',').map((x) => Number(x.trim()));
    return [ms!, v!] as [number, number];
  });
}

/** Average of the samples whose time falls in [fromMs, toMs). */
export function avgIops(samples: [number, number][], fromMs: number, toMs: number): number | null {
  const sel = samples.filter(([ms]) => ms >= fromMs && ms < toMs);
  if (sel.length === 0) return null;
  return Math.round(sel.reduce((a, [, v]) => a + v, 0) / sel.length);
}
