/**
 * Synchronization points between nodes (seed 000), as a pure machine.
 *
 * ## The seed's model
 * Every node ("director", "endpoint") owns a private **key table**: for each peer, the
 * key value that peer last reported. Key values are small integers mapped to
 * synchronization points by one table known to every node (`SYNC_POINTS`); a key
 * names the point a node is at, i.e. its current processing state.
 *
 * - **start**: the node records the point's key as its own state and broadcasts it
 *   to every other node. The sync period begins; its timeout is fixed per operation
 *   (the point's `defaultTimeoutTicks`, or the start event's `timeoutTicks`).
 * - **report**: a peer's broadcast arrives; the node writes it in its key table.
 *   Reports are stored whether or not this node has started that sync yet, so a node
 *   that arrives last finds everyone already there and passes at once.
 * - **check**: the sync **mask** (a bitmask over node ids 0..63, this node included)
 *   names who must reach the point. The point is passed when every node in the mask
 *   last reported this key in this node's own table. Tables are deliberately not kept
 *   in step: each node decides from what it has heard, so one node may pass while
 *   another, missing a report, does not (seed claims 14–15; a barrier with a timeout
 *   cannot promise agreement; what it promises is below).
 * - **stop**: when the timeout expires first, the node reports `timedOut` and
 *   broadcasts a *different* key (INVALID_KEY, or the node's next state, e.g.
 *   resume-io after a failed pause-io), so peers still waiting will not pass on its
 *   old report. A timed-out sync never passes afterwards, whatever arrives later.
 *   The application's own `stop` ends the sync period (see "stop" below).
 *
 * What a pass promises: every node in the mask had started this sync (it sent the
 * key, in this scope) and had not, as far as this node last heard, given up on it.
 * Every node that starts a sync ends it in exactly one of `passed` or `timedOut`
 * (unless the application stops it first).
 *
 * ## Scope: several syncs on the same key
 * Two pause operations in flight both use the key PAUSE_IO. So each sync instance has
 * a **scope**, a string every participant names identically (the operation's id plus
 * what it covers, built by the helpers below, e.g. `pause-io/snap-17/2v-1a2b3c4d`),
 * and `SyncId` *is* that scope. The key table is kept per scope: a node has one
 * current key in each scope, a report in scope B never overwrites what a node said in
 * scope A, and a check only reads its own scope. A scope names one instance: it is
 * never reused (start on a scope this node already finished throws).
 *
 * ## Duplicates, reordering, loss
 * Each broadcast carries a per-node sequence number, increased for every new state
 * (start, timeout, stop). The table keeps a report only if its seq is newer than the
 * one it holds for that node, so a duplicate is a no-op and a delayed old report
 * (the key, arriving after the node's stop key) cannot resurrect a node that gave up.
 * A report without seq (a FIFO link that needs none) is taken in arrival order.
 * The seed's message switch is reliable; dve's mesh can lose frames across a
 * reconnect, so a node re-sends its current key for every sync it holds every
 * `rebroadcastEveryTicks` (same seq: the re-send is a duplicate, never news).
 *
 * ## stop
 * - waiting → broadcast `nextKey` or INVALID_KEY (the seed's stop), sync ends.
 * - passed → broadcast nothing unless `nextKey` is given: peers still waiting keep
 *   this node's key and may pass too (a stop key here would fail a slower node that
 *   the passer already counted). The node just stops re-sending.
 * - timed out → the stop key went out already; `nextKey`, if given and different,
 *   is broadcast.
 * After stop the scope's table is dropped and late reports for it are ignored.
 *
 * ## States (the transitions are `SYNC_TRANSITIONS`, which the code uses)
 * ```
 *            start                     (all in mask at key)
 *   (none) ────────► waiting ─────────────pass────────────► passed ──stop──┐
 *                      │ │                                                 ▼
 *                      │ └──timeout: broadcast stop key──► timed-out ──stop─► stopped
 *                      └──────────────stop: broadcast stop key─────────────┘
 * ```
 *
 * No I/O, no timers, no logging: events in (`step`), actions out (`ready`). Time is a
 * tick count of the cluster clock (the driver's tick; defaults below are sized for a
 * 100 ms tick).
 */
