import test from 'ava';
import type { ExecutionContext } from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { IoOp, nativeIo, nativeIoLoadError } from '../../src/storage/native-io.js';
import type { NativeIo, NativeIoError } from '../../src/storage/native-io.js';

function io(): NativeIo {
  if (!nativeIo) throw new Error(`dve_io addon not loaded (run npm run build:native): ${nativeIoLoadError?.message}`);
  return nativeIo;
}

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-native-io-'));
test.after.always(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

let seq = 0;
/** A fresh temp file opened read/write; closed in teardown. */
function tempFile(t: ExecutionContext, size = 0): { file: string; fd: number } {
  const file = path.join(tmpRoot, `f${seq++}`);
  const fd = fs.openSync(file, 'w+');
  if (size) fs.ftruncateSync(fd, size);
  t.teardown(() => fs.closeSync(fd));
  return { file, fd };
}

interface Op {
  op: IoOp;
  fd: number;
  offset: number;
  length: number;
  buffer?: Buffer | null;
}

/** Submits ops as one batch; resolves with the results once done() runs (asserting it runs once). */
function submit(ops: Op[]): Promise<number[]> {
  const n = ops.length;
  const opcodes = new Uint8Array(n);
  const fds = new Int32Array(n);
  const offsets = new Float64Array(n);
  const lengths = new Float64Array(n);
  const buffers: (Buffer | null)[] = new Array<Buffer | null>(n).fill(null);
  const results = new Float64Array(n).fill(NaN);
  ops.forEach((o, i) => {
    opcodes[i] = o.op;
    fds[i] = o.fd;
    offsets[i] = o.offset;
    lengths[i] = o.length;
    buffers[i] = o.buffer ?? null;
  });
  return new Promise((resolve, reject) => {
    let calls = 0;
    io().submit(n, opcodes, fds, offsets, lengths, buffers, results, () => {
      calls++;
      if (calls !== 1) reject(new Error(`done() called ${calls} times`));
      // give a second call the chance to show up before resolving
      setTimeout(() => (calls === 1 ? resolve(Array.from(results)) : reject(new Error('done() called twice'))), 5);
    });
  });
}

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + 1) & 0xff;
  return b;
}

test('addon loads', (t) => {
  t.is(nativeIoLoadError, null);
  t.truthy(nativeIo);
});

test('batch of mixed writes then reads returns the data', async (t) => {
  const { fd } = tempFile(t);
  const a = pattern(4096, 1);
  const b = pattern(100, 2);
  const c = pattern(65536, 3);
  const w = await submit([
    { op: IoOp.WRITE, fd, offset: 0, length: a.length, buffer: a },
    { op: IoOp.WRITE, fd, offset: 10000, length: b.length, buffer: b },
    { op: IoOp.WRITE, fd, offset: 1 << 20, length: c.length, buffer: c },
    { op: IoOp.FDATASYNC, fd, offset: 0, length: 0 },
  ]);
  t.deepEqual(w, [4096, 100, 65536, 0]);

  const ra = Buffer.alloc(4096);
  const rb = Buffer.alloc(100);
  const rc = Buffer.alloc(65536);
  const gap = Buffer.alloc(16, 0xee);
  const r = await submit([
    { op: IoOp.READ, fd, offset: 0, length: 4096, buffer: ra },
    { op: IoOp.READ, fd, offset: 10000, length: 100, buffer: rb },
    { op: IoOp.READ, fd, offset: 1 << 20, length: 65536, buffer: rc },
    { op: IoOp.READ, fd, offset: 5000, length: 16, buffer: gap },
  ]);
  t.deepEqual(r, [4096, 100, 65536, 16]);
  t.true(ra.equals(a));
  t.true(rb.equals(b));
  t.true(rc.equals(c));
  t.true(gap.equals(Buffer.alloc(16)));

  // ops in one batch run in order: a write then a read of the same range sees the write
  const d = pattern(512, 4);
  const rd = Buffer.alloc(512);
  const r2 = await submit([
    { op: IoOp.WRITE, fd, offset: 2048, length: 512, buffer: d },
    { op: IoOp.READ, fd, offset: 2048, length: 512, buffer: rd },
  ]);
  t.deepEqual(r2, [512, 512]);
  t.true(rd.equals(d));
});

