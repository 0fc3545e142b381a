/**
 * What the engine offers operators: the admin API behind `dve volume …`, `dve disk …`
 * and `dve status`. The node implements it (src/engine/engine.ts); the admin
 * server carries it over HTTP+JSON (src/admin/); the CLI prints it as tables or,
 * with --json, as these objects verbatim.
 */
import type { Endpoint } from '../config/config.js';

export type Layout = 'linear' | 'striped' | 'mirrored' | 'striped-mirrored';
export const LAYOUTS: readonly Layout[] = ['linear', 'striped', 'mirrored', 'striped-mirrored'];

export interface VolumeCreateRequest {
  name: string;
  sizeBytes: number;
  layout: Layout;
  /** Disks to allocate from (default: all online disks). */
  disks?: string[];
  /** Mirror sides (mirrored, striped-mirrored; default 2). */
  copies?: number;
  /** Stripe width (striped, striped-mirrored; default 64 KiB). */
  stripeBytes?: number;
  /** Stripe columns (striped, striped-mirrored; default: as many disks as allowed, at most 4). */
  columns?: number;
  /** Attach a write journal of this size: every write is also appended to it as a record. */
  journalBytes?: number;
}

export interface JournalInfo {
  /** Size of each of the two regions. */
  regionBytes: number;
  usedBytes: number;
  /** The sequence number the next record gets. */
  nextSequence: number;
  recordsInRegion: number;
  swaps: number;
}

export interface FpStatisticsView {
  hits: number;
  faults: Record<string, number>;
  cpDispatched: number;
  pendingUpstream: number;
  pendingDownstream: number;
  cachedMappings: number;
  /** hits / (hits + faults), 1 when idle. */
  fpShare: number;
}

export interface VolumeInfo {
  name: string;
  sizeBytes: number;
  layout: Layout;
  copies: number;
  stripeBytes: number | null;
  columns: number;
  /** Disks holding any of its extents. */
  disks: string[];
  vsegs: number;
  extents: number;
  /** ok; degraded (a mirror side dead); resyncing (a side catching up). */
  state: 'ok' | 'degraded' | 'resyncing';
  /** Where it is exported. */
  uris: string[];
  /** Nodes exporting it (every node in the cluster that is up; `dve status` fills the peers in). */
  nodes?: number[];
  allocatedBytes: number;
  journal: JournalInfo | null;
  fp: FpStatisticsView;
  /** volume, snapshot (read-only, copy-on-write) or clone (writable, redirect-on-write). */
  kind?: 'volume' | 'snapshot' | 'clone';
  /** Snapshot: its origin; clone: its base snapshot. */
  base?: string | null;
  readOnly?: boolean;
  /** Destination disks of a migration in progress, and how far its barrier is. */
  migration?: { to: string[]; doneBytes: number } | null;
  /** Bytes still read from the base (not yet copied into its own storage). */
  sharedBytes?: number;
  createdAt?: string | null;
}

export interface DiskInfo {
  id: string;
  path: string;
  sizeBytes: number;
  blockDevice: boolean;
  state: 'online' | 'offline' | 'failed';
  extentBytes: number;
  extents: number;
  freeExtents: number;
}

export interface TaskInfo {
  id: string;
  kind: 'resync' | 'snapshot-complete' | 'migrate';
  /** What it works on: "disk d2" / "volume v1". */
  target: string;
  state: 'running' | 'done' | 'failed' | 'cancelled';
  doneBytes: number;
  totalBytes: number;
  percent: number;
  rateBytesPerSec: number;
  startedAt: string;
  finishedAt: string | null;
  message: string | null;
}

/** A node as `dve status` shows it. Peers' pid, oplocks and boot come from the peer itself when it answers. */
export interface NodeInfo {
  id: number;
  pid: number | null;
  /** online: this node; joined: a peer up on the mesh; unknown: not heard from yet; down: silent, not yet evicted. */
  state: 'online' | 'booting' | 'joined' | 'unknown' | 'down' | 'evicted';
  nbd: Endpoint;
  admin: Endpoint;
  mesh?: Endpoint;
  startedAt: string | null;
  /** Boot count (the oplock incarnation). */
  boot?: number;
  /** Oplocks this node tracks, by state. */
  oplocks?: Record<string, number>;
  /** Non-volatile oplock records in its journal (held mirror extents, inherited records). */
  journalRecords?: number;
  /** Times this node was evicted, as the reporting node saw. */
  evictions?: number;
}

export interface ClusterInfo {
  /** The node that evicts (lowest id up), as the reporting node sees it. */
  evictor: number;
  quorum: boolean;
  recovery: { reconciledExtents: number; reconciledBytes: number; evictions: number };
  messages: { sent: number; received: number; rejected: number };
  /** Group pauses this node is in. */
  paused: { op: string; volumes: string[]; since: string }[];
}

export interface NodeStatus {
  nodes: NodeInfo[];
  cluster?: ClusterInfo;
  volumes: VolumeInfo[];
  disks: DiskInfo[];
  tasks: TaskInfo[];
  metadata: { path: string; chunkCount: number; chunksUsed: number; chunkBytes: number };
}

export interface VerifyReport {
  volume: string;
  comparedBytes: number;
  /** Ranges where mirror sides differ, with the sides that differ from side 0. */
  mismatches: { offsetBytes: number; lengthBytes: number; sides: number[] }[];
}

/** Typed operating errors with stable codes; the CLI prints the message and exits 1. */
export type AdminErrorCode = 'ENOENT' | 'EEXIST' | 'ENOSPC' | 'EINVAL' | 'EBUSY' | 'EIO';
export class AdminError extends Error {
  constructor(readonly code: AdminErrorCode, message: string) {
    super(message);
  }
}

export interface EngineAdmin {
  status(): NodeStatus | Promise<NodeStatus>;
  listVolumes(): VolumeInfo[];
  showVolume(name: string): VolumeInfo;
  createVolume(req: VolumeCreateRequest): Promise<VolumeInfo>;
  growVolume(name: string, sizeBytes: number): Promise<VolumeInfo>;
  deleteVolume(name: string): Promise<void>;
  listDisks(): DiskInfo[];
  offlineDisk(id: string): Promise<DiskInfo>;
  /** Brings a disk back; resyncs the mirror sides on it as a background task (returned). */
  onlineDisk(id: string): Promise<TaskInfo | null>;
  verifyVolume(name: string): Promise<VerifyReport>;
  /** Snapshots of one or more volumes at one instant (several: a consistency group, I/O paused on every node meanwhile). */
  createSnapshots(pairs: { volume: string; name: string }[], timeoutMs?: number): Promise<VolumeInfo[]>;
  createClone(source: string, name: string): Promise<VolumeInfo>;
  /** Push every unit a snapshot still shares with its origin, in the background. */
  completeSnapshot(name: string): TaskInfo;
  /** Split a VSEG at an offset, or merge VSEG i with the next (metadata only, online). */
  reconfigureVolume(name: string, op: { split: number } | { merge: number }): Promise<VolumeInfo>;
  /** Stop a running background task of this node. */
  cancelTask(id: string): TaskInfo;
  /** Move a volume to other disks online (background task). */
  migrateVolume(name: string, to: string[]): Promise<TaskInfo>;
}