import assert from 'node:assert/strict';

/** A node id, 0..MAX_NODES-1: one bit of a sync mask. */
export type NodeId = number;
/** A key value of `SYNC_POINTS`, or INVALID_KEY. */
export type SyncKey = number;
/** One sync instance: its scope, named identically by every participant. */
export type SyncId = string;
/** Bitmask over node ids 0..63 (a number only reaches node 52: prefer bigint). */
export type SyncMask = bigint | number;

/** Seed claim 11: the mask has one bit per possible node. */
export const MAX_NODES = 64;
/** "An invalid synchronization processing state" (seed claim 8). */
export const INVALID_KEY: SyncKey = 0;

export const PAUSE_IO_KEY: SyncKey = 1;
export const RESUME_IO_KEY: SyncKey = 2;
export const MIRROR_SIDE_STATE_KEY: SyncKey = 3;
export const CONSISTENCY_POINT_KEY: SyncKey = 4;

export interface SyncPointSpec {
  /** For logs: `sync point passed` names `pause-io`, not `1`. */
  readonly name: string;
  /** Seed claim 12: the timeout depends on the operation the point serves. */
  readonly defaultTimeoutTicks: number;
}

/** The shared mapping key value → synchronization point. Every node runs the same table. */
export const SYNC_POINTS: Readonly<Record<SyncKey, SyncPointSpec>> = Object.freeze({
  /** Group atomic operations: every node pauses I/O to a set of volumes. */
  [PAUSE_IO_KEY]: Object.freeze({ name: 'pause-io', defaultTimeoutTicks: 50 }),
  /** ... and resumes it. */
  [RESUME_IO_KEY]: Object.freeze({ name: 'resume-io', defaultTimeoutTicks: 50 }),
  /** A mirror side changes state (seed claim 17: mirrored writes on/off). */
  [MIRROR_SIDE_STATE_KEY]: Object.freeze({ name: 'mirror-side-state', defaultTimeoutTicks: 100 }),
  /** Replication: every node has cut the same consistency point. */
  [CONSISTENCY_POINT_KEY]: Object.freeze({ name: 'consistency-point', defaultTimeoutTicks: 300 }),
});

const KEY_MAX = 0xffff_ffff;
const SCOPE_MAX_CHARS = 512;

/** `pause-io`, `invalid`, or `key-9` for a key this build doesn't know. */
export function syncKeyName(key: SyncKey): string {
  if (key === INVALID_KEY) return 'invalid';
  return SYNC_POINTS[key]?.name ?? `key-${key}`;
}

export function isSyncPointKey(key: SyncKey): boolean {
  return Object.prototype.hasOwnProperty.call(SYNC_POINTS, key);
}

// ------------------------------------------------------------------- masks

function checkNodeId(name: string, node: number): void {
  if (!Number.isSafeInteger(node) || node < 0 || node >= MAX_NODES) {
    throw new RangeError(`${name} must be an integer node id in 0..${MAX_NODES - 1}, got ${node}`);
  }
}

/** The mask as a bigint, checked: non-negative, below 2^64, exact. */
export function toMask(mask: SyncMask): bigint {
  if (typeof mask === 'number') {
    if (!Number.isSafeInteger(mask) || mask < 0) {
      throw new RangeError(`mask must be a non-negative safe integer or a bigint, got ${mask}`);
    }
    return BigInt(mask);
  }
  if (typeof mask !== 'bigint' || mask < 0n || mask >> BigInt(MAX_NODES) !== 0n) {
    throw new RangeError(`mask must be a bigint in [0, 2^${MAX_NODES}), got ${String(mask)}`);
  }
  return mask;
}

/** A mask with these nodes' bits set. */
export function maskOf(nodes: readonly NodeId[]): bigint {
  let mask = 0n;
  for (const node of nodes) {
    checkNodeId('node', node);
    mask |= 1n << BigInt(node);
  }
  return mask;
}

