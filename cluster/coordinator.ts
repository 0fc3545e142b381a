/**
 * The cluster coordinator of one node: the driver of its oplock machine and its
 * membership machine. It is the only code that feeds them time (a tick every
 * `tickMs`) and network input (mesh frames of types `op` and `mb`), persists what they
 * ask to persist (this node's journal of non-volatile oplock records, other nodes'
 * journals when it fences them), and calls the CP back (revoke, cleanup).
 *
 * The CP sees four calls:
 *   share(lock)                      cache the metadata (resolves when granted)
 *   withAcquired(lock, opts, fn)     update the metadata: local mutex + acquire + fn + release
 *   hold(lock) / unhold(lock)        non-volatile acquisitions kept until the CP lets go
 *                                    (mirror-write serialization; `wanted` asks it to)
 *   unshare(lock)
 *
 * Journals. Every node owns one journal record in the shared metadata (a chunk at a
 * fixed id per node, see `JournalStore`): its boot count (the oplock incarnation), the
 * non-volatile oplocks it holds or inherited, and `heldBy`, the node that fenced it
 * and is cleaning up after it. Records are written before the grant they enable and
 * before any message of the same step leaves (write-ahead), and cleared only after
 * the CP made the data durable (it releases a held lock only after a flush).
 *
 * Boot (seed 004, "DVE A coming on-line"): `bootJournal` waits for the node's own
 * journal while another node holds it (cleanup in progress), takes it back after
 * `journalWaitMs` and asks for that node's eviction once online; the records found are
 * returned so the CP replays them before `start`; the boot count goes up.
 */
import type { Logger } from 'pino';
import type { Mesh } from './mesh.js';
import {
  OplockMachine, parseOplockMessage, type Granted, type LockId, type NodeId, type OplockEvent, type OplockState,
} from './oplock.js';
import { Membership, type Eviction, type MembershipEvent, type MemberView } from './membership.js';

export const T_OPLOCK = 'op';
export const T_MEMBERSHIP = 'mb';
/** Request: "is node N up for you?" (an evictor asks before it fences). */
export const T_MEMBERSHIP_VIEW = 'mb-view';

export interface NodeJournal {
  node: NodeId;
  /** Boot count: the oplock machine's incarnation. */
  boot: number;
  /** Non-volatile oplocks this node owns (held or inherited from an evicted node). */
  records: LockId[];
  /** The node that fenced this one and is cleaning up after it; null when free. */
  heldBy: NodeId | null;
}

export interface JournalStore {
  read(node: NodeId): Promise<NodeJournal>;
  write(journal: NodeJournal): Promise<void>;
}

export interface CoordinatorHooks {
  /** Restrictive: purge the cached copy, revoke FP entries, drain; flush: write back dirty updates. */
  revoke(lock: LockId, r: { restrictive: boolean; flush: boolean }): Promise<void>;
  /** After a restrictive revoke was acknowledged: share again and reread when granted. */
  afterRevoke?(lock: LockId): void;
  /** Replay a dead owner's record for `lock` (this node holds it now); it is released after. */
  cleanup(lock: LockId): Promise<void>;
  /** A held lock (see `hold`) is wanted by a peer: release it when safe. */
  wanted(lock: LockId): void;
  /** The cluster evicted this node: stop serving. */
  selfEvicted(): void;
  /** A peer was evicted (for logs and status). */
  evicted?(e: Eviction): void;
}

export interface CoordinatorOptions {
  nodeId: NodeId;
  peers: NodeId[];
  mesh: Mesh | null;
  journals: JournalStore;
  log: Logger;
  /** Default 50 ms. */
  tickMs?: number;
  /** An oplock request unanswered this long suggests eviction (default 3000 ms). */
  ackTimeoutMs?: number;
  /** How long a booting node waits for its journal held by another (default 10 s). */
  journalWaitMs?: number;
  /** A peer never heard from this long after start is taken for down (default 2 x ackTimeoutMs). */
  bootGraceMs?: number;
}

interface Waiter { mode: 'share' | 'acquire'; resolve: (g: Granted) => void; reject: (e: Error) => void }

