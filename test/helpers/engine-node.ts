// Helpers for the engine interop suite (test/engine-interop/): a real `dve up` node
// process started from a configuration file, its admin client, and the host-side
// plumbing the tests stack on top of it (nbdfuse + loop device + ext4, nbdkit with the
// error filter as a failing disk, fio runs).
//
// Every external command runs under `timeout -s KILL N` (the node process too), and
// everything a helper starts is undone from a CleanupStack, so a failing test still
// stops its processes, detaches its loop devices and unmounts its filesystems.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { ExecutionContext, TestFn } from 'ava';
import { AdminClient } from '../../src/admin/client.js';
import type { NodeStatus, TaskInfo, VolumeInfo } from '../../src/engine/admin-api.js';
import { describeResult, exitStatus, formatCmd, mountsUnder, mustRun, run, sleep, type RunResult } from './exec.js';
import { CleanupStack } from './cleanup.js';
import { REPO_ROOT, HOST } from './server.js';
import { sha256, KiB, MiB } from './clients.js';

export { CleanupStack };
export const GiB = 1024 * MiB;
export const DVE_BIN = path.join(REPO_ROOT, 'bin/dve.js');

// ---------------------------------------------------------------- configuration

export interface DiskSpec {
  id: string;
  /** A file (relative to the config's directory, created sparse) or a block device. */
  path: string;
  /** For files: "1G", "512M" …; omit for block devices. */
  size?: string;
}

export interface EngineConfigSpec {
  disks: DiskSpec[];
  extentSize?: string;
  metadataSize?: string;
}

/** Writes DIR/dve.yaml for one node on loopback with ephemeral ports; returns its path. */
export function writeEngineConfig(dir: string, spec: EngineConfigSpec): string {
  const lines = [
    'nodes: [{ id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", mesh: "127.0.0.1:0" }]',
    'disks:',
    ...spec.disks.map((d) => `  - { id: ${d.id}, path: ${JSON.stringify(d.path)}${d.size ? `, size: ${d.size}` : ''} }`),
    `metadata: { path: meta.img, size: ${spec.metadataSize ?? '16M'} }`,
    `extentSize: ${spec.extentSize ?? '4M'}`,
    '',
  ];
  const file = path.join(dir, 'dve.yaml');
  writeFileSync(file, lines.join('\n'));
  return file;
}

// ---------------------------------------------------------------- the node process

export interface EngineNode {
  configPath: string;
  stateDir: string;
  /** The node process (the child of `timeout`). */
  pid: number;
  nbdPort: number;
  adminPort: number;
  admin: AdminClient;
  /** nbd://127.0.0.1:PORT/NAME */
  uri(volume: string): string;
  alive(): boolean;
  /** Exit status once exited (128+N for signal N), else null. */
  exitCode(): number | null;
  /** stdout and stderr (JSON log lines), interleaved, tail. */
  output(): string;
  /** What it printed on stdout. */
  stdout(): string;
  /** SIGTERM, wait (SIGKILL after 15 s); resolves to the exit status. */
  stop(): Promise<number>;
  /** SIGKILL the node process (a crash); resolves to the exit status. */
  kill(): Promise<number>;
}

export interface StartNodeOptions {
  configPath: string;
  stateDir: string;
  logLevel?: string;
  /** Hard limit on the node's life (timeout -s KILL), default 240 s. */
  lifetimeSec?: number;
  startTimeoutSec?: number;
}

const OUTPUT_LIMIT = 1024 * 1024;
const liveChildren = new Set<ChildProcess>();
const livePids = new Set<number>();

/**
 * Last-resort undo when the worker process exits without running teardowns (an
 * uncaught exception): synchronous steps, newest first. Each helper registers one when
 * it creates something and removes it when its own cleanup step ran.
 */
