import test from 'ava';

import {
  CONSISTENCY_POINT_KEY, INVALID_KEY, MAX_NODES, MIRROR_SIDE_STATE_KEY, PAUSE_IO_KEY, RESUME_IO_KEY,
  SYNC_POINTS, SYNC_TRANSITIONS, SyncEndpoint,
  consistencyPointSync, isSyncPointKey, maskOf, mirrorSideStateSync, nodesInMask, pauseIoSync, resumeIoSync,
  syncKeyName, toMask,
} from '../../cluster/sync-point.js';
import type { NodeId, SyncBroadcast, SyncEndpointOptions, SyncId, SyncKey, SyncStartEvent } from '../../cluster/sync-point.js';
import { SYNC_SIM_PROFILES, runSyncSim } from '../sim/sync-sim.js';

// ================================================================ a scripted cluster
//
// Broadcasts are queued per link and delivered only when the script says so, so a
// test decides exactly which node has heard what.

interface Msg {
  from: NodeId;
  to: NodeId;
  b: SyncBroadcast;
}

class Cluster {
  readonly eps: SyncEndpoint[];
  /** Undelivered messages, in send order. */
  queue: Msg[] = [];
  /** Everything each node broadcast, in order. */
  readonly sent: SyncBroadcast[][];
  readonly passed: SyncId[][];
  readonly timedOut: SyncId[][];

  constructor(readonly n: number, options: SyncEndpointOptions = { rebroadcastEveryTicks: 0 }) {
    this.eps = Array.from({ length: n }, (_, i) => new SyncEndpoint(i, options));
    this.sent = Array.from({ length: n }, () => []);
    this.passed = Array.from({ length: n }, () => []);
    this.timedOut = Array.from({ length: n }, () => []);
  }

  node(i: NodeId): SyncEndpoint {
    return this.eps[i]!;
  }

  private drain(i: NodeId): void {
    const r = this.node(i).ready();
    for (const b of r.broadcast) {
      this.sent[i]!.push(b);
      for (let to = 0; to < this.n; to++) if (to !== i) this.queue.push({ from: i, to, b });
    }
    this.passed[i]!.push(...r.passed);
    this.timedOut[i]!.push(...r.timedOut);
  }

  start(i: NodeId, e: SyncStartEvent): this {
    this.node(i).step(e);
    this.drain(i);
    return this;
  }

  stop(i: NodeId, sync: SyncId, nextKey?: SyncKey): this {
    this.node(i).step(nextKey === undefined ? { kind: 'stop', sync } : { kind: 'stop', sync, nextKey });
    this.drain(i);
    return this;
  }

  /** Hand one message to its receiver, as is (used for duplicates and reordering). */
  inject(m: Msg): void {
    this.node(m.to).step({ kind: 'report', from: m.from, key: m.b.key, scope: m.b.scope, seq: m.b.seq });
    this.drain(m.to);
  }

  /** Deliver queued messages matching `which` (default all) until none match; others stay queued. */
  deliver(which: (m: Msg) => boolean = () => true): this {
    for (;;) {
      const i = this.queue.findIndex(which);
      if (i < 0) return this;
      const [m] = this.queue.splice(i, 1);
      this.inject(m!);
    }
  }

  /** Drop queued messages matching `which`. */
  drop(which: (m: Msg) => boolean): this {
    this.queue = this.queue.filter((m) => !which(m));
    return this;
  }

  tick(ticks = 1, deliverBetween = true): this {
    for (let t = 0; t < ticks; t++) {
      for (let i = 0; i < this.n; i++) {
        this.node(i).step({ kind: 'tick' });
        this.drain(i);
      }
      if (deliverBetween) this.deliver();
    }
    return this;
  }

  state(i: NodeId, sync: SyncId): string | undefined {
    return this.node(i).check(sync)?.state;
  }
}

/** A node's key table for one scope, as sorted [node, key] pairs. */
function table(ep: SyncEndpoint, scope: SyncId): [NodeId, SyncKey][] {
  return [...ep.keyTable(scope)].sort((a, b) => a[0] - b[0]);
}

