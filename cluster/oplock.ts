/**
 * Oplocks (seed 004, Fig. 27): the cluster lock protocol that keeps every node's
 * cached metadata coherent. Pure: events in (`step`), actions out (`ready`); no I/O,
 * no timers, no clock, no randomness. A driver (mesh + clock + CP) feeds it.
 *
 * ## Model
 *
 * One `OplockMachine` per node manages many oplocks, each addressed `guid.luid[index]`
 * (a fixed-size chunk of a volume segment's rmap, say; a variable extent takes every
 * chunk it covers, see `locksCovering`). Per oplock a node is in one of eight states:
 *
 *   Boot           not yet in the cluster (jlist); naks joins
 *   Uninterested   primary dormant state: not tracking the oplock
 *   WantToJoin     join broadcast to the jlist, waiting for every answer
 *   Joined         in the oplock's cluster, caching nothing
 *   WantToShare    share broadcast to the slist, waiting for every ack
 *   Sharing        caching the metadata (a reader); in everyone's alist
 *   WantToAcquire  acquire broadcast to the alist, waiting for every ack
 *   Acquired       the one writer; may update the metadata
 *
 * Only writers acquire; readers share. Lists (per oplock, private, in memory):
 *   jlist  all live nodes of the cluster (join goes here)
 *   slist  peers that advertise joined or sharing (share, leave, unshare, release go here)
 *   alist  peers that advertise sharing (acquire goes here)
 * What a node advertises follows from its state: Boot/Uninterested → out, WantToJoin/
 * Joined → joined, the other four → sharing. Every message carries the sender's
 * per-oplock `seq`, bumped on every change of what it advertises, so the receiver's
 * view of each peer only ever moves forward (duplicates and reordering are harmless).
 *
 * Messages (`oplock-messages.ts`): join, leave, share, unshare, acquire (restrictive?,
 * non-volatile?), release, ack (answers, req, state, old dirty), nak (answers, req, state).
 *
 * ## What an answer promises
 *
 * - ack(share) from Q: Q now counts the sharer in its alist, so Q will not become
 *   Acquired without the sharer's ack.
 * - nak(share): Q is acquiring or holds the oplock; retry after its release.
 * - ack(acquire) from Q: Q holds no copy the acquirer's update could make unsafe:
 *   for a RESTRICTIVE acquire Q's CP has purged its caches, revoked its FP entries and
 *   drained pending I/O (`revoke` → `revoked`) and Q went to Joined; for an
 *   UNRESTRICTIVE one Q may keep serving (the update only grants authority) and marks
 *   its copy stale. Either way Q has flushed its own unrestrictive updates first and
 *   says so in `dirty` (the acquirer must then purge and reread), and Q will not itself
 *   become Acquired until the acquirer acks Q's own, later acquire — which it naks
 *   while it holds the oplock.
 * - nak(acquire): Q holds the oplock, or is acquiring and wins the conflict.
 *
 * Conflicts: lower node id wins. A node in WantToAcquire that receives an acquire from
 * a LOWER id abandons its own attempt (release to the set it asked), honours the other
 * (revoke if restrictive) and retries after a release or a backoff; from a HIGHER id
 * it naks. Backoff is `backoffTicks + rank` ticks (rank = number of peers with lower
 * ids), so lower ids also retry first.
 *
 * ## State diagram (labels are the `on` column of TRANSITIONS)
 *
 *   Boot ─booted─► Uninterested ─want─► WantToJoin ─joined─► Joined ◄──────────┐
 *                       ▲                                    │  │             │
 *                       └───────────── leave ────────────────┘  │ want-share  │ cancel
 *                                                               ▼             │
 *                                                          WantToShare ───────┘
 *                                                               │ shared
 *                                                               ▼
 *                 ┌──────────── release, idle ─────────────►  Sharing ──unshare, restrictive-revoked──► Joined
 *                 │                                          │      ▲
 *                 │                              want-acquire│      │cancel
 *                 │                                          ▼      │
 *              Acquired ◄────────── acquired ─────────── WantToAcquire ──restrictive-revoked──► Joined
 *
 *   Self-loops: timeout in the three Want states; nak, retry, acquire-seen in
 *   WantToShare; unrestrictive-acquire in Sharing; nak, retry, preempted in
 *   WantToAcquire.
 *
 * ## Non-volatile oplocks
 *
 * An acquire with `nonVolatile` records the owner in the owner's journal (`journal`
 * action, persisted by the driver BEFORE it acts on the grant) and clears it at
 * release. When a node is evicted the membership layer passes the records found in
 * its journal and the node that evicted it (`cleaner`); every survivor sees the same
 * event, so exactly one node — the cleaner — claims the records into its own journal
 * (a claim survives the cleaner's own crash: its evictor inherits it), acquires each
 * oplock restrictively and is `granted` it with `cleanup: true`, so its CP replays
 * the dead node's journal for it exactly once. Without `cleaner` the lowest live id
 * cleans; without `records` the locks this node saw the dead node acquire
 * non-volatile. A holder of a record is Acquired or acquiring, so it advertises
 * sharing and is in every slist and alist: the most recent owner is always in the
 * join set. Idle sweep: an Acquired non-volatile oplock no intent has touched for
 * `idleReleaseTicks` is released and reported in `released`.
 *
 * ## Simplifications (where the seed is vague or assumes a reliable ordered network)
 *
 * 1. slist/alist are derived from per-peer views ordered by `seq` instead of being
 *    edited by join/leave/share/unshare; they are never cleared (an Uninterested node
 *    keeps listening). Views are conservative: a stale "sharing" costs one message.
 * 2. Every request is answered in every state (Boot and Uninterested ack share and
 *    acquire, advertising `out`), so a stale view never looks like a dead node.
 * 3. A timeout does not abort an attempt: unanswered peers get the request again every
 *    `resendTicks`; after `ackTimeoutTicks` they are reported in `evict` (again every
 *    `ackTimeoutTicks`) and the attempt waits for the membership layer's `evicted`,
 *    which counts as an answer (for an acquire: as a release, with purge). The seed
 *    broadcasts leave/unshare/release and restarts instead.
 * 4. A nak'ed share keeps advertising sharing (no unshare) and retries after a release
 *    or the backoff. A WantToShare node that acks an acquire restarts its share so the
 *    acquirer can nak it (the seed acks and carries on, which could let a reader cache
 *    a half-written update).
 * 5. Unrestrictive acquire: sharers ack at once (after a flush if dirty) and stay
 *    Sharing with a stale copy. Restrictive: they revoke, drain, ack and go to Joined.
 *    (The pseudo-code sends every sharer to Joined; the prose says unrestrictive
 *    updates do not stall anyone.)
 * 6. `dirty` is set by the grant of an unrestrictive acquire and cleared only by a
 *    flush (`revoke` with `flush`), which happens before acking any acquire and before
 *    unsharing, so a dirty node is always in the alists. A copy is stale when it was
 *    read while some node was dirty (a share ack said dirty, or we acked an
 *    unrestrictive acquire since). Purge on grant = an acquire ack was dirty, or a peer
 *    was evicted mid-attempt, or this node's copy is stale or absent.
 * 7. `revoke` needs `revoked` only when `restrictive` or `flush`; an unrestrictive,
 *    clean revoke is a notice (refresh the copy when convenient).
 * 8. Release goes to the slist (not only the alist) so that every waiter gets the
 *    retry signal; a backoff timer covers a lost release, and a release that arrives
 *    while an attempt is still in flight makes a nak to that attempt retry at once
 *    (the nak may predate the release).
 * 9. Boot ends on the first tick (the driver ticks once the node is in the jlist);
 *    jlist = constructor peers, minus evicted nodes, plus any node heard from again.
 *    jlock, elist and elock belong to the membership layer: `evict` asks it to add a
 *    node to the elist, `evicted` says it did, and fences the node (it restarts as a
 *    new incarnation). Messages from an older incarnation than one already heard are
 *    dropped; the mesh delivers nothing from an evicted incarnation after `evicted`.
 * 10. Re-acquiring an oplock already held grants at once with no messages (the seed's
 *    "reacquire with a write to a private journal"); upgrading an unrestrictive hold
 *    to restrictive is a release followed by a new acquire.
 * 11. A cleaner races with other acquirers: another node may hold the oplock before the
 *    cleaner does, so cleanup must be valid at any later point (e.g. a mirror resync).
 * 12. Intents: share and acquire raise the level a node wants; release drops acquire
 *    to share; unshare drops to joined, and an unshare when only joined leaves. Release
 *    and unshare are ignored while a cleanup is pending on the oplock.
 *
 * ## Beyond the minimal interface
 *
 * `granted` also says `cleanup` (replay a dead owner's journal) and `restrictive` (what
 * kind of update the acquisition allows); `revoke` also says `flush`; `released` lists
 * acquisitions the idle sweep gave up; `evicted` may carry `records` and `cleaner`.
 * Queries `held`, `lists`, `jlist`, `busy` and `coverage` serve drivers and tests.
 */
