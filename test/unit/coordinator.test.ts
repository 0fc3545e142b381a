/**
 * The cluster coordinator (cluster/coordinator.ts) end to end: three Coordinators over
 * three real Meshes on 127.0.0.1, one in-memory JournalStore shared by all (as the
 * shared metadata area is), and fake CP hooks that record every call.
 *
 * Timing: heartbeat 100 ms, peer timeout 800 ms, coordinator tick 20 ms, ack timeout
 * 800 ms. Every wait polls with a generous deadline (a loaded 2-core machine), so the
 * assertions are about order and counts, never about exact latencies.
 */
import test, { type ExecutionContext } from 'ava';
import pino from 'pino';

import { Coordinator, T_MEMBERSHIP, T_MEMBERSHIP_VIEW, T_OPLOCK, type CoordinatorHooks, type JournalStore, type NodeJournal } from '../../cluster/coordinator.js';
import type { Eviction } from '../../cluster/membership.js';
import { Mesh, MeshError, type NodeId } from '../../cluster/mesh.js';
import type { LockId } from '../../cluster/oplock.js';
import { startMeshes } from '../helpers/mesh.js';

const HOST = '127.0.0.1';
const SECRET = 'coordinator-test-secret';
const IDS: NodeId[] = [1, 2, 3];
const PEER_TIMEOUT_MS = 800;
const ACK_TIMEOUT_MS = 800;
const TICK_MS = 20;

/** The shared metadata's journal chunks: one per node. */
class MemoryJournals implements JournalStore {
  readonly chunks = new Map<NodeId, NodeJournal>();
  readonly writes: NodeJournal[] = [];
  async read(node: NodeId): Promise<NodeJournal> {
    await Promise.resolve();
    const j = this.chunks.get(node) ?? { node, boot: 0, records: [], heldBy: null };
    return { ...j, records: [...j.records] };
  }
  async write(j: NodeJournal): Promise<void> {
    await Promise.resolve();
    const copy = { ...j, records: [...j.records] };
    this.chunks.set(j.node, copy);
    this.writes.push(copy);
  }
  get(node: NodeId): NodeJournal {
    return this.chunks.get(node) ?? { node, boot: 0, records: [], heldBy: null };
  }
}

interface Recorder {
  calls: string[];
  revokes: { lock: LockId; restrictive: boolean; flush: boolean }[];
  cleanups: LockId[];
  wanted: LockId[];
  evicted: Eviction[];
  selfEvicted: number;
}

interface Node {
  id: NodeId;
  mesh: Mesh;
  c: Coordinator;
  rec: Recorder;
  boot: { records: LockId[]; boot: number; heldBy: NodeId | null };
  stopped: boolean;
}

/** One timeline for every node's hook calls, to assert cross-node order. */
type Timeline = string[];

function hooksFor(id: NodeId, rec: Recorder, timeline: Timeline, onWanted?: (lock: LockId) => void): CoordinatorHooks {
  const mark = (what: string): void => {
    rec.calls.push(what);
    timeline.push(`${what}@${id}`);
  };
  return {
    async revoke(lock, r) {
      rec.revokes.push({ lock, restrictive: r.restrictive, flush: r.flush });
      mark(`revoke(${lock},${r.restrictive ? 'restrictive' : 'unrestrictive'})`);
      await new Promise((res) => setTimeout(res, 10)); // purge, drain
    },
    afterRevoke(lock) {
      mark(`afterRevoke(${lock})`);
    },
    async cleanup(lock) {
      rec.cleanups.push(lock);
      mark(`cleanup(${lock})`);
      await new Promise((res) => setTimeout(res, 10));
    },
    wanted(lock) {
      rec.wanted.push(lock);
      mark(`wanted(${lock})`);
      onWanted?.(lock);
    },
    selfEvicted() {
      rec.selfEvicted++;
      mark('selfEvicted');
    },
    evicted(e) {
      rec.evicted.push(e);
      mark(`evicted(${e.node} by ${e.cleaner})`);
    },
  };
}

interface Cluster {
  nodes: Map<NodeId, Node>;
  journals: MemoryJournals;
  timeline: Timeline;
  node(id: NodeId): Node;
}

const silent = pino({ level: 'silent' });

