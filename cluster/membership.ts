/**
 * Cluster membership (seed 004: jlist, elist and eviction): who is in the cluster, who
 * evicts a node that stopped answering, and who inherits its journal. Pure: events in
 * (`step`), actions out (`ready`); the coordinator is the driver.
 *
 * ## Model
 * Every node keeps a view of each configured peer: `up` (the mesh has a live,
 * authenticated connection to it), `down` (silent for the peer timeout, not yet
 * evicted) or `evicted` (fenced; its journal was inherited). A node is `down` on the
 * mesh's word (heartbeats) and also on the oplock machine's (`suspect`: it did not
 * answer an oplock request within the ack timeout).
 *
 * **Who evicts.** Evictions are serialized cluster-wide by giving them to one node:
 * the *evictor* is the lowest id among this node and the peers it sees `up`. A
 * non-evictor that suspects a node forwards the suspicion to the evictor; the evictor
 * fences one node at a time (`fence` action: the driver marks the victim's journal as
 * held by this node and reads its non-volatile records), then broadcasts `evicted`
 * with the records and itself as cleaner, so every survivor steps the same event into
 * its oplock machine and exactly one node (the cleaner) inherits the records.
 * Cascades: when the evictor itself dies, the next lowest id becomes evictor and
 * evicts it and every node still `down` that nobody evicted; the dead evictor's
 * claimed records are in its own journal, so the new one inherits them too.
 *
 * **Quorum.** A node evicts only while it sees more than half of the configured nodes
 * (itself included) up, or exactly half when that half holds the lowest configured id:
 * the two sides of a partition can never both evict (a 2-node cluster: node with the
 * lower id survives the other's death; the higher alone does not evict).
 *
 * **Restarts.** A peer whose process restarted before the timeout (the mesh reports
 * `down` with `restarted`) is not fenced: its new incarnation replayed its own journal
 * before it rejoined (boot steps), and the oplock machine forgets the old incarnation
 * on its own when it hears the new one.
 *
 * **Evicted nodes.** An `evicted` message about this node itself means the cluster
 * fenced it (it was partitioned or too slow): `selfEvicted` tells the driver, which
 * must stop serving and restart as a new incarnation.
 *
 * **Notices.** A notice names the victim's boot: one about a boot already evicted here
 * (or an older one) is a duplicate or stale, and one about a node this node sees up
 * (connected, not suspected) is ignored — the node restarted since, or it will get its
 * own notice. Every node keeps the last notice per victim (without the records, which
 * went to the cleaner) and passes it on: to a peer that comes up (a restarted node
 * learns the evictions it missed before its grace runs out) and to a peer that suspects
 * an evicted node (it missed the notice); `notice()` lets a driver answer a fencing
 * peer with it. A suspicion of a node the mesh still hears lapses after the grace if
 * nobody evicted it, and a fence vetoed while the mesh hears the node leaves it up:
 * otherwise a slow peer would stay down here for as long as its connection lives, and
 * this node would compute another evictor than its peers.
 */
export type NodeId = number;
/** `unknown`: not heard from since this node started (becomes `down` after the boot grace). */
export type MemberState = 'unknown' | 'up' | 'down' | 'evicted';

export type MembershipMessage =
  | { type: 'suspect'; node: NodeId }
  /** `boot`: the victim's boot count when fenced; a later incarnation of it ignores the message. */
  | { type: 'evicted'; node: NodeId; records: string[]; cleaner: NodeId; epoch: number; boot: number };

export type MembershipEvent =
  | { kind: 'tick' }
  | { kind: 'up'; node: NodeId }
  | { kind: 'down'; node: NodeId; restarted?: boolean }
  | { kind: 'suspect'; node: NodeId }
  | { kind: 'message'; from: NodeId; message: unknown }
  /** The driver fenced `node` (its journal is now held by this node) and found these records. */
  | { kind: 'fenced'; node: NodeId; records: string[]; boot: number }
  /**
   * The driver did not fence `node`: a peer still hears it, or the metadata write
   * failed. It is given another grace period.
   */
  | { kind: 'fence-failed'; node: NodeId };

export interface Eviction { node: NodeId; records: string[]; cleaner: NodeId }