export interface CoordinatorStatus {
  node: NodeId;
  boot: number;
  members: MemberView[];
  evictor: NodeId;
  quorum: boolean;
  oplocks: Record<OplockState, number>;
  journalRecords: number;
  stats: { grants: number; messagesSent: number; messagesReceived: number; evictions: number; cleanups: number; rejected: number };
}

export class Coordinator {
  readonly nodeId: NodeId;
  private machine!: OplockMachine;
  private readonly membership: Membership;
  private readonly log: Logger;
  private readonly tickMs: number;
  private readonly ackTimeoutTicks: number;
  private readonly waiters = new Map<LockId, Waiter[]>();
  private readonly mutexes = new Map<LockId, Promise<void>>();
  private readonly heldLocks = new Set<LockId>();
  private readonly records = new Set<LockId>();
  private journal: NodeJournal | null = null;
  private timer: NodeJS.Timeout | null = null;
  private flushing: Promise<void> = Promise.resolve();
  private flushQueued = false;
  private stopped = false;
  private readonly suspectLater: NodeId[] = [];
  hooks: CoordinatorHooks | null = null;
  readonly stats = { grants: 0, messagesSent: 0, messagesReceived: 0, evictions: 0, cleanups: 0, rejected: 0 };

  constructor(private readonly o: CoordinatorOptions) {
    this.nodeId = o.nodeId;
    this.log = o.log.child({ component: 'cluster' });
    this.tickMs = o.tickMs ?? 50;
    this.ackTimeoutTicks = Math.max(2, Math.round((o.ackTimeoutMs ?? 3000) / this.tickMs));
    // A peer never heard from is taken for down after a grace that covers the mesh's
    // reconnect backoff (it dials with up to 5 s between attempts) and a peer timeout.
    // A fence another node vetoed (it still heard the victim) is retried after a tenth
    // of the ack timeout: the other node's own timeout runs out about as soon.
    this.membership = new Membership(o.nodeId, o.peers, Math.max(1, Math.round((o.bootGraceMs ?? 6000 + 2 * (o.ackTimeoutMs ?? 3000)) / this.tickMs)),
      Math.max(1, Math.round((o.ackTimeoutMs ?? 3000) / 10 / this.tickMs)));
  }

  // ── boot ───────────────────────────────────────────────────────────────
  /** Boot steps 1–2: take this node's journal (waiting while another node cleans it up). Returns its records to replay. */
  async bootJournal(): Promise<{ records: LockId[]; boot: number; heldBy: NodeId | null }> {
    const waitMs = this.o.journalWaitMs ?? 10_000;
    const started = Date.now();
    let j = await this.o.journals.read(this.nodeId);
    let heldBy: NodeId | null = null;
    while (j.heldBy !== null && j.heldBy !== this.nodeId) {
      if (Date.now() - started >= waitMs) {
        heldBy = j.heldBy;
        this.log.warn({ heldBy, waitedMs: Date.now() - started }, 'journal still held by another node: taking it back; that node will be evicted');
        this.suspectLater.push(heldBy);
        break;
      }
      await new Promise((r) => setTimeout(r, 200));
      j = await this.o.journals.read(this.nodeId);
    }
    const records = [...j.records];
    this.journal = { node: this.nodeId, boot: j.boot + 1, records, heldBy: null };
    this.membership.boot = this.journal.boot;
    await this.o.journals.write(this.journal);
    for (const r of records) this.records.add(r);
    this.machine = new OplockMachine(this.nodeId, this.o.peers, {
      ackTimeoutTicks: this.ackTimeoutTicks,
      idleReleaseTicks: Number.MAX_SAFE_INTEGER,
      incarnation: this.journal.boot,
      // The mesh is reliable and ordered: a release reaches every waiter, and the backoff
      // after a nak only covers a release that crossed the nak. Keep it short.
      backoffTicks: Math.max(2, Math.round(200 / this.tickMs)),
    });
    return { records, boot: this.journal.boot, heldBy };
  }

  /** Boot step 3 done: the CP replayed these records; they leave the journal. */
  async replayed(records: LockId[]): Promise<void> {
    for (const r of records) this.records.delete(r);
    await this.persistJournal();
  }

