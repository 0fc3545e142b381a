/**
 * The engine of one node: its control path (CP). It owns the metadata (disk and
 * volume tables, VSEGs, rmaps, redirect tables, age lists) and is the only code that
 * writes it; it builds one fast path (FP) per volume, fills its mapping cache on
 * misses (CpMappingMiss), and performs every I/O the FP faults (CpQueueIO): requests
 * that span extents or stripes, writes to extents marked fault-on-write, downstream
 * errors, serialization conflicts.
 *
 * Mirrors. A side stops taking writes when its disk fails (an I/O error) or is taken
 * offline: the CP bumps the generation number, records the disk as stale in each
 * mirrored volume with a side on it, and revokes the FP's mappings. New mappings of
 * such a volume cover one allocation extent each and carry fault-on-write until the
 * extent's age (in the age list) reaches the generation: the first write to each
 * extent faults, the CP records the generation durably, and later writes go through
 * the FP. When the disk comes back, a resync task copies exactly the extents whose
 * age is at least the generation at which the side went stale; host I/O continues,
 * with the side taking writes (resyncing) but no reads until it is complete.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { Config } from '../config/config.js';
import { ExtentAllocator, type Extent as PhysicalExtent } from '../alloc/allocator.js';
import { ChunkStore } from '../meta/chunk-store.js';
import { FileMetaDevice } from '../meta/metadata-area.js';
import { Rmap } from '../map/rmap.js';
import { RedirectTable, type RedirectEntry } from '../map/redirect.js';
import { Vseg, VolumeMap } from '../map/vseg.js';
import type { Placement, StorageDescriptor } from '../map/storage-descriptor.js';
import { mapRange, placementsOf } from '../storage/layout.js';
import type { Backend, IoDone } from '../storage/backend.js';
import { FileBackend } from '../storage/file-backend.js';
import { IoBatchQueue } from '../storage/io-batch.js';
import { FastPath, MAX_FP_JOURNAL_RECORD_BYTES } from '../fp/fast-path.js';
import { JournalWriter, recordBytes, scanJournal, type JournalRegion } from '../journal/write-journal.js';
import { FAULT_CLASS_NAMES, FaultClass, UpstreamOp, type CpApi, type FpMapping, type MissAnswer, type UpstreamIo } from '../fp/api.js';
import { ExportRegistry, NbdExport } from '../../nbd/export.js';
import { HOST_ERRNO } from '../../nbd/errno.js';
import { isPowerOfTwo } from '../util/number.js';
import { formatSize } from '../util/size.js';
import {
  AdminError, LAYOUTS, type DiskInfo, type EngineAdmin, type FpStatisticsView, type Layout, type NodeInfo,
  type NodeStatus, type TaskInfo, type VerifyReport, type VolumeCreateRequest, type VolumeInfo, type JournalInfo,
} from './admin-api.js';
import {
  FIRST_VOLUME_CHUNK, METADATA_FORMAT, MIN_CHUNKS, ROOT_CHUNK, bitmapToSet, nodeJournalChunk, readVolume, setToBitmap, writeVolume, writeVolumeHeader,
  type RootRecord, type VolumeRecord,
} from './metadata.js';
import { Coordinator, type CoordinatorHooks, type JournalStore, type NodeJournal } from '../../cluster/coordinator.js';
import type { Eviction } from '../../cluster/membership.js';
import { nowUs } from '../fp/api.js';
import { maskOf, mirrorSideStateSync, type SyncStartEvent } from '../../cluster/sync-point.js';

const EIO = -HOST_ERRNO.EIO;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const DEFAULT_STRIPE_BYTES = 64 * 1024;
const COPY_CHUNK_BYTES = 1024 * 1024;

type DiskState = 'online' | 'offline' | 'failed';

/** A disk as the engine uses it: the file or device, and a gate that fails I/O while the disk is not online. */
class DiskSlot implements Backend {
  state: DiskState = 'online';
  constructor(readonly id: string, readonly file: FileBackend) {}
  get sizeBytes(): number { return this.file.sizeBytes; }
  get readOnly(): boolean { return false; }
  get capabilities() { return this.file.capabilities; }
  get description(): string { return `disk ${this.id} (${this.file.path})`; }
  private open(done: IoDone): boolean {
    if (this.state === 'online') return true;
    done(EIO);
    return false;
  }
  /** Written since the last successful flush (the health flush makes it durable, or finds the disk broken). */
  dirty = false;
  read(b: Buffer, off: number, done: IoDone): void { if (this.open(done)) this.file.read(b, off, done); }
  write(b: Buffer, off: number, fua: boolean, done: IoDone): void {
    if (!this.open(done)) return;
    this.dirty = true;
    this.file.write(b, off, fua, done);
  }
  flush(done: IoDone): void { if (this.state === 'online') this.file.flush(done); else done(0); }
  trim(off: number, len: number, fua: boolean, done: IoDone): void { if (this.open(done)) this.file.trim(off, len, fua, done); }
  zero(off: number, len: number, o: { noHole: boolean; fastOnly: boolean; fua: boolean }, done: IoDone): void {
    if (this.open(done)) this.file.zero(off, len, o, done);
  }
  cache(off: number, len: number, done: IoDone): void { if (this.open(done)) this.file.cache(off, len, done); }
  extents(off: number, len: number, done: (r: number, e: { lengthBytes: number; zero: boolean; hole: boolean }[]) => void): void {
    done(0, [{ lengthBytes: len, zero: false, hole: false }]);
  }
  close(): Promise<void> { return this.file.close(); }
}

interface Volume extends VolumeRecord {
  fp: FastPath;
  exp: NbdExport;
  /** Allocation extents (volume-space index) being copied by a resync: writes wait. */
  copying: Map<number, Promise<void>>;
  /** Disks whose stale sides are catching up (take writes, give no reads). */
  resyncing: Set<string>;
  journal: JournalWriter | null;
  /** A journal swap in progress: writes that found the journal full wait for it. */
  swapping: Promise<void> | null;
  /** Mirror extents whose mirror-write oplock this node holds (the activity log is the node journal's records of them). */
  activeSet: Set<number>;
  /** Extents being added to the activity log: not durable yet, writes wait. */
  activePending: Map<number, Promise<void>>;
  /** Bumped on every CP-seen write to an active extent: the sweep removes only untouched ones. */
  activeEpoch: Map<number, number>;
  /** Active extents the sweep is about to remove: mapped fault-on-write meanwhile. */
  closing: Set<number>;
  /** Held extents a peer asked for: being given up (writes wait, then reacquire). */
  releasing: Map<number, Promise<void>>;
  /** When this node last gave an extent up to a peer (it waits a moment before asking again). */
  yielded: Map<number, number>;
  sweeping: boolean;
  /** The cached header and maps may be used (this node shares the header oplock and read them since). */
  valid: boolean;
  /** Paused by a group operation (count of pauses in force). */
  paused: number;
  /** Woken when the volume becomes valid or unpaused. */
  wakers: (() => void)[];
  /** Detached (deleted, here or by another node). */
  gone: boolean;
  /** Bumped by every restrictive revoke of its header oplock: a reread that raced with one is not trusted. */
  revokes: number;
  /**
   * Volumes with a write journal: this node holds the journal oplock (one appender at
   * a time cluster-wide; held until a peer asks), and its writer is positioned after
   * the last record any node appended.
   */
  jnlHeld: boolean;
  jnlPending: Promise<void> | null;
  jnlReleasing: Promise<void> | null;
  /** Snapshots and clones: units still read from the base (header.shared in memory). */
  sharedSet: Set<number>;
  /** Units being materialized (copied from the base) by this node. */
  materializing: Map<number, Promise<void>>;
}

/** After giving a mirror extent to a peer, wait this long before asking for it again. */
const YIELD_MS = 25;
/** Idle sweep of the activity log, and the health flush of written disks. */
const ACTIVITY_SWEEP_MS = Number(process.env.DVE_ACTIVITY_SWEEP_MS ?? 10_000);
const HEALTH_FLUSH_MS = Number(process.env.DVE_HEALTH_FLUSH_MS ?? 2_000);

function isMirrored(layout: Layout): boolean {
  return layout === 'mirrored' || layout === 'striped-mirrored';
}

/** Oplock ids (seed 004: guid.luid[index]). The volume guid is its header chunk, stable for its life. */
export const ROOT_LOCK = 'dve.root[0]';
function hdrLock(v: { headerChunk: number }): string {
  return `vol${v.headerChunk}.hdr[0]`;
}
/** The migration task set of a volume: held (non-volatile) by the node running it. */
function migLock(v: { headerChunk: number }): string {
  return `vol${v.headerChunk}.mig[0]`;
}
/** A snapshot's completion task set (non-volatile: resumed by the node that evicts its runner). */
function cplLock(v: { headerChunk: number }): string {
  return `vol${v.headerChunk}.cpl[0]`;
}
/** The resync task set of disk number i (in configuration order). */
function rsyLock(i: number): string {
  return `dve.rsy[${i}]`;
}
/** The write journal of a volume: one appender at a time. */
function jnlLock(v: { headerChunk: number }): string {
  return `vol${v.headerChunk}.jnl[0]`;
}
/** Mirror-write serialization: one non-volatile oplock per allocation extent of a mirrored volume. */
function mwLock(v: { headerChunk: number }, e: number): string {
  return `vol${v.headerChunk}.mw[${e}]`;
}
function parseVolumeLock(lock: string): { headerChunk: number; kind: string; index: number } | null {
  const m = /^vol(\d+)\.([a-z]+)\[(\d+)\]$/.exec(lock);
  return m ? { headerChunk: Number(m[1]), kind: m[2]!, index: Number(m[3]) } : null;
}

interface Task {
  info: TaskInfo;
  cancelled: boolean;
}

export interface EngineOptions {
  config: Config;
  nodeId: number;
  log: Logger;
  queue?: IoBatchQueue;
  /**
   * The node's cluster coordinator (mesh, oplocks, membership), not yet booted: the
   * engine boots it (journal, replay) and joins. Without one the engine runs alone
   * with a local coordinator (no peers: every oplock is uncontended).
   */
  cluster?: (journals: JournalStore) => Coordinator;
}

/** Counters of cluster recovery work, for status and tests. */
export interface RecoveryStats {
  /** Extents of dead owners (or of this node's previous run) reconciled, and the bytes copied. */
  reconciledExtents: number;
  reconciledBytes: number;
  evictions: number;
}

export class Engine implements EngineAdmin, CpApi, CoordinatorHooks {
  readonly exports = new ExportRegistry();
  cluster!: Coordinator;
  readonly nodeId: number;
  readonly recovery: RecoveryStats = { reconciledExtents: 0, reconciledBytes: 0, evictions: 0 };
  /** The cached root (disk table, volume table) may be used. */
  private rootValid = false;
  /** Bumped by every restrictive revoke of the root oplock. */
  private rootRevokes = 0;
  /** Called when the cluster evicted this node: the node stops serving. */
  onSelfEvicted: () => void = () => {};
  /**
   * Group atomic operation: pause I/O to `volumes` on every live node (a synchronization
   * point), run fn, resume everywhere. The node wires the cluster version; alone, this one.
   */
  groupPause: <T>(volumes: string[], timeoutMs: number, fn: () => Promise<T>) => Promise<T> = async (volumes, _timeoutMs, fn) => {
    await this.pauseVolumes(volumes);
    try {
      return await fn();
    } finally {
      this.resumeVolumes(volumes);
    }
  };
  /**
   * Run a synchronization point with the live nodes (wired by the node; alone, it
   * passes at once). Used when a mirror side changes state: every node that reread the
   * header reports the new state at the point, so the node that made the change knows
   * when all of them switched (or which did not, on timeout).
   */
  syncPoint: (e: SyncStartEvent) => Promise<{ state: 'passed' | 'timed-out'; waitingFor: number[] }> = async () => ({ state: 'passed', waitingFor: [] });
  /** Group pauses in force on this node (for status). */
  pausedOps: () => { op: string; volumes: string[]; since: string }[] = () => [];
  private readonly volumes = new Map<string, Volume>();
  private readonly tasks: Task[] = [];
  private serial: Promise<unknown> = Promise.resolve();
  /** NBD URIs the node serves (set by the node once it listens). */
  uriBases: string[] = [];
  nodeInfo: NodeInfo | null = null;
  private readonly readCost = new Map<string, number>();
  private readonly timers: NodeJS.Timeout[] = [];
  /** Called when a volume goes away, so its connections can be closed. */
  onVolumeRemoved: (name: string) => void = () => {};

  private constructor(
    private readonly config: Config,
    private readonly log: Logger,
    private readonly disks: Map<string, DiskSlot>,
    private readonly store: ChunkStore,
    private readonly metaDevice: FileMetaDevice,
    private root: RootRecord,
    private allocator: ExtentAllocator,
    nodeId: number,
  ) {
    this.nodeId = nodeId;
  }

  // ── start-up ─────────────────────────────────────────────────────────────
  /**
   * Open the disks and the shared metadata area, boot the cluster coordinator (seed
   * 004's boot steps: take this node's journal, replay what it records, join), then
   * share the root and every volume header and read them.
   */
  static async open(o: EngineOptions): Promise<Engine> {
    const queue = o.queue ?? new IoBatchQueue();
    const disks = new Map<string, DiskSlot>();
    let dev: FileMetaDevice | null = null;
    let engine: Engine | null = null;
    try {
      for (const d of o.config.disks) {
        // The configured size creates a missing file and grows a smaller one (another node
        // may have created it an instant ago and not sized it yet).
        const file = FileBackend.open(d.path, { createSizeBytes: d.sizeBytes, queue });
        disks.set(d.id, new DiskSlot(d.id, file));
      }
      const opened = await openMetadataArea(o.config, o.log);
      dev = opened.dev;
      engine = await Engine.load(o, disks, dev, opened.store);
      return engine;
    } catch (e) {
      // Nothing half-open is left behind: close what was opened, then report.
      if (engine) await engine.cluster?.stop().catch(() => {});
      for (const d of disks.values()) await d.close().catch(() => {});
      await dev?.close().catch(() => {});
      throw e;
    }
  }

