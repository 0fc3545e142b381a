/**
 * Address arithmetic for storage descriptors: where the bytes of one redirect
 * extent live on the physical disks. Pure functions, no I/O.
 *
 * A request is given relative to the start of the extent the descriptor describes.
 * `mapRange` cuts it into pieces, one per stripe touched (one in all for linear,
 * mirrored and journal), each with the placements it goes to and the physical
 * offsets there. Striping is RAID0: logical stripe k (of `stripeBytes`) goes to
 * column k % columns at in-column offset floor(k / columns) * stripeBytes; a
 * striped-mirrored descriptor (RAID10) does the same with every column mirrored.
 *
 * The FP serves only requests that fit in one piece (`spansOnePiece`); anything
 * spanning stripes faults to the CP, which splits it with `mapRange`.
 *
 * Arithmetic uses division rather than shifts and masks so that offsets beyond
 * 2^32 stay exact (all values are safe integers).
 */
import type { Placement, StorageDescriptor } from '../map/storage-descriptor.js';
import { formatSize } from '../util/size.js';
import { isPowerOfTwo, isSafeNonNegInt } from '../util/number.js';

export type { Placement, StorageDescriptor };

export const MIN_STRIPE_BYTES = 512;

export interface Piece {
  /** Stripe column (0 for linear, mirrored and journal). */
  column: number;
  /** Start of this piece, relative to the start of the extent. */
  relativeBytes: number;
  lengthBytes: number;
  /** Where the piece goes: one placement for linear/striped/journal; every side for mirrors. */
  targets: Placement[];
  /** Aligned with `targets`: placement.offsetBytes + columnOffsetBytes. */
  physicalOffsets: number[];
  /** Offset within the column (within the placement's allocation). */
  columnOffsetBytes: number;
  /** Where this piece's data sits in the request buffer. */
  bufferOffsetBytes: number;
}

export type SideState = 'live' | 'dead' | 'resyncing';
export type ReadPolicy = 'round-robin' | 'cost';



function placementError(p: unknown, what: string): string | null {
  const q = p as Partial<Placement> | null;
  if (!q || typeof q !== 'object') return `${what}: not a placement`;
  if (typeof q.disk !== 'string' || q.disk === '') return `${what}: disk must be a non-empty string`;
  if (!isSafeNonNegInt(q.offsetBytes)) return `${what}: offsetBytes ${q.offsetBytes} is not a non-negative integer`;
  return null;
}

function stripeError(stripeBytes: unknown): string | null {
  if (typeof stripeBytes !== 'number' || !isPowerOfTwo(stripeBytes) || stripeBytes < MIN_STRIPE_BYTES) {
    return `stripeBytes ${stripeBytes} must be a power of two of at least ${MIN_STRIPE_BYTES}`;
  }
  return null;
}

function mirrorError(sides: unknown, what: string): string | null {
  if (!Array.isArray(sides) || sides.length < 2) {
    return `${what}: a mirror needs at least 2 sides, got ${Array.isArray(sides) ? sides.length : 'none'}`;
  }
  const disks = new Set<string>();
  for (let s = 0; s < sides.length; s++) {
    const e = placementError(sides[s], `${what} side ${s}`);
    if (e) return e;
    const disk = (sides[s] as Placement).disk;
    if (disks.has(disk)) return `${what}: two sides on disk ${disk}; mirror sides must be on distinct disks`;
    disks.add(disk);
  }
  return null;
}

