/**
 * Runs a `SyncEndpoint` (sync-point.ts, seed 000) over the peer mesh: the only code
 * that touches time and sockets for synchronization points. The endpoint stays pure.
 *
 * - Wire: mesh message type `'sync'`, body `{ key, scope, seq }` (a `SyncBroadcast`).
 *   Incoming bodies are checked here (plain map, integer key, non-empty scope string,
 *   non-negative integer seq) and again by the endpoint's `report` event; a malformed
 *   one is counted (`stats().malformed`) and logged at debug, never thrown.
 * - Flushing: after every event stepped in (start, report, tick, stop), everything
 *   `ready()` holds is handled at once: each broadcast is sent to every node `peers()`
 *   names (this node excluded), passed and timed-out syncs resolve their `start`.
 * - Time: a **tick is `tickMs` of wall-clock time** (default 100 ms, the size the
 *   endpoint's defaults assume). Timeouts in start events are given in ticks; use
 *   `msToTicks`. The timer steps in the ticks that really elapsed (a blocked event
 *   loop catches up in one step, and `start` first steps in any overdue ticks), so a
 *   timeout of N ticks fires more than (N−1)·tickMs after `start` (the tick boundary
 *   is not aligned with the start), at N·tickMs plus timer lateness at most.
 *
 * Every `start` resolves exactly once, with `passed` or `timed-out`; it never rejects
 * for a timeout (it rejects only for a bad start event, or after `close`). A sync that
 * is stopped while still waiting resolves `timed-out` (it did not pass). A started
 * sync stays held by the endpoint (its key is re-sent) until `stop`: the caller stops
 * every sync it starts.
 */
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';

import {
  SyncEndpoint, nodesInMask, syncKeyName,
  type NodeId, type SyncCounters, type SyncId, type SyncKey, type SyncStartEvent, type SyncStatus,
} from './sync-point.js';

/** The mesh message type carrying sync broadcasts. */
export const SYNC_MESSAGE_TYPE = 'sync';
export const DEFAULT_SYNC_TICK_MS = 100;

const KEY_MAX = 0xffff_ffff;
const SCOPE_MAX_CHARS = 512;

/** What the driver needs of the mesh; a `Mesh` satisfies it structurally. */
export interface SyncTransport {
  readonly nodeId: number;
  send(peer: number, type: string, body: unknown): boolean;
  on(event: 'message', fn: (peer: number, type: string, body: unknown, correlationId: number) => void): unknown;
}

export interface SyncOutcome {
  sync: SyncId;
  state: 'passed' | 'timed-out';
  /**
   * Nodes of the mask this node never saw at the point while the sync waited (so
   * empty when passed). A node that reached the point and then gave up is not listed:
   * it did arrive.
   */
  waitingFor: NodeId[];
  elapsedMs: number;
}

export interface SyncDriverOptions {
  transport: SyncTransport;
  /** The live peers to broadcast to (this node, if listed, is skipped). */
  peers: () => number[];
  /** Length of one tick in ms. Default 100. */
  tickMs?: number;
  /**
   * The endpoint's first sequence number. Peers drop reports not newer than what they
   * hold, so a restarted process must start above everything it sent before. Default
   * `Date.now() * 1000` (monotonic across restarts while the clock is, and room for
   * 1000 state changes per ms).
   */
  firstSeq?: number;
  /** Re-send held keys every this many ticks (0 = never). Default: the endpoint's (10). */
  rebroadcastEveryTicks?: number;
  log: Logger;
}

export interface SyncDriverCounters extends SyncCounters {
  /** Incoming `sync` bodies rejected here, before the endpoint. */
  malformed: number;
  /** Broadcasts the transport refused (queue full, stopped, unknown peer). */
  sendFailures: number;
}

interface Pending {
  readonly promise: Promise<SyncOutcome>;
  readonly resolve: (o: SyncOutcome) => void;
  readonly startedAtMs: number;
  readonly key: SyncKey;
  readonly members: readonly NodeId[];
  /** Members seen at the key at some point during the wait (this node included). */
  readonly reached: Set<NodeId>;
}

type MessageListener = (peer: number, type: string, body: unknown, correlationId: number) => void;

export class SyncDriver {
  readonly nodeId: NodeId;
  readonly tickMs: number;
  private readonly endpoint: SyncEndpoint;
  private readonly transport: SyncTransport;
  private readonly peers: () => number[];
  private readonly log: Logger;
  private readonly pending = new Map<SyncId, Pending>();
  private readonly listener: MessageListener;
  private readonly timer: NodeJS.Timeout;
  private lastTickAtMs: number;
  private closed = false;
  private malformed = 0;
  private sendFailures = 0;

