// Thin wrappers around the real NBD clients used by the interop tests.
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, openSync, closeSync, writeSync, ftruncateSync } from 'node:fs';
import { run, mustRun, type RunResult } from './exec.js';

/**
 * nbdsh is a Python program (`python3 -m nbd`) and Debian's libnbd Python module is only
 * importable by the system interpreter; put /usr/bin first so a python3 from pyenv/venv on
 * PATH does not shadow it.
 */
const NBDSH_ENV = { PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };

/**
 * Runs a Python script in nbdsh. With a URI, `h` is already connected (`nbdsh -u URI`);
 * with null, `h` is a fresh unconnected handle. The script should print a line
 * `RESULT <json>`; that JSON is returned as `result` (undefined when absent).
 */
export async function nbdsh(uri: string | null, script: string, timeoutSec = 60): Promise<RunResult & { result: any }> {
  const args = uri ? ['-u', uri, '-c', script] : ['-c', script];
  const r = await run('nbdsh', args, { timeoutSec, env: NBDSH_ENV });
  if (r.code === 127 || /No module named '?nbd/.test(r.stderr)) {
    throw new Error(`nbdsh is not usable here; it comes with the Debian package python3-libnbd (for /usr/bin/python3):\n${r.stderr}`);
  }
  const m = /^RESULT (.*)$/m.exec(r.stdout);
  let result: any;
  if (m) {
    try {
      result = JSON.parse(m[1]!);
    } catch {
      result = undefined;
    }
  }
  return { ...r, result };
}

/** qemu-io on an NBD URI (raw format) with the given -c commands. */
export function qemuIo(uri: string, commands: string[], opts: { readOnly?: boolean; timeoutSec?: number } = {}): Promise<RunResult> {
  const args = ['-f', 'raw'];
  if (opts.readOnly) args.push('-r');
  args.push(uri);
  for (const c of commands) args.push('-c', c);
  return run('qemu-io', args, { timeoutSec: opts.timeoutSec ?? 60 });
}

/** Lines of qemu-io's `read -v` hexdump for the given output, as a flat byte array. */
export function parseQemuHexdump(stdout: string): number[] {
  const bytes: number[] = [];
  for (const line of stdout.split('\n')) {
    const m = /^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ?)+)/i.exec(line);
    if (!m) continue;
    for (const hx of m[1]!.trim().split(/\s+/)) bytes.push(parseInt(hx, 16));
  }
  return bytes;
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}

export function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

/** Creates `file` of `size` bytes of random data (written in 4 MiB pieces); returns its sha256. */
export function writeRandomFile(file: string, size: number): string {
  const h = createHash('sha256');
  const fd = openSync(file, 'w');
  try {
    const piece = 4 * 1024 * 1024;
    for (let off = 0; off < size; off += piece) {
      const buf = randomBytes(Math.min(piece, size - off));
      h.update(buf);
      writeSync(fd, buf, 0, buf.length, off);
    }
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}

/** Creates a sparse file of `size` bytes (all zero, no data blocks). */
export function makeSparseFile(file: string, size: number): void {
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, size);
  } finally {
    closeSync(fd);
  }
}

/** Writes `data` at `offset` into an existing file. */
export function pwriteFile(file: string, offset: number, data: Buffer): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** nbdinfo --json URI, parsed. */
export async function nbdinfoJson(uri: string, extra: string[] = []): Promise<any> {
  const r = await mustRun('nbdinfo', ['--json', ...extra, uri], { timeoutSec: 30 });
  return JSON.parse(r.stdout);
}

export const MiB = 1024 * 1024;
export const KiB = 1024;
