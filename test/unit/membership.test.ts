/**
 * Membership scenarios (cluster/membership.ts): one short script per rule, against one
 * pure machine (events in, `ready()` out). The machine is the view of ONE node; the
 * other nodes appear only through the events a driver would step (`up`, `down`,
 * `suspect`, `message`, `fenced`, `fence-failed`, `tick`).
 *
 * Rules: the evictor is the lowest id among this node and the peers it sees up; the
 * evictor fences only with quorum (more than half, or exactly half holding the lowest
 * configured id), one node at a time; a non-evictor forwards suspicions to the
 * evictor; `fenced` broadcasts `evicted` (epoch, the victim's boot) to the up peers and
 * the victim and outputs the Eviction; duplicates are ignored; an eviction notice
 * about this node is stale when it names an older boot; a peer never heard from is
 * down after the grace; a failed fence gives another grace; a restarted peer is up
 * again without a fence; a dying evictor's duties (and the evictor itself) fall to the
 * next lowest id; malformed input is rejected with a reason and changes nothing.
 */
import test, { type ExecutionContext } from 'ava';
import {
  Membership,
  parseMembershipMessage,
  type MembershipMessage,
  type MembershipReady,
  type NodeId,
} from '../../cluster/membership.js';

const R0 = 'vseg1.rmap[1]';
const R1 = 'vseg1.rmap[3]';

/** Node `self` of a cluster of `all`, with `up` peers reported up by the mesh. */
function member(self: NodeId, all: NodeId[], up: NodeId[] = [], grace = 10): Membership {
  const m = new Membership(self, all, grace);
  for (const p of up) m.step({ kind: 'up', node: p });
  m.ready();
  return m;
}

function empty(t: ExecutionContext, r: MembershipReady, what: string): void {
  t.deepEqual(r.send, [], `${what}: no message`);
  t.deepEqual(r.fence, [], `${what}: no fence`);
  t.deepEqual(r.evicted, [], `${what}: no eviction`);
  t.false(r.selfEvicted, `${what}: not self-evicted`);
}

function evictedMsg(node: NodeId, o: Partial<Extract<MembershipMessage, { type: 'evicted' }>> = {}): MembershipMessage {
  return { type: 'evicted', node, records: [], cleaner: 1, epoch: 1, boot: 0, ...o };
}

// ---------------------------------------------------------------- evictor

test('evictor: the lowest id among this node and the peers it sees up', (t) => {
  const m = member(3, [1, 2, 3, 4]);
  t.is(m.evictor(), 3, 'peers unknown: nobody lower is up');
  m.step({ kind: 'up', node: 4 });
  t.is(m.evictor(), 3, 'a higher id does not change it');
  m.step({ kind: 'up', node: 2 });
  t.is(m.evictor(), 2);
  m.step({ kind: 'up', node: 1 });
  t.is(m.evictor(), 1);
  t.deepEqual(m.members().map((v) => [v.id, v.state]), [[1, 'up'], [2, 'up'], [4, 'up']]);
  t.is(m.state(3), 'self');
});

test('evictor: changes to the next lowest id when the evictor goes down, and back when it returns', (t) => {
  const m = member(3, [1, 2, 3], [1, 2]);
  t.is(m.evictor(), 1);
  m.step({ kind: 'down', node: 1 });
  t.is(m.evictor(), 2, 'node 1 down: node 2 evicts');
  m.step({ kind: 'down', node: 2 });
  t.is(m.evictor(), 3, 'both down: this node');
  m.step({ kind: 'up', node: 1 });
  t.is(m.evictor(), 1);
  m.ready();
});

// ---------------------------------------------------------------- quorum