const exitUndo: { fn: () => void }[] = [];
/** Undo run at process exit if the cleanup stack never ran (a worker that dies early). */
export function onExit(fn: () => void): () => void {
  const e = { fn };
  exitUndo.push(e);
  return () => {
    const i = exitUndo.indexOf(e);
    if (i >= 0) exitUndo.splice(i, 1);
  };
}
export function killQuietly(pid: number | undefined, sig: NodeJS.Signals = 'SIGKILL'): void {
  if (!pid) return;
  try {
    process.kill(pid, sig);
  } catch {
    /* gone */
  }
}
process.on('exit', () => {
  for (const pid of livePids) killQuietly(pid);
  for (const c of liveChildren) killQuietly(c.pid);
  while (exitUndo.length > 0) {
    try {
      exitUndo.pop()!.fn();
    } catch {
      /* best effort */
    }
  }
});
export function syncRun(cmd: string, args: string[]): void {
  spawnSync('timeout', ['-s', 'KILL', '10', cmd, ...args], { stdio: 'ignore' });
}

interface NodeContext {
  engineNodes?: EngineNode[];
}

/**
 * Runs `node bin/dve.js up --state-dir DIR --config FILE --log-level debug` (under
 * `timeout -s KILL`), waits for it to print "dve up: node 1 (pid N)" and for
 * DIR/node-1.json to name that pid, and returns it with an AdminClient on its admin
 * port. The node is stopped (SIGTERM, then SIGKILL) from `cleanup`.
 */
export async function startEngineNode(t: ExecutionContext, cleanup: CleanupStack, o: StartNodeOptions): Promise<EngineNode> {
  if (!existsSync(path.join(REPO_ROOT, 'dist/src/cli/main.js'))) {
    throw new Error('dist/src/cli/main.js is missing: build first (npx tsc -p tsconfig.json)');
  }
  const args = [
    '-s', 'KILL', String(o.lifetimeSec ?? 240),
    process.execPath, DVE_BIN, 'node', 'start', '--id', '1', '--state-dir', o.stateDir, '--config', o.configPath, '--log-level', o.logLevel ?? 'debug',
  ];
  const cmdline = formatCmd('timeout', args);
  const child = spawn('timeout', args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: process.env });
  liveChildren.add(child);
  let out = '';
  let stdout = '';
  const append = (s: string): void => {
    out += s;
    if (out.length > OUTPUT_LIMIT) out = out.slice(-OUTPUT_LIMIT);
  };
  child.stdout!.on('data', (c: Buffer) => {
    const s = c.toString('utf8');
    stdout += s;
    append(s);
  });
  child.stderr!.on('data', (c: Buffer) => append(c.toString('utf8')));
  let status: number | null = null;
  let nodePid = 0;
  const exited = new Promise<number>((resolve) => {
    child.on('error', (e) => {
      append(`\n[spawn error] ${e.message}\n`);
      status = 127;
      liveChildren.delete(child);
      resolve(127);
    });
    child.on('exit', (code, signal) => {
      status = exitStatus(code, signal);
      liveChildren.delete(child);
      if (nodePid) livePids.delete(nodePid);
      resolve(status);
    });
  });

  const signalNode = (sig: NodeJS.Signals): void => {
    for (const pid of [nodePid, child.pid]) {
      if (!pid) continue;
      try {
        process.kill(pid, sig);
      } catch {
        /* gone */
      }
    }
  };
  const stop = async (): Promise<number> => {
    if (status !== null) return status;
    if (nodePid) {
      try {
        process.kill(nodePid, 'SIGTERM');
      } catch {
        /* gone */
      }
    } else {
      child.kill('SIGTERM');
    }
    const timer = setTimeout(() => signalNode('SIGKILL'), 15_000);
    const code = await exited;
    clearTimeout(timer);
    return code;
  };
  const kill = async (): Promise<number> => {
    if (status !== null) return status;
    if (nodePid) process.kill(nodePid, 'SIGKILL');
    else child.kill('SIGKILL');
    const timer = setTimeout(() => signalNode('SIGKILL'), 10_000);
    const code = await exited;
    clearTimeout(timer);
    return code;
  };
  cleanup.push(`dve node (${cmdline})`, async () => {
    await stop();
  });

  const deadline = Date.now() + (o.startTimeoutSec ?? 30) * 1000;
  const nodeFile = path.join(o.stateDir, 'node-1.json');
  let info: { pid: number; nbd: { port: number }; admin: { host: string; port: number } } | null = null;
  for (;;) {
    if (status !== null) throw new Error(`dve up exited with status ${status} before it was ready\ncommand: ${cmdline}\n${out.slice(-8000)}`);
    const m = /dve (?:up|node): node \d+ \(pid (\d+)\)/.exec(stdout);
    if (m) {
      nodePid = Number(m[1]);
      livePids.add(nodePid);
      try {
        const j = JSON.parse(readFileSync(nodeFile, 'utf8'));
        if (j.pid === nodePid) {
          info = j;
          break;
        }
      } catch {
        /* not written yet */
      }
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`dve up was not ready within ${o.startTimeoutSec ?? 30} s\ncommand: ${cmdline}\n${out.slice(-8000)}`);
    }
    await sleep(25);
  }
  const ready = info!;
  const admin = new AdminClient({ host: ready.admin.host, port: ready.admin.port });
  const node: EngineNode = {
    configPath: o.configPath,
    stateDir: o.stateDir,
    pid: nodePid,
    nbdPort: ready.nbd.port,
    adminPort: ready.admin.port,
    admin,
    uri: (volume) => `nbd://${HOST}:${ready.nbd.port}/${encodeURIComponent(volume)}`,
    alive: () => status === null,
    exitCode: () => status,
    output: () => out,
    stdout: () => stdout,
    stop,
    kill,
  };
  ((t.context as NodeContext).engineNodes ??= []).push(node);
  return node;
}

