/**
 * The fast path (FP) of one exported volume. It is the volume's Backend: the NBD
 * connection hands it every request, and it serves the ordinary ones alone from
 * cached mappings, faulting everything else to the control path (CP):
 *
 *   lookup offset in the mapping cache ── miss ───────────────► CpMappingMiss
 *   spans past the mapping's end, or across a stripe ─────────► CpQueueIO (SPANS)
 *   fault-on-read / fault-on-write set ───────────────────────► CpQueueIO
 *   mirrored write overlapping one in flight through this FP ─► CpQueueIO (SERIALIZATION)
 *   any downstream error ─────────────────────────────────────► CpQueueIO (DOWNSTREAM_ERROR)
 *   otherwise: remap (linear), stripe (one column), or write-split (all live sides)
 *
 * Every upstream I/O is on the pending list with the time it arrived, so the CP can
 * revoke a mapping and then wait for the I/O that may still be using it (drain).
 * The FP never writes metadata.
 */
import type { Backend, BackendCapabilities, ExtentsDone, IoDone, ZeroOptions } from '../storage/backend.js';
import { placementsOf } from '../storage/layout.js';
import type { StorageDescriptor } from '../map/storage-descriptor.js';
import type { JournalWriter } from '../journal/write-journal.js';
import {
  FaultClass, UpstreamOp, nowUs,
  type CpApi, type FpApi, type FpMapping, type FpStatistics, type PendingIo, type UpstreamIo,
} from './api.js';

export const DEFAULT_MAX_CACHED_MAPPINGS = 4096;
/** Writes up to this size are journaled by the FP as one record; larger ones by the CP, cut into records. */
export const MAX_FP_JOURNAL_RECORD_BYTES = 1024 * 1024;

/** A cached mapping with its disks resolved to backends once, not per I/O. */
interface Cached {
  m: FpMapping;
  endBytes: number;
  /** linear/journal: [disk]; striped: one per column; mirrored: one per side; striped-mirrored: column-major. */
  backends: Backend[];
  offsets: number[];
  /** Mirrored: per column, the sides a read may use (live) and a write goes to (live or resyncing). */
  readSides: number[][];
  writeSides: number[][];
  sidesPerColumn: number;
  lastUsed: number;
}

class Pending implements UpstreamIo {
  id = 0;
  op = UpstreamOp.READ;
  offsetBytes = 0;
  lengthBytes = 0;
  buffer: Buffer | null = null;
  fua = false;
  receivedUs = 0;
  done: IoDone | null = null;
  /** Write-split: sides still to answer, and the first failure. */
  remaining = 0;
  /** Indexes (in placementsOf order) of the downstream I/Os that failed, for the CP. */
  failedPlacements: number[] | null = null;
  /** The storage those indexes refer to. */
  storage: StorageDescriptor | null = null;
  firstError = 0;
  cached: Cached | null = null;
  finished = false;
  /** Write-journal: the record is not down yet / the data is, with this result. */
  journalPending = false;
  dataDone = false;
  dataResult = 0;
  /** Held by the CP waiting for metadata or locks: not using any mapping, so drains skip it. */
  parked = false;
  /** The placement of a single downstream I/O (remap / stripe / mirror read). */
  placement = 0;
  /** Write-split: the placement of each side written, by call order. */
  readonly sidePlacements: number[] = [];
  /**
   * Completion callbacks bound once per pooled object, not per I/O: a closure that lives
   * across an asynchronous disk write survives scavenges, and V8 then pretenures every
   * such closure into old space, which turns into a full collection every few ms.
   */
  readonly onIssueDone = (r: number): void => this.fp.issueDone(this, r);
  readonly onJournalDone = (r: number): void => this.fp.journalDone(this, r);
  private readonly sideCallbacks: IoDone[] = [];
  constructor(private readonly fp: FastPath) {}
  complete(result: number): void {
    this.fp.finish(this, result);
  }
  sideCallback(i: number): IoDone {
    return (this.sideCallbacks[i] ??= (r: number) => this.fp.sideDone(this, this.sidePlacements[i]!, r));
  }
}

export class FastPath implements Backend, FpApi {
  /** A snapshot: the NBD layer refuses writes. */
  readOnly = false;
  readonly capabilities: BackendCapabilities = { trim: false, fastZero: false, extents: false, multiConn: true };
  readonly description: string;