/** The node ids in a mask, ascending. */
export function nodesInMask(mask: SyncMask): NodeId[] {
  const m = toMask(mask);
  const out: NodeId[] = [];
  for (let node = 0; node < MAX_NODES; node++) {
    if ((m >> BigInt(node)) & 1n) out.push(node);
  }
  return out;
}

// ------------------------------------------------------------------- events and actions

export interface SyncStartEvent {
  kind: 'start';
  sync: SyncId;
  key: SyncKey;
  /** Who must reach the point; must include this node. */
  mask: SyncMask;
  /** Default: the point's `defaultTimeoutTicks`. */
  timeoutTicks?: number;
  /** Broadcast when the timeout expires: INVALID_KEY (default) or the node's next state. */
  stopKey?: SyncKey;
}

/** A peer's broadcast, as the mesh delivered it. Network input: checked, never asserted. */
export interface SyncReportEvent {
  kind: 'report';
  from: NodeId;
  key: SyncKey;
  scope: SyncId;
  /** The sender's sequence number (`SyncBroadcast.seq`); absent = arrival order. */
  seq?: number;
}

export interface SyncTickEvent {
  kind: 'tick';
  /** Default 1. */
  ticks?: number;
}

export interface SyncStopEvent {
  kind: 'stop';
  sync: SyncId;
  /** Broadcast instead of INVALID_KEY: "another valid processing state" (claim 8). */
  nextKey?: SyncKey;
}

export type SyncEvent = SyncStartEvent | SyncReportEvent | SyncTickEvent | SyncStopEvent;

/** Send to every other node; the receiver steps it in as a `report` with `from` and `seq`. */
export interface SyncBroadcast {
  key: SyncKey;
  scope: SyncId;
  seq: number;
}

export interface SyncReady {
  broadcast: SyncBroadcast[];
  /** Syncs that passed since the last `ready()`; each appears once, ever. */
  passed: SyncId[];
  /** Syncs whose timeout expired (their stop key is in `broadcast`); each appears once, ever. */
  timedOut: SyncId[];
}

// ------------------------------------------------------------------- states

export type SyncState = 'waiting' | 'passed' | 'timed-out' | 'stopped';
export type SyncInput = 'pass' | 'timeout' | 'stop';

/** The declared state machine; `stopped` is terminal (the sync is then forgotten). */
export const SYNC_TRANSITIONS: Readonly<Record<SyncState, Readonly<Partial<Record<SyncInput, SyncState>>>>> = Object.freeze({
  waiting: Object.freeze({ pass: 'passed', timeout: 'timed-out', stop: 'stopped' }),
  passed: Object.freeze({ stop: 'stopped' }),
  'timed-out': Object.freeze({ stop: 'stopped' }),
  stopped: Object.freeze({}),
});

function transition(state: SyncState, input: SyncInput, sync: SyncId): SyncState {
  const next = SYNC_TRANSITIONS[state][input];
  assert.ok(next !== undefined, `sync ${sync}: no transition from ${state} on ${input}`);
  return next;
}

/** A transition that keeps the sync held (pass, timeout). */
function transitionHeld(state: SyncState, input: SyncInput, sync: SyncId): Exclude<SyncState, 'stopped'> {
  const next = transition(state, input, sync);
  assert.ok(next !== 'stopped', `sync ${sync}: ${input} must not end the sync`);
  return next;
}

/** What `check` answers. */
export interface SyncStatus {
  sync: SyncId;
  state: Exclude<SyncState, 'stopped'>;
  key: SyncKey;
  mask: bigint;
  /** Nodes of the mask whose last report (in this node's table, this scope) is not the key. */
  waitingFor: NodeId[];
  elapsedTicks: number;
  timeoutTicks: number;
}

export interface SyncEndpointOptions {
  /** Re-send the current key of every held sync this often; 0 = never. Default 10. */
  rebroadcastEveryTicks?: number;
  /**
   * First sequence number. Peers drop reports not newer than what they hold, so a
   * restarted node must start above everything it sent before (e.g. boot count × 2^32).
   * Default 0.
   */
  firstSeq?: number;
  /** A scope this node never started is forgotten this long after its last report. Default 6000. */
  orphanTtlTicks?: number;
  /** How many finished scopes are remembered, so late reports for them are dropped. Default 1024. */
  closedScopesMax?: number;
}

