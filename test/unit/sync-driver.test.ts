/**
 * SyncDriver (sync points over the mesh) and IoPauseCoordinator (group atomic I/O
 * pause), over 3 real meshes on 127.0.0.1 (ephemeral ports), with fake PauseHooks.
 *
 * Meshes are started highest id first (a node dials only higher ids, so they are
 * already listening). Ticks are 20 ms so timeouts stay short.
 */
import test, { type ExecutionContext } from 'ava';
import { performance } from 'node:perf_hooks';
import pino from 'pino';

import { IoPauseCoordinator, IoPauseError, type PauseHooks } from '../../cluster/io-pause.js';
import { Mesh, MeshError, type NodeId } from '../../cluster/mesh.js';
import { SyncDriver, type SyncTransport } from '../../cluster/sync-driver.js';
import { consistencyPointSync, maskOf, pauseIoSync } from '../../cluster/sync-point.js';
import { startMeshes } from '../helpers/mesh.js';

const HOST = '127.0.0.1';
const SECRET = 'sync-driver-test-secret';
const TICK_MS = 20;
const SAFETY_MARGIN_MS = 300;
const RESUME_TIMEOUT_MS = 400;

// ── Harness ─────────────────────────────────────────────────────────────────

interface LogLine {
  level: number;
  msg: string;
  [k: string]: unknown;
}

function memoryLogger(): { log: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const log = pino({ level: 'debug', base: null }, { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) });
  return { log, lines };
}

/** Records calls; a volume is paused while its pause count exceeds its resume count. */
class FakeHooks implements PauseHooks {
  readonly calls: string[] = [];
  readonly depth = new Map<string, number>();
  pauses = 0;
  resumes = 0;
  lastResumeAt = 0;
  /** pause() never resolves (a drain that hangs). */
  hang = false;

  pause(volumes: string[]): Promise<void> {
    this.pauses++;
    this.calls.push(`pause ${volumes.join(',')}`);
    for (const v of volumes) this.depth.set(v, (this.depth.get(v) ?? 0) + 1);
    if (this.hang) return new Promise<void>(() => {});
    return sleep(5); // a short drain
  }

  resume(volumes: string[]): void {
    this.resumes++;
    this.lastResumeAt = performance.now();
    this.calls.push(`resume ${volumes.join(',')}`);
    for (const v of volumes) this.depth.set(v, (this.depth.get(v) ?? 0) - 1);
  }

  isPaused(volume: string): boolean {
    return (this.depth.get(volume) ?? 0) > 0;
  }
}

interface Node {
  id: NodeId;
  mesh: Mesh;
  driver: SyncDriver;
  io: IoPauseCoordinator;
  hooks: FakeHooks;
  lines: LogLine[];
}

const IDS: NodeId[] = [1, 2, 3];

