/**
 * A simulated message network: every fault comes from the run's PRNG, so a seed
 * replays. Messages are delayed (which alone reorders them), sometimes delayed much
 * longer (reordering across many ticks), dropped, duplicated, and cut by partitions
 * both when sent and when due.
 */
import type { Prng } from './prng.js';

export type SimNodeId = number;

export interface NetworkFaults {
  dropRate: number;
  duplicateRate: number;
  minDelayTicks: number;
  maxDelayTicks: number;
  /** Chance that a message is held back by up to `reorderDelayTicks` more. */
  reorderRate: number;
  reorderDelayTicks: number;
}

export const QUIET_NETWORK: NetworkFaults = {
  dropRate: 0,
  duplicateRate: 0,
  minDelayTicks: 1,
  maxDelayTicks: 2,
  reorderRate: 0,
  reorderDelayTicks: 0,
};

export interface Envelope<M> {
  from: SimNodeId;
  to: SimNodeId;
  message: M;
  sentTick: number;
  deliverTick: number;
}

export interface NetworkStats {
  sent: number;
  delivered: number;
  dropped: number;
  duplicated: number;
  cut: number;
}

export class SimNetwork<M> {
  faults: NetworkFaults;
  readonly stats: NetworkStats = { sent: 0, delivered: 0, dropped: 0, duplicated: 0, cut: 0 };
  private readonly buckets = new Map<number, Envelope<M>[]>();
  /** Partition side per node; nodes talk only within a side. Empty map: no partition. */
  private sides = new Map<SimNodeId, number>();
  private count = 0;

  constructor(private readonly prng: Prng, faults: NetworkFaults) {
    this.faults = faults;
  }

  send(nowTick: number, from: SimNodeId, to: SimNodeId, message: M): void {
    this.stats.sent++;
    if (!this.canTalk(from, to)) {
      this.stats.cut++;
      return;
    }
    if (this.prng.chance(this.faults.dropRate)) {
      this.stats.dropped++;
      return;
    }
    this.enqueue(nowTick, from, to, message);
    if (this.prng.chance(this.faults.duplicateRate)) {
      this.stats.duplicated++;
      this.enqueue(nowTick, from, to, message);
    }
  }

  /** Messages due at `nowTick`, in a random order; those now across a partition are lost. */
  due(nowTick: number): Envelope<M>[] {
    const bucket = this.buckets.get(nowTick);
    if (bucket === undefined) return [];
    this.buckets.delete(nowTick);
    this.count -= bucket.length;
    const out: Envelope<M>[] = [];
    for (const e of this.prng.shuffle(bucket)) {
      if (this.canTalk(e.from, e.to)) out.push(e);
      else this.stats.cut++;
    }
    this.stats.delivered += out.length;
    return out;
  }

  /** Split the nodes into sides; unlisted nodes form one more side together. */
  partition(groups: SimNodeId[][]): void {
    this.sides = new Map();
    groups.forEach((g, i) => g.forEach((n) => this.sides.set(n, i + 1)));
  }

  heal(): void {
    this.sides = new Map();
  }

  partitioned(): boolean {
    return this.sides.size > 0;
  }

  canTalk(a: SimNodeId, b: SimNodeId): boolean {
    return (this.sides.get(a) ?? 0) === (this.sides.get(b) ?? 0);
  }

  /** Forget everything in flight from or to `node` (its connections were torn down). */
  purge(node: SimNodeId): void {
    for (const [tick, bucket] of this.buckets) {
      const kept = bucket.filter((e) => e.from !== node && e.to !== node);
      this.count -= bucket.length - kept.length;
      if (kept.length === 0) this.buckets.delete(tick);
      else this.buckets.set(tick, kept);
    }
  }

  inFlight(): number {
    return this.count;
  }

  private enqueue(nowTick: number, from: SimNodeId, to: SimNodeId, message: M): void {
    const f = this.faults;
    let delay = this.prng.range(f.minDelayTicks, f.maxDelayTicks);
    if (this.prng.chance(f.reorderRate)) delay += this.prng.range(1, Math.max(1, f.reorderDelayTicks));
    const deliverTick = nowTick + Math.max(1, delay);
    let bucket = this.buckets.get(deliverTick);
    if (bucket === undefined) {
      bucket = [];
      this.buckets.set(deliverTick, bucket);
    }
    bucket.push({ from, to, message, sentTick: nowTick, deliverTick });
    this.count++;
  }
}