import {
  isLockId,
  type Advertised,
  type LockId,
  type NodeId,
  type OplockMessage,
  type RequestType,
} from './oplock-messages.js';

export { lockId, locksCovering, parseLockId, parseOplockMessage } from './oplock-messages.js';
export type { LockId, NodeId, OplockMessage } from './oplock-messages.js';

export type OplockState =
  | 'Boot'
  | 'Uninterested'
  | 'WantToJoin'
  | 'Joined'
  | 'WantToShare'
  | 'Sharing'
  | 'WantToAcquire'
  | 'Acquired';

export const OPLOCK_STATES: readonly OplockState[] = [
  'Boot', 'Uninterested', 'WantToJoin', 'Joined', 'WantToShare', 'Sharing', 'WantToAcquire', 'Acquired',
];

// ---------------------------------------------------------------- the tables

/**
 * Every state change (and every significant self-loop) the machine makes. `go()`
 * refuses any (from, on) pair not listed here, and test/unit/oplock.test.ts has one
 * scenario per row.
 */
export const TRANSITIONS = [
  { from: 'Boot', on: 'booted', to: 'Uninterested', does: 'first tick: the node is in the jlist' },
  { from: 'Uninterested', on: 'want', to: 'WantToJoin', does: 'share/acquire intent: broadcast join to the jlist' },
  { from: 'WantToJoin', on: 'joined', to: 'Joined', does: 'every jlist peer answered join (ack, nak = not interested, or evicted)' },
  { from: 'WantToJoin', on: 'timeout', to: 'WantToJoin', does: 'peers silent for ackTimeoutTicks reported in evict; keep resending' },
  { from: 'Joined', on: 'want-share', to: 'WantToShare', does: 'broadcast share to the slist' },
  { from: 'Joined', on: 'leave', to: 'Uninterested', does: 'no interest left: broadcast leave to the slist' },
  { from: 'WantToShare', on: 'shared', to: 'Sharing', does: 'every slist peer acked: granted share (CACHE METADATA)' },
  { from: 'WantToShare', on: 'nak', to: 'WantToShare', does: 'a peer acquires or holds it: drop the attempt, wait for release or backoff' },
  { from: 'WantToShare', on: 'retry', to: 'WantToShare', does: 'release received or backoff elapsed: share again' },
  { from: 'WantToShare', on: 'acquire-seen', to: 'WantToShare', does: 'acked an acquire: share again so the acquirer can nak it' },
  { from: 'WantToShare', on: 'timeout', to: 'WantToShare', does: 'peers silent for ackTimeoutTicks reported in evict; keep resending' },
  { from: 'WantToShare', on: 'cancel', to: 'Joined', does: 'unshare intent before the grant: broadcast unshare to the slist' },
  { from: 'Sharing', on: 'want-acquire', to: 'WantToAcquire', does: 'broadcast acquire to the alist (empty alist: no messages)' },
  { from: 'Sharing', on: 'unrestrictive-acquire', to: 'Sharing', does: 'ack with old dirty (flush first if dirty); keep serving, copy stale' },
  { from: 'Sharing', on: 'restrictive-revoked', to: 'Joined', does: 'CP purged, revoked FP entries, drained: ack with old dirty; unshare' },
  { from: 'Sharing', on: 'unshare', to: 'Joined', does: 'no longer caching: flush if dirty, broadcast unshare to the slist' },
  { from: 'WantToAcquire', on: 'acquired', to: 'Acquired', does: 'every alist peer acked or was evicted: journal owner if non-volatile, granted acquire' },
  { from: 'WantToAcquire', on: 'nak', to: 'WantToAcquire', does: 'release to the asked set; wait for release or backoff' },
  { from: 'WantToAcquire', on: 'retry', to: 'WantToAcquire', does: 'release received or backoff elapsed: acquire again' },
  { from: 'WantToAcquire', on: 'preempted', to: 'WantToAcquire', does: 'acquire from a lower id: abandon ours (release to asked), honour theirs' },
  { from: 'WantToAcquire', on: 'restrictive-revoked', to: 'Joined', does: 'honoured a restrictive acquire after the CP revoked: ack, unshare' },
  { from: 'WantToAcquire', on: 'timeout', to: 'WantToAcquire', does: 'peers silent for ackTimeoutTicks reported in evict; keep resending' },
  { from: 'WantToAcquire', on: 'cancel', to: 'Sharing', does: 'release intent before the grant: release to the asked set' },
  { from: 'Acquired', on: 'release', to: 'Sharing', does: 'clear the journal record if non-volatile; broadcast release to the slist' },
  { from: 'Acquired', on: 'idle', to: 'Sharing', does: 'non-volatile and unused for idleReleaseTicks: as release, reported in released' },
] as const satisfies readonly { from: OplockState; on: string; to: OplockState; does: string }[];

