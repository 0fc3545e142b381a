/**
 * The LBA rmap of one VSEG (seed 004, Fig. 9 / Fig. 34): a sorted, non-overlapping
 * set of variable-length extents within [0, sizeBytes), each naming a redirect index
 * (an entry of the VSEG's redirect table). Bytes covered by no extent are a hole:
 * unmapped, so the FP faults them to the CP.
 *
 * Extents are kept in three parallel arrays sorted by start, so `lookup` is a binary
 * search (O(log n), no allocation). Neighbouring extents that touch and name the same
 * redirect index are always coalesced into one (seed 004: "neighboring extents ...
 * may be coalesced or merged to form a single extent"), so the representation of a
 * given byte → redirect mapping is unique.
 *
 * All offsets and lengths are bytes, relative to the start of the VSEG, as safe
 * integers. Bad arguments (negative, non-integer, outside [0, sizeBytes)) are
 * programmer errors and throw RangeError naming the argument.
 *
 * The rmap knows nothing about where data lives: that is the redirect entry's
 * business (see redirect.ts for how a byte's storage address is derived, which does
 * not depend on how the rmap happens to be split into extents).
 */
import assert from 'node:assert/strict';

/** The redirect value `extentsIn` reports for a hole. */
export const HOLE = -1;

/** One extent (or, from `extentsIn`, a hole with redirect -1). Offsets are VSEG-relative. */
export interface RmapExtent {
  startBytes: number;
  lengthBytes: number;
  redirect: number;
}

/** Plain-data form: parallel arrays, sorted by start. */
export interface RmapJSON {
  sizeBytes: number;
  startBytes: number[];
  lengthBytes: number[];
  redirects: number[];
}

function badInt(name: string, value: number, what: string): RangeError {
  return new RangeError(`${name} must be ${what}, got ${value}`);
}

/** A non-negative safe integer, else RangeError naming `name`. */
function checkNonNegInt(name: string, value: number): void {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw badInt(name, value, 'a non-negative safe integer');
  }
}

/** A positive safe integer, else RangeError naming `name`. */
function checkPosInt(name: string, value: number): void {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
    throw badInt(name, value, 'a positive safe integer');
  }
}

export class Rmap {
  readonly sizeBytes: number;
  #starts: number[] = [];
  #lengths: number[] = [];
  #redirects: number[] = [];

  /** An empty rmap (one hole) over [0, sizeBytes). */
  constructor(sizeBytes: number) {
    checkPosInt('sizeBytes', sizeBytes);
    this.sizeBytes = sizeBytes;
  }

  /** Number of extents. */
  get count(): number {
    return this.#starts.length;
  }

  startOf(i: number): number {
    this.#checkIndex(i);
    return this.#starts[i]!;
  }

  lengthOf(i: number): number {
    this.#checkIndex(i);
    return this.#lengths[i]!;
  }

  /** One past the last byte of extent i. */
  endOf(i: number): number {
    this.#checkIndex(i);
    return this.#starts[i]! + this.#lengths[i]!;
  }

  redirectOf(i: number): number {
    this.#checkIndex(i);
    return this.#redirects[i]!;
  }

  /**
   * Index of the extent containing `offsetBytes`, or -1 when the byte is in a hole.
   * Binary search; allocation-free.
   */
  lookup(offsetBytes: number): number {
    if (!(offsetBytes >= 0 && offsetBytes < this.sizeBytes) || !Number.isInteger(offsetBytes)) {
      throw badInt('offsetBytes', offsetBytes, `an integer in [0, ${this.sizeBytes})`);
    }
    const starts = this.#starts;
    // Last extent whose start is <= offset.
    let lo = 0;
    let hi = starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (starts[mid]! <= offsetBytes) lo = mid + 1;
      else hi = mid;
    }
    const i = lo - 1;
    if (i >= 0 && offsetBytes < starts[i]! + this.#lengths[i]!) return i;
    return -1;
  }

