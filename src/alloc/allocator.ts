/**
 * Physical extent allocation, in the manner of LVM physical extents.
 *
 * Each disk starts with a reserved metadata area that is never handed out; the
 * rest is cut into fixed-size extents (`extentBytes`, a power of two ≥ 64 KiB),
 * `floor((sizeBytes - reservedBytes) / extentBytes)` of them, extent i starting at
 * byte `reservedBytes + i * extentBytes`. A bitmap per disk (one bit per extent,
 * 1 = in use) records what is taken.
 *
 * Pure and synchronous: no I/O. The CP owns one allocator, rebuilds it at start-up
 * from persisted metadata with `markUsed`, and persists it (or the redirect tables
 * it derives from) itself. All offsets and lengths are bytes.
 *
 * Failures the caller can meet in normal operation (no space, unknown disk, a count
 * that does not fit the spread) come back as `{ ok: false, error }` from `allocate`,
 * which never allocates partially. Programmer errors (freeing what is not allocated,
 * misaligned or out-of-range extents, duplicate disks) throw.
 */
import { formatSize } from '../util/size.js';
import { isPowerOfTwo, isSafeNonNegInt } from '../util/number.js';

export const DEFAULT_EXTENT_BYTES = 4 * 1024 * 1024;
export const MIN_EXTENT_BYTES = 64 * 1024;

export interface DiskSpec {
  id: string;
  sizeBytes: number;
  /** Metadata area at the start of the disk; not allocatable. */
  reservedBytes: number;
}

/** A run of whole extents on one disk. */
export interface Extent {
  disk: string;
  offsetBytes: number;
  lengthBytes: number;
}

export interface AllocateOptions {
  /** Only allocate on these disks (default: every disk). */
  disks?: string[];
  /**
   * Number of DISTINCT disks the extents are split evenly across: `count` must be
   * a multiple of `spread`, and each disk gets `count / spread` extents (one stripe
   * column, or one mirror side). `spread: 1` keeps everything on one disk.
   */
  spread?: number;
  /**
   * Each group must be one contiguous run (so that a single `Placement` can
   * describe it). Without it contiguous runs are preferred but not required.
   */
  contiguous?: boolean;
}

export type AllocateResult =
  | {
      ok: true;
      /** Every run allocated, coalesced, in group order (= `groups.flat()`). */
      extents: Extent[];
      /**
       * One group per distinct disk used, each sorted by offset. With `spread`,
       * exactly `spread` groups of `count / spread` extents each.
       */
      groups: Extent[][];
    }
  | { ok: false; error: string };

export interface DiskUsage {
  disk: string;
  sizeBytes: number;
  extents: number;
  freeExtents: number;
}

/** The JSON form (`toJSON` / `ExtentAllocator.fromJSON`). */
export interface AllocatorJSON {
  version: 1;
  extentBytes: number;
  disks: {
    id: string;
    sizeBytes: number;
    reservedBytes: number;
    /** Used extents as [first extent index, number of extents] runs, ascending. */
    used: [number, number][];
  }[];
}

interface DiskState {
  id: string;
  sizeBytes: number;
  reservedBytes: number;
  extents: number;
  free: number;
  /** One bit per extent, 1 = used; bit (i & 7) of byte (i >> 3). */
  bitmap: Uint8Array;
}

interface Run {
  start: number;
  count: number;
}



function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

function testBit(bm: Uint8Array, i: number): boolean {
  return (bm[i >> 3]! & (1 << (i & 7))) !== 0;
}

function setBits(bm: Uint8Array, start: number, count: number, used: boolean): void {
  for (let i = start; i < start + count; i++) {
    if (used) bm[i >> 3]! |= 1 << (i & 7);
    else bm[i >> 3]! &= ~(1 << (i & 7));
  }
}

/** All maximal runs of bits equal to `used` among the first `n` bits. */
function runsOf(bm: Uint8Array, n: number, used: boolean): Run[] {
  const runs: Run[] = [];
  const skipByte = used ? 0x00 : 0xff; // a byte with no bit of interest
  let i = 0;
  let start = -1;
  while (i < n) {
    if ((i & 7) === 0 && i + 8 <= n) {
      const b = bm[i >> 3]!;
      if (b === skipByte) {
        if (start >= 0) {
          runs.push({ start, count: i - start });
          start = -1;
        }
        i += 8;
        continue;
      }
      if (b === (skipByte ^ 0xff)) {
        if (start < 0) start = i;
        i += 8;
        continue;
      }
    }
    if (testBit(bm, i) === used) {
      if (start < 0) start = i;
    } else if (start >= 0) {
      runs.push({ start, count: i - start });
      start = -1;
    }
    i++;
  }
  if (start >= 0) runs.push({ start, count: n - start });
  return runs;
}

