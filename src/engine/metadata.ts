/**
 * How the engine's metadata sits in the metadata area's fixed-size chunks.
 *
 *   chunk 0            root: format version, allocation extent size, the disk table,
 *                      the volume table (name → header chunk), the mirror generation
 *   chunks 1..64       one journal per node id 0..63: boot count, the non-volatile
 *                      oplocks the node holds or inherited (mirror extents it may be
 *                      writing, task sets it runs), and who holds it while cleaning up
 *   header chunk       one per volume: layout, VSEG boundaries, redirect tables,
 *                      stale mirror sides, the age list, and its rmap chunk ids
 *   rmap chunks        the volume's rmap extents cut at fixed RMAP_CHUNK_SPAN_BYTES
 *                      boundaries of volume space (seed 004 Fig. 26): a variable
 *                      extent appears in every chunk it covers, clipped; a cluster
 *                      oplock can then guard each chunk
 *
 * Updates are crash-safe: every chunk is double-written by the chunk store, and a
 * change that touches several chunks writes the volume's chunks first and the root
 * last, so the root (the commit point) never names a chunk that was not written.
 * Chunks no root names are free.
 */
import { Rmap, type RmapJSON } from '../map/rmap.js';
import { RedirectTable, type RedirectTableJSON } from '../map/redirect.js';
import { Vseg, VolumeMap, type VsegJSON } from '../map/vseg.js';
import type { ChunkStore } from '../meta/chunk-store.js';
import type { Layout } from './admin-api.js';
import type { JournalRegion } from '../journal/write-journal.js';

export const METADATA_FORMAT = 2;
export const ROOT_CHUNK = 0;
/** Chunks 1..64: one journal per node id 0..63 (boot count, non-volatile oplock records). */
export const MAX_NODES = 64;
export function nodeJournalChunk(node: number): number {
  return 1 + node;
}
/** Volume headers and rmap chunks start here. */
export const FIRST_VOLUME_CHUNK = 1 + MAX_NODES;
/** Smallest metadata area (in chunks) dve accepts: the node journals and room for volumes. */
export const MIN_CHUNKS = FIRST_VOLUME_CHUNK + 16;
/** Volume space covered by one rmap chunk. */
export const RMAP_CHUNK_SPAN_BYTES = 4 * 1024 ** 3;

export interface RootRecord {
  format: number;
  extentBytes: number;
  /** Bumped each time a mirror side stops taking writes (age-list generation). */
  generation: number;
  disks: { id: string; state: 'online' | 'offline' | 'failed' }[];
  volumes: { name: string; headerChunk: number }[];
}

export interface VolumeHeader {
  name: string;
  sizeBytes: number;
  layout: Layout;
  copies: number;
  stripeBytes: number | null;
  columns: number;
  vsegs: { startBytes: number; lengthBytes: number; redirects: RedirectTableJSON }[];
  rmapChunks: number[];
  /** Disks whose mirror sides missed writes since `sinceGeneration`; `resyncing` once catching up. */
  stale: { disk: string; sinceGeneration: number; resyncing?: boolean }[];
  /**
   * Activity log (like DRBD's): allocation extents of a mirrored volume that may have
   * writes in flight. A write to an extent not in it faults once and the CP adds the
   * extent durably before the write; an idle sweep removes extents after a flush. After
   * a crash, exactly these extents are reconciled from one side to the others.
   */
  active: number[];
  /** Age list: allocation-extent index (of volume space) → generation of the first write after a degradation. */
  age: [number, number][];
  /** The write journal: two regions, the active one, and the sequence number its first record has. */
  journal: JournalState | null;
  /** volume (default), snapshot (read-only, copy-on-write from `base`) or clone (writable, redirect-on-write over `base`). */
  kind?: 'volume' | 'snapshot' | 'clone';
  /** The volume this one reads its shared units from (snapshot: its origin; clone: its base snapshot). */
  base?: string | null;
  /** Bitmap over units (allocation extent x columns) still read from `base`. */
  shared?: Uint8Array | null;
  readOnly?: boolean;
  createdAt?: string;
  /**
   * An online migration in progress (seed 004 Figs. 23-24): the destination storage
   * (a VSEG over the whole volume, allocated up front), and the copy barrier: units
   * below `nextUnit` were copied and switched to the destination; `inProgress` is the
   * unit being copied (read-only meanwhile: writes to it wait for the barrier to move).
   */
  migration?: MigrationState | null;
}

export interface MigrationState {
  to: string[];
  dest: VsegJSON;
  nextUnit: number;
  inProgress: number | null;
  startedAt: string;
  copiedBytes: number;
}