/** Logs every node's output (tail) when a test fails. */
export function logEngineNodesOnFailure(test: TestFn<any>): void {
  test.afterEach.always((t) => {
    if (t.passed) return;
    for (const n of (t.context as NodeContext).engineNodes ?? []) {
      const lines = n.output().split('\n');
      t.log(`dve node pid ${n.pid} exit status ${n.exitCode()}\n--- node output (last 80 lines) ---\n${lines.slice(-80).join('\n')}`);
    }
  });
}

/** A fresh temp layout for a node: DIR/dve.yaml (disk files relative to DIR) and DIR/state. */
export async function startNodeWithDisks(t: ExecutionContext, cleanup: CleanupStack, dir: string, spec: EngineConfigSpec): Promise<EngineNode> {
  const configPath = writeEngineConfig(dir, spec);
  return startEngineNode(t, cleanup, { configPath, stateDir: path.join(dir, 'state') });
}

/** Four 1 GiB sparse file disks d1…d4. */
export function fileDisks(n = 4, size = '1G'): DiskSpec[] {
  return Array.from({ length: n }, (_, i) => ({ id: `d${i + 1}`, path: `disks/d${i + 1}.img`, size }));
}

export function volumeOf(status: NodeStatus, name: string): VolumeInfo {
  const v = status.volumes.find((x) => x.name === name);
  if (!v) throw new Error(`status lists no volume ${name}: ${status.volumes.map((x) => x.name).join(', ')}`);
  return v;
}

/** Polls status().tasks until the task with this id leaves 'running' (or the time is up); returns it. */
export async function waitForTask(admin: AdminClient, id: string, timeoutMs = 30_000): Promise<TaskInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await admin.status();
    const task = s.tasks.find((x) => x.id === id);
    if (!task) throw new Error(`status lists no task ${id}: ${JSON.stringify(s.tasks)}`);
    if (task.state !== 'running') return task;
    if (Date.now() > deadline) throw new Error(`task ${id} still running after ${timeoutMs} ms: ${JSON.stringify(task)}`);
    await sleep(100);
  }
}

/** Runs a promise expected to reject with an AdminError; returns the error (fails the test otherwise). */
export async function adminError(t: ExecutionContext, p: Promise<unknown>, what: string): Promise<{ code: string; message: string }> {
  try {
    const r = await p;
    t.fail(`${what}: expected an error, got ${JSON.stringify(r)}`);
    return { code: '', message: '' };
  } catch (e) {
    const err = e as { code?: string; message?: string };
    return { code: err.code ?? '', message: err.message ?? String(e) };
  }
}

// ---------------------------------------------------------------- clients