export type TransitionRow = (typeof TRANSITIONS)[number];
export type TransitionLabel = TransitionRow['on'];

export function transitionKey(from: OplockState, on: string): string {
  return `${from} --${on}-->`;
}

const TRANSITION_INDEX = new Map<string, TransitionRow>();
for (const row of TRANSITIONS) {
  const key = transitionKey(row.from, row.on);
  if (TRANSITION_INDEX.has(key)) throw new Error(`oplock: duplicate transition ${key}`);
  TRANSITION_INDEX.set(key, row);
}

/**
 * How each state answers each request (the seed's "on X received, respond with Y").
 *   ack          answer ack
 *   nak          answer nak
 *   ack-restart  ack, and restart our own share attempt (simplification 4)
 *   honour       acquire: ack at once if unrestrictive and clean, else revoke/flush first
 *   by-priority  acquire: honour if the sender's id is lower than ours, else nak
 */
export type AnswerRule = 'ack' | 'nak' | 'ack-restart' | 'honour' | 'by-priority';

export const ANSWERS: Readonly<Record<OplockState, Readonly<Record<RequestType, AnswerRule>>>> = {
  Boot: { join: 'nak', share: 'ack', acquire: 'ack' },
  Uninterested: { join: 'nak', share: 'ack', acquire: 'ack' },
  WantToJoin: { join: 'ack', share: 'ack', acquire: 'ack' },
  Joined: { join: 'ack', share: 'ack', acquire: 'ack' },
  WantToShare: { join: 'ack', share: 'ack', acquire: 'ack-restart' },
  Sharing: { join: 'ack', share: 'ack', acquire: 'honour' },
  WantToAcquire: { join: 'ack', share: 'nak', acquire: 'by-priority' },
  Acquired: { join: 'ack', share: 'nak', acquire: 'nak' },
};

export const ADVERTISES: Readonly<Record<OplockState, Advertised>> = {
  Boot: 'out',
  Uninterested: 'out',
  WantToJoin: 'joined',
  Joined: 'joined',
  WantToShare: 'sharing',
  Sharing: 'sharing',
  WantToAcquire: 'sharing',
  Acquired: 'sharing',
};

// ---------------------------------------------------------------- events and actions

export type OplockEvent =
  | { kind: 'intent'; lock: LockId; want: 'share' | 'acquire' | 'release' | 'unshare'; nonVolatile?: boolean; restrictive?: boolean }
  | { kind: 'message'; from: NodeId; message: OplockMessage }
  | { kind: 'tick' }
  /**
   * Membership says `node` is gone (it is in the elist and fenced). `records`: the
   * non-volatile ownership records found in its journal; `cleaner`: the node that
   * evicted it, which inherits them. Every survivor must get the same event.
   */
  | { kind: 'evicted'; node: NodeId; records?: LockId[]; cleaner?: NodeId }
  /** The local CP finished what a `revoke` with `restrictive` or `flush` asked. */
  | { kind: 'revoked'; lock: LockId };

export interface Granted {
  lock: LockId;
  mode: 'share' | 'acquire';
  /** Reread the metadata from media before using it. */
  purge: boolean;
  /** This node inherited a dead owner's record: its CP must replay that journal now. */
  cleanup: boolean;
  /** For acquire: whether the sharers revoked (restrictive) or may still serve (unrestrictive). */
  restrictive: boolean;
}

export interface Revoke {
  lock: LockId;
  /** Purge caches, revoke FP entries, drain pending I/O, then step `revoked`. */
  restrictive: boolean;
  /** Flush this node's metadata journal for the oplock, then step `revoked`. */
  flush: boolean;
}

export interface Ready {
  send: { to: NodeId; message: OplockMessage }[];
  granted: Granted[];
  revoke: Revoke[];
  /** Peers that did not answer within ackTimeoutTicks: ask the membership layer to evict them. */
  evict: NodeId[];
  /** Non-volatile ownership records to persist (owner) or clear (null) before acting on the rest. */
  journal: { lock: LockId; owner: NodeId | null }[];
  /** Acquisitions given up by the idle sweep: the CP no longer holds them (it still shares). */
  released: LockId[];
  /**
   * Oplocks this node holds (Acquired) that a peer asked to share or acquire and was
   * nak'ed: a CP that holds locks until asked (mirror-write serialization) releases them.
   */
  wanted: LockId[];
}

