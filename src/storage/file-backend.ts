/**
 * A raw file or a block device (a loop device works) as a Backend.
 *
 * Durability: there is no user-space cache. A write completes when pwrite has put
 * the bytes in the kernel (a killed server loses nothing it acknowledged; the page
 * cache survives a process crash); FUA and flush add fdatasync before completion.
 *
 * Trim punches a hole in a file (fallocate PUNCH_HOLE) or discards on a block
 * device (BLKDISCARD). Zeroing punches a hole, or with NO_HOLE uses ZERO_RANGE; on a
 * block device BLKZEROOUT. Where the kernel or filesystem says EOPNOTSUPP, zeroing
 * falls back to writing zeros unless the client asked for a fast zero only.
 * Extents come from SEEK_DATA/SEEK_HOLE; a block device reports all data.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Backend, BackendCapabilities, Extent, ExtentsDone, IoDone, ZeroOptions } from './backend.js';
import { IoBatchQueue, IoOp } from './io-batch.js';
import { nativeIo } from './native-io.js';
import { HOST_ERRNO } from '../../nbd/errno.js';

const ZERO_CHUNK_BYTES = 1 << 20;
const MAX_EXTENTS_PER_QUERY = 1024;
let zeroChunk: Buffer | null = null;

export interface FileBackendOptions {
  readOnly?: boolean;
  /** Create a sparse file of this size if the path does not exist. */
  createSizeBytes?: number;
  /** Shared batch queue (one per process is best: it batches across exports). */
  queue?: IoBatchQueue;
}

