/**
 * A simulated cluster for the oplock protocol: N real `OplockMachine`s, a simulated
 * network (`network.ts`), simulated CPs, simulated shared metadata and journals, and
 * membership — a stub, or one real `Membership` per node incarnation — all driven by
 * one PRNG (`prng.ts`) so that a seed replays exactly.
 *
 * Simulated CP (one per node incarnation), per oplock:
 * - holds a copy of the metadata at some version while it serves from it (`serving`);
 * - on `granted` share it reads the media version; on `granted` acquire it rereads if
 *   told to purge, asserts its copy is the latest, and updates: a restrictive update
 *   writes media at once, an unrestrictive one goes to its journal (dirty);
 * - honours `revoke` after a random delay: a restrictive one stops serving (purge,
 *   revoke FP entries, drain), a flush writes its journal to media, then `revoked`;
 *   an unrestrictive notice refreshes the copy lazily;
 * - releases what it acquired after a random hold (or forgets a non-volatile one,
 *   which the idle sweep must release).
 *
 * ## Membership stub (`membership: 'stub'`, the default; scripted oplock tests use it)
 * An `evict` suggestion from a live node fences the target (it stops at once, its
 * connections are torn down, its unflushed journal is flushed by the evictor) and
 * delivers `evicted` — with the records in the target's journal and the suggester as
 * cleaner — to every live node. A crashed node that nobody evicted is evicted when it
 * restarts; it comes back fresh in Boot as a new incarnation.
 *
 * ## Real membership (`membership: 'real'`)
 * Each node incarnation runs a real `Membership` (cluster/membership.ts), driven as the
 * coordinator drives it, by a simulated driver:
 * - Mesh: a peer is `up` for a node once both run and can talk (partitions cut that),
 *   `down` after `peerTimeoutTicks` without reaching it, and "restarted" (`down` with
 *   `restarted`, then `up`) when it reaches another incarnation before that. A node's
 *   process runs from its restart: it boots (replays the records in its journal for
 *   `replayTicks`), then starts (oplock machine, membership) as the next boot count.
 * - Membership messages, the fence's "do you hear it?" requests and their answers all
 *   travel the simulated network with the oplock messages, with the same loss, delay,
 *   duplication, reordering and partitions.
 * - Oplock `evict` → membership `suspect`; membership `evicted` → oplock `evicted`;
 *   `selfEvicted` → the node stops (and restarts later).
 * - `fence` (as `Coordinator.fence`): ask every peer up whether it still hears the
 *   victim; then, atomically, read the victim's journal, mark it held by this node,
 *   step `fenced` with its records and boot (the oplock machine claims the records into
 *   this node's journal in the same step), and release the victim's journal, empty.
 * - Journals are shared metadata and survive their node. Each record is a token, so a
 *   record replayed twice (two heirs, or an heir and the rebooted owner) is caught on
 *   the token. A record becomes an orphan when its owner incarnation dies; once an heir
 *   cleans it, the record in the heir's journal stands for the heir's own hold.
 *
 * What a fence does to a victim that still runs (`real.fence`):
 * - 'stonith': stops it at once, as if the fence cut it off the shared storage;
 * - 'notice': nothing, as the coordinator does (the victim stops when the notice reaches
 *   it) — so the sim makes fencing a live node a violation. It happens, by design,
 *   whenever a live node is suspected: a partition (the majority evicts the minority
 *   while the minority still serves and may hold oplocks Acquired); a slow answer (a CP
 *   revoke or a network delay longer than the ack timeout; in a 2-node cluster no peer
 *   can veto the fence); a lost message; or a quick restart (the survivors' oplock
 *   attempts still wait for the dead incarnation, time out and suspect the node, and
 *   the evictor fences the NEW incarnation: suspicions name no incarnation). The
 *   survivors then act on the eviction (grant, revoke nothing) while the victim still
 *   serves: two writers, stale readers. The 'notice' sweep therefore runs the fault mix
 *   under which no live node is ever suspected: no partitions, no drops (the real mesh
 *   is reliable between live processes), an ack timeout above any round trip, crashes
 *   that keep a quorum alive, and a crashed node restarts only after every live node
 *   learnt its eviction (`restartAfterEviction`). The 'stonith' sweep keeps the full
 *   fault mix but restarts crashed nodes only while no partition is in force
 *   (`restartWhenHealed`): a node that boots on one side learns evictions of nodes
 *   that may have restarted on the other; stepped into its fresh oplock machine they
 *   drop those nodes from its jlist, and as both sides then ignore each other after the
 *   heal, an acquire is granted without revoking a live sharer (stonith seeds 452 and 672 without it).
 *
 * The simulated driver does more than the coordinator does today (`real.driver`, all
 * on; turning one off shows what it is for):
 * - quorumOfAnswers: a fence needs "not up" answers from a quorum (with itself); the
 *   coordinator counts a peer that does not answer as one that does not hear the
 *   victim, so a node cut off with stale views fences the majority (stonith seed 306:
 *   a grant while a fenced node's unflushed updates were not replayed);
 * - fencedMarker: the victim's journal records the boot fenced and by whom; a second
 *   evictor (views differ for a moment) adopts that eviction instead of fencing again
 *   (stonith seeds 452, 698, 824, ...: two live nodes fence the same boot; in the
 *   coordinator both may read the records before either clears them);
 * - staleNoticeFilter: a notice about a boot older than one the oplock machine already
 *   talks to is dropped, as the membership cannot tell boots apart (stonith seeds 891,
 *   926, 1033, ...: an oplock machine drops a live, restarted node);
 * - earlyNotices: eviction notices that reach a booting node are stepped at its start
 *   (the node process starts its mesh before the coordinator listens: they are lost;
 *   notice seed 347: a restarted node never learns an eviction, waits, and its
 *   suspicion fences a live node);
 * - recheckDown: after the peers answered, the victim must still be down here (it may
 *   have restarted: the coordinator would fence the new boot while it replays its
 *   journal). Not needed by the sweeps as run (a fenced booting node is stopped, or
 *   never restarts that early) because the sim replays a journal atomically;
 * - viewCarriesNotice: the answer to "do you hear it?" carries the peer's eviction
 *   notice (`Membership.notice`), so an evictor that missed one learns it. Not needed
 *   by the sweeps since the membership passes notices on by itself; kept as a backstop;
 * - dropFromEvicted: oplock messages from an evicted incarnation are dropped (the
 *   oplock machine's contract). Never triggers here: a fence purges the victim's
 *   frames in flight, and a dead process sends nothing; only a fenced live node would.
 *
 * Invariants, checked after every step of every machine:
 * 1. at most one live node is Acquired per oplock;
 * 2. no CP serves from a copy older than the latest restrictive update;
 * 3. a CP serves only while its machine is Sharing, WantToAcquire or Acquired, and it
 *    holds an acquisition exactly while its machine is Acquired;
 * 4. a non-volatile acquisition is in its owner's journal while held; a dirty journal
 *    belongs to a node whose machine says dirty;
 * 5. an acquirer that is not told to purge already has the latest version, and no other
 *    node holds unflushed updates when an acquire is granted;
 * 6. every orphaned non-volatile record (a dead owner's) is cleaned up at most once,
 *    and only by the node that inherited it; every message a machine sends parses.
 * With real membership, also:
 * 7. no two live nodes both fenced the same incarnation (boot) of a node; no fence
 *    claims a record of a live owner; ('notice') no live node is fenced;
 * 8. a fencer's oplock machine claims every record it took; a record inherited is not
 *    released before it is cleaned; a booting node replays only records nobody cleaned;
 * 9. no oplock machine is told that a boot of a node is evicted after it heard a later
 *    boot of that node; every malformed membership frame is rejected with a reason and
 *    changes nothing.
 * After a quiet period (`checkQuiescent`): every pending intent was granted, every
 * orphaned record was cleaned exactly once (cluster-wide: by an heir or by its owner's
 * next boot, whether one node or two suspected the owner, and through cascades where
 * the evictor dies mid-cleanup), and no node is still booting.
 */
import {
  OplockMachine,
  parseOplockMessage,
  type Granted,
  type LockId,
  type OplockEvent,
  type OplockMessage,
  type OplockState,
  type Ready,
} from '../../cluster/oplock.js';
import { Membership, type MembershipEvent, type MembershipReady } from '../../cluster/membership.js';
import { QUIET_NETWORK, SimNetwork, type NetworkFaults } from './network.js';
import { Prng } from './prng.js';

/** DVE_SIM_TRACE_LINES: how many trace lines a violation prints (default 80); the trace keeps at least 400. */
const TRACE_PRINT = Math.max(1, Number(process.env.DVE_SIM_TRACE_LINES) || 80);
const TRACE_KEEP = Math.max(400, TRACE_PRINT);

export class SimViolation extends Error {
  override name = 'SimViolation';
}

export interface CpBehaviour {
  /** Ticks the CP takes to purge/drain/flush before `revoked`. */
  revokeDelayTicks: [number, number];
  /** Ticks to a lazy refresh after an unrestrictive notice. */
  refreshDelayTicks: [number, number];
  /** Ticks an acquisition is held before the CP releases it; null: only when told. */
  holdTicks: [number, number] | null;
  /** Chance that the CP never releases a non-volatile acquisition (the idle sweep must). */
  forgetRate: number;
}