export interface OplockOptions {
  ackTimeoutTicks: number;
  idleReleaseTicks: number;
  /** Resend an unanswered request after this many ticks (default ackTimeoutTicks / 4). */
  resendTicks?: number;
  /** Base wait after a nak before retrying (default ackTimeoutTicks / 2). */
  backoffTicks?: number;
  /** This boot of the node (default 0); must grow across restarts. */
  incarnation?: number;
}

// ---------------------------------------------------------------- internal records

/** What the local CP wants: 0 nothing, 1 stay joined, 2 share, 3 acquire. */
type Level = 0 | 1 | 2 | 3;

interface PeerView { inc: number; seq: number; adv: Advertised }

interface Attempt {
  kind: RequestType;
  req: number;
  /** Asked and not yet answered. */
  waiting: Set<NodeId>;
  /** Everyone asked (release goes here when an acquire attempt is abandoned). */
  asked: NodeId[];
  startTick: number;
  lastSentTick: number;
  reportedTick: Map<NodeId, number>;
  dirtySeen: boolean;
  evictedSeen: boolean;
  /** A release arrived while this attempt was in flight: a nak then retries at once. */
  releaseSeen: boolean;
  restrictive: boolean;
  nonVolatile: boolean;
}

interface Honour { from: NodeId; req: number; restrictive: boolean; dirty: boolean }
interface RevokeNeed { restrictive: boolean; flush: boolean }

interface LockRec {
  readonly id: LockId;
  state: OplockState;
  desired: Level;
  seq: number;
  views: Map<NodeId, PeerView>;
  attempt: Attempt | null;
  /** Waiting to retry (after a nak or a preemption) at this tick, or on a release. */
  retryAtTick: number | null;
  /** Acquires we decided to ack once the CP confirms the revoke/flush. */
  honouring: Honour[];
  revokeOutstanding: RevokeNeed | null;
  revokeNeed: RevokeNeed;
  revokeDone: RevokeNeed;
  dirty: boolean;
  stale: boolean;
  /** The CP holds a copy (granted share or acquire, not since revoked). */
  cacheValid: boolean;
  owner: NodeId | null;
  ownerNonVolatile: boolean;
  wantRestrictive: boolean;
  wantNonVolatile: boolean;
  held: { restrictive: boolean; nonVolatile: boolean } | null;
  lastUsedTick: number;
  cleanupPending: boolean;
  /** Last answer we gave to an acquire from each peer (duplicates get the same answer). */
  answered: Map<NodeId, { inc: number; req: number; type: 'ack' | 'nak'; dirty: boolean }>;
}

function fail(message: string): never {
  throw new Error(`oplock invariant: ${message}`);
}

function assertThat(condition: boolean, message: string): asserts condition {
  if (!condition) fail(message);
}

function emptyReady(): Ready {
  return { send: [], granted: [], revoke: [], evict: [], journal: [], released: [], wanted: [] };
}

const ADVERTISED_BY: Readonly<Record<Exclude<OplockMessage['type'], 'ack' | 'nak'>, Advertised>> = {
  join: 'joined',
  leave: 'out',
  share: 'sharing',
  unshare: 'joined',
  acquire: 'sharing',
  release: 'sharing',
};

// ---------------------------------------------------------------- the machine

export class OplockMachine {
  readonly nodeId: NodeId;
  readonly incarnation: number;
  private readonly peers: ReadonlySet<NodeId>;
  private readonly live: Set<NodeId>;
  private readonly peerInc = new Map<NodeId, number>();
  private readonly locks = new Map<LockId, LockRec>();
  private readonly ackTimeoutTicks: number;
  private readonly idleReleaseTicks: number;
  private readonly resendTicks: number;
  private readonly backoffTicks: number;
  private readonly rank: number;
  private booted = false;
  private nowTick = 0;
  private out: Ready = emptyReady();
  private readonly evictSet = new Set<NodeId>();
  private readonly taken = new Set<string>();

  constructor(nodeId: NodeId, peers: NodeId[], options: OplockOptions) {
    assertThat(Number.isSafeInteger(nodeId), `node id ${nodeId} is not an integer`);
    assertThat(options.ackTimeoutTicks >= 1, 'ackTimeoutTicks must be at least 1');
    assertThat(options.idleReleaseTicks >= 1, 'idleReleaseTicks must be at least 1');
    this.nodeId = nodeId;
    this.peers = new Set(peers.filter((p) => p !== nodeId));
    this.live = new Set(this.peers);
    this.ackTimeoutTicks = options.ackTimeoutTicks;
    this.idleReleaseTicks = options.idleReleaseTicks;
    this.resendTicks = Math.max(1, options.resendTicks ?? Math.floor(options.ackTimeoutTicks / 4));
    this.backoffTicks = Math.max(1, options.backoffTicks ?? Math.floor(options.ackTimeoutTicks / 2));
    this.incarnation = options.incarnation ?? 0;
    this.rank = [...this.peers].filter((p) => p < nodeId).length;
  }

  // ------------------------------------------------------------ queries

  state(lock: LockId): OplockState {
    const l = this.locks.get(lock);
    if (l === undefined) return this.booted ? 'Uninterested' : 'Boot';
    return l.state;
  }

  /** The current owner as far as this node knows: itself while Acquired, else the last acquirer it acked. */
  owner(lock: LockId): NodeId | null {
    return this.locks.get(lock)?.owner ?? null;
  }

  dirty(lock: LockId): boolean {
    return this.locks.get(lock)?.dirty ?? false;
  }

  /** The acquisition this node holds, if Acquired. */
  held(lock: LockId): { restrictive: boolean; nonVolatile: boolean } | null {
    const h = this.locks.get(lock)?.held;
    return h ? { ...h } : null;
  }

  /** slist and alist as this node sees them now. */
  lists(lock: LockId): { slist: NodeId[]; alist: NodeId[] } {
    const l = this.locks.get(lock);
    if (l === undefined) return { slist: [], alist: [] };
    return { slist: this.slist(l), alist: this.alist(l) };
  }