  private static async load(o: EngineOptions, disks: Map<string, DiskSlot>, dev: FileMetaDevice, store: ChunkStore): Promise<Engine> {
    const { config, log } = o;
    if (store.chunkCount < MIN_CHUNKS) {
      throw new Error(`metadata area ${config.metadata.path} has ${store.chunkCount} chunks; dve needs at least ${MIN_CHUNKS} (64 are node journals): make metadata.size larger`);
    }
    const root = await store.readChunk<RootRecord>(ROOT_CHUNK);
    if (!root) throw new Error(`metadata area ${config.metadata.path} has no root record`);
    if (root.format !== METADATA_FORMAT) throw new Error(`metadata format ${root.format} is not supported (this dve reads ${METADATA_FORMAT}); move the old state directory away`);
    for (const d of root.disks) {
      if (!disks.has(d.id)) throw new Error(`metadata names disk ${d.id}, which the configuration does not list`);
      disks.get(d.id)!.state = d.state;
    }
    const engine = new Engine(config, log, disks, store, dev, root, new ExtentAllocator([], root.extentBytes), o.nodeId);
    for (const d of config.disks) engine.readCost.set(d.id, d.readCost ?? 1);
    const journals = engine.journalStore();
    engine.cluster = o.cluster ? o.cluster(journals) : new Coordinator({ nodeId: o.nodeId, peers: [], mesh: null, journals, log });
    engine.cluster.hooks = engine;
    // Boot steps 1-4: this node's journal (and whatever it inherited), replayed against
    // the volumes as the media hold them, before the node answers any oplock request.
    for (const v of root.volumes) engine.attach(await readVolume(store, v.headerChunk), null, false);
    const boot = await engine.cluster.bootJournal();
    if (boot.records.length > 0) {
      for (const lock of boot.records) await engine.replayRecord(lock, 'replayed from this node\'s journal');
      log.info({ records: boot.records.length, reconciledBytes: engine.recovery.reconciledBytes }, 'journal replayed');
    }
    await engine.cluster.replayed(boot.records);
    // Steps 6-7: open for business; then share the root and the volumes and read them.
    engine.cluster.start();
    await engine.joinCluster();
    engine.startTimers();
    log.info({ volumes: engine.volumes.size, disks: disks.size, generation: engine.root.generation, boot: boot.boot }, 'engine ready');
    for (const v of engine.volumes.values()) {
      for (const s of v.header.stale) {
        if (engine.disks.get(s.disk)?.state === 'online') engine.startResync(s.disk);
      }
    }
    return engine;
  }

  /** This node's and its peers' journals: fixed chunks of the shared metadata area. */
  private journalStore(): JournalStore {
    return {
      read: async (node) => (await this.store.readChunk<NodeJournal>(nodeJournalChunk(node))) ?? { node, boot: 0, records: [], heldBy: null },
      write: (j) => this.store.writeChunk(nodeJournalChunk(j.node), j),
    };
  }

  /** Share the root, read it (volumes, disks), add disks the configuration names that the table lacks. */
  private async joinCluster(): Promise<void> {
    const gen = this.rootRevokes;
    await this.cluster.share(ROOT_LOCK);
    await this.reloadRoot();
    if (this.rootRevokes !== gen) this.rootValid = false; // the revoke's reshare rereads
    for (const v of this.volumes.values()) {
      if (v.valid) continue;
      if (!v.journal && v.header.journal) v.journal = v.fp.journal = await this.openJournal(v);
      void this.reshareVolume(v);
    }
    const missing = [...this.disks.keys()].filter((id) => !this.root.disks.some((d) => d.id === id));
    if (missing.length > 0) {
      await this.withRoot(async () => {
        for (const id of missing) if (!this.root.disks.some((d) => d.id === id)) this.root.disks.push({ id, state: 'online' });
        await this.store.writeChunk(ROOT_CHUNK, this.root);
      });
      this.log.info({ disks: missing }, 'disks added to the disk table');
    }
    await Promise.all([...this.volumes.values()].map((v) => this.whenUsable(v)));
  }

  async close(): Promise<void> {
    for (const t of this.timers) clearInterval(t);
    for (const t of this.tasks) t.cancelled = true;
    await this.exclusive(async () => {});
    await this.cluster.stop();
    for (const v of this.volumes.values()) await v.fp.close();
    for (const d of this.disks.values()) await d.close();
    await this.metaDevice.close();
  }

  /** Serialize metadata changes: one at a time, in order. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.serial.then(fn, fn);
    this.serial = run.catch(() => {});
    return run;
  }

  private attach(rec: VolumeRecord, journal: JournalWriter | null = null, valid = true): Volume {
    const fp = new FastPath(rec.header.name, rec.header.sizeBytes, this, this.disks);
    fp.journal = journal;
    fp.readOnly = rec.header.readOnly ?? false;
    const exp = new NbdExport(rec.header.name, fp, `dve ${rec.header.layout} volume ${rec.header.name}`);
    const v: Volume = {
      ...rec, fp, exp, copying: new Map(), resyncing: new Set(rec.header.stale.filter((x) => x.resyncing).map((x) => x.disk)), journal, swapping: null,
      activeSet: new Set(), activePending: new Map(), activeEpoch: new Map(), closing: new Set(), releasing: new Map(), yielded: new Map(), sweeping: false,
      valid, paused: 0, wakers: [], gone: false, revokes: 0, jnlHeld: false, jnlPending: null, jnlReleasing: null,
      sharedSet: bitmapToSet(rec.header.shared), materializing: new Map(),
    };
    this.volumes.set(rec.header.name, v);
    this.exports.add(exp);
    return v;
  }

  // ── cluster coherence (seed 004 oplocks) ─────────────────────────────────
  /*
   * Every node shares the root oplock (disk table, volume table) and the header oplock
   * of every volume (header, VSEGs, rmap chunks, age list) while it serves from them.
   * A change takes the root and/or header oplocks restrictively, rereads what it
   * changes from media, writes it back, and releases: the other nodes' CPs were told to
   * revoke (FP entries removed, I/O in flight drained, volume marked not usable) before
   * the update, and share again and reread after it, so no node serves I/O from a
   * mapping the update changed. I/O that arrives meanwhile waits in the CP, parked (it
   * uses no mapping, so no drain waits for it).
   */

  /** Take the root oplock (and then the given volumes' header oplocks), reread, run fn, release. */
  private async withRoot<T>(fn: () => Promise<T>, volumes: Volume[] = []): Promise<T> {
    return this.cluster.withAcquired(ROOT_LOCK, { restrictive: true }, async () => {
      await this.reloadRoot();
      return this.withVolumes(volumes.filter((v) => !v.gone), true, fn);
    });
  }

  /** Take the volumes' header oplocks (in header-chunk order), reread each, run fn, release. */
  private async withVolumes<T>(volumes: Volume[], restrictive: boolean, fn: () => Promise<T>): Promise<T> {
    const sorted = [...volumes].sort((a, b) => a.headerChunk - b.headerChunk);
    const step = async (i: number): Promise<T> => {
      if (i === sorted.length) return fn();
      const v = sorted[i]!;
      return this.cluster.withAcquired(hdrLock(v), { restrictive }, async () => {
        await this.reloadVolume(v);
        return step(i + 1);
      });
    };
    return step(0);
  }

  private rootReloads: Promise<void> = Promise.resolve();
  /** Chunks the volume table uses, as of the last reread of the root. */
  private chunksInUse = new Set<number>();

  /** Reread the root: disk states, generation, and the volume set (attach new volumes, detach deleted ones). */
  private reloadRoot(): Promise<void> {
    const run = this.rootReloads.then(() => this.reloadRootNow());
    this.rootReloads = run.catch(() => {});
    return run;
  }

  private async reloadRootNow(): Promise<void> {
    const root = await this.store.readChunk<RootRecord>(ROOT_CHUNK);
    if (!root) throw new Error('the metadata root record vanished');
    this.root = root;
    for (const d of root.disks) {
      const slot = this.disks.get(d.id);
      if (!slot) {
        this.log.error({ disk: d.id }, 'the disk table names a disk this node\'s configuration lacks');
        continue;
      }
      if (slot.state !== d.state) {
        this.log.info({ disk: d.id, from: slot.state, to: d.state }, 'disk state changed by the cluster');
        slot.state = d.state;
      }
    }
    for (const entry of root.volumes) {
      const have = this.volumes.get(entry.name);
      if (have && have.headerChunk === entry.headerChunk) continue;
      if (have) this.detach(have);
      const v = this.attach(await readVolume(this.store, entry.headerChunk), null, false);
      v.journal = v.fp.journal = await this.openJournal(v);
      void this.reshareVolume(v);
    }
    for (const v of [...this.volumes.values()]) if (!root.volumes.some((e) => e.name === v.header.name && e.headerChunk === v.headerChunk)) this.detach(v);
    this.rootValid = true;
    // Allocation state follows the volume table (another node may have allocated).
    const allocator = new ExtentAllocator([...this.disks.values()].map((d) => ({ id: d.id, sizeBytes: d.sizeBytes, reservedBytes: 0 })), root.extentBytes);
    const chunks = new Set<number>([ROOT_CHUNK]);
    for (const entry of root.volumes) {
      const v = this.volumes.get(entry.name)!;
      const rec = v.valid ? v : await readVolume(this.store, entry.headerChunk);
      allocator.markUsed(this.recordExtents(rec));
      chunks.add(entry.headerChunk);
      for (const c of rec.rmapChunks) chunks.add(c);
    }
    this.allocator = allocator;
    this.chunksInUse = chunks;
  }

  /** Reread a volume's header and maps from media into the attached volume. */
  private async reloadVolume(v: Volume): Promise<void> {
    const rec = await readVolume(this.store, v.headerChunk);
    for (const st of rec.header.stale) {
      if (!v.header.stale.some((x) => x.disk === st.disk && x.sinceGeneration === st.sinceGeneration)) this.reportSideState(v, st.disk, st.sinceGeneration);
    }
    v.header = rec.header;
    v.map = rec.map;
    v.rmapChunks = rec.rmapChunks;
    v.age = rec.age;
    v.fp.sizeBytes = rec.header.sizeBytes;
    v.resyncing = new Set(rec.header.stale.filter((x) => x.resyncing).map((x) => x.disk));
    v.sharedSet = bitmapToSet(rec.header.shared);
    // Mappings cached from the old copy may point where the new one does not.
    v.fp.removeAllMappings();
  }

  /** Share the volume's header oplock again (granted once any writer released it), reread, serve. */
  private async reshareVolume(v: Volume): Promise<void> {
    try {
      const gen = v.revokes;
      await this.cluster.share(hdrLock(v));
      if (v.gone || v.revokes !== gen) return; // revoked again meanwhile: that revoke's reshare serves
      await this.reloadVolume(v);
      // A revoke that came while we reread may have let a writer change what we read.
      if (v.revokes !== gen) return;
      v.valid = true;
      this.wake(v);
    } catch (err) {
      if (!v.gone) this.log.error({ volume: v.header.name, err: (err as Error).message }, 'rereading a volume after a revoke failed');
    }
  }

  private async reshareRoot(): Promise<void> {
    try {
      const gen = this.rootRevokes;
      await this.cluster.share(ROOT_LOCK);
      if (this.rootRevokes !== gen) return;
      await this.reloadRoot();
      if (this.rootRevokes !== gen) {
        this.rootValid = false; // revoked while rereading: the next reshare rereads again
        return;
      }
      for (const v of this.volumes.values()) {
        if (!v.valid && !v.gone) void this.reshareVolume(v);
        else this.wake(v); // I/O parked for the root only
      }
    } catch (err) {
      this.log.error({ err: (err as Error).message }, 'rereading the root after a revoke failed');
    }
  }

  private detach(v: Volume): void {
    if (v.gone) return;
    v.gone = true;
    v.valid = false;
    this.volumes.delete(v.header.name);
    this.exports.remove(v.header.name);
    this.onVolumeRemoved(v.header.name);
    v.fp.removeAllMappings();
    for (const e of v.activeSet) this.cluster.unhold(mwLock(v, e));
    v.activeSet.clear();
    if (v.jnlHeld) this.cluster.unhold(jnlLock(v));
    v.jnlHeld = false;
    this.cluster.unshare(hdrLock(v));
    this.wake(v);
    this.log.info({ volume: v.header.name }, 'volume detached');
  }

  private wake(v: Volume): void {
    for (const w of v.wakers.splice(0)) w();
  }

  private usableNow(v: Volume): boolean {
    return v.valid && v.paused === 0 && this.rootValid;
  }

  /** Resolves once the volume may be served (valid, not paused), or rejects when it is gone. */
  private async whenUsable(v: Volume): Promise<void> {
    while (!this.usableNow(v)) {
      if (v.gone) throw new AdminError('ENOENT', `volume ${v.header.name} was deleted`);
      await new Promise<void>((r) => v.wakers.push(r));
    }
  }

  /** Oplock hook: a peer's restrictive acquire (or a flush request) of something this node caches. */
  async revoke(lock: string, r: { restrictive: boolean; flush: boolean }): Promise<void> {
    if (!r.restrictive) return; // no dirty metadata journal: updates are on media before release
    if (lock === ROOT_LOCK) {
      this.rootValid = false;
      this.rootRevokes++;
      const waits: Promise<void>[] = [];
      for (const v of this.volumes.values()) waits.push(v.fp.drain(v.fp.removeAllMappings()));
      await Promise.all(waits);
      return;
    }
    const p = parseVolumeLock(lock);
    const v = p && this.volumeByHeader(p.headerChunk);
    if (!p || !v) return;
    if (p.kind === 'hdr') {
      v.valid = false;
      v.revokes++;
      await v.fp.drain(v.fp.removeAllMappings());
    } else if (p.kind === 'mw') {
      const E = this.root.extentBytes;
      await v.fp.drain(v.fp.removeMapping(p.index * E, E), p.index * E, E);
    }
  }

  /** Oplock hook: after a restrictive revoke, share again (the grant waits for the writer's release). */
  afterRevoke(lock: string): void {
    if (lock === ROOT_LOCK) {
      void this.reshareRoot();
      return;
    }
    const p = parseVolumeLock(lock);
    const v = p && this.volumeByHeader(p.headerChunk);
    if (p?.kind === 'hdr' && v && !v.gone) void this.reshareVolume(v);
  }

  /** Oplock hook: a peer wants a mirror extent this node holds: give it up once its writes drained. */
  wanted(lock: string): void {
    const p = parseVolumeLock(lock);
    const v = p && this.volumeByHeader(p.headerChunk);
    if (p?.kind === 'jnl' && v && v.jnlHeld && !v.jnlReleasing) {
      v.jnlReleasing = (async () => {
        const revokedAt = v.fp.removeAllMappings();
        await v.fp.drain(revokedAt);
        if (v.swapping) await v.swapping;
        v.jnlHeld = false;
        this.cluster.unhold(jnlLock(v));
      })().catch((err: Error) => this.log.error({ volume: v.header.name, err: err.message }, 'giving up the journal failed'))
        .finally(() => (v.jnlReleasing = null));
      return;
    }
    if (!p || !v || p.kind !== 'mw' || !v.activeSet.has(p.index) || v.releasing.has(p.index)) return;
    const e = p.index;
    const E = this.root.extentBytes;
    const done = (async () => {
      const revokedAt = v.fp.removeMapping(e * E, E);
      await v.fp.drain(revokedAt, e * E, E);
      // No flush: the peer records the extent in its journal before it writes, so a
      // crash from here on leaves the extent in some journal, and it is reconciled.
      v.activeSet.delete(e);
      v.closing.delete(e);
      v.activeEpoch.delete(e);
      v.yielded.set(e, Date.now());
      this.cluster.unhold(mwLock(v, e));
    })().catch((err: Error) => this.log.error({ volume: v.header.name, extent: e, err: err.message }, 'giving up a mirror extent failed'))
      .finally(() => v.releasing.delete(e));
    v.releasing.set(e, done);
  }