export interface MembershipReady {
  send: { to: NodeId; message: MembershipMessage }[];
  /** Fence this node (mark its journal held by us, read its records), then step `fenced`. */
  fence: NodeId[];
  /** Step into the oplock machine (every survivor gets the same). */
  evicted: Eviction[];
  /** The cluster evicted this node. */
  selfEvicted: boolean;
  /** Input that was dropped, with why (for a log line). */
  rejected: string[];
}

export interface MemberView { id: NodeId; state: MemberState; evictions: number; lastEvictedBy: NodeId | null; unknownUntil?: number }

function emptyReady(): MembershipReady {
  return { send: [], fence: [], evicted: [], selfEvicted: false, rejected: [] };
}

const MAX_RECORDS = 100_000;

/** Validates a membership message from the network; a string says what is wrong. */
export function parseMembershipMessage(x: unknown): MembershipMessage | string {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) return 'membership message: not a map';
  const o = x as Record<string, unknown>;
  const isId = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 63;
  if (!isId(o.node)) return `membership ${String(o.type)}: invalid node`;
  if (o.type === 'suspect') return { type: 'suspect', node: o.node };
  if (o.type === 'evicted') {
    if (!isId(o.cleaner)) return 'membership evicted: invalid cleaner';
    if (typeof o.epoch !== 'number' || !Number.isSafeInteger(o.epoch) || o.epoch < 0) return 'membership evicted: invalid epoch';
    if (typeof o.boot !== 'number' || !Number.isSafeInteger(o.boot) || o.boot < 0) return 'membership evicted: invalid boot';
    if (!Array.isArray(o.records) || o.records.length > MAX_RECORDS || !o.records.every((r) => typeof r === 'string' && r.length <= 160)) {
      return 'membership evicted: invalid records';
    }
    return { type: 'evicted', node: o.node, records: o.records as string[], cleaner: o.cleaner, epoch: o.epoch, boot: o.boot };
  }
  return `membership: unknown type ${JSON.stringify(o.type)}`;
}

export class Membership {
  private readonly views = new Map<NodeId, MemberView>();
  private readonly all: NodeId[];
  private fencing: NodeId | null = null;
  private readonly queue: NodeId[] = [];
  private out = emptyReady();
  /** Per victim: evictions seen (an eviction message for an older epoch is a duplicate). */
  private readonly epochs = new Map<NodeId, number>();
  /** Per victim: the latest boot seen evicted (a notice about that boot or an older one is stale or a duplicate). */
  private readonly evictedBoots = new Map<NodeId, number>();
  /** Per victim: the last eviction notice (re-sent, without records, to a peer that still suspects the victim). */
  private readonly notices = new Map<NodeId, Extract<MembershipMessage, { type: 'evicted' }>>();
  /** Peers the mesh has a live connection to (a suspicion may say `down` while the mesh still hears them). */
  private readonly meshUp = new Set<NodeId>();
  /** Per peer marked down by a suspicion: when (it lapses after the grace if the mesh still hears it and nobody evicted it). */
  private readonly suspectedAt = new Map<NodeId, number>();

  private ticks = 0;
  /** This node's boot count (an eviction notice for an earlier boot of it is stale). */
  boot = 0;

  /**
   * `graceTicks`: a peer not heard from this long after this node started is taken
   * for down (it may have died holding records that must be cleaned up).
   */
  /**
   * `retryTicks`: after a fence that did not happen (a peer still heard the node: its
   * own timeout had not run out yet), ask again this much later.
   */
  constructor(readonly nodeId: NodeId, peers: readonly NodeId[], private readonly graceTicks = 100, private readonly retryTicks = Math.max(1, Math.floor(graceTicks / 4))) {
    for (const p of peers) if (p !== nodeId) this.views.set(p, { id: p, state: 'unknown', evictions: 0, lastEvictedBy: null, unknownUntil: graceTicks });
    this.all = [nodeId, ...this.views.keys()].sort((a, b) => a - b);
  }

  members(): MemberView[] {
    return [...this.views.values()].map((v) => ({ ...v }));
  }

  state(node: NodeId): MemberState | 'self' {
    if (node === this.nodeId) return 'self';
    return this.views.get(node)?.state ?? 'evicted';
  }

