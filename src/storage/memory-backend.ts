/**
 * A Backend over a Buffer in memory: for unit tests and simulations, where a real
 * disk would only add noise. Completes asynchronously (next tick), as a disk would.
 */
import type { Backend, BackendCapabilities, ExtentsDone, IoDone, ZeroOptions } from './backend.js';

export class MemoryBackend implements Backend {
  readonly data: Buffer;
  readonly capabilities: BackendCapabilities = { trim: true, fastZero: true, extents: false, multiConn: true };
  readonly description: string;
  reads = 0;
  writes = 0;
  flushes = 0;

  constructor(readonly sizeBytes: number, readonly readOnly = false, name = 'memory') {
    this.data = Buffer.alloc(sizeBytes);
    this.description = name;
  }

  private inRange(off: number, len: number): boolean {
    return off >= 0 && len >= 0 && off + len <= this.sizeBytes;
  }

  read(buf: Buffer, off: number, done: IoDone): void {
    this.reads++;
    if (!this.inRange(off, buf.length)) return process.nextTick(done, -22);
    this.data.copy(buf, 0, off, off + buf.length);
    process.nextTick(done, 0);
  }

  write(buf: Buffer, off: number, _fua: boolean, done: IoDone): void {
    this.writes++;
    if (this.readOnly) return process.nextTick(done, -30);
    if (!this.inRange(off, buf.length)) return process.nextTick(done, -28);
    buf.copy(this.data, off);
    process.nextTick(done, 0);
  }

  flush(done: IoDone): void {
    this.flushes++;
    process.nextTick(done, 0);
  }

  trim(off: number, len: number, _fua: boolean, done: IoDone): void {
    this.zero(off, len, { noHole: false, fastOnly: false, fua: false }, done);
  }

  zero(off: number, len: number, _o: ZeroOptions, done: IoDone): void {
    if (!this.inRange(off, len)) return process.nextTick(done, -22);
    this.data.fill(0, off, off + len);
    process.nextTick(done, 0);
  }

  cache(_off: number, _len: number, done: IoDone): void {
    process.nextTick(done, 0);
  }

  extents(_off: number, len: number, done: ExtentsDone): void {
    process.nextTick(done, 0, [{ lengthBytes: len, zero: false, hole: false }]);
  }

  async close(): Promise<void> {}
}