export interface RandomDriver {
  /** Per live node per tick: chance of a random intent. */
  intentRate: number;
  /** Chance an acquire intent is restrictive. */
  restrictiveRate: number;
  /** Per live node per tick: chance of a crash. */
  crashRate: number;
  restartDelayTicks: [number, number];
  /** Per tick: chance a partition starts (if none is in force). */
  partitionRate: number;
  partitionTicks: [number, number];
  /** Per tick: chance a malformed frame is delivered somewhere (it must be rejected). */
  junkRate: number;
}

export interface SimClusterOptions {
  nodes: number;
  seed: number;
  locks?: LockId[];
  /** Oplocks whose acquisitions the random driver makes non-volatile (default: odd indexes). */
  nonVolatile?: (lock: LockId) => boolean;
  ackTimeoutTicks?: number;
  idleReleaseTicks?: number;
  resendTicks?: number;
  backoffTicks?: number;
  network?: NetworkFaults;
  cp?: Partial<CpBehaviour>;
  random?: RandomDriver;
  /** Keep the last few hundred events to print with a violation. */
  trace?: boolean;
  /** 'stub' (default): the membership stub; 'real': one real `Membership` per node incarnation (see the header). */
  membership?: 'stub' | 'real';
  /** With `membership: 'real'`. */
  real?: Partial<Omit<RealMembershipOptions, 'driver'>> & { driver?: Partial<DriverFixes> };
}

export interface RealMembershipOptions {
  /**
   * What a fence does to a victim that is still alive (booting or serving).
   * 'stonith': it stops at once, as if the fence cut it off the shared storage.
   * 'notice': nothing, as in the real coordinator — the victim stops only when the
   * eviction notice reaches it — and the sim treats fencing a live node as a
   * violation (see the header for the fault mix under which none is fenced).
   */
  fence: 'stonith' | 'notice';
  /** Membership boot grace: a peer never heard from is down after this many ticks. */
  graceTicks: number;
  /** Simulated mesh: a peer that was up and unreachable this long is down. */
  peerTimeoutTicks: number;
  /** A fence waits this long for the peers' answers to "do you hear the victim?". */
  viewTimeoutTicks: number;
  /** A restarting node replays the records in its journal for this long before it starts. */
  replayTicks: [number, number];
  /**
   * Crashes keep a quorum of live nodes, and a crashed node restarts only once the
   * cluster evicted it. See the header: otherwise a suspicion aimed at the dead
   * incarnation can fence the new one.
   */
  restartAfterEviction: boolean;
  /** A crashed node restarts only while no partition is in force (see the header). */
  restartWhenHealed: boolean;
  /**
   * What the simulated driver does beyond the coordinator (cluster/coordinator.ts) as it
   * is; each is needed (see the header for the failing scenario without it). All on by
   * default; turn one off to watch the sweep find the bug.
   */
  driver: DriverFixes;
}

export interface DriverFixes {
  /** Oplock messages from an incarnation after its eviction are dropped (oplock.ts contract, simplification 9). */
  dropFromEvicted: boolean;
  /** Eviction notices that reach a booting node are stepped when it starts (not lost). */
  earlyNotices: boolean;
  /** A notice about a boot older than one the oplock machine already heard is dropped. */
  staleNoticeFilter: boolean;
  /** A fence goes ahead only if this node and the peers that answered "not up" are a quorum (silence is no answer). */
  quorumOfAnswers: boolean;
  /** A fence goes ahead only if the victim is still down here after the peers answered (it may have restarted). */
  recheckDown: boolean;
  /** The victim's journal says which boot was fenced and by whom; a second fence of it adopts the first. */
  fencedMarker: boolean;
  /** A peer's answer to "do you hear it?" carries its eviction notice, if it has one. */
  viewCarriesNotice: boolean;
}

export const ALL_DRIVER_FIXES: DriverFixes = {
  dropFromEvicted: true, earlyNotices: true, staleNoticeFilter: true, quorumOfAnswers: true, recheckDown: true, fencedMarker: true, viewCarriesNotice: true,
};

export const REAL_MEMBERSHIP_DEFAULTS: RealMembershipOptions = {
  fence: 'stonith',
  graceTicks: 60,
  peerTimeoutTicks: 25,
  viewTimeoutTicks: 6,
  replayTicks: [1, 5],
  restartAfterEviction: false,
  restartWhenHealed: false,
  driver: ALL_DRIVER_FIXES,
};

/** What the simulated network carries: oplock and membership messages, and the fence's view requests. */
export type SimWire =
  | { ch: 'op'; m: OplockMessage }
  | { ch: 'mb'; m: unknown }
  | { ch: 'view?'; node: number; q: number }
  | { ch: 'view'; q: number; up: boolean; notice: unknown };

export const SCRIPT_DEFAULTS = {
  ackTimeoutTicks: 20,
  idleReleaseTicks: 200,
} as const;

const SCRIPTED_CP: CpBehaviour = {
  revokeDelayTicks: [1, 1],
  refreshDelayTicks: [1, 1],
  holdTicks: null,
  forgetRate: 0,
};

const SCRIPTED_NETWORK: NetworkFaults = { ...QUIET_NETWORK, minDelayTicks: 1, maxDelayTicks: 1 };

interface CpLock {
  /** 0 nothing, 2 share, 3 acquire: what this CP asked for. */
  want: 0 | 2 | 3;
  /** What it was granted and still holds. */
  held: 0 | 2 | 3;
  serving: boolean;
  cache: number;
  restrictiveIntent: boolean;
  nonVolatileHeld: boolean;
  pendingSinceTick: number | null;
}

interface Metadata {
  ver: number;
  mediaVer: number;
  /** Node (and incarnation) whose journal holds versions above mediaVer. */
  dirtyAt: { id: number; inc: number } | null;
  lastRestrictive: number;
}

interface Orphan {
  lock: LockId;
  owner: number;
  ownerInc: number;
  heir: number;
  heirInc: number;
  cleaned: number;
  sinceTick: number;
}

/**
 * Real membership: one non-volatile ownership record in a journal. Journals are
 * shared metadata (they survive their node's crash); reading one copies references, so
 * a record cleaned twice (by two heirs, or by an heir and its own rebooted owner) is
 * caught on the token.
 */
interface Token {
  lock: LockId;
  owner: number;
  ownerInc: number;
  /** When the owner incarnation died or was fenced: from then on exactly one node must clean it. */
  orphanedTick: number | null;
  cleaned: number;
  cleanedBy: string[];
}

interface SimJournal {
  boot: number;
  records: Map<LockId, Token[]>;
  heldBy: number | null;
  /** The boot a fence took (the journal says so until the next boot; not in the coordinator's NodeJournal: reported). */
  fencedBoot: number | null;
  fencedBy: number | null;
}

interface FenceOp { victim: number; q: number; waiting: Set<number>; heardBy: number | null; notHeard: number[]; deadline: number }

interface MeshView { up: boolean; inc: number; lastHeard: number }

export interface FenceRecord { victim: number; boot: number; by: number; byInc: number; tick: number; records: LockId[]; live: boolean }

interface SimNode {
  readonly id: number;
  inc: number;
  up: boolean;
  /** Real membership: the machines' incarnation (the journal's boot count); = inc with the stub. */
  boot: number;
  /** Real membership: the process runs (booting or up); the simulated mesh reaches it. */
  alive: boolean;
  bootDoneTick: number | null;
  replaying: Token[];
  /** Real membership: this node's journal in the shared metadata (survives restarts). */
  store: SimJournal;
  mb: Membership | null;
  mesh: Map<number, MeshView>;
  fencing: FenceOp | null;
  /** Records a fence took from a victim, until this node's oplock machine claims them. */
  claims: Map<number, Map<LockId, Token[]>>;
  activeClaim: Map<LockId, Token[]> | null;
  /** Per peer: the latest boot this incarnation was told was evicted (older oplock messages are dropped). */
  evictedBoot: Map<number, number>;
  startedTick: number;
  fencedTick: number;
  /** Per peer: the latest incarnation this incarnation's oplock machine heard from. */
  heardInc: Map<number, number>;
  /** Membership messages that arrived while this incarnation booted: stepped when it starts. */
  early: { from: number; m: unknown }[];
  /** This incarnation was evicted (and is down until restarted). */
  evicted: boolean;
  machine: OplockMachine | null;
  cp: Map<LockId, CpLock>;
  journal: Set<LockId>;
  evictedSeen: Set<number>;
  grants: Granted[];
  restartAtTick: number | null;
}

interface Scheduled { tick: number; id: number; inc: number; what: string; run: () => void }

export interface SimStats {
  ticks: number;
  steps: number;
  grantsShare: number;
  grantsAcquire: number;
  cleanups: number;
  evictions: number;
  crashes: number;
  restarts: number;
  partitions: number;
  junkRejected: number;
  idleReleases: number;
  /** Real membership only (zero with the stub). */
  fences: number;
  fenceFailed: number;
  liveFenced: number;
  selfEvictions: number;
  bootReplays: number;
  membershipMessages: number;
  membershipRejected: number;
  junkMembershipRejected: number;
  droppedFromEvicted: number;
  staleNoticesDropped: number;
  alreadyFenced: number;
}

