/**
 * The write-journal primitive (seed 004): every write to a journaled volume is also
 * appended, in order, to a journal region as a self-describing record
 *
 *   magic u32 "DVEJ" | sequence u64 | lba (byte offset) u64 | length u32 | crc32 u32 | data, padded to 512
 *
 * where the crc covers the header (crc field zero) and the data. The FP reserves
 * space synchronously, so record order is sequence order; the write completes when
 * both the data and its record are down. When a record does not fit, the FP faults
 * (JOURNAL_FULL) and the CP swaps in a fresh region: the full one is sealed and
 * handed to whoever consumes journals (replication, later), then recycled.
 *
 * After a crash the head is found by scanning the active region for the longest run
 * of valid records with consecutive sequence numbers: a torn last record fails its
 * crc and is not replayed (its write was never acknowledged).
 */
import { crc32 } from '../meta/chunk-store.js';
import type { Backend, IoDone } from '../storage/backend.js';

export const JOURNAL_MAGIC = 0x44564a4a; // "DVJJ"
export const JOURNAL_HEADER_BYTES = 32;
export const JOURNAL_ALIGN_BYTES = 512;

export interface JournalRegion {
  disk: string;
  offsetBytes: number;
  lengthBytes: number;
}

export interface JournalRecord {
  sequence: number;
  offsetBytes: number;
  lengthBytes: number;
  data: Buffer;
  /** Where the record starts in its region. */
  positionBytes: number;
}

export function recordBytes(dataBytes: number): number {
  return Math.ceil((JOURNAL_HEADER_BYTES + dataBytes) / JOURNAL_ALIGN_BYTES) * JOURNAL_ALIGN_BYTES;
}

/** Encode a record (header + data + zero padding) into one buffer. */
export function encodeRecord(sequence: number, offsetBytes: number, data: Buffer): Buffer {
  const b = Buffer.alloc(recordBytes(data.length));
  b.writeUInt32BE(JOURNAL_MAGIC, 0);
  b.writeBigUInt64BE(BigInt(sequence), 4);
  b.writeBigUInt64BE(BigInt(offsetBytes), 12);
  b.writeUInt32BE(data.length, 20);
  b.writeUInt32BE(0, 24);
  data.copy(b, JOURNAL_HEADER_BYTES);
  b.writeUInt32BE(crc32(data, crc32(b.subarray(0, JOURNAL_HEADER_BYTES))) >>> 0, 24);
  return b;
}

/** Decode the record at the start of `b`, or null if there is none (bad magic, crc, length). */
export function decodeRecord(b: Buffer, positionBytes: number): JournalRecord | null {
  if (b.length < JOURNAL_HEADER_BYTES || b.readUInt32BE(0) !== JOURNAL_MAGIC) return null;
  const length = b.readUInt32BE(20);
  if (JOURNAL_HEADER_BYTES + length > b.length) return null;
  const header = Buffer.from(b.subarray(0, JOURNAL_HEADER_BYTES));
  const crc = header.readUInt32BE(24);
  header.writeUInt32BE(0, 24);
  const data = b.subarray(JOURNAL_HEADER_BYTES, JOURNAL_HEADER_BYTES + length);
  if ((crc32(data, crc32(header)) >>> 0) !== crc) return null;
  return {
    sequence: Number(b.readBigUInt64BE(4)),
    offsetBytes: Number(b.readBigUInt64BE(12)),
    lengthBytes: length,
    data: Buffer.from(data),
    positionBytes,
  };
}

/**
 * Appends records to the active region. `tryAppend` is what the FP calls: it
 * reserves space synchronously and returns false when the record does not fit.
 */
export class JournalWriter {
  private headBytes = 0;
  private nextSequence: number;
  /** Records appended to the active region. */
  records = 0;
  swaps = 0;

  constructor(
    public region: JournalRegion,
    private disk: Backend,
    firstSequence: number,
    headBytes = 0,
  ) {
    this.nextSequence = firstSequence;
    this.headBytes = headBytes;
  }

  get usedBytes(): number {
    return this.headBytes;
  }

  get sequence(): number {
    return this.nextSequence;
  }

  /** Append the record for a write of `data` at `offsetBytes`; false (nothing done) when the region is full. */
  tryAppend(offsetBytes: number, data: Buffer, fua: boolean, done: IoDone): boolean {
    const size = recordBytes(data.length);
    if (this.headBytes + size > this.region.lengthBytes) return false;
    const at = this.region.offsetBytes + this.headBytes;
    this.headBytes += size;
    const rec = encodeRecord(this.nextSequence++, offsetBytes, data);
    this.records++;
    this.disk.write(rec, at, fua, done);
    return true;
  }

  /** Start over in a fresh region; sequence numbers go on. */
  swap(region: JournalRegion, disk: Backend): void {
    this.region = region;
    this.disk = disk;
    this.headBytes = 0;
    this.records = 0;
    this.swaps++;
  }
}

/**
 * Read a region's records in order, stopping at the first invalid one or a break in
 * sequence numbers. Returns the records and the head (where the next record goes).
 */
export async function scanJournal(disk: Backend, region: JournalRegion, firstSequence?: number): Promise<{ records: JournalRecord[]; headBytes: number }> {
  const records: JournalRecord[] = [];
  let pos = 0;
  let expect = firstSequence;
  const header = Buffer.alloc(JOURNAL_HEADER_BYTES);
  while (pos + JOURNAL_HEADER_BYTES <= region.lengthBytes) {
    if ((await read(disk, header, region.offsetBytes + pos)) < 0) break;
    if (header.readUInt32BE(0) !== JOURNAL_MAGIC) break;
    const len = header.readUInt32BE(20);
    const size = recordBytes(len);
    if (pos + size > region.lengthBytes) break;
    const whole = Buffer.alloc(size);
    if ((await read(disk, whole, region.offsetBytes + pos)) < 0) break;
    const rec = decodeRecord(whole, pos);
    if (!rec || (expect !== undefined && rec.sequence !== expect)) break;
    records.push(rec);
    expect = rec.sequence + 1;
    pos += size;
  }
  return { records, headBytes: pos };
}

function read(disk: Backend, buf: Buffer, at: number): Promise<number> {
  return new Promise((r) => disk.read(buf, at, r));
}