  // Mapping cache: sorted by start, non-overlapping.
  private mappings: Cached[] = [];
  private useCounter = 0;
  private readCounter = 0;
  private nextId = 1;
  private readonly pending = new Set<Pending>();
  private readonly pool: Pending[] = [];
  private pendingDownstream = 0;
  private drainWaiters: { beforeUs: number; start: number; end: number; resolve: () => void }[] = [];
  /** The volume's write journal, if it has one: every FP write also appends a record. */
  journal: JournalWriter | null = null;
  private readonly stats: FpStatistics = {
    hits: 0, faults: [0, 0, 0, 0, 0, 0, 0], cpDispatched: 0, pendingUpstream: 0, pendingDownstream: 0, cachedMappings: 0,
  };

  constructor(
    readonly volume: string,
    public sizeBytes: number,
    private readonly cp: CpApi,
    private readonly disks: ReadonlyMap<string, Backend>,
    private readonly maxCached = DEFAULT_MAX_CACHED_MAPPINGS,
  ) {
    this.description = `volume ${volume}`;
  }

  // ── Backend: upstream I/O ────────────────────────────────────────────────
  read(buf: Buffer, offsetBytes: number, done: IoDone): void {
    this.submit(UpstreamOp.READ, offsetBytes, buf.length, buf, false, done);
  }

  write(buf: Buffer, offsetBytes: number, fua: boolean, done: IoDone): void {
    this.submit(UpstreamOp.WRITE, offsetBytes, buf.length, buf, fua, done);
  }

  /** Flush every disk: a FLUSH covers writes completed through any connection. */
  flush(done: IoDone): void {
    let left = this.disks.size;
    let failed: string[] | null = null;
    if (left === 0) return done(0);
    for (const [id, d] of this.disks) {
      d.flush((r) => {
        if (r < 0) (failed ??= []).push(id);
        if (--left > 0) return;
        // A disk that cannot make its writes durable is the CP's problem (a mirror
        // degrades and the host sees success; a lone copy answers EIO).
        if (failed === null) done(0);
        else this.cp.flushFailed(this.volume, failed, done);
      });
    }
  }

  // TRIM and WRITE_ZEROES change what the maps may say (a hole): the CP does them.
  trim(offsetBytes: number, lengthBytes: number, fua: boolean, done: IoDone): void {
    this.submit(UpstreamOp.TRIM, offsetBytes, lengthBytes, null, fua, done, FaultClass.SPANS);
  }

  zero(offsetBytes: number, lengthBytes: number, o: ZeroOptions, done: IoDone): void {
    this.submit(UpstreamOp.ZERO, offsetBytes, lengthBytes, null, o.fua, done, FaultClass.SPANS);
  }

  cache(_offsetBytes: number, _lengthBytes: number, done: IoDone): void {
    done(0); // advisory
  }

  extents(_offsetBytes: number, lengthBytes: number, done: ExtentsDone): void {
    done(0, [{ lengthBytes, zero: false, hole: false }]);
  }

  async close(): Promise<void> {
    await this.drain(Number.MAX_SAFE_INTEGER);
  }

  // ── the fast path proper ─────────────────────────────────────────────────
  private submit(op: UpstreamOp, offsetBytes: number, lengthBytes: number, buffer: Buffer | null, fua: boolean, done: IoDone, forceFault = -1): void {
    const p = this.pool.pop() ?? new Pending(this);
    p.id = this.nextId++;
    p.op = op;
    p.offsetBytes = offsetBytes;
    p.lengthBytes = lengthBytes;
    p.buffer = buffer;
    p.fua = fua;
    p.receivedUs = nowUs();
    p.done = done;
    p.remaining = 0;
    p.failedPlacements = null;
    p.storage = null;
    p.firstError = 0;
    p.cached = null;
    p.finished = false;
    p.journalPending = false;
    p.dataDone = false;
    p.dataResult = 0;
    p.parked = false;
    this.pending.add(p);
    if (forceFault >= 0) return this.fault(p, forceFault as FaultClass);
    this.dispatch(p, true);
  }