test('quorum, 3 nodes: two up evict; one alone does not', (t) => {
  const two = member(1, [1, 2, 3], [2]);
  t.true(two.hasQuorum());
  two.step({ kind: 'suspect', node: 3 });
  t.deepEqual(two.ready().fence, [3], 'node 1 with node 2 fences node 3');

  const alone = member(1, [1, 2, 3]);
  t.false(alone.hasQuorum());
  alone.step({ kind: 'suspect', node: 3 });
  alone.step({ kind: 'down', node: 2 });
  const r = alone.ready();
  empty(t, r, 'node 1 alone');
  t.is(alone.state(3), 'down', 'it still marks the node down');

  const highAlone = member(3, [1, 2, 3]);
  highAlone.step({ kind: 'down', node: 1 });
  highAlone.step({ kind: 'down', node: 2 });
  t.false(highAlone.hasQuorum());
  empty(t, highAlone.ready(), 'node 3 alone');
});

test('quorum, 2 nodes: the lower id alone evicts, the higher alone does not', (t) => {
  const low = member(1, [1, 2]);
  t.true(low.hasQuorum(), 'exactly half, holding the lowest configured id');
  low.step({ kind: 'down', node: 2 });
  t.deepEqual(low.ready().fence, [2]);

  const high = member(2, [1, 2]);
  t.false(high.hasQuorum());
  high.step({ kind: 'down', node: 1 });
  high.step({ kind: 'suspect', node: 1 });
  empty(t, high.ready(), 'node 2 alone never evicts node 1');
  t.is(high.evictor(), 2, 'it is its own evictor (nobody lower is up), so it forwards nothing');
});

test('quorum, 4 nodes: exactly half evicts only when it holds the lowest id', (t) => {
  const withLowest = member(2, [1, 2, 3, 4], [1]);
  t.true(member(1, [1, 2, 3, 4], [2]).hasQuorum(), '{1,2}');
  t.true(withLowest.hasQuorum(), '{1,2} seen from node 2');
  t.false(member(3, [1, 2, 3, 4], [4]).hasQuorum(), '{3,4}');
  t.false(member(2, [1, 2, 3, 4], [3]).hasQuorum(), '{2,3}: half, without node 1');
  t.true(member(2, [1, 2, 3, 4], [3, 4]).hasQuorum(), '{2,3,4}: a majority');

  const one = member(1, [1, 2, 3, 4], [2]);
  one.step({ kind: 'down', node: 3 });
  t.deepEqual(one.ready().fence, [3], '{1,2} fences 3');
  const three = member(3, [1, 2, 3, 4], [4]);
  three.step({ kind: 'down', node: 1 });
  three.step({ kind: 'down', node: 2 });
  empty(t, three.ready(), '{3,4} fences nobody');
});

test('quorum lost: a queued fence waits until the quorum is back', (t) => {
  const m = member(1, [1, 2, 3], [2]);
  m.step({ kind: 'down', node: 2 });
  m.step({ kind: 'suspect', node: 3 });
  empty(t, m.ready(), 'alone: nothing');
  m.step({ kind: 'up', node: 2 });
  t.deepEqual(m.ready().fence, [3], 'node 2 back: fences 3');
});

// ---------------------------------------------------------------- one fence at a time

test('one fence at a time: further down nodes queue until the fence completes', (t) => {
  const m = member(1, [1, 2, 3, 4, 5], [2, 3]);
  m.step({ kind: 'suspect', node: 4 });
  t.deepEqual(m.ready().fence, [4]);
  m.step({ kind: 'suspect', node: 5 });
  m.step({ kind: 'down', node: 5 });
  t.deepEqual(m.ready().fence, [], 'fencing 4: 5 waits');
  m.step({ kind: 'fenced', node: 4, records: [], boot: 0 });
  const r = m.ready();
  t.deepEqual(r.fence, [5], 'then 5');
  t.deepEqual(r.evicted.map((e) => e.node), [4]);
  m.step({ kind: 'fence-failed', node: 5 });
  t.deepEqual(m.ready().fence, [], 'failed: 5 gets a grace, nothing else is down');
});