export class SimCluster {
  readonly prng: Prng;
  readonly net: SimNetwork<SimWire>;
  /** Real membership options, or null with the stub. */
  readonly real: RealMembershipOptions | null;
  /** Real membership: every fence, in order. */
  readonly fences: FenceRecord[] = [];
  private readonly tokens: Token[] = [];
  private fenceSeq = 0;
  /** In a quiet period: a node fenced now stays down unless quiet() restarts it. */
  private quieting = false;
  readonly locks: LockId[];
  readonly stats: SimStats = {
    ticks: 0, steps: 0, grantsShare: 0, grantsAcquire: 0, cleanups: 0, evictions: 0, crashes: 0,
    restarts: 0, partitions: 0, junkRejected: 0, idleReleases: 0,
    fences: 0, fenceFailed: 0, liveFenced: 0, selfEvictions: 0, bootReplays: 0, membershipMessages: 0,
    membershipRejected: 0, junkMembershipRejected: 0, droppedFromEvicted: 0, staleNoticesDropped: 0, alreadyFenced: 0,
  };
  random: RandomDriver | null;
  cpBehaviour: CpBehaviour;
  now = 0;
  private readonly nodes = new Map<number, SimNode>();
  private readonly meta = new Map<LockId, Metadata>();
  private readonly orphans: Orphan[] = [];
  private readonly queue: { id: number; inc: number; event: OplockEvent }[] = [];
  private schedule: Scheduled[] = [];
  private partitionEndsTick: number | null = null;
  private readonly traceLog: string[] | null;
  private readonly isNonVolatile: (lock: LockId) => boolean;
  private readonly machineOptions: { ackTimeoutTicks: number; idleReleaseTicks: number; resendTicks?: number; backoffTicks?: number };

  constructor(readonly options: SimClusterOptions) {
    this.prng = new Prng(options.seed);
    this.net = new SimNetwork(this.prng, options.network ?? SCRIPTED_NETWORK);
    this.locks = options.locks ?? ['vol1.rmap[0]', 'vol1.rmap[1]', 'vol1.rmap[2]'];
    this.random = options.random ?? null;
    this.cpBehaviour = { ...SCRIPTED_CP, ...options.cp };
    this.traceLog = options.trace ? [] : null;
    this.real = options.membership === 'real'
      ? { ...REAL_MEMBERSHIP_DEFAULTS, ...options.real, driver: { ...ALL_DRIVER_FIXES, ...options.real?.driver } }
      : null;
    this.isNonVolatile = options.nonVolatile ?? ((lock) => /\[\d*[13579]\]$/.test(lock));
    this.machineOptions = {
      ackTimeoutTicks: options.ackTimeoutTicks ?? SCRIPT_DEFAULTS.ackTimeoutTicks,
      idleReleaseTicks: options.idleReleaseTicks ?? SCRIPT_DEFAULTS.idleReleaseTicks,
      ...(options.resendTicks !== undefined ? { resendTicks: options.resendTicks } : {}),
      ...(options.backoffTicks !== undefined ? { backoffTicks: options.backoffTicks } : {}),
    };
    for (let id = 1; id <= options.nodes; id++) {
      const n: SimNode = {
        id, inc: 0, up: false, evicted: false, machine: null, cp: new Map(), journal: new Set(),
        evictedSeen: new Set(), grants: [], restartAtTick: null,
        boot: 0, alive: false, bootDoneTick: null, replaying: [], store: { boot: 0, records: new Map(), heldBy: null, fencedBoot: null, fencedBy: null },
        mb: null, mesh: new Map(), fencing: null, claims: new Map(), activeClaim: null, evictedBoot: new Map(), early: [], heardInc: new Map(), startedTick: 0, fencedTick: 0,
      };
      this.nodes.set(id, n);
    }
    for (const n of this.nodes.values()) {
      if (this.real === null) this.boot(n);
      else {
        this.bootReal(n);
        this.finishBoot(n);
      }
    }
    // The first tick takes every machine out of Boot (they are all in the jlist).
    this.tick();
  }

  // ------------------------------------------------------------ scripting API

  node(id: number): SimNodeHandle {
    const n = this.nodes.get(id);
    if (n === undefined) throw new RangeError(`no node ${id}`);
    return new SimNodeHandle(this, n);
  }

  ids(): number[] {
    return [...this.nodes.keys()];
  }

  upIds(): number[] {
    return this.ids().filter((id) => this.nodes.get(id)!.up);
  }

  /** The live node holding `lock` Acquired, or null. */
  owner(lock: LockId): number | null {
    const owners = this.upNodes().filter((n) => n.machine!.state(lock) === 'Acquired').map((n) => n.id);
    if (owners.length > 1) this.violation(`${lock} acquired by ${owners.join(' and ')}`);
    return owners[0] ?? null;
  }

  partition(...groups: number[][]): void {
    this.trace(`partition ${groups.map((g) => `[${g.join(',')}]`).join(' ')}`);
    this.stats.partitions++;
    this.net.partition(groups);
  }

  heal(): void {
    this.trace('heal');
    this.partitionEndsTick = null;
    this.net.heal();
  }

  crash(id: number): void {
    const n = this.nodes.get(id)!;
    if (!n.up && !n.alive) return;
    this.trace(`crash ${id}#${n.inc}`);
    this.stats.crashes++;
    this.stop(n);
  }

  /** Bring a down node back fresh; if nobody evicted it yet, membership does so first. */
  restart(id: number): void {
    const n = this.nodes.get(id)!;
    if (this.real !== null) {
      // Real membership: nobody is evicted for it; the node replays its own journal first.
      if (n.alive) return;
      n.inc++;
      n.restartAtTick = null;
      this.stats.restarts++;
      this.trace(`restart ${id}#${n.inc}`);
      this.bootReal(n);
      this.pump();
      return;
    }
    if (n.up) return;
    if (!n.evicted) this.evict(n, this.lowestUp());
    n.inc++;
    n.restartAtTick = null;
    this.stats.restarts++;
    this.trace(`restart ${id}#${n.inc}`);
    this.boot(n);
    this.pump();
  }

  tick(count = 1): void {
    for (let i = 0; i < count; i++) this.tickOnce();
  }

  /** Tick until nothing is in flight, scheduled or in progress (or `maxTicks` pass). */
  run(maxTicks = 1000): number {
    for (let i = 0; i < maxTicks; i++) {
      if (this.idle()) return i;
      this.tickOnce();
    }
    return maxTicks;
  }

  idle(): boolean {
    return (
      this.queue.length === 0 &&
      [...this.nodes.values()].every((n) => n.fencing === null && !(n.alive && !n.up)) &&
      this.net.inFlight() === 0 &&
      this.schedule.length === 0 &&
      this.upNodes().every((n) => !n.machine!.busy())
    );
  }

  /** Random intents and faults for `ticks` ticks. */
  chaos(ticks: number, network: NetworkFaults): void {
    this.net.faults = network;
    this.quieting = false;
    for (let i = 0; i < ticks; i++) {
      this.randomFaults();
      this.randomIntents();
      this.tickOnce();
    }
  }

  /**
   * No new intents and no faults: partitions heal, membership evicts every crashed
   * node, and each down node restarts or (with chance `stayDownRate`) stays dead for
   * good; ticks until every intent is granted and every orphaned record cleaned, or
   * `maxTicks`. Returns the ticks it took.
   */
  quiet(maxTicks: number, stayDownRate = 0): number {
    this.net.faults = QUIET_NETWORK;
    if (this.net.partitioned()) this.heal();
    if (this.real !== null) {
      // Membership evicts the dead on its own, but only with a quorum: restart nodes
      // (lowest ids first) until the nodes that will be up hold one.
      const stay: number[] = [];
      this.quieting = true;
      for (const n of this.nodes.values()) {
        if (n.alive) continue;
        if (this.prng.chance(stayDownRate)) {
          stay.push(n.id);
          n.restartAtTick = null;
        } else if (this.mayRestart(n)) this.restart(n.id);
        else n.restartAtTick = this.now; // once evicted (tickOnce)
      }
      for (const id of stay.sort((a, b) => a - b)) {
        const n = this.nodes.get(id)!;
        const will = this.ids().filter((i) => this.nodes.get(i)!.alive || this.nodes.get(i)!.restartAtTick !== null);
        if (this.quorum(will)) continue;
        if (this.mayRestart(n)) this.restart(id);
        else n.restartAtTick = this.now;
      }
      this.pump();
      for (let i = 0; i < maxTicks; i++) {
        if (this.settled()) return i;
        this.tickOnce();
      }
      return maxTicks;
    }
    for (const n of this.nodes.values()) {
      if (n.up) continue;
      if (!n.evicted) this.evict(n, this.lowestUp());
      if (this.prng.chance(stayDownRate)) n.restartAtTick = null;
      else this.restart(n.id);
    }
    this.pump();
    for (let i = 0; i < maxTicks; i++) {
      if (this.settled()) return i;
      this.tickOnce();
    }
    return maxTicks;
  }

  /** Every intent granted, every orphaned record cleaned. */
  settled(): boolean {
    for (const n of this.upNodes()) for (const c of n.cp.values()) if (c.want > c.held) return false;
    if (this.real !== null) {
      if ([...this.nodes.values()].some((n) => n.alive && !n.up)) return false;
      return this.tokens.every((t) => t.cleaned === 1);
    }
    return this.orphans.every((o) => o.cleaned === 1);
  }