/**
 * Choose `need` free extents on one disk, preferring contiguity: the smallest free
 * run that holds them all (best fit, lowest offset on ties); otherwise the largest
 * runs first. Returns null when impossible (or, with `contiguous`, when no single
 * run is big enough).
 */
function pickRuns(d: DiskState, need: number, contiguous: boolean): Run[] | null {
  if (need > d.free) return null;
  const runs = runsOf(d.bitmap, d.extents, false);
  let best: Run | undefined;
  for (const r of runs) {
    if (r.count >= need && (!best || r.count < best.count)) best = r;
  }
  if (best) return [{ start: best.start, count: need }];
  if (contiguous) return null;
  runs.sort((a, b) => b.count - a.count || a.start - b.start);
  const picked: Run[] = [];
  let left = need;
  for (const r of runs) {
    if (left === 0) break;
    const take = Math.min(left, r.count);
    picked.push({ start: r.start, count: take });
    left -= take;
  }
  picked.sort((a, b) => a.start - b.start);
  return picked;
}

function largestFreeRun(d: DiskState): number {
  let m = 0;
  for (const r of runsOf(d.bitmap, d.extents, false)) m = Math.max(m, r.count);
  return m;
}

export class ExtentAllocator {
  readonly extentBytes: number;
  private readonly byId = new Map<string, DiskState>();

  constructor(disks: DiskSpec[], extentBytes: number = DEFAULT_EXTENT_BYTES) {
    if (!isPowerOfTwo(extentBytes) || extentBytes < MIN_EXTENT_BYTES) {
      throw new Error(
        `extentBytes ${extentBytes} must be a power of two of at least ${formatSize(MIN_EXTENT_BYTES)}`,
      );
    }
    this.extentBytes = extentBytes;
    for (const d of disks) this.addDisk(d);
  }

  /** Disk ids, in the order they were added. */
  get diskIds(): string[] {
    return [...this.byId.keys()];
  }

  /** Add a disk with all of its extents free. Throws on a duplicate id or bad sizes. */
  addDisk(disk: DiskSpec): void {
    const { id, sizeBytes, reservedBytes } = disk;
    if (typeof id !== 'string' || id === '') throw new Error(`disk id must be a non-empty string`);
    if (this.byId.has(id)) throw new Error(`disk ${id} is already known to the allocator`);
    if (!isSafeNonNegInt(sizeBytes)) throw new Error(`disk ${id}: sizeBytes ${sizeBytes} is not a non-negative integer`);
    if (!isSafeNonNegInt(reservedBytes)) {
      throw new Error(`disk ${id}: reservedBytes ${reservedBytes} is not a non-negative integer`);
    }
    if (reservedBytes > sizeBytes) {
      throw new Error(`disk ${id}: reservedBytes ${reservedBytes} exceeds sizeBytes ${sizeBytes}`);
    }
    const extents = Math.floor((sizeBytes - reservedBytes) / this.extentBytes);
    this.byId.set(id, {
      id,
      sizeBytes,
      reservedBytes,
      extents,
      free: extents,
      bitmap: new Uint8Array(Math.ceil(extents / 8)),
    });
  }

  /** Remove a disk; throws if it is unknown or any of its extents is in use. */
  removeDisk(id: string): void {
    const d = this.disk(id);
    const used = d.extents - d.free;
    if (used > 0) throw new Error(`cannot remove disk ${id}: ${plural(used, 'extent')} still in use`);
    this.byId.delete(id);
  }