  constructor(o: SyncDriverOptions) {
    const tickMs = o.tickMs ?? DEFAULT_SYNC_TICK_MS;
    if (!(Number.isFinite(tickMs) && tickMs > 0)) throw new RangeError(`SyncDriver: tickMs must be a positive number, got ${tickMs}`);
    this.tickMs = tickMs;
    this.transport = o.transport;
    this.nodeId = o.transport.nodeId;
    this.peers = o.peers;
    this.log = o.log.child({ component: 'sync', node: this.nodeId });
    this.endpoint = new SyncEndpoint(this.nodeId, {
      firstSeq: o.firstSeq ?? Date.now() * 1000,
      ...(o.rebroadcastEveryTicks !== undefined ? { rebroadcastEveryTicks: o.rebroadcastEveryTicks } : {}),
    });
    this.listener = (peer, type, body) => {
      if (type === SYNC_MESSAGE_TYPE) this.onSyncMessage(peer, body);
    };
    o.transport.on('message', this.listener);
    this.lastTickAtMs = performance.now();
    this.timer = setInterval(() => this.onTimer(), tickMs);
    // The driver does not keep the process alive by itself; the mesh's sockets do.
    this.timer.unref();
  }

  /** A timeout in ticks that lasts at least `ms` of wall-clock time: ceil(ms / tickMs) + 1 (see the tick alignment above). */
  msToTicks(ms: number): number {
    if (!(Number.isFinite(ms) && ms > 0)) throw new RangeError(`SyncDriver.msToTicks: ms must be a positive number, got ${ms}`);
    return Math.ceil(ms / this.tickMs) + 1;
  }

  /**
   * Starts a sync (the seed's start: record and broadcast the key). Resolves when it
   * passes or times out. Starting a sync already pending returns the same promise.
   */
  start(e: SyncStartEvent): Promise<SyncOutcome> {
    if (this.closed) return Promise.reject(new Error(`SyncDriver: closed; cannot start sync ${e.sync}`));
    this.catchUp(); // overdue ticks belong before the start, not to its timeout
    const existing = this.pending.get(e.sync);
    try {
      this.endpoint.step(e);
    } catch (err) {
      this.flush();
      return Promise.reject(err instanceof Error ? err : new Error(String(err)));
    }
    if (existing !== undefined) {
      this.flush();
      return existing.promise;
    }
    let resolve!: (o: SyncOutcome) => void;
    const promise = new Promise<SyncOutcome>((r) => {
      resolve = r;
    });
    this.pending.set(e.sync, {
      promise, resolve, startedAtMs: performance.now(), key: e.key,
      members: nodesInMask(e.mask), reached: new Set([this.nodeId]),
    });
    this.log.debug({ sync: e.sync, point: syncKeyName(e.key), mask: nodesInMask(e.mask) }, 'sync started');
    this.noteReached(e.sync);
    this.flush();
    if (this.pending.has(e.sync)) {
      // Started again after it had already ended here (no new pass/timeout will come).
      const st = this.endpoint.check(e.sync);
      if (st !== undefined && st.state !== 'waiting') this.settle(e.sync, st.state);
    }
    return promise;
  }

  /**
   * Ends a sync (the seed's stop; see SyncEndpoint for what is broadcast). Stopping a
   * sync this node does not hold (never started, or already stopped) does nothing.
   * A start still waiting resolves `timed-out`.
   */
  stop(sync: SyncId, nextKey?: SyncKey): void {
    if (this.closed) return;
    if (this.endpoint.check(sync) === undefined) {
      this.log.debug({ sync }, 'sync stop: not held here; ignored');
      this.flush(); // check() may have queued a pass
      return;
    }
    try {
      this.endpoint.step(nextKey === undefined ? { kind: 'stop', sync } : { kind: 'stop', sync, nextKey });
    } catch (err) {
      this.log.error({ err, sync, nextKey }, 'sync stop failed');
    }
    this.flush();
    if (this.pending.has(sync)) {
      this.log.debug({ sync }, 'sync stopped before it passed');
      this.settle(sync, 'timed-out');
    }
  }

  /** The seed's check for one sync; undefined if not held here. */
  status(sync: SyncId): SyncStatus | undefined {
    const st = this.endpoint.check(sync);
    this.flush();
    return st;
  }

  /** Syncs held (started, not stopped). */
  held(): SyncId[] {
    return this.endpoint.held();
  }

  stats(): SyncDriverCounters {
    return { ...this.endpoint.stats(), malformed: this.malformed, sendFailures: this.sendFailures };
  }