test('only the first `length` bytes of a larger buffer are used', async (t) => {
  const { fd } = tempFile(t);
  const src = pattern(1024, 5);
  t.deepEqual(await submit([{ op: IoOp.WRITE, fd, offset: 0, length: 10, buffer: src }]), [10]);
  t.is(fs.fstatSync(fd).size, 10);
  const dst = Buffer.alloc(1024, 0xaa);
  t.deepEqual(await submit([{ op: IoOp.READ, fd, offset: 0, length: 10, buffer: dst }]), [10]);
  t.true(dst.subarray(0, 10).equals(src.subarray(0, 10)));
  t.true(dst.subarray(10).equals(Buffer.alloc(1014, 0xaa)));
});

test('READ past EOF zero-fills and reports the full length', async (t) => {
  const { fd } = tempFile(t);
  fs.writeSync(fd, pattern(1000, 6), 0, 1000, 0);
  const straddle = Buffer.alloc(4096, 0xff);
  const beyond = Buffer.alloc(4096, 0xff);
  const r = await submit([
    { op: IoOp.READ, fd, offset: 0, length: 4096, buffer: straddle },
    { op: IoOp.READ, fd, offset: 1 << 30, length: 4096, buffer: beyond },
  ]);
  t.deepEqual(r, [4096, 4096]);
  t.true(straddle.subarray(0, 1000).equals(pattern(1000, 6)));
  t.true(straddle.subarray(1000).equals(Buffer.alloc(3096)));
  t.true(beyond.equals(Buffer.alloc(4096)));
});

test('errors become -errno results without throwing', async (t) => {
  const { fd } = tempFile(t);
  const buf = Buffer.alloc(16);
  const r = await submit([
    { op: IoOp.READ, fd: 999_999, offset: 0, length: 16, buffer: buf }, // EBADF
    { op: IoOp.WRITE, fd: -1, offset: 0, length: 16, buffer: buf }, // EBADF
    { op: IoOp.FDATASYNC, fd: 999_999, offset: 0, length: 0 }, // EBADF
    { op: IoOp.READ, fd, offset: 0, length: 32, buffer: buf }, // buffer too short: EINVAL
    { op: IoOp.READ, fd, offset: 0, length: 16, buffer: null }, // no buffer: EINVAL
    { op: 200 as IoOp, fd, offset: 0, length: 0 }, // unknown opcode: EINVAL
    { op: IoOp.READ, fd, offset: 1.5, length: 16, buffer: buf }, // non-integer offset: EINVAL
    { op: IoOp.READ, fd, offset: -4096, length: 16, buffer: buf }, // negative offset: EINVAL
    { op: IoOp.WRITE, fd, offset: 0, length: NaN, buffer: buf }, // NaN length: EINVAL
    { op: IoOp.READ, fd, offset: 0, length: 16, buffer: buf }, // still fine after the errors
  ]);
  t.deepEqual(r, [-9, -9, -9, -22, -22, -22, -22, -22, -22, 16]);
});

test('descriptor arrays may be reused as soon as submit() returns', async (t) => {
  const { fd } = tempFile(t);
  const data = pattern(256, 7);
  const opcodes = Uint8Array.of(IoOp.WRITE);
  const fds = Int32Array.of(fd);
  const offsets = Float64Array.of(4096);
  const lengths = Float64Array.of(256);
  const buffers: (Buffer | null)[] = [data];
  const results = new Float64Array(1);
  await new Promise<void>((resolve) => {
    io().submit(1, opcodes, fds, offsets, lengths, buffers, results, resolve);
    opcodes[0] = IoOp.READ;
    fds[0] = -1;
    offsets[0] = 0;
    lengths[0] = 1;
    buffers[0] = null; // the addon holds its own reference to the buffer
  });
  t.is(results[0], 256);
  const back = Buffer.alloc(256);
  fs.readSync(fd, back, 0, 256, 4096);
  t.true(back.equals(data));
});