export class FileBackend implements Backend {
  readonly capabilities: BackendCapabilities;
  readonly description: string;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly sizeBytes: number,
    readonly readOnly: boolean,
    readonly isBlockDevice: boolean,
    private readonly queue: IoBatchQueue,
  ) {
    const native = queue.isNative;
    this.capabilities = {
      trim: native,
      fastZero: native && !isBlockDevice,
      extents: native && !isBlockDevice,
      multiConn: true, // one fd shared by every connection: fdatasync covers them all
    };
    this.description = `${isBlockDevice ? 'block device' : 'file'} ${path}`;
  }

  /** Open (or create sparse) the file or block device at `filePath`. Throws a clear Error on failure. */
  static open(filePath: string, options: FileBackendOptions = {}): FileBackend {
    const readOnly = options.readOnly ?? false;
    const abs = path.resolve(filePath);
    if (!fs.existsSync(abs)) {
      if (options.createSizeBytes === undefined) {
        throw new Error(`${abs} does not exist (give --size to create it as a sparse file)`);
      }
      fs.mkdirSync(path.dirname(abs), { recursive: true });
      let fd: number | null = null;
      try {
        fd = fs.openSync(abs, 'wx', 0o644);
      } catch (e) {
        // Another process (a cluster node starting beside this one) created it first; it
        // may not have sized it yet: the growth below takes care of that.
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
      if (fd !== null) {
        try {
          fs.ftruncateSync(fd, options.createSizeBytes);
        } finally {
          fs.closeSync(fd);
        }
      }
    }
    const pre = fs.statSync(abs);
    if (!pre.isFile() && !pre.isBlockDevice()) throw new Error(`${abs} is neither a regular file nor a block device`);
    const fd = fs.openSync(abs, readOnly ? 'r' : 'r+');
    try {
      const st = fs.fstatSync(fd);
      let size: number;
      let blockDevice = false;
      if (st.isBlockDevice()) {
        blockDevice = true;
        size = blockDeviceSize(fd, st);
      } else if (st.isFile()) {
        size = st.size;
      } else {
        throw new Error(`${abs} is neither a regular file nor a block device`);
      }
      if (!readOnly && !blockDevice && options.createSizeBytes !== undefined && size < options.createSizeBytes) {
        fs.ftruncateSync(fd, options.createSizeBytes); // --size grows an existing file
        size = options.createSizeBytes;
      }
      return new FileBackend(abs, fd, size, readOnly, blockDevice, options.queue ?? new IoBatchQueue());
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  read(buf: Buffer, offsetBytes: number, done: IoDone): void {
    this.queue.read(this.fd, buf, offsetBytes, buf.length, done);
  }

  write(buf: Buffer, offsetBytes: number, fua: boolean, done: IoDone): void {
    this.queue.write(this.fd, buf, offsetBytes, buf.length, fua, done);
  }

  flush(done: IoDone): void {
    this.queue.fdatasync(this.fd, done);
  }

  trim(offsetBytes: number, lengthBytes: number, fua: boolean, done: IoDone): void {
    if (!this.capabilities.trim) return done(0); // advisory: doing nothing is correct
    const op = this.isBlockDevice ? IoOp.BLKDISCARD : IoOp.PUNCH_HOLE;
    // A trim the filesystem cannot do is still a successful trim: it is advisory.
    this.queue.other(op, this.fd, offsetBytes, lengthBytes, fua, (r) => done(r === -HOST_ERRNO.EOPNOTSUPP ? 0 : r));
  }

  zero(offsetBytes: number, lengthBytes: number, options: ZeroOptions, done: IoDone): void {
    if (this.isBlockDevice || !this.capabilities.fastZero) {
      if (options.fastOnly) return done(-HOST_ERRNO.ENOTSUP);
      if (this.isBlockDevice && this.queue.isNative) {
        return this.queue.other(IoOp.BLKZEROOUT, this.fd, offsetBytes, lengthBytes, options.fua, (r) =>
          r === -HOST_ERRNO.EOPNOTSUPP ? this.writeZeros(offsetBytes, lengthBytes, options.fua, done) : done(r));
      }
      return this.writeZeros(offsetBytes, lengthBytes, options.fua, done);
    }
    const op = options.noHole ? IoOp.ZERO_RANGE : IoOp.PUNCH_HOLE;
    this.queue.other(op, this.fd, offsetBytes, lengthBytes, options.fua, (r) => {
      if (r !== -HOST_ERRNO.EOPNOTSUPP) return done(r);
      if (options.fastOnly) return done(-HOST_ERRNO.ENOTSUP);
      this.writeZeros(offsetBytes, lengthBytes, options.fua, done);
    });
  }

  /** The slow way: write a shared buffer of zeros over the range, chunk by chunk. */
  private writeZeros(offsetBytes: number, lengthBytes: number, fua: boolean, done: IoDone): void {
    zeroChunk ??= Buffer.alloc(ZERO_CHUNK_BYTES);
    const z = zeroChunk;
    let pos = offsetBytes;
    const end = offsetBytes + lengthBytes;
    const next = (r: number): void => {
      if (r < 0) return done(r);
      if (pos >= end) return fua ? this.flush(done) : done(0);
      const n = Math.min(ZERO_CHUNK_BYTES, end - pos);
      const at = pos;
      pos += n;
      this.queue.write(this.fd, z, at, n, false, next);
    };
    next(0);
  }

  cache(offsetBytes: number, lengthBytes: number, done: IoDone): void {
    // Prefetch by reading into a throw-away buffer; the page cache keeps the data.
    const scratch = Buffer.allocUnsafe(Math.min(lengthBytes, ZERO_CHUNK_BYTES));
    let pos = offsetBytes;
    const end = offsetBytes + lengthBytes;
    const next = (r: number): void => {
      if (r < 0 || pos >= end) return done(r < 0 ? r : 0);
      const n = Math.min(scratch.length, end - pos);
      const at = pos;
      pos += n;
      this.queue.read(this.fd, scratch, at, n, next);
    };
    next(0);
  }

  extents(offsetBytes: number, lengthBytes: number, done: ExtentsDone): void {
    const end = offsetBytes + lengthBytes;
    if (!this.capabilities.extents || nativeIo === null) {
      return done(0, [{ lengthBytes, zero: false, hole: false }]);
    }
    const out: Extent[] = [];
    try {
      let pos = offsetBytes;
      while (pos < end && out.length < MAX_EXTENTS_PER_QUERY) {
        const data = nativeIo.seekData(this.fd, pos);
        if (data === -1 || data >= end) {
          out.push({ lengthBytes: end - pos, zero: true, hole: true });
          break;
        }
        if (data > pos) {
          out.push({ lengthBytes: data - pos, zero: true, hole: true });
          pos = data;
          continue;
        }
        let hole = nativeIo.seekHole(this.fd, pos);
        if (hole === -1 || hole > end) hole = end;
        out.push({ lengthBytes: hole - pos, zero: false, hole: false });
        pos = hole;
      }
    } catch {
      // A filesystem without SEEK_DATA: everything is data, which is never wrong.
      return done(0, [{ lengthBytes, zero: false, hole: false }]);
    }
    done(0, out);
  }

  async close(): Promise<void> {
    if (!this.readOnly) await new Promise<void>((resolve) => this.queue.fdatasync(this.fd, () => resolve()));
    fs.closeSync(this.fd);
  }
}

/** Size of a block device: BLKGETSIZE64 through the addon, else sysfs. */
export function blockDeviceSize(fd: number, st: fs.Stats): number {
  if (nativeIo) return nativeIo.blockDeviceSize(fd);
  const major = Math.floor(st.rdev / 256) & 0xfff;
  const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00);
  const sectors = Number(fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim());
  return sectors * 512;
}