/** Meshes start highest id first (a node dials only higher ids), then each coordinator boots and starts. */
async function startCluster(t: ExecutionContext, opts: { onWanted?: (id: NodeId, lock: LockId) => void } = {}): Promise<Cluster> {
  const journals = new MemoryJournals();
  const timeline: Timeline = [];
  const nodes = new Map<NodeId, Node>();
  const meshes = await startMeshes(IDS, async (id, peers) => {
    const mesh = new Mesh({
      nodeId: id, secret: SECRET, listen: { host: HOST, port: 0 }, log: silent,
      heartbeatMs: 100, peerTimeoutMs: PEER_TIMEOUT_MS, reconnectMaxMs: 300,
      peers: peers.map((p) => ({ id: p.id, endpoint: { host: HOST, port: p.port } })),
    });
    await mesh.start();
    return { mesh };
  }, { timeoutMs: 5000, what: 'meshes up' });
  for (const id of IDS) {
    const { mesh } = meshes.get(id)!;
    const c = new Coordinator({
      nodeId: id, peers: IDS, mesh, journals, log: silent, tickMs: TICK_MS, ackTimeoutMs: ACK_TIMEOUT_MS, bootGraceMs: 2000, journalWaitMs: 2000,
    });
    const rec: Recorder = { calls: [], revokes: [], cleanups: [], wanted: [], evicted: [], selfEvicted: 0 };
    c.hooks = hooksFor(id, rec, timeline, opts.onWanted ? (lock) => opts.onWanted!(id, lock) : undefined);
    const boot = await c.bootJournal();
    await c.replayed(boot.records);
    c.start();
    nodes.set(id, { id, mesh, c, rec, boot, stopped: false });
  }
  t.teardown(async () => {
    for (const n of nodes.values()) {
      if (!n.stopped) await n.c.stop();
      await n.mesh.stop();
    }
  });
  return { nodes, journals, timeline, node: (id) => nodes.get(id)! };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}`);
    await sleep(10);
  }
}

/** Resolves `p` or fails after `ms` (a grant that never comes must not hang the suite). */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Lets in-flight frames and the coordinators' queued steps settle. */
async function quiesce(cl: Cluster, ms = 300): Promise<void> {
  let last = -1;
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline) {
    await sleep(ms);
    const now = [...cl.nodes.values()].reduce((s, n) => s + n.c.stats.messagesSent + n.c.stats.messagesReceived, 0);
    if (now === last) return;
    last = now;
  }
}

const sent = (n: Node): number => n.c.stats.messagesSent;

const L_SOLO = 'vseg1.rmap[0]';
const L_SHARED = 'vseg1.rmap[2]';
const L_HELD = 'vseg1.rmap[1]';

// ---------------------------------------------------------------- boot

test.serial('boot: each node takes its journal (boot 1), nothing to replay, sees its peers up', async (t) => {
  const cl = await startCluster(t);
  for (const n of cl.nodes.values()) {
    t.deepEqual(n.boot, { records: [], boot: 1, heldBy: null });
    t.deepEqual(cl.journals.get(n.id), { node: n.id, boot: 1, records: [], heldBy: null });
    await waitFor(() => n.c.livePeers().length === 2, 3000, `node ${n.id} sees both peers`);
    const s = n.c.status();
    t.is(s.evictor, 1);
    t.true(s.quorum);
    t.deepEqual(s.members.map((m) => [m.id, m.state]), IDS.filter((p) => p !== n.id).map((p) => [p, 'up']));
  }
  t.deepEqual(cl.timeline, [], 'no CP hook called');
});

// ---------------------------------------------------------------- uncontended

test.serial('uncontended: after the first join, acquires of a lock nobody else uses send no mesh message', async (t) => {
  const cl = await startCluster(t);
  const n1 = cl.node(1);
  await quiesce(cl);
  const s0 = sent(n1);
  const g = await within(n1.c.share(L_SOLO), 3000, 'share');
  t.like(g, { lock: L_SOLO, mode: 'share' });
  await quiesce(cl);
  const joinCost = sent(n1) - s0;
  t.log(`first share of an unused lock: ${joinCost} messages from node 1 (join to both peers; they answer "out", so the share goes to nobody)`);
  t.is(joinCost, 2, 'one join per peer');
  t.is(cl.node(2).c.stats.messagesSent + cl.node(3).c.stats.messagesSent, 2, 'one answer each');

  const s1 = sent(n1);
  const before = { r2: cl.node(2).c.stats.messagesReceived, r3: cl.node(3).c.stats.messagesReceived };
  for (let i = 0; i < 5; i++) {
    const v = await within(n1.c.withAcquired(L_SOLO, {}, async (acq) => {
      t.like(acq, { lock: L_SOLO, mode: 'acquire', cleanup: false });
      t.is(n1.c.state(L_SOLO), 'Acquired');
      return i;
    }), 3000, 'withAcquired');
    t.is(v, i);
  }
  t.is(n1.c.state(L_SOLO), 'Sharing', 'released after fn');
  await quiesce(cl);
  t.is(sent(n1) - s1, 0, 'five acquire/release rounds: zero messages');
  t.is(cl.node(2).c.stats.messagesReceived - before.r2, 0);
  t.is(cl.node(3).c.stats.messagesReceived - before.r3, 0);
  t.true(n1.c.stats.grants >= 6);
});

// ---------------------------------------------------------------- contended

test.serial('withAcquired on node 2 while 1 and 3 share: both revoke (restrictive) before fn runs, then afterRevoke', async (t) => {
  const cl = await startCluster(t);
  const [n1, n2, n3] = [cl.node(1), cl.node(2), cl.node(3)];
  await within(Promise.all([n1.c.share(L_SHARED), n3.c.share(L_SHARED), n2.c.share(L_SHARED)]), 5000, 'shares');
  await quiesce(cl);
  cl.timeline.length = 0;
  let revokedBeforeFn: string[] = [];
  await within(n2.c.withAcquired(L_SHARED, { restrictive: true }, async (g) => {
    revokedBeforeFn = [...cl.timeline];
    cl.timeline.push('fn@2');
    t.like(g, { mode: 'acquire', restrictive: true });
    // Revoked: they stopped sharing (afterRevoke asked for a copy again: the holder naks it for now).
    for (const n of [n1, n3]) t.true(['Joined', 'WantToShare'].includes(n.c.state(L_SHARED)), `node ${n.id}: ${n.c.state(L_SHARED)}`);
  }), 5000, 'withAcquired on node 2');
  t.true(revokedBeforeFn.includes(`revoke(${L_SHARED},restrictive)@1`), `node 1 revoked before fn: ${revokedBeforeFn.join(' ')}`);
  t.true(revokedBeforeFn.includes(`revoke(${L_SHARED},restrictive)@3`), `node 3 revoked before fn: ${revokedBeforeFn.join(' ')}`);
  await waitFor(() => cl.timeline.includes(`afterRevoke(${L_SHARED})@1`) && cl.timeline.includes(`afterRevoke(${L_SHARED})@3`), 3000, 'afterRevoke');
  for (const id of [1, 3]) {
    const tl = cl.timeline;
    t.true(tl.indexOf(`revoke(${L_SHARED},restrictive)@${id}`) < tl.indexOf(`afterRevoke(${L_SHARED})@${id}`), `node ${id}: revoke, then afterRevoke`);
  }
  t.deepEqual(n2.rec.revokes, [], 'the acquirer revokes nothing');
  t.deepEqual(n1.rec.revokes, [{ lock: L_SHARED, restrictive: true, flush: false }]);
  t.deepEqual(n3.rec.revokes, [{ lock: L_SHARED, restrictive: true, flush: false }]);
  await waitFor(() => n1.c.state(L_SHARED) === 'Sharing' && n3.c.state(L_SHARED) === 'Sharing', 3000, 'sharing again after the release');
});

test.serial('hold on node 1, node 2 wants the lock: node 1 gets wanted(); after unhold node 2 is granted; the record is journaled while held', async (t) => {
  let release: ((lock: LockId) => void) | null = null;
  const cl = await startCluster(t, { onWanted: (id, lock) => id === 1 && release?.(lock) });
  const [n1, n2] = [cl.node(1), cl.node(2)];
  const g = await within(n1.c.hold(L_HELD), 5000, 'hold');
  t.like(g, { lock: L_HELD, mode: 'acquire', restrictive: true });
  t.true(n1.c.holding(L_HELD));
  t.deepEqual(cl.journals.get(1).records, [L_HELD], 'non-volatile: in node 1 journal before the grant');
  t.is(n1.c.status().journalRecords, 1);

  let unheldAt = 0;
  release = (lock) => {
    // The CP lets go once its mirror write is done: a little later.
    setTimeout(() => {
      unheldAt = Date.now();
      n1.c.unhold(lock);
    }, 50);
  };
  let ranAt = 0;
  await within(n2.c.withAcquired(L_HELD, {}, async () => {
    ranAt = Date.now();
    t.false(n1.c.holding(L_HELD));
  }), 8000, 'node 2 acquires after the unhold');
  t.deepEqual(n1.rec.wanted.slice(0, 1), [L_HELD], 'node 1 was asked to let go');
  t.true(unheldAt > 0 && ranAt >= unheldAt, 'node 2 ran after node 1 let go');
  await waitFor(() => cl.journals.get(1).records.length === 0, 3000, 'record cleared at the release');
  t.is(n1.c.status().journalRecords, 0);
});

// ---------------------------------------------------------------- crash and eviction

test.serial('node 2 crashes holding a non-volatile lock: node 1 fences it, cleans its record once, frees its journal', async (t) => {
  const cl = await startCluster(t);
  const [n1, n2, n3] = [cl.node(1), cl.node(2), cl.node(3)];
  await within(n2.c.hold(L_HELD), 5000, 'node 2 holds');
  t.deepEqual(cl.journals.get(2).records, [L_HELD]);
  await quiesce(cl);

  // Crash: the process stops; nothing is released, its journal keeps the record.
  const crashedAt = Date.now();
  n2.stopped = true;
  await n2.c.stop();
  await n2.mesh.stop();

  await waitFor(() => n1.rec.cleanups.length > 0, 10_000, 'node 1 cleans up node 2');
  const evictedAfterMs = Date.now() - crashedAt;
  t.log(`node 2 evicted and its record cleaned ${evictedAfterMs} ms after the crash (peer timeout ${PEER_TIMEOUT_MS} ms)`);
  t.true(evictedAfterMs < PEER_TIMEOUT_MS + 4000, 'within the peer timeout plus the fence');
  t.deepEqual(n1.rec.evicted, [{ node: 2, records: [L_HELD], cleaner: 1 }]);
  await waitFor(() => n3.rec.evicted.length > 0, 3000, 'node 3 told');
  t.deepEqual(n3.rec.evicted, [{ node: 2, records: [L_HELD], cleaner: 1 }]);
  await waitFor(() => cl.journals.get(2).heldBy === null && cl.journals.get(1).records.length === 0, 3000, 'journals settle');
  await sleep(500);
  t.deepEqual(n1.rec.cleanups, [L_HELD], 'cleaned exactly once, by the cleaner');
  t.deepEqual(n3.rec.cleanups, [], 'not by the other survivor');
  t.deepEqual(cl.journals.get(2), { node: 2, boot: 1, records: [], heldBy: null }, "node 2's journal free and empty for its next boot");
  t.true(cl.journals.writes.some((j) => j.node === 2 && j.heldBy === 1), 'it was held by node 1 while fenced');
  t.deepEqual(cl.journals.get(1).records, [], 'node 1 released the inherited record after the cleanup');
  t.is(n1.c.status().members.find((m) => m.id === 2)?.state, 'evicted');
  t.is(n1.c.stats.evictions, 1);
  t.is(n1.c.stats.cleanups, 1);
  t.is(n3.c.stats.cleanups, 0);
  t.is(n1.rec.selfEvicted + n3.rec.selfEvicted, 0);
  // The survivors still work together.
  await within(n3.c.withAcquired(L_HELD, {}, async () => undefined), 5000, 'node 3 acquires the freed lock');
});

// ---------------------------------------------------------------- hostile input

test.serial("malformed 'op' and 'mb' frames are counted as rejected; nothing crashes", async (t) => {
  const cl = await startCluster(t);
  const [n1, n3] = [cl.node(1), cl.node(3)];
  await quiesce(cl);
  const before = n1.c.stats.rejected;
  const ops: unknown[] = [null, 7, 'acquire', [], {}, { type: 'acquire' }, { type: 'ack', lock: 'nope', inc: 0, seq: 1, answers: 'share', req: 1, state: 'joined', dirty: false }];
  const mbs: unknown[] = [null, {}, { type: 'suspect', node: 99 }, { type: 'evicted', node: 2, records: 'x', cleaner: 1, epoch: 1, boot: 0 }, { type: 'nope', node: 2 }, { type: 'suspect', node: 1 }];
  for (const body of ops) t.true(n3.mesh.send(1, T_OPLOCK, body));
  for (const body of mbs) t.true(n3.mesh.send(1, T_MEMBERSHIP, body));
  await waitFor(() => n1.c.stats.rejected - before >= ops.length + mbs.length, 3000, 'all rejected');
  t.is(n1.c.stats.rejected - before, ops.length + mbs.length);
  const err = await t.throwsAsync(n3.mesh.request(1, T_MEMBERSHIP_VIEW, { node: 'two' }, 2000));
  t.true(err instanceof MeshError && err.remoteCode === 'EINVAL', 'mb-view with a bad body: EINVAL');
  t.deepEqual(await n3.mesh.request(1, T_MEMBERSHIP_VIEW, { node: 2 }, 2000), { up: true });
  t.deepEqual(n1.c.status().members.map((m) => m.state), ['up', 'up'], 'membership unchanged');
  t.is(n1.rec.selfEvicted, 0);
  await within(n1.c.withAcquired(L_SHARED, {}, async () => undefined), 5000, 'node 1 still works');
  await within(n3.c.share(L_SHARED), 5000, 'node 3 still works');
});