const ALL3 = maskOf([0, 1, 2]);
const T = 20; // timeoutTicks used by the scenarios

function start(sync: SyncId, mask: bigint = ALL3, key: SyncKey = PAUSE_IO_KEY, extra: Partial<SyncStartEvent> = {}): SyncStartEvent {
  return { kind: 'start', sync, key, mask, timeoutTicks: T, ...extra };
}

// ================================================================ the shared table

test('SYNC_POINTS: small distinct keys, unique names, positive timeouts; INVALID_KEY is not a point', (t) => {
  const keys = Object.keys(SYNC_POINTS).map(Number);
  t.deepEqual(keys.sort((a, b) => a - b), [PAUSE_IO_KEY, RESUME_IO_KEY, MIRROR_SIDE_STATE_KEY, CONSISTENCY_POINT_KEY].sort((a, b) => a - b));
  const names = keys.map((k) => SYNC_POINTS[k]!.name);
  t.deepEqual(new Set(names).size, names.length);
  t.deepEqual(names.sort(), ['consistency-point', 'mirror-side-state', 'pause-io', 'resume-io']);
  for (const k of keys) {
    t.true(Number.isInteger(k) && k > 0 && k < 256);
    t.true(Number.isSafeInteger(SYNC_POINTS[k]!.defaultTimeoutTicks) && SYNC_POINTS[k]!.defaultTimeoutTicks > 0);
  }
  t.false(isSyncPointKey(INVALID_KEY));
  t.is(syncKeyName(INVALID_KEY), 'invalid');
  t.is(syncKeyName(PAUSE_IO_KEY), 'pause-io');
  t.is(syncKeyName(99), 'key-99');
  t.true(Object.isFrozen(SYNC_POINTS));
});

test('SYNC_TRANSITIONS: waiting ends once (pass, timeout or stop); passed and timed-out only stop', (t) => {
  t.deepEqual(SYNC_TRANSITIONS.waiting, { pass: 'passed', timeout: 'timed-out', stop: 'stopped' });
  t.deepEqual(SYNC_TRANSITIONS.passed, { stop: 'stopped' });
  t.deepEqual(SYNC_TRANSITIONS['timed-out'], { stop: 'stopped' });
  t.deepEqual(SYNC_TRANSITIONS.stopped, {});
});

test('masks: bigint or number, node 63 reachable, round trip', (t) => {
  t.is(toMask(5), 5n);
  t.is(maskOf([0, 2]), 5n);
  t.deepEqual(nodesInMask(maskOf([0, 5, 63])), [0, 5, 63]);
  t.deepEqual(nodesInMask(0b1011), [0, 1, 3]);
  t.throws(() => toMask(-1), { instanceOf: RangeError });
  t.throws(() => toMask(1.5), { instanceOf: RangeError });
  t.throws(() => toMask(1n << 64n), { instanceOf: RangeError });
  t.throws(() => maskOf([64]), { instanceOf: RangeError });
});

// ================================================================ scenarios

test('3 nodes all reach the point: each passes once, none before the last one started', (t) => {
  const c = new Cluster(3);
  c.start(0, start('s')).start(1, start('s')).deliver();
  t.is(c.state(0, 's'), 'waiting');
  t.is(c.state(1, 's'), 'waiting');
  t.deepEqual(c.node(0).check('s')!.waitingFor, [2]);
  c.start(2, start('s'));
  t.deepEqual(c.passed[2], ['s'], 'the last to arrive finds everyone there and passes at once');
  c.deliver();
  for (const i of [0, 1, 2]) {
    t.deepEqual(c.passed[i], ['s'], `node ${i}`);
    t.is(c.state(i, 's'), 'passed');
  }
  c.tick(3 * T);
  for (const i of [0, 1, 2]) {
    t.deepEqual(c.passed[i], ['s'], `node ${i} passes only once`);
    t.deepEqual(c.timedOut[i], [], `node ${i} never times out after passing`);
    t.deepEqual(c.sent[i]!.map((b) => b.key), [PAUSE_IO_KEY], `node ${i} said only its key`);
  }
});