  /** With `restartAfterEviction`: a dead node restarts once evicted, or when the live nodes have no quorum without it. */
  private mayRestart(n: SimNode): boolean {
    if (this.real === null) return true;
    if (this.real.restartWhenHealed && this.net.partitioned()) return false;
    if (!this.real.restartAfterEviction) return true;
    if (!n.evicted) return !this.quorum(this.ids().filter((i) => this.nodes.get(i)!.alive));
    // Every live node that may still wait for the dead incarnation has been told.
    return this.upNodes().every((u) => (u.evictedBoot.get(n.id) ?? -1) >= n.store.boot || u.startedTick > n.fencedTick);
  }

  /** With `restartAfterEviction`: a crash leaves a quorum alive. */
  private mayCrash(n: SimNode): boolean {
    if (this.real === null || !this.real.restartAfterEviction) return true;
    return this.quorum(this.ids().filter((i) => i !== n.id && this.nodes.get(i)!.alive));
  }

  /** The membership's quorum rule, for a set of live nodes. */
  quorum(up: number[]): boolean {
    const n = this.nodes.size;
    if (2 * up.length > n) return true;
    return 2 * up.length === n && up.includes(Math.min(...this.ids()));
  }

  /** After a quiet period: every intent granted, every orphaned record cleaned once. */
  checkQuiescent(): void {
    for (const n of this.upNodes()) {
      for (const [lock, c] of n.cp) {
        if (c.want > c.held) {
          this.violation(`liveness: ${n.id}#${n.inc} still waits for ${c.want === 3 ? 'acquire' : 'share'} of ${lock} ` +
            `(since tick ${c.pendingSinceTick}, machine ${n.machine!.state(lock)})`);
        }
      }
    }
    for (const n of this.nodes.values()) {
      if (n.alive && !n.up) this.violation(`liveness: ${n.id}#${n.inc} still booting (replay ends at tick ${n.bootDoneTick})`);
    }
    for (const t of this.tokens) {
      if (t.cleaned !== 1) {
        this.violation(`liveness: ${t.owner}#${t.ownerInc}'s record of ${t.lock} cleaned ${t.cleaned} times ` +
          `(orphaned at tick ${t.orphanedTick}; in the journal of ${this.holderOf(t)})`);
      }
    }
    for (const o of this.orphans) {
      if (o.cleaned !== 1) {
        this.violation(`liveness: ${o.owner}#${o.ownerInc}'s record of ${o.lock} cleaned ${o.cleaned} times ` +
          `(heir ${o.heir}#${o.heirInc}, since tick ${o.sinceTick})`);
      }
    }
  }

  orphanCount(): { total: number; cleaned: number } {
    if (this.real !== null) return { total: this.tokens.length, cleaned: this.tokens.filter((t) => t.cleaned === 1).length };
    return { total: this.orphans.length, cleaned: this.orphans.filter((o) => o.cleaned === 1).length };
  }

  recentTrace(): string[] {
    return this.traceLog === null ? [] : [...this.traceLog];
  }

  // ------------------------------------------------------------ intents (used by handles and the driver)

  intent(id: number, lock: LockId, want: 'share' | 'acquire' | 'release' | 'unshare', flags: { restrictive?: boolean; nonVolatile?: boolean } = {}): void {
    const n = this.nodes.get(id)!;
    if (!n.up) throw new Error(`node ${id} is down`);
    const c = this.cpLock(n, lock);
    switch (want) {
      case 'share':
        if (c.want < 2) c.want = 2;
        break;
      case 'acquire':
        c.want = 3;
        c.restrictiveIntent = flags.restrictive ?? true;
        break;
      case 'release':
        if (c.want === 3) c.want = 2;
        if (c.held === 3) c.held = 2;
        break;
      case 'unshare':
        c.want = 0;
        c.held = 0;
        c.serving = false; // the CP stops using its copy before it says so
        break;
    }
    if (c.want > c.held && c.pendingSinceTick === null) c.pendingSinceTick = this.now;
    if (c.want <= c.held) c.pendingSinceTick = null;
    this.trace(`${id}: intent ${want} ${lock}${flags.restrictive === false ? ' unrestrictive' : ''}${flags.nonVolatile ? ' nv' : ''}`);
    this.enqueue(n, { kind: 'intent', lock, want, ...flags });
    this.pump();
  }

  // ------------------------------------------------------------ the loop

  private tickOnce(): void {
    this.now++;
    this.stats.ticks++;
    for (const n of this.prng.shuffle(this.upNodes())) this.enqueue(n, { kind: 'tick' });
    this.pump();
    for (const env of this.net.due(this.now)) {
      const n = this.nodes.get(env.to)!;
      const w = env.message;
      // Eviction notices that reach a booting node are kept for its start (suspicions
      // are not: they are about the past, and the oplock machines repeat them).
      if (n.alive && !n.up && w.ch === 'mb' && this.real?.driver.earlyNotices && (w.m as { type?: unknown } | null)?.type === 'evicted') {
        n.early.push({ from: env.from, m: w.m });
      }
      if (!n.up) continue;
      if (w.ch !== 'op') {
        this.deliverMembership(n, env.from, w);
        this.pump();
        continue;
      }
      const parsed = parseOplockMessage(w.m);
      if ('error' in parsed) this.violation(`node ${env.from} sent a malformed message: ${parsed.error}`);
      // The oplock machine's contract: nothing from an incarnation after its eviction.
      const eb = n.evictedBoot.get(env.from);
      if (eb !== undefined && parsed.inc <= eb && this.real?.driver.dropFromEvicted) {
        this.stats.droppedFromEvicted++;
        continue;
      }
      if ((n.heardInc.get(env.from) ?? -1) < parsed.inc) n.heardInc.set(env.from, parsed.inc);
      this.enqueue(n, { kind: 'message', from: env.from, message: parsed });
      this.pump();
    }
    const due = this.schedule.filter((s) => s.tick <= this.now);
    if (due.length > 0) {
      this.schedule = this.schedule.filter((s) => s.tick > this.now);
      for (const s of due) {
        const n = this.nodes.get(s.id)!;
        if (!n.up || n.inc !== s.inc) continue;
        s.run();
        this.pump();
      }
    }
    if (this.real !== null) this.tickMembership();
    if (this.random !== null) {
      for (const n of this.nodes.values()) {
        if (!n.up && !n.alive && n.restartAtTick !== null && this.now >= n.restartAtTick && this.mayRestart(n)) this.restart(n.id);
      }
      this.pump();
    }
  }

  private enqueue(n: SimNode, event: OplockEvent): void {
    this.queue.push({ id: n.id, inc: n.inc, event });
  }

  private pump(): void {
    while (this.queue.length > 0) {
      const { id, inc, event } = this.queue.shift()!;
      const n = this.nodes.get(id)!;
      if (!n.up || n.inc !== inc) continue;
      if (this.traceLog !== null && event.kind !== 'tick' && event.kind !== 'intent') this.trace(`${id}: ${describe(event)}`);
      const claiming = this.real !== null && event.kind === 'evicted' && event.cleaner === n.id;
      if (claiming) {
        n.activeClaim = n.claims.get(event.node) ?? null;
        n.claims.delete(event.node);
      }
      n.machine!.step(event);
      this.stats.steps++;
      this.apply(n, n.machine!.ready());
      if (claiming) {
        const left = [...(n.activeClaim?.keys() ?? [])];
        n.activeClaim = null;
        if (left.length > 0) this.violation(`${n.id}#${n.inc} cleans for ${event.node} but did not claim ${left.join(', ')}`);
      }
      this.check();
    }
  }

  private apply(n: SimNode, r: Ready): void {
    for (const j of r.journal) {
      if (j.owner !== n.id && j.owner !== null) this.violation(`${n.id} journaled ${j.lock} for another node ${j.owner}`);
      if (this.real !== null) {
        if (j.owner === null) this.journalRemove(n, j.lock);
        else this.journalAdd(n, j.lock);
      } else if (j.owner === n.id) n.journal.add(j.lock);
      else n.journal.delete(j.lock);
    }
    for (const s of r.send) this.net.send(this.now, n.id, s.to, { ch: 'op', m: s.message });
    for (const rv of r.revoke) this.onRevoke(n, rv.lock, rv.restrictive, rv.flush);
    for (const g of r.granted) this.onGranted(n, g);
    for (const lock of r.released) {
      this.stats.idleReleases++;
      const c = this.cpLock(n, lock);
      if (c.held !== 3) this.violation(`${n.id}: idle release of ${lock} it did not hold`);
      c.held = 2;
      c.want = 2;
      c.pendingSinceTick = null;
    }
    for (const target of r.evict) {
      if (this.real === null) this.suggestEvict(n, target);
      else this.stepMembership(n, { kind: 'suspect', node: target });
    }
  }

  // ------------------------------------------------------------ the simulated CP

  private onRevoke(n: SimNode, lock: LockId, restrictive: boolean, flush: boolean): void {
    const b = this.cpBehaviour;
    const inc = n.inc;
    if (!restrictive && !flush) {
      this.later(n, this.prng.range(...b.refreshDelayTicks), `refresh ${lock}`, () => {
        const c = this.cpLock(n, lock);
        if (c.serving) c.cache = Math.max(c.cache, this.metadata(lock).mediaVer);
      });
      return;
    }
    this.later(n, this.prng.range(...b.revokeDelayTicks), `revoked ${lock}`, () => {
      const c = this.cpLock(n, lock);
      if (restrictive) {
        c.serving = false; // purged, FP entries revoked, pending I/O drained
        if (c.held === 3) this.violation(`${n.id}#${inc}: restrictive revoke of ${lock} while holding it acquired`);
        c.held = 0;
        if (c.want > 0 && c.pendingSinceTick === null) c.pendingSinceTick = this.now;
      }
      if (flush) this.flush(n, lock);
      this.enqueue(n, { kind: 'revoked', lock });
    });
  }