test('punchHole frees blocks and reads back zeros', async (t) => {
  const { file, fd } = tempFile(t);
  const size = 4 << 20;
  fs.writeSync(fd, pattern(size, 8), 0, size, 0);
  fs.fsyncSync(fd);
  const before = fs.statSync(file).blocks;
  io().punchHole(fd, 1 << 20, 2 << 20);
  const after = fs.statSync(file).blocks;
  t.true(after < before, `blocks ${before} -> ${after}`);
  t.true(before - after >= (2 << 20) / 512 - 8, `freed ${before - after} blocks`);
  t.is(fs.statSync(file).size, size, 'KEEP_SIZE');
  const back = Buffer.alloc(size);
  fs.readSync(fd, back, 0, size, 0);
  t.true(back.subarray(0, 1 << 20).equals(pattern(size, 8).subarray(0, 1 << 20)));
  t.true(back.subarray(1 << 20, 3 << 20).equals(Buffer.alloc(2 << 20)));
  t.true(back.subarray(3 << 20).equals(pattern(size, 8).subarray(3 << 20)));

  // the batched form, plus a zero-length no-op
  const r = await submit([
    { op: IoOp.PUNCH_HOLE, fd, offset: 0, length: 1 << 20 },
    { op: IoOp.PUNCH_HOLE, fd, offset: 0, length: 0 },
  ]);
  t.deepEqual(r, [0, 0]);
  t.true(fs.statSync(file).blocks < after);
  const head = Buffer.alloc(1 << 20, 1);
  fs.readSync(fd, head, 0, head.length, 0);
  t.true(head.equals(Buffer.alloc(1 << 20)));
});

test('zeroRange reads back zeros', async (t) => {
  const { file, fd } = tempFile(t);
  const size = 1 << 20;
  const data = pattern(size, 9);
  fs.writeSync(fd, data, 0, size, 0);
  io().zeroRange(fd, 4096, 8192);
  // unaligned range in the batched form
  t.deepEqual(await submit([{ op: IoOp.ZERO_RANGE, fd, offset: 100_000, length: 1000 }]), [0]);
  t.is(fs.statSync(file).size, size);
  const back = Buffer.alloc(size);
  fs.readSync(fd, back, 0, size, 0);
  const expected = Buffer.from(data);
  expected.fill(0, 4096, 4096 + 8192);
  expected.fill(0, 100_000, 101_000);
  t.true(back.equals(expected));
});

test('seekData/seekHole find the one data region of a sparse file', async (t) => {
  const { fd } = tempFile(t, 1 << 20);
  fs.writeSync(fd, pattern(65536, 10), 0, 65536, 256 << 10);
  fs.fsyncSync(fd);
  const nio = io();
  t.is(nio.seekData(fd, 0), 256 << 10);
  t.is(nio.seekHole(fd, 0), 0);
  t.is(nio.seekHole(fd, 256 << 10), 320 << 10);
  t.is(nio.seekData(fd, 300 << 10), 300 << 10);
  t.is(nio.seekData(fd, 320 << 10), -1, 'no data after the region: ENXIO');
  t.is(nio.seekHole(fd, 1 << 20), -1, 'offset at EOF: ENXIO');
  t.is(nio.seekData(fd, 2 << 20), -1, 'offset past EOF: ENXIO');
  const r = await submit([
    { op: IoOp.SEEK_DATA, fd, offset: 0, length: 0 },
    { op: IoOp.SEEK_HOLE, fd, offset: 256 << 10, length: 0 },
    { op: IoOp.SEEK_DATA, fd, offset: 320 << 10, length: 0 },
    { op: IoOp.SEEK_DATA, fd: 999_999, offset: 0, length: 0 },
  ]);
  t.deepEqual(r, [256 << 10, 320 << 10, -1, -9]);
});

