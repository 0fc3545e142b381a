/**
 * Batched positional I/O. Every op queued during one turn of the event loop (all
 * the requests parsed from one socket read, on every connection) goes to a worker
 * thread as ONE job through the native addon, and completes through one callback.
 * That amortizes the thread hand-off, which costs more than a page-cache pread.
 *
 * Ops in one batch run in order on one thread; separate batches may run in
 * parallel. A `linked` op completes together with the op before it (a FUA write is
 * WRITE + FDATASYNC): the pair's result is the first failure, else the last result.
 *
 * Without the addon, ops fall back to node:fs one by one (correct, slower).
 */
import fs from 'node:fs';
import { IoOp, nativeIo, type NativeIo } from './native-io.js';
import { HOST_ERRNO } from '../../nbd/errno.js';

export { IoOp };
export type OpDone = (result: number) => void;

const BATCH_CAPACITY = 256;
/** Larger reads go to the pool even when cached: a big copy on the event loop stalls every connection. */
const TRY_NOW_MAX_BYTES = Number(process.env.DVE_TRY_NOW_MAX_BYTES ?? 128 * 1024);

class Batch {
  count = 0;
  readonly results = new Float64Array(BATCH_CAPACITY);
  readonly buffers: (Buffer | null)[] = new Array<Buffer | null>(BATCH_CAPACITY).fill(null);
  readonly callbacks: (OpDone | null)[] = new Array<OpDone | null>(BATCH_CAPACITY).fill(null);
  readonly linked = new Uint8Array(BATCH_CAPACITY);
  readonly onDone = (): void => this.queue.complete(this);
  constructor(private readonly queue: IoBatchQueue) {}
}

export class IoBatchQueue {
  private readonly native: NativeIo | null;
  // Scratch arrays: the addon copies them during submit(), so one set serves all batches.
  private readonly opcodes = new Uint8Array(BATCH_CAPACITY);
  private readonly fds = new Int32Array(BATCH_CAPACITY);
  private readonly offsets = new Float64Array(BATCH_CAPACITY);
  private readonly lengths = new Float64Array(BATCH_CAPACITY);
  private current: Batch | null = null;
  private readonly free: Batch[] = [];
  private scheduled = false;
  /** Try RWF_NOWAIT reads/writes on the event loop first (off once the kernel says it cannot). */
  private readNow = true;
  private writeNow = true;
  /** Batches handed to worker threads and not yet completed. */
  inflightBatches = 0;

  constructor(native: NativeIo | null = nativeIo, options: { tryNow?: boolean } = {}) {
    this.native = native;
    this.readNow = this.writeNow = options.tryNow ?? process.env.DVE_IO_TRY_NOW !== '0';
  }

  get isNative(): boolean {
    return this.native !== null;
  }

  /**
   * Read `lengthBytes` into `buffer` (past the end of a file reads as zeros). A read
   * the page cache can answer at once is done right here (RWF_NOWAIT) and completes
   * synchronously; anything else goes to the thread pool.
   */
  read(fd: number, buffer: Buffer, offsetBytes: number, lengthBytes: number, done: OpDone): void {
    const native = this.native;
    if (native === null) return readFully(fd, buffer, lengthBytes, offsetBytes, 0, done);
    if (this.readNow && lengthBytes <= TRY_NOW_MAX_BYTES) {
      const r = native.tryReadNow(fd, buffer, offsetBytes, lengthBytes);
      if (r >= 0) return done(r);
      if (r === -HOST_ERRNO.EOPNOTSUPP || r === -HOST_ERRNO.EINVAL) this.readNow = false;
    }
    this.push(IoOp.READ, fd, offsetBytes, lengthBytes, buffer, done, false);
  }

  /** Write `lengthBytes` of `buffer`; with `fua`, fdatasync before completing. */
  write(fd: number, buffer: Buffer, offsetBytes: number, lengthBytes: number, fua: boolean, done: OpDone): void {
    if (this.native === null) {
      return writeFully(fd, buffer, lengthBytes, offsetBytes, 0, fua
        ? (r) => (r < 0 ? done(r) : fs.fdatasync(fd, (err) => done(err ? errnoOf(err) : r)))
        : done);
    }
    if (!fua) {
      if (this.writeNow) {
        const r = this.native.tryWriteNow(fd, buffer, offsetBytes, lengthBytes);
        if (r >= 0) return done(r);
        if (r === -HOST_ERRNO.EOPNOTSUPP || r === -HOST_ERRNO.EINVAL) this.writeNow = false;
      }
      return this.push(IoOp.WRITE, fd, offsetBytes, lengthBytes, buffer, done, false);
    }
    this.push(IoOp.WRITE, fd, offsetBytes, lengthBytes, buffer, null, false);
    this.push(IoOp.FDATASYNC, fd, 0, 0, null, done, true);
  }