test('one node never arrives: the others time out at exactly timeoutTicks and broadcast the stop key', (t) => {
  const c = new Cluster(3);
  c.start(0, start('s')).start(1, start('s')).deliver();
  c.tick(T - 1);
  t.is(c.state(0, 's'), 'waiting');
  t.is(c.node(0).check('s')!.elapsedTicks, T - 1);
  c.tick(1);
  for (const i of [0, 1]) {
    t.deepEqual(c.timedOut[i], ['s'], `node ${i}`);
    t.deepEqual(c.passed[i], []);
    t.is(c.state(i, 's'), 'timed-out');
    t.deepEqual(c.sent[i]!.map((b) => b.key), [PAUSE_IO_KEY, INVALID_KEY], `node ${i}: start, then stop`);
  }
  t.is(c.node(2).keyTable('s').get(0), INVALID_KEY, 'the absent node heard the stop');
  c.tick(3 * T);
  t.deepEqual(c.timedOut[0], ['s'], 'times out once');
});

test('stop on timeout may name the next state instead of INVALID_KEY (pauseIoSync: resume-io)', (t) => {
  const c = new Cluster(2);
  const e = pauseIoSync(['vol-a'], maskOf([0, 1]), 'op1', { timeoutTicks: 5 });
  t.is(e.stopKey, RESUME_IO_KEY);
  c.start(0, e).tick(5);
  t.deepEqual(c.timedOut[0], [e.sync]);
  t.deepEqual(c.sent[0]!.map((b) => b.key), [PAUSE_IO_KEY, RESUME_IO_KEY]);
  t.is(c.node(1).keyTable(e.sync).get(0), RESUME_IO_KEY);
});

test('late arrival after the others timed out: it does not pass, and they stay timed out', (t) => {
  const c = new Cluster(3);
  c.start(0, start('s')).start(1, start('s')).deliver().tick(T);
  t.deepEqual(c.timedOut[0], ['s']);
  t.deepEqual(c.timedOut[1], ['s']);
  c.start(2, start('s')).deliver();
  t.deepEqual(c.node(2).check('s')!.waitingFor, [0, 1], 'its table says 0 and 1 gave up');
  t.is(c.state(0, 's'), 'timed-out', 'a report arriving after the timeout does not make it pass');
  t.is(c.state(1, 's'), 'timed-out');
  c.tick(T);
  t.deepEqual(c.timedOut[2], ['s']);
  for (const i of [0, 1, 2]) t.deepEqual(c.passed[i], []);
});

test('late arrival before the timeout: reports stored before its start let it pass at once', (t) => {
  const c = new Cluster(3);
  c.start(0, start('s')).start(1, start('s')).deliver().tick(T - 1);
  t.deepEqual(table(c.node(2), 's'), [[0, PAUSE_IO_KEY], [1, PAUSE_IO_KEY]], 'node 2 kept reports for a sync it had not started');
  c.start(2, start('s'));
  t.deepEqual(c.passed[2], ['s']);
  c.deliver();
  t.deepEqual(c.passed[0], ['s']);
  t.deepEqual(c.passed[1], ['s']);
  c.tick(T);
  for (const i of [0, 1, 2]) t.deepEqual(c.timedOut[i], []);
});