/** qemu-io with -c commands; fails the test on a non-zero status or any "fail"/"error" in its output. */
export async function qemuIoOk(t: ExecutionContext, uri: string, commands: string[], timeoutSec = 60): Promise<RunResult> {
  const args = ['-f', 'raw', uri];
  for (const c of commands) args.push('-c', c);
  const r = await run('qemu-io', args, { timeoutSec });
  t.is(r.code, 0, describeResult(r));
  t.notRegex(r.stdout + r.stderr, /fail|error|mismatch/i, describeResult(r));
  return r;
}

export interface FioRun {
  result: RunResult;
  /** Parsed JSON (jobs …), or null when the output was not readable. */
  json: any | null;
}

/**
 * Like run() (timeout -s KILL, never rejects), but keeps only the head and tail of
 * stdout and stderr (a failing fio can print hundreds of MB of verify errors).
 */
export function runCapped(cmd: string, args: readonly string[], opts: { timeoutSec: number; cwd?: string; control?: ProcessControl }, keep = 64 * KiB): Promise<RunResult & { stdoutBytes: number; stderrBytes: number }> {
  const timeoutSec = Math.max(1, Math.ceil(opts.timeoutSec));
  const cmdline = formatCmd(cmd, args);
  const started = Date.now();
  const capture = () => {
    let head = '';
    let tail = '';
    let bytes = 0;
    return {
      add(c: Buffer) {
        bytes += c.length;
        const s = c.toString('utf8');
        if (head.length < keep) head += s.slice(0, keep - head.length);
        tail = (tail + s).slice(-keep);
      },
      text(): string {
        return bytes <= keep ? head : `${head}\n…(${bytes} bytes in all; middle cut)…\n${tail}`;
      },
      get bytes() {
        return bytes;
      },
    };
  };
  const out = capture();
  const err = capture();
  return new Promise((resolve, reject) => {
    // Its own process group (timeout + the command), so a signal can reach both.
    const child = spawn('timeout', ['-s', 'KILL', String(timeoutSec), cmd, ...args], { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    if (opts.control) opts.control.signal = (sig) => killQuietly(-child.pid!, sig);
    const offExit = onExit(() => killQuietly(-child.pid!));
    child.on('exit', offExit);
    child.stdout!.on('data', (c: Buffer) => out.add(c));
    child.stderr!.on('data', (c: Buffer) => err.add(c));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      const status = exitStatus(code, signal);
      const elapsedMs = Date.now() - started;
      resolve({
        code: status, stdout: out.text(), stderr: err.text(), cmdline, elapsedMs,
        timedOut: status === 137 && elapsedMs >= timeoutSec * 1000 - 50,
        stdoutBytes: out.bytes, stderrBytes: err.bytes,
      });
    });
  });
}

/** Filled in by runCapped(): send a signal to the running command. */
export interface ProcessControl {
  signal?: (sig: NodeJS.Signals) => void;
}

/** fio --thread --ioengine=nbd --uri=URI --name=NAME … in cwd, JSON output parsed (never throws on a non-zero status). */
export async function fio(uri: string, cwd: string, name: string, opts: string[], timeoutSec = 60, control?: ProcessControl): Promise<FioRun> {
  const jsonFile = path.join(cwd, `${name}-${Date.now()}.json`);
  const result = await runCapped(
    'fio',
    ['--thread', '--ioengine=nbd', `--uri=${uri}`, `--name=${name}`, '--output-format=json', `--output=${jsonFile}`, ...opts],
    { timeoutSec, cwd, control },
  );
  let json: any | null = null;
  try {
    // A fio that loops on an error can fill its output file with gigabytes of messages.
    if (statSync(jsonFile).size <= 16 * MiB) {
      const text = readFileSync(jsonFile, 'utf8');
      json = JSON.parse(text.slice(text.indexOf('{')));
    } else {
      result.stderr += `\n[fio's output file ${jsonFile} has ${statSync(jsonFile).size} bytes: not parsed]`;
    }
  } catch {
    json = null;
  }
  return { result, json };
}

export function describeFio(r: FioRun): string {
  const jobs = r.json?.jobs?.map((j: any) => ({ name: j.jobname, error: j.error, write: j.write?.io_bytes, read: j.read?.io_bytes })) ?? null;
  return `${describeResult(r.result)}\n--- jobs ---\n${JSON.stringify(jobs)}`;
}