test('one fence at a time: a queued node that comes back up leaves the queue', (t) => {
  const m = member(1, [1, 2, 3, 4, 5], [2, 3]);
  m.step({ kind: 'suspect', node: 4 });
  m.step({ kind: 'suspect', node: 5 });
  t.deepEqual(m.ready().fence, [4]);
  m.step({ kind: 'up', node: 5 });
  m.step({ kind: 'fenced', node: 4, records: [], boot: 0 });
  t.deepEqual(m.ready().fence, [], '5 is up: not fenced');
  t.is(m.state(5), 'up');
});

test('fenced for a node this node is not fencing is rejected', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  m.step({ kind: 'fenced', node: 3, records: [R0], boot: 0 });
  const r = m.ready();
  empty(t, r, 'unasked fenced');
  t.deepEqual(r.rejected, ['fenced 3 while fencing null']);
  t.is(m.state(3), 'up');
});

// ---------------------------------------------------------------- forwarding

test('a non-evictor forwards a suspicion to the evictor and does not fence', (t) => {
  const m = member(2, [1, 2, 3], [1, 3]);
  m.step({ kind: 'suspect', node: 3 });
  const r = m.ready();
  t.deepEqual(r.send, [{ to: 1, message: { type: 'suspect', node: 3 } }]);
  t.deepEqual(r.fence, []);
  t.is(m.state(3), 'down');
});

test('a non-evictor suspecting the evictor itself: it becomes the evictor and fences it', (t) => {
  const m = member(2, [1, 2, 3], [1, 3]);
  m.step({ kind: 'suspect', node: 1 });
  const r = m.ready();
  t.deepEqual(r.send, [], 'nobody lower to forward to');
  t.deepEqual(r.fence, [1]);
});

test('the evictor fences on a forwarded suspicion; a peer suspecting this node is rejected', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  m.step({ kind: 'message', from: 2, message: { type: 'suspect', node: 3 } });
  t.deepEqual(m.ready().fence, [3]);
  m.step({ kind: 'message', from: 2, message: { type: 'suspect', node: 1 } });
  const r = m.ready();
  empty(t, r, 'suspect about self');
  t.deepEqual(r.rejected, ['node 2 suspects this node']);
});

test('suspecting an evicted or unconfigured node does nothing', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  m.step({ kind: 'suspect', node: 3 });
  m.step({ kind: 'fenced', node: 3, records: [], boot: 0 });
  m.ready();
  m.step({ kind: 'suspect', node: 3 });
  m.step({ kind: 'suspect', node: 9 });
  empty(t, m.ready(), 'nothing to do');
  t.is(m.state(3), 'evicted');
  t.is(m.state(9), 'evicted', 'an unconfigured node counts as gone');
});

// ---------------------------------------------------------------- eviction

test('fenced: evicted (epoch, boot, records, cleaner) goes to every up peer and the victim, and out as an Eviction', (t) => {
  const m = member(1, [1, 2, 3, 4], [2, 3, 4]);
  m.step({ kind: 'down', node: 4 });
  t.deepEqual(m.ready().fence, [4]);
  m.step({ kind: 'down', node: 3 }); // down, not evicted: it does not get the notice
  m.ready();
  m.step({ kind: 'fenced', node: 4, records: [R0, R1], boot: 7 });
  const r = m.ready();
  const msg: MembershipMessage = { type: 'evicted', node: 4, records: [R0, R1], cleaner: 1, epoch: 1, boot: 7 };
  t.deepEqual(r.send, [{ to: 2, message: msg }, { to: 4, message: msg }]);
  t.deepEqual(r.evicted, [{ node: 4, records: [R0, R1], cleaner: 1 }]);
  t.deepEqual(r.fence, [3], 'then the next down node');
  t.is(m.state(4), 'evicted');
  t.like(m.members().find((v) => v.id === 4), { evictions: 1, lastEvictedBy: 1 });
});