test('duplicated reports change nothing; a reordered old key cannot undo a stop', (t) => {
  const c = new Cluster(3);
  c.start(0, start('s')).start(1, start('s')).start(2, start('s'));
  // Deliver everything twice.
  const copy = [...c.queue];
  c.deliver();
  for (const m of copy) c.inject(m);
  for (const i of [0, 1, 2]) t.deepEqual(c.passed[i], ['s'], `node ${i} passed once`);
  t.is(c.node(0).stats().reportsDuplicate, 2);

  // Reordering: node 1 starts then stops; node 0 receives the stop before the start.
  const d = new Cluster(3);
  d.start(0, start('r')).start(2, start('r')).start(1, start('r')).stop(1, 'r'); // node 1 heard nobody: gives up
  d.deliver((m) => m.to === 0 && m.from === 2);
  const toNode0 = d.queue.filter((m) => m.from === 1 && m.to === 0);
  t.deepEqual(toNode0.map((m) => m.b.key), [PAUSE_IO_KEY, INVALID_KEY]);
  d.drop((m) => m.to === 0);
  d.inject(toNode0[1]!); // INVALID first
  d.inject(toNode0[0]!); // then the older PAUSE_IO
  t.is(d.node(0).keyTable('r').get(1), INVALID_KEY, 'newest seq wins');
  t.is(d.node(0).stats().reportsStale, 1);
  t.is(d.state(0, 'r'), 'waiting');
  d.tick(T);
  t.deepEqual(d.passed[0], []);
  t.deepEqual(d.timedOut[0], ['r']);
});

test('reports without seq are taken in arrival order (a FIFO switch)', (t) => {
  const ep = new SyncEndpoint(0, { rebroadcastEveryTicks: 0 });
  ep.step(start('s', maskOf([0, 1])));
  ep.step({ kind: 'report', from: 1, key: INVALID_KEY, scope: 's' });
  ep.step({ kind: 'report', from: 1, key: PAUSE_IO_KEY, scope: 's' });
  t.deepEqual(ep.ready().passed, ['s']);
});

test('a mask that excludes a node: the others pass without it, whatever it says', (t) => {
  const c = new Cluster(3);
  const m01 = maskOf([0, 1]);
  c.start(2, start('other', maskOf([2]), RESUME_IO_KEY)); // node 2 is busy elsewhere (and passes alone)
  t.deepEqual(c.passed[2], ['other']);
  c.start(0, start('s', m01)).start(1, start('s', m01)).deliver();
  t.deepEqual(c.passed[0], ['s']);
  t.deepEqual(c.passed[1], ['s']);
  t.deepEqual(c.node(0).check('s')!.waitingFor, []);
  t.is(c.node(2).keyTable('s').get(0), PAUSE_IO_KEY, 'node 2 still records what it hears');
});

test('two concurrent syncs on the same key with different scopes do not mix', (t) => {
  const c = new Cluster(3);
  const vols = ['a', 'b'];
  const p1 = pauseIoSync(vols, ALL3, 'op-1', { timeoutTicks: T });
  const p2 = pauseIoSync(vols, maskOf([0, 1, 2]), 'op-2', { timeoutTicks: T });
  t.not(p1.sync, p2.sync);
  t.is(p1.key, p2.key);
  // Everyone is at pause-io for op-2, but node 2 never starts op-1.
  c.start(0, p1).start(1, p1);
  c.start(0, p2).start(1, p2).start(2, p2).deliver();
  for (const i of [0, 1, 2]) t.deepEqual(c.passed[i], [p2.sync], `node ${i}`);
  t.deepEqual(c.node(0).check(p1.sync)!.waitingFor, [2], 'node 2 at pause-io in op-2 does not count for op-1');
  c.tick(T);
  t.deepEqual(c.timedOut[0], [p1.sync]);
  t.deepEqual(c.timedOut[1], [p1.sync]);
  t.is(c.state(0, p2.sync), 'passed', 'op-1 timing out leaves op-2 passed');
  t.is(c.node(0).keyTable(p2.sync).get(1), PAUSE_IO_KEY, 'op-1 stop key landed in op-1 scope only');
});