  /** The jlist: live peers (excluding this node). */
  jlist(): NodeId[] {
    return [...this.live].sort((a, b) => a - b);
  }

  ticks(): number {
    return this.nowTick;
  }

  /** Whether anything is in progress: an attempt, a wait to retry, or a revoke the CP owes. */
  busy(): boolean {
    for (const l of this.locks.values()) {
      if (l.attempt !== null || l.retryAtTick !== null || l.honouring.length > 0 || l.revokeOutstanding !== null) return true;
    }
    return false;
  }

  /** How many oplocks this machine tracks in each state. */
  countByState(): Record<OplockState, number> {
    const out = Object.fromEntries(OPLOCK_STATES.map((st) => [st, 0])) as Record<OplockState, number>;
    for (const l of this.locks.values()) out[l.state]++;
    return out;
  }

  /** Keys (`transitionKey`) of every TRANSITIONS row this machine has taken. */
  coverage(): ReadonlySet<string> {
    return this.taken;
  }

  // ------------------------------------------------------------ events

  step(e: OplockEvent): void {
    switch (e.kind) {
      case 'tick':
        return this.onTick();
      case 'intent':
        return this.onIntent(e);
      case 'message':
        return this.onMessage(e.from, e.message);
      case 'evicted':
        return this.onEvicted(e.node, e.records, e.cleaner);
      case 'revoked':
        return this.onRevoked(e.lock);
    }
  }

  ready(): Ready {
    const r = this.out;
    this.out = emptyReady();
    this.evictSet.clear();
    return r;
  }

  // ------------------------------------------------------------ tick

  private onTick(): void {
    this.nowTick++;
    if (!this.booted) {
      this.booted = true;
      for (const l of this.locks.values()) {
        this.go(l, 'Uninterested', 'booted');
      }
    }
    for (const l of this.locks.values()) {
      const a = l.attempt;
      if (a !== null) {
        if (this.nowTick - a.lastSentTick >= this.resendTicks) {
          a.lastSentTick = this.nowTick;
          for (const p of a.waiting) this.send(p, this.request(l, a));
        }
        if (this.nowTick - a.startTick >= this.ackTimeoutTicks) {
          let reported = false;
          for (const p of a.waiting) {
            const last = a.reportedTick.get(p);
            if (last === undefined || this.nowTick - last >= this.ackTimeoutTicks) {
              a.reportedTick.set(p, this.nowTick);
              this.reportEvict(p);
              reported = true;
            }
          }
          if (reported) this.go(l, l.state, 'timeout');
        }
      }
      if (l.retryAtTick !== null && this.nowTick >= l.retryAtTick) {
        l.retryAtTick = null;
      }
      if (
        l.state === 'Acquired' &&
        l.held !== null &&
        l.held.nonVolatile &&
        !l.cleanupPending &&
        this.nowTick - l.lastUsedTick >= this.idleReleaseTicks
      ) {
        l.desired = 2;
        this.release(l, 'idle');
        this.out.released.push(l.id);
      }
      this.advance(l);
    }
  }

  // ------------------------------------------------------------ intents

  private onIntent(e: Extract<OplockEvent, { kind: 'intent' }>): void {
    assertThat(isLockId(e.lock), `intent on malformed oplock id ${JSON.stringify(e.lock)}`);
    const l = this.lock(e.lock);
    l.lastUsedTick = this.nowTick;
    switch (e.want) {
      case 'share':
        if (l.desired < 2) l.desired = 2;
        if (l.state === 'Sharing' || l.state === 'Acquired') {
          l.cacheValid = true;
          this.grant(l, 'share', false, false, false);
        }
        break;
      case 'acquire': {
        l.desired = 3;
        l.wantRestrictive = e.restrictive ?? true;
        l.wantNonVolatile = e.nonVolatile ?? false;
        if (l.cleanupPending) {
          l.wantRestrictive = true;
          l.wantNonVolatile = true;
        }
        if (l.state === 'Acquired') {
          const h = l.held!;
          if (l.wantRestrictive && !h.restrictive) {
            // Upgrade: the sharers kept serving under the unrestrictive hold; ask again.
            this.release(l, 'release');
          } else {
            if (l.wantNonVolatile && !h.nonVolatile) {
              h.nonVolatile = true;
              this.out.journal.push({ lock: l.id, owner: this.nodeId });
            }
            this.grant(l, 'acquire', false, false, h.restrictive);
          }
        }
        break;
      }
      case 'release':
        if (l.cleanupPending) break;
        if (l.desired === 3) l.desired = 2;
        break;
      case 'unshare':
        if (l.cleanupPending) break;
        l.desired = l.desired >= 2 ? 1 : 0;
        // The CP dropped its copy when it said so, even if we must flush before unsharing.
        l.cacheValid = false;
        l.stale = false;
        break;
    }
    this.advance(l);
  }

  // ------------------------------------------------------------ messages

  private onMessage(from: NodeId, m: OplockMessage): void {
    if (from === this.nodeId || !this.peers.has(from)) return;
    const knownInc = this.peerInc.get(from);
    if (knownInc !== undefined && m.inc < knownInc) return; // an older incarnation
    if (knownInc === undefined || m.inc > knownInc) {
      this.peerInc.set(from, m.inc);
      if (knownInc !== undefined) this.forgetPeer(from); // it restarted
    }
    this.live.add(from);
    const l = this.lock(m.lock);
    this.noteView(l, from, m);
    switch (m.type) {
      case 'join':
      case 'share':
        // A share ack says whether we hold unflushed updates: the sharer's copy misses them.
        this.answer(l, from, m.type, m.req, ANSWERS[l.state][m.type] === 'nak' ? 'nak' : 'ack', m.type === 'share' && l.dirty);
        if (m.type === 'share' && l.state === 'Acquired') this.out.wanted.push(l.id);
        return;
      case 'acquire':
        return this.onAcquire(l, from, m);
      case 'leave':
      case 'unshare':
        return;
      case 'release':
        if (l.owner === from) l.owner = null;
        if (l.attempt !== null) l.attempt.releaseSeen = true;
        this.signalRetry(l);
        return;
      case 'ack':
      case 'nak':
        return this.onAnswer(l, from, m);
    }
  }