  /** Map and issue downstream I/O, or fault. `mayMiss`: a miss may ask the CP once. */
  private dispatch(p: Pending, mayMiss: boolean): void {
    const c = this.lookup(p.offsetBytes);
    if (c === null) {
      if (!mayMiss) return this.fault(p, FaultClass.MAPPING_MISS);
      this.stats.faults[FaultClass.MAPPING_MISS]!++;
      const answer = this.cp.mappingMiss(this.volume, p.offsetBytes, p.lengthBytes);
      if (answer.kind === 'CONTINUE') return this.dispatch(p, false);
      if (answer.kind === 'IGNORE') return this.finish(p, answer.result);
      this.stats.cpDispatched++;
      this.cp.queueIo(this.volume, p, FaultClass.MAPPING_MISS);
      return;
    }
    if (p.offsetBytes + p.lengthBytes > c.endBytes) return this.fault(p, FaultClass.SPANS);
    const write = p.op === UpstreamOp.WRITE;
    if (write ? c.m.faultOnWrite : c.m.faultOnRead) return this.fault(p, write ? FaultClass.FAULT_ON_WRITE : FaultClass.FAULT_ON_READ);
    const rel = p.offsetBytes - c.m.startBytes + c.m.relativeStartBytes;
    const s = c.m.storage;
    switch (s.kind) {
      case 'linear':
      case 'journal':
        return this.issue(p, c, 0, c.offsets[0]! + rel);
      case 'striped': {
        const col = this.stripeColumn(s.stripeBytes, s.columns.length, rel, p.lengthBytes);
        if (col < 0) return this.fault(p, FaultClass.SPANS);
        return this.issue(p, c, col, c.offsets[col]! + this.inColumn(s.stripeBytes, s.columns.length, rel));
      }
      case 'mirrored':
        return this.mirrored(p, c, 0, rel);
      case 'striped-mirrored': {
        const cols = s.columns.length;
        const col = this.stripeColumn(s.stripeBytes, cols, rel, p.lengthBytes);
        if (col < 0) return this.fault(p, FaultClass.SPANS);
        return this.mirrored(p, c, col, this.inColumn(s.stripeBytes, cols, rel));
      }
    }
  }

  /** The column a range within one stripe falls in, or -1 when it crosses a stripe boundary. */
  private stripeColumn(stripeBytes: number, columns: number, rel: number, len: number): number {
    const k = Math.floor(rel / stripeBytes);
    if (rel - k * stripeBytes + len > stripeBytes) return -1;
    return k % columns;
  }

  private inColumn(stripeBytes: number, columns: number, rel: number): number {
    const k = Math.floor(rel / stripeBytes);
    return Math.floor(k / columns) * stripeBytes + (rel - k * stripeBytes);
  }

  /**
   * Mirrored extent (`column` of a striped mirror, or 0): a read goes to one live
   * side, round-robin; a write splits to every side that takes writes (live and
   * resyncing) and is acknowledged when all of them have it.
   */
  private mirrored(p: Pending, c: Cached, column: number, inSide: number): void {
    const base = column * c.sidesPerColumn;
    if (p.op === UpstreamOp.READ) {
      const live = c.readSides[column]!;
      if (live.length === 0) return this.fault(p, FaultClass.DOWNSTREAM_ERROR);
      const side = live[(this.readCounter++) % live.length]!;
      return this.issue(p, c, base + side, c.offsets[base + side]! + inSide);
    }
    const sides = c.writeSides[column]!;
    if (sides.length === 0) return this.fault(p, FaultClass.DOWNSTREAM_ERROR);
    if (this.overlapsInflightWrite(p)) return this.fault(p, FaultClass.SERIALIZATION);
    if (!this.appendJournal(p)) return this.fault(p, FaultClass.JOURNAL_FULL);
    p.cached = c;
    p.remaining = sides.length;
    this.stats.hits++;
    for (let i = 0; i < sides.length; i++) {
      this.pendingDownstream++;
      const placement = base + sides[i]!;
      p.sidePlacements[i] = placement;
      c.backends[placement]!.write(p.buffer!, c.offsets[placement]! + inSide, p.fua, p.sideCallback(i));
    }
  }

  /** Local serialization: another write in flight through this FP overlaps this one. */
  private overlapsInflightWrite(p: Pending): boolean {
    const end = p.offsetBytes + p.lengthBytes;
    for (const q of this.pending) {
      if (q !== p && q.op === UpstreamOp.WRITE && q.offsetBytes < end && p.offsetBytes < q.offsetBytes + q.lengthBytes) return true;
    }
    return false;
  }

  sideDone(p: Pending, placement: number, r: number): void {
    this.pendingDownstream--;
    if (r < 0) {
      (p.failedPlacements ??= []).push(placement);
      if (p.firstError === 0) p.firstError = r;
    }
    if (--p.remaining > 0) return;
    if (p.failedPlacements === null) return this.dataComplete(p, 0);
    // Some side failed: the CP marks it dead, records the generation, and completes
    // the write on the live sides (the host sees no error while one side lives).
    p.storage = p.cached!.m.storage;
    this.fault(p, FaultClass.DOWNSTREAM_ERROR);
  }