// ---------------------------------------------------------------- nbdfuse, loop devices, ext4

function isMounted(dir: string): boolean {
  return mountsUnder(dir).includes(path.resolve(dir));
}

export interface FuseFile {
  /** MOUNTDIR/nbd */
  file: string;
  /** Strict unmount (retries EBUSY); the forced version is on the cleanup stack. */
  unmount(): Promise<void>;
  output(): string;
}

/**
 * `nbdfuse MOUNTDIR URI` (its own process group, under timeout -s KILL), waiting for
 * MOUNTDIR/nbd to appear with `expectedSize` bytes.
 */
export async function startNbdfuse(cleanup: CleanupStack, uri: string, fuseDir: string, expectedSize: number, o: number | { readOnly?: boolean; lifetimeSec?: number } = {}): Promise<FuseFile> {
  const opts = typeof o === 'number' ? { lifetimeSec: o } : o;
  mkdirSync(fuseDir, { recursive: true });
  const pidFile = path.join(path.dirname(fuseDir), `${path.basename(fuseDir)}.pid`);
  const args = ['-s', 'KILL', String(opts.lifetimeSec ?? 170), 'nbdfuse', ...(opts.readOnly ? ['-r'] : []), '-P', pidFile, fuseDir, uri];
  const child = spawn('timeout', args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (c: Buffer) => (output += c.toString()));
  child.stderr!.on('data', (c: Buffer) => (output += c.toString()));
  let status: number | null = null;
  const exited = new Promise<number>((resolve) => {
    child.on('exit', (code, signal) => resolve((status = exitStatus(code, signal))));
    child.on('error', (e) => {
      output += `[spawn error] ${e.message}`;
      resolve((status = 127));
    });
  });
  const file = path.join(fuseDir, 'nbd');
  const forceStop = async (): Promise<void> => {
    if (isMounted(fuseDir)) {
      const u = await run('fusermount3', ['-u', fuseDir], { timeoutSec: 20 });
      if (u.code !== 0 || isMounted(fuseDir)) await run('umount', ['-l', fuseDir], { timeoutSec: 20 });
    }
    if (status === null) {
      await Promise.race([exited, sleep(5000)]);
      if (status === null) {
        try {
          process.kill(-child.pid!, 'SIGKILL'); // our own process group: timeout + nbdfuse
        } catch {
          /* gone */
        }
      }
      await exited;
    }
  };
  const offExit = onExit(() => {
    syncRun('umount', ['-l', fuseDir]);
    killQuietly(-child.pid!);
  });
  const dismiss = cleanup.push(`nbdfuse ${fuseDir}`, async () => {
    await forceStop();
    offExit();
  });

  const deadline = Date.now() + 20_000;
  for (;;) {
    if (status !== null) throw new Error(`nbdfuse exited with status ${status} before it was ready:\n${output}`);
    if (existsSync(pidFile) && isMounted(fuseDir)) {
      try {
        const size = statSync(file).size;
        if (size === expectedSize) break;
        if (Date.now() > deadline) throw new Error(`nbdfuse exposes ${file} with ${size} bytes, expected ${expectedSize}`);
      } catch (e) {
        if ((e as Error).message.startsWith('nbdfuse exposes')) throw e;
      }
    }
    if (Date.now() > deadline) throw new Error(`nbdfuse did not expose ${file} (${expectedSize} bytes) within 20 s:\n${output}`);
    await sleep(50);
  }
  return {
    file,
    output: () => output,
    async unmount() {
      let last = '';
      for (let i = 0; i < 20 && isMounted(fuseDir); i++) {
        const u = await run('fusermount3', ['-u', fuseDir], { timeoutSec: 20 });
        if (u.code === 0) break;
        last = describeResult(u);
        await sleep(250);
      }
      if (isMounted(fuseDir)) throw new Error(`fusermount3 -u ${fuseDir} kept failing:\n${last}`);
      const code = await Promise.race([exited, sleep(10_000).then(() => -1)]);
      if (code === -1) throw new Error(`nbdfuse did not exit within 10 s of being unmounted:\n${output}`);
      dismiss();
      offExit();
      if (code !== 0) throw new Error(`nbdfuse exit status ${code} after unmount:\n${output}`);
    },
  };
}