  /** Oplock hook: this node inherited a dead owner's record: replay it (then the coordinator releases it). */
  async cleanup(lock: string): Promise<void> {
    await this.replayRecord(lock, 'inherited from an evicted node');
  }

  selfEvicted(): void {
    for (const v of this.volumes.values()) {
      v.valid = false;
      v.fp.removeAllMappings();
    }
    this.onSelfEvicted();
  }

  evicted(e: Eviction): void {
    this.recovery.evictions++;
    this.log.warn({ node: e.node, cleaner: e.cleaner, records: e.records.length, mine: e.cleaner === this.nodeId }, 'peer evicted');
  }

  /**
   * Replay one non-volatile record: a mirror-write oplock means writes may have reached
   * some sides of that extent only, so copy it from one live side to the others (seed
   * 004's fast reconciliation). Writes to the extent through this node wait meanwhile.
   */
  private async replayRecord(lock: string, why: string): Promise<void> {
    const rsy = /^dve\.rsy\[(\d+)\]$/.exec(lock);
    if (rsy) {
      const disk = [...this.disks.keys()][Number(rsy[1])];
      if (disk && this.disks.get(disk)!.state === 'online') {
        this.log.warn({ disk, why }, 'resuming a resync');
        this.startResync(disk);
      }
      return;
    }
    const p = parseVolumeLock(lock);
    const v = p && this.volumeByHeader(p.headerChunk);
    if (p?.kind === 'cpl' && v) {
      const fresh = await readVolume(this.store, v.headerChunk);
      if (bitmapToSet(fresh.header.shared).size > 0) {
        this.log.warn({ snapshot: v.header.name, why }, 'resuming a snapshot completion');
        v.sharedSet = bitmapToSet(fresh.header.shared);
        this.completeSnapshot(v.header.name);
      }
      return;
    }
    if (p?.kind === 'mig' && v) {
      // A migration task set whose node died: resume it from the recorded barrier.
      const fresh = await readVolume(this.store, v.headerChunk);
      if (fresh.header.migration) {
        v.header.migration = fresh.header.migration;
        this.log.warn({ volume: v.header.name, nextUnit: fresh.header.migration.nextUnit, why }, 'resuming a migration');
        this.runMigration(v);
      }
      return;
    }
    if (!p || !v || p.kind !== 'mw' || !isMirrored(v.header.layout)) return;
    const E = this.root.extentBytes;
    const e = p.index;
    if (e * E >= v.header.sizeBytes) return;
    let release!: () => void;
    const prev = v.copying.get(e);
    if (prev) await prev;
    v.copying.set(e, new Promise<void>((r) => (release = r)));
    try {
      await v.fp.drain(v.fp.removeMapping(e * E, E), e * E, E);
      const bytes = await this.copyRange(v, e * E, Math.min(E, v.header.sizeBytes - e * E), null);
      this.recovery.reconciledExtents++;
      this.recovery.reconciledBytes += bytes;
      this.log.info({ volume: v.header.name, extent: e, copiedBytes: bytes, why }, 'mirror extent reconciled');
    } finally {
      v.copying.delete(e);
      release();
    }
  }

  private volumeByHeader(headerChunk: number): Volume | undefined {
    for (const v of this.volumes.values()) if (v.headerChunk === headerChunk) return v;
    return undefined;
  }

  private flushVolumeDisks(v: Volume): Promise<void> {
    return this.flushDisks(this.volumeDisks(v));
  }

  private async flushDisks(ids: string[]): Promise<void> {
    for (const id of ids) {
      const d = this.disks.get(id)!;
      if (d.state !== 'online') continue;
      const r = await diskIo((done) => d.flush(done));
      if (r < 0) await this.diskFailed(id, 'failed', `flush failed (${r}): write-back error`, true);
    }
  }

  /** Group operations: stop serving these volumes on this node (new I/O waits) and drain. */
  async pauseVolumes(names: string[]): Promise<void> {
    const vols = names.map((n) => this.volume(n));
    for (const v of vols) v.paused++;
    await Promise.all(vols.map((v) => v.fp.drain(v.fp.removeAllMappings())));
  }

  resumeVolumes(names: string[]): void {
    for (const n of names) {
      const v = this.volumes.get(n);
      if (!v || v.paused === 0) continue;
      v.paused--;
      if (v.paused === 0) this.wake(v);
    }
  }

  /** The physical extents a volume map holds: each redirect entry's placements, sized by the rmap coverage. */
  private extentsOf(map: VolumeMap): PhysicalExtent[] {
    const E = this.root.extentBytes;
    const out: PhysicalExtent[] = [];
    for (const vs of map.vsegs) {
      const coverage = new Map<number, number>();
      for (const e of vs.rmap.extents()) {
        const origin = vs.redirects.get(e.redirect).originBytes;
        coverage.set(e.redirect, Math.max(coverage.get(e.redirect) ?? 0, e.startBytes + e.lengthBytes - origin));
      }
      for (const [idx, entry] of vs.redirects.entries()) {
        const st = entry.storage;
        const columns = st.kind === 'striped' || st.kind === 'striped-mirrored' ? st.columns.length : 1;
        const bytes = Math.ceil((coverage.get(idx) ?? 0) / columns / E) * E;
        if (bytes > 0) for (const p of placementsOf(st)) out.push({ disk: p.disk, offsetBytes: p.offsetBytes, lengthBytes: bytes });
      }
    }
    return out;
  }

  /** Every physical extent a volume holds: its maps' and its journal's. */
  private recordExtents(rec: VolumeRecord): PhysicalExtent[] {
    const out = this.extentsOf(rec.map);
    for (const r of rec.header.journal?.regions ?? []) out.push({ disk: r.disk, offsetBytes: r.offsetBytes, lengthBytes: r.lengthBytes });
    // A migration's destination is the volume's too (switched units appear in both maps).
    if (rec.header.migration) out.push(...this.extentsOf(new VolumeMap([Vseg.fromJSON(rec.header.migration.dest)])));
    return uniqueExtents(out, this.root.extentBytes);
  }

  /** The journal writer of a volume, positioned after the last valid record of the active region. */
  private async openJournal(rec: VolumeRecord): Promise<JournalWriter | null> {
    const j = rec.header.journal;
    if (!j) return null;
    const region = j.regions[j.active]!;
    const disk = this.disks.get(region.disk)!;
    const { records, headBytes } = await scanJournal(disk, region, j.sequenceBase);
    this.log.info({ volume: rec.header.name, records: records.length, headBytes, nextSequence: j.sequenceBase + records.length }, 'write journal opened');
    return new JournalWriter(region, disk, j.sequenceBase + records.length, headBytes);
  }

  private usedChunks(): Set<number> {
    const used = new Set<number>(this.chunksInUse);
    for (const v of this.volumes.values()) {
      used.add(v.headerChunk);
      for (const c of v.rmapChunks) used.add(c);
    }
    return used;
  }

  /** Free chunks for volume headers and rmaps (call with the root oplock held: the volume table is fresh). */
  private chunkAllocator(): () => number {
    const used = this.usedChunks();
    return () => {
      for (let i = FIRST_VOLUME_CHUNK; i < this.store.chunkCount; i++) {
        if (!used.has(i)) {
          used.add(i);
          return i;
        }
      }
      throw new AdminError('ENOSPC', `the metadata area is full (${this.store.chunkCount} chunks)`);
    };
  }

  /** Write the root (call with the root oplock held: this node's volume table is then the cluster's). */
  private async commitRoot(): Promise<void> {
    this.root.disks = [...this.disks.values()].map((d) => ({ id: d.id, state: d.state }));
    this.root.volumes = [...this.volumes.values()].map((v) => ({ name: v.header.name, headerChunk: v.headerChunk }));
    await this.store.writeChunk(ROOT_CHUNK, this.root);
    this.refreshChunksInUse();
  }

  /** With the root oplock held: the chunks the volume table uses are exactly those of the attached volumes. */
  private refreshChunksInUse(): void {
    const chunks = new Set<number>([ROOT_CHUNK]);
    for (const v of this.volumes.values()) {
      chunks.add(v.headerChunk);
      for (const c of v.rmapChunks) chunks.add(c);
    }
    this.chunksInUse = chunks;
  }

  // ── volumes ──────────────────────────────────────────────────────────────
  createVolume(req: VolumeCreateRequest): Promise<VolumeInfo> {
    return this.exclusive(() => this.withRoot(async () => {
      if (!NAME_RE.test(req.name)) throw new AdminError('EINVAL', `volume name "${req.name}" must be 1-64 letters, digits, "_", "." or "-"`);
      if (this.volumes.has(req.name)) throw new AdminError('EEXIST', `volume ${req.name} already exists`);
      const shape = this.shapeFor(req);
      const vseg = this.buildVseg(0, req.sizeBytes, shape, req.disks);
      let journalRegions: JournalRegion[] | null = null;
      try {
        journalRegions = req.journalBytes === undefined ? null : this.allocateJournal(req.journalBytes, req.disks);
      } catch (e) {
        this.allocator.free(vseg.extents);
        throw e;
      }
      await this.scrub(vseg.extents);
      const map = new VolumeMap([vseg.vseg]);
      const rec: VolumeRecord = {
        header: {
          name: req.name, sizeBytes: req.sizeBytes, layout: req.layout, copies: shape.copies, stripeBytes: shape.stripeBytes, columns: shape.columns, stale: [], active: [],
          journal: journalRegions ? { regions: journalRegions, active: 0, sequenceBase: 1 } : null,
        },
        map, headerChunk: 0, rmapChunks: [], age: new Map(),
      };
      try {
        const alloc = this.chunkAllocator();
        rec.headerChunk = alloc();
        await writeVolume(this.store, rec, alloc);
        const j = journalRegions ? new JournalWriter(journalRegions[0]!, this.disks.get(journalRegions[0]!.disk)!, 1, 0) : null;
        if (j) await this.clearJournalRegion(journalRegions![0]!);
        const v = this.attach(rec, j);
        await this.commitRoot();
        // Serve it only once this node shares its header oplock (a later change then revokes us).
        await this.cluster.share(hdrLock(v));
        this.log.info({ volume: req.name, sizeBytes: req.sizeBytes, layout: req.layout, disks: this.volumeDisks(v) }, 'volume created');
        return this.volumeInfo(v);
      } catch (e) {
        this.allocator.free(this.recordExtents(rec));
        if (this.volumes.get(req.name)?.map === map) {
          this.volumes.delete(req.name);
          this.exports.remove(req.name);
        }
        throw e;
      }
    }));
  }

