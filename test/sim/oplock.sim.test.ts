/**
 * The oplock protocol under a seeded simulator (see cluster.ts for the model and the
 * invariants checked after every step). Each seed picks its own cluster size, lock
 * count, timeouts, CP delays and fault rates, then runs rounds of chaos (random
 * intents; drops, duplicates, delays, reordering, partitions, crashes, junk frames)
 * each followed by a quiet period that must settle every intent and cleanup.
 *
 * Three sweeps (membership modes, see cluster.ts):
 *   stub     the membership stub (instant, perfect eviction): the oplock machines alone
 *   stonith  real `Membership` machines over the same faulty network; a fence stops a
 *            victim that is still alive; full fault mix
 *   notice   real `Membership`, and a fence does nothing to the victim (as in the
 *            coordinator): fencing a live node is a violation, so the fault mix is the
 *            one under which no live node is ever suspected (no partitions, no drops,
 *            ack timeout above any round trip, crashes keep a quorum, a crashed node
 *            restarts after every survivor learnt its eviction)
 *
 *   DVE_SIM_SECONDS=20        time budget of the stub sweep (default 20)
 *   DVE_SIM_REAL_SECONDS=12   time budget of the stonith sweep; notice gets 2/3 of it
 *   DVE_SIM_SEEDS=n           run exactly seeds base..base+n-1 in each sweep instead (no budget)
 *   DVE_SIM_SEED_BASE=b       start the sweeps at seed b (default 1)
 *   DVE_SIM_SEED=n            replay one seed with an event trace (DVE_SIM_MODE=stub|stonith|notice,
 *                             default stub; DVE_SIM_TRACE_LINES=n prints more of the trace)
 */
import test from 'ava';
import { SimCluster, SimViolation, type RealMembershipOptions, type SimStats } from './cluster.js';
import type { NetworkFaults } from './network.js';
import { Prng } from './prng.js';

const CHAOS_TICKS = 1200;
const QUIET_MAX_TICKS = 3000;
const ROUNDS = 2;

export type SimMode = 'stub' | 'stonith' | 'notice';
const MODES: readonly SimMode[] = ['stub', 'stonith', 'notice'];

interface SeedResult { stats: SimStats; nodes: number; locks: number; messages: number; orphans: number; quietTicksMax: number }

export function runSeed(seed: number, trace = false, mode: SimMode = 'stub'): SeedResult {
  const cfg = new Prng(Math.imul(seed, 0x9e3779b1) ^ 0x5eed);
  const nodes = cfg.range(2, 5);
  const lockCount = cfg.range(1, 4);
  let ackTimeoutTicks = cfg.range(8, 30);
  const idleReleaseTicks = cfg.range(40, 150);
  const revokeDelayMax = cfg.range(1, 15);
  const holdMax = cfg.range(5, 40);
  const intentRate = cfg.range(2, 15) / 100;
  const crashRate = cfg.next() * 0.002;
  let partitionRate = cfg.next() * 0.004;
  const chaosNetwork: NetworkFaults = {
    dropRate: cfg.next() * 0.15,
    duplicateRate: cfg.next() * 0.1,
    minDelayTicks: 1,
    maxDelayTicks: cfg.range(1, 6),
    reorderRate: cfg.next() * 0.1,
    reorderDelayTicks: cfg.range(2, 20),
  };
  // Real membership: its own draws (the stub's seeds replay as they always did).
  let real: Partial<RealMembershipOptions> | undefined;
  if (mode !== 'stub') {
    const r = new Prng(seed ^ 0x7ea1);
    const peerTimeoutTicks = r.range(10, 40);
    real = {
      fence: mode,
      peerTimeoutTicks,
      graceTicks: peerTimeoutTicks + r.range(10, 80),
      viewTimeoutTicks: r.range(2, 10),
      replayTicks: [1, r.range(1, 20)],
      restartWhenHealed: true,
      restartAfterEviction: mode === 'notice',
    };
    if (mode === 'notice') {
      // Worst round trip: 2 x (6 + 20) ticks of network and 15 of CP revoke.
      ackTimeoutTicks = r.range(80, 120);
      partitionRate = 0;
      chaosNetwork.dropRate = 0;
    }
  }
  const c = new SimCluster({
    nodes,
    seed,
    locks: Array.from({ length: lockCount }, (_, i) => `vseg${seed % 10}.rmap[${i}]`),
    ackTimeoutTicks,
    idleReleaseTicks,
    cp: {
      revokeDelayTicks: [1, revokeDelayMax],
      refreshDelayTicks: [1, 30],
      holdTicks: [1, holdMax],
      forgetRate: 0.1,
    },
    random: {
      intentRate,
      restrictiveRate: 0.6,
      crashRate,
      restartDelayTicks: [10, 200],
      partitionRate,
      partitionTicks: [5, 150],
      junkRate: 0.002,
    },
    trace,
    ...(real !== undefined ? { membership: 'real' as const, real } : {}),
  });
  let quietTicksMax = 0;
  for (let round = 0; round < ROUNDS; round++) {
    c.chaos(CHAOS_TICKS, chaosNetwork);
    quietTicksMax = Math.max(quietTicksMax, c.quiet(QUIET_MAX_TICKS, 0.3));
    c.checkQuiescent();
  }
  return { stats: c.stats, nodes, locks: lockCount, messages: c.net.stats.sent, orphans: c.orphanCount().total, quietTicksMax };
}