  /** Stops the timer and stops listening; pending starts resolve `timed-out`. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    const off = (this.transport as { off?: (event: 'message', fn: MessageListener) => unknown }).off;
    if (typeof off === 'function') off.call(this.transport, 'message', this.listener);
    for (const sync of [...this.pending.keys()]) this.settle(sync, 'timed-out');
  }

  // ----------------------------------------------------------------- internals

  private onSyncMessage(peer: number, body: unknown): void {
    if (this.closed) return;
    try {
      const why = checkSyncBody(body);
      if (why !== null) {
        this.malformed++;
        this.log.debug({ peer, reason: why }, 'malformed sync message ignored');
        return;
      }
      const b = body as { key: number; scope: string; seq: number };
      this.endpoint.step({ kind: 'report', from: peer, key: b.key, scope: b.scope, seq: b.seq });
      if (this.pending.has(b.scope)) this.noteReached(b.scope);
      this.flush();
    } catch (err) {
      this.log.error({ err, peer }, 'sync message handling failed');
    }
  }

  private onTimer(): void {
    if (this.closed) return;
    try {
      this.catchUp();
    } catch (err) {
      this.log.error({ err }, 'sync tick failed');
    }
  }

  /** Steps in every whole tick elapsed since the last one. */
  private catchUp(): void {
    const ticks = Math.floor((performance.now() - this.lastTickAtMs) / this.tickMs);
    if (ticks <= 0) return;
    this.lastTickAtMs += ticks * this.tickMs;
    this.endpoint.step({ kind: 'tick', ticks });
    this.flush();
  }

  /** Records which members the table now shows at the key (monotone: once seen, counted). */
  private noteReached(sync: SyncId): void {
    const p = this.pending.get(sync);
    if (p === undefined) return;
    const st = this.endpoint.check(sync);
    if (st === undefined || st.state !== 'waiting') return;
    const waiting = new Set(st.waitingFor);
    for (const m of p.members) if (!waiting.has(m)) p.reached.add(m);
  }

  private flush(): void {
    const out = this.endpoint.ready();
    if (out.broadcast.length > 0) {
      const peers = this.livePeers();
      for (const b of out.broadcast) {
        for (const peer of peers) this.sendTo(peer, b);
      }
    }
    for (const sync of out.passed) this.settle(sync, 'passed');
    for (const sync of out.timedOut) this.settle(sync, 'timed-out');
  }

  private livePeers(): number[] {
    let peers: number[];
    try {
      peers = this.peers();
    } catch (err) {
      this.log.error({ err }, 'sync: peers() threw; broadcasting to nobody');
      return [];
    }
    return [...new Set(peers)].filter((p) => p !== this.nodeId);
  }

  private sendTo(peer: number, b: { key: SyncKey; scope: SyncId; seq: number }): void {
    let ok: boolean;
    try {
      ok = this.transport.send(peer, SYNC_MESSAGE_TYPE, { key: b.key, scope: b.scope, seq: b.seq });
    } catch (err) {
      this.sendFailures++;
      this.log.warn({ err, peer, scope: b.scope }, 'sync broadcast failed');
      return;
    }
    if (!ok) {
      this.sendFailures++;
      this.log.debug({ peer, scope: b.scope }, 'sync broadcast not queued (peer queue full or mesh stopped)');
    }
  }

  private settle(sync: SyncId, state: 'passed' | 'timed-out'): void {
    const p = this.pending.get(sync);
    if (p === undefined) return;
    this.pending.delete(sync);
    const waitingFor = state === 'passed' ? [] : p.members.filter((m) => !p.reached.has(m));
    const elapsedMs = Math.round(performance.now() - p.startedAtMs);
    if (state === 'passed') this.log.debug({ sync, elapsedMs }, 'sync point passed');
    else this.log.info({ sync, point: syncKeyName(p.key), waitingFor, elapsedMs }, 'sync point timed out');
    p.resolve({ sync, state, waitingFor, elapsedMs });
  }
}

function isPlainRecord(x: unknown): x is Record<string, unknown> {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) return false;
  const proto = Object.getPrototypeOf(x);
  return proto === Object.prototype || proto === null;
}

/** Null if `body` is a well-formed `{ key, scope, seq }`; otherwise why not. */
export function checkSyncBody(body: unknown): string | null {
  if (!isPlainRecord(body)) return 'body is not a map';
  const { key, scope, seq } = body;
  if (typeof key !== 'number' || !Number.isInteger(key) || key < 0 || key > KEY_MAX) return 'key is not a u32';
  if (typeof scope !== 'string' || scope.length === 0 || scope.length > SCOPE_MAX_CHARS) {
    return `scope is not a non-empty string of at most ${SCOPE_MAX_CHARS} chars`;
  }
  if (typeof seq !== 'number' || !Number.isSafeInteger(seq) || seq < 0) return 'seq is not a non-negative safe integer';
  return null;
}
