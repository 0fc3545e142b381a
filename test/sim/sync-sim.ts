/**
 * A seeded simulation of synchronization points (cluster/sync-point.ts): N real
 * SyncEndpoints, a simulated message switch that drops, delays (hence reorders) and
 * duplicates broadcasts, a simulated clock, all driven by one PRNG from one seed.
 * Invariants are checked after every step; a violation throws naming the seed, and
 * `runSyncSim(seed)` replays it exactly.
 *
 * Invariants:
 * - a node reports a sync passed or timed out only if it started it, and at most one
 *   of the two, once (never both);
 * - a node passes only if every node in the mask had started the sync, and the newest
 *   report it had received from each of them (by seq) was the key: a delayed old
 *   report never outweighs a stop;
 * - a node that times out says so: the same ready() broadcasts a different key in
 *   that scope;
 * - at the end, every node that started a sync passed it, timed out, or was stopped
 *   by its application while waiting (never neither);
 * - profile `calm` (no loss, everyone starts well within the timeout): all pass;
 *   profile `absent` (one member never starts): nobody passes, every starter times out.
 *
 * The PRNG is local (mulberry32): the shared test/sim/prng.ts is someone else's file.
 */
import {
  CONSISTENCY_POINT_KEY, MIRROR_SIDE_STATE_KEY, PAUSE_IO_KEY, RESUME_IO_KEY,
  SyncEndpoint, maskOf,
} from '../../cluster/sync-point.js';
import type { NodeId, SyncBroadcast, SyncId, SyncKey } from '../../cluster/sync-point.js';

export type SyncSimProfile = 'calm' | 'lossy' | 'absent' | 'chaos';
export const SYNC_SIM_PROFILES: readonly SyncSimProfile[] = ['calm', 'lossy', 'absent', 'chaos'];

/** mulberry32: 32-bit state, good enough to drive a simulation, trivially replayable. */
export function syncSimPrng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export type SyncOutcome = 'passed' | 'timed-out' | 'aborted';

export interface SyncSimSync {
  sync: SyncId;
  key: SyncKey;
  members: NodeId[];
  timeoutTicks: number;
  /** Start tick per member; absent = never starts. */
  startAt: Map<NodeId, number>;
  outcome: Map<NodeId, SyncOutcome>;
}

export interface SyncSimResult {
  seed: number;
  profile: SyncSimProfile;
  nodes: number;
  syncs: SyncSimSync[];
  sent: number;
  dropped: number;
  duplicated: number;
  staleReports: number;
  duplicateReports: number;
}

interface InFlight {
  atTick: number;
  from: NodeId;
  to: NodeId;
  b: SyncBroadcast;
}

function pick<T>(rng: () => number, items: readonly T[]): T {
  return items[Math.floor(rng() * items.length)]!;
}

function int(rng: () => number, lo: number, hi: number): number {
  return lo + Math.floor(rng() * (hi - lo + 1));
}