  private noteView(l: LockRec, from: NodeId, m: OplockMessage): void {
    const adv = m.type === 'ack' || m.type === 'nak' ? m.state : ADVERTISED_BY[m.type];
    const v = l.views.get(from);
    if (v === undefined || m.inc > v.inc || (m.inc === v.inc && m.seq > v.seq)) {
      l.views.set(from, { inc: m.inc, seq: m.seq, adv });
    }
  }

  private onAcquire(l: LockRec, from: NodeId, m: Extract<OplockMessage, { type: 'acquire' }>): void {
    const last = l.answered.get(from);
    if (last !== undefined && last.inc === m.inc) {
      if (m.req < last.req) return; // a stale request
      if (m.req === last.req) {
        // A duplicate: the same answer, old dirty flag included.
        this.sendAnswer(l, from, 'acquire', m.req, last.type, last.dirty);
        return;
      }
    }
    if (l.honouring.some((h) => h.from === from && h.req === m.req)) return; // in progress
    const rule = ANSWERS[l.state].acquire;
    switch (rule) {
      case 'ack':
      case 'ack-restart':
        assertThat(!l.dirty, `${l.id}: dirty while ${l.state}`);
        l.owner = from;
        l.ownerNonVolatile = m.nonVolatile;
        this.answer(l, from, 'acquire', m.req, 'ack', false);
        if (rule === 'ack-restart' && l.attempt !== null) {
          l.attempt = null;
          this.go(l, 'WantToShare', 'acquire-seen');
          this.startAttempt(l, 'share');
        }
        return;
      case 'nak':
        this.answer(l, from, 'acquire', m.req, 'nak', false);
        if (l.state === 'Acquired') this.out.wanted.push(l.id);
        return;
      case 'by-priority':
        if (from > this.nodeId) {
          this.answer(l, from, 'acquire', m.req, 'nak', false);
          return;
        }
        this.abandonAcquire(l);
        l.retryAtTick = this.nowTick + this.backoff();
        this.go(l, 'WantToAcquire', 'preempted');
        this.honour(l, from, m);
        return;
      case 'honour':
        this.honour(l, from, m);
        return;
    }
  }

  /** Sharing (or preempted WantToAcquire): ack now if harmless, else after the CP's revoke/flush. */
  private honour(l: LockRec, from: NodeId, m: Extract<OplockMessage, { type: 'acquire' }>): void {
    l.owner = from;
    l.ownerNonVolatile = m.nonVolatile;
    if (!m.restrictive && !l.dirty && l.revokeOutstanding === null && l.honouring.length === 0) {
      l.stale = true;
      this.answer(l, from, 'acquire', m.req, 'ack', false);
      this.out.revoke.push({ lock: l.id, restrictive: false, flush: false });
      if (l.state === 'Sharing') this.go(l, 'Sharing', 'unrestrictive-acquire');
      return;
    }
    l.honouring.push({ from, req: m.req, restrictive: m.restrictive, dirty: l.dirty });
    if (m.restrictive) l.revokeNeed.restrictive = true;
    if (l.dirty) l.revokeNeed.flush = true;
    this.kickRevoke(l);
  }

  private kickRevoke(l: LockRec): void {
    if (l.revokeOutstanding !== null) return;
    const restrictive = l.revokeNeed.restrictive && !l.revokeDone.restrictive;
    const flush = l.revokeNeed.flush && l.dirty;
    if (!restrictive && !flush) return;
    l.revokeOutstanding = { restrictive, flush };
    this.out.revoke.push({ lock: l.id, restrictive, flush });
  }

  private onRevoked(lock: LockId): void {
    const l = this.locks.get(lock);
    if (l === undefined || l.revokeOutstanding === null) return; // a notice needs no answer
    const done = l.revokeOutstanding;
    l.revokeOutstanding = null;
    if (done.restrictive) l.revokeDone.restrictive = true;
    if (done.flush) {
      l.revokeDone.flush = true;
      l.dirty = false;
    }
    this.kickRevoke(l);
    if (l.revokeOutstanding !== null) return; // more to do: a stronger revoke came in meanwhile
    const honours = l.honouring;
    const restrictive = l.revokeDone.restrictive;
    l.honouring = [];
    l.revokeNeed = { restrictive: false, flush: false };
    l.revokeDone = { restrictive: false, flush: false };
    if (restrictive) {
      assertThat(l.state === 'Sharing' || l.state === 'WantToAcquire', `${l.id}: restrictive revoke in ${l.state}`);
      l.cacheValid = false;
      l.stale = false;
      l.retryAtTick = null;
      this.go(l, 'Joined', 'restrictive-revoked');
      this.broadcast(this.slist(l), { type: 'unshare', lock: l.id, inc: this.incarnation, seq: l.seq });
    } else if (honours.length > 0) {
      l.stale = true;
      if (l.state === 'Sharing') this.go(l, 'Sharing', 'unrestrictive-acquire');
    }
    for (const h of honours) {
      if (this.live.has(h.from)) this.answer(l, h.from, 'acquire', h.req, 'ack', h.dirty);
    }
    this.advance(l);
  }

  private onAnswer(l: LockRec, from: NodeId, m: Extract<OplockMessage, { type: 'ack' | 'nak' }>): void {
    const a = l.attempt;
    if (a === null || a.req !== m.req || a.kind !== m.answers || !a.waiting.has(from)) return;
    a.waiting.delete(from);
    if (m.type === 'nak' && a.kind !== 'join') {
      // join: nak only means "not interested". share/acquire: busy, back off.
      if (a.kind === 'acquire') this.abandonAcquire(l);
      else l.attempt = null;
      // The nak may predate a release we already saw: then the retry signal came first.
      l.retryAtTick = this.nowTick + (a.releaseSeen ? 1 : this.backoff());
      this.go(l, l.state, 'nak');
      return;
    }
    if (m.type === 'ack' && m.dirty) a.dirtySeen = true;
    this.maybeComplete(l);
  }