  private onGranted(n: SimNode, g: Granted): void {
    n.grants.push(g);
    const c = this.cpLock(n, g.lock);
    const m = this.metadata(g.lock);
    if (g.mode === 'share') {
      this.stats.grantsShare++;
      c.cache = this.readVersion(n, m);
      c.serving = true;
      if (c.held < 2) c.held = 2;
    } else {
      this.stats.grantsAcquire++;
      if (g.purge) c.cache = this.readVersion(n, m);
      const self = m.dirtyAt !== null && m.dirtyAt.id === n.id && m.dirtyAt.inc === n.inc;
      if (m.dirtyAt !== null && !self) {
        this.violation(`${n.id}#${n.inc} granted ${g.lock} while ${m.dirtyAt.id}#${m.dirtyAt.inc} holds unflushed updates`);
      }
      if (c.cache !== m.ver) {
        this.violation(`${n.id}#${n.inc} granted ${g.lock} with copy v${c.cache} < v${m.ver} and purge=${g.purge}`);
      }
      if (g.cleanup) this.cleanUp(n, g.lock);
      // The update this acquisition was for: a restrictive one writes the metadata, an
      // unrestrictive one its journal (the machine then says dirty until a flush).
      m.ver++;
      if (g.restrictive) {
        m.mediaVer = m.ver;
        m.dirtyAt = null;
        m.lastRestrictive = m.ver;
      } else {
        m.dirtyAt = { id: n.id, inc: n.inc };
      }
      c.cache = m.ver;
      c.serving = true;
      c.held = 3;
      c.nonVolatileHeld = n.machine!.held(g.lock)?.nonVolatile ?? false;
      const hold = this.cpBehaviour.holdTicks;
      const forget = c.nonVolatileHeld && this.prng.chance(this.cpBehaviour.forgetRate);
      if (hold !== null && !forget) {
        this.later(n, this.prng.range(...hold), `release ${g.lock}`, () => {
          if (this.cpLock(n, g.lock).held === 3) this.intent(n.id, g.lock, 'release');
        });
      }
    }
    if (c.want <= c.held) c.pendingSinceTick = null;
  }

  private readVersion(n: SimNode, m: Metadata): number {
    // A reread sees media plus this node's own journal.
    const self = m.dirtyAt !== null && m.dirtyAt.id === n.id && m.dirtyAt.inc === n.inc;
    return self ? m.ver : m.mediaVer;
  }

  private flush(n: SimNode, lock: LockId): void {
    const m = this.metadata(lock);
    if (m.dirtyAt !== null && m.dirtyAt.id === n.id && m.dirtyAt.inc === n.inc) {
      m.mediaVer = m.ver;
      m.dirtyAt = null;
    }
  }