  /** Join the cluster: mesh listeners, the tick. Call after bootJournal and the replay. */
  start(): void {
    const mesh = this.o.mesh;
    if (mesh) {
      mesh.on('message', (peer, type, body, c) => this.onMeshMessage(peer, type, body, c));
      mesh.on('peer-up', (peer) => this.stepMembership({ kind: 'up', node: peer }));
      mesh.on('peer-down', (peer, reason) => this.stepMembership({ kind: 'down', node: peer, restarted: /restart/.test(reason) }));
      for (const p of this.o.peers) if (p !== this.nodeId && mesh.isUp(p)) this.stepMembership({ kind: 'up', node: p });
    }
    this.machine.step({ kind: 'tick' });
    this.timer = setInterval(() => this.tick(), this.tickMs);
    this.timer.unref();
    this.pump();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    for (const [lock, ws] of this.waiters) for (const w of ws) w.reject(new Error(`oplock ${lock}: the node is stopping`));
    this.waiters.clear();
    await this.flushing;
  }

  private tick(): void {
    this.machine.step({ kind: 'tick' });
    this.stepMembership({ kind: 'tick' });
    if (this.suspectLater.length > 0 && this.membership.hasQuorum()) {
      for (const n of this.suspectLater.splice(0)) this.stepMembership({ kind: 'suspect', node: n });
    }
    this.pump();
  }

  // ── the CP's calls ─────────────────────────────────────────────────────
  share(lock: LockId): Promise<Granted> {
    return this.want(lock, 'share', { kind: 'intent', lock, want: 'share' });
  }

  unshare(lock: LockId): void {
    this.step({ kind: 'intent', lock, want: 'unshare' });
  }

  /** Acquire `lock` (after any local holder let go), run fn, release. */
  async withAcquired<T>(lock: LockId, opts: { restrictive?: boolean }, fn: (g: Granted) => Promise<T>): Promise<T> {
    const unlock = await this.localMutex(lock);
    try {
      const g = await this.want(lock, 'acquire', { kind: 'intent', lock, want: 'acquire', restrictive: opts.restrictive ?? true, nonVolatile: false });
      try {
        return await fn(g);
      } finally {
        if (!this.heldLocks.has(lock)) this.step({ kind: 'intent', lock, want: 'release' });
      }
    } finally {
      unlock();
    }
  }

  /** Acquire `lock` non-volatile and restrictive, and keep it until `unhold`. */
  async hold(lock: LockId): Promise<Granted> {
    const g = await this.want(lock, 'acquire', { kind: 'intent', lock, want: 'acquire', restrictive: true, nonVolatile: true });
    this.heldLocks.add(lock);
    return g;
  }

  /** Let a held lock go entirely (release and unshare: nothing of it is cached). */
  unhold(lock: LockId): void {
    if (!this.heldLocks.delete(lock)) return;
    this.step({ kind: 'intent', lock, want: 'release' });
    this.step({ kind: 'intent', lock, want: 'unshare' });
  }

  holding(lock: LockId): boolean {
    return this.heldLocks.has(lock);
  }

  state(lock: LockId): OplockState {
    return this.machine.state(lock);
  }

  /** Live peers as the membership sees them. */
  livePeers(): NodeId[] {
    return this.membership.members().filter((m) => m.state === 'up').map((m) => m.id);
  }

  status(): CoordinatorStatus {
    const oplocks = this.machine.countByState();
    return {
      node: this.nodeId, boot: this.journal?.boot ?? 0, members: this.membership.members(), evictor: this.membership.evictor(),
      quorum: this.membership.hasQuorum(), oplocks, journalRecords: this.records.size, stats: { ...this.stats },
    };
  }

  // ── plumbing ───────────────────────────────────────────────────────────
  private want(lock: LockId, mode: 'share' | 'acquire', e: OplockEvent): Promise<Granted> {
    if (this.stopped) return Promise.reject(new Error(`oplock ${lock}: the node is stopping`));
    return new Promise<Granted>((resolve, reject) => {
      const list = this.waiters.get(lock) ?? [];
      list.push({ mode, resolve, reject });
      this.waiters.set(lock, list);
      this.step(e);
    });
  }

