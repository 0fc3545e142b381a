/**
 * Typed wrapper around the dve_io N-API addon (src/storage/native/dve_io.c).
 *
 * Gives Node the Linux I/O calls it lacks (fallocate punch-hole / zero-range,
 * lseek SEEK_DATA / SEEK_HOLE, BLKGETSIZE64 / BLKDISCARD / BLKZEROOUT) and
 * batched positional I/O: `submit()` runs many ops in ONE libuv threadpool job.
 *
 * The addon is optional: when it is not built (`npm run build:native`),
 * `nativeIo` is null and `nativeIoLoadError` says why; callers fall back to fs.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const enum IoOp {
  READ = 0,
  WRITE = 1,
  FDATASYNC = 2,
  PUNCH_HOLE = 3,
  ZERO_RANGE = 4,
  SEEK_DATA = 5,
  SEEK_HOLE = 6,
  BLKDISCARD = 7,
  BLKZEROOUT = 8,
}

export interface NativeIo {
  /**
   * Runs ops[i] for i in 0..count-1 sequentially in one threadpool job, then
   * calls done() once on the JS thread.
   *
   * opcodes/fds/offsets/lengths are copied during the call, so they may be
   * reused as soon as submit() returns. buffers[i] (READ/WRITE only; bytes
   * 0..length-1 are used) and results must stay untouched until done().
   *
   * results[i] (written just before done()): >= 0 on success — the full length
   * for READ/WRITE (a READ short at EOF zero-fills the rest), 0 for
   * FDATASYNC/PUNCH_HOLE/ZERO_RANGE/BLK*, the resulting offset for SEEK_*,
   * -1 for SEEK_* on ENXIO; otherwise -errno (-22 EINVAL for a bad opcode,
   * a non-integer offset/length or a missing/too-short buffer).
   * Zero-length PUNCH_HOLE/ZERO_RANGE/BLK* ops are no-ops returning 0.
   *
   * Throws TypeError (naming the argument) only for malformed arguments.
   */
  submit(
    count: number,
    opcodes: Uint8Array,
    fds: Int32Array,
    offsets: Float64Array,
    lengths: Float64Array,
    buffers: readonly (Uint8Array | null)[],
    results: Float64Array,
    done: () => void,
  ): void;
  /** fallocate(PUNCH_HOLE|KEEP_SIZE). Throws an Error with .code ('EOPNOTSUPP', ...), .errno (negative, as in Node) and .syscall. */
  punchHole(fd: number, offset: number, length: number): void;
  /** fallocate(ZERO_RANGE|KEEP_SIZE). Throws like punchHole. */
  zeroRange(fd: number, offset: number, length: number): void;
  /** lseek(SEEK_DATA): offset of the next data at or after `offset`, -1 on ENXIO. */
  seekData(fd: number, offset: number): number;
  /** lseek(SEEK_HOLE): offset of the next hole at or after `offset`, -1 on ENXIO. */
  seekHole(fd: number, offset: number): number;
  /** ioctl(BLKGETSIZE64): size in bytes of a block device. */
  blockDeviceSize(fd: number): number;
  /** fstat + S_ISBLK. */
  isBlockDevice(fd: number): boolean;
  /**
   * preadv2(RWF_NOWAIT) on the calling thread: `length` (bytes read; past EOF reads
   * as zeros) when no blocking I/O was needed, else -errno; -11 (EAGAIN) means
   * "not in the page cache, use submit()". A partial read is reported as -11.
   */
  tryReadNow(fd: number, buffer: Buffer, offset: number, length: number): number;
  /** pwritev2(RWF_NOWAIT): like tryReadNow, for writes the filesystem takes without waiting. */
  tryWriteNow(fd: number, buffer: Buffer, offset: number, length: number): number;
}

/** Errors thrown by the sync calls carry these fields, like Node's fs errors. */
export interface NativeIoError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

const ADDON_RELATIVE_PATH = join('src', 'storage', 'native', 'build', 'Release', 'dve_io.node');

/**
 * Finds the project root (the directory whose package.json is named "dve"),
 * walking up from this module: works from src/storage (tsx) and from
 * dist/src/storage (compiled).
 */
function findProjectRoot(startDir: string): string | null {
  let dir = startDir;
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg)) {
      try {
        if ((JSON.parse(readFileSync(pkg, 'utf8')) as { name?: unknown }).name === 'dve') return dir;
      } catch {
        // unreadable or invalid package.json: keep walking up
      }
    }
    const parent = dirname(dir);
    if (parent === dir) return null;
    dir = parent;
  }
}

function load(): { io: NativeIo | null; error: Error | null } {
  try {
    const here = dirname(fileURLToPath(import.meta.url));
    const root = findProjectRoot(here);
    if (!root) return { io: null, error: new Error(`dve_io: no package.json named "dve" above ${here}`) };
    const addonPath = join(root, ADDON_RELATIVE_PATH);
    const require = createRequire(import.meta.url);
    return { io: require(addonPath) as NativeIo, error: null };
  } catch (err) {
    return { io: null, error: err instanceof Error ? err : new Error(String(err)) };
  }
}

const loaded = load();

/** The addon, or null when it is not built / failed to load (see nativeIoLoadError). */
export const nativeIo: NativeIo | null = loaded.io;
/** Why nativeIo is null, else null. */
export const nativeIoLoadError: Error | null = loaded.error;