test('a second eviction of the same node carries the next epoch', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  m.step({ kind: 'suspect', node: 3 });
  m.step({ kind: 'fenced', node: 3, records: [], boot: 1 });
  m.ready();
  m.step({ kind: 'up', node: 3 }); // restarted as boot 2
  m.step({ kind: 'suspect', node: 3 });
  t.deepEqual(m.ready().fence, [3]);
  m.step({ kind: 'fenced', node: 3, records: [], boot: 2 });
  const r = m.ready();
  t.like(r.send[0]?.message, { type: 'evicted', node: 3, epoch: 2, boot: 2 });
  t.like(m.members().find((v) => v.id === 3), { evictions: 2 });
});

test('evicted message: a survivor outputs the Eviction with the cleaner it names', (t) => {
  const m = member(2, [1, 2, 3], [1, 3]);
  m.step({ kind: 'down', node: 3 });
  m.ready();
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { records: [R0], cleaner: 1, boot: 4 }) });
  const r = m.ready();
  t.deepEqual(r.evicted, [{ node: 3, records: [R0], cleaner: 1 }]);
  t.deepEqual(r.send, [], 'a survivor does not relay');
  t.is(m.state(3), 'evicted');
  t.like(m.members().find((v) => v.id === 3), { evictions: 1, lastEvictedBy: 1 });
});

test('duplicate and older-epoch eviction notices are ignored', (t) => {
  const m = member(2, [1, 2, 3], [1]);
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { epoch: 2, boot: 4 }) });
  t.is(m.ready().evicted.length, 1);
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { epoch: 2, boot: 4 }) });
  empty(t, m.ready(), 'duplicate');
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { epoch: 1, boot: 4 }) });
  empty(t, m.ready(), 'older epoch');
  t.like(m.members().find((v) => v.id === 3), { evictions: 1 });
});

test('a delayed notice about an older boot of a node that came back is ignored', (t) => {
  const m = member(2, [1, 2, 3], [1]);
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { epoch: 1, boot: 4 }) });
  m.ready();
  m.step({ kind: 'up', node: 3 }); // boot 5 rejoined
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { epoch: 1, boot: 4 }) });
  empty(t, m.ready(), 'stale notice: boot 4 is gone, the live boot 5 must not be evicted by it');
  t.is(m.state(3), 'up');
  m.step({ kind: 'down', node: 3 });
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { epoch: 2, boot: 5 }) });
  t.deepEqual(m.ready().evicted.map((e) => e.node), [3], 'boot 5 died too: a notice about it evicts it');
});

test('the same incarnation evicted again by a second evictor is a duplicate', (t) => {
  const m = member(3, [1, 2, 3], [1]);
  m.step({ kind: 'message', from: 1, message: evictedMsg(2, { cleaner: 1, epoch: 1, boot: 6 }) });
  t.is(m.ready().evicted.length, 1);
  m.step({ kind: 'message', from: 1, message: evictedMsg(2, { cleaner: 1, epoch: 2, boot: 6 }) });
  empty(t, m.ready(), 'boot 6 is already evicted here: its records went to the first cleaner');
});

test('an eviction notice about this node: current or newer boot → selfEvicted; older boot → rejected as stale', (t) => {
  const m = member(2, [1, 2, 3], [1, 3]);
  m.boot = 5;
  m.step({ kind: 'message', from: 1, message: evictedMsg(2, { boot: 4 }) });
  let r = m.ready();
  empty(t, r, 'stale');
  t.is(r.rejected.length, 1);
  t.regex(r.rejected[0]!, /boot 4 of this node \(now boot 5\): stale/);
  m.step({ kind: 'message', from: 1, message: evictedMsg(2, { boot: 5 }) });
  r = m.ready();
  t.true(r.selfEvicted);
  t.deepEqual(r.evicted, [], 'not an Eviction of a peer');
  m.step({ kind: 'message', from: 1, message: evictedMsg(2, { boot: 6 }) });
  t.true(m.ready().selfEvicted);
});