test('tables are not kept in step: each node decides from its own', (t) => {
  const c = new Cluster(3);
  c.start(0, start('s')).start(1, start('s')).start(2, start('s'));
  // Node 0 hears everyone; node 1 only node 0; node 2 nothing.
  c.deliver((m) => m.to === 0);
  c.deliver((m) => m.to === 1 && m.from === 0);
  c.drop(() => true);
  t.deepEqual(c.passed[0], ['s']);
  t.deepEqual(table(c.node(0), 's'), [[0, PAUSE_IO_KEY], [1, PAUSE_IO_KEY], [2, PAUSE_IO_KEY]]);
  t.deepEqual(table(c.node(1), 's'), [[0, PAUSE_IO_KEY], [1, PAUSE_IO_KEY]]);
  t.deepEqual(table(c.node(2), 's'), [[2, PAUSE_IO_KEY]]);
  c.tick(T, false); // and nothing more gets through
  t.is(c.state(0, 's'), 'passed');
  t.is(c.state(1, 's'), 'timed-out');
  t.is(c.state(2, 's'), 'timed-out');
  t.deepEqual(c.timedOut[0], []);
});

test('stop: waiting broadcasts INVALID_KEY or nextKey; passed says nothing, so slower peers still pass', (t) => {
  const c = new Cluster(3);
  c.start(0, start('s')).start(1, start('s')).start(2, start('s'));
  c.deliver((m) => m.to === 0);
  t.deepEqual(c.passed[0], ['s']);
  c.stop(0, 's');
  t.deepEqual(c.sent[0]!.map((b) => b.key), [PAUSE_IO_KEY], 'a passed sync stops silently');
  t.is(c.node(0).check('s'), undefined);
  c.deliver();
  t.deepEqual(c.passed[1], ['s']);
  t.deepEqual(c.passed[2], ['s']);
  // Late reports for a stopped scope are dropped; stopping twice is harmless.
  c.node(0).step({ kind: 'report', from: 1, key: PAUSE_IO_KEY, scope: 's', seq: 99 });
  t.is(c.node(0).stats().reportsAfterClose, 1);
  t.notThrows(() => c.stop(0, 's'));
  t.throws(() => c.start(0, start('s')), { message: /never reused/ });

  const d = new Cluster(2);
  d.start(0, start('w', maskOf([0, 1]))).stop(0, 'w', RESUME_IO_KEY);
  t.deepEqual(d.sent[0]!.map((b) => b.key), [PAUSE_IO_KEY, RESUME_IO_KEY]);
  d.start(0, start('x', maskOf([0, 1]))).stop(0, 'x');
  t.deepEqual(d.sent[0]!.slice(2).map((b) => b.key), [PAUSE_IO_KEY, INVALID_KEY]);
  t.deepEqual(d.passed[0], []);
  t.deepEqual(d.timedOut[0], [], 'an application stop is not a timeout');
  t.throws(() => d.stop(0, 'never-started'), { instanceOf: RangeError });
  t.throws(() => d.node(1).step({ kind: 'stop', sync: 'y', nextKey: PAUSE_IO_KEY }), { instanceOf: RangeError });
});

test('rebroadcast recovers a lost start message, with the same seq', (t) => {
  const c = new Cluster(2, { rebroadcastEveryTicks: 4 });
  c.start(0, start('s', maskOf([0, 1]))).start(1, start('s', maskOf([0, 1])));
  c.drop((m) => m.from === 0); // node 0's key never reaches node 1
  c.deliver();
  t.deepEqual(c.passed[0], ['s']);
  t.deepEqual(c.passed[1], []);
  c.tick(4);
  t.deepEqual(c.passed[1], ['s']);
  const seqs = c.sent[0]!.map((b) => b.seq);
  t.true(seqs.length >= 2);
  t.is(new Set(seqs).size, 1, 're-sends carry the original seq');
});