test('a batch of 1000 ops completes and done() is called exactly once', async (t) => {
  const { fd } = tempFile(t);
  const ops: Op[] = [];
  const written: Buffer[] = [];
  for (let i = 0; i < 500; i++) {
    const b = pattern(512, i);
    written.push(b);
    ops.push({ op: IoOp.WRITE, fd, offset: i * 512, length: 512, buffer: b });
  }
  const reads: Buffer[] = [];
  for (let i = 0; i < 500; i++) {
    const b = Buffer.alloc(512);
    reads.push(b);
    ops.push({ op: IoOp.READ, fd, offset: (499 - i) * 512, length: 512, buffer: b });
  }
  const r = await submit(ops);
  t.is(r.length, 1000);
  t.true(r.every((v) => v === 512));
  for (let i = 0; i < 500; i++) t.true(reads[i]!.equals(written[499 - i]!), `read ${i}`);
});

test('many concurrent batches and an empty batch all complete', async (t) => {
  const { fd } = tempFile(t);
  const batches = Array.from({ length: 64 }, (_, k) =>
    submit(
      Array.from({ length: 16 }, (_, i) => ({
        op: IoOp.WRITE,
        fd,
        offset: (k * 16 + i) * 64,
        length: 64,
        buffer: pattern(64, k * 16 + i),
      })),
    ),
  );
  const all = await Promise.all([...batches, submit([])]);
  t.is(all.length, 65);
  t.true(all.slice(0, 64).every((r) => r.length === 16 && r.every((v) => v === 64)));
  t.deepEqual(all[64], []);
  const back = Buffer.alloc(64);
  fs.readSync(fd, back, 0, 64, 1000 * 64);
  t.true(back.equals(pattern(64, 1000)));
});

test('sync calls throw Errors carrying code/errno/syscall', (t) => {
  const nio = io();
  const e1 = t.throws(() => nio.punchHole(999_999, 0, 4096)) as NativeIoError;
  t.is(e1.code, 'EBADF');
  t.is(e1.errno, -9);
  t.is(e1.syscall, 'fallocate');
  const e2 = t.throws(() => nio.seekData(999_999, 0)) as NativeIoError;
  t.is(e2.code, 'EBADF');
  const e3 = t.throws(() => nio.isBlockDevice(999_999)) as NativeIoError;
  t.is(e3.code, 'EBADF');
  const { fd } = tempFile(t, 4096);
  t.false(nio.isBlockDevice(fd));
  const e4 = t.throws(() => nio.blockDeviceSize(fd)) as NativeIoError;
  t.is(e4.code, 'ENOTTY');
  t.is(e4.errno, -25);
  nio.punchHole(fd, 0, 0); // zero length is a no-op
  t.is(nio.seekHole(fd, 0), 0);
});

test('argument validation throws TypeError naming the argument', (t) => {
  const nio = io();
  const { fd } = tempFile(t);
  const u8 = new Uint8Array(2);
  const i32 = new Int32Array(2);
  const f64 = new Float64Array(2);
  const bufs: (Buffer | null)[] = [null, null];
  const done = (): void => t.fail('done() must not be called for a rejected submit');
  const call = (args: unknown[]): void => (nio.submit as (...a: unknown[]) => void)(...args);
  const bad: [string, unknown[]][] = [
    ['count', [-1, u8, i32, f64, f64, bufs, f64, done]],
    ['count', [1.5, u8, i32, f64, f64, bufs, f64, done]],
    ['count', ['2', u8, i32, f64, f64, bufs, f64, done]],
    ['opcodes', [3, u8, new Int32Array(3), new Float64Array(3), new Float64Array(3), [null, null, null], new Float64Array(3), done]],
    ['opcodes', [2, [0, 0], i32, f64, f64, bufs, f64, done]],
    ['fds', [2, u8, new Uint32Array(2), f64, f64, bufs, f64, done]],
    ['offsets', [2, u8, i32, new Float32Array(2), f64, bufs, f64, done]],
    ['lengths', [2, u8, i32, f64, null, bufs, f64, done]],
    ['buffers', [2, u8, i32, f64, f64, [null], f64, done]],
    ['buffers', [2, u8, i32, f64, f64, u8, f64, done]],
    ['results', [2, u8, i32, f64, f64, bufs, new Float64Array(1), done]],
    ['done', [2, u8, i32, f64, f64, bufs, f64, undefined]],
    ['done', [2, u8, i32, f64, f64, bufs, f64]],
  ];
  for (const [name, args] of bad) {
    const err = t.throws(() => call(args), { instanceOf: TypeError }, name);
    t.true(err?.message.includes(`"${name}"`), `${name}: ${err?.message}`);
  }
  const sync: [string, () => unknown][] = [
    ['fd', () => nio.punchHole(-1, 0, 1)],
    ['fd', () => nio.zeroRange(1.5, 0, 1)],
    ['fd', () => (nio.seekData as (...a: unknown[]) => unknown)('3', 0)],
    ['fd', () => (nio.blockDeviceSize as (...a: unknown[]) => unknown)()],
    ['fd', () => nio.isBlockDevice(2 ** 31)],
    ['offset', () => nio.punchHole(fd, -4096, 4096)],
    ['offset', () => nio.seekHole(fd, 2 ** 53)],
    ['offset', () => nio.seekData(fd, NaN)],
    ['length', () => nio.zeroRange(fd, 0, Infinity)],
    ['length', () => (nio.punchHole as (...a: unknown[]) => unknown)(fd, 0)],
  ];
  for (const [name, fn] of sync) {
    const err = t.throws(fn, { instanceOf: TypeError }, name);
    t.true(err?.message.includes(`"${name}"`), `${name}: ${err?.message}`);
  }
  // the largest safe integer offset is accepted (and is past EOF: ENXIO -> -1)
  t.is(nio.seekData(fd, Number.MAX_SAFE_INTEGER), -1);
});

