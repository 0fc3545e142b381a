/**
 * The metadata area: fixed-size, checksummed, crash-safe chunks with stable ids.
 *
 * Every piece of engine metadata (disk table, volume table, per-VSEG rmap chunks,
 * redirect tables, age lists, per-node journals) lives in a chunk. The chunk is the
 * unit of update and, later, the unit a cluster oplock covers.
 *
 * On-device layout (all integers little-endian):
 *
 *   0                     superblock copy 0   (one 512-byte sector used of a 4 KiB slot)
 *   4096                  superblock copy 1
 *   8192 (DATA_OFFSET)    chunk 0 copy A, chunk 0 copy B, chunk 1 copy A, …
 *                         each copy is `chunkBytes` long; chunk i copy c starts at
 *                         DATA_OFFSET + (2 * i + c) * chunkBytes
 *
 * Superblock copy (SUPERBLOCK_BYTES = 68):
 *   0  magic "DVEMETA1" (8)   8 version u32   12 copy index u32   16 chunkBytes u32
 *   20 chunkCount u32        24 area uuid (16) 40 checksum algorithm u32 (1 = CRC-32)
 *   44 chunk header bytes u32 48 data offset u64 56 area bytes u64
 *   64 crc u32 over bytes 0..63
 *
 * Chunk copy: a 32-byte header then the payload (msgpackr encoding of the value):
 *   0 magic u32 (bytes "DVEC")   4 chunkId u32   8 generation u64   16 payloadLength u32
 *   20 crc u32 over header bytes 0..19 followed by the payload   24..31 reserved (0)
 *
 * Update protocol (double write): a write goes to the copy that is invalid, or else
 * the one with the older generation, carrying generation = newest valid + 1, and
 * resolves only after `sync()`. The other copy — the newest acknowledged value — is
 * never touched, so at every crash point at least one copy is intact and a read
 * returns the newest valid copy: the last acknowledged value or the one in flight.
 *
 * `format` writes an explicit empty record (generation 0, no payload) into BOTH
 * copies of every chunk, so even a chunk's first write always has an intact copy to
 * fall back on; a torn first write reads as "empty" plus one bad copy, never as
 * corruption. An all-zero copy also reads as empty ("blank").
 *
 * Checksum: CRC-32 (the zlib / IEEE 802.3 polynomial, reflected 0xEDB88320), using
 * `zlib.crc32` when this Node has it and an identical table-driven fallback when it
 * does not, so an area written by one Node version verifies on another. (CRC-32C
 * cannot come from zlib; the algorithm id in the superblock leaves room to change.)
 */
import { randomUUID } from 'node:crypto';
import zlib from 'node:zlib';
import { Packr } from 'msgpackr';

/** A byte region holding a metadata area: a file, a block device region, or a simulation. */
export interface MetaDevice {
  sizeBytes: number;
  /** Fills `buf` entirely from `offsetBytes`. */
  read(buf: Buffer, offsetBytes: number): Promise<void>;
  /** Writes all of `buf` at `offsetBytes` (durable only after `sync()`). */
  write(buf: Buffer, offsetBytes: number): Promise<void>;
  /** Makes every write that completed before this call durable. */
  sync(): Promise<void>;
}

export const SECTOR_BYTES = 512;
export const SUPERBLOCK_MAGIC = 'DVEMETA1';
export const FORMAT_VERSION = 1;
export const SUPERBLOCK_SLOT_BYTES = 4096;
export const SUPERBLOCK_BYTES = 68;
export const DATA_OFFSET = 2 * SUPERBLOCK_SLOT_BYTES;
/** "DVEC" as a little-endian u32. */
export const CHUNK_MAGIC = 0x43455644;
export const CHUNK_HEADER_BYTES = 32;
export const DEFAULT_CHUNK_BYTES = 64 * 1024;
export const MIN_CHUNK_BYTES = SECTOR_BYTES;
export const MAX_CHUNK_BYTES = 1 << 30;
export const CHECKSUM_CRC32 = 1;

// ---------------------------------------------------------------------------------
// CRC-32

let crcTable: Uint32Array | null = null;