  /**
   * Allocate `count` extents, all or nothing. Disks with the most free space are
   * preferred, and within a disk contiguous runs (best fit). Without `spread` the
   * extents may land on several disks (fewest disks first).
   */
  allocate(count: number, options: AllocateOptions = {}): AllocateResult {
    if (!Number.isSafeInteger(count) || count <= 0) {
      return { ok: false, error: `extent count ${count} must be a positive integer` };
    }
    const spread = options.spread;
    if (spread !== undefined) {
      if (!Number.isSafeInteger(spread) || spread <= 0) {
        return { ok: false, error: `spread ${spread} must be a positive integer` };
      }
      if (count % spread !== 0) {
        return { ok: false, error: `extent count ${count} is not a multiple of spread ${spread}` };
      }
    }
    const contiguous = options.contiguous === true;

    // Candidate disks, in registration order, deduplicated.
    let candidates: DiskState[];
    if (options.disks) {
      candidates = [];
      const seen = new Set<string>();
      for (const id of options.disks) {
        const d = this.byId.get(id);
        if (!d) return { ok: false, error: `unknown disk ${id}` };
        if (!seen.has(id)) {
          seen.add(id);
          candidates.push(d);
        }
      }
    } else {
      candidates = [...this.byId.values()];
    }
    if (candidates.length === 0) return { ok: false, error: 'no disks to allocate from' };

    const order = new Map(candidates.map((d, i) => [d.id, i]));
    const byFree = [...candidates].sort((a, b) => b.free - a.free || order.get(a.id)! - order.get(b.id)!);
    const size = formatSize(this.extentBytes);
    const listing = (withRuns: boolean): string =>
      candidates
        .map((d) => `${d.id} (${d.free} free${withRuns ? `, largest run ${largestFreeRun(d)}` : ''})`)
        .join(', ');

    const plan: { d: DiskState; runs: Run[] }[] = [];
    if (spread !== undefined) {
      const per = count / spread;
      if (candidates.length < spread) {
        return {
          ok: false,
          error:
            `not enough disks: need ${count} extents of ${size} on ${plural(spread, 'distinct disk')}` +
            ` but only ${candidates.length} ${candidates.length === 1 ? 'is' : 'are'} eligible: ${listing(contiguous)}`,
        };
      }
      for (const d of byFree) {
        if (plan.length === spread) break;
        const runs = pickRuns(d, per, contiguous);
        if (runs) plan.push({ d, runs });
      }
      if (plan.length < spread) {
        return {
          ok: false,
          error:
            `not enough ${contiguous ? 'contiguous ' : ''}space: need ${count} extents of ${size} on ` +
            `${plural(spread, 'distinct disk')} (${per} each${contiguous ? ', in one run' : ''}), disks ${listing(contiguous)}`,
        };
      }
    } else if (contiguous) {
      // One run on one disk.
      for (const d of byFree) {
        const runs = pickRuns(d, count, true);
        if (runs) {
          plan.push({ d, runs });
          break;
        }
      }
      if (plan.length === 0) {
        return {
          ok: false,
          error: `not enough contiguous space: need ${count} extents of ${size} in one run, disks ${listing(true)}`,
        };
      }
    } else {
      const total = candidates.reduce((s, d) => s + d.free, 0);
      if (total < count) {
        return { ok: false, error: `not enough space: need ${count} extents of ${size}, disks ${listing(false)}` };
      }
      let left = count;
      for (const d of byFree) {
        if (left === 0) break;
        const take = Math.min(left, d.free);
        if (take === 0) continue;
        plan.push({ d, runs: pickRuns(d, take, false)! });
        left -= take;
      }
    }

    // Commit: nothing above touched a bitmap.
    const groups: Extent[][] = [];
    for (const { d, runs } of plan) {
      const group: Extent[] = [];
      for (const r of runs) {
        setBits(d.bitmap, r.start, r.count, true);
        d.free -= r.count;
        group.push(this.toExtent(d, r));
      }
      groups.push(group);
    }
    return { ok: true, extents: groups.flat(), groups };
  }

  /** Return extents to the free pool. Throws (changing nothing) unless every one is allocated. */
  free(extents: Extent[]): void {
    this.apply(extents, false);
  }

  /**
   * Mark extents as used, e.g. when rebuilding from persisted metadata. Throws
   * (changing nothing) if any is already used — two owners of one extent.
   */
  markUsed(extents: Extent[]): void {
    this.apply(extents, true);
  }

  /** Free bytes on one disk, or over all disks. Throws on an unknown disk. */
  freeBytes(disk?: string): number {
    if (disk !== undefined) return this.disk(disk).free * this.extentBytes;
    let free = 0;
    for (const d of this.byId.values()) free += d.free;
    return free * this.extentBytes;
  }

  /** Whether the extent starting at `offsetBytes` on `disk` is in use. */
  isUsed(disk: string, offsetBytes: number): boolean {
    const d = this.disk(disk);
    const { start } = this.toRun(d, { disk, offsetBytes, lengthBytes: this.extentBytes });
    return testBit(d.bitmap, start);
  }

  /** The used extents of each disk, as coalesced runs. */
  usedExtents(disk?: string): Extent[] {
    const disks = disk !== undefined ? [this.disk(disk)] : [...this.byId.values()];
    return disks.flatMap((d) => runsOf(d.bitmap, d.extents, true).map((r) => this.toExtent(d, r)));
  }