export interface SyncCounters {
  reportsAccepted: number;
  /** Same seq as held: a duplicate or a re-send. */
  reportsDuplicate: number;
  /** Older seq than held: overtaken by a newer report. */
  reportsStale: number;
  /** For a scope this node already finished. */
  reportsAfterClose: number;
  /** Malformed (bad node id, key, scope or seq; or claiming to be from this node). */
  reportsRejected: number;
}

interface TableEntry {
  key: SyncKey;
  seq: number | undefined;
}

interface ScopeTable {
  entries: Map<NodeId, TableEntry>;
  changedAtTick: number;
}

interface SyncRecord {
  sync: SyncId;
  key: SyncKey;
  mask: bigint;
  members: readonly NodeId[];
  timeoutTicks: number;
  stopKey: SyncKey;
  startedAtTick: number;
  state: Exclude<SyncState, 'stopped'>;
  /** What this node last broadcast in this scope, and its seq. */
  currentKey: SyncKey;
  currentSeq: number;
  lastSentTick: number;
}

function checkPosInt(name: string, value: number): void {
  if (!Number.isSafeInteger(value) || value <= 0) throw new RangeError(`${name} must be a positive safe integer, got ${value}`);
}

function checkNonNegInt(name: string, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`${name} must be a non-negative safe integer, got ${value}`);
}

function isScope(scope: unknown): scope is SyncId {
  return typeof scope === 'string' && scope.length > 0 && scope.length <= SCOPE_MAX_CHARS;
}

function isKey(key: unknown): key is SyncKey {
  return typeof key === 'number' && Number.isInteger(key) && key >= 0 && key <= KEY_MAX;
}

/** One node's side of every synchronization point. */
export class SyncEndpoint {
  readonly nodeId: NodeId;
  private readonly rebroadcastEveryTicks: number;
  private readonly orphanTtlTicks: number;
  private readonly closedScopesMax: number;
  private nowTicks = 0;
  private nextSeq: number;
  /** The key table, per scope: this node's private view of where everyone is. */
  private readonly tables = new Map<SyncId, ScopeTable>();
  private readonly syncs = new Map<SyncId, SyncRecord>();
  /** Finished scopes, oldest first (Set keeps insertion order). */
  private readonly closed = new Set<SyncId>();
  private out: SyncReady = { broadcast: [], passed: [], timedOut: [] };
  private readonly counters: SyncCounters = {
    reportsAccepted: 0, reportsDuplicate: 0, reportsStale: 0, reportsAfterClose: 0, reportsRejected: 0,
  };

  constructor(nodeId: NodeId, options: SyncEndpointOptions = {}) {
    checkNodeId('nodeId', nodeId);
    this.nodeId = nodeId;
    this.rebroadcastEveryTicks = options.rebroadcastEveryTicks ?? 10;
    checkNonNegInt('rebroadcastEveryTicks', this.rebroadcastEveryTicks);
    this.nextSeq = options.firstSeq ?? 0;
    checkNonNegInt('firstSeq', this.nextSeq);
    this.orphanTtlTicks = options.orphanTtlTicks ?? 6000;
    checkPosInt('orphanTtlTicks', this.orphanTtlTicks);
    this.closedScopesMax = options.closedScopesMax ?? 1024;
    checkPosInt('closedScopesMax', this.closedScopesMax);
  }

  /** Ticks stepped so far. */
  get now(): number {
    return this.nowTicks;
  }

  step(event: SyncEvent): void {
    switch (event.kind) {
      case 'start': return this.onStart(event);
      case 'report': return this.onReport(event);
      case 'tick': return this.onTick(event.ticks ?? 1);
      case 'stop': return this.onStop(event);
      default: {
        const never: never = event;
        throw new TypeError(`unknown sync event ${JSON.stringify(never)}`);
      }
    }
  }

  /** What to do since the last call: broadcasts to send, syncs passed and timed out. */
  ready(): SyncReady {
    const out = this.out;
    this.out = { broadcast: [], passed: [], timedOut: [] };
    return out;
  }