  growVolume(name: string, sizeBytes: number): Promise<VolumeInfo> {
    return this.exclusive(async () => this.withRoot(async () => {
      const v = this.volume(name);
      if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= v.header.sizeBytes) {
        throw new AdminError('EINVAL', `new size ${sizeBytes} must be larger than the current ${v.header.sizeBytes}`);
      }
      const h = v.header;
      const shape = { layout: h.layout, copies: h.copies, stripeBytes: h.stripeBytes ?? DEFAULT_STRIPE_BYTES, columns: h.columns };
      const built = this.buildVseg(h.sizeBytes, sizeBytes - h.sizeBytes, shape, this.volumeDisks(v));
      try {
        await this.scrub(built.extents);
        // Peers revoked and drained under the header oplock; they reread the new VSEG after.
        v.map.append(built.vseg);
        v.header.sizeBytes = sizeBytes;
        await this.writeVolumeShadowed(v);
        await this.commitRoot();
      } catch (e) {
        this.allocator.free(built.extents);
        throw e;
      }
      v.fp.sizeBytes = sizeBytes;
      this.log.info({ volume: name, sizeBytes }, 'volume grown');
      return this.volumeInfo(v);
    }, [this.volume(name)]));
  }

  deleteVolume(name: string): Promise<void> {
    return this.exclusive(async () => this.withRoot(async () => {
      const v = this.volume(name);
      if (v.resyncing.size > 0) throw new AdminError('EBUSY', `volume ${name} is resyncing`);
      const readers = [...this.volumes.values()].filter((x) => x.header.base === name && x.sharedSet.size > 0).map((x) => x.header.name);
      if (readers.length > 0) throw new AdminError('EBUSY', `${readers.join(', ')} still read${readers.length === 1 ? 's' : ''} from ${name}: delete ${readers.length === 1 ? 'it' : 'them'} first`);
      const revokedAt = v.fp.removeAllMappings();
      this.detach(v);
      await v.fp.drain(revokedAt);
      await this.commitRoot();
      this.allocator.free(this.recordExtents(v));
      this.log.info({ volume: name }, 'volume deleted');
    }, [this.volume(name)]));
  }

  listVolumes(): VolumeInfo[] {
    return [...this.volumes.values()].map((v) => this.volumeInfo(v));
  }

  showVolume(name: string): VolumeInfo {
    return this.volumeInfo(this.volume(name));
  }

  private volume(name: string): Volume {
    const v = this.volumes.get(name);
    if (!v) throw new AdminError('ENOENT', `no volume named ${name}`);
    return v;
  }

  private shapeFor(req: VolumeCreateRequest): { layout: Layout; copies: number; stripeBytes: number; columns: number } {
    if (!LAYOUTS.includes(req.layout)) throw new AdminError('EINVAL', `layout "${req.layout}" is not one of ${LAYOUTS.join(', ')}`);
    if (!Number.isSafeInteger(req.sizeBytes) || req.sizeBytes <= 0) throw new AdminError('EINVAL', `size ${req.sizeBytes} is not a positive number of bytes`);
    for (const d of req.disks ?? []) {
      if (!this.disks.has(d)) throw new AdminError('EINVAL', `unknown disk ${d}`);
      if (this.disks.get(d)!.state !== 'online') throw new AdminError('EINVAL', `disk ${d} is ${this.disks.get(d)!.state}`);
    }
    const eligible = (req.disks ?? [...this.disks.keys()]).filter((d) => this.disks.get(d)!.state === 'online').length;
    const mirrored = req.layout === 'mirrored' || req.layout === 'striped-mirrored';
    const striped = req.layout === 'striped' || req.layout === 'striped-mirrored';
    const copies = mirrored ? req.copies ?? 2 : 1;
    if (mirrored && (!Number.isInteger(copies) || copies < 2)) throw new AdminError('EINVAL', `copies ${req.copies} must be a whole number of at least 2`);
    if (!mirrored && req.copies !== undefined && req.copies !== 1) throw new AdminError('EINVAL', `--copies applies only to mirrored layouts`);
    const stripeBytes = req.stripeBytes ?? DEFAULT_STRIPE_BYTES;
    if (striped && (!isPowerOfTwo(stripeBytes) || stripeBytes < 4096 || stripeBytes > this.root.extentBytes)) {
      throw new AdminError('EINVAL', `stripe size ${stripeBytes} must be a power of two from 4K to the extent size ${formatSize(this.root.extentBytes)}`);
    }
    let columns = 1;
    if (striped) {
      columns = req.columns ?? Math.max(2, Math.min(4, Math.floor(eligible / copies)));
      if (!Number.isInteger(columns) || columns < 2) throw new AdminError('EINVAL', `columns ${req.columns} must be at least 2`);
    }
    const width = columns * copies;
    if (width > eligible) {
      throw new AdminError('ENOSPC', `a ${req.layout} volume with ${columns} column(s) x ${copies} cop(ies) needs ${width} distinct online disks; only ${eligible} ${eligible === 1 ? 'is' : 'are'} available`);
    }
    return { layout: req.layout, copies, stripeBytes: striped ? stripeBytes : 0, columns };
  }

  /**
   * Allocate and map [startBytes, startBytes + lengthBytes) of a volume as a new VSEG.
   * Space comes in units of one allocation extent on each of `columns x copies`
   * distinct disks; consecutive units whose extents are contiguous on every disk
   * share one redirect entry.
   */
  private buildVseg(startBytes: number, lengthBytes: number, shape: { layout: Layout; copies: number; stripeBytes: number; columns: number }, disks?: string[]): { vseg: Vseg; extents: PhysicalExtent[] } {
    const E = this.root.extentBytes;
    const width = shape.columns * shape.copies;
    const unitBytes = E * shape.columns;
    const units = Math.ceil(lengthBytes / unitBytes);
    const online = (disks ?? [...this.disks.keys()]).filter((d) => this.disks.get(d)?.state === 'online');
    const res = this.allocator.allocate(units * width, { disks: online, spread: width > 1 ? width : undefined });
    if (!res.ok) throw new AdminError('ENOSPC', res.error);
    // One list of E-sized pieces per disk group, in order.
    const lanes: Placement[][] = (width > 1 ? res.groups : [res.extents]).map((g) => {
      const out: Placement[] = [];
      for (const run of g) for (let off = 0; off < run.lengthBytes; off += E) out.push({ disk: run.disk, offsetBytes: run.offsetBytes + off });
      return out;
    });
    const unitPlacements = (u: number): Placement[] => width > 1 ? lanes.map((l) => l[u]!) : [lanes[0]![u]!];
    const rmap = new Rmap(lengthBytes);
    const redirects = new RedirectTable();
    let u = 0;
    while (u < units) {
      const first = unitPlacements(u);
      let n = 1;
      while (u + n < units && unitPlacements(u + n).every((p, i) => p.disk === first[i]!.disk && p.offsetBytes === first[i]!.offsetBytes + n * E)) n++;
      const origin = u * unitBytes;
      const idx = redirects.add({ storage: descriptorFor(shape, first), faultOnRead: false, faultOnWrite: false, generation: 0, originBytes: origin });
      rmap.map(origin, Math.min(n * unitBytes, lengthBytes - origin), idx);
      u += n;
    }
    return { vseg: new Vseg(startBytes, lengthBytes, rmap, redirects), extents: res.extents };
  }

  /** Freshly allocated extents read as zeros, never as a deleted volume's data (punch holes / BLKZEROOUT). */
  private async scrub(extents: PhysicalExtent[]): Promise<void> {
    const results = await Promise.all(extents.map((x) => diskIo((d) => this.disks.get(x.disk)!.zero(x.offsetBytes, x.lengthBytes, { noHole: false, fastOnly: false, fua: false }, d))));
    const bad = results.findIndex((r) => r < 0);
    if (bad >= 0) {
      this.allocator.free(extents);
      throw new AdminError('EIO', `clearing new extents on disk ${extents[bad]!.disk} failed (${results[bad]})`);
    }
  }

  /** Two journal regions of `bytes` each (rounded up to allocation extents), contiguous on one disk. */
  private allocateJournal(bytes: number, disks?: string[]): JournalRegion[] {
    const E = this.root.extentBytes;
    if (!Number.isSafeInteger(bytes) || bytes < 2 * MAX_FP_JOURNAL_RECORD_BYTES) {
      throw new AdminError('EINVAL', `journal size ${bytes} must be at least ${formatSize(2 * MAX_FP_JOURNAL_RECORD_BYTES)}`);
    }
    const per = Math.ceil(bytes / E);
    const online = (disks ?? [...this.disks.keys()]).filter((d) => this.disks.get(d)?.state === 'online');
    const res = this.allocator.allocate(2 * per, { disks: online, contiguous: true });
    if (!res.ok) throw new AdminError('ENOSPC', `journal: ${res.error}`);
    const run = res.extents[0]!;
    return [0, 1].map((i) => ({ disk: run.disk, offsetBytes: run.offsetBytes + i * per * E, lengthBytes: per * E }));
  }

  /** A fresh region must not start with records of an earlier use: clear its first record slot. */
  private async clearJournalRegion(region: JournalRegion): Promise<void> {
    const r = await diskIo((d) => this.disks.get(region.disk)!.write(Buffer.alloc(512), region.offsetBytes, true, d));
    if (r < 0) throw new AdminError('EIO', `journal: clearing the region on disk ${region.disk} failed`);
  }

  /** Seal the active journal region and switch to the other one (JOURNAL_FULL). */
  private swapJournal(v: Volume): Promise<void> {
    return (v.swapping ??= (async () => {
      try {
        const j = v.header.journal!;
        const next = 1 - j.active;
        await this.clearJournalRegion(j.regions[next]!);
        const sequenceBase = v.journal!.sequence;
        await this.withVolumes([v], false, async () => {
          const hj = v.header.journal!;
          hj.active = next;
          hj.sequenceBase = sequenceBase;
          await this.persistHeader(v);
        });
        v.journal!.swap(j.regions[next]!, this.disks.get(j.regions[next]!.disk)!);
        this.log.info({ volume: v.header.name, region: next, sequenceBase, swaps: v.journal!.swaps }, 'write journal swapped');
      } finally {
        v.swapping = null;
      }
    })());
  }

  /** Journal a write done by the CP: records of at most MAX_FP_JOURNAL_RECORD_BYTES, swapping regions as they fill. */
  private async journalWrite(v: Volume, offsetBytes: number, data: Buffer, fua: boolean): Promise<number> {
    const j = v.journal!;
    for (let pos = 0; pos < data.length; pos += MAX_FP_JOURNAL_RECORD_BYTES) {
      const piece = data.subarray(pos, Math.min(data.length, pos + MAX_FP_JOURNAL_RECORD_BYTES));
      for (;;) {
        if (v.swapping) await v.swapping;
        let started = false;
        const r = await diskIo((d) => { started = j.tryAppend(offsetBytes + pos, piece, fua, d); if (!started) d(1); });
        if (started) {
          if (r < 0) return r;
          break;
        }
        if (recordBytes(piece.length) > j.region.lengthBytes) return EIO;
        await this.swapJournal(v);
      }
    }
    return 0;
  }

  private volumeDisks(v: Volume): string[] {
    return this.mapDisks(v.map);
  }

  private volumeInfo(v: Volume): VolumeInfo {
    const st = v.fp.statistics();
    const faults: Record<string, number> = {};
    let faultTotal = 0;
    st.faults.forEach((n, i) => {
      faults[FAULT_CLASS_NAMES[i]!] = n;
      faultTotal += n;
    });
    const fp: FpStatisticsView = { ...st, faults, fpShare: st.hits + faultTotal === 0 ? 1 : st.hits / (st.hits + faultTotal) };
    const h = v.header;
    let extents = 0;
    for (const vs of v.map.vsegs) extents += vs.rmap.count;
    const state = v.resyncing.size > 0 ? 'resyncing' : h.stale.length > 0 ? 'degraded' : 'ok';
    return {
      name: h.name, sizeBytes: h.sizeBytes, layout: h.layout, copies: h.copies, stripeBytes: h.stripeBytes || null,
      columns: h.columns, disks: this.volumeDisks(v), vsegs: v.map.vsegs.length, extents, state,
      uris: this.uriBases.map((b) => `${b}/${encodeURIComponent(h.name)}`),
      allocatedBytes: this.recordExtents(v).reduce((a, e) => a + e.lengthBytes, 0),
      journal: v.journal ? this.journalInfo(v.journal) : null,
      fp,
      kind: h.kind ?? 'volume', base: h.base ?? null, readOnly: h.readOnly ?? false,
      migration: h.migration ? { to: h.migration.to, doneBytes: Math.min(h.sizeBytes, h.migration.nextUnit * this.unitBytes(v)) } : null,
      sharedBytes: Math.min(h.sizeBytes, v.sharedSet.size * this.unitBytes(v)), createdAt: h.createdAt ?? null,
    };
  }

  private journalInfo(j: JournalWriter): JournalInfo {
    return { regionBytes: j.region.lengthBytes, usedBytes: j.usedBytes, nextSequence: j.sequence, recordsInRegion: j.records, swaps: j.swaps };
  }

  // ── snapshots and clones ─────────────────────────────────────────────────
  /*
   * A snapshot or clone ("derived volume") has the origin's shape and its own storage,
   * allocated whole at creation (so nothing is allocated in the I/O path), and a set of
   * units (allocation extent x columns) still read from its base. Reads of a shared
   * unit resolve through the base (recursively); the first write that would break the
   * sharing faults to the CP, which materializes the unit: under the derived volume's
   * header oplock (restrictive: every node drops its mappings of the unit and drains
   * reads through the old one), it copies the unit from the base into the derived
   * volume's storage, clears the shared bit and writes the header; then the write goes
   * on. For a snapshot that write is the origin's (copy-on-write, seed 004 Figs. 20-21);
   * for a clone it is the clone's own (redirect-on-write, Fig. 22).
   */

  private unitBytes(v: { header: { columns: number } }): number {
    return this.root.extentBytes * Math.max(1, v.header.columns);
  }

  /**
   * Where byte `pos` of v reads from: its own map, or for a shared unit its base's,
   * recursively. [lo, hi) is the range around pos that resolves the same way.
   */
  private resolveData(v: Volume, pos: number): { r: NonNullable<ReturnType<VolumeMap['resolve']>>; owner: Volume; lo: number; hi: number } | null {
    let cur = v;
    let lo = 0;
    let hi = v.header.sizeBytes;
    for (let depth = 0; depth < 64; depth++) {
      if (cur.header.base && cur.sharedSet.size > 0) {
        // Shared or not, the answer holds for this unit only: the next one may differ.
        const ub = this.unitBytes(cur);
        const u = Math.floor(pos / ub);
        lo = Math.max(lo, u * ub);
        hi = Math.min(hi, (u + 1) * ub);
        if (cur.sharedSet.has(u)) {
          const b = this.volumes.get(cur.header.base);
          if (!b) return null;
          cur = b;
          continue;
        }
      }
      const r = cur.map.resolve(pos);
      return r ? { r, owner: cur, lo, hi } : null;
    }
    return null;
  }

  /** Volumes that read units from v (its snapshots, or a snapshot's clones). */
  private derivedOf(v: Volume): Volume[] {
    const out: Volume[] = [];
    for (const d of this.volumes.values()) if (d.header.base === v.header.name && d.sharedSet.size > 0) out.push(d);
    return out;
  }

  /** Some derived volume still shares a unit of v in this range with v (a write must push it first). */
  private cowPending(v: Volume, offsetBytes: number, lengthBytes: number): boolean {
    for (const d of this.derivedOf(v)) {
      const ub = this.unitBytes(d);
      for (let u = Math.floor(offsetBytes / ub); u <= Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / ub); u++) if (d.sharedSet.has(u)) return true;
    }
    return false;
  }

  /** v itself still reads part of the range from its base (a clone's write must copy first). */
  private sharedIn(v: Volume, offsetBytes: number, lengthBytes: number): boolean {
    if (!v.header.base || v.sharedSet.size === 0) return false;
    const ub = this.unitBytes(v);
    for (let u = Math.floor(offsetBytes / ub); u <= Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / ub); u++) if (v.sharedSet.has(u)) return true;
    return false;
  }

  /** Before a write to v's range: push the units its snapshots share, copy the units it shares with its base. True if anything was copied. */
  private async materializeRange(v: Volume, offsetBytes: number, lengthBytes: number): Promise<boolean> {
    let did = false;
    for (let guard = 0; guard < 64; guard++) {
      const jobs: Promise<boolean>[] = [];
      for (const d of [...this.derivedOf(v), ...(v.header.base ? [v] : [])]) {
        const ub = this.unitBytes(d);
        for (let u = Math.floor(offsetBytes / ub); u <= Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / ub); u++) {
          if (d.sharedSet.has(u)) jobs.push(this.materialize(d, u));
        }
      }
      if (jobs.length === 0) return did;
      if ((await Promise.all(jobs)).some(Boolean)) did = true;
    }
    return did;
  }

  /** Copy unit u of derived volume d from its base into d's own storage; once per unit however many writers wait. */
  private materialize(d: Volume, u: number): Promise<boolean> {
    const running = d.materializing.get(u);
    if (running) return running.then(() => true);
    const p = (async (): Promise<boolean> => {
      const ub = this.unitBytes(d);
      // Every volume whose reads of this unit pass through d must drop its mappings too.
      const dependents = [d, ...this.readersThrough(d, u)];
      let copied = false;
      await this.withVolumes(dependents, true, async () => {
        if (!d.sharedSet.has(u) || d.gone) return;
        const start = u * ub;
        const len = Math.min(ub, d.header.sizeBytes - start);
        for (const x of dependents) await x.fp.drain(x.fp.removeMapping(start, len), start, len);
        const base = this.volumes.get(d.header.base ?? '');
        if (!base) throw new Error(`volume ${d.header.name}: its base ${d.header.base} is gone`);
        await this.copyVolumeRange(base, d, start, len);
        d.sharedSet.delete(u);
        await this.persistHeader(d);
        copied = true;
      });
      return copied;
    })().finally(() => d.materializing.delete(u));
    d.materializing.set(u, p.then(() => undefined, () => undefined));
    return p;
  }

  /** Volumes that read unit u through d (clones of a snapshot that share the unit), recursively. */
  private readersThrough(d: Volume, u: number): Volume[] {
    const out: Volume[] = [];
    for (const x of this.volumes.values()) {
      if (x.header.base === d.header.name && x.sharedSet.has(u)) out.push(x, ...this.readersThrough(x, u));
    }
    return out;
  }

  /** Copy [start, start + len) of `from`'s data (through its bases) into `to`'s own storage, or `toMap`'s (every side). */
  private async copyVolumeRange(from: Volume, to: Volume, start: number, len: number, toMap: VolumeMap = to.map): Promise<void> {
    const buf = Buffer.allocUnsafe(Math.min(len, COPY_CHUNK_BYTES));
    for (let pos = start; pos < start + len;) {
      const n = Math.min(start + len - pos, buf.length);
      const slice = buf.subarray(0, n);
      // Read through the base chain.
      for (let off = 0; off < n;) {
        const d = this.resolveData(from, pos + off);
        if (!d) throw new Error(`copy: ${from.header.name} has no mapping at ${pos + off}`);
        const m = Math.min(n - off, d.r.extentRemainingBytes, d.hi - (pos + off));
        for (const piece of mapRange(d.r.entry.storage, d.r.relativeBytes, m)) {
          const sides = piece.targets.map((t, i) => ({ disk: t.disk, at: piece.physicalOffsets[i]!, state: this.sideState(d.owner, t.disk) }));
          const rr = await this.readAny(d.owner, sides, slice.subarray(off + piece.bufferOffsetBytes, off + piece.bufferOffsetBytes + piece.lengthBytes));
          if (rr < 0) throw new Error(`copy: reading ${from.header.name} at ${pos + off} failed (${rr})`);
        }
        off += m;
      }
      // Write into the target's own map.
      for (let off = 0; off < n;) {
        const r = toMap.resolve(pos + off);
        if (!r) throw new Error(`copy: ${to.header.name} has no storage at ${pos + off}`);
        const m = Math.min(n - off, r.extentRemainingBytes);
        for (const piece of mapRange(r.entry.storage, r.relativeBytes, m)) {
          const data = slice.subarray(off + piece.bufferOffsetBytes, off + piece.bufferOffsetBytes + piece.lengthBytes);
          for (let i = 0; i < piece.targets.length; i++) {
            const t = piece.targets[i]!;
            if (this.sideState(to, t.disk) === 'dead') continue;
            const wr = await diskIo((cb) => this.disks.get(t.disk)!.write(data, piece.physicalOffsets[i]!, false, cb));
            if (wr < 0) throw new Error(`copy: writing ${to.header.name} on disk ${t.disk} failed (${wr})`);
          }
        }
        off += m;
      }
      pos += n;
    }
    // Durable before the metadata says the copy exists.
    await this.flushDisks(this.mapDisks(toMap));
  }

  private mapDisks(map: VolumeMap): string[] {
    const s = new Set<string>();
    for (const vs of map.vsegs) for (const [, e] of vs.redirects.entries()) for (const p of placementsOf(e.storage)) s.add(p.disk);
    return [...s].sort();
  }

  /**
   * Create snapshots (read-only, copy-on-write) of `volumes` at one instant: I/O to all
   * of them is paused on every node for the duration (a synchronization point), so a
   * write acknowledged before another is never in the set without it.
   */
  createSnapshots(pairs: { volume: string; name: string }[], timeoutMs = 10_000): Promise<VolumeInfo[]> {
    for (const p of pairs) this.volume(p.volume);
    return this.groupPause(pairs.map((p) => p.volume), timeoutMs, () => this.exclusive(() => this.withRoot(async () => {
      const out: Volume[] = [];
      for (const p of pairs) out.push(await this.createDerived(this.volume(p.volume), p.name, 'snapshot'));
      await this.commitRoot();
      for (const d of out) await this.cluster.share(hdrLock(d));
      this.log.info({ snapshots: pairs }, pairs.length > 1 ? 'consistency group snapshot created' : 'snapshot created');
      return out.map((d) => this.volumeInfo(d));
    }, pairs.map((p) => this.volume(p.volume)))));
  }

  /** A writable clone of a snapshot (or of a volume: through a new snapshot `NEW.base`). */
  async createClone(source: string, name: string): Promise<VolumeInfo> {
    let base = this.volume(source);
    if (base.header.kind !== 'snapshot') {
      await this.createSnapshots([{ volume: source, name: `${name}.base` }]);
      base = this.volume(`${name}.base`);
    }
    return this.exclusive(() => this.withRoot(async () => {
      const c = await this.createDerived(this.volume(base.header.name), name, 'clone');
      await this.commitRoot();
      await this.cluster.share(hdrLock(c));
      this.log.info({ clone: name, base: base.header.name }, 'clone created');
      return this.volumeInfo(c);
    }, [base]));
  }

  /** With the root oplock and the base's header oplock held: allocate the derived volume, all units shared. */
  private async createDerived(base: Volume, name: string, kind: 'snapshot' | 'clone'): Promise<Volume> {
    if (!NAME_RE.test(name)) throw new AdminError('EINVAL', `name "${name}" must be 1-64 letters, digits, "_", "." or "-"`);
    if (this.volumes.has(name)) throw new AdminError('EEXIST', `a volume or snapshot named ${name} already exists`);
    if (base.header.journal) throw new AdminError('EINVAL', `volume ${base.header.name} has a write journal; snapshots of journaled volumes are not supported`);
    const h = base.header;
    const shape = { layout: h.layout, copies: h.copies, stripeBytes: h.stripeBytes ?? DEFAULT_STRIPE_BYTES, columns: h.columns };
    // Any online disks: the derived volume's storage need not sit beside its base's.
    const built = this.buildVseg(0, h.sizeBytes, shape);
    const units = Math.ceil(h.sizeBytes / this.unitBytes(base));
    const shared = new Set<number>();
    for (let u = 0; u < units; u++) shared.add(u);
    const rec: VolumeRecord = {
      header: {
        name, sizeBytes: h.sizeBytes, layout: h.layout, copies: h.copies, stripeBytes: h.stripeBytes, columns: h.columns, stale: [], active: [], journal: null,
        kind, base: base.header.name, shared: setToBitmap(shared, units), readOnly: kind === 'snapshot', createdAt: new Date().toISOString(),
      },
      map: new VolumeMap([built.vseg]), headerChunk: 0, rmapChunks: [], age: new Map(),
    };
    try {
      const alloc = this.chunkAllocator();
      rec.headerChunk = alloc();
      await writeVolume(this.store, rec, alloc);
    } catch (e) {
      this.allocator.free(built.extents);
      throw e;
    }
    // The origin's cached mappings lose their write permission for the shared units.
    await base.fp.drain(base.fp.removeAllMappings());
    return this.attach(rec);
  }

  /** Push every unit a snapshot still shares (the completion task): afterwards it no longer depends on its origin. */
  completeSnapshot(name: string): TaskInfo {
    const d = this.volume(name);
    const running = this.tasks.find((t) => t.info.kind === 'snapshot-complete' && t.info.target === `volume ${name}` && t.info.state === 'running');
    if (running) return running.info;
    const ub = this.unitBytes(d);
    const info: TaskInfo = {
      id: `complete-${name}-${Date.now()}`, kind: 'snapshot-complete', target: `volume ${name}`, state: 'running', doneBytes: 0,
      totalBytes: d.sharedSet.size * ub, percent: 0, rateBytesPerSec: 0, startedAt: new Date().toISOString(), finishedAt: null, message: null,
    };
    const task: Task = { info, cancelled: false };
    this.tasks.push(task);
    const started = Date.now();
    void (async () => {
      await this.cluster.hold(cplLock(d));
      try {
        for (const u of [...d.sharedSet].sort((a, b) => a - b)) {
          if (task.cancelled || d.gone) throw new Error('cancelled');
          await this.materialize(d, u);
          info.doneBytes += ub;
          info.percent = Math.round((info.doneBytes / Math.max(1, info.totalBytes)) * 1000) / 10;
          info.rateBytesPerSec = Math.round(info.doneBytes / Math.max(0.001, (Date.now() - started) / 1000));
        }
      } finally {
        this.cluster.unhold(cplLock(d));
      }
      info.state = 'done';
      info.percent = 100;
      info.finishedAt = new Date().toISOString();
      this.log.info({ snapshot: name, copiedBytes: info.doneBytes, ms: Date.now() - started }, 'snapshot complete');
    })().catch((err: Error) => {
      info.state = task.cancelled ? 'cancelled' : 'failed';
      info.message = err.message;
      info.finishedAt = new Date().toISOString();
    });
    return info;
  }

  /** Stop a running task at its next step; a migration keeps its barrier (the same `migrate` resumes it). */
  cancelTask(id: string): TaskInfo {
    const t = this.tasks.find((x) => x.info.id === id);
    if (!t) throw new AdminError('ENOENT', `no task ${id} on this node (dve status lists every node's tasks)`);
    if (t.info.state !== 'running') throw new AdminError('EINVAL', `task ${id} is ${t.info.state}, not running`);
    t.cancelled = true;
    this.log.info({ task: id, kind: t.info.kind, target: t.info.target }, 'task cancelled');
    return t.info;
  }

  // ── online reconfiguration ───────────────────────────────────────────────
  /**
   * Write a volume whose VSEG structure changed: the rmap chunks go to fresh chunk
   * ids and the header, written last, is the commit point (a crash before it leaves
   * the old header naming the old, intact chunks). Call with the root oplock held.
   */
  private async writeVolumeShadowed(v: Volume): Promise<void> {
    const old = v.rmapChunks;
    v.rmapChunks = [];
    try {
      await writeVolume(this.store, v, this.chunkAllocator());
    } catch (e) {
      v.rmapChunks = old;
      throw e;
    }
  }

  /**
   * Split a VSEG at a byte offset, or merge VSEG i with the next (seed 004, LV
   * reconfiguration): metadata only, every byte keeps its storage. Under the root
   * oplock (fresh chunks) and the volume's header oplock (every node revokes, drains
   * and rereads), written shadowed so a crash completes or leaves the old layout.
   */
  reconfigureVolume(name: string, op: { split: number } | { merge: number }): Promise<VolumeInfo> {
    return this.exclusive(() => this.withRoot(async () => {
      const v = this.volume(name);
      if ('split' in op) {
        if (!Number.isSafeInteger(op.split) || op.split <= 0 || op.split >= v.header.sizeBytes || op.split % 4096 !== 0) {
          throw new AdminError('EINVAL', `split offset ${op.split} must be a multiple of 4096 inside the volume (0 < offset < ${v.header.sizeBytes})`);
        }
        if (v.map.vsegs.some((x) => x.startBytes === op.split)) throw new AdminError('EINVAL', `offset ${op.split} is already a VSEG boundary`);
        v.map.split(op.split);
      } else {
        if (!Number.isInteger(op.merge) || op.merge < 0 || op.merge + 1 >= v.map.vsegs.length) {
          throw new AdminError('EINVAL', `VSEG ${op.merge} has no next VSEG to merge with (the volume has ${v.map.vsegs.length})`);
        }
        v.map.merge(op.merge);
      }
      v.map.checkInvariants();
      await v.fp.drain(v.fp.removeAllMappings());
      await this.writeVolumeShadowed(v);
      this.refreshChunksInUse();
      this.log.info({ volume: name, op, vsegs: v.map.vsegs.length }, 'volume reconfigured');
      return this.volumeInfo(v);
    }, [this.volume(name)]));
  }

  // ── online migration (seed 004 Figs. 23-24) ────────────────────────────────
  /*
   * `migrate` moves a volume to other disks while hosts do I/O. The destination is
   * allocated up front (with the root oplock) and recorded in the header; then, unit
   * by unit, under the volume's header oplock: mark the unit in progress (every node
   * revokes and drains; the unit becomes read-only), copy it, switch the unit's rmap
   * to the destination and move the barrier. Writes to the unit being copied fault and
   * wait for the barrier to move; all other I/O goes on through the FP. The migration
   * is a task set that holds a non-volatile oplock (vol<h>.mig[0]): if its node dies,
   * the node that evicts it inherits the oplock and resumes from the recorded barrier.
   */

  private inMigrationCopy(v: Volume, offsetBytes: number, lengthBytes: number): boolean {
    const mig = v.header.migration;
    if (!mig || mig.inProgress === null) return false;
    const ub = this.unitBytes(v);
    const u = mig.inProgress;
    return offsetBytes < (u + 1) * ub && u * ub < offsetBytes + Math.max(lengthBytes, 1);
  }

  migrateVolume(name: string, to: string[]): Promise<TaskInfo> {
    return this.exclusive(() => this.withRoot(async () => {
      const v = this.volume(name);
      if (v.header.migration) {
        // The same destination resumes a migration that stopped (cancelled, or failed).
        if (v.header.migration.to.join(',') === to.join(',')) return this.runMigration(v);
        throw new AdminError('EBUSY', `volume ${name} is already migrating (to ${v.header.migration.to.join(',')})`);
      }
      if (v.header.kind === 'snapshot' || v.header.base || this.derivedOf(v).length > 0) throw new AdminError('EBUSY', `volume ${name} has snapshots or clones sharing its storage; migrate it once they are deleted or complete`);
      if (v.header.journal) throw new AdminError('EINVAL', `volume ${name} has a write journal; journaled volumes cannot migrate yet`);
      if (to.length === 0) throw new AdminError('EINVAL', 'name at least one destination disk');
      for (const d of to) {
        if (!this.disks.has(d)) throw new AdminError('EINVAL', `unknown disk ${d}`);
        if (this.disks.get(d)!.state !== 'online') throw new AdminError('EINVAL', `disk ${d} is ${this.disks.get(d)!.state}`);
      }
      const h = v.header;
      const shape = { layout: h.layout, copies: h.copies, stripeBytes: h.stripeBytes ?? DEFAULT_STRIPE_BYTES, columns: h.columns };
      const built = this.buildVseg(0, h.sizeBytes, shape, to);
      h.migration = { to, dest: built.vseg.toJSON(), nextUnit: 0, inProgress: null, startedAt: new Date().toISOString(), copiedBytes: 0 };
      try {
        await this.persistHeader(v);
      } catch (e) {
        this.allocator.free(built.extents);
        h.migration = null;
        throw e;
      }
      this.log.info({ volume: name, to }, 'migration started');
      return this.runMigration(v);
    }, [this.volume(name)]));
  }

  /** Start (or resume, after this node inherited it) the migration task of v. */
  private runMigration(v: Volume): TaskInfo {
    const name = v.header.name;
    const running = this.tasks.find((t) => t.info.kind === 'migrate' && t.info.target === `volume ${name}` && t.info.state === 'running');
    if (running) return running.info;
    const mig = v.header.migration!;
    const ub = this.unitBytes(v);
    const units = Math.ceil(v.header.sizeBytes / ub);
    const info: TaskInfo = {
      id: `migrate-${name}-${Date.now()}`, kind: 'migrate', target: `volume ${name}`, state: 'running',
      doneBytes: Math.min(v.header.sizeBytes, mig.nextUnit * ub), totalBytes: v.header.sizeBytes, percent: 0, rateBytesPerSec: 0,
      startedAt: new Date().toISOString(), finishedAt: null, message: `to ${mig.to.join(',')}`,
    };
    const task: Task = { info, cancelled: false };
    this.tasks.push(task);
    const started = Date.now();
    const startBytes = info.doneBytes;
    void (async () => {
      await this.cluster.hold(migLock(v));
      try {
        for (;;) {
          if (task.cancelled || v.gone) throw new Error('cancelled');
          const next = v.header.migration?.nextUnit ?? units;
          if (next >= units) break;
          await this.migrateUnit(v, next);
          info.doneBytes = Math.min(v.header.sizeBytes, (next + 1) * ub);
          info.percent = Math.round((info.doneBytes / info.totalBytes) * 1000) / 10;
          info.rateBytesPerSec = Math.round((info.doneBytes - startBytes) / Math.max(0.001, (Date.now() - started) / 1000));
        }
        await this.finishMigration(v);
      } finally {
        this.cluster.unhold(migLock(v));
      }
      info.state = 'done';
      info.percent = 100;
      info.finishedAt = new Date().toISOString();
      this.log.info({ volume: name, bytes: info.doneBytes - startBytes, ms: Date.now() - started }, 'migration done');
    })().catch((err: Error) => {
      info.state = task.cancelled ? 'cancelled' : 'failed';
      info.message = err.message;
      info.finishedAt = new Date().toISOString();
      if (!task.cancelled) this.log.error({ volume: name, err: err.message }, 'migration failed; it resumes from the barrier when restarted');
    });
    return info;
  }

  /** Copy one unit to the destination and switch it, in two header-oplock steps. */
  private async migrateUnit(v: Volume, u: number): Promise<void> {
    const ub = this.unitBytes(v);
    const start = u * ub;
    const len = Math.min(ub, v.header.sizeBytes - start);
    // 1. The unit becomes read-only everywhere (writes to it wait), in-flight I/O drains.
    await this.withVolumes([v], true, async () => {
      v.header.migration!.inProgress = u;
      await this.persistHeader(v);
      await v.fp.drain(v.fp.removeMapping(start, len), start, len);
    });
    // 2. Copy source → destination.
    await this.copyVolumeRange(v, v, start, len, new VolumeMap([Vseg.fromJSON(v.header.migration!.dest)]));
    // 3. Switch the unit to the destination; the barrier moves.
    await this.withVolumes([v], true, async () => {
      const mig = v.header.migration!;
      const destMap = new VolumeMap([Vseg.fromJSON(mig.dest)]);
      for (let pos = start; pos < start + len;) {
        const d = destMap.resolve(pos)!;
        const n = Math.min(start + len - pos, d.extentRemainingBytes);
        const vi = v.map.findVseg(pos);
        const vs = v.map.vsegs[vi]!;
        const m = Math.min(n, vs.endBytes - pos);
        const entry = { storage: d.entry.storage, faultOnRead: false, faultOnWrite: false, generation: 0, originBytes: pos - vs.startBytes - d.relativeBytes };
        let idx = vs.redirects.indexOf(entry);
        if (idx < 0) idx = vs.redirects.add(entry);
        vs.rmap.map(pos - vs.startBytes, m, idx);
        pos += m;
      }
      // Crash-safe order: the header with the new redirect entry (harmless unused), then
      // the rmap chunks, then the header with the barrier moved. A crash in between
      // leaves inProgress = u: the resumed task copies u again.
      await this.persistHeader(v); // the header holds the redirect tables, the chunks the rmaps
      await writeVolume(this.store, v, () => { throw new Error('a migration step must not need new rmap chunks'); });
      mig.inProgress = null;
      mig.nextUnit = u + 1;
      mig.copiedBytes += len;
      await this.persistHeader(v);
      v.fp.removeMapping(start, len);
    });
    this.wake(v);
  }

  /** Every unit is on the destination: drop the source storage and the migration record (root oplock: space is freed). */
  private async finishMigration(v: Volume): Promise<void> {
    await this.exclusive(() => this.withRoot(async () => {
      const mig = v.header.migration;
      if (!mig) return;
      // Unreferenced redirect entries (the source) go; the allocator frees what no map names.
      for (const vs of v.map.vsegs) {
        const used = new Set(vs.rmap.extents().map((e) => e.redirect));
        for (const [idx] of [...vs.redirects.entries()]) if (!used.has(idx)) vs.redirects.release(idx);
      }
      v.header.migration = null;
      await this.writeVolumeShadowed(v);
      await this.commitRoot();
      v.fp.drain(v.fp.removeAllMappings());
    }, [v]));
    await this.reloadRoot();
  }

  // ── the CP API: mapping misses ───────────────────────────────────────────
  mappingMiss(volume: string, offsetBytes: number, _lengthBytes: number): MissAnswer {
    const v = this.volumes.get(volume);
    if (!v) return { kind: 'IGNORE', result: EIO };
    if (!this.usableNow(v)) return { kind: 'QUEUE' };
    const d = this.resolveData(v, offsetBytes);
    if (!d) return { kind: 'QUEUE' };
    const r = d.r;
    let start = Math.max(d.lo, r.vseg.startBytes + r.vseg.rmap.startOf(r.extentIndex));
    let end = Math.min(d.hi, r.vseg.startBytes + r.vseg.rmap.startOf(r.extentIndex) + r.vseg.rmap.lengthOf(r.extentIndex));
    // A unit still shared with a base is written only after it is copied (redirect-on-write),
    // and a unit a snapshot still shares with this origin only after it is pushed (copy-on-write).
    let faultOnWrite = r.entry.faultOnWrite || d.owner !== v;
    const mirrored = r.entry.storage.kind === 'mirrored' || r.entry.storage.kind === 'striped-mirrored';
    if (mirrored) {
      // Mirrors are mapped one allocation extent at a time: a write faults once until the
      // extent is in the activity log (and, degraded, until its age is recorded).
      const E = this.root.extentBytes;
      const e = Math.floor(offsetBytes / E);
      if (v.copying.has(e)) return { kind: 'QUEUE' };
      start = Math.max(start, e * E);
      end = Math.min(end, (e + 1) * E);
      faultOnWrite ||= !this.writeHeld(v, e) || v.closing.has(e) || this.needsAge(v, e);
    }
    if (this.derivedOf(v).length > 0) {
      // An origin with snapshots sharing its units: one unit per mapping, so a pushed
      // unit is written through the FP while its neighbours still fault.
      const ub = this.unitBytes(v);
      const u = Math.floor(offsetBytes / ub);
      start = Math.max(start, u * ub);
      end = Math.min(end, (u + 1) * ub);
    }
    faultOnWrite ||= this.cowPending(v, start, end - start);
    const mig = v.header.migration;
    if (mig) {
      // During a migration mappings cover one unit; the unit being copied is read-only.
      const ub = this.unitBytes(v);
      const u = Math.floor(offsetBytes / ub);
      start = Math.max(start, u * ub);
      end = Math.min(end, (u + 1) * ub);
      if (mig.inProgress === u) faultOnWrite = true;
    }
    // A journaled volume appends through the FP only while this node holds the journal.
    if (v.header.journal && !v.jnlHeld) faultOnWrite = true;
    const m: FpMapping = {
      startBytes: start,
      lengthBytes: end - start,
      relativeStartBytes: start - r.vseg.startBytes - r.entry.originBytes,
      redirectId: r.vsegIndex * 0x100000 + r.redirectIndex,
      storage: r.entry.storage,
      faultOnRead: r.entry.faultOnRead,
      faultOnWrite,
      sideStates: mirrored ? placementsOf(r.entry.storage).map((p) => this.sideState(d.owner, p.disk)) : undefined,
      sideCosts: mirrored ? placementsOf(r.entry.storage).map((p) => this.readCost.get(p.disk) ?? 1) : undefined,
    };
    v.fp.addMapping(m);
    return { kind: 'CONTINUE' };
  }

  private sideState(v: Volume, disk: string): 'live' | 'dead' | 'resyncing' {
    if (this.disks.get(disk)?.state !== 'online') return 'dead';
    if (v.resyncing.has(disk)) return 'resyncing';
    return v.header.stale.some((s) => s.disk === disk) ? 'dead' : 'live';
  }

  /** A write to allocation extent `e` must first record the generation in the age list. */
  private needsAge(v: Volume, e: number): boolean {
    if (v.header.stale.length === 0) return false;
    const since = Math.max(...v.header.stale.map((s) => s.sinceGeneration));
    return (v.age.get(e) ?? 0) < since;
  }

  // ── the CP API: queued I/O ───────────────────────────────────────────────
  queueIo(volume: string, io: UpstreamIo, why: FaultClass): void {
    const v = this.volumes.get(volume);
    if (!v) return io.complete(EIO);
    this.handle(v, io, why).then(
      (r) => io.complete(r),
      (err: Error) => {
        this.log.error({ volume, err: err.message, why: FAULT_CLASS_NAMES[why] }, 'control path failed an I/O');
        io.complete(EIO);
      },
    );
  }

  /**
   * Everything the CP waits for (metadata, oplocks, copies, the age list) it waits for
   * with the I/O parked; then it unparks, checks synchronously that all still holds,
   * and issues the I/O in the same turn, so a revocation either finds it not started
   * (it parks again and retries) or drains it.
   */
  private async handle(v: Volume, io: UpstreamIo, why: FaultClass): Promise<number> {
    const fp = v.fp;
    fp.park(io, true);
    if (why === FaultClass.DOWNSTREAM_ERROR) {
      const failed = (io as unknown as { failedPlacements: number[] | null; storage: StorageDescriptor | null });
      if (failed.failedPlacements && failed.storage) {
        const places = placementsOf(failed.storage);
        for (const i of failed.failedPlacements) await this.diskFailed(places[i]!.disk, 'failed', `I/O error (upstream op ${io.op})`);
        const mirrored = failed.storage.kind === 'mirrored' || failed.storage.kind === 'striped-mirrored';
        if (!mirrored) return EIO;
        if (io.op === UpstreamOp.WRITE) {
          // The write reached every other side: record its extents as written in this generation.
          await this.prepareWrite(v, io.offsetBytes, io.lengthBytes);
          const remaining = (io as unknown as { firstError: number });
          return remaining.firstError !== 0 && failed.failedPlacements.length >= places.length ? remaining.firstError : 0;
        }
      }
    }
    const write = io.op === UpstreamOp.WRITE || io.op === UpstreamOp.ZERO || io.op === UpstreamOp.TRIM;
    const mirrored = isMirrored(v.header.layout);
    for (;;) {
      await this.whenUsable(v);
      if (write) {
        await this.waitForCopies(v, io.offsetBytes, io.lengthBytes);
        await this.prepareWrite(v, io.offsetBytes, io.lengthBytes);
      }
      fp.park(io, false);
      const overlap = write && mirrored && fp.overlapsActiveWrite(io);
      if (this.usableNow(v) && !overlap && (!write || this.writeReady(v, io.offsetBytes, io.lengthBytes))) return this.perform(v, io);
      fp.park(io, true);
      // Overlapping mirrored writes go one after the other, so every side sees the same order.
      if (overlap) await fp.drain(nowUs(), io.offsetBytes, io.lengthBytes);
    }
  }

  /** The CP does an upstream I/O itself: split across extents and stripes, mirrored to every write side. Issues everything before it yields. */
  private async perform(v: Volume, io: UpstreamIo): Promise<number> {
    const end = io.offsetBytes + io.lengthBytes;
    let pos = io.offsetBytes;
    const jobs: Promise<number>[] = [];
    while (pos < end) {
      const d = this.resolveData(v, pos);
      if (!d) return EIO;
      const r = d.r;
      const n = Math.min(end - pos, r.extentRemainingBytes, d.hi - pos);
      for (const piece of mapRange(r.entry.storage, r.relativeBytes, n)) {
        const bufOff = pos - io.offsetBytes + piece.bufferOffsetBytes;
        const slice = io.buffer ? io.buffer.subarray(bufOff, bufOff + piece.lengthBytes) : null;
        const sides = piece.targets.map((t, i) => ({ disk: t.disk, at: piece.physicalOffsets[i]!, state: this.sideState(d.owner, t.disk) }));
        if (io.op === UpstreamOp.READ) jobs.push(this.readAny(v, sides, slice!));
        else jobs.push(this.writeAll(v, io, sides, slice, piece.lengthBytes));
      }
      pos += n;
    }
    if (io.op === UpstreamOp.WRITE && v.journal) jobs.push(this.journalWrite(v, io.offsetBytes, io.buffer!, io.fua));
    const results = await Promise.all(jobs);
    return results.find((x) => x < 0) ?? 0;
  }

  private async readAny(v: Volume, sides: { disk: string; at: number; state: string }[], buf: Buffer): Promise<number> {
    let last = EIO;
    for (const s of sides.filter((x) => x.state === 'live')) {
      last = await diskIo((d) => this.disks.get(s.disk)!.read(buf, s.at, d));
      if (last >= 0) return 0;
      if (sides.length > 1) await this.diskFailed(s.disk, 'failed', 'read error');
    }
    return last;
  }

  private async writeAll(v: Volume, io: UpstreamIo, sides: { disk: string; at: number; state: string }[], buf: Buffer | null, len: number): Promise<number> {
    const targets = sides.filter((x) => x.state !== 'dead');
    if (targets.length === 0) return EIO;
    const results = await Promise.all(targets.map((s) => diskIo((d) => {
      const disk = this.disks.get(s.disk)!;
      if (io.op === UpstreamOp.WRITE) disk.write(buf!, s.at, io.fua, d);
      else if (io.op === UpstreamOp.TRIM) disk.trim(s.at, len, io.fua, d);
      else disk.zero(s.at, len, { noHole: false, fastOnly: false, fua: io.fua }, d);
    })));
    let ok = 0;
    for (let i = 0; i < results.length; i++) {
      if (results[i]! >= 0) ok++;
      else if (targets.length > 1) await this.diskFailed(targets[i]!.disk, 'failed', 'write error');
    }
    if (ok === 0) return results[0]! < 0 ? results[0]! : EIO;
    if (ok < targets.length) await this.prepareWrite(v, io.offsetBytes, io.lengthBytes);
    return 0;
  }

  /** This node may write extent `e` of a mirrored volume: it holds the extent's mirror-write oplock, and is not giving it up. */
  private writeHeld(v: Volume, e: number): boolean {
    return v.activeSet.has(e) && !v.activePending.has(e) && !v.releasing.has(e);
  }

  /** Every extent of the range is write-held and has its age recorded (synchronous check, just before issuing). */
  private writeReady(v: Volume, offsetBytes: number, lengthBytes: number): boolean {
    if (v.header.journal && (!v.jnlHeld || v.jnlReleasing)) return false;
    if (this.cowPending(v, offsetBytes, lengthBytes) || this.sharedIn(v, offsetBytes, lengthBytes)) return false;
    if (this.inMigrationCopy(v, offsetBytes, lengthBytes)) return false;
    if (!isMirrored(v.header.layout)) return true;
    const E = this.root.extentBytes;
    for (let e = Math.floor(offsetBytes / E); e <= Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / E); e++) {
      if (!this.writeHeld(v, e) || this.needsAge(v, e) || v.copying.has(e)) return false;
    }
    return true;
  }

  /**
   * Before the CP writes (or lets the FP write) to a mirrored range: this node holds
   * the mirror-write oplock of every allocation extent it touches (non-volatile: the
   * ownership is in this node's journal, which is the activity log a crash leaves
   * behind), and, while degraded, the age list records the current generation for
   * each. Then the FP's cached mappings of the range are dropped, so the next miss
   * maps it without fault-on-write.
   */
  private async prepareWrite(v: Volume, offsetBytes: number, lengthBytes: number): Promise<void> {
    const E = this.root.extentBytes;
    const first = Math.floor(offsetBytes / E);
    const last = Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / E);
    const mirrored = isMirrored(v.header.layout);
    // A write inside the migration's copy barrier waits for the barrier to move.
    while (this.inMigrationCopy(v, offsetBytes, lengthBytes) && !v.gone) await new Promise<void>((r) => v.wakers.push(r));
    // Snapshots and clones first: the base's data must be in place before the write.
    if (await this.materializeRange(v, offsetBytes, lengthBytes)) v.fp.removeMapping(offsetBytes, Math.max(lengthBytes, 1));
    const waits: Promise<void>[] = [];
    const ages: number[] = [];
    let remap = false;
    for (let e = first; e <= last; e++) {
      if (mirrored) {
        const releasing = v.releasing.get(e);
        if (releasing) waits.push(releasing.then(() => this.holdExtent(v, e)));
        else if (!v.activeSet.has(e) || v.activePending.has(e)) waits.push(this.holdExtent(v, e));
        if (v.closing.delete(e)) remap = true;
        v.activeEpoch.set(e, (v.activeEpoch.get(e) ?? 0) + 1);
      }
      if (this.needsAge(v, e)) ages.push(e);
    }
    if (v.header.journal && (!v.jnlHeld || v.jnlReleasing)) waits.push(this.holdJournal(v));
    await Promise.all(waits);
    if (waits.length > 0) remap = true;
    if (ages.length > 0) {
      // The age list is shared: take the header oplock (unrestrictive: nobody stops
      // serving), reread, add, write.
      await this.withVolumes([v], false, async () => {
        const missing = ages.filter((e) => this.needsAge(v, e));
        if (missing.length === 0) return;
        for (const e of missing) v.age.set(e, this.root.generation);
        await writeVolumeHeader(this.store, v);
      });
      remap = true;
    }
    if (remap) v.fp.removeMapping(first * E, (last - first + 1) * E);
  }

  /** Take the volume's journal oplock, then reread where the journal stands (another node may have appended). */
  private holdJournal(v: Volume): Promise<void> {
    if (v.jnlPending) return v.jnlPending;
    const p = (async () => {
      if (v.jnlReleasing) await v.jnlReleasing;
      if (v.jnlHeld) return;
      await this.cluster.hold(jnlLock(v));
      await this.reloadVolume(v);
      v.journal = v.fp.journal = await this.openJournal(v);
      v.jnlHeld = true;
      v.fp.removeAllMappings();
    })().finally(() => (v.jnlPending = null));
    v.jnlPending = p;
    return p;
  }

  /** Take the mirror-write oplock of extent `e` (once per extent, however many writers wait). */
  private holdExtent(v: Volume, e: number): Promise<void> {
    const pending = v.activePending.get(e);
    if (pending) return pending;
    if (v.activeSet.has(e) && !v.releasing.has(e)) return Promise.resolve();
    // Fairness: right after giving the extent to a peer, let the peer have it a moment
    // (a lower node id would otherwise win every race for a hot extent).
    const since = Date.now() - (v.yielded.get(e) ?? 0);
    const wait = since < YIELD_MS ? new Promise<void>((r) => setTimeout(r, YIELD_MS - since)) : Promise.resolve();
    const p = wait.then(() => this.cluster.hold(mwLock(v, e))).then(() => {
      if (v.gone) {
        this.cluster.unhold(mwLock(v, e));
        return;
      }
      v.activeSet.add(e);
    }).finally(() => v.activePending.delete(e));
    v.activePending.set(e, p);
    return p;
  }

  private startTimers(): void {
    const every = (ms: number, f: () => Promise<void>): void => {
      let busy = false;
      const t = setInterval(() => {
        if (busy) return;
        busy = true;
        f().catch((err: Error) => this.log.error({ err: err.message }, 'background task failed')).finally(() => (busy = false));
      }, ms);
      t.unref();
      this.timers.push(t);
    };
    every(ACTIVITY_SWEEP_MS, async () => {
      for (const v of [...this.volumes.values()]) await this.sweepActivity(v);
    });
    every(HEALTH_FLUSH_MS, () => this.healthFlush());
  }

  /**
   * Make written disks durable every few seconds. A buffered write's I/O error may only
   * show at write-back: the flush finds it and fails the disk; the writes it may have
   * lost are all in extents of the activity log, which the resync then copies.
   */
  private async healthFlush(): Promise<void> {
    for (const d of this.disks.values()) {
      if (d.state !== 'online' || !d.dirty) continue;
      d.dirty = false;
      const r = await diskIo((done) => d.flush(done));
      if (r < 0) await this.diskFailed(d.id, 'failed', `flush failed (${r}): write-back error`, true);
    }
  }

  /**
   * Give up idle mirror-write oplocks (the seed's sweeping process): mark the extents
   * closing (new writes fault and keep them), revoke the FP's mappings and drain, make
   * the disks durable, then release the extents no write touched meanwhile. Their
   * records leave this node's journal with the release.
   */
  private async sweepActivity(v: Volume): Promise<void> {
    if (v.activeSet.size === 0 || v.sweeping || v.gone) return;
    v.sweeping = true;
    try {
      const epochs = new Map([...v.activeSet].filter((e) => !v.releasing.has(e)).map((e) => [e, v.activeEpoch.get(e) ?? 0]));
      for (const e of epochs.keys()) v.closing.add(e);
      const revokedAt = v.fp.removeAllMappings();
      await v.fp.drain(revokedAt);
      for (const id of this.volumeDisks(v)) {
        const d = this.disks.get(id)!;
        if (d.state !== 'online') continue;
        const r = await diskIo((done) => d.flush(done));
        if (r < 0) {
          await this.diskFailed(id, 'failed', `flush failed (${r}): write-back error`, true);
          return; // keep the extents: they are what a resync must copy
        }
      }
      for (const [e, epoch] of epochs) {
        if (v.closing.has(e) && (v.activeEpoch.get(e) ?? 0) === epoch && v.activeSet.has(e) && !v.releasing.has(e)) {
          v.activeSet.delete(e);
          v.closing.delete(e);
          v.activeEpoch.delete(e);
          this.cluster.unhold(mwLock(v, e));
        }
      }
    } finally {
      v.sweeping = false;
    }
  }

  /**
   * Copy a range of a mirrored volume from its first live side to `toDisk`'s side, or
   * (toDisk null) to every other live side. Returns the bytes written.
   */
  private async copyRange(v: Volume, startBytes: number, lengthBytes: number, toDisk: string | null): Promise<number> {
    const buf = Buffer.allocUnsafe(COPY_CHUNK_BYTES);
    let written = 0;
    const touched = new Set<string>();
    const end = startBytes + lengthBytes;
    for (let pos = startBytes; pos < end;) {
      const r = v.map.resolve(pos);
      if (!r) break;
      const n = Math.min(end - pos, r.extentRemainingBytes, COPY_CHUNK_BYTES);
      for (const piece of mapRange(r.entry.storage, r.relativeBytes, n)) {
        const src = piece.targets.findIndex((t) => this.sideState(v, t.disk) === 'live');
        const dsts = piece.targets
          .map((t, i) => ({ t, i }))
          .filter(({ t, i }) => i !== src && (toDisk === null ? this.sideState(v, t.disk) === 'live' : t.disk === toDisk));
        if (dsts.length === 0) continue;
        if (src < 0) throw new Error(`no live side to copy from for volume ${v.header.name}`);
        const slice = buf.subarray(0, piece.lengthBytes);
        const rr = await diskIo((d) => this.disks.get(piece.targets[src]!.disk)!.read(slice, piece.physicalOffsets[src]!, d));
        if (rr < 0) throw new Error(`copy: reading disk ${piece.targets[src]!.disk} failed (${rr})`);
        for (const { t, i } of dsts) {
          const wr = await diskIo((d) => this.disks.get(t.disk)!.write(slice, piece.physicalOffsets[i]!, false, d));
          if (wr < 0) throw new Error(`copy: writing disk ${t.disk} failed (${wr})`);
          written += piece.lengthBytes;
          touched.add(t.disk);
        }
      }
      pos += n;
    }
    for (const id of touched) {
      const r = await diskIo((d) => this.disks.get(id)!.flush(d));
      if (r < 0) throw new Error(`copy: flushing disk ${id} failed (${r})`);
    }
    return written;
  }

  /** Write a volume's header chunk (call with its header oplock held). */
  private persistHeader(v: Volume): Promise<void> {
    if (v.header.base) v.header.shared = setToBitmap(v.sharedSet, Math.ceil(v.header.sizeBytes / this.unitBytes(v)));
    return writeVolumeHeader(this.store, v);
  }

  private async waitForCopies(v: Volume, offsetBytes: number, lengthBytes: number): Promise<void> {
    const E = this.root.extentBytes;
    for (let e = Math.floor(offsetBytes / E); e <= Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / E); e++) {
      const p = v.copying.get(e);
      if (p) await p;
    }
  }

  // ── disks and mirror sides ───────────────────────────────────────────────
  /**
   * A disk stops taking I/O. The state flips here and every FP mapping that could
   * reach the disk is revoked at once, before anything can yield; then, under the root
   * oplock and the header oplocks of the volumes with a side on it, the generation is
   * bumped and the sides are recorded stale, so every other node revokes, drains and
   * rereads before it serves those volumes again.
   */
  private async diskFailed(id: string, state: 'failed' | 'offline', reason: string, full = false): Promise<void> {
    const disk = this.disks.get(id);
    if (!disk) return;
    if (disk.state !== 'online') {
      // Already out; a flush failure still widens what the resync must copy.
      if (full) await this.ageActiveExtents(id);
      return;
    }
    disk.state = state;
    const affected = [...this.volumes.values()].filter((v) => this.volumeDisks(v).includes(id));
    for (const v of affected) v.fp.removeAllMappings();
    const touched: string[] = [];
    await this.withRoot(async () => {
      // The reread root may say the disk is online (we flipped it only here): it is not.
      this.disks.get(id)!.state = state;
      this.root.generation++;
      const generation = this.root.generation;
      for (const v of affected) {
        if (v.gone) continue;
        v.resyncing.delete(id);
        v.header.stale = v.header.stale.map((s) => (s.disk === id ? { disk: s.disk, sinceGeneration: s.sinceGeneration } : s));
        if (isMirrored(v.header.layout) && !v.header.stale.some((s) => s.disk === id)) {
          v.header.stale.push({ disk: id, sinceGeneration: generation });
          // A flush failure: writes since the disk's last good flush may be lost; they all
          // went to extents this node still holds (released only after a good flush).
          if (full) for (const e of v.activeSet) v.age.set(e, generation);
          touched.push(v.header.name);
        }
        await this.persistHeader(v);
      }
      await this.commitRoot();
      this.log.warn({ disk: id, state, reason, generation, volumes: touched }, state === 'failed' ? 'disk failed, mirror degraded' : 'disk offline, mirror degraded');
      for (const v of affected) {
        const st = v.header.stale.find((x) => x.disk === id);
        if (st && touched.includes(v.header.name)) void this.reportSideState(v, id, st.sinceGeneration);
      }
    }, affected);
  }

  /** Meet the other nodes at the mirror-side-state synchronization point of this change. */
  private reportSideState(v: Volume, disk: string, generation: number): Promise<void> {
    const side = [...this.disks.keys()].indexOf(disk);
    const mask = maskOf([this.nodeId, ...this.cluster.livePeers()]);
    const ev = mirrorSideStateSync(v.header.name, Math.max(0, side), 'degraded', mask, `gen${generation}`, { timeoutTicks: 50 });
    return this.syncPoint(ev).then((r) => {
      if (r.state === 'passed') this.log.info({ volume: v.header.name, disk, generation }, 'every node switched the mirror side to degraded');
      else this.log.warn({ volume: v.header.name, disk, generation, waitingFor: r.waitingFor }, 'mirror side state: some nodes did not report the switch in time');
    }, (err: Error) => this.log.warn({ err: err.message }, 'mirror side state sync failed'));
  }

  /** Writes to `id` since its last good flush may be lost: resync its sides of every extent this node holds. */
  private async ageActiveExtents(id: string): Promise<void> {
    for (const v of [...this.volumes.values()]) {
      if (v.activeSet.size === 0 || !v.header.stale.some((x) => x.disk === id)) continue;
      await this.withVolumes([v], false, async () => {
        const stale = v.header.stale.find((x) => x.disk === id);
        if (!stale) return;
        let changed = false;
        for (const e of v.activeSet) {
          if ((v.age.get(e) ?? 0) < stale.sinceGeneration) {
            v.age.set(e, stale.sinceGeneration);
            changed = true;
          }
        }
        if (changed) await this.persistHeader(v);
      });
    }
  }

  /** CP API: a FLUSH found disks that cannot make writes durable. */
  flushFailed(volume: string, disks: string[], done: (result: number) => void): void {
    (async () => {
      for (const d of disks) await this.diskFailed(d, 'failed', 'flush failed (write-back error)', true);
      const v = this.volumes.get(volume);
      if (!v) return EIO;
      const used = this.volumeDisks(v);
      if (!disks.some((d) => used.includes(d))) return 0;
      return isMirrored(v.header.layout) && this.hasLiveCopy(v) ? 0 : EIO;
    })().then(done, (err: Error) => {
      this.log.error({ volume, err: err.message }, 'handling a flush failure failed');
      done(EIO);
    });
  }

  /** Every stripe column of every extent still has a live side. */
  private hasLiveCopy(v: Volume): boolean {
    for (const vs of v.map.vsegs) {
      for (const [, e] of vs.redirects.entries()) {
        const st = e.storage;
        const columns = st.kind === 'mirrored' ? [st.sides] : st.kind === 'striped-mirrored' ? st.columns : [placementsOf(st)];
        if (!columns.every((sides) => sides.some((p) => this.sideState(v, p.disk) === 'live'))) return false;
      }
    }
    return true;
  }

  listDisks(): DiskInfo[] {
    const usage = new Map(this.allocator.usage().map((u) => [u.disk, u]));
    return [...this.disks.values()].map((d) => ({
      id: d.id, path: d.file.path, sizeBytes: d.sizeBytes, blockDevice: d.file.isBlockDevice, state: d.state,
      extentBytes: this.root.extentBytes, extents: usage.get(d.id)?.extents ?? 0, freeExtents: usage.get(d.id)?.freeExtents ?? 0,
    }));
  }

  async offlineDisk(id: string): Promise<DiskInfo> {
    const d = this.disks.get(id);
    if (!d) throw new AdminError('ENOENT', `no disk named ${id}`);
    if (d.state === 'online') {
      for (const v of this.volumes.values()) {
        if (!this.volumeDisks(v).includes(id)) continue;
        if (v.header.layout === 'linear' || v.header.layout === 'striped') {
          throw new AdminError('EBUSY', `disk ${id} holds extents of volume ${v.header.name} (${v.header.layout}), which has no other copy`);
        }
        const others = this.volumeDisks(v).filter((x) => x !== id && this.sideState(v, x) === 'live');
        if (others.length === 0) throw new AdminError('EBUSY', `disk ${id} holds the last live copy of volume ${v.header.name}`);
      }
      await this.diskFailed(id, 'offline', 'taken offline by the operator');
      // Restrictive change: wait for I/O that may still use the old mappings.
      for (const v of this.volumes.values()) await v.fp.drain(Number.MAX_SAFE_INTEGER - 1);
    }
    return this.listDisks().find((x) => x.id === id)!;
  }

  async onlineDisk(id: string): Promise<TaskInfo | null> {
    const d = this.disks.get(id);
    if (!d) throw new AdminError('ENOENT', `no disk named ${id}`);
    if (d.state !== 'online') {
      // A write-back error from before it failed is reported by the next fdatasync once:
      // take that one, then the disk must flush cleanly to come back.
      await diskIo((done) => d.file.flush(done));
      const r = await diskIo((done) => d.file.flush(done));
      if (r < 0) throw new AdminError('EIO', `disk ${id} still fails to flush (${r}); it stays ${d.state}`);
      await this.withRoot(async () => {
        d.state = 'online';
        await this.commitRoot();
      });
      this.log.info({ disk: id }, 'disk online');
    }
    return this.startResync(id);
  }

  /** Start (or return the running) resync of the stale mirror sides on `disk`. */
  private startResync(disk: string): TaskInfo | null {
    const running = this.tasks.find((t) => t.info.kind === 'resync' && t.info.target === `disk ${disk}` && t.info.state === 'running');
    if (running) return running.info;
    const vols = [...this.volumes.values()].filter((v) => v.header.stale.some((s) => s.disk === disk));
    if (vols.length === 0) return null;
    const info: TaskInfo = {
      id: `resync-${disk}-${Date.now()}`, kind: 'resync', target: `disk ${disk}`, state: 'running', doneBytes: 0, totalBytes: 0,
      percent: 0, rateBytesPerSec: 0, startedAt: new Date().toISOString(), finishedAt: null, message: null,
    };
    const task: Task = { info, cancelled: false };
    this.tasks.push(task);
    const lock = rsyLock([...this.disks.keys()].indexOf(disk));
    void this.cluster.hold(lock).then(() => this.resync(task, disk, vols)).finally(() => this.cluster.unhold(lock)).catch((err: Error) => {
      info.state = task.cancelled ? 'cancelled' : 'failed';
      info.message = err.message;
      info.finishedAt = new Date().toISOString();
      this.log.error({ disk, err: err.message }, 'resync failed');
    });
    return info;
  }

  private async resync(task: Task, disk: string, vols: Volume[]): Promise<void> {
    const E = this.root.extentBytes;
    const started = Date.now();
    const plan: { v: Volume; extents: number[]; since: number }[] = [];
    // The side takes writes from now on (on every node: the state is in the headers,
    // changed under their oplocks), but no reads until it has caught up.
    await this.withVolumes(vols, true, async () => {
      for (const v of vols) {
        const stale = v.header.stale.find((s) => s.disk === disk);
        if (!stale || v.gone) continue;
        const since = stale.sinceGeneration;
        const extents = [...v.age.entries()].filter(([, g]) => g >= since).map(([e]) => e).sort((a, b) => a - b);
        plan.push({ v, extents, since });
        stale.resyncing = true;
        v.resyncing.add(disk);
        await this.persistHeader(v);
        const revokedAt = v.fp.removeAllMappings();
        await v.fp.drain(revokedAt);
      }
    });
    task.info.totalBytes = plan.reduce((a, p) => a + p.extents.length * E, 0);
    let dirtiedBytes = 0;
    for (const { v, extents } of plan) {
      dirtiedBytes += extents.length * E;
      for (const e of extents) {
        if (task.cancelled || this.disks.get(disk)?.state !== 'online') throw new Error(`resync of disk ${disk} stopped`);
        await this.copyExtent(v, e, disk);
        task.info.doneBytes += E;
        const secs = (Date.now() - started) / 1000;
        task.info.rateBytesPerSec = secs > 0 ? Math.round(task.info.doneBytes / secs) : 0;
        task.info.percent = task.info.totalBytes === 0 ? 100 : Math.round((task.info.doneBytes / task.info.totalBytes) * 1000) / 10;
      }
    }
    await this.withVolumes(plan.map((p) => p.v).filter((v) => !v.gone), true, async () => {
      for (const { v } of plan) {
        if (v.gone) continue;
        v.header.stale = v.header.stale.filter((s) => s.disk !== disk);
        v.resyncing.delete(disk);
        if (v.header.stale.length === 0) v.age.clear();
        await this.persistHeader(v);
        v.fp.removeAllMappings(); // the side becomes readable
      }
    });
    task.info.state = 'done';
    task.info.percent = 100;
    task.info.finishedAt = new Date().toISOString();
    this.log.info({ disk, copiedBytes: task.info.doneBytes, dirtiedBytes, volumes: plan.map((p) => p.v.header.name), ms: Date.now() - started }, 'resync done');
  }

  /** Copy one allocation extent of volume space from a live side to `disk`'s side, with host writes to it held. */
  private async copyExtent(v: Volume, e: number, disk: string): Promise<void> {
    const E = this.root.extentBytes;
    let release!: () => void;
    const prev = v.copying.get(e);
    if (prev) await prev;
    // Holding the extent's mirror-write oplock keeps every other node's writes out of it.
    await this.holdExtent(v, e);
    v.copying.set(e, new Promise<void>((r) => (release = r)));
    try {
      const revokedAt = v.fp.removeMapping(e * E, E);
      await v.fp.drain(revokedAt, e * E, E);
      await this.copyRange(v, e * E, Math.min(E, v.header.sizeBytes - e * E), disk);
    } finally {
      v.copying.delete(e);
      release();
    }
  }

  // ── verify and status ────────────────────────────────────────────────────
  async verifyVolume(name: string): Promise<VerifyReport> {
    const v = this.volume(name);
    const report: VerifyReport = { volume: name, comparedBytes: 0, mismatches: [] };
    const chunk = COPY_CHUNK_BYTES;
    for (let pos = 0; pos < v.header.sizeBytes;) {
      const r = v.map.resolve(pos);
      if (!r) break;
      const n = Math.min(v.header.sizeBytes - pos, r.extentRemainingBytes, chunk);
      for (const piece of mapRange(r.entry.storage, r.relativeBytes, n)) {
        if (piece.targets.length < 2) continue;
        const copies: Buffer[] = [];
        for (let i = 0; i < piece.targets.length; i++) {
          const b = Buffer.alloc(piece.lengthBytes);
          const t = piece.targets[i]!;
          if (this.sideState(v, t.disk) !== 'live') { copies.push(b); continue; }
          const rr = await diskIo((d) => this.disks.get(t.disk)!.read(b, piece.physicalOffsets[i]!, d));
          if (rr < 0) throw new AdminError('EIO', `verify: reading disk ${t.disk} failed`);
          copies.push(b);
        }
        const differing: number[] = [];
        for (let i = 1; i < copies.length; i++) {
          if (this.sideState(v, piece.targets[i]!.disk) === 'live' && this.sideState(v, piece.targets[0]!.disk) === 'live' && !copies[i]!.equals(copies[0]!)) differing.push(i);
        }
        if (differing.length > 0) {
          const off = pos + piece.bufferOffsetBytes;
          const last = report.mismatches.at(-1);
          if (last && last.offsetBytes + last.lengthBytes === off && last.sides.join() === differing.join()) last.lengthBytes += piece.lengthBytes;
          else report.mismatches.push({ offsetBytes: off, lengthBytes: piece.lengthBytes, sides: differing });
        }
        report.comparedBytes += piece.lengthBytes;
      }
      pos += n;
    }
    return report;
  }

  status(): NodeStatus {
    const cs = this.cluster.status();
    const self: NodeInfo = {
      ...(this.nodeInfo ?? { id: this.nodeId, pid: process.pid, state: 'booting', nbd: { host: '', port: 0 }, admin: { host: '', port: 0 }, startedAt: null }),
      boot: cs.boot, oplocks: cs.oplocks, journalRecords: cs.journalRecords,
    };
    const nodes: NodeInfo[] = [self];
    for (const m of cs.members) {
      const c = this.config.nodes.find((n) => n.id === m.id);
      nodes.push({
        id: m.id, pid: null, state: m.state === 'up' ? 'joined' : m.state, nbd: c?.nbd ?? { host: '', port: 0 }, admin: c?.admin ?? { host: '', port: 0 },
        mesh: c?.mesh, startedAt: null, evictions: m.evictions,
      });
    }
    nodes.sort((a, b) => a.id - b.id);
    const exporting = nodes.filter((n) => n.state === 'online' || n.state === 'joined').map((n) => n.id);
    return {
      nodes,
      cluster: {
        evictor: cs.evictor, quorum: cs.quorum, recovery: { ...this.recovery },
        messages: { sent: cs.stats.messagesSent, received: cs.stats.messagesReceived, rejected: cs.stats.rejected }, paused: this.pausedOps(),
      },
      volumes: this.listVolumes().map((v) => ({ ...v, nodes: exporting })),
      disks: this.listDisks(),
      tasks: this.tasks.map((t) => t.info),
      metadata: { path: this.config.metadata.path, chunkCount: this.store.chunkCount, chunksUsed: this.usedChunks().size, chunkBytes: this.store.chunkBytes },
    };
  }

}

