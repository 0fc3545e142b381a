/**
 * The storage redirect table of one VSEG (seed 004, Fig. 9 / Fig. 14): rmap extents
 * name an index here, and the entry says where the bytes live (the storage
 * descriptor) and what the FP may do with them alone (fault-on-read,
 * fault-on-write), plus the age-list generation of the last write for fast mirror
 * resync. Several extents may name the same entry.
 *
 * ## Where a byte lives
 *
 * A storage descriptor describes a contiguous run of virtual bytes; its offset 0 is
 * VSEG-relative byte `originBytes` of the entry. So the byte at VSEG-relative offset
 * x of an extent naming entry e lives at descriptor-relative offset
 *
 *     x - e.originBytes
 *
 * which is what `src/storage/layout.ts` takes as `relativeBytes` ("relative to the
 * start of the extent the descriptor describes"). For a linear descriptor that is
 * `at.offsetBytes + (x - originBytes)` on `at.disk`.
 *
 * Tying the address to the entry (not to the rmap extent's current start) is what
 * lets the rmap trim, split and coalesce extents freely without moving data: if the
 * CP allocates storage for [100, 200) (originBytes 100) and later maps [100, 150) to
 * another entry, byte 170 still lives at descriptor offset 70. originBytes 0 means
 * the descriptor covers the VSEG from its start (seed 004: "each of the storage
 * descriptors describes storage of the same virtual length as the virtual volume
 * segment being mapped"). It may be negative after a VSEG split (the descriptor
 * starts before the new VSEG does).
 *
 * Entries are stored as frozen deep copies, so `get` hands out the stored object
 * without copying and nobody can change it behind the table's back.
 */
import assert from 'node:assert/strict';
import { isDeepStrictEqual } from 'node:util';

import type { Placement, StorageDescriptor } from './storage-descriptor.js';

// The descriptor union lives in storage-descriptor.ts (shared with
// src/storage/layout.ts and src/fp/api.ts); it is re-exported here so map users
// need only this module.
export type { Placement, StorageDescriptor };

export interface RedirectEntry {
  storage: StorageDescriptor;
  faultOnRead: boolean;
  faultOnWrite: boolean;
  /** Age-list generation of the last write. */
  generation: number;
  /**
   * VSEG-relative byte that the descriptor's offset 0 stands for (see the module
   * comment). Usually the start of the extent the storage was allocated for, or 0
   * for storage covering the whole VSEG. Any safe integer.
   */
  originBytes: number;
}

/** Plain-data form: one slot per index, null for a free slot. */
export interface RedirectTableJSON {
  slots: (RedirectEntry | null)[];
}

const KINDS = new Set(['linear', 'striped', 'mirrored', 'striped-mirrored', 'journal']);

function deepFreeze<T>(o: T): T {
  if (o !== null && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o)) deepFreeze(v);
  }
  return o;
}

/**
 * Shape check of an entry: RangeError naming the offending field. The layout module
 * (validateDescriptor) judges whether a descriptor is sensible; this only makes sure
 * it is one.
 */
export function checkRedirectEntry(entry: RedirectEntry): void {
  if (entry === null || typeof entry !== 'object') throw new RangeError(`entry must be an object, got ${entry}`);
  const s = entry.storage as { kind?: unknown } | null;
  if (s === null || typeof s !== 'object' || !KINDS.has(s.kind as string)) {
    throw new RangeError(`entry.storage must be a storage descriptor, got kind ${s === null || typeof s !== 'object' ? s : String(s.kind)}`);
  }
  if (typeof entry.faultOnRead !== 'boolean') throw new RangeError(`entry.faultOnRead must be a boolean, got ${entry.faultOnRead}`);
  if (typeof entry.faultOnWrite !== 'boolean') throw new RangeError(`entry.faultOnWrite must be a boolean, got ${entry.faultOnWrite}`);
  if (typeof entry.generation !== 'number' || !Number.isSafeInteger(entry.generation) || entry.generation < 0) {
    throw new RangeError(`entry.generation must be a non-negative safe integer, got ${entry.generation}`);
  }
  if (typeof entry.originBytes !== 'number' || !Number.isSafeInteger(entry.originBytes)) {
    throw new RangeError(`entry.originBytes must be a safe integer, got ${entry.originBytes}`);
  }
}

/** Two entries say the same thing (deep equality). */
export function sameEntry(a: RedirectEntry, b: RedirectEntry): boolean {
  return isDeepStrictEqual(a, b);
}