  /**
   * The eviction notice (without records) this node holds about `node` while it has it
   * evicted, else null: a driver asked "do you hear `node`?" by a fencing peer can
   * answer with it, so the fencer learns of the eviction instead of fencing again.
   */
  notice(node: NodeId): MembershipMessage | null {
    return this.views.get(node)?.state === 'evicted' ? (this.notices.get(node) ?? null) : null;
  }

  /** The node that evicts, as this node sees it: the lowest id among itself and the peers up. */
  evictor(): NodeId {
    let low = this.nodeId;
    for (const v of this.views.values()) if (v.state === 'up' && v.id < low) low = v.id;
    return low;
  }

  /** More than half of the configured nodes are up (self included), or exactly half holding the lowest id. */
  hasQuorum(): boolean {
    const up = [this.nodeId, ...[...this.views.values()].filter((v) => v.state === 'up').map((v) => v.id)];
    const n = this.all.length;
    if (2 * up.length > n) return true;
    return 2 * up.length === n && up.includes(this.all[0]!);
  }

  step(e: MembershipEvent): void {
    switch (e.kind) {
      case 'tick':
        this.ticks++;
        for (const v of this.views.values()) {
          if (v.state === 'unknown' && this.ticks >= (v.unknownUntil ?? 0)) v.state = 'down';
          // A suspicion of a node the mesh still hears, that led to no eviction, lapses:
          // otherwise this node would compute another evictor and quorum than its peers
          // for as long as the connection lives (the mesh says `up` only once).
          const at = this.suspectedAt.get(v.id);
          if (v.state === 'down' && at !== undefined && this.meshUp.has(v.id) && this.fencing !== v.id && this.ticks - at >= this.graceTicks) {
            v.state = 'up';
            this.suspectedAt.delete(v.id);
            this.queue.splice(0, this.queue.length, ...this.queue.filter((n) => n !== v.id));
          }
        }
        break;
      case 'up': {
        const v = this.views.get(e.node);
        if (!v) return void this.out.rejected.push(`up from unknown node ${e.node}`);
        this.meshUp.add(e.node);
        this.suspectedAt.delete(e.node);
        v.state = 'up';
        // A peer (re)joining learns who is evicted before its boot grace runs out, so
        // it neither waits for them nor fences them again.
        for (const [victim, notice] of this.notices) {
          if (victim !== e.node && this.views.get(victim)?.state === 'evicted' && !this.meshUp.has(victim)) this.out.send.push({ to: e.node, message: notice });
        }
        this.queue.splice(0, this.queue.length, ...this.queue.filter((n) => n !== e.node));
        break;
      }
      case 'down': {
        const v = this.views.get(e.node);
        if (e.restarted) this.meshUp.add(e.node);
        else this.meshUp.delete(e.node);
        if (!v || v.state === 'evicted') return;
        if (e.restarted) {
          v.state = 'up';
          return;
        }
        v.state = 'down';
        break;
      }
      case 'suspect':
        return this.suspect(e.node);
      case 'message':
        return this.onMessage(e.from, e.message);
      case 'fenced': {
        if (this.fencing !== e.node) return void this.out.rejected.push(`fenced ${e.node} while fencing ${this.fencing}`);
        this.fencing = null;
        const epoch = (this.epochs.get(e.node) ?? 0) + 1;
        this.epochs.set(e.node, epoch);
        this.evictedBoots.set(e.node, Math.max(this.evictedBoots.get(e.node) ?? 0, e.boot));
        const v = this.views.get(e.node)!;
        v.state = 'evicted';
        v.evictions++;
        v.lastEvictedBy = this.nodeId;
        const message: MembershipMessage = { type: 'evicted', node: e.node, records: e.records, cleaner: this.nodeId, epoch, boot: e.boot };
        this.notices.set(e.node, { ...message, records: [] });
        this.meshUp.delete(e.node); // fenced: whatever the mesh still has of it is a dead connection
        for (const p of this.views.values()) if (p.state === 'up' || p.id === e.node) this.out.send.push({ to: p.id, message });
        this.out.evicted.push({ node: e.node, records: e.records, cleaner: this.nodeId });
        break;
      }
      case 'fence-failed': {
        if (this.fencing === e.node) this.fencing = null;
        const v = this.views.get(e.node);
        if (v && v.state === 'down' && this.meshUp.has(e.node)) {
          // A peer still hears it, and so does this node's mesh: it is up (a slow answer, not a death).
          v.state = 'up';
          this.suspectedAt.delete(e.node);
        } else if (v && v.state === 'down') {
          v.state = 'unknown';
          v.unknownUntil = this.ticks + this.retryTicks;
        }
        break;
      }
    }
    this.advance();
  }