  /**
   * Set [startBytes, startBytes + lengthBytes) to `redirect`, trimming or splitting
   * whatever was there, then coalesce with touching neighbours of the same redirect.
   */
  map(startBytes: number, lengthBytes: number, redirect: number): void {
    this.#checkRange(startBytes, lengthBytes);
    checkNonNegInt('redirect', redirect);
    const end = startBytes + lengthBytes;
    const lo = this.#firstEndingAfter(startBytes);
    const hi = this.#firstStartingAtOrAfter(end);
    let a = lo;
    let b = hi;
    let newStart = startBytes;
    let newEnd = end;
    let left: RmapExtent | null = null;
    let right: RmapExtent | null = null;

    if (lo < hi && this.#starts[lo]! < startBytes) {
      if (this.#redirects[lo] === redirect) newStart = this.#starts[lo]!;
      else left = { startBytes: this.#starts[lo]!, lengthBytes: startBytes - this.#starts[lo]!, redirect: this.#redirects[lo]! };
    }
    if (lo < hi) {
      const lastEnd = this.#starts[hi - 1]! + this.#lengths[hi - 1]!;
      if (lastEnd > end) {
        if (this.#redirects[hi - 1] === redirect) newEnd = lastEnd;
        else right = { startBytes: end, lengthBytes: lastEnd - end, redirect: this.#redirects[hi - 1]! };
      }
    }
    // Coalesce with touching neighbours outside the overwritten range.
    if (left === null && a > 0 && this.#starts[a - 1]! + this.#lengths[a - 1]! === newStart && this.#redirects[a - 1] === redirect) {
      a--;
      newStart = this.#starts[a]!;
    }
    if (right === null && b < this.#starts.length && this.#starts[b] === newEnd && this.#redirects[b] === redirect) {
      newEnd = this.#starts[b]! + this.#lengths[b]!;
      b++;
    }

    const pieces: RmapExtent[] = [];
    if (left) pieces.push(left);
    pieces.push({ startBytes: newStart, lengthBytes: newEnd - newStart, redirect });
    if (right) pieces.push(right);
    this.#splice(a, b, pieces);
  }

  /** Make [startBytes, startBytes + lengthBytes) a hole, splitting extents as needed. */
  unmap(startBytes: number, lengthBytes: number): void {
    this.#checkRange(startBytes, lengthBytes);
    const end = startBytes + lengthBytes;
    const lo = this.#firstEndingAfter(startBytes);
    const hi = this.#firstStartingAtOrAfter(end);
    if (lo >= hi) return;
    const pieces: RmapExtent[] = [];
    if (this.#starts[lo]! < startBytes) {
      pieces.push({ startBytes: this.#starts[lo]!, lengthBytes: startBytes - this.#starts[lo]!, redirect: this.#redirects[lo]! });
    }
    const lastEnd = this.#starts[hi - 1]! + this.#lengths[hi - 1]!;
    if (lastEnd > end) pieces.push({ startBytes: end, lengthBytes: lastEnd - end, redirect: this.#redirects[hi - 1]! });
    this.#splice(lo, hi, pieces);
  }

  /**
   * The extents and holes (redirect -1) covering [startBytes, startBytes + lengthBytes),
   * clipped to it, in order, with no gaps: how a request splits across extents.
   */
  extentsIn(startBytes: number, lengthBytes: number): RmapExtent[] {
    this.#checkRange(startBytes, lengthBytes);
    const end = startBytes + lengthBytes;
    const out: RmapExtent[] = [];
    let pos = startBytes;
    for (let i = this.#firstEndingAfter(startBytes); i < this.#starts.length && pos < end; i++) {
      const s = this.#starts[i]!;
      if (s >= end) break;
      if (s > pos) {
        out.push({ startBytes: pos, lengthBytes: s - pos, redirect: HOLE });
        pos = s;
      }
      const e = Math.min(s + this.#lengths[i]!, end);
      out.push({ startBytes: pos, lengthBytes: e - pos, redirect: this.#redirects[i]! });
      pos = e;
    }
    if (pos < end) out.push({ startBytes: pos, lengthBytes: end - pos, redirect: HOLE });
    return out;
  }

  /** Every extent (no holes), in order. */
  extents(): RmapExtent[] {
    const out: RmapExtent[] = [];
    for (let i = 0; i < this.#starts.length; i++) {
      out.push({ startBytes: this.#starts[i]!, lengthBytes: this.#lengths[i]!, redirect: this.#redirects[i]! });
    }
    return out;
  }

  /**
   * The fixed-size rmap chunks (seed 004 Fig. 26: the unit of a metadata oplock) that
   * [startBytes, startBytes + lengthBytes) touches: floor(start/chunk) .. floor((end-1)/chunk).
   */
  chunkIndexesOf(startBytes: number, lengthBytes: number, chunkBytes: number): number[] {
    this.#checkRange(startBytes, lengthBytes);
    checkPosInt('chunkBytes', chunkBytes);
    const first = Math.floor(startBytes / chunkBytes);
    const last = Math.floor((startBytes + lengthBytes - 1) / chunkBytes);
    const out: number[] = [];
    for (let c = first; c <= last; c++) out.push(c);
    return out;
  }

  clone(): Rmap {
    return Rmap.fromJSON(this.toJSON());
  }

  toJSON(): RmapJSON {
    return {
      sizeBytes: this.sizeBytes,
      startBytes: this.#starts.slice(),
      lengthBytes: this.#lengths.slice(),
      redirects: this.#redirects.slice(),
    };
  }

  /** Rebuild from `toJSON` output; throws (AssertionError) if the data breaks an invariant. */
  static fromJSON(json: RmapJSON): Rmap {
    assert.ok(json !== null && typeof json === 'object', 'rmap JSON must be an object');
    const r = new Rmap(json.sizeBytes);
    assert.ok(Array.isArray(json.startBytes) && Array.isArray(json.lengthBytes) && Array.isArray(json.redirects), 'rmap JSON needs startBytes, lengthBytes and redirects arrays');
    assert.equal(json.lengthBytes.length, json.startBytes.length, 'rmap JSON: lengthBytes and startBytes differ in length');
    assert.equal(json.redirects.length, json.startBytes.length, 'rmap JSON: redirects and startBytes differ in length');
    r.#starts = json.startBytes.slice();
    r.#lengths = json.lengthBytes.slice();
    r.#redirects = json.redirects.slice();
    r.checkInvariants();
    return r;
  }

  /**
   * An rmap holding `extents` (in any order; later ones overwrite earlier ones where
   * they overlap; touching neighbours with equal redirects coalesce). Holes
   * (redirect -1) are skipped.
   */
  static fromExtents(sizeBytes: number, extents: Iterable<RmapExtent>): Rmap {
    const r = new Rmap(sizeBytes);
    for (const e of extents) {
      if (e.redirect !== HOLE) r.map(e.startBytes, e.lengthBytes, e.redirect);
    }
    return r;
  }

  /**
   * Throws (AssertionError) unless extents are sorted, non-overlapping, non-empty,
   * within [0, sizeBytes), name non-negative integer redirects, and no two touching
   * neighbours share a redirect.
   */
  checkInvariants(): void {
    const starts = this.#starts;
    const lengths = this.#lengths;
    const redirects = this.#redirects;
    assert.ok(Number.isSafeInteger(this.sizeBytes) && this.sizeBytes > 0, `rmap: bad sizeBytes ${this.sizeBytes}`);
    assert.equal(lengths.length, starts.length, 'rmap: parallel arrays differ in length');
    assert.equal(redirects.length, starts.length, 'rmap: parallel arrays differ in length');
    let prevEnd = 0;
    for (let i = 0; i < starts.length; i++) {
      const s = starts[i]!;
      const l = lengths[i]!;
      const r = redirects[i]!;
      assert.ok(Number.isSafeInteger(s) && s >= 0, `rmap: extent ${i} has bad start ${s}`);
      assert.ok(Number.isSafeInteger(l), `rmap: extent ${i} has bad length ${l}`);
      assert.ok(l > 0, `rmap: extent ${i} (start ${s}) has zero or negative length ${l}`);
      assert.ok(Number.isSafeInteger(r) && r >= 0, `rmap: extent ${i} has bad redirect ${r}`);
      assert.ok(s + l <= this.sizeBytes, `rmap: extent ${i} [${s}, ${s + l}) exceeds sizeBytes ${this.sizeBytes}`);
      if (i > 0) {
        assert.ok(s >= prevEnd, `rmap: extent ${i} (start ${s}) unsorted or overlapping its predecessor (end ${prevEnd})`);
        assert.ok(!(s === prevEnd && redirects[i - 1] === r), `rmap: extents ${i - 1} and ${i} touch at ${s} with the same redirect ${r} (not coalesced)`);
      }
      prevEnd = s + l;
    }
  }

  // ---- internals ----

  #checkIndex(i: number): void {
    if (!Number.isInteger(i) || i < 0 || i >= this.#starts.length) {
      throw badInt('i', i, `an extent index in [0, ${this.#starts.length})`);
    }
  }

  #checkRange(startBytes: number, lengthBytes: number): void {
    if (typeof startBytes !== 'number' || !Number.isSafeInteger(startBytes) || startBytes < 0 || startBytes >= this.sizeBytes) {
      throw badInt('startBytes', startBytes, `an integer in [0, ${this.sizeBytes})`);
    }
    checkPosInt('lengthBytes', lengthBytes);
    if (startBytes + lengthBytes > this.sizeBytes) {
      throw new RangeError(`lengthBytes ${lengthBytes} from startBytes ${startBytes} runs past sizeBytes ${this.sizeBytes}`);
    }
  }

  /** First extent index whose end is > offset (ends are sorted too). */
  #firstEndingAfter(offset: number): number {
    let lo = 0;
    let hi = this.#starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#starts[mid]! + this.#lengths[mid]! > offset) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  /** First extent index whose start is >= offset. */
  #firstStartingAtOrAfter(offset: number): number {
    let lo = 0;
    let hi = this.#starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#starts[mid]! >= offset) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  /** Replace extents [a, b) with `pieces`. */
  #splice(a: number, b: number, pieces: RmapExtent[]): void {
    this.#starts.splice(a, b - a, ...pieces.map((p) => p.startBytes));
    this.#lengths.splice(a, b - a, ...pieces.map((p) => p.lengthBytes));
    this.#redirects.splice(a, b - a, ...pieces.map((p) => p.redirect));
  }
}