  private async localMutex(lock: LockId): Promise<() => void> {
    const prev = this.mutexes.get(lock) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.mutexes.set(lock, tail);
    await prev;
    return () => {
      release();
      if (this.mutexes.get(lock) === tail) this.mutexes.delete(lock);
    };
  }

  private step(e: OplockEvent): void {
    this.machine.step(e);
    this.pump();
  }

  private stepMembership(e: MembershipEvent): void {
    this.membership.step(e);
    this.pump();
  }

  private onMeshMessage(peer: NodeId, type: string, body: unknown, correlationId: number): void {
    if (type === T_MEMBERSHIP_VIEW && correlationId !== 0) {
      const node = (body as { node?: unknown } | null)?.node;
      if (typeof node !== 'number') return void this.o.mesh?.replyError(peer, correlationId, 'EINVAL', 'mb-view: node must be a number');
      this.o.mesh?.reply(peer, correlationId, { up: this.membership.state(node) === 'up' });
      return;
    }
    if (type === T_OPLOCK) {
      this.stats.messagesReceived++;
      const m = parseOplockMessage(body);
      if ('error' in m) {
        this.stats.rejected++;
        this.log.warn({ peer, err: m.error }, 'malformed oplock message dropped');
        return;
      }
      this.step({ kind: 'message', from: peer, message: m });
    } else if (type === T_MEMBERSHIP) {
      this.stepMembership({ kind: 'message', from: peer, message: body });
    }
  }

  /** Schedule processing of both machines' outputs (in order, one batch at a time). */
  private pump(): void {
    if (this.flushQueued || this.stopped) return;
    this.flushQueued = true;
    this.flushing = this.flushing.then(() => {
      this.flushQueued = false;
      return this.flush();
    }).catch((err: Error) => this.log.error({ err: err.message }, 'cluster coordinator step failed'));
  }

  private async flush(): Promise<void> {
    const m = this.membership.ready();
    for (const r of m.rejected) {
      this.stats.rejected++;
      // A late notice about an earlier boot of this node or of a peer is expected after a restart.
      if (/stale|duplicate/.test(r)) this.log.info({ reason: r }, 'membership input dropped');
      else this.log.warn({ reason: r }, 'membership input dropped');
    }
    for (const s of m.send) this.send(s.to, T_MEMBERSHIP, s.message);
    for (const node of m.fence) void this.fence(node);
    for (const e of m.evicted) {
      this.stats.evictions++;
      this.log.warn({ node: e.node, cleaner: e.cleaner, records: e.records.length }, 'node evicted');
      this.machine.step({ kind: 'evicted', node: e.node, records: e.records, cleaner: e.cleaner });
      this.hooks?.evicted?.(e);
    }
    if (m.selfEvicted) {
      this.log.fatal('this node was evicted from the cluster: it stops serving and must restart');
      this.hooks?.selfEvicted();
    }

    const r = this.machine.ready();
    if (r.journal.length > 0) {
      for (const j of r.journal) {
        if (j.owner === null) this.records.delete(j.lock);
        else this.records.add(j.lock);
      }
      await this.persistJournal();
    }
    for (const s of r.send) this.send(s.to, T_OPLOCK, s.message);
    for (const node of r.evict) this.membership.step({ kind: 'suspect', node });
    for (const g of r.granted) {
      this.stats.grants++;
      if (g.cleanup) {
        void this.runCleanup(g);
        continue;
      }
      this.resolveWaiters(g);
    }
    for (const v of r.revoke) {
      if (!v.restrictive && !v.flush) continue; // a notice: copies refresh on the next acquire
      const hooks = this.hooks;
      const done = (): void => {
        this.step({ kind: 'revoked', lock: v.lock });
        if (v.restrictive) this.hooks?.afterRevoke?.(v.lock);
      };
      if (!hooks) done();
      else hooks.revoke(v.lock, v).then(done, (err: Error) => {
        this.log.error({ lock: v.lock, err: err.message }, 'revoke failed; acknowledging anyway after the drain');
        done();
      });
    }
    for (const l of r.released) this.heldLocks.delete(l);
    for (const l of r.wanted) if (this.heldLocks.has(l)) this.hooks?.wanted(l);
    if (r.evict.length > 0) this.pump(); // the membership has news
  }

