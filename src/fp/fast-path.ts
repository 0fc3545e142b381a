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
import {
  FaultClass, UpstreamOp, nowUs,
  type CpApi, type FpApi, type FpMapping, type FpStatistics, type PendingIo, type UpstreamIo,
} from './api.js';

export const DEFAULT_MAX_CACHED_MAPPINGS = 4096;

/** A cached mapping with its disks resolved to backends once, not per I/O. */
interface Cached {
  m: FpMapping;
  endBytes: number;
  /** linear/journal: [disk]; striped: one per column; mirrored: one per side; striped-mirrored: column-major. */
  backends: Backend[];
  offsets: number[];
  /** Mirrored: sides a write goes to and a read may use. */
  liveSides: number[];
  lastUsed: number;
  mirrored: boolean;
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
  failedSides: number[] | null = null;
  firstError = 0;
  cached: Cached | null = null;
  finished = false;
  constructor(private readonly fp: FastPath) {}
  complete(result: number): void {
    this.fp.finish(this, result);
  }
}

export class FastPath implements Backend, FpApi {
  readonly readOnly = false;
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
    let err = 0;
    if (left === 0) return done(0);
    for (const d of this.disks.values()) {
      d.flush((r) => {
        if (r < 0 && err === 0) err = r;
        if (--left === 0) done(err);
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
    p.failedSides = null;
    p.firstError = 0;
    p.cached = null;
    p.finished = false;
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
        return this.issue(p, c, c.backends[0]!, c.offsets[0]! + rel, -1);
      case 'striped': {
        const col = this.stripeColumn(s.stripeBytes, s.columns.length, rel, p.lengthBytes);
        if (col < 0) return this.fault(p, FaultClass.SPANS);
        return this.issue(p, c, c.backends[col]!, c.offsets[col]! + this.inColumn(s.stripeBytes, s.columns.length, rel), -1);
      }
      case 'mirrored':
        return this.mirrored(p, c, 0, rel, s.sides.length);
      case 'striped-mirrored': {
        const cols = s.columns.length;
        const col = this.stripeColumn(s.stripeBytes, cols, rel, p.lengthBytes);
        if (col < 0) return this.fault(p, FaultClass.SPANS);
        return this.mirrored(p, c, col * s.columns[0]!.length, this.inColumn(s.stripeBytes, cols, rel), s.columns[0]!.length);
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

  /** Mirrored extent: a read goes to one live side, a write splits to every live side. */
  private mirrored(p: Pending, c: Cached, base: number, inSide: number, sides: number): void {
    const live = c.liveSides;
    if (p.op === UpstreamOp.READ) {
      // Round-robin over live sides (of this column, for striped-mirrored).
      let chosen = -1;
      for (let tries = 0; tries < live.length; tries++) {
        const side = live[(this.readCounter++) % live.length]!;
        if (side >= 0 && side < sides) {
          chosen = side;
          break;
        }
      }
      if (chosen < 0) return this.fault(p, FaultClass.DOWNSTREAM_ERROR);
      return this.issue(p, c, c.backends[base + chosen]!, c.offsets[base + chosen]! + inSide, -1);
    }
    if (live.length === 0) return this.fault(p, FaultClass.DOWNSTREAM_ERROR);
    if (this.overlapsInflightMirroredWrite(p)) return this.fault(p, FaultClass.SERIALIZATION);
    p.cached = c;
    p.remaining = live.length;
    this.stats.hits++;
    for (const side of live) {
      this.pendingDownstream++;
      const side0 = side;
      c.backends[base + side]!.write(p.buffer!, c.offsets[base + side]! + inSide, p.fua, (r) => this.onSideDone(p, side0, r));
    }
  }

  private overlapsInflightMirroredWrite(p: Pending): boolean {
    const end = p.offsetBytes + p.lengthBytes;
    for (const q of this.pending) {
      if (q !== p && q.op === UpstreamOp.WRITE && q.cached !== null && q.cached.mirrored && q.remaining > 0 &&
          q.offsetBytes < end && p.offsetBytes < q.offsetBytes + q.lengthBytes) return true;
    }
    return false;
  }

  private onSideDone(p: Pending, side: number, r: number): void {
    this.pendingDownstream--;
    if (r < 0) {
      (p.failedSides ??= []).push(side);
      if (p.firstError === 0) p.firstError = r;
    }
    if (--p.remaining > 0) return;
    if (p.failedSides === null) return this.finish(p, 0);
    // Some side failed: the CP marks it dead, records the generation, and completes
    // the write on the live sides (the host sees no error while one side lives).
    this.fault(p, FaultClass.DOWNSTREAM_ERROR);
  }

  /** One downstream I/O for an upstream one (remap / stripe). */
  private issue(p: Pending, c: Cached, disk: Backend, physicalBytes: number, _side: number): void {
    this.stats.hits++;
    this.pendingDownstream++;
    p.cached = c;
    const onDone = (r: number): void => {
      this.pendingDownstream--;
      if (r < 0) {
        p.firstError = r;
        return this.fault(p, FaultClass.DOWNSTREAM_ERROR);
      }
      this.finish(p, 0);
    };
    if (p.op === UpstreamOp.READ) disk.read(p.buffer!, physicalBytes, onDone);
    else disk.write(p.buffer!, physicalBytes, p.fua, onDone);
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
    this.pool.push(p);
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
    const mirrored = m.storage.kind === 'mirrored' || m.storage.kind === 'striped-mirrored';
    const sides = m.storage.kind === 'mirrored' ? m.storage.sides.length
      : m.storage.kind === 'striped-mirrored' ? m.storage.columns[0]!.length : 0;
    const liveSides: number[] = [];
    for (let s = 0; s < sides; s++) if ((m.sideStates?.[s] ?? 'live') === 'live') liveSides.push(s);
    return {
      m, endBytes: m.startBytes + m.lengthBytes, backends, offsets: places.map((pl) => pl.offsetBytes),
      liveSides, lastUsed: ++this.useCounter, mirrored,
    };
  }

  // ── pending I/O and drains ───────────────────────────────────────────────
  queryPendingIos(beforeUs: number, startBytes = 0, lengthBytes = Number.MAX_SAFE_INTEGER): PendingIo[] {
    const out: PendingIo[] = [];
    const end = startBytes + lengthBytes;
    for (const p of this.pending) {
      if (p.receivedUs <= beforeUs && p.offsetBytes < end && startBytes < p.offsetBytes + p.lengthBytes) {
        out.push({ id: p.id, op: p.op, offsetBytes: p.offsetBytes, lengthBytes: p.lengthBytes, receivedUs: p.receivedUs });
      }
    }
    return out;
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