  hasReady(): boolean {
    return this.out.broadcast.length > 0 || this.out.passed.length > 0 || this.out.timedOut.length > 0;
  }

  /**
   * The seed's check: the mask against this node's key table. Undefined for a sync
   * this node does not hold (never started, or stopped).
   */
  check(sync: SyncId): SyncStatus | undefined {
    const rec = this.syncs.get(sync);
    if (rec === undefined) return undefined;
    this.evaluate(rec);
    return {
      sync,
      state: rec.state,
      key: rec.key,
      mask: rec.mask,
      waitingFor: this.missing(rec),
      elapsedTicks: this.nowTicks - rec.startedAtTick,
      timeoutTicks: rec.timeoutTicks,
    };
  }

  /** This node's table for one scope: node → last key it reported (a copy). */
  keyTable(scope: SyncId): Map<NodeId, SyncKey> {
    const table = this.tables.get(scope);
    const out = new Map<NodeId, SyncKey>();
    if (table !== undefined) for (const [node, entry] of table.entries) out.set(node, entry.key);
    return out;
  }

  /** The syncs this node holds (started and not stopped). */
  held(): SyncId[] {
    return [...this.syncs.keys()];
  }

  stats(): Readonly<SyncCounters> {
    return { ...this.counters };
  }

  // ----------------------------------------------------------------- handlers

  private onStart(e: SyncStartEvent): void {
    if (!isScope(e.sync)) throw new RangeError(`sync must be a non-empty string of at most ${SCOPE_MAX_CHARS} chars`);
    if (!isSyncPointKey(e.key)) throw new RangeError(`sync ${e.sync}: key ${e.key} is not in SYNC_POINTS`);
    const mask = toMask(e.mask);
    if (((mask >> BigInt(this.nodeId)) & 1n) === 0n) {
      throw new RangeError(`sync ${e.sync}: mask 0x${mask.toString(16)} must include this node (${this.nodeId})`);
    }
    const timeoutTicks = e.timeoutTicks ?? SYNC_POINTS[e.key]!.defaultTimeoutTicks;
    checkPosInt('timeoutTicks', timeoutTicks);
    const stopKey = e.stopKey ?? INVALID_KEY;
    this.checkStopKey(e.sync, e.key, stopKey, 'stopKey');

    const existing = this.syncs.get(e.sync);
    if (existing !== undefined) {
      // A repeated start of the same instance is harmless; a different one under the same scope is a bug.
      assert.ok(existing.key === e.key && existing.mask === mask, `sync ${e.sync}: started twice with different key or mask`);
      return;
    }
    assert.ok(!this.closed.has(e.sync), `sync ${e.sync}: scope already finished here; scopes are never reused`);

    const seq = this.nextSeq++;
    const rec: SyncRecord = {
      sync: e.sync, key: e.key, mask, members: nodesInMask(mask), timeoutTicks, stopKey,
      startedAtTick: this.nowTicks, state: 'waiting', currentKey: e.key, currentSeq: seq, lastSentTick: this.nowTicks,
    };
    this.syncs.set(e.sync, rec);
    this.record(e.sync, this.nodeId, { key: e.key, seq });
    this.out.broadcast.push({ key: e.key, scope: e.sync, seq });
    this.evaluate(rec); // the last to arrive may pass at once
  }

  private onReport(e: SyncReportEvent): void {
    if (!Number.isSafeInteger(e.from) || e.from < 0 || e.from >= MAX_NODES || e.from === this.nodeId
      || !isKey(e.key) || !isScope(e.scope)
      || (e.seq !== undefined && (!Number.isSafeInteger(e.seq) || e.seq < 0))) {
      this.counters.reportsRejected++;
      return;
    }
    if (this.closed.has(e.scope)) {
      this.counters.reportsAfterClose++;
      return;
    }
    const prev = this.tables.get(e.scope)?.entries.get(e.from);
    if (e.seq !== undefined && prev?.seq !== undefined && e.seq <= prev.seq) {
      if (e.seq === prev.seq) this.counters.reportsDuplicate++;
      else this.counters.reportsStale++;
      return;
    }
    this.counters.reportsAccepted++;
    this.record(e.scope, e.from, { key: e.key, seq: e.seq ?? prev?.seq });
    const rec = this.syncs.get(e.scope);
    if (rec !== undefined) this.evaluate(rec);
  }