  private send(to: NodeId, type: string, body: unknown): void {
    const mesh = this.o.mesh;
    if (!mesh) return;
    try {
      if (mesh.send(to, type, body)) this.stats.messagesSent++;
      else this.log.warn({ to, type }, 'mesh queue full: message dropped (the machine resends)');
    } catch (err) {
      this.log.error({ to, type, err: (err as Error).message }, 'mesh send failed');
    }
  }

  private async persistJournal(): Promise<void> {
    if (!this.journal) return;
    this.journal = { ...this.journal, records: [...this.records].sort() };
    await this.o.journals.write(this.journal);
  }

  /**
   * Does any live peer still hear `node`, or fail to say it does not? (Views differ
   * while connections come up and go down.) Only every peer this node sees up
   * answering "not heard" lets a fence go on: silence is a veto, not a yes, so a node
   * cut off with stale views cannot fence the others.
   */
  private async heardByPeers(node: NodeId): Promise<NodeId | null> {
    const mesh = this.o.mesh;
    if (!mesh) return null;
    const asks = this.livePeers().filter((p) => p !== node).map(async (p) => {
      try {
        const r = (await mesh.request(p, T_MEMBERSHIP_VIEW, { node }, 1000)) as { up?: unknown } | null;
        return r && r.up === false ? null : p;
      } catch {
        return p;
      }
    });
    return (await Promise.all(asks)).find((p) => p !== null) ?? null;
  }

  /** Evictor: mark the victim's journal as held by this node, take its records, tell everyone. */
  private async fence(node: NodeId): Promise<void> {
    try {
      const hears = (this.o.mesh?.isUp(node) ? node : null) ?? (await this.heardByPeers(node)) ?? (this.o.mesh?.isUp(node) ? node : null);
      if (hears !== null) {
        this.log.info({ node, heardBy: hears }, 'not fencing: a peer still hears the node');
        this.membership.step({ kind: 'fence-failed', node });
        this.pump();
        return;
      }
      const j = await this.o.journals.read(node);
      await this.o.journals.write({ ...j, heldBy: this.nodeId });
      this.log.warn({ node, records: j.records.length }, 'fencing a node that stopped answering');
      this.membership.step({ kind: 'fenced', node, records: j.records, boot: j.boot });
      this.pump();
      // The records are claimed into this node's journal by the same step; then the
      // victim's journal is free for its next boot.
      await this.flushing;
      await this.flushing;
      await this.o.journals.write({ ...j, records: [], heldBy: null });
    } catch (err) {
      this.log.error({ node, err: (err as Error).message }, 'fencing failed; will retry');
      this.membership.step({ kind: 'fence-failed', node });
      this.pump();
    }
  }

  private resolveWaiters(g: Granted): void {
    const list = this.waiters.get(g.lock);
    if (!list) return;
    const keep = list.filter((w) => {
      if (w.mode === 'share' || g.mode === 'acquire') {
        w.resolve(g);
        return false;
      }
      return true;
    });
    if (keep.length > 0) this.waiters.set(g.lock, keep);
    else this.waiters.delete(g.lock);
  }

  /** A dead owner's record: the CP replays it; then the lock goes to a local waiter, or is released. */
  private async runCleanup(g: Granted): Promise<void> {
    this.stats.cleanups++;
    try {
      await this.hooks?.cleanup(g.lock);
    } catch (err) {
      this.log.error({ lock: g.lock, err: (err as Error).message }, 'cleanup of an inherited record failed');
    }
    if (this.waiters.has(g.lock)) return this.resolveWaiters({ ...g, cleanup: false });
    // The record leaves this node's journal with the release.
    this.step({ kind: 'intent', lock: g.lock, want: 'release' });
    this.step({ kind: 'intent', lock: g.lock, want: 'unshare' });
  }
}