function envInt(name: string): number | undefined {
  const v = process.env[name];
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${name}=${v} is not a non-negative integer`);
  return n;
}

function envMode(): SimMode {
  const m = process.env.DVE_SIM_MODE ?? 'stub';
  if (!(MODES as readonly string[]).includes(m)) throw new Error(`DVE_SIM_MODE=${m}: one of ${MODES.join(', ')}`);
  return m as SimMode;
}

const single = envInt('DVE_SIM_SEED');

if (single !== undefined) {
  const mode = envMode();
  test(`oplock sim: replay seed ${single} (${mode})`, (t) => {
    try {
      const r = runSeed(single, true, mode);
      t.log(`seed ${single} (${mode}): ${r.nodes} nodes, ${r.locks} locks, ${JSON.stringify(r.stats)}, ${r.messages} messages`);
      t.pass();
    } catch (e) {
      t.fail(`DVE_SIM_SEED=${single} DVE_SIM_MODE=${mode}\n${e instanceof Error ? (e instanceof SimViolation ? e.message : (e.stack ?? e.message)) : String(e)}`);
    }
  });
} else {
  const sweep = (mode: SimMode, title: string, defaultSeconds: number): void => {
    test(title, (t) => {
      const fixedCount = envInt('DVE_SIM_SEEDS');
      const budgetMs = defaultSeconds * 1000;
      const base = envInt('DVE_SIM_SEED_BASE') ?? 1;
      const started = performance.now();
      const total = {
        seeds: 0, ticks: 0, steps: 0, grants: 0, cleanups: 0, evictions: 0, crashes: 0, partitions: 0, messages: 0,
        idleReleases: 0, junk: 0, quietTicksMax: 0, fenceFailed: 0, liveFenced: 0, bootReplays: 0, membershipMessages: 0, orphans: 0,
      };
      for (let seed = base; ; seed++) {
        if (fixedCount !== undefined ? seed >= base + fixedCount : performance.now() - started >= budgetMs) break;
        let r: SeedResult;
        try {
          r = runSeed(seed, false, mode);
        } catch (e) {
          const why = e instanceof SimViolation ? e.message : e instanceof Error ? (e.stack ?? e.message) : String(e);
          t.fail(`DVE_SIM_SEED=${seed} DVE_SIM_MODE=${mode} (replay: DVE_SIM_SEED=${seed} DVE_SIM_MODE=${mode} npx ava test/sim/oplock.sim.test.ts)\n${why}`);
          return;
        }
        total.seeds++;
        total.ticks += r.stats.ticks;
        total.steps += r.stats.steps;
        total.grants += r.stats.grantsShare + r.stats.grantsAcquire;
        total.cleanups += r.stats.cleanups;
        total.evictions += r.stats.evictions;
        total.crashes += r.stats.crashes;
        total.partitions += r.stats.partitions;
        total.messages += r.messages;
        total.idleReleases += r.stats.idleReleases;
        total.junk += r.stats.junkRejected + r.stats.junkMembershipRejected;
        total.quietTicksMax = Math.max(total.quietTicksMax, r.quietTicksMax);
        total.fenceFailed += r.stats.fenceFailed;
        total.liveFenced += r.stats.liveFenced;
        total.bootReplays += r.stats.bootReplays;
        total.membershipMessages += r.stats.membershipMessages;
        total.orphans += r.orphans;
      }
      const seconds = (performance.now() - started) / 1000;
      t.log(`${mode}: ${total.seeds} seeds (from ${base}) in ${seconds.toFixed(1)} s = ${(total.seeds / seconds).toFixed(1)} seeds/s; ` +
        `${total.ticks} ticks, ${total.steps} steps, ${total.messages} messages, ${total.grants} grants, ` +
        `${total.evictions} evictions, ${total.crashes} crashes, ${total.partitions} partitions, ` +
        `${total.cleanups} cleanups (${total.orphans} orphaned records, each cleaned exactly once), ${total.idleReleases} idle releases, ${total.junk} junk frames rejected; ` +
        (mode === 'stub' ? '' : `${total.membershipMessages} membership messages, ${total.fenceFailed} fences not done, ` +
          `${total.liveFenced} live nodes fenced (stonith), ${total.bootReplays} records replayed at boot; `) +
        `longest quiet period to settle: ${total.quietTicksMax} of ${QUIET_MAX_TICKS} ticks`);
      t.true(total.seeds > 0);
      t.true(total.grants > 0);
      if (mode !== 'stub') t.true(total.evictions > 0);
    });
  };
  const realSeconds = envInt('DVE_SIM_REAL_SECONDS') ?? 12;
  sweep('stub', 'oplock sim: seeded sweep under drops, duplicates, delays, reordering, partitions and crashes', envInt('DVE_SIM_SECONDS') ?? 20);
  sweep('stonith', 'oplock sim, real membership, fence stops the victim: the same full fault mix', realSeconds);
  sweep('notice', 'oplock sim, real membership, fence as the coordinator does it: no partitions, no drops, crashes keep a quorum', Math.max(1, Math.round((realSeconds * 2) / 3)));

  test('oplock sim: a seed replays exactly', (t) => {
    for (const mode of MODES) {
      const a = runSeed(12345, false, mode);
      const b = runSeed(12345, false, mode);
      t.deepEqual(a, b, mode);
    }
  });
}

// ---------------------------------------------------------------- real membership: scripted

const L1 = 'vseg1.rmap[1]';
const L3 = 'vseg1.rmap[3]';

function settle(c: SimCluster, maxTicks = 2000): void {
  for (let i = 0; i < maxTicks && !c.settled(); i++) c.tick();
  c.checkQuiescent();
}

function tickUntil(c: SimCluster, done: () => boolean, maxTicks = 500): void {
  for (let i = 0; i < maxTicks && !done(); i++) c.tick();
  if (!done()) throw new Error(`not reached within ${maxTicks} ticks`);
}

test('real membership: a crashed owner suspected by two nodes at once is fenced once; its record is cleaned once', (t) => {
  const c = new SimCluster({ nodes: 3, seed: 7, membership: 'real', locks: [L1], trace: true });
  c.node(3).acquire(L1, { nonVolatile: true });
  c.run();
  t.is(c.owner(L1), 3);
  t.deepEqual(c.node(3).journal(), [L1]);
  c.crash(3);
  c.node(1).share(L1); // both time out on node 3 at the same tick: node 2 forwards its suspicion to node 1
  c.node(2).share(L1);
  settle(c);
  t.deepEqual(c.fences.map((f) => [f.victim, f.by]), [[3, 1]]);
  t.deepEqual(c.fences[0]!.records, [L1]);
  t.deepEqual(c.orphanCount(), { total: 1, cleaned: 1 });
  t.is(c.stats.cleanups, 1);
  t.true(c.node(2).evicted(3), 'node 2 was told');
  const trace = c.recentTrace();
  t.true(trace.some((l) => / 1: mb suspect 3$/.test(l)) && trace.some((l) => / 2: mb suspect 3$/.test(l)), 'both suspected it');
  t.true(trace.some((l) => / 1: mb <- 2 \{"type":"suspect","node":3\}$/.test(l)), 'node 2 forwarded its suspicion to node 1');
});

test('real membership: the evictor crashes mid-cleanup; the next evictor fences it and cleans both journals once (cascade)', (t) => {
  const c = new SimCluster({ nodes: 5, seed: 3, membership: 'real', locks: [L1, L3], cp: { revokeDelayTicks: [3, 3] }, trace: true });
  for (const id of [2, 3, 4]) c.node(id).share(L1).share(L3);
  c.run();
  c.node(5).acquire(L1, { nonVolatile: true }).acquire(L3, { nonVolatile: true });
  c.tick(40); // not run(): the sharers want their copies back until node 5 lets go
  t.is(c.owner(L1), 5);
  t.is(c.owner(L3), 5);
  t.deepEqual(c.node(5).journal(), [L1, L3]);
  c.crash(5);
  tickUntil(c, () => c.fences.length > 0);
  t.like(c.fences[0], { victim: 5, by: 1, records: [L1, L3] });
  t.deepEqual(c.node(1).journal(), [L1, L3], 'node 1 claimed the records');
  t.is(c.orphanCount().cleaned, 0, 'the cleanup needs the sharers to revoke first');
  c.crash(1);
  settle(c);
  t.deepEqual(c.fences.map((f) => [f.victim, f.by]), [[5, 1], [1, 2]]);
  t.deepEqual(c.fences[1]!.records, [L1, L3], "node 1's journal carried node 5's records");
  t.deepEqual(c.orphanCount(), { total: 2, cleaned: 2 }, 'each cleaned exactly once (checkQuiescent)');
  t.is(c.stats.cleanups, 2);
});

test('real membership: a restarted lowest id learns an old eviction and does not fence that node again', (t) => {
  const c = new SimCluster({ nodes: 3, seed: 5, membership: 'real', locks: [L1], trace: true });
  c.crash(3);
  tickUntil(c, () => c.fences.length > 0);
  t.like(c.fences[0], { victim: 3, by: 1 });
  c.tick(5);
  c.crash(1);
  c.tick(10); // node 2 alone: no quorum, it evicts nobody
  c.restart(1);
  c.tick(400); // well past node 1's boot grace
  t.deepEqual(c.fences.map((f) => [f.victim, f.by]), [[3, 1]], 'node 2 told node 1 of the eviction when it came up');
  t.true(c.node(1).evicted(3));
  t.is(c.node(1).membership.state(3), 'evicted');
  c.node(1).share(L1);
  settle(c);
});

test('real membership: a partitioned minority never fences; the majority fences it', (t) => {
  for (const [nodes, minority] of [[3, [1]], [2, [2]], [4, [3, 4]]] as [number, number[]][]) {
    const c = new SimCluster({ nodes, seed: 11, membership: 'real', locks: [L1] });
    const majority = c.ids().filter((id) => !minority.includes(id));
    c.partition(minority, majority);
    c.tick(300);
    t.true(c.fences.length > 0, `${nodes} nodes: the side with the quorum fences`);
    for (const f of c.fences) {
      t.true(majority.includes(f.by), `${nodes} nodes: fenced by ${f.by}, of the side with the quorum`);
      t.true(minority.includes(f.victim));
    }
    t.deepEqual(c.fences.map((f) => f.victim).sort(), [...minority].sort(), `${nodes} nodes: each minority node once`);
  }
});

test('real membership: a node restarted within the peer timeout is not fenced; it replays its own record at boot', (t) => {
  const c = new SimCluster({ nodes: 3, seed: 9, membership: 'real', locks: [L1], trace: true });
  c.node(3).acquire(L1, { nonVolatile: true });
  c.run();
  c.crash(3);
  c.tick(5);
  c.restart(3);
  t.is(c.node(3).boot, 2, 'boot count up');
  c.tick(100);
  t.deepEqual(c.fences, []);
  t.is(c.stats.bootReplays, 1);
  t.deepEqual(c.orphanCount(), { total: 1, cleaned: 1 });
  t.deepEqual(c.node(3).journal(), []);
  c.node(1).acquire(L1);
  settle(c);
  t.is(c.owner(L1), 1);
});
