/**
 * The one narrow interface every storage layer implements: positional read and
 * write, flush, trim, zero, cache and extent queries. A plain file or block device
 * implements it (`file-backend.ts`); the engine's maps, striping, mirroring,
 * journaling and fault injection are layers that implement it by calling another.
 *
 * Completion is by callback with a result: 0 on success or a negative host errno
 * (-EIO, -ENOSPC …), as the kernel reports it. `nbd/errno.ts` maps that to the wire.
 * Callbacks (not promises) keep the hot path free of per-request allocation; an I/O
 * may complete synchronously or later, and exactly once.
 */

export type IoDone = (result: number) => void;

export interface Extent {
  lengthBytes: number;
  /** Reads of this range return zeros. */
  zero: boolean;
  /** No storage is allocated (a hole); implies zero for this server. */
  hole: boolean;
}
export type ExtentsDone = (result: number, extents: Extent[]) => void;

export interface ZeroOptions {
  /** The range must stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole: boolean;
  /** Fail with -ENOTSUP unless zeroing is cheaper than writing zeros (NBD_CMD_FLAG_FAST_ZERO). */
  fastOnly: boolean;
  /** Durable before completion (NBD_CMD_FLAG_FUA). */
  fua: boolean;
}

export interface BackendCapabilities {
  /** Trim frees space (punches holes or discards). */
  trim: boolean;
  /** Zeroing without writing zeros is possible (fallocate or BLKZEROOUT). */
  fastZero: boolean;
  /** Extent queries know real holes (SEEK_DATA/SEEK_HOLE). */
  extents: boolean;
  /** Flush on any handle covers writes made through every handle. */
  multiConn: boolean;
}

export interface Backend {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly capabilities: BackendCapabilities;
  /** Human-readable: what this backend serves ("file /var/tmp/disk.img"). */
  readonly description: string;

  /** Fill `buf` (all of it) from `offsetBytes`. */
  read(buf: Buffer, offsetBytes: number, done: IoDone): void;
  /** Write all of `buf`; completion means the bytes reached the backing store (and are durable when `fua`). */
  write(buf: Buffer, offsetBytes: number, fua: boolean, done: IoDone): void;
  /** Make every completed write durable. */
  flush(done: IoDone): void;
  /** Advisory: the range's contents become unspecified; space may be freed. */
  trim(offsetBytes: number, lengthBytes: number, fua: boolean, done: IoDone): void;
  /** The range reads back as zeros. */
  zero(offsetBytes: number, lengthBytes: number, options: ZeroOptions, done: IoDone): void;
  /** Advisory: prefetch the range. */
  cache(offsetBytes: number, lengthBytes: number, done: IoDone): void;
  /** Allocation status from `offsetBytes`, covering at most `lengthBytes`, at least one extent. */
  extents(offsetBytes: number, lengthBytes: number, done: ExtentsDone): void;
  /** Flush and release. */
  close(): Promise<void>;
}