  usage(): DiskUsage[] {
    return [...this.byId.values()].map((d) => ({
      disk: d.id,
      sizeBytes: d.sizeBytes,
      extents: d.extents,
      freeExtents: d.free,
    }));
  }

  toJSON(): AllocatorJSON {
    return {
      version: 1,
      extentBytes: this.extentBytes,
      disks: [...this.byId.values()].map((d) => ({
        id: d.id,
        sizeBytes: d.sizeBytes,
        reservedBytes: d.reservedBytes,
        used: runsOf(d.bitmap, d.extents, true).map((r): [number, number] => [r.start, r.count]),
      })),
    };
  }

  /** Rebuild from `toJSON()` output (or its parsed JSON text). Throws on malformed input. */
  static fromJSON(json: unknown): ExtentAllocator {
    const j = json as Partial<AllocatorJSON> | null;
    if (!j || typeof j !== 'object' || j.version !== 1 || !Array.isArray(j.disks)) {
      throw new Error('allocator JSON: expected { version: 1, extentBytes, disks: [...] }');
    }
    const a = new ExtentAllocator([], j.extentBytes);
    for (const d of j.disks) {
      a.addDisk({ id: d.id, sizeBytes: d.sizeBytes, reservedBytes: d.reservedBytes });
      if (!Array.isArray(d.used)) throw new Error(`allocator JSON: disk ${d.id}: "used" must be an array`);
      a.markUsed(
        d.used.map((r) => {
          if (!Array.isArray(r) || r.length !== 2 || !isSafeNonNegInt(r[0]) || !isSafeNonNegInt(r[1])) {
            throw new Error(`allocator JSON: disk ${d.id}: bad used run ${JSON.stringify(r)}`);
          }
          return {
            disk: d.id,
            offsetBytes: d.reservedBytes + r[0] * a.extentBytes,
            lengthBytes: r[1] * a.extentBytes,
          };
        }),
      );
    }
    return a;
  }

  // ---- internals ----

  private disk(id: string): DiskState {
    const d = this.byId.get(id);
    if (!d) throw new Error(`unknown disk ${id}`);
    return d;
  }

  private toExtent(d: DiskState, r: Run): Extent {
    return {
      disk: d.id,
      offsetBytes: d.reservedBytes + r.start * this.extentBytes,
      lengthBytes: r.count * this.extentBytes,
    };
  }

  /** Validate an extent and convert it to extent indices; throws on misuse. */
  private toRun(d: DiskState, e: Extent): Run {
    const where = `extent ${e.disk}@${e.offsetBytes}+${e.lengthBytes}`;
    if (!isSafeNonNegInt(e.offsetBytes) || !isSafeNonNegInt(e.lengthBytes) || e.lengthBytes === 0) {
      throw new Error(`${where}: offset and length must be integers, length > 0`);
    }
    const rel = e.offsetBytes - d.reservedBytes;
    if (rel < 0) throw new Error(`${where}: starts inside the reserved metadata area (${d.reservedBytes} bytes)`);
    if (rel % this.extentBytes !== 0) {
      throw new Error(
        `${where}: offset is not on an extent boundary (reserved ${d.reservedBytes} + multiple of ${this.extentBytes})`,
      );
    }
    if (e.lengthBytes % this.extentBytes !== 0) {
      throw new Error(`${where}: length is not a multiple of the extent size ${this.extentBytes}`);
    }
    const start = rel / this.extentBytes;
    const count = e.lengthBytes / this.extentBytes;
    if (start + count > d.extents) {
      throw new Error(`${where}: runs past the last extent of disk ${d.id} (${d.extents} extents)`);
    }
    return { start, count };
  }

  private apply(extents: Extent[], used: boolean): void {
    // Validate everything first so that a failure changes nothing.
    const plan: { d: DiskState; r: Run }[] = [];
    const touched = new Map<string, Set<number>>();
    for (const e of extents) {
      const d = this.disk(e.disk);
      const r = this.toRun(d, e);
      let seen = touched.get(d.id);
      if (!seen) touched.set(d.id, (seen = new Set()));
      for (let i = r.start; i < r.start + r.count; i++) {
        const where = `extent ${d.id}@${d.reservedBytes + i * this.extentBytes}`;
        if (seen.has(i)) throw new Error(`${where} is listed twice`);
        seen.add(i);
        if (testBit(d.bitmap, i) === used) {
          throw new Error(used ? `${where} is already in use` : `${where} is not allocated`);
        }
      }
      plan.push({ d, r });
    }
    for (const { d, r } of plan) {
      setBits(d.bitmap, r.start, r.count, used);
      d.free += used ? -r.count : r.count;
    }
  }
}