/** Table-driven CRC-32 (reflected polynomial 0xEDB88320), same result as zlib.crc32. */
export function crc32Fallback(data: Uint8Array, value = 0): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let crc = (value ^ 0xffffffff) >>> 0;
  for (let i = 0; i < data.length; i++) crc = crcTable[(crc ^ data[i]!) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

const zlibCrc32 = (zlib as { crc32?: (data: Uint8Array, value?: number) => number }).crc32;

/** CRC-32 of `data`, continuing from `value` (0 to start). */
export const crc32: (data: Uint8Array, value?: number) => number =
  typeof zlibCrc32 === 'function' ? (data, value = 0) => zlibCrc32(data, value) >>> 0 : crc32Fallback;

// ---------------------------------------------------------------------------------
// Errors

/** Why a chunk copy did not validate. */
export type CopyFault = 'bad-magic' | 'bad-length' | 'bad-crc' | 'wrong-id';
/** Why a decoded-but-checksummed payload is unusable. */
export type ChunkCorruptReason = CopyFault | 'bad-payload';

/** Neither copy of a chunk is usable (and at least one holds non-zero garbage). */
export class MetadataCorruptError extends Error {
  readonly code = 'EDVE_META_CORRUPT';
  constructor(
    readonly chunkId: number,
    /** The first reason found (copy A's when it is bad, else copy B's). */
    readonly reason: ChunkCorruptReason,
    /** Per copy: the fault, 'blank' (all-zero header), or 'ok' (valid but undecodable). */
    readonly copies: readonly [CopyFault | 'blank' | 'ok', CopyFault | 'blank' | 'ok'],
    detail?: string,
  ) {
    super(
      `metadata chunk ${chunkId} is corrupt: copy A ${copies[0]}, copy B ${copies[1]}` + (detail ? ` (${detail})` : ''),
    );
    this.name = 'MetadataCorruptError';
  }
}

export type SuperblockFault = 'bad-magic' | 'bad-version' | 'corrupt' | 'size-mismatch' | 'copies-disagree' | 'bad-geometry';

/** The superblock cannot be used: not a metadata area, another format version, damaged, or too big for the device. */
export class MetadataSuperblockError extends Error {
  readonly code = 'EDVE_META_SUPERBLOCK';
  constructor(
    readonly reason: SuperblockFault,
    message: string,
  ) {
    super(message);
    this.name = 'MetadataSuperblockError';
  }
}

// ---------------------------------------------------------------------------------
// Superblock

export interface Geometry {
  chunkBytes: number;
  chunkCount: number;
}

export interface FormatOptions {
  /** Bytes per chunk copy, a multiple of 512 (default 64 KiB). */
  chunkBytes?: number;
  /** Number of chunks (default: as many as fit on the device). */
  chunkCount?: number;
  /** Area uuid in canonical 8-4-4-4-12 form (default: random). */
  uuid?: string;
}

interface Superblock extends Geometry {
  uuid: string;
  areaBytes: number;
}

type SuperblockParse =
  | { ok: true; sb: Superblock }
  | { ok: false; fault: 'blank' | 'bad-magic' | 'bad-crc' | 'bad-version'; version?: number };

function uuidToBytes(uuid: string): Buffer {
  const hex = uuid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new TypeError(`metadata area uuid ${JSON.stringify(uuid)} is not a uuid`);
  return Buffer.from(hex, 'hex');
}

function bytesToUuid(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function encodeSuperblock(sb: Superblock, copyIndex: number): Buffer {
  const b = Buffer.alloc(SECTOR_BYTES);
  b.write(SUPERBLOCK_MAGIC, 0, 'latin1');
  b.writeUInt32LE(FORMAT_VERSION, 8);
  b.writeUInt32LE(copyIndex, 12);
  b.writeUInt32LE(sb.chunkBytes, 16);
  b.writeUInt32LE(sb.chunkCount, 20);
  uuidToBytes(sb.uuid).copy(b, 24);
  b.writeUInt32LE(CHECKSUM_CRC32, 40);
  b.writeUInt32LE(CHUNK_HEADER_BYTES, 44);
  b.writeBigUInt64LE(BigInt(DATA_OFFSET), 48);
  b.writeBigUInt64LE(BigInt(sb.areaBytes), 56);
  b.writeUInt32LE(crc32(b.subarray(0, 64)), 64);
  return b;
}

function parseSuperblock(b: Buffer): SuperblockParse {
  if (isAllZero(b, 0, SUPERBLOCK_BYTES)) return { ok: false, fault: 'blank' };
  if (b.toString('latin1', 0, 8) !== SUPERBLOCK_MAGIC) return { ok: false, fault: 'bad-magic' };
  const version = b.readUInt32LE(8);
  // Another version may lay out (and checksum) the rest differently: do not judge it.
  if (version !== FORMAT_VERSION) return { ok: false, fault: 'bad-version', version };
  if (crc32(b.subarray(0, 64)) !== b.readUInt32LE(64)) return { ok: false, fault: 'bad-crc' };
  return {
    ok: true,
    sb: {
      chunkBytes: b.readUInt32LE(16),
      chunkCount: b.readUInt32LE(20),
      uuid: bytesToUuid(b.subarray(24, 40)),
      areaBytes: Number(b.readBigUInt64LE(56)),
    },
  };
}

function checkGeometry(chunkBytes: number, chunkCount: number): string | null {
  if (!Number.isInteger(chunkBytes) || chunkBytes < MIN_CHUNK_BYTES || chunkBytes > MAX_CHUNK_BYTES || chunkBytes % SECTOR_BYTES !== 0) {
    return `chunkBytes ${chunkBytes} must be a multiple of ${SECTOR_BYTES} between ${MIN_CHUNK_BYTES} and ${MAX_CHUNK_BYTES}`;
  }
  if (!Number.isInteger(chunkCount) || chunkCount < 1 || chunkCount > 0xffffffff) {
    return `chunkCount ${chunkCount} must be an integer from 1 to ${0xffffffff}`;
  }
  return null;
}

function isAllZero(b: Buffer, start: number, end: number): boolean {
  for (let i = start; i < end; i++) if (b[i] !== 0) return false;
  return true;
}

// ---------------------------------------------------------------------------------
// Chunk copies

/** What one copy of a chunk holds. */
type CopyState =
  | { kind: 'blank' }
  | { kind: 'bad'; fault: CopyFault }
  | { kind: 'valid'; generation: number; payloadOffset: number; payloadLength: number };

function parseCopy(b: Buffer, start: number, chunkBytes: number, chunkId: number): CopyState {
  if (isAllZero(b, start, start + CHUNK_HEADER_BYTES)) return { kind: 'blank' };
  if (b.readUInt32LE(start) !== CHUNK_MAGIC) return { kind: 'bad', fault: 'bad-magic' };
  const payloadLength = b.readUInt32LE(start + 16);
  if (payloadLength > chunkBytes - CHUNK_HEADER_BYTES) return { kind: 'bad', fault: 'bad-length' };
  let crc = crc32(b.subarray(start, start + 20));
  crc = crc32(b.subarray(start + CHUNK_HEADER_BYTES, start + CHUNK_HEADER_BYTES + payloadLength), crc);
  if (crc !== b.readUInt32LE(start + 20)) return { kind: 'bad', fault: 'bad-crc' };
  if (b.readUInt32LE(start + 4) !== chunkId) return { kind: 'bad', fault: 'wrong-id' };
  const generation = b.readBigUInt64LE(start + 8);
  if (generation > BigInt(Number.MAX_SAFE_INTEGER)) return { kind: 'bad', fault: 'bad-crc' };
  return { kind: 'valid', generation: Number(generation), payloadOffset: start + CHUNK_HEADER_BYTES, payloadLength };
}

/** A copy image: header + payload, padded with zeros to whole sectors. */
function encodeCopy(chunkId: number, generation: number, payload: Uint8Array): Buffer {
  const used = CHUNK_HEADER_BYTES + payload.length;
  const b = Buffer.alloc(Math.ceil(used / SECTOR_BYTES) * SECTOR_BYTES);
  b.writeUInt32LE(CHUNK_MAGIC, 0);
  b.writeUInt32LE(chunkId, 4);
  b.writeBigUInt64LE(BigInt(generation), 8);
  b.writeUInt32LE(payload.length, 16);
  b.set(payload, CHUNK_HEADER_BYTES);
  let crc = crc32(b.subarray(0, 20));
  crc = crc32(b.subarray(CHUNK_HEADER_BYTES, used), crc);
  b.writeUInt32LE(crc, 20);
  return b;
}

function newest(a: CopyState, b: CopyState): 0 | 1 | -1 {
  if (a.kind === 'valid' && b.kind === 'valid') return b.generation > a.generation ? 1 : 0;
  if (a.kind === 'valid') return 0;
  if (b.kind === 'valid') return 1;
  return -1;
}

export type ChunkState = 'empty' | 'ok' | 'one-copy-bad' | 'corrupt';

export interface ChunkScanEntry {
  id: number;
  /** Generation of the newest valid copy (0 when empty or corrupt). */
  generation: number;
  state: ChunkState;
  /** Per copy (A, B): 'ok', 'blank' or the fault. */
  copies: [CopyFault | 'blank' | 'ok', CopyFault | 'blank' | 'ok'];
}

function copyLabel(c: CopyState): CopyFault | 'blank' | 'ok' {
  return c.kind === 'valid' ? 'ok' : c.kind === 'blank' ? 'blank' : c.fault;
}

// ---------------------------------------------------------------------------------
// The store

const packr = new Packr({ useRecords: false });

export class ChunkStore {
  /** Last known state of each chunk's copies (from our own reads and writes). */
  private readonly known = new Map<number, [CopyState, CopyState]>();
  /** Tail of each chunk's operation queue. */
  private readonly tails = new Map<number, Promise<void>>();
  /**
   * Other processes write this area too (a cluster's shared metadata, each chunk under
   * its oplock): what this store remembers of a chunk may be stale, so every write
   * first rereads both copies to find the older one.
   */
  shared = false;

  private constructor(
    readonly device: MetaDevice,
    readonly chunkBytes: number,
    readonly chunkCount: number,
    readonly uuid: string,
    /** 'one-copy-bad' when open() had to fall back to the second superblock copy (or the first was bad). */
    readonly superblockState: 'ok' | 'one-copy-bad',
  ) {}

  /** Payload bytes a chunk can hold. */
  get capacityBytes(): number {
    return this.chunkBytes - CHUNK_HEADER_BYTES;
  }

  /** Bytes of device an area of this geometry occupies. */
  static requiredBytes(chunkBytes: number, chunkCount: number): number {
    return DATA_OFFSET + 2 * chunkBytes * chunkCount;
  }

  /** The most chunks of `chunkBytes` that fit in `sizeBytes` (0 if none). */
  static maxChunkCount(sizeBytes: number, chunkBytes = DEFAULT_CHUNK_BYTES): number {
    return Math.max(0, Math.min(0xffffffff, Math.floor((sizeBytes - DATA_OFFSET) / (2 * chunkBytes))));
  }

  /**
   * Writes a fresh, empty metadata area on `dev` (destroying whatever was there) and
   * returns it open. Crash-safe in the sense that a crash before it resolves leaves
   * no valid superblock (open() then fails with 'bad-magic').
   */
  static async format(dev: MetaDevice, options: FormatOptions = {}): Promise<ChunkStore> {
    const chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    const chunkCount = options.chunkCount ?? ChunkStore.maxChunkCount(dev.sizeBytes, chunkBytes);
    const bad = checkGeometry(chunkBytes, chunkCount);
    if (bad) throw new RangeError(`cannot format metadata area: ${bad}`);
    const areaBytes = ChunkStore.requiredBytes(chunkBytes, chunkCount);
    if (areaBytes > dev.sizeBytes) {
      throw new RangeError(
        `cannot format metadata area: ${chunkCount} chunks of ${chunkBytes} bytes need ${areaBytes} bytes, device has ${dev.sizeBytes}`,
      );
    }
    const uuid = options.uuid ?? randomUUID();
    uuidToBytes(uuid); // validate before touching the device

    // 1. Invalidate the old superblocks so a crash mid-format leaves no area at all.
    const zero = Buffer.alloc(SECTOR_BYTES);
    await Promise.all([dev.write(zero, 0), dev.write(zero, SUPERBLOCK_SLOT_BYTES)]);
    await dev.sync();
    // 2. An empty (generation 0) record in both copies of every chunk.
    const empty = Buffer.alloc(0);
    const BATCH = 64;
    for (let first = 0; first < chunkCount; first += BATCH) {
      const writes: Promise<void>[] = [];
      for (let id = first; id < Math.min(chunkCount, first + BATCH); id++) {
        const rec = encodeCopy(id, 0, empty);
        writes.push(dev.write(rec, DATA_OFFSET + 2 * id * chunkBytes));
        writes.push(dev.write(rec, DATA_OFFSET + (2 * id + 1) * chunkBytes));
      }
      await Promise.all(writes);
    }
    await dev.sync();
    // 3. The superblocks, last.
    const sb: Superblock = { chunkBytes, chunkCount, uuid, areaBytes };
    await dev.write(encodeSuperblock(sb, 0), 0);
    await dev.write(encodeSuperblock(sb, 1), SUPERBLOCK_SLOT_BYTES);
    await dev.sync();
    return new ChunkStore(dev, chunkBytes, chunkCount, uuid, 'ok');
  }

  /** Opens the metadata area on `dev`, validating the superblock. Throws MetadataSuperblockError. */
  static async open(dev: MetaDevice): Promise<ChunkStore> {
    if (dev.sizeBytes < DATA_OFFSET) {
      throw new MetadataSuperblockError(
        'size-mismatch',
        `device of ${dev.sizeBytes} bytes is too small to hold a metadata area (superblocks alone need ${DATA_OFFSET})`,
      );
    }
    const b0 = Buffer.alloc(SECTOR_BYTES);
    const b1 = Buffer.alloc(SECTOR_BYTES);
    await Promise.all([dev.read(b0, 0), dev.read(b1, SUPERBLOCK_SLOT_BYTES)]);
    const p = [parseSuperblock(b0), parseSuperblock(b1)];
    const valid = p.filter((x): x is { ok: true; sb: Superblock } => x.ok);
    let sb: Superblock;
    if (valid.length === 0) {
      const faults = p.map((x) => (x.ok ? 'ok' : x.fault));
      const version = p.find((x) => !x.ok && x.fault === 'bad-version');
      if (version && !version.ok) {
        throw new MetadataSuperblockError(
          'bad-version',
          `metadata area has format version ${version.version}; this dve reads version ${FORMAT_VERSION}`,
        );
      }
      if (faults.includes('bad-crc')) {
        throw new MetadataSuperblockError(
          'corrupt',
          `metadata area superblock is corrupt: both copies fail validation (copy 0 ${faults[0]}, copy 1 ${faults[1]})`,
        );
      }
      throw new MetadataSuperblockError(
        'bad-magic',
        `not a dve metadata area: no ${SUPERBLOCK_MAGIC} superblock (copy 0 ${faults[0]}, copy 1 ${faults[1]})`,
      );
    }
    sb = valid[0]!.sb;
    if (valid.length === 2) {
      const o = valid[1]!.sb;
      if (o.chunkBytes !== sb.chunkBytes || o.chunkCount !== sb.chunkCount || o.uuid !== sb.uuid || o.areaBytes !== sb.areaBytes) {
        throw new MetadataSuperblockError(
          'copies-disagree',
          `metadata area superblock copies disagree (copy 0: uuid ${sb.uuid}, ${sb.chunkCount} × ${sb.chunkBytes} bytes; ` +
            `copy 1: uuid ${o.uuid}, ${o.chunkCount} × ${o.chunkBytes} bytes)`,
        );
      }
    }
    const bad = checkGeometry(sb.chunkBytes, sb.chunkCount);
    if (bad || sb.areaBytes !== ChunkStore.requiredBytes(sb.chunkBytes, sb.chunkCount)) {
      throw new MetadataSuperblockError('bad-geometry', `metadata area superblock has an impossible geometry: ${bad ?? `area bytes ${sb.areaBytes}`}`);
    }
    if (sb.areaBytes > dev.sizeBytes) {
      throw new MetadataSuperblockError(
        'size-mismatch',
        `metadata area ${sb.uuid} needs ${sb.areaBytes} bytes (${sb.chunkCount} chunks of ${sb.chunkBytes}) but the device has only ${dev.sizeBytes}`,
      );
    }
    return new ChunkStore(dev, sb.chunkBytes, sb.chunkCount, sb.uuid, valid.length === 2 ? 'ok' : 'one-copy-bad');
  }

  /** The newest valid value of chunk `id`, or null if it was never written. Throws MetadataCorruptError. */
  async readChunk<T = unknown>(id: number): Promise<T | null> {
    return (await this.readChunkEntry<T>(id)).value;
  }

  /** Like readChunk, with the generation of the copy read (0 when never written). */
  async readChunkEntry<T = unknown>(id: number): Promise<{ value: T | null; generation: number }> {
    this.checkId(id);
    return this.enqueue(id, async () => {
      const { buf, copies } = await this.load(id);
      const which = newest(copies[0], copies[1]);
      if (which < 0) {
        if (copies[0].kind === 'blank' && copies[1].kind === 'blank') return { value: null, generation: 0 };
        throw this.corrupt(id, copies);
      }
      const c = copies[which as 0 | 1] as Extract<CopyState, { kind: 'valid' }>;
      if (c.payloadLength === 0) return { value: null, generation: c.generation };
      try {
        const value = packr.unpack(buf.subarray(c.payloadOffset, c.payloadOffset + c.payloadLength)) as T;
        return { value, generation: c.generation };
      } catch (e) {
        const labels: [CopyFault | 'blank' | 'ok', CopyFault | 'blank' | 'ok'] = [copyLabel(copies[0]), copyLabel(copies[1])];
        throw new MetadataCorruptError(id, 'bad-payload', labels, `copy ${which ? 'B' : 'A'} passes its checksum but does not decode: ${(e as Error).message}`);
      }
    });
  }

  /**
   * Durably replaces chunk `id`'s value (any value msgpackr encodes). Resolves after
   * the device sync. Writes to one chunk run one at a time in call order.
   * Throws RangeError when the encoded value exceeds `capacityBytes`.
   */
  async writeChunk(id: number, value: unknown): Promise<void> {
    this.checkId(id);
    // Encode now (this part runs synchronously at the call), so an oversized value
    // fails fast and a later mutation of `value` cannot leak into the write.
    const payload = Buffer.from(packr.pack(value));
    if (payload.length > this.capacityBytes) {
      throw new RangeError(
        `metadata chunk ${id}: encoded value is ${payload.length} bytes, over the chunk capacity of ${this.capacityBytes} bytes (chunkBytes ${this.chunkBytes})`,
      );
    }
    return this.enqueue(id, async () => {
      let copies = this.shared ? undefined : this.known.get(id);
      if (!copies) copies = (await this.load(id)).copies;
      const [a, b] = copies;
      let target: 0 | 1;
      if (a.kind !== 'valid') target = 0;
      else if (b.kind !== 'valid') target = 1;
      else target = b.generation < a.generation ? 1 : 0;
      const top = Math.max(a.kind === 'valid' ? a.generation : 0, b.kind === 'valid' ? b.generation : 0);
      const generation = top + 1;
      const image = encodeCopy(id, generation, payload);
      // Until the write is known durable, assume the target copy is bad: a failed
      // write leaves it so, and the next write then goes to the same copy again.
      const next: [CopyState, CopyState] = [a, b];
      next[target] = { kind: 'bad', fault: 'bad-crc' };
      this.known.set(id, next);
      await this.device.write(image, this.copyOffset(id, target));
      await this.device.sync();
      next[target] = { kind: 'valid', generation, payloadOffset: CHUNK_HEADER_BYTES, payloadLength: payload.length };
    });
  }

  /** Generation of chunk `id`'s newest valid copy (0 if never written), after queued writes. Throws MetadataCorruptError. */
  async generation(id: number): Promise<number> {
    this.checkId(id);
    return this.enqueue(id, async () => {
      const copies = this.known.get(id) ?? (await this.load(id)).copies;
      const w = newest(copies[0], copies[1]);
      if (w >= 0) return (copies[w as 0 | 1] as Extract<CopyState, { kind: 'valid' }>).generation;
      if (copies[0].kind === 'blank' && copies[1].kind === 'blank') return 0;
      throw this.corrupt(id, copies);
    });
  }

  /** Reads every chunk and reports its health; never throws for a bad chunk. */
  async scan(): Promise<ChunkScanEntry[]> {
    const out: ChunkScanEntry[] = new Array(this.chunkCount);
    const PARALLEL = 16;
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < this.chunkCount) {
        const id = next++;
        out[id] = await this.enqueue(id, async () => {
          const { copies } = await this.load(id);
          return classify(id, copies);
        });
      }
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL, this.chunkCount) }, worker));
    return out;
  }

  /**
   * Forgets what this store knows about chunk `id` (or every chunk), so the next
   * write re-reads both copies. For when another writer may have changed the chunk
   * (e.g. after re-acquiring its oplock).
   */
  invalidate(id?: number): void {
    if (id === undefined) this.known.clear();
    else this.known.delete(id);
  }

  /** Resolves once every operation queued so far has settled. */
  async idle(): Promise<void> {
    while (this.tails.size > 0) await Promise.all([...this.tails.values()]);
  }

  // -------------------------------------------------------------------------------

  private checkId(id: number): void {
    if (!Number.isInteger(id) || id < 0 || id >= this.chunkCount) {
      throw new RangeError(`metadata chunk id ${id} is out of range (the area has chunks 0..${this.chunkCount - 1})`);
    }
  }

  private copyOffset(id: number, copy: 0 | 1): number {
    return DATA_OFFSET + (2 * id + copy) * this.chunkBytes;
  }

  /** Reads both copies (adjacent on the device) with one read. */
  private async load(id: number): Promise<{ buf: Buffer; copies: [CopyState, CopyState] }> {
    const buf = Buffer.alloc(2 * this.chunkBytes);
    await this.device.read(buf, this.copyOffset(id, 0));
    const copies: [CopyState, CopyState] = [
      parseCopy(buf, 0, this.chunkBytes, id),
      parseCopy(buf, this.chunkBytes, this.chunkBytes, id),
    ];
    this.known.set(id, copies);
    return { buf, copies };
  }

  private corrupt(id: number, copies: [CopyState, CopyState]): MetadataCorruptError {
    const first = copies[0].kind === 'bad' ? copies[0] : (copies[1] as Extract<CopyState, { kind: 'bad' }>);
    return new MetadataCorruptError(id, first.fault, [copyLabel(copies[0]), copyLabel(copies[1])]);
  }

  /** Runs `fn` after every earlier operation on chunk `id` has settled. */
  private enqueue<T>(id: number, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(id) ?? Promise.resolve();
    const run = prev.then(fn);
    const tail = run.then(
      () => undefined,
      () => undefined,
    );
    this.tails.set(id, tail);
    void tail.then(() => {
      if (this.tails.get(id) === tail) this.tails.delete(id);
    });
    return run;
  }
}

function classify(id: number, copies: [CopyState, CopyState]): ChunkScanEntry {
  const [a, b] = copies;
  const labels: [CopyFault | 'blank' | 'ok', CopyFault | 'blank' | 'ok'] = [copyLabel(a), copyLabel(b)];
  const w = newest(a, b);
  if (w < 0) {
    const state: ChunkState = a.kind === 'blank' && b.kind === 'blank' ? 'empty' : 'corrupt';
    return { id, generation: 0, state, copies: labels };
  }
  const generation = (copies[w as 0 | 1] as Extract<CopyState, { kind: 'valid' }>).generation;
  if (a.kind === 'bad' || b.kind === 'bad') return { id, generation, state: 'one-copy-bad', copies: labels };
  return { id, generation, state: generation === 0 ? 'empty' : 'ok', copies: labels };
}