test('start is checked: known key, mask includes self, positive timeout, stop key differs', (t) => {
  const ep = new SyncEndpoint(1);
  t.throws(() => ep.step(start('a', maskOf([0, 2]))), { message: /include this node/ });
  t.throws(() => ep.step(start('a', ALL3, INVALID_KEY)), { message: /not in SYNC_POINTS/ });
  t.throws(() => ep.step(start('a', ALL3, 42)), { message: /not in SYNC_POINTS/ });
  t.throws(() => ep.step(start('a', ALL3, PAUSE_IO_KEY, { timeoutTicks: 0 })), { instanceOf: RangeError });
  t.throws(() => ep.step(start('a', ALL3, PAUSE_IO_KEY, { stopKey: PAUSE_IO_KEY })), { message: /differ/ });
  t.throws(() => ep.step(start('', ALL3)), { instanceOf: RangeError });
  t.throws(() => new SyncEndpoint(MAX_NODES), { instanceOf: RangeError });
  ep.step(start('b', ALL3));
  t.notThrows(() => ep.step(start('b', ALL3)), 'the same start twice is harmless');
  t.throws(() => ep.step(start('b', maskOf([1, 2]))), { message: /different key or mask/ });
  t.is(ep.ready().broadcast.length, 1);
});

test('default timeout comes from the point; number masks work; node 63 participates', (t) => {
  const ep = new SyncEndpoint(63, { rebroadcastEveryTicks: 0 });
  ep.step({ kind: 'start', sync: 'cp', key: CONSISTENCY_POINT_KEY, mask: maskOf([0, 63]) });
  t.is(ep.check('cp')!.timeoutTicks, SYNC_POINTS[CONSISTENCY_POINT_KEY]!.defaultTimeoutTicks);
  ep.step({ kind: 'tick', ticks: SYNC_POINTS[CONSISTENCY_POINT_KEY]!.defaultTimeoutTicks - 1 });
  t.is(ep.check('cp')!.state, 'waiting');
  ep.step({ kind: 'tick' });
  t.is(ep.check('cp')!.state, 'timed-out');

  const e0 = new SyncEndpoint(0);
  e0.step({ kind: 'start', sync: 'n', key: MIRROR_SIDE_STATE_KEY, mask: 0b11 });
  e0.step({ kind: 'report', from: 1, key: MIRROR_SIDE_STATE_KEY, scope: 'n', seq: 0 });
  t.deepEqual(e0.ready().passed, ['n']);
});

test('malformed reports are ignored and counted', (t) => {
  const ep = new SyncEndpoint(0, { rebroadcastEveryTicks: 0 });
  ep.step(start('s', maskOf([0, 1])));
  const bad: unknown[] = [
    { from: 0, key: PAUSE_IO_KEY, scope: 's' }, // claims to be me
    { from: 64, key: PAUSE_IO_KEY, scope: 's' },
    { from: -1, key: PAUSE_IO_KEY, scope: 's' },
    { from: 1.5, key: PAUSE_IO_KEY, scope: 's' },
    { from: 1, key: -1, scope: 's' },
    { from: 1, key: 'x', scope: 's' },
    { from: 1, key: PAUSE_IO_KEY, scope: '' },
    { from: 1, key: PAUSE_IO_KEY, scope: 7 },
    { from: 1, key: PAUSE_IO_KEY, scope: 'x'.repeat(10_000) },
    { from: 1, key: PAUSE_IO_KEY, scope: 's', seq: -3 },
  ];
  for (const b of bad) ep.step({ kind: 'report', ...(b as object) } as never);
  t.is(ep.stats().reportsRejected, bad.length);
  t.is(ep.check('s')!.state, 'waiting');
  t.deepEqual(ep.ready().passed, []);
});

test('reports for scopes never started here are forgotten after orphanTtlTicks', (t) => {
  const ep = new SyncEndpoint(0, { rebroadcastEveryTicks: 0, orphanTtlTicks: 10 });
  ep.step({ kind: 'report', from: 1, key: PAUSE_IO_KEY, scope: 'orphan', seq: 0 });
  ep.step({ kind: 'tick', ticks: 9 });
  t.is(ep.keyTable('orphan').size, 1);
  ep.step({ kind: 'tick' });
  t.is(ep.keyTable('orphan').size, 0);
});