export interface LoopDevice {
  dev: string;
  /** Strict detach (throws on failure); the forced version is on the cleanup stack. */
  detach(): Promise<void>;
}

/** `losetup -f --show --direct-io=off FILE`. */
export async function attachLoop(cleanup: CleanupStack, file: string): Promise<LoopDevice> {
  const r = await mustRun('losetup', ['-f', '--show', '--direct-io=off', file], { timeoutSec: 30 });
  const dev = r.stdout.trim();
  if (!/^\/dev\/loop\d+$/.test(dev)) throw new Error(`losetup printed ${JSON.stringify(r.stdout)}`);
  const offExit = onExit(() => syncRun('losetup', ['-d', dev]));
  const dismiss = cleanup.push(`losetup -d ${dev}`, async () => {
    await run('losetup', ['-d', dev], { timeoutSec: 20 });
    offExit();
  });
  return {
    dev,
    async detach() {
      await mustRun('losetup', ['-d', dev], { timeoutSec: 30 });
      dismiss();
      offExit();
    },
  };
}

/** nbdfuse + loop device over an NBD URI: a block device; detach() undoes both, strictly. */
export async function attachNbdBlockDevice(cleanup: CleanupStack, uri: string, fuseDir: string, size: number): Promise<LoopDevice> {
  const fuse = await startNbdfuse(cleanup, uri, fuseDir, size);
  const loop = await attachLoop(cleanup, fuse.file);
  return {
    dev: loop.dev,
    async detach() {
      await loop.detach();
      await fuse.unmount();
    },
  };
}

export async function mountExt4(cleanup: CleanupStack, dev: string, mnt: string): Promise<{ umount(): Promise<void> }> {
  mkdirSync(mnt, { recursive: true });
  await mustRun('mount', ['-t', 'ext4', dev, mnt], { timeoutSec: 30 });
  const offExit = onExit(() => syncRun('umount', ['-l', mnt]));
  const dismiss = cleanup.push(`umount ${mnt}`, async () => {
    if (isMounted(mnt)) await run('umount', ['-l', mnt], { timeoutSec: 20 });
    offExit();
  });
  return {
    async umount() {
      await mustRun('umount', [mnt], { timeoutSec: 60 });
      dismiss();
      offExit();
    },
  };
}

/** Writes a set of files (some MB of random data and a small directory tree); returns relative path → sha256. */
export function populateFiles(root: string): Map<string, string> {
  const sums = new Map<string, string>();
  const put = (rel: string, data: Buffer): void => {
    const p = path.join(root, rel);
    mkdirSync(path.dirname(p), { recursive: true });
    writeFileSync(p, data);
    sums.set(rel, sha256(data));
  };
  put('big-8M.bin', randomBytes(8 * MiB));
  put('odd-size.bin', randomBytes(5 * MiB + 123));
  for (let i = 0; i < 4; i++) {
    for (let j = 0; j < 6; j++) put(`tree/d${i}/sub${j % 2}/f${j}.dat`, randomBytes(((i * 7 + j * 13) % 64 + 1) * KiB + j));
  }
  put('tree/deep/a/b/c/d/e/leaf.txt', Buffer.from('leaf\n'));
  put('empty.txt', Buffer.alloc(0));
  mkdirSync(path.join(root, 'tree/empty-dir'), { recursive: true });
  sums.set('tree/empty-dir/', 'dir');
  return sums;
}

/** Relative path → sha256 for every file below root ('dir' for empty directories), lost+found excluded. */
export function snapshotFiles(root: string): Record<string, string> {
  const out = new Map<string, string>();
  const walk = (rel: string): void => {
    const entries = readdirSync(path.join(root, rel));
    if (entries.length === 0 && rel !== '') out.set(rel + '/', 'dir');
    for (const name of entries) {
      const r = rel ? `${rel}/${name}` : name;
      if (r === 'lost+found') continue;
      const st = lstatSync(path.join(root, r));
      if (st.isDirectory()) walk(r);
      else out.set(r, sha256(readFileSync(path.join(root, r))));
    }
  };
  walk('');
  return sortedRecord(out);
}

