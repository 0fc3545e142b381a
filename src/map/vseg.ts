/**
 * A volume's map (seed 004, Fig. 9 / Fig. 14): the volume is cut into VSEGs
 * (contiguous byte ranges, sorted and contiguous from 0), each with its own LBA rmap
 * and redirect table. `resolve` does the FP's whole lookup for one byte: volume
 * offset → VSEG → rmap extent → redirect entry → descriptor-relative offset.
 *
 * split/merge/append restructure the VSEGs without changing what any byte resolves
 * to (entry contents, descriptor-relative offset). They build new Vseg objects and
 * leave the old ones untouched, so a reader holding an old Vseg keeps a consistent
 * (if stale) view; like every restrictive update, the CP revokes FP mappings of the
 * affected range first, since redirect indexes change.
 */
import assert from 'node:assert/strict';

import { HOLE, Rmap } from './rmap.js';
import type { RmapExtent, RmapJSON } from './rmap.js';
import { RedirectTable } from './redirect.js';
import type { RedirectEntry, RedirectTableJSON } from './redirect.js';

export interface VsegJSON {
  startBytes: number;
  lengthBytes: number;
  rmap: RmapJSON;
  redirects: RedirectTableJSON;
}

export interface VolumeMapJSON {
  vsegs: VsegJSON[];
}

/** What one volume byte resolves to. */
export interface Resolved {
  vseg: Vseg;
  vsegIndex: number;
  /** Index of the rmap extent within vseg.rmap. */
  extentIndex: number;
  /** Index of the redirect entry within vseg.redirects. */
  redirectIndex: number;
  entry: RedirectEntry;
  /** Offset within the VSEG. */
  vsegRelativeBytes: number;
  /** Offset within the rmap extent (from its current start). */
  extentOffsetBytes: number;
  /** Bytes from this one to the end of the extent (>= 1): a request no longer than this hits one extent. */
  extentRemainingBytes: number;
  /**
   * Offset within the storage descriptor: vsegRelativeBytes - entry.originBytes. This
   * is the `relativeBytes` that src/storage/layout.ts takes; it equals
   * extentOffsetBytes exactly when the extent starts at the entry's origin.
   */
  relativeBytes: number;
}

function checkNonNegInt(name: string, value: number): void {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${name} must be a non-negative safe integer, got ${value}`);
  }
}

export class Vseg {
  readonly startBytes: number;
  readonly lengthBytes: number;
  readonly rmap: Rmap;
  readonly redirects: RedirectTable;

  /** A VSEG over volume bytes [startBytes, startBytes + lengthBytes); empty rmap and table unless given. */
  constructor(startBytes: number, lengthBytes: number, rmap?: Rmap, redirects?: RedirectTable) {
    checkNonNegInt('startBytes', startBytes);
    if (typeof lengthBytes !== 'number' || !Number.isSafeInteger(lengthBytes) || lengthBytes <= 0) {
      throw new RangeError(`lengthBytes must be a positive safe integer, got ${lengthBytes}`);
    }
    if (!Number.isSafeInteger(startBytes + lengthBytes)) {
      throw new RangeError(`startBytes ${startBytes} + lengthBytes ${lengthBytes} is not a safe integer`);
    }
    if (rmap && rmap.sizeBytes !== lengthBytes) {
      throw new RangeError(`rmap.sizeBytes ${rmap.sizeBytes} must equal lengthBytes ${lengthBytes}`);
    }
    this.startBytes = startBytes;
    this.lengthBytes = lengthBytes;
    this.rmap = rmap ?? new Rmap(lengthBytes);
    this.redirects = redirects ?? new RedirectTable();
  }

  get endBytes(): number {
    return this.startBytes + this.lengthBytes;
  }

  toJSON(): VsegJSON {
    return {
      startBytes: this.startBytes,
      lengthBytes: this.lengthBytes,
      rmap: this.rmap.toJSON(),
      redirects: this.redirects.toJSON(),
    };
  }

  static fromJSON(json: VsegJSON): Vseg {
    assert.ok(json !== null && typeof json === 'object', 'VSEG JSON must be an object');
    const v = new Vseg(json.startBytes, json.lengthBytes, Rmap.fromJSON(json.rmap), RedirectTable.fromJSON(json.redirects));
    v.checkInvariants();
    return v;
  }

  /**
   * Throws (AssertionError) unless the rmap and table are each sound, the rmap spans
   * the VSEG, every extent names a live entry, and no extent starts before its
   * entry's origin (which would give it a negative descriptor offset).
   */
  checkInvariants(): void {
    assert.equal(this.rmap.sizeBytes, this.lengthBytes, `VSEG at ${this.startBytes}: rmap size differs from VSEG length`);
    this.rmap.checkInvariants();
    this.redirects.checkInvariants();
    for (let i = 0; i < this.rmap.count; i++) {
      const r = this.rmap.redirectOf(i);
      assert.ok(this.redirects.has(r), `VSEG at ${this.startBytes}: extent ${i} names redirect ${r}, which is not a live entry`);
      const origin = this.redirects.get(r).originBytes;
      assert.ok(this.rmap.startOf(i) >= origin, `VSEG at ${this.startBytes}: extent ${i} starts at ${this.rmap.startOf(i)}, before its entry's origin ${origin}`);
    }
  }
}

