/**
 * The FP ↔ CP interface (seed 004, "FP API" / "CP API"). The fast path (FP) serves
 * ordinary I/O alone from cached mappings; the control path (CP) is the only writer
 * of metadata. Everything crosses this boundary as plain data and calls on these two
 * interfaces, so an FP could later run in a worker thread with the calls carried by
 * messages.
 *
 * Authority flows down: the CP fills the FP's caches (FPAddMapping) and revokes
 * entries (FPRemoveMapping / FPReplaceMapping) before it changes what they say; after
 * a restrictive change it waits, with FPQueryPendingIOs, until every I/O the FP
 * started before the revocation (by timestamp) has drained. Adding a mapping needs
 * no drain.
 */
import type { StorageDescriptor } from '../map/storage-descriptor.js';

/** Why the FP handed an I/O to the CP. Counted per export. */
export const enum FaultClass {
  /** No cached mapping for the offset. */
  MAPPING_MISS = 0,
  /** The redirect entry says fault-on-read. */
  FAULT_ON_READ = 1,
  /** The redirect entry says fault-on-write. */
  FAULT_ON_WRITE = 2,
  /** The request spans extents, stripes or VSEGs: the CP splits it. */
  SPANS = 3,
  /** A write overlapping an in-flight write through this FP on a mirrored extent. */
  SERIALIZATION = 4,
  /** The write journal is full. */
  JOURNAL_FULL = 5,
  /** A downstream I/O failed. */
  DOWNSTREAM_ERROR = 6,
}
export const FAULT_CLASS_NAMES = [
  'mapping-miss', 'fault-on-read', 'fault-on-write', 'spans', 'serialization', 'journal-full', 'downstream-error',
] as const;

export const enum UpstreamOp { READ = 0, WRITE = 1, FLUSH = 2, TRIM = 3, ZERO = 4 }

/** A cached mapping the CP hands to the FP: one rmap extent and its redirect entry. */
export interface FpMapping {
  /** Volume byte range the mapping covers. */
  startBytes: number;
  lengthBytes: number;
  /**
   * The descriptor offset of `startBytes`: byte x of the volume lives at descriptor
   * offset x - startBytes + relativeStartBytes (an rmap extent may start anywhere
   * inside the storage its redirect entry describes, after trims and splits).
   */
  relativeStartBytes: number;
  /** The redirect entry's identity within the volume (VSEG-qualified). */
  redirectId: number;
  storage: StorageDescriptor;
  faultOnRead: boolean;
  faultOnWrite: boolean;
  /**
   * Mirrored storage: the state of each placement, in placementsOf order (sides, or
   * column-major for striped mirrors). Reads use only live sides; writes go to live
   * and resyncing ones; dead sides get nothing. Absent: all live.
   */
  sideStates?: readonly ('live' | 'dead' | 'resyncing')[];
  /** Per-placement read cost (same order): reads balance round-robin over the live sides of lowest cost. */
  sideCosts?: readonly number[];
}

/** An upstream I/O as the CP sees it when the FP faults or queues it. */
export interface UpstreamIo {
  readonly id: number;
  readonly op: UpstreamOp;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** READ: fill; WRITE: the data. */
  readonly buffer: Buffer | null;
  readonly fua: boolean;
  /** Monotonic time the FP received it (ns, from process.hrtime.bigint as a number of µs). */
  readonly receivedUs: number;
  /** Completes the host's request: 0 or -errno (FPQueueIOComplete). */
  complete(result: number): void;
}

/** What the CP answers to a mapping miss (CpMappingMiss). */
export type MissAnswer =
  | { kind: 'CONTINUE' } // a mapping was added (FPAddMapping); retry the lookup
  | { kind: 'IGNORE'; result: number } // no mapping is valid: complete with this result (e.g. -EIO)
  | { kind: 'QUEUE' }; // the CP does the I/O itself (CpQueueIO)

/** Calls the FP makes on the CP. */
export interface CpApi {
  /** CpMappingMiss: the FP has no mapping for [offset, offset+length) of `volume`. */
  mappingMiss(volume: string, offsetBytes: number, lengthBytes: number): MissAnswer;
  /** CpQueueIO: the CP takes over this upstream I/O and completes it. */
  queueIo(volume: string, io: UpstreamIo, why: FaultClass): void;
  /** A FLUSH found disks whose fdatasync failed: the CP fails them and answers the flush (0 or -errno). */
  flushFailed(volume: string, disks: string[], done: (result: number) => void): void;
}

/** A pending I/O as FPQueryPendingIOs reports it. */
export interface PendingIo {
  id: number;
  op: UpstreamOp;
  offsetBytes: number;
  lengthBytes: number;
  receivedUs: number;
}

/** Calls the CP makes on an FP. */
export interface FpApi {
  /** FPAddMapping: cache a mapping (always safe: no drain needed). */
  addMapping(m: FpMapping): void;
  /** FPReplaceMapping: swap a cached mapping for another covering the same range. */
  replaceMapping(m: FpMapping): void;
  /** FPRemoveMapping: revoke every cached mapping overlapping the range; returns the revocation time (µs). */
  removeMapping(startBytes: number, lengthBytes: number): number;
  /** Revoke everything (a restrictive change to the whole volume). */
  removeAllMappings(): number;
  /** FPQueryPendingIOs: upstream I/Os in flight that started at or before `beforeUs`, overlapping the range when given. */
  queryPendingIos(beforeUs: number, startBytes?: number, lengthBytes?: number): PendingIo[];
  /** Resolves once no I/O received at or before `beforeUs` (overlapping the range) is pending. */
  drain(beforeUs: number, startBytes?: number, lengthBytes?: number): Promise<void>;
  /** FPQueryStatistics. */
  statistics(): FpStatistics;
}

export interface FpStatistics {
  /** Upstream I/Os served by the FP alone. */
  hits: number;
  /** Faults to the CP by class (index = FaultClass). */
  faults: number[];
  /** Upstream I/Os the CP performed itself. */
  cpDispatched: number;
  pendingUpstream: number;
  pendingDownstream: number;
  cachedMappings: number;
}

/** Microseconds on a monotonic clock: timestamps for pending I/O and revocations (no BigInt per request). */
export function nowUs(): number {
  return Math.floor(performance.now() * 1000);
}
