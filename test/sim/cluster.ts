/**
 * A simulated cluster for the oplock protocol: N real `OplockMachine`s, a simulated
 * network (`network.ts`), simulated CPs, simulated shared metadata and journals, and a
 * membership stub, all driven by one PRNG (`prng.ts`) so that a seed replays exactly.
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
 * Membership stub: an `evict` suggestion from a live node fences the target (it stops
 * at once, its connections are torn down, its unflushed journal is flushed by the
 * evictor) and delivers `evicted` — with the records in the target's journal and the
 * suggester as cleaner — to every live node. A crashed node that nobody evicted is
 * evicted when it restarts; it comes back fresh in Boot as a new incarnation.
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
 * After a quiet period (`checkQuiescent`): every pending intent was granted and every
 * orphaned record was cleaned exactly once.
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
import { QUIET_NETWORK, SimNetwork, type NetworkFaults } from './network.js';
import { Prng } from './prng.js';

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
}

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

interface SimNode {
  readonly id: number;
  inc: number;
  up: boolean;
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
}

export class SimCluster {
  readonly prng: Prng;
  readonly net: SimNetwork<OplockMessage>;
  readonly locks: LockId[];
  readonly stats: SimStats = {
    ticks: 0, steps: 0, grantsShare: 0, grantsAcquire: 0, cleanups: 0, evictions: 0, crashes: 0,
    restarts: 0, partitions: 0, junkRejected: 0, idleReleases: 0,
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
      };
      this.nodes.set(id, n);
    }
    for (const n of this.nodes.values()) this.boot(n);
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
    if (!n.up) return;
    this.trace(`crash ${id}#${n.inc}`);
    this.stats.crashes++;
    this.stop(n);
  }

  /** Bring a down node back fresh; if nobody evicted it yet, membership does so first. */
  restart(id: number): void {
    const n = this.nodes.get(id)!;
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
      this.net.inFlight() === 0 &&
      this.schedule.length === 0 &&
      this.upNodes().every((n) => !n.machine!.busy())
    );
  }

  /** Random intents and faults for `ticks` ticks. */
  chaos(ticks: number, network: NetworkFaults): void {
    this.net.faults = network;
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
    return this.orphans.every((o) => o.cleaned === 1);
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
    for (const o of this.orphans) {
      if (o.cleaned !== 1) {
        this.violation(`liveness: ${o.owner}#${o.ownerInc}'s record of ${o.lock} cleaned ${o.cleaned} times ` +
          `(heir ${o.heir}#${o.heirInc}, since tick ${o.sinceTick})`);
      }
    }
  }

  orphanCount(): { total: number; cleaned: number } {
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
      if (!n.up) continue;
      const parsed = parseOplockMessage(env.message);
      if ('error' in parsed) this.violation(`node ${env.from} sent a malformed message: ${parsed.error}`);
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
    if (this.random !== null) {
      for (const n of this.nodes.values()) {
        if (!n.up && n.restartAtTick !== null && this.now >= n.restartAtTick) this.restart(n.id);
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
      n.machine!.step(event);
      this.stats.steps++;
      this.apply(n, n.machine!.ready());
      this.check();
    }
  }

  private apply(n: SimNode, r: Ready): void {
    for (const j of r.journal) {
      if (j.owner === n.id) n.journal.add(j.lock);
      else if (j.owner === null) n.journal.delete(j.lock);
      else this.violation(`${n.id} journaled ${j.lock} for another node ${j.owner}`);
    }
    for (const s of r.send) this.net.send(this.now, n.id, s.to, s.message);
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
    for (const target of r.evict) this.suggestEvict(n, target);
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
        if (this.upNodes().length > 1 && this.prng.chance(r.crashRate)) this.crash(n.id);
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
    const trace = this.traceLog === null ? '' : `\nrecent events:\n  ${this.traceLog.slice(-80).join('\n  ')}`;
    throw new SimViolation(`seed ${this.options.seed}, tick ${this.now}: ${message}${trace}`);
  }

  private trace(line: string): void {
    if (this.traceLog === null) return;
    this.traceLog.push(`[${this.now}] ${line}`);
    if (this.traceLog.length > 400) this.traceLog.splice(0, 100);
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

  /** Whether this node's CP serves `lock` from a cached copy. */
  serving(lock: LockId): boolean {
    return this.n.cp.get(lock)?.serving ?? false;
  }
}

export function simCluster(options: Partial<SimClusterOptions> & { nodes: number }): SimCluster {
  return new SimCluster({ seed: 1, ...options });
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