  ready(): MembershipReady {
    const r = this.out;
    this.out = emptyReady();
    return r;
  }

  private suspect(node: NodeId): void {
    const v = this.views.get(node);
    if (!v || v.state === 'evicted') return;
    if (v.state === 'up' || v.state === 'unknown') v.state = 'down';
    this.suspectedAt.set(node, this.ticks);
    this.advance();
    const evictor = this.evictor();
    if (evictor !== this.nodeId) this.out.send.push({ to: evictor, message: { type: 'suspect', node } });
  }

  private onMessage(from: NodeId, raw: unknown): void {
    const m = parseMembershipMessage(raw);
    if (typeof m === 'string') return void this.out.rejected.push(`from node ${from}: ${m}`);
    if (!this.views.has(from)) return void this.out.rejected.push(`message from unknown node ${from}`);
    if (m.type === 'suspect') {
      if (m.node === this.nodeId) return void this.out.rejected.push(`node ${from} suspects this node`);
      // The suspecter missed the eviction (a lost notice, or it was not up here when
      // the notice went out): tell it again, without the records (they went to the
      // cleaner). Not while the mesh hears the node: it may be a later boot.
      const notice = this.notices.get(m.node);
      if (this.views.get(m.node)?.state === 'evicted' && notice && !this.meshUp.has(m.node)) this.out.send.push({ to: from, message: notice });
      return this.suspect(m.node);
    }
    // evicted
    if (m.node === this.nodeId) {
      if (m.boot >= this.boot) this.out.selfEvicted = true;
      else this.out.rejected.push(`eviction notice for boot ${m.boot} of this node (now boot ${this.boot}): stale`);
      return;
    }
    const v = this.views.get(m.node);
    if (!v) return void this.out.rejected.push(`eviction of unknown node ${m.node}`);
    // A duplicate, or a delayed notice about an incarnation already evicted here (the
    // node may be up again as a later boot: that one must not be evicted by it).
    const lastBoot = this.evictedBoots.get(m.node);
    if (lastBoot !== undefined && m.boot <= lastBoot) return;
    if ((this.epochs.get(m.node) ?? 0) >= m.epoch && v.state === 'evicted') return; // duplicate
    // The mesh hears the node and nothing here suspects it: the notice is about an
    // incarnation that restarted since (a later boot must not be evicted by it), or
    // the node is back and its own notice will stop it. The evictor fenced it because
    // none of the peers it asked heard it; if it is really gone, this node's mesh
    // times out, it suspects the node, and the evictor tells it again.
    if (v.state === 'up') return void this.out.rejected.push(`eviction notice for node ${m.node} boot ${m.boot} while it is up here: ignored`);
    this.epochs.set(m.node, Math.max(this.epochs.get(m.node) ?? 0, m.epoch));
    this.evictedBoots.set(m.node, m.boot);
    this.notices.set(m.node, { ...m, records: [] });
    this.meshUp.delete(m.node);
    v.state = 'evicted';
    v.evictions++;
    v.lastEvictedBy = m.cleaner;
    this.queue.splice(0, this.queue.length, ...this.queue.filter((n) => n !== m.node));
    this.out.evicted.push({ node: m.node, records: m.records, cleaner: m.cleaner });
  }

  /** The evictor fences every down node, one at a time. */
  private advance(): void {
    if (this.evictor() !== this.nodeId || !this.hasQuorum()) return;
    for (const v of this.views.values()) if (v.state === 'down' && !this.queue.includes(v.id) && this.fencing !== v.id) this.queue.push(v.id);
    if (this.fencing !== null) return;
    while (this.queue.length > 0) {
      const next = this.queue.shift()!;
      if (this.views.get(next)?.state !== 'down') continue;
      this.fencing = next;
      this.out.fence.push(next);
      return;
    }
  }
}