test('a notice about a node this node sees up (its mesh hears it, nothing here suspects it) is rejected', (t) => {
  const m = member(2, [1, 2, 3], [1, 3]);
  const before = JSON.stringify(m.members());
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { boot: 4 }) });
  const r = m.ready();
  empty(t, r, 'up here');
  t.deepEqual(r.rejected, ['eviction notice for node 3 boot 4 while it is up here: ignored']);
  t.is(JSON.stringify(m.members()), before);
  m.step({ kind: 'suspect', node: 3 });
  m.ready();
  m.step({ kind: 'message', from: 1, message: evictedMsg(3, { boot: 4 }) });
  t.deepEqual(m.ready().evicted.map((e) => e.node), [3], 'suspected here: accepted');
});

test('the evictor answers a suspicion about a node it evicted with the notice, without the records', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  m.step({ kind: 'down', node: 3 });
  m.step({ kind: 'fenced', node: 3, records: [R0], boot: 2 });
  m.ready();
  m.step({ kind: 'message', from: 2, message: { type: 'suspect', node: 3 } });
  const r = m.ready();
  t.deepEqual(r.send, [{ to: 2, message: { type: 'evicted', node: 3, records: [], cleaner: 1, epoch: 1, boot: 2 } }]);
  t.deepEqual(r.fence, []);
  t.deepEqual(m.notice(3), { type: 'evicted', node: 3, records: [], cleaner: 1, epoch: 1, boot: 2 });
  t.is(m.notice(2), null, 'not evicted: no notice');
  m.step({ kind: 'down', node: 3, restarted: true }); // a later boot connects
  m.step({ kind: 'message', from: 2, message: { type: 'suspect', node: 3 } });
  t.deepEqual(m.ready().send, [], 'the mesh hears a later boot: no stale notice');
});

test('a survivor that learnt an eviction passes the notice on, too', (t) => {
  const m = member(3, [1, 2, 3, 4], [1, 2]);
  m.step({ kind: 'message', from: 1, message: evictedMsg(4, { records: [R0], cleaner: 1, boot: 3 }) });
  m.ready();
  t.deepEqual(m.notice(4), { type: 'evicted', node: 4, records: [], cleaner: 1, epoch: 1, boot: 3 });
});

test('a peer that comes up is told of every eviction this node holds (not its own, not of a node connected again)', (t) => {
  const m = member(1, [1, 2, 3, 4, 5], [2, 3, 4, 5]);
  m.step({ kind: 'down', node: 4 });
  m.step({ kind: 'fenced', node: 4, records: [R0], boot: 7 });
  m.step({ kind: 'down', node: 5 });
  m.step({ kind: 'fenced', node: 5, records: [], boot: 1 });
  m.step({ kind: 'down', node: 3 });
  m.step({ kind: 'fenced', node: 3, records: [], boot: 2 });
  m.ready();
  m.step({ kind: 'down', node: 5, restarted: true }); // 5's next boot is connected (not yet up)
  m.step({ kind: 'up', node: 3 }); // 3 rejoins
  const r = m.ready();
  t.deepEqual(r.send, [{ to: 3, message: { type: 'evicted', node: 4, records: [], cleaner: 1, epoch: 1, boot: 7 } }]);
});

test('a suspicion of a node the mesh still hears lapses after the grace when nobody evicted it', (t) => {
  const m = member(3, [1, 2, 3], [1, 2], 5);
  m.step({ kind: 'suspect', node: 1 });
  t.deepEqual(m.ready().send, [{ to: 2, message: { type: 'suspect', node: 1 } }], 'node 2 evicts now, as node 3 sees it');
  t.is(m.evictor(), 2);
  for (let i = 0; i < 4; i++) m.step({ kind: 'tick' });
  t.is(m.state(1), 'down');
  m.step({ kind: 'tick' });
  t.is(m.state(1), 'up', 'node 1 still connected and not evicted: up again');
  t.is(m.evictor(), 1);
  m.step({ kind: 'down', node: 2 });
  m.step({ kind: 'suspect', node: 2 });
  for (let i = 0; i < 10; i++) m.step({ kind: 'tick' });
  t.is(m.state(2), 'down', 'the mesh lost node 2: its suspicion does not lapse');
});