  private cleanUp(n: SimNode, lock: LockId): void {
    if (this.real !== null) return this.cleanUpToken(n, lock);
    const mine = this.orphans.filter((o) => o.lock === lock && o.heir === n.id && o.heirInc === n.inc && o.cleaned === 0);
    if (mine.length === 0) {
      const done = this.orphans.filter((o) => o.lock === lock && o.cleaned > 0);
      this.violation(`${n.id}#${n.inc} granted cleanup of ${lock} with no record to clean ` +
        `(already cleaned: ${done.map((o) => `${o.owner}#${o.ownerInc}`).join(', ') || 'none'})`);
    }
    for (const o of mine) o.cleaned++;
    this.stats.cleanups++;
  }

  private later(n: SimNode, delayTicks: number, what: string, run: () => void): void {
    this.schedule.push({ tick: this.now + Math.max(1, delayTicks), id: n.id, inc: n.inc, what, run });
  }

  // ------------------------------------------------------------ membership stub

  private suggestEvict(from: SimNode, targetId: number): void {
    if (!from.up || targetId === from.id) return;
    const target = this.nodes.get(targetId);
    if (target === undefined) return;
    if (target.evicted) {
      // Already gone: tell the one that did not know yet.
      this.enqueue(from, { kind: 'evicted', node: targetId, records: [] });
      return;
    }
    this.evict(target, from);
  }

  private evict(target: SimNode, cleaner: SimNode): void {
    if (target.evicted) return;
    this.stats.evictions++;
    this.trace(`evict ${target.id}#${target.inc}, cleaner ${cleaner.id}`);
    if (target.up) this.stop(target); // fenced
    target.evicted = true;
    this.net.purge(target.id);
    for (const lock of this.locks) {
      const m = this.metadata(lock);
      if (m.dirtyAt !== null && m.dirtyAt.id === target.id && m.dirtyAt.inc === target.inc) {
        m.mediaVer = m.ver; // the evictor replays its journal
        m.dirtyAt = null;
      }
    }
    const records = new Set(target.journal);
    for (const o of this.orphans) {
      if (o.cleaned === 0 && o.heir === target.id && o.heirInc === target.inc) {
        o.heir = cleaner.id;
        o.heirInc = cleaner.inc;
        records.add(o.lock);
      }
    }
    for (const lock of target.journal) {
      this.orphans.push({
        lock, owner: target.id, ownerInc: target.inc, heir: cleaner.id, heirInc: cleaner.inc, cleaned: 0, sinceTick: this.now,
      });
    }
    target.journal = new Set();
    for (const n of this.upNodes()) {
      n.evictedSeen.add(target.id);
      this.enqueue(n, { kind: 'evicted', node: target.id, records: [...records], cleaner: cleaner.id });
    }
    if (this.random !== null && target.restartAtTick === null) {
      target.restartAtTick = this.now + this.prng.range(...this.random.restartDelayTicks);
    }
  }

  private stop(n: SimNode): void {
    if (this.real !== null) {
      // Its own records are orphans from now on (inherited ones already were).
      for (const ts of n.store.records.values()) {
        for (const t of ts) {
          if (t.orphanedTick === null && t.owner === n.id && t.ownerInc === n.inc) {
            t.orphanedTick = this.now;
            this.tokens.push(t);
          }
        }
      }
      n.alive = false;
      n.mb = null;
      n.mesh = new Map();
      n.fencing = null;
      n.claims = new Map();
      n.bootDoneTick = null;
      n.replaying = [];
    }
    n.up = false;
    n.machine = null;
    n.cp = new Map();
    if (this.random !== null) n.restartAtTick = this.now + this.prng.range(...this.random.restartDelayTicks);
  }

  private boot(n: SimNode): void {
    n.up = true;
    n.evicted = false;
    n.cp = new Map();
    n.journal = new Set();
    n.evictedSeen = new Set();
    n.grants = [];
    const peers = this.ids().filter((id) => id !== n.id);
    n.machine = new OplockMachine(n.id, peers, { ...this.machineOptions, incarnation: n.inc });
  }

  private lowestUp(): SimNode {
    const up = this.upNodes();
    if (up.length === 0) throw new Error('no live node left to evict with');
    return up.reduce((a, b) => (a.id < b.id ? a : b));
  }

  // ------------------------------------------------------------ real membership

  /** Boot steps 1–2 of a (re)starting node: take its journal, bump the boot count, replay the records. */
  private bootReal(n: SimNode): void {
    const j = n.store;
    // The sim fences atomically (heldBy is set and cleared in one step), so a booting node never finds it held.
    if (j.heldBy !== null) this.violation(`${n.id}#${n.inc} boots while its journal is held by ${j.heldBy}`);
    if (j.boot < n.boot) this.violation(`${n.id}#${n.inc}: journal boot ${j.boot} went back from ${n.boot}`);
    n.boot = j.boot + 1;
    j.boot = n.boot;
    n.alive = true;
    n.up = false;
    n.evicted = false;
    n.machine = null;
    n.mb = null;
    n.cp = new Map();
    n.replaying = [...j.records.values()].flat();
    n.early = [];
    n.bootDoneTick = this.now + this.prng.range(...this.real!.replayTicks);
  }

  /** Boot step 3 (the CP replayed the records; they leave the journal), then start. */
  private finishBoot(n: SimNode): void {
    for (const t of n.replaying) {
      if (t.orphanedTick === null) this.violation(`${n.id}#${n.inc} replays ${t.lock} of ${t.owner}#${t.ownerInc}, which still runs`);
      if (t.cleaned > 0) {
        this.violation(`${n.id}#${n.inc} replays its journal's record of ${t.lock} (${t.owner}#${t.ownerInc}) ` +
          `already cleaned by ${t.cleanedBy.join(', ')}`);
      }
      t.cleaned++;
      t.cleanedBy.push(`${n.id}#${n.inc} (boot replay)`);
      this.stats.cleanups++;
      this.stats.bootReplays++;
      const list = n.store.records.get(t.lock);
      if (list !== undefined) {
        const kept = list.filter((x) => x !== t);
        if (kept.length > 0) n.store.records.set(t.lock, kept);
        else n.store.records.delete(t.lock);
      }
    }
    // The replay also applied what the old incarnation's metadata journal held.
    for (const lock of this.locks) {
      const m = this.metadata(lock);
      if (m.dirtyAt !== null && m.dirtyAt.id === n.id && m.dirtyAt.inc < n.inc) {
        m.mediaVer = m.ver;
        m.dirtyAt = null;
      }
    }
    n.replaying = [];
    n.bootDoneTick = null;
    n.up = true;
    n.evicted = false;
    n.cp = new Map();
    n.journal = new Set(n.store.records.keys());
    n.evictedSeen = new Set();
    n.grants = [];
    n.mesh = new Map();
    n.fencing = null;
    n.claims = new Map();
    n.activeClaim = null;
    n.evictedBoot = new Map();
    n.heardInc = new Map();
    n.startedTick = this.now;
    const peers = this.ids().filter((id) => id !== n.id);
    n.machine = new OplockMachine(n.id, peers, { ...this.machineOptions, incarnation: n.boot });
    n.mb = new Membership(n.id, this.ids(), this.real!.graceTicks);
    n.mb.boot = n.boot;
    this.trace(`${n.id}#${n.inc} up (boot ${n.boot})`);
    // As the coordinator's start(): the peers the mesh already has are up; then what
    // they said while this node booted (the notices they send a node that connects).
    for (const y of this.nodes.values()) {
      if (y === n || !y.alive || !this.net.canTalk(n.id, y.id)) continue;
      n.mesh.set(y.id, { up: true, inc: y.inc, lastHeard: this.now });
      this.stepMembership(n, { kind: 'up', node: y.id });
    }
    for (const x of n.early.splice(0)) if (n.up) this.stepMembership(n, { kind: 'message', from: x.from, message: x.m });
  }

  /** Per tick: the simulated mesh's up/down, the membership ticks, fences due, boots done. */
  private tickMembership(): void {
    const r = this.real!;
    for (const x of this.upNodes()) {
      for (const y of this.nodes.values()) {
        if (y === x || !x.up) continue;
        const reach = y.alive && this.net.canTalk(x.id, y.id);
        const v = x.mesh.get(y.id);
        if (reach) {
          if (v === undefined) {
            x.mesh.set(y.id, { up: true, inc: y.inc, lastHeard: this.now });
            this.stepMembership(x, { kind: 'up', node: y.id });
          } else {
            v.lastHeard = this.now;
            if (!v.up) {
              v.up = true;
              v.inc = y.inc;
              this.stepMembership(x, { kind: 'up', node: y.id });
            } else if (v.inc !== y.inc) {
              // Reconnected with another incarnation before the timeout: the mesh says "peer restarted".
              v.inc = y.inc;
              this.stepMembership(x, { kind: 'down', node: y.id, restarted: true });
              this.stepMembership(x, { kind: 'up', node: y.id });
            }
          }
        } else if (v !== undefined && v.up && this.now - v.lastHeard >= r.peerTimeoutTicks) {
          v.up = false;
          this.stepMembership(x, { kind: 'down', node: y.id });
        }
        this.pump();
      }
      if (x.up) {
        this.stepMembership(x, { kind: 'tick' });
        this.pump();
      }
    }
    for (const x of this.upNodes()) {
      const f = x.fencing;
      if (f !== null && (f.waiting.size === 0 || this.now >= f.deadline)) {
        x.fencing = null;
        if (f.heardBy !== null) {
          this.stats.fenceFailed++;
          this.trace(`${x.id}: not fencing ${f.victim}: ${f.heardBy} hears it`);
          this.stepMembership(x, { kind: 'fence-failed', node: f.victim });
        } else if (x.mb!.state(f.victim) === 'evicted') {
          this.trace(`${x.id}: not fencing ${f.victim}: a peer had it evicted already`);
          this.stepMembership(x, { kind: 'fence-failed', node: f.victim });
        } else if (r.driver.quorumOfAnswers && !this.quorum([x.id, ...f.notHeard])) {
          // Silence is not an answer: the peers that said "gone" and this node must be a
          // quorum, or a node cut off with stale views could fence. (The coordinator
          // counts a peer that did not answer as one that does not hear the victim: reported.)
          this.stats.fenceFailed++;
          this.trace(`${x.id}: not fencing ${f.victim}: only [${f.notHeard.join(',')}] confirmed`);
          this.stepMembership(x, { kind: 'fence-failed', node: f.victim });
        } else if (r.driver.recheckDown && x.mb!.state(f.victim) !== 'down') {
          // It came back (restarted) while the peers were asked: fencing now would fence
          // its new boot. (The coordinator does not re-check: reported.)
          this.stats.fenceFailed++;
          this.trace(`${x.id}: not fencing ${f.victim}: it is ${x.mb!.state(f.victim)} again`);
          this.stepMembership(x, { kind: 'fence-failed', node: f.victim });
        } else {
          this.fence(x, f.victim);
        }
        this.pump();
      }
    }
    for (const n of this.nodes.values()) {
      if (n.alive && !n.up && n.bootDoneTick !== null && this.now >= n.bootDoneTick) {
        this.finishBoot(n);
        this.pump();
      }
    }
  }

  private deliverMembership(n: SimNode, from: number, w: Exclude<SimWire, { ch: 'op' }>): void {
    switch (w.ch) {
      case 'mb': {
        // A notice about a boot older than one this node's oplock machine already talks
        // to is stale: dropped before the membership sees it (it cannot tell boots apart).
        const m = w.m as { type?: unknown; node?: unknown; boot?: unknown } | null;
        if (m !== null && typeof m === 'object' && m.type === 'evicted' && typeof m.node === 'number' && typeof m.boot === 'number') {
          const heard = n.heardInc.get(m.node);
          if (heard !== undefined && heard > m.boot && this.real!.driver.staleNoticeFilter) {
            this.stats.staleNoticesDropped++;
            this.trace(`${n.id}: stale notice about ${m.node} boot ${m.boot} dropped (heard boot ${heard})`);
            return;
          }
        }
        return this.stepMembership(n, { kind: 'message', from, message: w.m });
      }
      case 'view?':
        this.net.send(this.now, n.id, from, { ch: 'view', q: w.q, up: n.mb!.state(w.node) === 'up', notice: this.real!.driver.viewCarriesNotice ? n.mb!.notice(w.node) : null });
        return;
      case 'view': {
        const f = n.fencing;
        if (f === null || f.q !== w.q) return;
        f.waiting.delete(from);
        if (w.up && f.heardBy === null) f.heardBy = from;
        if (!w.up) f.notHeard.push(from);
        // The peer has it evicted already: learn that instead of fencing it again.
        if (w.notice !== null) this.deliverMembership(n, from, { ch: 'mb', m: w.notice });
        return;
      }
    }
  }

  /** Steps one membership event and performs its outputs (the caller pumps the oplock queue). */
  private stepMembership(n: SimNode, e: MembershipEvent, fencedBoot?: number): void {
    const mb = n.mb;
    if (mb === null || !n.up) return;
    if (this.traceLog !== null && e.kind !== 'tick' && (e.kind !== 'up' || process.env.DVE_SIM_TRACE_UP)) this.trace(`${n.id}: mb ${describeMembership(e)}`);
    mb.step(e);
    const r: MembershipReady = mb.ready();
    for (const why of r.rejected) {
      this.stats.membershipRejected++;
      this.trace(`${n.id}: mb rejected: ${why}`);
    }
    for (const s of r.send) {
      this.stats.membershipMessages++;
      this.net.send(this.now, n.id, s.to, { ch: 'mb', m: s.message });
    }
    for (const victim of r.fence) this.startFence(n, victim);
    const notice = e.kind === 'message' ? (e.message as { boot?: unknown } | null) : null;
    for (const ev of r.evicted) {
      const boot = fencedBoot ?? (typeof notice?.boot === 'number' ? notice.boot : undefined);
      if (boot === undefined) this.violation(`${n.id}: eviction of ${ev.node} without a boot`);
      const heard = n.heardInc.get(ev.node);
      if (heard !== undefined && heard > boot) {
        // Its oplock machine would stop waiting for a later incarnation it already talks to.
        this.violation(`${n.id}#${n.inc} told that ${ev.node} boot ${boot} is evicted after hearing its boot ${heard} ` +
          `(${e.kind === 'message' ? `notice from ${e.from}` : e.kind})`);
      }
      n.evictedSeen.add(ev.node);
      n.evictedBoot.set(ev.node, Math.max(boot, n.evictedBoot.get(ev.node) ?? -1));
      this.enqueue(n, { kind: 'evicted', node: ev.node, records: ev.records, cleaner: ev.cleaner });
    }
    if (r.selfEvicted) {
      this.stats.selfEvictions++;
      this.trace(`${n.id}#${n.inc} self-evicted: stops`);
      this.stop(n);
    }
  }

  /** The driver's fence, step 1: ask every peer up whether it still hears the victim (as the coordinator does). */
  private startFence(n: SimNode, victim: number): void {
    if (n.fencing !== null) this.violation(`${n.id}: membership asked to fence ${victim} while fencing ${n.fencing.victim}`);
    const asks = n.mb!.members().filter((v) => v.state === 'up' && v.id !== victim).map((v) => v.id);
    const q = ++this.fenceSeq;
    n.fencing = { victim, q, waiting: new Set(asks), heardBy: null, notHeard: [], deadline: this.now + this.real!.viewTimeoutTicks };
    for (const p of asks) this.net.send(this.now, n.id, p, { ch: 'view?', node: victim, q });
  }

  /**
   * The driver's fence, step 2: mark the victim's journal held by this node, read its
   * records, step `fenced`; the oplock machine claims the records into this node's
   * journal in the same step; then the victim's journal is released, empty.
   */
  private fence(x: SimNode, victimId: number): void {
    const v = this.nodes.get(victimId)!;
    const j = v.store;
    if (j.fencedBoot === j.boot && j.fencedBy !== null && this.real!.driver.fencedMarker) {
      // Another evictor fenced this boot already (two evictors for a moment: views
      // differ while connections come and go; or its notice was lost with it). The
      // journal says who: take it as that evictor's notice (the records went to it).
      this.stats.alreadyFenced++;
      this.trace(`${x.id}: not fencing ${victimId}: boot ${j.boot} was fenced by ${j.fencedBy}`);
      const by = j.fencedBy === x.id ? victimId : j.fencedBy; // a notice "from" a configured peer
      this.stepMembership(x, { kind: 'message', from: by, message: { type: 'evicted', node: victimId, records: [], cleaner: j.fencedBy, epoch: 0, boot: j.boot } });
      this.stepMembership(x, { kind: 'fence-failed', node: victimId });
      this.pump();
      return;
    }
    const live = v.alive;
    if (live) {
      if (this.real!.fence === 'notice') {
        this.violation(`${x.id}#${x.inc} fenced ${v.id}#${v.inc} (boot ${j.boot}), which is alive${v.up ? '' : ' and booting'}: ` +
          'the coordinator does not stop it before the survivors act on the eviction');
      }
      this.stats.liveFenced++;
      this.trace(`stonith ${v.id}#${v.inc}`);
      this.stop(v);
    }
    this.stats.fences++;
    this.stats.evictions++;
    const prior = this.fences.filter((f) => f.victim === victimId && f.boot === j.boot && f.by !== x.id);
    for (const f of prior) {
      const by = this.nodes.get(f.by)!;
      if (by.up && by.inc === f.byInc) {
        this.violation(`${x.id}#${x.inc} and ${f.by}#${f.byInc} (at tick ${f.tick}) both fenced ${victimId} boot ${j.boot}, and both run`);
      }
    }
    v.evicted = true;
    v.fencedTick = this.now;
    this.net.purge(v.id); // its connections are gone
    j.heldBy = x.id;
    const claim = new Map<LockId, Token[]>();
    for (const [lock, ts] of j.records) {
      for (const t of ts) {
        if (t.orphanedTick === null) this.violation(`${x.id} fenced ${v.id}: record of ${lock} by ${t.owner}#${t.ownerInc}, which still runs`);
      }
      claim.set(lock, [...ts]);
    }
    for (const lock of this.locks) {
      const m = this.metadata(lock);
      if (m.dirtyAt !== null && m.dirtyAt.id === v.id) {
        m.mediaVer = m.ver; // the evictor replays its metadata journal
        m.dirtyAt = null;
      }
    }
    const records = [...claim.keys()].sort();
    this.fences.push({ victim: victimId, boot: j.boot, by: x.id, byInc: x.inc, tick: this.now, records, live });
    this.trace(`${x.id}#${x.inc} fences ${v.id} boot ${j.boot}, records [${records.join(',')}]`);
    x.claims.set(victimId, claim);
    this.stepMembership(x, { kind: 'fenced', node: victimId, records, boot: j.boot }, j.boot);
    this.pump();
    if (x.claims.has(victimId)) this.violation(`${x.id}#${x.inc} fenced ${victimId} but never claimed its records`);
    j.records = new Map();
    j.heldBy = null;
    j.fencedBoot = j.boot;
    j.fencedBy = x.id;
    v.journal = new Set();
    if (this.random !== null && v.restartAtTick === null && !this.quieting) {
      v.restartAtTick = this.now + this.prng.range(...this.random.restartDelayTicks);
    }
  }

  private journalAdd(n: SimNode, lock: LockId): void {
    const list = n.store.records.get(lock) ?? [];
    const claimed = n.activeClaim?.get(lock);
    if (claimed !== undefined) {
      list.push(...claimed);
      n.activeClaim!.delete(lock);
    } else if (!list.some((t) => t.owner === n.id && t.ownerInc === n.inc)) {
      list.push({ lock, owner: n.id, ownerInc: n.inc, orphanedTick: null, cleaned: 0, cleanedBy: [] });
    }
    n.store.records.set(lock, list);
    n.journal.add(lock);
  }

  private journalRemove(n: SimNode, lock: LockId): void {
    for (const t of n.store.records.get(lock) ?? []) {
      if (t.orphanedTick !== null && t.cleaned === 0) {
        this.violation(`${n.id}#${n.inc} cleared its record of ${lock} inherited from ${t.owner}#${t.ownerInc} before cleaning it`);
      }
    }
    n.store.records.delete(lock);
    n.journal.delete(lock);
  }

  private cleanUpToken(n: SimNode, lock: LockId): void {
    const list = n.store.records.get(lock) ?? [];
    const todo = list.filter((t) => t.orphanedTick !== null && t.cleaned === 0);
    if (todo.length === 0) {
      const done = this.tokens.filter((t) => t.lock === lock && t.cleaned > 0);
      this.violation(`${n.id}#${n.inc} granted cleanup of ${lock} with no record to clean ` +
        `(already cleaned: ${done.map((t) => `${t.owner}#${t.ownerInc} by ${t.cleanedBy.join(' and ')}`).join(', ') || 'none'})`);
    }
    for (const t of todo) {
      t.cleaned++;
      t.cleanedBy.push(`${n.id}#${n.inc}`);
    }
    // Cleaned: the record now stands for this node's own hold (as with any non-volatile
    // acquisition): if it dies before the release, its heir cleans again, once.
    const kept = list.filter((t) => !todo.includes(t));
    if (!kept.some((t) => t.owner === n.id && t.ownerInc === n.inc)) {
      kept.push({ lock, owner: n.id, ownerInc: n.inc, orphanedTick: null, cleaned: 0, cleanedBy: [] });
    }
    n.store.records.set(lock, kept);
    this.stats.cleanups++;
  }

  private holderOf(t: Token): string {
    const at = [...this.nodes.values()].filter((n) => (n.store.records.get(t.lock) ?? []).includes(t)).map((n) => `${n.id}`);
    return at.length > 0 ? `node ${at.join(', ')}` : 'nobody';
  }

  /** A malformed membership frame: rejected with a reason, no output, no state change. */
  private deliverMembershipJunk(): void {
    const up = this.upNodes();
    if (up.length === 0) return;
    const n = this.prng.pick(up);
    const from = this.prng.pick(this.ids().filter((id) => id !== n.id));
    const ev = { type: 'evicted', node: from, records: [], cleaner: n.id, epoch: 1, boot: 0 };
    const junk: unknown[] = [
      null, 7, 'suspect', [], {}, { type: 'suspect' }, { type: 'suspect', node: -1 }, { type: 'suspect', node: 64 },
      { type: 'suspect', node: 0.5 }, { type: 'nope', node: 1 }, { ...ev, cleaner: 99 }, { ...ev, epoch: -1 }, { ...ev, epoch: 1.5 },
      { ...ev, boot: 'x' }, { ...ev, records: 'x' }, { ...ev, records: [1] }, { ...ev, records: ['x'.repeat(161)] }, { ...ev, node: undefined },
    ];
    const raw = this.prng.pick(junk);
    const mb = n.mb!;
    const before = JSON.stringify([mb.members(), mb.evictor(), mb.hasQuorum()]);
    mb.step({ kind: 'message', from, message: raw });
    const r = mb.ready();
    if (r.rejected.length !== 1 || r.send.length + r.fence.length + r.evicted.length > 0 || r.selfEvicted) {
      this.violation(`membership of ${n.id} accepted junk ${JSON.stringify(raw)}: ${JSON.stringify(r)}`);
    }
    if (JSON.stringify([mb.members(), mb.evictor(), mb.hasQuorum()]) !== before) this.violation(`junk ${JSON.stringify(raw)} changed ${n.id}'s membership`);
    this.stats.junkMembershipRejected++;
  }

  // ------------------------------------------------------------ random driver

  private randomIntents(): void {
    const r = this.random!;
    for (const n of this.upNodes()) {
      if (!n.up || !this.prng.chance(r.intentRate)) continue; // fenced by an earlier intent's eviction
      const lock = this.prng.pick(this.locks);
      const c = this.cpLock(n, lock);
      const x = this.prng.next();
      const acquire = (): void => this.intent(n.id, lock, 'acquire', {
        restrictive: this.prng.chance(r.restrictiveRate),
        nonVolatile: this.isNonVolatile(lock),
      });
      if (c.want === 0) {
        if (n.machine!.state(lock) === 'Joined' && x < 0.3) this.intent(n.id, lock, 'unshare');
        else if (x < 0.65) this.intent(n.id, lock, 'share');
        else acquire();
      } else if (c.want === 2) {
        if (c.held >= 2) {
          if (x < 0.5) acquire();
          else this.intent(n.id, lock, 'unshare');
        } else if (x < 0.2) {
          this.intent(n.id, lock, 'unshare');
        }
      } else if (c.held < 3 && x < 0.15) {
        this.intent(n.id, lock, 'release');
      }
    }
  }

  private randomFaults(): void {
    const r = this.random!;
    const up = this.upNodes();
    if (up.length > 1) {
      for (const n of up) {
        if (this.upNodes().length > 1 && this.prng.chance(r.crashRate) && this.mayCrash(n)) this.crash(n.id);
      }
    }
    if (this.partitionEndsTick !== null && this.now >= this.partitionEndsTick) this.heal();
    if (this.partitionEndsTick === null && this.prng.chance(r.partitionRate)) {
      const ids = this.prng.shuffle(this.ids());
      const cut = this.prng.range(1, ids.length - 1);
      this.partition(ids.slice(0, cut), ids.slice(cut));
      this.partitionEndsTick = this.now + this.prng.range(...r.partitionTicks);
    }
    if (this.prng.chance(r.junkRate)) this.deliverJunk();
  }

  /** A malformed frame: the parser must reject it before any machine sees it. */
  private deliverJunk(): void {
    const good: OplockMessage = { type: 'ack', lock: this.prng.pick(this.locks), inc: 0, seq: 1, answers: 'acquire', req: 1, state: 'sharing', dirty: false };
    const junk: unknown[] = [
      null, 42, 'ack', [], {}, { ...good, type: 'grant' }, { ...good, lock: 'vol1.rmap' }, { ...good, lock: 7 },
      { ...good, seq: -1 }, { ...good, seq: 1.5 }, { ...good, req: 'x' }, { ...good, dirty: 'yes' },
      { ...good, state: 'owner' }, { ...good, answers: 'release' }, { type: 'acquire', lock: good.lock, inc: 0, seq: 1, req: 1 },
      { ...good, inc: Number.NaN }, { ...good, lock: 'vol1.rmap[01]' }, { ...good, lock: `${'x'.repeat(70)}.rmap[0]` },
    ];
    const frame = this.prng.pick(junk);
    const parsed = parseOplockMessage(frame);
    if (!('error' in parsed)) this.violation(`parser accepted junk ${JSON.stringify(frame)}`);
    this.stats.junkRejected++;
    if (this.real !== null) this.deliverMembershipJunk();
  }

  // ------------------------------------------------------------ invariants

  private check(): void {
    for (const lock of this.locks) {
      let owner: number | null = null;
      const m = this.metadata(lock);
      for (const n of this.nodes.values()) {
        if (!n.up) continue;
        const mc = n.machine!;
        const state = mc.state(lock);
        if (state === 'Acquired') {
          if (owner !== null) this.violation(`${lock} acquired by both ${owner} and ${n.id}`);
          owner = n.id;
        }
        const c = n.cp.get(lock);
        if (c !== undefined) {
          if (c.serving && c.cache < m.lastRestrictive) {
            this.violation(`${n.id}#${n.inc} serves ${lock} from v${c.cache}, older than restrictive v${m.lastRestrictive}`);
          }
          if (c.serving && !SERVING_STATES.has(state)) this.violation(`${n.id}#${n.inc} serves ${lock} while ${state}`);
          if ((c.held === 3) !== (state === 'Acquired')) {
            this.violation(`${n.id}#${n.inc} CP holds ${lock} at level ${c.held} while its machine is ${state}`);
          }
        } else if (state === 'Acquired') {
          this.violation(`${n.id}#${n.inc} is Acquired on ${lock} its CP never asked for`);
        }
        const held = state === 'Acquired' ? mc.held(lock) : null;
        if (held?.nonVolatile && !n.journal.has(lock)) {
          this.violation(`${n.id}#${n.inc} holds non-volatile ${lock} with no journal record`);
        }
      }
      if (m.dirtyAt !== null) {
        const d = this.nodes.get(m.dirtyAt.id)!;
        if (d.inc === m.dirtyAt.inc && d.up && !d.machine!.dirty(lock)) {
          this.violation(`${d.id}#${d.inc} has unflushed updates to ${lock} but its machine is not dirty`);
        }
        if (d.inc === m.dirtyAt.inc && d.evicted) this.violation(`evicted ${d.id}#${d.inc} still has unflushed updates`);
      }
    }
  }

  private violation(message: string): never {
    const trace = this.traceLog === null ? '' : `\nrecent events:\n  ${this.traceLog.slice(-TRACE_PRINT).join('\n  ')}`;
    throw new SimViolation(`seed ${this.options.seed}, tick ${this.now}: ${message}${trace}`);
  }

  private trace(line: string): void {
    if (this.traceLog === null) return;
    this.traceLog.push(`[${this.now}] ${line}`);
    if (this.traceLog.length > TRACE_KEEP) this.traceLog.splice(0, TRACE_KEEP / 4);
  }

  // ------------------------------------------------------------ small helpers

  private upNodes(): SimNode[] {
    const out: SimNode[] = [];
    for (const n of this.nodes.values()) if (n.up) out.push(n);
    return out;
  }

  cpLock(n: SimNode, lock: LockId): CpLock {
    let c = n.cp.get(lock);
    if (c === undefined) {
      c = { want: 0, held: 0, serving: false, cache: -1, restrictiveIntent: true, nonVolatileHeld: false, pendingSinceTick: null };
      n.cp.set(lock, c);
    }
    return c;
  }

  private metadata(lock: LockId): Metadata {
    let m = this.meta.get(lock);
    if (m === undefined) {
      m = { ver: 0, mediaVer: 0, dirtyAt: null, lastRestrictive: 0 };
      this.meta.set(lock, m);
    }
    return m;
  }
}

const SERVING_STATES: ReadonlySet<OplockState> = new Set<OplockState>(['Sharing', 'WantToAcquire', 'Acquired']);

/** One node of a SimCluster, for scenario scripts. */
export class SimNodeHandle {
  constructor(private readonly c: SimCluster, private readonly n: SimNode) {}

  get id(): number {
    return this.n.id;
  }

  get up(): boolean {
    return this.n.up;
  }

  get machine(): OplockMachine {
    if (this.n.machine === null) throw new Error(`node ${this.n.id} is down`);
    return this.n.machine;
  }

  share(lock: LockId): this {
    this.c.intent(this.n.id, lock, 'share');
    return this;
  }

  acquire(lock: LockId, flags: { restrictive?: boolean; nonVolatile?: boolean } = {}): this {
    this.c.intent(this.n.id, lock, 'acquire', flags);
    return this;
  }

  release(lock: LockId): this {
    this.c.intent(this.n.id, lock, 'release');
    return this;
  }

  unshare(lock: LockId): this {
    this.c.intent(this.n.id, lock, 'unshare');
    return this;
  }

  state(lock: LockId): OplockState {
    return this.machine.state(lock);
  }

  /** Whether this incarnation was told that node `id` was evicted. */
  evicted(id: number): boolean {
    return this.n.evictedSeen.has(id);
  }

  /** Grants this incarnation received, oldest first. */
  grants(lock?: LockId): Granted[] {
    return lock === undefined ? [...this.n.grants] : this.n.grants.filter((g) => g.lock === lock);
  }

  journal(): LockId[] {
    return [...this.n.journal].sort();
  }

  /** Real membership: the process runs (booting or up). */
  get alive(): boolean {
    return this.n.alive;
  }

  /** Real membership: this incarnation's membership machine. */
  get membership(): Membership {
    if (this.n.mb === null) throw new Error(`node ${this.n.id} has no membership (down, booting, or the stub)`);
    return this.n.mb;
  }

  /** Real membership: the boot count in this node's journal. */
  get boot(): number {
    return this.n.store.boot;
  }

  /** Whether this node's CP serves `lock` from a cached copy. */
  serving(lock: LockId): boolean {
    return this.n.cp.get(lock)?.serving ?? false;
  }
}

export function simCluster(options: Partial<SimClusterOptions> & { nodes: number }): SimCluster {
  return new SimCluster({ seed: 1, ...options });
}

function describeMembership(e: MembershipEvent): string {
  switch (e.kind) {
    case 'message':
      return `<- ${e.from} ${JSON.stringify(e.message)}`;
    case 'fenced':
      return `fenced ${e.node} boot ${e.boot} records=[${e.records.join(',')}]`;
    case 'down':
      return `down ${e.node}${e.restarted ? ' (restarted)' : ''}`;
    case 'tick':
      return 'tick';
    default:
      return `${e.kind} ${e.node}`;
  }
}

function describe(e: OplockEvent): string {
  switch (e.kind) {
    case 'tick':
      return 'tick';
    case 'intent':
      return `intent ${e.want} ${e.lock}`;
    case 'revoked':
      return `revoked ${e.lock}`;
    case 'evicted':
      return `evicted ${e.node} records=[${(e.records ?? []).join(',')}] cleaner=${e.cleaner}`;
    case 'message': {
      const m = e.message;
      const extra = m.type === 'ack' || m.type === 'nak'
        ? ` ${m.answers} req=${m.req} state=${m.state}${m.type === 'ack' && m.dirty ? ' dirty' : ''}`
        : m.type === 'acquire'
          ? ` req=${m.req}${m.restrictive ? ' restrictive' : ''}${m.nonVolatile ? ' nv' : ''}`
          : 'req' in m ? ` req=${m.req}` : '';
      return `<- ${e.from} ${m.type} ${m.lock} seq=${m.seq}${extra}`;
    }
  }
}