  // ------------------------------------------------------------ membership

  private onEvicted(node: NodeId, records: LockId[] | undefined, cleaner: NodeId | undefined): void {
    if (node === this.nodeId || !this.peers.has(node)) return;
    const known: LockId[] = [];
    for (const l of this.locks.values()) if (l.owner === node && l.ownerNonVolatile) known.push(l.id);
    this.live.delete(node);
    for (const l of this.locks.values()) {
      l.views.delete(node);
      l.answered.delete(node);
      if (l.owner === node) l.owner = null;
      l.honouring = l.honouring.filter((h) => h.from !== node);
    }
    // Inherit first: if the eviction also completes our own acquire of an inherited
    // oplock, that one grant must carry the cleanup (a second grant would clean twice).
    const heir = cleaner ?? Math.min(this.nodeId, ...this.live);
    if (heir === this.nodeId) {
      for (const lock of records ?? known) {
        if (isLockId(lock)) this.inherit(this.lock(lock));
      }
    }
    for (const l of this.locks.values()) {
      const a = l.attempt;
      if (a !== null && a.waiting.delete(node)) {
        a.evictedSeen = true;
        this.maybeComplete(l);
      }
      this.signalRetry(l);
    }
  }

  /** This node cleans up after a dead owner of `l`: claim the record, acquire, grant with cleanup. */
  private inherit(l: LockRec): void {
    this.out.journal.push({ lock: l.id, owner: this.nodeId });
    l.lastUsedTick = this.nowTick;
    if (l.state === 'Acquired') {
      l.held!.nonVolatile = true;
      this.grant(l, 'acquire', true, true, l.held!.restrictive);
      return;
    }
    l.cleanupPending = true;
    l.desired = 3;
    l.wantRestrictive = true;
    l.wantNonVolatile = true;
    if (l.state === 'WantToAcquire' && l.attempt !== null && !l.attempt.restrictive) {
      this.abandonAcquire(l); // retried at once, restrictive
    }
    this.advance(l);
  }

  private forgetPeer(p: NodeId): void {
    for (const l of this.locks.values()) {
      l.views.delete(p);
      l.answered.delete(p);
    }
  }

  private reportEvict(p: NodeId): void {
    if (this.evictSet.has(p)) return;
    this.evictSet.add(p);
    this.out.evict.push(p);
  }

  // ------------------------------------------------------------ driving a lock toward what the CP wants

  private advance(l: LockRec): void {
    if (!this.booted || l.revokeOutstanding !== null || l.honouring.length > 0) return;
    switch (l.state) {
      case 'Boot':
      case 'WantToJoin':
        return;
      case 'Uninterested':
        if (l.desired >= 2) {
          this.go(l, 'WantToJoin', 'want');
          this.startAttempt(l, 'join');
        }
        return;
      case 'Joined':
        if (l.desired >= 2) {
          this.go(l, 'WantToShare', 'want-share');
          this.startAttempt(l, 'share');
        } else if (l.desired === 0) {
          this.go(l, 'Uninterested', 'leave');
          this.broadcast(this.slist(l), { type: 'leave', lock: l.id, inc: this.incarnation, seq: l.seq });
        }
        return;
      case 'WantToShare':
        if (l.desired < 2) {
          l.attempt = null;
          l.retryAtTick = null;
          this.go(l, 'Joined', 'cancel');
          this.broadcast(this.slist(l), { type: 'unshare', lock: l.id, inc: this.incarnation, seq: l.seq });
          this.advance(l);
        } else if (l.attempt === null && l.retryAtTick === null) {
          this.go(l, 'WantToShare', 'retry');
          this.startAttempt(l, 'share');
        }
        return;
      case 'Sharing':
        if (l.desired === 3) {
          this.go(l, 'WantToAcquire', 'want-acquire');
          this.startAttempt(l, 'acquire');
        } else if (l.desired < 2) {
          if (l.dirty) {
            l.revokeNeed.flush = true;
            this.kickRevoke(l);
            return;
          }
          l.cacheValid = false;
          l.stale = false;
          this.go(l, 'Joined', 'unshare');
          this.broadcast(this.slist(l), { type: 'unshare', lock: l.id, inc: this.incarnation, seq: l.seq });
          this.advance(l);
        } else if (!l.cacheValid) {
          // Shared on the way to an acquire that was then cancelled: the CP holds nothing yet.
          l.cacheValid = true;
          this.grant(l, 'share', false, false, false);
        }
        return;
      case 'WantToAcquire':
        if (l.desired < 3) {
          this.abandonAcquire(l);
          l.retryAtTick = null;
          this.go(l, 'Sharing', 'cancel');
          this.advance(l);
        } else if (l.attempt === null && l.retryAtTick === null) {
          this.go(l, 'WantToAcquire', 'retry');
          this.startAttempt(l, 'acquire');
        }
        return;
      case 'Acquired':
        if (l.desired < 3) {
          this.release(l, 'release');
          this.advance(l);
        }
        return;
    }
  }

  private startAttempt(l: LockRec, kind: RequestType): void {
    assertThat(l.attempt === null, `${l.id}: attempt already in progress`);
    l.seq++;
    const targets = kind === 'join' ? this.jlist() : kind === 'share' ? this.slist(l) : this.alist(l);
    const a: Attempt = {
      kind,
      req: l.seq,
      waiting: new Set(targets),
      asked: targets,
      startTick: this.nowTick,
      lastSentTick: this.nowTick,
      reportedTick: new Map(),
      dirtySeen: false,
      evictedSeen: false,
      releaseSeen: false,
      restrictive: l.wantRestrictive,
      nonVolatile: l.wantNonVolatile,
    };
    l.attempt = a;
    const message = this.request(l, a);
    for (const t of targets) this.send(t, message);
    this.maybeComplete(l);
  }