test('helpers: canonical scopes, stable across volume order, distinct per op', (t) => {
  const m = maskOf([0, 1]);
  const a = pauseIoSync(['v2', 'v1', 'v1'], m, 'op-9');
  const b = pauseIoSync(['v1', 'v2'], m, 'op-9');
  t.is(a.sync, b.sync);
  t.regex(a.sync, /^pause-io\/op-9\/2v-[0-9a-f]{8}$/);
  t.not(pauseIoSync(['v1', 'v2'], m, 'op-10').sync, a.sync);
  t.not(pauseIoSync(['v1', 'v3'], m, 'op-9').sync, a.sync);
  const r = resumeIoSync(['v1', 'v2'], m, 'op-9');
  t.is(r.key, RESUME_IO_KEY);
  t.not(r.sync, a.sync);
  t.is(r.stopKey, undefined);
  const ms = mirrorSideStateSync('vol/x', 1, 'degraded', m, 'op-3', { timeoutTicks: 7 });
  t.deepEqual(ms, { kind: 'start', sync: 'mirror-side-state/op-3/vol%2Fx/1/degraded', key: MIRROR_SIDE_STATE_KEY, mask: m, timeoutTicks: 7 });
  t.deepEqual(consistencyPointSync('cg1', 12, 3), { kind: 'start', sync: 'consistency-point/cg1/12', key: CONSISTENCY_POINT_KEY, mask: 3n });
  t.throws(() => pauseIoSync([], m, 'op'), { instanceOf: RangeError });
  t.throws(() => pauseIoSync(['v'], m, ''), { instanceOf: RangeError });
});

test('a group pause then resume, run end to end through the helpers', (t) => {
  const c = new Cluster(3);
  const vols = ['db', 'log'];
  const pause = pauseIoSync(vols, ALL3, 'snap-1');
  const resume = resumeIoSync(vols, ALL3, 'snap-1');
  for (const i of [0, 1, 2]) c.start(i, pause);
  c.deliver();
  for (const i of [0, 1, 2]) t.deepEqual(c.passed[i], [pause.sync]);
  for (const i of [0, 1, 2]) c.stop(i, pause.sync).start(i, resume);
  c.deliver();
  for (const i of [0, 1, 2]) t.deepEqual(c.passed[i], [pause.sync, resume.sync]);
});

// ================================================================ seeded simulation

test('simulation: 400 seeds with loss, delay, duplication; pass xor timeout, passes only when all started', (t) => {
  const seeds = 400;
  const profiles = new Map<string, number>();
  let passes = 0;
  let timeouts = 0;
  let aborts = 0;
  let stale = 0;
  let dups = 0;
  let dropped = 0;
  for (let seed = 1; seed <= seeds; seed++) {
    const r = runSyncSim(seed); // throws, naming the seed, on any invariant violation
    profiles.set(r.profile, (profiles.get(r.profile) ?? 0) + 1);
    for (const s of r.syncs) {
      for (const o of s.outcome.values()) {
        if (o === 'passed') passes++;
        else if (o === 'timed-out') timeouts++;
        else aborts++;
      }
    }
    stale += r.staleReports;
    dups += r.duplicateReports;
    dropped += r.dropped;
  }
  for (const p of SYNC_SIM_PROFILES) t.true((profiles.get(p) ?? 0) > 0, `profile ${p} ran`);
  // The simulation must actually exercise every path it claims to check.
  t.true(passes > 0 && timeouts > 0 && aborts > 0 && stale > 0 && dups > 0 && dropped > 0,
    JSON.stringify({ passes, timeouts, aborts, stale, dups, dropped }));
  t.log(`${seeds} seeds: ${passes} passes, ${timeouts} timeouts, ${aborts} aborts; ${dropped} dropped, ${dups} duplicate and ${stale} stale reports`);
});

test('simulation: each profile forced over 50 seeds', (t) => {
  for (const p of SYNC_SIM_PROFILES) {
    for (let seed = 1000; seed < 1050; seed++) runSyncSim(seed, p);
  }
  t.pass();
});