/** Runs an external command bounded by `timeout -s KILL 20`. */
function sh(cmd: string, args: string[]): string {
  return execFileSync('timeout', ['-s', 'KILL', '20', cmd, ...args], { encoding: 'utf8', timeout: 30_000 }).trim();
}

test('block device: size, S_ISBLK, BLKZEROOUT and BLKDISCARD on a loop device', async (t) => {
  if (process.getuid?.() !== 0) {
    t.log('not root: loop device test skipped');
    t.pass();
    return;
  }
  const size = 8 << 20;
  const { file, fd: backingFd } = tempFile(t, size);
  fs.writeSync(backingFd, pattern(size, 11), 0, size, 0);
  fs.fsyncSync(backingFd);
  let dev: string;
  try {
    dev = sh('losetup', ['-f', '--show', file]);
  } catch (err) {
    t.log(`losetup unavailable, loop device test skipped: ${(err as Error).message}`);
    t.pass();
    return;
  }
  t.teardown(() => {
    try {
      sh('losetup', ['-d', dev]);
    } catch {
      // best effort
    }
  });
  const fd = fs.openSync(dev, 'r+');
  t.teardown(() => fs.closeSync(fd));
  const nio = io();
  t.true(nio.isBlockDevice(fd));
  t.is(nio.blockDeviceSize(fd), size);

  const r = await submit([
    { op: IoOp.BLKZEROOUT, fd, offset: 0, length: 1 << 20 },
    { op: IoOp.BLKDISCARD, fd, offset: 4 << 20, length: 1 << 20 },
    { op: IoOp.BLKZEROOUT, fd, offset: 0, length: 0 },
    { op: IoOp.BLKZEROOUT, fd, offset: 1, length: 511 }, // unaligned: EINVAL
  ]);
  t.is(r[0], 0);
  t.true(r[1] === 0 || r[1] === -95, `BLKDISCARD result ${r[1]}`);
  t.is(r[2], 0);
  t.is(r[3], -22);
  const head = Buffer.alloc(1 << 20, 1);
  t.deepEqual(await submit([{ op: IoOp.READ, fd, offset: 0, length: 1 << 20, buffer: head }]), [1 << 20]);
  t.true(head.equals(Buffer.alloc(1 << 20)));
  const rest = Buffer.alloc(1 << 20);
  t.deepEqual(await submit([{ op: IoOp.READ, fd, offset: 1 << 20, length: 1 << 20, buffer: rest }]), [1 << 20]);
  t.true(rest.equals(pattern(size, 11).subarray(1 << 20, 2 << 20)));
});