export function runSyncSim(seed: number, forced?: SyncSimProfile): SyncSimResult {
  const rng = syncSimPrng(seed);
  const profile = forced ?? pick(rng, SYNC_SIM_PROFILES);
  const fail = (what: string): never => {
    throw new Error(`sync sim seed ${seed} (${profile}): ${what}`);
  };
  const n = int(rng, 2, 6);
  const calm = profile === 'calm';
  const dropRate = calm || profile === 'absent' ? 0 : profile === 'lossy' ? rng() * 0.3 : rng() * 0.5;
  const dupRate = rng() * 0.2;
  const maxDelayTicks = int(rng, 1, 5);
  const rebroadcastEveryTicks = pick(rng, [0, 3, 7]);
  const eps: SyncEndpoint[] = [];
  for (let i = 0; i < n; i++) eps.push(new SyncEndpoint(i, { rebroadcastEveryTicks }));

  const syncs: SyncSimSync[] = [];
  const syncCount = int(rng, 1, 3);
  for (let s = 0; s < syncCount; s++) {
    const members: NodeId[] = [];
    for (let i = 0; i < n; i++) if (rng() < 0.75) members.push(i);
    if (members.length === 0) members.push(int(rng, 0, n - 1));
    if (profile === 'absent' && members.length === 1) members.push(members[0] === 0 ? 1 : 0);
    members.sort((x, y) => x - y);
    const timeoutTicks = int(rng, 10, 40);
    const spread = calm ? Math.floor(timeoutTicks / 3) : Math.floor(timeoutTicks * 1.5);
    const startAt = new Map<NodeId, number>();
    const absent = profile === 'absent' ? pick(rng, members) : -1;
    for (const m of members) {
      if (m === absent) continue;
      if (profile === 'chaos' && rng() < 0.1) continue;
      startAt.set(m, int(rng, 0, spread));
    }
    // Concurrent syncs often share a key: only the scope keeps them apart.
    const key = pick(rng, [PAUSE_IO_KEY, PAUSE_IO_KEY, RESUME_IO_KEY, MIRROR_SIDE_STATE_KEY, CONSISTENCY_POINT_KEY]);
    syncs.push({ sync: `sim-${seed}/${s}`, key, members, timeoutTicks, startAt, outcome: new Map() });
  }
  const bySync = new Map(syncs.map((s) => [s.sync, s]));

  // Application stops: after an outcome sometimes; in chaos, sometimes an abort while waiting.
  const stopAt = new Map<string, number>(); // `${node}|${sync}` → tick
  const abortAt = new Map<string, number>();
  if (profile === 'chaos') {
    for (const s of syncs) {
      for (const [m, t0] of s.startAt) if (rng() < 0.05) abortAt.set(`${m}|${s.sync}`, t0 + int(rng, 0, s.timeoutTicks));
    }
  }

  let inflight: InFlight[] = [];
  let sent = 0;
  let dropped = 0;
  let duplicated = 0;
  let now = 0;

  /** receiver|sender|scope → the highest-seq report delivered so far: what a pass may rely on. */
  const newestDelivered = new Map<string, { seq: number; key: SyncKey }>();

  const drain = (node: NodeId): void => {
    const r = eps[node]!.ready();
    for (const b of r.broadcast) {
      for (let to = 0; to < n; to++) {
        if (to === node) continue;
        sent++;
        if (rng() < dropRate) { dropped++; continue; }
        const copies = rng() < dupRate ? 2 : 1;
        if (copies === 2) duplicated++;
        for (let c = 0; c < copies; c++) inflight.push({ atTick: now + int(rng, 1, maxDelayTicks), from: node, to, b });
      }
    }
    for (const id of r.passed) {
      const s = bySync.get(id) ?? fail(`node ${node} passed unknown sync ${id}`);
      if (!s.startAt.has(node) || s.startAt.get(node)! > now) fail(`node ${node} passed ${id} it never started`);
      if (s.outcome.has(node)) fail(`node ${node} passed ${id} after ${s.outcome.get(node)}`);
      for (const m of s.members) {
        const at = s.startAt.get(m);
        if (at === undefined || at > now) fail(`node ${node} passed ${id} at tick ${now} but member ${m} had not started`);
      }
      for (const m of s.members) {
        if (m === node) continue;
        const newest = newestDelivered.get(`${node}|${m}|${id}`);
        if (newest === undefined || newest.key !== s.key) {
          fail(`node ${node} passed ${id} but the newest report it got from ${m} is ${JSON.stringify(newest)}`);
        }
      }
      if (eps[node]!.check(id)?.state !== 'passed') fail(`node ${node} reported ${id} passed but check says otherwise`);
      s.outcome.set(node, 'passed');
      if (rng() < 0.5) stopAt.set(`${node}|${id}`, now + int(rng, 0, 20));
    }
    for (const id of r.timedOut) {
      const s = bySync.get(id) ?? fail(`node ${node} timed out unknown sync ${id}`);
      if (!s.startAt.has(node)) fail(`node ${node} timed out ${id} it never started`);
      if (s.outcome.has(node)) fail(`node ${node} timed out ${id} after ${s.outcome.get(node)}`);
      if (!r.broadcast.some((b) => b.scope === id && b.key !== s.key)) fail(`node ${node} timed out ${id} without broadcasting a different key`);
      s.outcome.set(node, 'timed-out');
      if (rng() < 0.5) stopAt.set(`${node}|${id}`, now + int(rng, 0, 20));
    }
  };

  const lastStart = Math.max(0, ...syncs.flatMap((s) => [...s.startAt.values()]));
  const horizon = lastStart + 40 + 60;
  for (now = 0; now <= horizon; now++) {
    const due = inflight.filter((m) => m.atTick <= now);
    inflight = inflight.filter((m) => m.atTick > now);
    for (let i = due.length - 1; i > 0; i--) {
      const j = Math.floor(rng() * (i + 1));
      [due[i], due[j]] = [due[j]!, due[i]!];
    }
    for (const m of due) {
      const k = `${m.to}|${m.from}|${m.b.scope}`;
      if ((newestDelivered.get(k)?.seq ?? -1) < m.b.seq) newestDelivered.set(k, { seq: m.b.seq, key: m.b.key });
      eps[m.to]!.step({ kind: 'report', from: m.from, key: m.b.key, scope: m.b.scope, seq: m.b.seq });
      drain(m.to);
    }
    for (const s of syncs) {
      for (const [m, t0] of s.startAt) {
        if (t0 !== now) continue;
        eps[m]!.step({ kind: 'start', sync: s.sync, key: s.key, mask: maskOf(s.members), timeoutTicks: s.timeoutTicks });
        drain(m);
      }
    }
    for (const [k, t] of abortAt) {
      if (t !== now) continue;
      const [nodeText, id] = [k.slice(0, k.indexOf('|')), k.slice(k.indexOf('|') + 1)];
      const node = Number(nodeText);
      const s = bySync.get(id)!;
      if (s.outcome.has(node)) continue; // finished already: its ordinary stop, if any, is scheduled
      eps[node]!.step({ kind: 'stop', sync: id });
      const r = eps[node]!.ready();
      if (!r.broadcast.some((b) => b.scope === id && b.key !== s.key)) fail(`node ${node} stopped ${id} while waiting without a stop key`);
      s.outcome.set(node, 'aborted');
      // Put the broadcasts back through the network path.
      for (const b of r.broadcast) {
        for (let to = 0; to < n; to++) if (to !== node) inflight.push({ atTick: now + int(rng, 1, maxDelayTicks), from: node, to, b });
      }
    }
    for (const [k, t] of stopAt) {
      if (t !== now) continue;
      const node = Number(k.slice(0, k.indexOf('|')));
      const id = k.slice(k.indexOf('|') + 1);
      eps[node]!.step({ kind: 'stop', sync: id });
      const r = eps[node]!.ready();
      if (r.broadcast.length > 0) fail(`node ${node} stopped finished ${id} and broadcast ${JSON.stringify(r.broadcast)}`);
    }
    for (let i = 0; i < n; i++) {
      eps[i]!.step({ kind: 'tick' });
      drain(i);
    }
  }

  for (const s of syncs) {
    for (const m of s.startAt.keys()) {
      if (!s.outcome.has(m)) fail(`node ${m} started ${s.sync} but neither passed nor timed out`);
    }
    if (calm) {
      for (const m of s.members) if (s.outcome.get(m) !== 'passed') fail(`calm: node ${m} did not pass ${s.sync}`);
    }
    if (profile === 'absent') {
      for (const [m, o] of s.outcome) if (o !== 'timed-out') fail(`absent member: node ${m} ${o} ${s.sync}`);
    }
  }
  let staleReports = 0;
  let duplicateReports = 0;
  for (const ep of eps) {
    staleReports += ep.stats().reportsStale;
    duplicateReports += ep.stats().reportsDuplicate;
  }
  return { seed, profile, nodes: n, syncs, sent, dropped, duplicated, staleReports, duplicateReports };
}