  private onTick(ticks: number): void {
    checkPosInt('ticks', ticks);
    this.nowTicks += ticks;
    for (const rec of this.syncs.values()) {
      if (rec.state === 'waiting' && this.nowTicks - rec.startedAtTick >= rec.timeoutTicks) {
        this.onSyncTimeout(rec);
      } else if (this.rebroadcastEveryTicks > 0 && this.nowTicks - rec.lastSentTick >= this.rebroadcastEveryTicks) {
        this.out.broadcast.push({ key: rec.currentKey, scope: rec.sync, seq: rec.currentSeq });
        rec.lastSentTick = this.nowTicks;
      }
    }
    for (const [scope, table] of this.tables) {
      if (!this.syncs.has(scope) && this.nowTicks - table.changedAtTick >= this.orphanTtlTicks) this.tables.delete(scope);
    }
  }

  private onSyncTimeout(rec: SyncRecord): void {
    rec.state = transitionHeld(rec.state, 'timeout', rec.sync);
    this.out.timedOut.push(rec.sync);
    this.announce(rec, rec.stopKey);
  }

  private onStop(e: SyncStopEvent): void {
    if (this.closed.has(e.sync)) return; // stopping twice is harmless
    const rec = this.syncs.get(e.sync);
    if (rec === undefined) throw new RangeError(`sync ${e.sync}: stop without start`);
    if (e.nextKey !== undefined) this.checkStopKey(e.sync, rec.key, e.nextKey, 'nextKey');
    switch (rec.state) {
      case 'waiting':
        this.announce(rec, e.nextKey ?? INVALID_KEY);
        break;
      case 'passed':
        // Peers still waiting may count this node's key; say something else only when asked to.
        if (e.nextKey !== undefined) this.announce(rec, e.nextKey);
        break;
      case 'timed-out':
        if (e.nextKey !== undefined && e.nextKey !== rec.currentKey) this.announce(rec, e.nextKey);
        break;
    }
    transition(rec.state, 'stop', rec.sync);
    this.syncs.delete(e.sync);
    this.tables.delete(e.sync);
    this.closed.add(e.sync);
    if (this.closed.size > this.closedScopesMax) {
      const oldest = this.closed.values().next();
      if (oldest.done !== true) this.closed.delete(oldest.value);
    }
  }

  // ----------------------------------------------------------------- internals

  private checkStopKey(sync: SyncId, key: SyncKey, stopKey: SyncKey, name: string): void {
    if (stopKey !== INVALID_KEY && !isSyncPointKey(stopKey)) {
      throw new RangeError(`sync ${sync}: ${name} ${stopKey} is neither INVALID_KEY nor in SYNC_POINTS`);
    }
    // Seed claim 1: the stop message names "another synchronization point different from" this one.
    if (stopKey === key) throw new RangeError(`sync ${sync}: ${name} must differ from the sync's key (${syncKeyName(key)})`);
  }

  /** A new state of this node in the sync's scope: own table, broadcast, new seq. */
  private announce(rec: SyncRecord, key: SyncKey): void {
    const seq = this.nextSeq++;
    rec.currentKey = key;
    rec.currentSeq = seq;
    rec.lastSentTick = this.nowTicks;
    this.record(rec.sync, this.nodeId, { key, seq });
    this.out.broadcast.push({ key, scope: rec.sync, seq });
  }

  private record(scope: SyncId, node: NodeId, entry: TableEntry): void {
    let table = this.tables.get(scope);
    if (table === undefined) {
      table = { entries: new Map(), changedAtTick: this.nowTicks };
      this.tables.set(scope, table);
    }
    table.entries.set(node, entry);
    table.changedAtTick = this.nowTicks;
  }

  private missing(rec: SyncRecord): NodeId[] {
    const entries = this.tables.get(rec.sync)?.entries;
    return rec.members.filter((node) => entries?.get(node)?.key !== rec.key);
  }

