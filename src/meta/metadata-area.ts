/**
 * A metadata area on a real file or block device: `FileMetaDevice` gives a
 * `ChunkStore` the region [offsetBytes, offsetBytes + sizeBytes) of a file (a
 * dedicated metadata file) or block device (the start of a disk, a loop device).
 *
 * Durability: positional writes through the page cache, `fdatasync` on `sync()`.
 */
import fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { blockDeviceSize } from '../storage/file-backend.js';
import type { MetaDevice } from './chunk-store.js';

export interface FileMetaDeviceOptions {
  /** Where the region starts in the file or device (default 0). */
  offsetBytes?: number;
  /**
   * Region length. Default: from offsetBytes to the end of the file or device.
   * Required with `create` when the file does not exist yet.
   */
  sizeBytes?: number;
  /**
   * Create the file (sparse) if it does not exist, and grow a regular file that
   * is shorter than offsetBytes + sizeBytes. Never applies to block devices.
   */
  create?: boolean;
  /** Open read-only (for verification / status); write() and sync() then fail. */
  readOnly?: boolean;
}

export class FileMetaDevice implements MetaDevice {
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly offsetBytes: number,
    readonly sizeBytes: number,
    readonly isBlockDevice: boolean,
    readonly readOnly: boolean,
  ) {}

  get description(): string {
    return `metadata area at ${this.offsetBytes}+${this.sizeBytes} of ${this.isBlockDevice ? 'block device' : 'file'} ${this.path}`;
  }

  static async open(filePath: string, options: FileMetaDeviceOptions = {}): Promise<FileMetaDevice> {
    const abs = path.resolve(filePath);
    const offsetBytes = options.offsetBytes ?? 0;
    const readOnly = options.readOnly ?? false;
    if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0) throw new RangeError(`metadata area offset ${offsetBytes} must be a non-negative integer`);
    if (options.sizeBytes !== undefined && (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes <= 0)) {
      throw new RangeError(`metadata area size ${options.sizeBytes} must be a positive integer`);
    }
    if (options.create && readOnly) throw new Error(`cannot both create and open read-only: ${abs}`);

    let fh: FileHandle;
    try {
      fh = await fs.promises.open(abs, readOnly ? 'r' : 'r+');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new Error(`cannot open metadata area ${abs}: ${(e as Error).message}`, { cause: e });
      if (!options.create) throw new Error(`metadata area ${abs} does not exist (pass create to make it a new file)`, { cause: e });
      if (options.sizeBytes === undefined) throw new Error(`cannot create metadata area ${abs}: no size given`);
      await fs.promises.mkdir(path.dirname(abs), { recursive: true });
      try {
        fh = await fs.promises.open(abs, 'wx+', 0o644);
      } catch (e2) {
        if ((e2 as NodeJS.ErrnoException).code !== 'EEXIST') throw e2;
        fh = await fs.promises.open(abs, 'r+'); // lost a race with another creator
      }
    }
    try {
      const st = await fh.stat();
      let size: number;
      const blockDevice = st.isBlockDevice();
      if (blockDevice) size = blockDeviceSize(fh.fd, st);
      else if (st.isFile()) size = st.size;
      else throw new Error(`metadata area ${abs} is neither a regular file nor a block device`);

      const kind = blockDevice ? 'block device' : 'file';
      if (options.sizeBytes === undefined && offsetBytes >= size) {
        throw new RangeError(`metadata area offset ${offsetBytes} is at or past the end of ${kind} ${abs} (${size} bytes)`);
      }
      const sizeBytes = options.sizeBytes ?? size - offsetBytes;
      const end = offsetBytes + sizeBytes;
      if (end > size) {
        if (blockDevice) {
          throw new RangeError(`metadata area [${offsetBytes}, ${end}) runs past the end of block device ${abs} (${size} bytes)`);
        }
        if (!options.create) {
          throw new RangeError(
            `metadata area [${offsetBytes}, ${end}) runs past the end of file ${abs} (${size} bytes); pass create to extend it`,
          );
        }
        await fh.truncate(end); // sparse: reads of the new part return zeros
      }
      return new FileMetaDevice(abs, fh, offsetBytes, sizeBytes, blockDevice, readOnly);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  async read(buf: Buffer, offsetBytes: number): Promise<void> {
    this.check(buf, offsetBytes, 'read');
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.fh.read(buf, done, buf.length - done, this.offsetBytes + offsetBytes + done);
      if (bytesRead === 0) {
        buf.fill(0, done); // past the end of a sparse file: zeros
        return;
      }
      done += bytesRead;
    }
  }

  async write(buf: Buffer, offsetBytes: number): Promise<void> {
    this.check(buf, offsetBytes, 'write');
    if (this.readOnly) throw new Error(`${this.description} is open read-only`);
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.fh.write(buf, done, buf.length - done, this.offsetBytes + offsetBytes + done);
      if (bytesWritten <= 0) throw new Error(`${this.description}: write made no progress at ${offsetBytes + done}`);
      done += bytesWritten;
    }
  }

  async sync(): Promise<void> {
    if (this.closed) throw new Error(`${this.description} is closed`);
    if (this.readOnly) throw new Error(`${this.description} is open read-only`);
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }

  private check(buf: Buffer, offsetBytes: number, op: string): void {
    if (this.closed) throw new Error(`${this.description} is closed`);
    if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || offsetBytes + buf.length > this.sizeBytes) {
      throw new RangeError(`${op} of ${buf.length} bytes at ${offsetBytes} is outside the ${this.description}`);
    }
  }
}