export class VolumeMap {
  #vsegs: Vseg[] = [];

  /** VSEGs must be sorted and contiguous from 0 (RangeError otherwise). */
  constructor(vsegs: Iterable<Vseg> = []) {
    for (const v of vsegs) this.append(v);
  }

  get vsegs(): readonly Vseg[] {
    return this.#vsegs;
  }

  get sizeBytes(): number {
    const n = this.#vsegs.length;
    return n === 0 ? 0 : this.#vsegs[n - 1]!.endBytes;
  }

  /** Index of the VSEG containing offsetBytes (binary search). */
  findVseg(offsetBytes: number): number {
    if (!(offsetBytes >= 0 && offsetBytes < this.sizeBytes) || !Number.isInteger(offsetBytes)) {
      throw new RangeError(`offsetBytes must be an integer in [0, ${this.sizeBytes}), got ${offsetBytes}`);
    }
    const vs = this.#vsegs;
    let lo = 0;
    let hi = vs.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (vs[mid]!.startBytes <= offsetBytes) lo = mid + 1;
      else hi = mid;
    }
    return lo - 1;
  }

  /** Online grow: add `vseg` at the end; it must start at sizeBytes. Returns its index. */
  append(vseg: Vseg): number {
    if (!(vseg instanceof Vseg)) throw new RangeError('vseg must be a Vseg');
    if (vseg.startBytes !== this.sizeBytes) {
      throw new RangeError(`vseg.startBytes ${vseg.startBytes} must equal the volume's sizeBytes ${this.sizeBytes}`);
    }
    this.#vsegs.push(vseg);
    return this.#vsegs.length - 1;
  }

  /**
   * Cut the VSEG containing atBytes into [start, atBytes) and [atBytes, end). Extents
   * crossing atBytes are cut; entries used only right of the cut move to the new
   * right VSEG's table (released on the left), entries used on both sides are copied,
   * entries used by neither stay left. Moved/copied entries get originBytes shifted
   * so every byte keeps its descriptor offset. atBytes must lie strictly inside a
   * VSEG (RangeError otherwise). Returns the index of the right half.
   */
  split(atBytes: number): number {
    const k = this.findVseg(atBytes);
    const v = this.#vsegs[k]!;
    const rel = atBytes - v.startBytes;
    if (rel === 0) throw new RangeError(`atBytes ${atBytes} is already a VSEG boundary`);

    const leftExtents = v.rmap.extentsIn(0, rel).filter((e) => e.redirect !== HOLE);
    const rightExtents = v.rmap.extentsIn(rel, v.lengthBytes - rel).filter((e) => e.redirect !== HOLE);
    const usedLeft = new Set(leftExtents.map((e) => e.redirect));
    const usedRight = [...new Set(rightExtents.map((e) => e.redirect))].sort((a, b) => a - b);

    const leftTable = v.redirects.clone();
    const rightTable = new RedirectTable();
    const renumber = new Map<number, number>();
    for (const r of usedRight) {
      const e = v.redirects.get(r);
      renumber.set(r, rightTable.add({ ...e, originBytes: e.originBytes - rel }));
      if (!usedLeft.has(r)) leftTable.release(r);
    }
    const left = new Vseg(v.startBytes, rel, Rmap.fromExtents(rel, leftExtents), leftTable);
    const right = new Vseg(
      atBytes,
      v.lengthBytes - rel,
      Rmap.fromExtents(
        v.lengthBytes - rel,
        rightExtents.map((e) => ({ startBytes: e.startBytes - rel, lengthBytes: e.lengthBytes, redirect: renumber.get(e.redirect)! })),
      ),
      rightTable,
    );
    this.#vsegs.splice(k, 1, left, right);
    return k + 1;
  }

  /**
   * Join VSEG i and i + 1 into one. The right VSEG's entries join the left's table
   * (originBytes shifted by the left's length); one equal to an entry already there
   * reuses that entry (lowest index), so touching extents that meant the same thing
   * coalesce again and split(x) then merge undoes the split. Returns the merged VSEG.
   */
  merge(i: number): Vseg {
    if (!Number.isInteger(i) || i < 0 || i + 1 >= this.#vsegs.length) {
      throw new RangeError(`i must be a VSEG index in [0, ${this.#vsegs.length - 1}), got ${i}`);
    }
    const l = this.#vsegs[i]!;
    const r = this.#vsegs[i + 1]!;
    const table = l.redirects.clone();
    const renumber = new Map<number, number>();
    for (const [j, e] of r.redirects.entries()) {
      const shifted: RedirectEntry = { ...e, originBytes: e.originBytes + l.lengthBytes };
      const same = table.indexOf(shifted);
      renumber.set(j, same >= 0 ? same : table.add(shifted));
    }
    const extents: RmapExtent[] = l.rmap.extents();
    for (const e of r.rmap.extents()) {
      extents.push({ startBytes: e.startBytes + l.lengthBytes, lengthBytes: e.lengthBytes, redirect: renumber.get(e.redirect)! });
    }
    const length = l.lengthBytes + r.lengthBytes;
    const merged = new Vseg(l.startBytes, length, Rmap.fromExtents(length, extents), table);
    this.#vsegs.splice(i, 2, merged);
    return merged;
  }

  /** What volume byte offsetBytes resolves to, or null when it is in a hole. */
  resolve(offsetBytes: number): Resolved | null {
    const vsegIndex = this.findVseg(offsetBytes);
    const vseg = this.#vsegs[vsegIndex]!;
    const vsegRelativeBytes = offsetBytes - vseg.startBytes;
    const extentIndex = vseg.rmap.lookup(vsegRelativeBytes);
    if (extentIndex < 0) return null;
    const redirectIndex = vseg.rmap.redirectOf(extentIndex);
    const entry = vseg.redirects.get(redirectIndex);
    const extentOffsetBytes = vsegRelativeBytes - vseg.rmap.startOf(extentIndex);
    return {
      vseg,
      vsegIndex,
      extentIndex,
      redirectIndex,
      entry,
      vsegRelativeBytes,
      extentOffsetBytes,
      extentRemainingBytes: vseg.rmap.lengthOf(extentIndex) - extentOffsetBytes,
      relativeBytes: vsegRelativeBytes - entry.originBytes,
    };
  }

  toJSON(): VolumeMapJSON {
    return { vsegs: this.#vsegs.map((v) => v.toJSON()) };
  }

  static fromJSON(json: VolumeMapJSON): VolumeMap {
    assert.ok(json !== null && typeof json === 'object' && Array.isArray(json.vsegs), 'volume map JSON needs a vsegs array');
    const m = new VolumeMap(json.vsegs.map((v) => Vseg.fromJSON(v)));
    m.checkInvariants();
    return m;
  }

  /** Throws (AssertionError) unless VSEGs are contiguous from 0 and each is sound. */
  checkInvariants(): void {
    let pos = 0;
    for (let k = 0; k < this.#vsegs.length; k++) {
      const v = this.#vsegs[k]!;
      assert.equal(v.startBytes, pos, `VSEG ${k} starts at ${v.startBytes}, expected ${pos}`);
      v.checkInvariants();
      pos = v.endBytes;
    }
  }
}