export class RedirectTable {
  #slots: (RedirectEntry | undefined)[] = [];
  /** Free slot indexes, sorted descending, so pop() reuses the lowest. */
  #free: number[] = [];

  /** Number of live entries. */
  get size(): number {
    return this.#slots.length - this.#free.length;
  }

  /** Number of slots, live or free: every live index is below it. */
  get capacity(): number {
    return this.#slots.length;
  }

  /** Store a copy of `entry` in the lowest free slot (or a new one); returns its index. */
  add(entry: RedirectEntry): number {
    const stored = RedirectTable.#freezeCopy(entry);
    const i = this.#free.pop();
    if (i === undefined) {
      this.#slots.push(stored);
      return this.#slots.length - 1;
    }
    this.#slots[i] = stored;
    return i;
  }

  /** Whether `i` is a live index. */
  has(i: number): boolean {
    return Number.isInteger(i) && i >= 0 && i < this.#slots.length && this.#slots[i] !== undefined;
  }

  /** The (frozen) entry at live index `i`. */
  get(i: number): RedirectEntry {
    const e = Number.isInteger(i) && i >= 0 ? this.#slots[i] : undefined;
    if (e === undefined) throw new RangeError(`i must be a live redirect index, got ${i}`);
    return e;
  }

  /** Overwrite live index `i` with a copy of `entry`. */
  replace(i: number, entry: RedirectEntry): void {
    this.get(i);
    this.#slots[i] = RedirectTable.#freezeCopy(entry);
  }

  /** Free live index `i` for reuse. The caller makes sure no extent still names it. */
  release(i: number): void {
    this.get(i);
    this.#slots[i] = undefined;
    // Keep #free sorted descending.
    let k = this.#free.length;
    while (k > 0 && this.#free[k - 1]! < i) k--;
    this.#free.splice(k, 0, i);
  }

  /** Live [index, entry] pairs in index order. */
  *entries(): IterableIterator<[number, RedirectEntry]> {
    for (let i = 0; i < this.#slots.length; i++) {
      const e = this.#slots[i];
      if (e !== undefined) yield [i, e];
    }
  }

  /** Lowest live index whose entry equals `entry`, or -1. */
  indexOf(entry: RedirectEntry): number {
    for (let i = 0; i < this.#slots.length; i++) {
      const e = this.#slots[i];
      if (e !== undefined && sameEntry(e, entry)) return i;
    }
    return -1;
  }

  clone(): RedirectTable {
    const t = new RedirectTable();
    t.#slots = this.#slots.slice(); // entries are frozen: sharing them is safe
    t.#free = this.#free.slice();
    return t;
  }

  toJSON(): RedirectTableJSON {
    return { slots: this.#slots.map((e) => (e === undefined ? null : structuredClone(e))) };
  }

  /** Rebuild from `toJSON` output: same indexes, free slots where the nulls are. */
  static fromJSON(json: RedirectTableJSON): RedirectTable {
    assert.ok(json !== null && typeof json === 'object' && Array.isArray(json.slots), 'redirect table JSON needs a slots array');
    const t = new RedirectTable();
    json.slots.forEach((e, i) => {
      if (e === null) t.#slots.push(undefined);
      else t.#slots.push(RedirectTable.#freezeCopy(e));
      if (e === null) t.#free.push(i);
    });
    t.#free.reverse();
    return t;
  }

  /** Throws (AssertionError) if the free list and the slots disagree or an entry is malformed. */
  checkInvariants(): void {
    const freeSet = new Set(this.#free);
    assert.equal(freeSet.size, this.#free.length, 'redirect table: duplicate free index');
    for (let k = 1; k < this.#free.length; k++) {
      assert.ok(this.#free[k - 1]! > this.#free[k]!, 'redirect table: free list not sorted descending');
    }
    for (let i = 0; i < this.#slots.length; i++) {
      const e = this.#slots[i];
      assert.equal(e === undefined, freeSet.has(i), `redirect table: slot ${i} ${e === undefined ? 'empty but not free' : 'live but on the free list'}`);
      if (e !== undefined) {
        assert.doesNotThrow(() => checkRedirectEntry(e), `redirect table: slot ${i} malformed`);
        assert.ok(Object.isFrozen(e), `redirect table: slot ${i} not frozen`);
      }
    }
    for (const i of this.#free) assert.ok(i >= 0 && i < this.#slots.length, `redirect table: free index ${i} out of range`);
  }

  static #freezeCopy(entry: RedirectEntry): RedirectEntry {
    checkRedirectEntry(entry);
    return deepFreeze(structuredClone(entry));
  }
}