function descriptorFor(shape: { layout: Layout; copies: number; stripeBytes: number; columns: number }, p: Placement[]): StorageDescriptor {
  switch (shape.layout) {
    case 'linear':
      return { kind: 'linear', at: p[0]! };
    case 'striped':
      return { kind: 'striped', stripeBytes: shape.stripeBytes, columns: p };
    case 'mirrored':
      return { kind: 'mirrored', sides: p };
    case 'striped-mirrored': {
      const columns: Placement[][] = [];
      for (let c = 0; c < shape.columns; c++) columns.push(p.slice(c * shape.copies, (c + 1) * shape.copies));
      return { kind: 'striped-mirrored', stripeBytes: shape.stripeBytes, columns };
    }
  }
}

/** The same physical extents, each allocation extent once, as runs. */
function uniqueExtents(list: PhysicalExtent[], E: number): PhysicalExtent[] {
  const byDisk = new Map<string, Set<number>>();
  for (const x of list) {
    let s = byDisk.get(x.disk);
    if (!s) byDisk.set(x.disk, (s = new Set()));
    for (let off = x.offsetBytes; off < x.offsetBytes + x.lengthBytes; off += E) s.add(off);
  }
  const out: PhysicalExtent[] = [];
  for (const [disk, s] of byDisk) {
    const offs = [...s].sort((a, b) => a - b);
    for (let i = 0; i < offs.length;) {
      let j = i;
      while (j + 1 < offs.length && offs[j + 1] === offs[j]! + E) j++;
      out.push({ disk, offsetBytes: offs[i]!, lengthBytes: (j - i + 1) * E });
      i = j + 1;
    }
  }
  return out;
}