test('fence-failed for a node this node\'s mesh still hears: up again (a slow answer, not a death)', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  m.step({ kind: 'suspect', node: 3 });
  t.deepEqual(m.ready().fence, [3]);
  m.step({ kind: 'fence-failed', node: 3 });
  t.is(m.state(3), 'up');
  empty(t, m.ready(), 'nothing');
});

// ---------------------------------------------------------------- grace, fence-failed, restarts

test('a peer never heard from is down after the grace, then fenced by the evictor', (t) => {
  const m = member(1, [1, 2, 3], [2], 5);
  for (let i = 0; i < 4; i++) m.step({ kind: 'tick' });
  t.is(m.state(3), 'unknown');
  empty(t, m.ready(), 'within the grace');
  m.step({ kind: 'tick' });
  t.is(m.state(3), 'down');
  t.deepEqual(m.ready().fence, [3]);
});

test('an unknown peer that comes up within the grace is never down', (t) => {
  const m = member(1, [1, 2, 3], [2], 5);
  for (let i = 0; i < 3; i++) m.step({ kind: 'tick' });
  m.step({ kind: 'up', node: 3 });
  for (let i = 0; i < 10; i++) m.step({ kind: 'tick' });
  t.is(m.state(3), 'up');
  empty(t, m.ready(), 'nothing');
});

test('fence-failed: the node is unknown again for the retry period, then fenced again', (t) => {
  const m = new Membership(1, [1, 2, 3], 20, 5); // grace 20, retry 5
  m.step({ kind: 'up', node: 2 });
  for (let i = 0; i < 3; i++) m.step({ kind: 'tick' });
  m.step({ kind: 'suspect', node: 3 });
  t.deepEqual(m.ready().fence, [3]);
  m.step({ kind: 'fence-failed', node: 3 });
  t.is(m.state(3), 'unknown');
  t.is(m.members().find((v) => v.id === 3)?.unknownUntil, 3 + 5, 'retry counted from now');
  empty(t, m.ready(), 'not right away');
  for (let i = 0; i < 4; i++) m.step({ kind: 'tick' });
  empty(t, m.ready(), 'within the retry period');
  m.step({ kind: 'tick' });
  t.deepEqual(m.ready().fence, [3], 'retry period over: fenced again');
});

test('fence-failed: the default retry period is a quarter of the grace', (t) => {
  const m = member(1, [1, 2, 3], [2], 40);
  m.step({ kind: 'suspect', node: 3 });
  m.step({ kind: 'fence-failed', node: 3 });
  t.is(m.members().find((v) => v.id === 3)?.unknownUntil, 10);
});

test('fence-failed while this node lost the quorum: the retry waits for the quorum', (t) => {
  const m = member(1, [1, 2, 3], [2], 2);
  m.step({ kind: 'suspect', node: 3 });
  t.deepEqual(m.ready().fence, [3]);
  m.step({ kind: 'down', node: 2 });
  m.step({ kind: 'fence-failed', node: 3 });
  for (let i = 0; i < 5; i++) m.step({ kind: 'tick' });
  empty(t, m.ready(), 'no quorum');
  m.step({ kind: 'up', node: 2 });
  t.deepEqual(m.ready().fence, [3]);
});

test('a restarted peer (down with restarted) is up again without a fence', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  m.step({ kind: 'down', node: 3, restarted: true });
  empty(t, m.ready(), 'restart');
  t.is(m.state(3), 'up');
  m.step({ kind: 'down', node: 3 });
  t.deepEqual(m.ready().fence, [3], 'a plain down is fenced');
});

test('an evicted peer stays evicted on down; up again when its next incarnation connects', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  m.step({ kind: 'suspect', node: 3 });
  m.step({ kind: 'fenced', node: 3, records: [], boot: 0 });
  m.ready();
  m.step({ kind: 'down', node: 3 });
  m.step({ kind: 'down', node: 3, restarted: true });
  t.is(m.state(3), 'evicted');
  empty(t, m.ready(), 'nothing');
  m.step({ kind: 'up', node: 3 });
  t.is(m.state(3), 'up');
});