async function cluster(t: ExecutionContext): Promise<Map<NodeId, Node>> {
  return startMeshes(IDS, async (id, peers): Promise<Node> => {
    const { log, lines } = memoryLogger();
    const others = IDS.filter((p) => p !== id);
    const mesh = new Mesh({
      heartbeatMs: 50, peerTimeoutMs: 1500, reconnectMaxMs: 400,
      nodeId: id, secret: SECRET, listen: { host: HOST, port: 0 }, log,
      peers: peers.map((p) => ({ id: p.id, endpoint: { host: HOST, port: p.port } })),
    });
    const transport: SyncTransport = mesh; // a Mesh satisfies the transport structurally
    const driver = new SyncDriver({ transport, peers: () => others.filter((p) => mesh.isUp(p)), tickMs: TICK_MS, log });
    const hooks = new FakeHooks();
    const io = new IoPauseCoordinator({
      transport: mesh, sync: driver, hooks, members: () => [...IDS], log,
      safetyMarginMs: SAFETY_MARGIN_MS, resumeTimeoutMs: RESUME_TIMEOUT_MS,
    });
    t.teardown(async () => {
      io.close();
      driver.close();
      await mesh.stop();
    });
    await mesh.start();
    return { id, mesh, driver, io, hooks, lines };
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}`);
    await sleep(5);
  }
}

function node(nodes: Map<NodeId, Node>, id: NodeId): Node {
  return nodes.get(id)!;
}

function noErrorsLogged(t: ExecutionContext, nodes: Map<NodeId, Node>): void {
  for (const n of nodes.values()) {
    const errors = n.lines.filter((l) => l.level >= 50);
    t.deepEqual(errors, [], `node ${n.id} logged no errors`);
  }
}

// ── SyncDriver ──────────────────────────────────────────────────────────────

test.serial('a sync started on all 3 nodes passes on all 3; started on 2 of 3 it times out on both, waiting for node 3', async (t) => {
  const nodes = await cluster(t);
  const mask = maskOf(IDS);

  const ev = consistencyPointSync('grp', 1, mask, { timeoutTicks: 50 });
  const all = await Promise.all(IDS.map((id) => node(nodes, id).driver.start(ev)));
  for (const o of all) {
    t.is(o.state, 'passed');
    t.deepEqual(o.waitingFor, []);
    t.is(o.sync, ev.sync);
  }
  for (const id of IDS) node(nodes, id).driver.stop(ev.sync);

  const ev2 = consistencyPointSync('grp', 2, mask, { timeoutTicks: 10 }); // 10 ticks = 200 ms
  const accepted3 = node(nodes, 3).driver.stats().reportsAccepted;
  const two = await Promise.all([node(nodes, 1).driver.start(ev2), node(nodes, 2).driver.start(ev2)]);
  for (const o of two) {
    t.is(o.state, 'timed-out');
    t.deepEqual(o.waitingFor, [3]);
    t.true(o.elapsedMs >= (10 - 1) * TICK_MS - 2, `elapsed ${o.elapsedMs} ms`); // more than (N-1) ticks
    t.true(o.elapsedMs < 1000, `elapsed ${o.elapsedMs} ms`);
  }
  // Node 3 arriving late, once it has heard both arrive and give up (their stop keys, 2 reports each),
  // does not pass. (Before the stop keys reach it, it would: tables are not kept in step, seed claim 14.)
  await waitFor(() => node(nodes, 3).driver.stats().reportsAccepted === accepted3 + 4, 1000, 'node 3 heard the stop keys');
  const late = await node(nodes, 3).driver.start({ ...ev2, timeoutTicks: 5 });
  t.is(late.state, 'timed-out');
  for (const id of IDS) node(nodes, id).driver.stop(ev2.sync);
  for (const id of IDS) t.deepEqual(node(nodes, id).driver.held(), []);
  t.true(node(nodes, 1).lines.some((l) => l.msg === 'sync point timed out' && (l.waitingFor as number[]).includes(3)));
});

test.serial('malformed sync bodies are counted and ignored; the nodes still pass', async (t) => {
  const nodes = await cluster(t);
  const mask = maskOf(IDS);
  const ev = pauseIoSync(['vol-a'], mask, 'malformed-1', { timeoutTicks: 50 });
  const bad: unknown[] = [
    { key: 1, seq: 1 }, // no scope
    { key: 1, scope: 7, seq: 1 },
    { key: 1, scope: '', seq: 1 },
    { key: 1, scope: 'x'.repeat(600), seq: 1 },
    { key: 'one', scope: ev.sync, seq: 1 },
    { key: -1, scope: ev.sync, seq: 1 },
    { key: 1.5, scope: ev.sync, seq: 1 },
    { key: 2 ** 33, scope: ev.sync, seq: 1 },
    { key: 1, scope: ev.sync }, // no seq
    { key: 1, scope: ev.sync, seq: -3 },
    { key: 1, scope: ev.sync, seq: 2 ** 60 },
    'sync please',
    null,
    [1, ev.sync, 1],
    42,
  ];
  const m3 = node(nodes, 3).mesh;
  for (const body of bad) {
    t.true(m3.send(1, 'sync', body));
    t.true(m3.send(2, 'sync', body));
  }
  await waitFor(() => [1, 2].every((id) => node(nodes, id).driver.stats().malformed === bad.length), 2000, 'malformed bodies counted');

  const outs = await Promise.all(IDS.map((id) => node(nodes, id).driver.start(ev)));
  t.deepEqual(outs.map((o) => o.state), ['passed', 'passed', 'passed']);
  for (const id of [1, 2]) {
    const n = node(nodes, id);
    t.is(n.driver.stats().malformed, bad.length);
    t.true(n.lines.some((l) => l.msg === 'malformed sync message ignored' && l.level === 20 && typeof l.reason === 'string'));
    t.false(n.lines.some((l) => l.level >= 50), 'nothing logged at error');
  }
  t.is(node(nodes, 3).driver.stats().malformed, 0);
  for (const id of IDS) node(nodes, id).driver.stop(ev.sync);
});

// ── IoPauseCoordinator ──────────────────────────────────────────────────────

test.serial('withPaused: every node paused before fn runs, all resumed after; fn result returned; fn errors rethrown after resume', async (t) => {
  const nodes = await cluster(t);
  const vols = ['db-a', 'db-b'];
  const ops: string[] = [];
  const result = await node(nodes, 1).io.withPaused(vols, 1000, async () => {
    for (const id of IDS) {
      const n = node(nodes, id);
      t.true(vols.every((v) => n.hooks.isPaused(v)), `node ${id} paused inside fn`);
      t.is(n.hooks.pauses, 1);
      t.is(n.hooks.resumes, 0);
      ops.push(...n.io.active().map((a) => a.op));
      t.deepEqual(n.io.active().map((a) => a.volumes), [vols]);
    }
    return 'snap-42';
  });
  t.is(result, 'snap-42');
  t.is(new Set(ops).size, 1, 'one op on every node');
  t.regex(ops[0]!, /^1-1-[0-9a-f]{8}$/);
  // The resume point passed on the initiator: every node had already resumed.
  for (const id of IDS) {
    const n = node(nodes, id);
    t.deepEqual(n.hooks.calls, ['pause db-a,db-b', 'resume db-a,db-b'], `node ${id}`);
    t.false(vols.some((v) => n.hooks.isPaused(v)));
    t.deepEqual(n.io.active(), []);
  }
  t.true(node(nodes, 1).lines.some((l) => l.msg === 'io pause: resumed everywhere'));
  await waitFor(() => IDS.every((id) => node(nodes, id).driver.held().length === 0), 2000, 'every sync stopped');

  // From another initiator, fn throwing: its error comes back, everyone resumed.
  const err = await t.throwsAsync(node(nodes, 2).io.withPaused(['db-c'], 1000, async () => {
    t.true(IDS.every((id) => node(nodes, id).hooks.isPaused('db-c')));
    throw new Error('snapshot failed');
  }));
  t.is(err.message, 'snapshot failed');
  for (const id of IDS) {
    t.false(node(nodes, id).hooks.isPaused('db-c'));
    t.is(node(nodes, id).hooks.resumes, 2);
  }
  noErrorsLogged(t, nodes);
});

test.serial('withPaused: a long fn keeps every node paused past timeout + margin (keepalives)', async (t) => {
  const nodes = await cluster(t);
  const timeoutMs = 300;
  await node(nodes, 1).io.withPaused(['v'], timeoutMs, async () => {
    await sleep(timeoutMs + SAFETY_MARGIN_MS + 300);
    for (const id of IDS) t.true(node(nodes, id).hooks.isPaused('v'), `node ${id} still paused`);
  });
  for (const id of IDS) t.false(node(nodes, id).hooks.isPaused('v'));
  for (const id of [2, 3]) t.false(node(nodes, id).lines.some((l) => l.msg === 'io pause: no word from the initiator; resuming by itself'));
  noErrorsLogged(t, nodes);
});

test.serial('withPaused: a node whose drain never finishes fails the op, naming it, within the timeout; the others are resumed', async (t) => {
  const nodes = await cluster(t);
  node(nodes, 3).hooks.hang = true;
  const timeoutMs = 400;
  let ran = false;
  const t0 = performance.now();
  const err = await t.throwsAsync(node(nodes, 1).io.withPaused(['v1', 'v2'], timeoutMs, async () => {
    ran = true;
  }), { instanceOf: IoPauseError });
  const elapsed = performance.now() - t0;
  t.false(ran, 'fn never ran');
  t.true(elapsed >= timeoutMs - 2 * TICK_MS && elapsed < timeoutMs + 600, `failed after ${Math.round(elapsed)} ms`);
  t.deepEqual(err.notPaused, [3]);
  t.regex(err.message, /node\(s\) 3 did not pause within 400 ms/);
  // The initiator resumed before throwing; the others as soon as its resume reaches them.
  await waitFor(() => [1, 2].every((id) => node(nodes, id).hooks.resumes === 1), 1000, 'nodes 1 and 2 resumed');
  for (const id of [1, 2]) {
    const h = node(nodes, id).hooks;
    t.deepEqual(h.calls, ['pause v1,v2', 'resume v1,v2'], `node ${id}`);
    t.false(h.isPaused('v1'));
  }
  // Node 3 gets the resume too, though its drain is still pending.
  await waitFor(() => node(nodes, 3).hooks.resumes === 1, 1000, 'node 3 resumed');
  t.false(node(nodes, 3).hooks.isPaused('v1'));
  await waitFor(() => IDS.every((id) => node(nodes, id).io.active().length === 0), 1000, 'no op active');
  noErrorsLogged(t, nodes);
});

test.serial('withPaused: a member whose mesh is stopped fails the op, naming it; the others are resumed', async (t) => {
  const nodes = await cluster(t);
  await node(nodes, 3).mesh.stop();
  const timeoutMs = 400;
  const t0 = performance.now();
  const err = await t.throwsAsync(node(nodes, 1).io.withPaused(['v1'], timeoutMs, async () => 'never'), { instanceOf: IoPauseError });
  const elapsed = performance.now() - t0;
  t.true(elapsed < timeoutMs + 600, `failed after ${Math.round(elapsed)} ms`);
  t.deepEqual(err.notPaused, [3]);
  t.regex(err.message, /node\(s\) 3 did not pause/);
  await waitFor(() => [1, 2].every((id) => node(nodes, id).hooks.resumes === 1), 1000, 'nodes 1 and 2 resumed');
  for (const id of [1, 2]) {
    t.is(node(nodes, id).hooks.pauses, 1);
    t.false(node(nodes, id).hooks.isPaused('v1'));
  }
  t.is(node(nodes, 3).hooks.pauses, 0);
  noErrorsLogged(t, nodes);
});

test.serial('a node paused by an initiator that then dies resumes by itself after timeout + margin', async (t) => {
  const nodes = await cluster(t);
  const timeoutMs = 300;
  let stoppedAt = 0;
  await node(nodes, 1).io.withPaused(['v'], timeoutMs, async () => {
    await node(nodes, 1).mesh.stop(); // the initiator "dies": nothing more reaches 2 and 3
    stoppedAt = performance.now();
    t.true(node(nodes, 2).hooks.isPaused('v'));
    t.true(node(nodes, 3).hooks.isPaused('v'));
  });
  await waitFor(() => [2, 3].every((id) => !node(nodes, id).hooks.isPaused('v')), timeoutMs + SAFETY_MARGIN_MS + 1500, 'members resumed by themselves');
  for (const id of [2, 3]) {
    const n = node(nodes, id);
    const after = n.hooks.lastResumeAt - stoppedAt;
    // Resumed no earlier than ~timeout + margin after the last word (the pause request), and not much later.
    t.true(after >= timeoutMs + SAFETY_MARGIN_MS - 150 && after < timeoutMs + SAFETY_MARGIN_MS + 500, `node ${id} resumed ${Math.round(after)} ms after`);
    t.true(n.lines.some((l) => l.msg === 'io pause: no word from the initiator; resuming by itself' && l.level === 40));
    t.deepEqual(n.hooks.calls, ['pause v', 'resume v']);
    t.deepEqual(n.io.active(), []);
  }
  noErrorsLogged(t, nodes);
});

test.serial('malformed pause requests get EINVAL naming the field; foreign and malformed resumes are ignored', async (t) => {
  const nodes = await cluster(t);
  const m2 = node(nodes, 2).mesh;
  const mask = maskOf([1, 2]).toString();
  const ok = { op: 'x-1', volumes: ['v'], timeoutMs: 5000, mask };
  const bad: [unknown, RegExp][] = [
    ['not a map', /body must be a map/],
    [[ok], /body must be a map/],
    [{ ...ok, op: undefined }, /op must be/],
    [{ ...ok, op: 'has space' }, /op must be/],
    [{ ...ok, op: 'x'.repeat(129) }, /op must be/],
    [{ ...ok, volumes: undefined }, /volumes must be/],
    [{ ...ok, volumes: [] }, /volumes must be/],
    [{ ...ok, volumes: ['v', 7] }, /volumes must be/],
    [{ ...ok, volumes: 'v' }, /volumes must be/],
    [{ ...ok, timeoutMs: -5 }, /timeoutMs must be/],
    [{ ...ok, timeoutMs: 'soon' }, /timeoutMs must be/],
    [{ ...ok, mask: 6 }, /mask must be/],
    [{ ...ok, mask: 'abc' }, /mask must be/],
    [{ ...ok, mask: (1n << 70n).toString() }, /mask must be/],
    [{ ...ok, mask: maskOf([1, 3]).toString() }, /mask \[1,3\] must include the sender \(2\)/],
    [{ ...ok, mask: maskOf([2, 3]).toString() }, /must include .* this node \(1\)/],
  ];
  for (const [body, re] of bad) {
    const err = await t.throwsAsync(m2.request(1, 'pause', body, 2000), { instanceOf: MeshError });
    t.is(err.remoteCode, 'EINVAL', JSON.stringify(body));
    t.regex(err.message, re);
  }
  t.is(node(nodes, 1).hooks.pauses, 0);

  // A well-formed request for an op of nodes 1 and 2 pauses node 1; a duplicate is refused.
  t.deepEqual(await m2.request(1, 'pause', ok, 2000), { op: 'x-1', node: 1 });
  t.true(node(nodes, 1).hooks.isPaused('v'));
  const dup = await t.throwsAsync(m2.request(1, 'pause', ok, 2000), { instanceOf: MeshError });
  t.is(dup.remoteCode, 'EEXIST');

  // Junk and foreign messages change nothing and throw nothing.
  const m3 = node(nodes, 3).mesh;
  t.true(m2.send(1, 'resume', 'junk'));
  t.true(m2.send(1, 'resume', { op: 5 }));
  t.true(m2.send(1, 'pause-alive', null));
  t.true(m2.send(1, 'pause', ok)); // not a request: no way to answer, ignored
  t.true(m2.send(1, 'resume', { op: 'no-such-op' }));
  t.true(m3.send(1, 'resume', { op: 'x-1' })); // node 3 is not in the op's mask
  await sleep(100);
  t.true(node(nodes, 1).hooks.isPaused('v'));
  t.deepEqual(node(nodes, 1).io.active().map((a) => a.op), ['x-1']);

  // The op's member resumes it.
  t.true(m2.send(1, 'resume', { op: 'x-1' }));
  await waitFor(() => !node(nodes, 1).hooks.isPaused('v'), 1000, 'node 1 resumed');
  t.deepEqual(node(nodes, 1).io.active(), []);
  const late = await t.throwsAsync(m2.request(1, 'pause', ok, 2000), { instanceOf: MeshError });
  t.is(late.remoteCode, 'EEXIST', 'a finished op is not restarted');
  t.false(node(nodes, 1).lines.some((l) => l.level >= 50), 'nothing logged at error');
  noErrorsLogged(t, nodes);
});

test.serial('withPaused: a member that refuses (coordinator closed) fails the op at once, with its reason', async (t) => {
  const nodes = await cluster(t);
  node(nodes, 3).io.close();
  const t0 = performance.now();
  const err = await t.throwsAsync(node(nodes, 1).io.withPaused(['v'], 2000, async () => 'never'), { instanceOf: IoPauseError });
  t.true(performance.now() - t0 < 1000, 'no wait for the timeout');
  t.deepEqual(err.notPaused, [3]);
  t.regex(err.message, /node 3: .*ESTOPPED/);
  t.regex(err.reasons[3]!, /ESTOPPED/);
  await waitFor(() => [1, 2].every((id) => node(nodes, id).hooks.resumes === 1), 1000, 'nodes 1 and 2 resumed');
  t.is(node(nodes, 3).hooks.pauses, 0);
  noErrorsLogged(t, nodes);
});

test.serial('withPaused: concurrent ops from every node on the same volume all pass and nest', async (t) => {
  const nodes = await cluster(t);
  const results = await Promise.all(IDS.map((id) => node(nodes, id).io.withPaused(['shared'], 1000, async () => {
    t.true(IDS.every((n) => node(nodes, n).hooks.isPaused('shared')));
    return id;
  })));
  t.deepEqual(results, IDS);
  for (const id of IDS) {
    const h = node(nodes, id).hooks;
    t.is(h.pauses, 3);
    t.is(h.resumes, 3);
    t.false(h.isPaused('shared'));
  }
  noErrorsLogged(t, nodes);
});