/** Unit indexes set in a bitmap. */
export function bitmapToSet(b: Uint8Array | null | undefined): Set<number> {
  const out = new Set<number>();
  if (!b) return out;
  for (let i = 0; i < b.length; i++) {
    const x = b[i]!;
    if (x === 0) continue;
    for (let k = 0; k < 8; k++) if (x & (1 << k)) out.add(i * 8 + k);
  }
  return out;
}

export function setToBitmap(s: ReadonlySet<number>, units: number): Uint8Array {
  const b = new Uint8Array(Math.ceil(units / 8));
  for (const u of s) if (u < units) b[u >> 3]! |= 1 << (u & 7);
  return b;
}

export interface JournalState {
  regions: JournalRegion[];
  active: number;
  sequenceBase: number;
}

interface RmapChunkRecord {
  volume: string;
  index: number;
  /** [vsegIndex, startBytes (VSEG-relative), lengthBytes, redirect] */
  extents: [number, number, number, number][];
}

/** A volume as the engine holds it in memory. */
export interface VolumeRecord {
  header: Omit<VolumeHeader, 'vsegs' | 'rmapChunks' | 'age'>;
  map: VolumeMap;
  headerChunk: number;
  rmapChunks: number[];
  age: Map<number, number>;
}

export async function readVolume(store: ChunkStore, headerChunk: number): Promise<VolumeRecord> {
  const h = await store.readChunk<VolumeHeader>(headerChunk);
  if (!h) throw new Error(`volume header chunk ${headerChunk} is empty`);
  const rmaps = h.vsegs.map((v) => new Rmap(v.lengthBytes));
  for (const id of h.rmapChunks) {
    const rc = await store.readChunk<RmapChunkRecord>(id);
    if (!rc || rc.volume !== h.name) throw new Error(`rmap chunk ${id} does not belong to volume ${h.name}`);
    for (const [vi, start, len, redirect] of rc.extents) rmaps[vi]!.map(start, len, redirect);
  }
  const map = new VolumeMap(h.vsegs.map((v, i) => new Vseg(v.startBytes, v.lengthBytes, rmaps[i], RedirectTable.fromJSON(v.redirects))));
  map.checkInvariants();
  const { vsegs: _v, rmapChunks, age, ...header } = h;
  header.active ??= [];
  return { header, map, headerChunk, rmapChunks, age: new Map(age) };
}

/** The rmap chunk records for a volume map: extents clipped at RMAP_CHUNK_SPAN_BYTES boundaries. */
export function rmapChunkRecords(name: string, map: VolumeMap): RmapChunkRecord[] {
  const n = Math.max(1, Math.ceil(map.sizeBytes / RMAP_CHUNK_SPAN_BYTES));
  const out: RmapChunkRecord[] = [];
  for (let i = 0; i < n; i++) out.push({ volume: name, index: i, extents: [] });
  map.vsegs.forEach((v, vi) => {
    for (const e of v.rmap.extents()) {
      let pos = v.startBytes + e.startBytes;
      const end = pos + e.lengthBytes;
      while (pos < end) {
        const k = Math.floor(pos / RMAP_CHUNK_SPAN_BYTES);
        const stop = Math.min(end, (k + 1) * RMAP_CHUNK_SPAN_BYTES);
        out[k]!.extents.push([vi, pos - v.startBytes, stop - pos, e.redirect]);
        pos = stop;
      }
    }
  });
  return out;
}

/** Write a volume's rmap chunks and header (not the root). Allocates chunks as needed. */
export async function writeVolume(store: ChunkStore, v: VolumeRecord, allocChunk: () => number): Promise<void> {
  const records = rmapChunkRecords(v.header.name, v.map);
  while (v.rmapChunks.length < records.length) v.rmapChunks.push(allocChunk());
  for (let i = 0; i < records.length; i++) await store.writeChunk(v.rmapChunks[i]!, records[i]);
  await writeVolumeHeader(store, v);
}

/** Write only the header (stale sides, age list) when the maps did not change. */
export async function writeVolumeHeader(store: ChunkStore, v: VolumeRecord): Promise<void> {
  const header: VolumeHeader = {
    ...v.header,
    vsegs: v.map.vsegs.map((s) => ({ startBytes: s.startBytes, lengthBytes: s.lengthBytes, redirects: s.redirects.toJSON() })),
    rmapChunks: v.rmapChunks,
    age: [...v.age.entries()],
  };
  await store.writeChunk(v.headerChunk, header);
}

export type { RmapJSON };