  /** One downstream I/O for an upstream one (remap / stripe / one side of a mirror). */
  private issue(p: Pending, c: Cached, placement: number, physicalBytes: number): void {
    if (p.op === UpstreamOp.WRITE && !this.appendJournal(p)) return this.fault(p, FaultClass.JOURNAL_FULL);
    this.stats.hits++;
    this.pendingDownstream++;
    p.cached = c;
    p.placement = placement;
    const disk = c.backends[placement]!;
    if (p.op === UpstreamOp.READ) disk.read(p.buffer!, physicalBytes, p.onIssueDone);
    else disk.write(p.buffer!, physicalBytes, p.fua, p.onIssueDone);
  }

  issueDone(p: Pending, r: number): void {
    this.pendingDownstream--;
    if (r < 0) {
      p.firstError = r;
      p.failedPlacements = [p.placement];
      p.storage = p.cached!.m.storage;
      return this.fault(p, FaultClass.DOWNSTREAM_ERROR);
    }
    this.dataComplete(p, 0);
  }

  /** Write-journal: reserve and write this write's record; false when the journal is full. */
  private appendJournal(p: Pending): boolean {
    const j = this.journal;
    if (j === null) return true;
    if (p.lengthBytes > MAX_FP_JOURNAL_RECORD_BYTES) return false; // the CP cuts it into several records
    if (!j.tryAppend(p.offsetBytes, p.buffer!, p.fua, p.onJournalDone)) return false;
    p.journalPending = true;
    return true;
  }

  journalDone(p: Pending, r: number): void {
    if (p.finished) return; // finished on a fault path meanwhile (and kept out of the pool, see finish)
    p.journalPending = false;
    if (r < 0) p.dataResult = p.dataResult < 0 ? p.dataResult : r;
    if (p.dataDone) this.finish(p, p.dataResult);
  }

  /** The data part of a write (or a read) is done; a journaled write also waits for its record. */
  private dataComplete(p: Pending, r: number): void {
    if (!p.journalPending) return this.finish(p, p.dataResult < 0 ? p.dataResult : r);
    p.dataDone = true;
    if (r < 0) p.dataResult = r;
  }

  private fault(p: Pending, why: FaultClass): void {
    this.stats.faults[why]!++;
    this.stats.cpDispatched++;
    this.cp.queueIo(this.volume, p, why);
  }

  /** Complete an upstream I/O (from the FP or, as FPQueueIOComplete, from the CP). */
  finish(p: Pending, result: number): void {
    if (p.finished) throw new Error(`upstream I/O ${p.id} completed twice`);
    p.finished = true;
    this.pending.delete(p);
    const done = p.done!;
    p.done = null;
    p.buffer = null;
    p.cached = null;
    // A journal record still on its way will call back into this object: do not reuse it.
    if (!p.journalPending) this.pool.push(p);
    if (this.drainWaiters.length > 0) this.checkDrains();
    done(result);
  }