// ---------------------------------------------------------------- cascades

test('cascade: the evictor dies mid-fence; the next evictor fences it and the node it was fencing', (t) => {
  // Seen from node 2 of 5: node 1 (the evictor) was fencing 5 when it died.
  const m = member(2, [1, 2, 3, 4, 5], [1, 3, 4, 5]);
  m.step({ kind: 'suspect', node: 5 });
  t.deepEqual(m.ready().send, [{ to: 1, message: { type: 'suspect', node: 5 } }], 'forwarded to node 1');
  m.step({ kind: 'down', node: 1 });
  t.is(m.evictor(), 2);
  t.deepEqual(m.ready().fence, [1], 'node 2 evicts: first the dead evictor');
  // Node 1 had claimed records of its own victims into its journal: they come with it.
  m.step({ kind: 'fenced', node: 1, records: [R0, R1], boot: 3 });
  let r = m.ready();
  t.deepEqual(r.evicted, [{ node: 1, records: [R0, R1], cleaner: 2 }]);
  t.deepEqual(r.fence, [5], 'then the node nobody evicted');
  m.step({ kind: 'fenced', node: 5, records: [], boot: 1 });
  r = m.ready();
  t.deepEqual(r.evicted, [{ node: 5, records: [], cleaner: 2 }]);
  t.deepEqual(r.send.map((s) => s.to), [3, 4, 5]);
  t.deepEqual(r.fence, []);
});

test('cascade: the evictor dies after announcing its eviction; the next evictor fences only the evictor', (t) => {
  const m = member(2, [1, 2, 3, 4, 5], [1, 3, 4, 5]);
  m.step({ kind: 'down', node: 5 });
  m.step({ kind: 'message', from: 1, message: evictedMsg(5, { records: [R0], cleaner: 1, boot: 2 }) });
  t.deepEqual(m.ready().evicted, [{ node: 5, records: [R0], cleaner: 1 }]);
  m.step({ kind: 'down', node: 1 });
  t.deepEqual(m.ready().fence, [1]);
  m.step({ kind: 'fenced', node: 1, records: [R0], boot: 1 }); // node 1's claim of R0 comes along
  const r = m.ready();
  t.deepEqual(r.evicted, [{ node: 1, records: [R0], cleaner: 2 }]);
  t.deepEqual(r.fence, [], 'node 5 is already evicted');
});

// ---------------------------------------------------------------- malformed input

const GOOD_EVICTED = { type: 'evicted', node: 3, records: [R0], cleaner: 1, epoch: 1, boot: 0 };
const MALFORMED: [unknown, RegExp][] = [
  [null, /not a map/],
  [42, /not a map/],
  ['suspect', /not a map/],
  [[{ type: 'suspect', node: 3 }], /not a map/],
  [{}, /invalid node/],
  [{ type: 'suspect' }, /suspect: invalid node/],
  [{ type: 'suspect', node: -1 }, /invalid node/],
  [{ type: 'suspect', node: 64 }, /invalid node/],
  [{ type: 'suspect', node: 1.5 }, /invalid node/],
  [{ type: 'suspect', node: '3' }, /invalid node/],
  [{ type: 'suspect', node: Number.NaN }, /invalid node/],
  [{ type: 'bogus', node: 3 }, /unknown type "bogus"/],
  [{ type: 7, node: 3 }, /unknown type 7/],
  [{ ...GOOD_EVICTED, node: undefined }, /evicted: invalid node/],
  [{ ...GOOD_EVICTED, cleaner: undefined }, /invalid cleaner/],
  [{ ...GOOD_EVICTED, cleaner: -1 }, /invalid cleaner/],
  [{ ...GOOD_EVICTED, cleaner: 64 }, /invalid cleaner/],
  [{ ...GOOD_EVICTED, cleaner: '1' }, /invalid cleaner/],
  [{ ...GOOD_EVICTED, epoch: undefined }, /invalid epoch/],
  [{ ...GOOD_EVICTED, epoch: -1 }, /invalid epoch/],
  [{ ...GOOD_EVICTED, epoch: 1.5 }, /invalid epoch/],
  [{ ...GOOD_EVICTED, epoch: Number.POSITIVE_INFINITY }, /invalid epoch/],
  [{ ...GOOD_EVICTED, epoch: 2 ** 53 }, /invalid epoch/],
  [{ ...GOOD_EVICTED, epoch: '1' }, /invalid epoch/],
  [{ ...GOOD_EVICTED, boot: undefined }, /invalid boot/],
  [{ ...GOOD_EVICTED, boot: -1 }, /invalid boot/],
  [{ ...GOOD_EVICTED, boot: 0.5 }, /invalid boot/],
  [{ ...GOOD_EVICTED, boot: Number.NaN }, /invalid boot/],
  [{ ...GOOD_EVICTED, records: undefined }, /invalid records/],
  [{ ...GOOD_EVICTED, records: R0 }, /invalid records/],
  [{ ...GOOD_EVICTED, records: { 0: R0 } }, /invalid records/],
  [{ ...GOOD_EVICTED, records: [R0, 7] }, /invalid records/],
  [{ ...GOOD_EVICTED, records: [null] }, /invalid records/],
  [{ ...GOOD_EVICTED, records: ['x'.repeat(161)] }, /invalid records/],
  [{ ...GOOD_EVICTED, records: new Array<string>(100_001).fill(R0) }, /invalid records/],
];