export function sortedRecord(m: Map<string, string>): Record<string, string> {
  return Object.fromEntries([...m].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/**
 * The filesystem round trip of test/interop/filesystem.test.ts, over any attach():
 * round 1: attach, mkfs.ext4, mount, write files, sync, umount, fsck -fn, detach;
 * round 2: attach again, fsck.ext4 -fn clean, mount, same files and checksums, umount, detach.
 */
export async function ext4RoundTrip(
  t: ExecutionContext,
  cleanup: CleanupStack,
  dir: string,
  attach: (round: number) => Promise<LoopDevice>,
): Promise<void> {
  const mnt = path.join(dir, 'mnt');
  const dev1 = await attach(1);
  await mustRun('mkfs.ext4', ['-F', '-q', dev1.dev], { timeoutSec: 60 });
  const m1 = await mountExt4(cleanup, dev1.dev, mnt);
  const written = populateFiles(mnt);
  await mustRun('sync', [], { timeoutSec: 60 });
  t.deepEqual(snapshotFiles(mnt), sortedRecord(written), 'files read back while still mounted');
  await m1.umount();
  const fsck1 = await run('fsck.ext4', ['-fn', dev1.dev], { timeoutSec: 60 });
  t.is(fsck1.code, 0, describeResult(fsck1));
  await dev1.detach();

  const dev2 = await attach(2);
  const fsck2 = await run('fsck.ext4', ['-fn', dev2.dev], { timeoutSec: 60 });
  t.is(fsck2.code, 0, `fsck after reattaching (data from the server):\n${describeResult(fsck2)}`);
  const m2 = await mountExt4(cleanup, dev2.dev, mnt);
  t.deepEqual(snapshotFiles(mnt), sortedRecord(written), 'files and checksums after detaching and reattaching');
  await m2.umount();
  await dev2.detach();
}

// ---------------------------------------------------------------- nbdkit with the error filter

export interface ErrorDisk {
  /** nbd+unix:///?socket=… */
  uri: string;
  /** While this file exists, every request fails with EIO. */
  trigger: string;
  output(): string;
  alive(): boolean;
}

/**
 * `nbdkit -f -U SOCKET --filter=error file FILE error-rate=100% error-file=TRIGGER error=EIO`:
 * a disk that fails every request with EIO while TRIGGER exists. Listens on a Unix
 * socket only (no TCP port to race for).
 */
export async function startErrorDisk(cleanup: CleanupStack, dir: string, backingFile: string, lifetimeSec = 200): Promise<ErrorDisk> {
  const socket = path.join(dir, 'nbdkit.sock');
  const pidFile = path.join(dir, 'nbdkit.pid');
  const trigger = path.join(dir, 'TRIGGER');
  const args = ['-s', 'KILL', String(lifetimeSec), 'nbdkit', '-f', '-U', socket, '-P', pidFile,
    '--filter=error', 'file', backingFile, 'error-rate=100%', `error-file=${trigger}`, 'error=EIO'];
  const child = spawn('timeout', args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  const append = (s: string): void => {
    output += s;
    if (output.length > 64 * 1024) output = output.slice(-64 * 1024);
  };
  child.stdout!.on('data', (c: Buffer) => append(c.toString()));
  child.stderr!.on('data', (c: Buffer) => append(c.toString()));
  let status: number | null = null;
  const exited = new Promise<number>((resolve) => {
    child.on('exit', (code, signal) => resolve((status = exitStatus(code, signal))));
    child.on('error', (e) => {
      append(`[spawn error] ${e.message}`);
      resolve((status = 127));
    });
  });
  const offExit = onExit(() => killQuietly(-child.pid!));
  cleanup.push('nbdkit (error filter)', async () => {
    offExit();
    if (status !== null) return;
    try {
      process.kill(-child.pid!, 'SIGTERM');
    } catch {
      /* gone */
    }
    await Promise.race([exited, sleep(5000)]);
    if (status === null) {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        /* gone */
      }
      await exited;
    }
  });
  const deadline = Date.now() + 20_000;
  while (!(existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '' && existsSync(socket))) {
    if (status !== null) throw new Error(`nbdkit exited with status ${status}:\n${output}`);
    if (Date.now() > deadline) throw new Error(`nbdkit did not start within 20 s:\n${output}`);
    await sleep(50);
  }
  return { uri: `nbd+unix:///?socket=${socket}`, trigger, output: () => output, alive: () => status === null };
}

// ---------------------------------------------------------------- comparing disks

export interface FileDiff {
  /** 4 KiB blocks that differ within the compared length. */
  blocks: number;
  /** The first differing ranges (merged runs of blocks), byte offsets. */
  ranges: { offsetBytes: number; lengthBytes: number }[];
}

/** Compares the first `length` bytes of two files (at the same offsets), by 4 KiB block. */
export function compareFiles(a: string, b: string, length: number, maxRanges = 8): FileDiff {
  const B = 4 * KiB;
  const chunk = 4 * MiB;
  const fa = openSync(a, 'r');
  const fb = openSync(b, 'r');
  const ba = Buffer.alloc(chunk);
  const bb = Buffer.alloc(chunk);
  const out: FileDiff = { blocks: 0, ranges: [] };
  let open: { offsetBytes: number; lengthBytes: number } | null = null;
  try {
    for (let pos = 0; pos < length; pos += chunk) {
      const n = Math.min(chunk, length - pos);
      ba.fill(0, 0, n);
      bb.fill(0, 0, n);
      readSync(fa, ba, 0, n, pos);
      readSync(fb, bb, 0, n, pos);
      for (let off = 0; off < n; off += B) {
        const m = Math.min(B, n - off);
        const same = ba.subarray(off, off + m).equals(bb.subarray(off, off + m));
        if (same) {
          open = null;
          continue;
        }
        out.blocks++;
        if (open && open.offsetBytes + open.lengthBytes === pos + off) open.lengthBytes += m;
        else {
          open = { offsetBytes: pos + off, lengthBytes: m };
          if (out.ranges.length < maxRanges) out.ranges.push(open);
          else open = null;
        }
      }
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
  return out;
}

// ---------------------------------------------------------------- a TCP relay

export interface TcpRelay {
  port: number;
  /** Connections relayed so far. */
  connections(): number;
  close(): Promise<void>;
}

/**
 * A transparent TCP relay on 127.0.0.1 to `targetPort` (what one side sends reaches the
 * other unchanged, with backpressure). When the target side goes away, however abruptly,
 * the client gets an orderly end of stream (FIN) instead of a reset.
 *
 * Why: when a server is SIGKILLed with a request still unread in its socket, the kernel
 * resets the connection, and fio 3.33's nbd engine then sometimes never retires its
 * in-flight requests ("nbd_poll: nothing to poll for in state DEAD" forever), so it never
 * exits or saves its verify state. On an end of stream it fails them and exits.
 */
export async function startTcpRelay(cleanup: CleanupStack, targetPort: number): Promise<TcpRelay> {
  const net = await import('node:net');
  let count = 0;
  const sockets = new Set<import('node:net').Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    count++;
    const up = net.connect({ host: HOST, port: targetPort, allowHalfOpen: true });
    sockets.add(client);
    sockets.add(up);
    const endClient = (): void => {
      if (!client.destroyed) client.end();
    };
    client.pipe(up);
    up.pipe(client); // ends the client when the target ends
    up.on('error', endClient); // a reset from the target: still an orderly end for the client
    up.on('close', endClient);
    client.on('error', () => up.destroy());
    client.on('close', () => {
      up.destroy();
      sockets.delete(client);
      sockets.delete(up);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, HOST, () => resolve());
  });
  const port = (server.address() as import('node:net').AddressInfo).port;
  const close = (): Promise<void> => new Promise((resolve) => {
    for (const s of sockets) s.destroy();
    server.close(() => resolve());
  });
  cleanup.push(`tcp relay :${port} → :${targetPort}`, close);
  return { port, connections: () => count, close };
}