  // ── the mapping cache ────────────────────────────────────────────────────
  private lookup(offsetBytes: number): Cached | null {
    const a = this.mappings;
    let lo = 0;
    let hi = a.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const c = a[mid]!;
      if (offsetBytes < c.m.startBytes) hi = mid - 1;
      else if (offsetBytes >= c.endBytes) lo = mid + 1;
      else {
        c.lastUsed = ++this.useCounter;
        return c;
      }
    }
    return null;
  }

  addMapping(m: FpMapping): void {
    this.removeMapping(m.startBytes, m.lengthBytes);
    const c = this.resolve(m);
    const a = this.mappings;
    let i = 0;
    while (i < a.length && a[i]!.m.startBytes < m.startBytes) i++;
    a.splice(i, 0, c);
    if (a.length > this.maxCached) this.evictLeastRecentlyUsed();
    this.stats.cachedMappings = a.length;
  }

  replaceMapping(m: FpMapping): void {
    this.addMapping(m);
  }

  removeMapping(startBytes: number, lengthBytes: number): number {
    const end = startBytes + lengthBytes;
    this.mappings = this.mappings.filter((c) => c.endBytes <= startBytes || c.m.startBytes >= end);
    this.stats.cachedMappings = this.mappings.length;
    return nowUs();
  }

  removeAllMappings(): number {
    this.mappings = [];
    this.stats.cachedMappings = 0;
    return nowUs();
  }

  private evictLeastRecentlyUsed(): void {
    let victim = 0;
    for (let i = 1; i < this.mappings.length; i++) if (this.mappings[i]!.lastUsed < this.mappings[victim]!.lastUsed) victim = i;
    this.mappings.splice(victim, 1);
  }

  private resolve(m: FpMapping): Cached {
    const places = placementsOf(m.storage);
    const backends = places.map((pl) => {
      const b = this.disks.get(pl.disk);
      if (!b) throw new Error(`mapping for ${this.volume} names unknown disk ${pl.disk}`);
      return b;
    });
    const st = m.storage;
    const columns = st.kind === 'striped-mirrored' ? st.columns.length : 1;
    const sidesPerColumn = st.kind === 'mirrored' ? st.sides.length : st.kind === 'striped-mirrored' ? st.columns[0]!.length : 0;
    const readSides: number[][] = [];
    const writeSides: number[][] = [];
    for (let col = 0; col < columns; col++) {
      const r: number[] = [];
      const w: number[] = [];
      for (let side = 0; side < sidesPerColumn; side++) {
        const state = m.sideStates?.[col * sidesPerColumn + side] ?? 'live';
        if (state === 'live') r.push(side);
        if (state !== 'dead') w.push(side);
      }
      // Reads go round-robin among the live sides of the lowest read cost.
      const cost = (side: number): number => m.sideCosts?.[col * sidesPerColumn + side] ?? 1;
      const cheapest = Math.min(...r.map(cost));
      readSides.push(r.filter((side) => cost(side) === cheapest));
      writeSides.push(w);
    }
    return {
      m, endBytes: m.startBytes + m.lengthBytes, backends, offsets: places.map((pl) => pl.offsetBytes),
      readSides, writeSides, sidesPerColumn, lastUsed: ++this.useCounter,
    };
  }

  // ── pending I/O and drains ───────────────────────────────────────────────
  queryPendingIos(beforeUs: number, startBytes = 0, lengthBytes = Number.MAX_SAFE_INTEGER): PendingIo[] {
    const out: PendingIo[] = [];
    const end = startBytes + lengthBytes;
    for (const p of this.pending) {
      if (!p.parked && p.receivedUs <= beforeUs && p.offsetBytes < end && startBytes < p.offsetBytes + p.lengthBytes) {
        out.push({ id: p.id, op: p.op, offsetBytes: p.offsetBytes, lengthBytes: p.lengthBytes, receivedUs: p.receivedUs });
      }
    }
    return out;
  }

  /** Another write-like request, not parked, overlaps `io` (the CP orders overlapping mirrored writes). */
  overlapsActiveWrite(io: UpstreamIo): boolean {
    const end = io.offsetBytes + io.lengthBytes;
    for (const q of this.pending) {
      if (q !== io && !q.parked && q.op !== UpstreamOp.READ && q.op !== UpstreamOp.FLUSH && q.offsetBytes < end && io.offsetBytes < q.offsetBytes + q.lengthBytes) return true;
    }
    return false;
  }

  /**
   * The CP holds `io` while it waits for metadata or locks (a revocation must not wait
   * for it: it uses no mapping yet). Unparking gives it a new receive time: from then
   * on it uses the metadata as it is now, and a later revocation drains it.
   */
  park(io: UpstreamIo, parked: boolean): void {
    const p = io as Pending;
    if (!this.pending.has(p) || p.parked === parked) return;
    p.parked = parked;
    if (parked) this.checkDrains();
    else p.receivedUs = nowUs();
  }

  drain(beforeUs: number, startBytes = 0, lengthBytes = Number.MAX_SAFE_INTEGER): Promise<void> {
    if (this.queryPendingIos(beforeUs, startBytes, lengthBytes).length === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push({ beforeUs, start: startBytes, end: startBytes + lengthBytes, resolve }));
  }

  private checkDrains(): void {
    this.drainWaiters = this.drainWaiters.filter((w) => {
      if (this.queryPendingIos(w.beforeUs, w.start, w.end - w.start).length > 0) return true;
      w.resolve();
      return false;
    });
  }

  statistics(): FpStatistics {
    return { ...this.stats, faults: [...this.stats.faults], pendingUpstream: this.pending.size, pendingDownstream: this.pendingDownstream, cachedMappings: this.mappings.length };
  }
}