/** A reason the descriptor is malformed, or null when it is valid. */
export function validateDescriptor(desc: StorageDescriptor): string | null {
  const d = desc as unknown as Record<string, unknown> | null;
  if (!d || typeof d !== 'object') return 'storage descriptor is not an object';
  switch (desc.kind) {
    case 'linear':
      return placementError(desc.at, 'linear');
    case 'journal': {
      const e = placementError(desc.at, 'journal');
      if (e) return e;
      if (!isSafeNonNegInt(desc.lengthBytes) || desc.lengthBytes === 0) {
        return `journal: lengthBytes ${desc.lengthBytes} must be a positive integer`;
      }
      return null;
    }
    case 'striped': {
      const e = stripeError(desc.stripeBytes);
      if (e) return `striped: ${e}`;
      if (!Array.isArray(desc.columns) || desc.columns.length < 2) {
        return `striped: needs at least 2 columns, got ${Array.isArray(desc.columns) ? desc.columns.length : 'none'}`;
      }
      for (let c = 0; c < desc.columns.length; c++) {
        const pe = placementError(desc.columns[c], `striped column ${c}`);
        if (pe) return pe;
      }
      return null;
    }
    case 'mirrored':
      return mirrorError(desc.sides, 'mirrored');
    case 'striped-mirrored': {
      const e = stripeError(desc.stripeBytes);
      if (e) return `striped-mirrored: ${e}`;
      if (!Array.isArray(desc.columns) || desc.columns.length < 2) {
        return `striped-mirrored: needs at least 2 columns, got ${Array.isArray(desc.columns) ? desc.columns.length : 'none'}`;
      }
      for (let c = 0; c < desc.columns.length; c++) {
        const me = mirrorError(desc.columns[c], `striped-mirrored column ${c}`);
        if (me) return me;
        if (desc.columns[c]!.length !== desc.columns[0]!.length) {
          return `striped-mirrored: column ${c} has ${desc.columns[c]!.length} sides, column 0 has ${desc.columns[0]!.length}`;
        }
      }
      return null;
    }
    default:
      return `unknown storage descriptor kind ${JSON.stringify((d as { kind?: unknown }).kind)}`;
  }
}

/** Every placement the descriptor uses (columns in order, sides in order). */
export function placementsOf(desc: StorageDescriptor): Placement[] {
  switch (desc.kind) {
    case 'linear':
    case 'journal':
      return [desc.at];
    case 'striped':
      return [...desc.columns];
    case 'mirrored':
      return [...desc.sides];
    case 'striped-mirrored':
      return desc.columns.flat();
  }
}

function checkRange(desc: StorageDescriptor, rel: number, len: number, extentLengthBytes?: number): void {
  if (!isSafeNonNegInt(rel)) throw new RangeError(`relativeBytes ${rel} is not a non-negative integer`);
  if (!isSafeNonNegInt(len)) throw new RangeError(`lengthBytes ${len} is not a non-negative integer`);
  const limit = desc.kind === 'journal' ? desc.lengthBytes : extentLengthBytes;
  if (limit !== undefined && rel + len > limit) {
    throw new RangeError(`range ${rel}+${len} runs past the end of the ${desc.kind} extent (${limit} bytes)`);
  }
}

function targetsOf(desc: StorageDescriptor, column: number): Placement[] {
  switch (desc.kind) {
    case 'linear':
    case 'journal':
      return [desc.at];
    case 'mirrored':
      return desc.sides;
    case 'striped':
      return [desc.columns[column]!];
    case 'striped-mirrored':
      return desc.columns[column]!;
  }
}

function piece(
  desc: StorageDescriptor,
  column: number,
  relativeBytes: number,
  lengthBytes: number,
  columnOffsetBytes: number,
  bufferOffsetBytes: number,
): Piece {
  const targets = [...targetsOf(desc, column)];
  return {
    column,
    relativeBytes,
    lengthBytes,
    targets,
    physicalOffsets: targets.map((p) => p.offsetBytes + columnOffsetBytes),
    columnOffsetBytes,
    bufferOffsetBytes,
  };
}

/**
 * Split [relativeBytes, relativeBytes + lengthBytes) of the extent into pieces,
 * in logical order; their buffer offsets tile the request buffer. A zero-length
 * range gives no pieces. Throws RangeError on a bad range, or one past the end of
 * a journal (or of `extentLengthBytes` when given). The descriptor is assumed
 * valid (see `validateDescriptor`).
 */
export function mapRange(
  desc: StorageDescriptor,
  relativeBytes: number,
  lengthBytes: number,
  extentLengthBytes?: number,
): Piece[] {
  checkRange(desc, relativeBytes, lengthBytes, extentLengthBytes);
  if (lengthBytes === 0) return [];
  if (desc.kind !== 'striped' && desc.kind !== 'striped-mirrored') {
    return [piece(desc, 0, relativeBytes, lengthBytes, relativeBytes, 0)];
  }
  const stripe = desc.stripeBytes;
  const columns = desc.columns.length;
  const pieces: Piece[] = [];
  const end = relativeBytes + lengthBytes;
  let pos = relativeBytes;
  while (pos < end) {
    const k = Math.floor(pos / stripe);
    const within = pos - k * stripe;
    const len = Math.min(stripe - within, end - pos);
    const column = k % columns;
    const columnOffset = Math.floor(k / columns) * stripe + within;
    pieces.push(piece(desc, column, pos, len, columnOffset, pos - relativeBytes));
    pos += len;
  }
  return pieces;
}