  fdatasync(fd: number, done: OpDone): void {
    if (this.native === null) return fs.fdatasync(fd, (err) => done(err ? errnoOf(err) : 0));
    this.push(IoOp.FDATASYNC, fd, 0, 0, null, done, false);
  }

  /**
   * Any other op (PUNCH_HOLE, ZERO_RANGE, BLKDISCARD, BLKZEROOUT, SEEK_*), with an
   * optional fdatasync after it. Without the addon these complete with -EOPNOTSUPP.
   */
  other(op: IoOp, fd: number, offsetBytes: number, lengthBytes: number, sync: boolean, done: OpDone): void {
    if (this.native === null) return done(-HOST_ERRNO.EOPNOTSUPP);
    if (!sync) return this.push(op, fd, offsetBytes, lengthBytes, null, done, false);
    this.push(op, fd, offsetBytes, lengthBytes, null, null, false);
    this.push(IoOp.FDATASYNC, fd, 0, 0, null, done, true);
  }

  /**
   * Append an op to the batch being filled. A batch always keeps one slot spare so
   * that a linked op lands in the same batch as the op it completes with.
   */
  private push(op: IoOp, fd: number, offsetBytes: number, lengthBytes: number, buffer: Buffer | null, done: OpDone | null, linked: boolean): void {
    let b = this.current;
    if (b === null) {
      b = this.current = this.free.pop() ?? new Batch(this);
    } else if (!linked && b.count >= BATCH_CAPACITY - 1) {
      this.submit(b);
      b = this.current = this.free.pop() ?? new Batch(this);
    }
    const i = b.count++;
    this.opcodes[i] = op;
    this.fds[i] = fd;
    this.offsets[i] = offsetBytes;
    this.lengths[i] = lengthBytes;
    b.buffers[i] = buffer;
    b.callbacks[i] = done;
    b.linked[i] = linked ? 1 : 0;
    if (!this.scheduled) {
      this.scheduled = true;
      process.nextTick(this.flushQueued);
    }
  }

  /** Submit the batch being filled now (normally done on the next tick). */
  readonly flushQueued = (): void => {
    this.scheduled = false;
    const b = this.current;
    if (b !== null && b.count > 0) this.submit(b);
  };

  private submit(b: Batch): void {
    if (this.current === b) this.current = null;
    this.inflightBatches++;
    // The scratch arrays describe the current batch, the only one ever submitted;
    // the addon copies them, so they are free again when submit() returns.
    this.native!.submit(b.count, this.opcodes, this.fds, this.offsets, this.lengths, b.buffers, b.results, b.onDone);
  }

  /** Called on the JS thread when a batch's worker job is done. */
  complete(b: Batch): void {
    this.inflightBatches--;
    const n = b.count;
    for (let i = 0; i < n; i++) {
      const cb = b.callbacks[i];
      b.callbacks[i] = null;
      b.buffers[i] = null;
      if (cb === null) continue;
      let r = b.results[i]!;
      if (b.linked[i] === 1 && i > 0) {
        const prev = b.results[i - 1]!;
        if (prev < 0) r = prev;
      }
      cb(r);
    }
    b.count = 0;
    this.free.push(b);
  }
}

function errnoOf(err: NodeJS.ErrnoException): number {
  return typeof err.errno === 'number' ? -Math.abs(err.errno) : -HOST_ERRNO.EIO;
}

function readFully(fd: number, buf: Buffer, length: number, offset: number, done0: number, finish: OpDone): void {
  fs.read(fd, buf, done0, length - done0, offset + done0, (err, n) => {
    if (err) return finish(errnoOf(err));
    if (n === 0) {
      buf.fill(0, done0, length); // past EOF reads as zeros
      return finish(length);
    }
    if (done0 + n < length) return readFully(fd, buf, length, offset, done0 + n, finish);
    finish(length);
  });
}

function writeFully(fd: number, buf: Buffer, length: number, offset: number, done0: number, finish: OpDone): void {
  fs.write(fd, buf, done0, length - done0, offset + done0, (err, n) => {
    if (err) return finish(errnoOf(err));
    if (done0 + n < length) return writeFully(fd, buf, length, offset, done0 + n, finish);
    finish(length);
  });
}