  private maybeComplete(l: LockRec): void {
    const a = l.attempt;
    if (a === null || a.waiting.size > 0) return;
    l.attempt = null;
    switch (a.kind) {
      case 'join':
        this.go(l, 'Joined', 'joined');
        break;
      case 'share':
        this.go(l, 'Sharing', 'shared');
        // A dirty acker holds updates that media (and so the copy we are about to read) lacks.
        l.stale = a.dirtySeen;
        if (l.desired === 2) {
          l.cacheValid = true;
          this.grant(l, 'share', false, false, false);
        }
        break;
      case 'acquire': {
        const purge = a.dirtySeen || a.evictedSeen || l.stale || !l.cacheValid;
        const nonVolatile = a.nonVolatile || l.cleanupPending;
        // Owner recorded before the grant (a cleaner's claim already is).
        if (nonVolatile && !l.cleanupPending) this.out.journal.push({ lock: l.id, owner: this.nodeId });
        l.held = { restrictive: a.restrictive, nonVolatile };
        l.owner = this.nodeId;
        l.ownerNonVolatile = nonVolatile;
        this.go(l, 'Acquired', 'acquired');
        l.cacheValid = true;
        l.stale = false;
        if (!a.restrictive) l.dirty = true;
        l.lastUsedTick = this.nowTick;
        const cleanup = l.cleanupPending;
        l.cleanupPending = false;
        this.grant(l, 'acquire', purge, cleanup, a.restrictive);
        break;
      }
    }
    this.advance(l);
  }

  /** Drop the acquire attempt in progress, if any, and tell those asked (the retry signal). */
  private abandonAcquire(l: LockRec): void {
    const a = l.attempt;
    if (a === null) return;
    assertThat(a.kind === 'acquire', `${l.id}: abandoning a ${a.kind} as an acquire`);
    l.attempt = null;
    this.broadcast(a.asked, { type: 'release', lock: l.id, inc: this.incarnation, seq: l.seq });
  }

  private release(l: LockRec, label: 'release' | 'idle'): void {
    const h = l.held;
    assertThat(l.state === 'Acquired' && h !== null, `${l.id}: release while ${l.state}`);
    if (h.nonVolatile) this.out.journal.push({ lock: l.id, owner: null });
    l.held = null;
    l.owner = null;
    this.go(l, 'Sharing', label);
    this.broadcast(this.slist(l), { type: 'release', lock: l.id, inc: this.incarnation, seq: l.seq });
  }

  private signalRetry(l: LockRec): void {
    if (l.attempt === null && l.retryAtTick !== null) {
      l.retryAtTick = null;
      this.advance(l);
    }
  }

  // ------------------------------------------------------------ helpers

  private go(l: LockRec, to: OplockState, on: TransitionLabel): void {
    const key = transitionKey(l.state, on);
    const row = TRANSITION_INDEX.get(key);
    if (row === undefined || row.to !== to) fail(`${l.id}: no transition ${key} ${to} in TRANSITIONS`);
    if (ADVERTISES[l.state] !== ADVERTISES[to]) l.seq++;
    l.state = to;
    this.taken.add(key);
    assertThat((to === 'Acquired') === (l.held !== null), `${l.id}: held ${l.held !== null} in ${to}`);
    assertThat(!l.dirty || ADVERTISES[to] === 'sharing', `${l.id}: dirty in ${to}`);
  }

  private grant(l: LockRec, mode: 'share' | 'acquire', purge: boolean, cleanup: boolean, restrictive: boolean): void {
    this.out.granted.push({ lock: l.id, mode, purge, cleanup, restrictive });
  }

  private answer(l: LockRec, to: NodeId, answers: RequestType, req: number, type: 'ack' | 'nak', dirty: boolean): void {
    if (answers === 'acquire') l.answered.set(to, { inc: this.peerInc.get(to) ?? 0, req, type, dirty });
    this.sendAnswer(l, to, answers, req, type, dirty);
  }

  private sendAnswer(l: LockRec, to: NodeId, answers: RequestType, req: number, type: 'ack' | 'nak', dirty: boolean): void {
    const base = { lock: l.id, inc: this.incarnation, seq: l.seq, answers, req, state: ADVERTISES[l.state] };
    this.send(to, type === 'ack' ? { type: 'ack', ...base, dirty } : { type: 'nak', ...base });
  }

  private request(l: LockRec, a: Attempt): OplockMessage {
    const h = { lock: l.id, inc: this.incarnation, seq: l.seq, req: a.req };
    if (a.kind === 'acquire') return { type: 'acquire', ...h, restrictive: a.restrictive, nonVolatile: a.nonVolatile };
    return { type: a.kind, ...h };
  }

  private send(to: NodeId, message: OplockMessage): void {
    this.out.send.push({ to, message });
  }

  private broadcast(to: Iterable<NodeId>, message: OplockMessage): void {
    for (const t of to) this.send(t, message);
  }

  private slist(l: LockRec): NodeId[] {
    return this.jlist().filter((p) => {
      const adv = l.views.get(p)?.adv;
      return adv === 'joined' || adv === 'sharing';
    });
  }

  private alist(l: LockRec): NodeId[] {
    return this.jlist().filter((p) => l.views.get(p)?.adv === 'sharing');
  }

  private backoff(): number {
    return this.backoffTicks + this.rank;
  }

  private lock(id: LockId): LockRec {
    let l = this.locks.get(id);
    if (l === undefined) {
      l = {
        id,
        state: this.booted ? 'Uninterested' : 'Boot',
        desired: 0,
        seq: 0,
        views: new Map(),
        attempt: null,
        retryAtTick: null,
        honouring: [],
        revokeOutstanding: null,
        revokeNeed: { restrictive: false, flush: false },
        revokeDone: { restrictive: false, flush: false },
        dirty: false,
        stale: false,
        cacheValid: false,
        owner: null,
        ownerNonVolatile: false,
        wantRestrictive: true,
        wantNonVolatile: false,
        held: null,
        lastUsedTick: this.nowTick,
        cleanupPending: false,
        answered: new Map(),
      };
      this.locks.set(id, l);
    }
    return l;
  }
}