/**
 * Whether the range maps to exactly one piece (the FP fast path); the same as
 * `mapRange(...).length === 1` without building the pieces. False for an empty,
 * malformed or out-of-range request.
 */
export function spansOnePiece(desc: StorageDescriptor, relativeBytes: number, lengthBytes: number): boolean {
  if (!isSafeNonNegInt(relativeBytes) || !isSafeNonNegInt(lengthBytes) || lengthBytes === 0) return false;
  switch (desc.kind) {
    case 'journal':
      return relativeBytes + lengthBytes <= desc.lengthBytes;
    case 'linear':
    case 'mirrored':
      return true;
    case 'striped':
    case 'striped-mirrored':
      return (
        Math.floor(relativeBytes / desc.stripeBytes) ===
        Math.floor((relativeBytes + lengthBytes - 1) / desc.stripeBytes)
      );
  }
}

/**
 * How many bytes each placement needs to hold an extent of `extentLengthBytes`:
 * linear and mirrored L (per side), striped and striped-mirrored L / columns
 * rounded up to the stripes column 0 holds (exactly L / columns when L is a whole
 * number of stripe rows), journal its own fixed `lengthBytes`.
 */
export function extentSizeOnDisk(desc: StorageDescriptor, extentLengthBytes: number): number {
  if (!isSafeNonNegInt(extentLengthBytes)) {
    throw new RangeError(`extentLengthBytes ${extentLengthBytes} is not a non-negative integer`);
  }
  switch (desc.kind) {
    case 'linear':
    case 'mirrored':
      return extentLengthBytes;
    case 'journal':
      return desc.lengthBytes;
    case 'striped':
    case 'striped-mirrored': {
      const row = desc.stripeBytes * desc.columns.length;
      const rows = Math.floor(extentLengthBytes / row);
      const rem = extentLengthBytes - rows * row;
      return rows * desc.stripeBytes + Math.min(rem, desc.stripeBytes);
    }
  }
}

function fmtPlacement(p: Placement): string {
  return `${p.disk}@${p.offsetBytes}`;
}

/** A one-line description for logs, e.g. "striped 64 KiB x 3 [d1@0, d2@0, d3@0]". */
export function describe(desc: StorageDescriptor): string {
  switch (desc.kind) {
    case 'linear':
      return `linear ${fmtPlacement(desc.at)}`;
    case 'journal':
      return `journal ${fmtPlacement(desc.at)} (${formatSize(desc.lengthBytes)})`;
    case 'mirrored':
      return `mirrored [${desc.sides.map(fmtPlacement).join(' | ')}]`;
    case 'striped':
      return `striped ${formatSize(desc.stripeBytes)} x ${desc.columns.length} [${desc.columns.map(fmtPlacement).join(', ')}]`;
    case 'striped-mirrored':
      return (
        `striped-mirrored ${formatSize(desc.stripeBytes)} x ${desc.columns.length} ` +
        `[${desc.columns.map((c) => `(${c.map(fmtPlacement).join(' | ')})`).join(', ')}]`
      );
  }
}

/**
 * Pick the mirror side to read from. Only live sides qualify (never dead or
 * resyncing); -1 when none is live. 'round-robin' takes live side number
 * `counter` modulo the live count; 'cost' takes the live side with the lowest
 * `costUs` (unknown cost counts as highest), breaking ties round-robin by
 * `counter` — so with no costs known it is round-robin.
 */
export function chooseReadSide(
  sides: { state: SideState; costUs?: number }[],
  policy: ReadPolicy,
  counter: number,
): number {
  let candidates: number[] = [];
  for (let i = 0; i < sides.length; i++) if (sides[i]!.state === 'live') candidates.push(i);
  if (candidates.length === 0) return -1;
  if (policy === 'cost') {
    const cost = (i: number): number => {
      const c = sides[i]!.costUs;
      return typeof c === 'number' && !Number.isNaN(c) ? c : Infinity;
    };
    let min = Infinity;
    for (const i of candidates) min = Math.min(min, cost(i));
    candidates = candidates.filter((i) => cost(i) === min);
  }
  const n = candidates.length;
  const c = Number.isFinite(counter) ? Math.trunc(counter) : 0;
  return candidates[((c % n) + n) % n]!;
}