test('malformed messages: every field is checked; each is rejected with a reason and changes nothing', (t) => {
  for (const [raw, reason] of MALFORMED) {
    const parsed = parseMembershipMessage(raw);
    t.is(typeof parsed, 'string', `parser rejects ${JSON.stringify(raw)?.slice(0, 80)}`);
    for (const self of [1, 2, 3]) {
      // Node 1 is the evictor (a forwarded suspect would fence), node 3 the named victim.
      const m = member(self, [1, 2, 3], [1, 2, 3].filter((p) => p !== self));
      const before = JSON.stringify({ members: m.members(), evictor: m.evictor() });
      m.step({ kind: 'message', from: self === 2 ? 1 : 2, message: raw });
      const r = m.ready();
      empty(t, r, `node ${self}: ${JSON.stringify(raw)?.slice(0, 60)}`);
      t.is(r.rejected.length, 1);
      t.regex(r.rejected[0]!, reason);
      t.regex(r.rejected[0]!, /^from node \d: membership/);
      t.is(JSON.stringify({ members: m.members(), evictor: m.evictor() }), before, 'no state change');
    }
  }
});

test('well-formed input about or from nodes outside the cluster is rejected', (t) => {
  const m = member(1, [1, 2, 3], [2, 3]);
  const before = JSON.stringify(m.members());
  m.step({ kind: 'message', from: 9, message: { type: 'suspect', node: 3 } });
  m.step({ kind: 'message', from: 2, message: evictedMsg(9) });
  m.step({ kind: 'up', node: 9 });
  const r = m.ready();
  empty(t, r, 'outsiders');
  t.deepEqual(r.rejected, ['message from unknown node 9', 'eviction of unknown node 9', 'up from unknown node 9']);
  t.is(JSON.stringify(m.members()), before);
});

test('the parser accepts exactly the well-formed messages', (t) => {
  t.deepEqual(parseMembershipMessage({ type: 'suspect', node: 0, extra: 1 }), { type: 'suspect', node: 0 });
  t.deepEqual(parseMembershipMessage({ ...GOOD_EVICTED, node: 63, cleaner: 0, epoch: 0, boot: 2 ** 53 - 1, records: [] }),
    { type: 'evicted', node: 63, records: [], cleaner: 0, epoch: 0, boot: 2 ** 53 - 1 });
  t.deepEqual(parseMembershipMessage({ ...GOOD_EVICTED, records: ['x'.repeat(160)] }),
    { ...GOOD_EVICTED, records: ['x'.repeat(160)] });
});