  private evaluate(rec: SyncRecord): void {
    if (rec.state !== 'waiting') return;
    if (this.missing(rec).length > 0) return;
    rec.state = transitionHeld(rec.state, 'pass', rec.sync);
    this.out.passed.push(rec.sync);
  }
}

// ------------------------------------------------------------------- helpers for the intended uses

export interface SyncStartOptions {
  timeoutTicks?: number;
  stopKey?: SyncKey;
}

/** 32-bit FNV-1a, hex: a short, deterministic digest so the scope stays small for big groups. */
function fnv1a(text: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(16).padStart(8, '0');
}

function checkOp(op: string): void {
  if (typeof op !== 'string' || op.length === 0 || op.length > 128) throw new RangeError(`op must be a non-empty string of at most 128 chars`);
}

/**
 * `<point>/<op>/<n>v-<digest of the sorted, deduplicated volume names>`: every node
 * must name the same volume set (in any order) to meet in the same scope, and the op
 * id keeps two operations on the same volumes apart.
 */
function volumesScope(point: SyncKey, op: string, volumes: readonly string[]): SyncId {
  checkOp(op);
  if (volumes.length === 0) throw new RangeError('volumes must not be empty');
  const canonical = [...new Set(volumes)].sort();
  return `${syncKeyName(point)}/${op}/${canonical.length}v-${fnv1a(JSON.stringify(canonical))}`;
}

function startEvent(sync: SyncId, key: SyncKey, mask: SyncMask, opts: SyncStartOptions): SyncStartEvent {
  const e: SyncStartEvent = { kind: 'start', sync, key, mask: toMask(mask) };
  if (opts.timeoutTicks !== undefined) e.timeoutTicks = opts.timeoutTicks;
  if (opts.stopKey !== undefined) e.stopKey = opts.stopKey;
  return e;
}

/**
 * Group atomic operation, step 1: every node in the mask has paused I/O to `volumes`.
 * On timeout the node says it resumed (RESUME_IO_KEY), its next state.
 */
export function pauseIoSync(volumes: readonly string[], mask: SyncMask, op: string, opts: SyncStartOptions = {}): SyncStartEvent {
  return startEvent(volumesScope(PAUSE_IO_KEY, op, volumes), PAUSE_IO_KEY, mask, { stopKey: RESUME_IO_KEY, ...opts });
}

/** Group atomic operation, last step: every node in the mask has resumed I/O to `volumes`. */
export function resumeIoSync(volumes: readonly string[], mask: SyncMask, op: string, opts: SyncStartOptions = {}): SyncStartEvent {
  return startEvent(volumesScope(RESUME_IO_KEY, op, volumes), RESUME_IO_KEY, mask, opts);
}

/** Every node in the mask has switched its writes to a mirror side's new state (e.g. `degraded`, `resyncing`). */
export function mirrorSideStateSync(
  volume: string, side: number, state: string, mask: SyncMask, op: string, opts: SyncStartOptions = {},
): SyncStartEvent {
  checkOp(op);
  checkNonNegInt('side', side);
  if (volume.length === 0 || state.length === 0) throw new RangeError('volume and state must not be empty');
  const sync = `${syncKeyName(MIRROR_SIDE_STATE_KEY)}/${op}/${encodeURIComponent(volume)}/${side}/${encodeURIComponent(state)}`;
  return startEvent(sync, MIRROR_SIDE_STATE_KEY, mask, opts);
}

/** Replication: every node in the mask has cut consistency point `cpNumber` of `group` (numbers are never reused). */
export function consistencyPointSync(group: string, cpNumber: number, mask: SyncMask, opts: SyncStartOptions = {}): SyncStartEvent {
  if (group.length === 0) throw new RangeError('group must not be empty');
  checkNonNegInt('cpNumber', cpNumber);
  const sync = `${syncKeyName(CONSISTENCY_POINT_KEY)}/${encodeURIComponent(group)}/${cpNumber}`;
  return startEvent(sync, CONSISTENCY_POINT_KEY, mask, opts);
}