function diskIo(f: (done: IoDone) => void): Promise<number> {
  return new Promise((resolve) => f(resolve));
}

/**
 * Open (or, first of all the nodes, create and format) the shared metadata area. The
 * node that creates `<path>.formatting` exclusively formats and writes the root; the
 * others wait for it to finish.
 */
async function openMetadataArea(config: Config, log: Logger): Promise<{ dev: FileMetaDevice; store: ChunkStore }> {
  const file = config.metadata.path;
  const lockFile = `${file}.formatting`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (!fs.existsSync(file)) {
      fs.mkdirSync(path.dirname(file), { recursive: true });
      let formatter = false;
      try {
        fs.closeSync(fs.openSync(lockFile, 'wx'));
        formatter = true;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        // A formatter that died leaves its lock behind: take over after a while.
        try {
          if (Date.now() - fs.statSync(lockFile).mtimeMs > 30_000) fs.rmSync(lockFile, { force: true });
        } catch { /* gone meanwhile */ }
      }
      if (formatter) {
        try {
          const dev = await FileMetaDevice.open(file, { sizeBytes: config.metadata.sizeBytes, create: true });
          const store = await ChunkStore.format(dev, {});
          store.shared = true;
          const root: RootRecord = {
            format: METADATA_FORMAT, extentBytes: config.extentBytes, generation: 1,
            disks: config.disks.map((d) => ({ id: d.id, state: 'online' as const })), volumes: [],
          };
          await store.writeChunk(ROOT_CHUNK, root);
          log.info({ path: file, chunks: store.chunkCount }, 'metadata area formatted');
          return { dev, store };
        } finally {
          fs.rmSync(lockFile, { force: true });
        }
      }
    } else if (!fs.existsSync(lockFile)) {
      const dev = await FileMetaDevice.open(file, {});
      try {
        const store = await ChunkStore.open(dev);
        store.shared = true;
        return { dev, store };
      } catch (e) {
        await dev.close().catch(() => {});
        throw new Error(`metadata area ${file}: ${(e as Error).message}`);
      }
    }
    if (Date.now() > deadline) throw new Error(`metadata area ${file}: another node has been formatting it for a minute (${lockFile}); remove that file if no node is running`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
