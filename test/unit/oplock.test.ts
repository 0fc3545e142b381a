/**
 * Oplock scenarios (cluster/oplock.ts). One scenario per row of TRANSITIONS, each a
 * short script against one machine and hand-made peers; then the behaviours that
 * matter end to end, on a scripted simulated cluster (test/sim/cluster.ts, which
 * checks the protocol invariants after every step); then the wire parser.
 */
import test from 'ava';
import { Packr } from 'msgpackr';
import {
  ANSWERS,
  OPLOCK_STATES,
  OplockMachine,
  TRANSITIONS,
  transitionKey,
  type OplockMessage,
  type OplockState,
  type Ready,
} from '../../cluster/oplock.js';
import {
  lockId,
  locksCovering,
  parseLockId,
  parseOplockMessage,
  type Advertised,
  type NodeId,
  type RequestType,
} from '../../cluster/oplock-messages.js';
import { simCluster } from '../sim/cluster.js';

const L = 'vseg7.rmap[0]';
/** resendTicks = 2, backoffTicks = 5 (+ rank), from these. */
const OPTS = { ackTimeoutTicks: 10, idleReleaseTicks: 50 } as const;
const ACK_TIMEOUT_TICKS = OPTS.ackTimeoutTicks;
const BACKOFF_TICKS = 5;
const IDLE_RELEASE_TICKS = OPTS.idleReleaseTicks;

// ---------------------------------------------------------------- script helpers

type Request = Extract<OplockMessage, { type: RequestType }>;

/** A hand-driven peer: makes messages with its own increasing seq. */
class Peer {
  private seq = 0;
  constructor(readonly id: NodeId, readonly inc = 0) {}
  private h(lock: string): { lock: string; inc: number; seq: number } {
    return { lock, inc: this.inc, seq: ++this.seq };
  }
  join(lock = L): OplockMessage {
    const h = this.h(lock);
    return { type: 'join', ...h, req: h.seq };
  }
  share(lock = L): OplockMessage {
    const h = this.h(lock);
    return { type: 'share', ...h, req: h.seq };
  }
  acquire(lock = L, o: { restrictive?: boolean; nonVolatile?: boolean } = {}): Extract<OplockMessage, { type: 'acquire' }> {
    const h = this.h(lock);
    return { type: 'acquire', ...h, req: h.seq, restrictive: o.restrictive ?? true, nonVolatile: o.nonVolatile ?? false };
  }
  leave(lock = L): OplockMessage {
    return { type: 'leave', ...this.h(lock) };
  }
  unshare(lock = L): OplockMessage {
    return { type: 'unshare', ...this.h(lock) };
  }
  release(lock = L): OplockMessage {
    return { type: 'release', ...this.h(lock) };
  }
  ack(r: Request, state: Advertised, dirty = false): OplockMessage {
    return { type: 'ack', ...this.h(r.lock), answers: r.type, req: r.req, state, dirty };
  }
  nak(r: Request, state: Advertised): OplockMessage {
    return { type: 'nak', ...this.h(r.lock), answers: r.type, req: r.req, state };
  }
}

/** A machine past Boot. */
function node(id: NodeId = 1, peers: NodeId[] = [2, 3], options: object = {}): OplockMachine {
  const m = new OplockMachine(id, peers, { ...OPTS, ...options });
  m.step({ kind: 'tick' });
  m.ready();
  return m;
}

function merge(...rs: Ready[]): Ready {
  return {
    send: rs.flatMap((r) => r.send),
    granted: rs.flatMap((r) => r.granted),
    revoke: rs.flatMap((r) => r.revoke),
    evict: rs.flatMap((r) => r.evict),
    journal: rs.flatMap((r) => r.journal),
    released: rs.flatMap((r) => r.released),
  };
}

function deliver(m: OplockMachine, from: Peer, message: OplockMessage): Ready {
  m.step({ kind: 'message', from: from.id, message });
  return m.ready();
}

function intent(m: OplockMachine, want: 'share' | 'acquire' | 'release' | 'unshare', flags: { restrictive?: boolean; nonVolatile?: boolean } = {}, lock = L): Ready {
  m.step({ kind: 'intent', lock, want, ...flags });
  return m.ready();
}

function tick(m: OplockMachine, count = 1): Ready {
  const rs: Ready[] = [];
  for (let i = 0; i < count; i++) {
    m.step({ kind: 'tick' });
    rs.push(m.ready());
  }
  return merge(...rs);
}

/** `type(answers)→to` per message sent, in order: what a script expects to see. */
function wire(r: Ready): string[] {
  return r.send.map(({ to, message: m }) => `${m.type}${m.type === 'ack' || m.type === 'nak' ? `(${m.answers})` : ''}→${to}`);
}

function requestTo(r: Ready, to: NodeId, type: RequestType): Request {
  const s = r.send.find((x) => x.to === to && x.message.type === type);
  if (s === undefined) throw new Error(`no ${type} sent to ${to} in ${JSON.stringify(wire(r))}`);
  return s.message as Request;
}

function answerTo(r: Ready, to: NodeId): Extract<OplockMessage, { type: 'ack' | 'nak' }> {
  const s = r.send.find((x) => x.to === to && (x.message.type === 'ack' || x.message.type === 'nak'));
  if (s === undefined) throw new Error(`no answer sent to ${to} in ${JSON.stringify(wire(r))}`);
  return s.message as Extract<OplockMessage, { type: 'ack' | 'nak' }>;
}

/**
 * Drive `m` to Sharing: every peer answers the join (joined/sharing ack, or nak when
 * `out`), then acks the share. Returns everything the machine did.
 */
function toSharing(m: OplockMachine, peers: [Peer, Advertised][]): Ready {
  const rs: Ready[] = [intent(m, 'share')];
  for (const [p, adv] of peers) {
    const join = requestTo(rs[0]!, p.id, 'join');
    rs.push(deliver(m, p, adv === 'out' ? p.nak(join, 'out') : p.ack(join, adv)));
  }
  const shares = merge(...rs);
  for (const [p, adv] of peers) {
    if (adv === 'out') continue;
    rs.push(deliver(m, p, p.ack(requestTo(shares, p.id, 'share'), adv)));
  }
  return merge(...rs);
}

/** Node 1 in Joined (it wanted to share, then only to stay joined); peer 2 joined, 3 not interested. */
function joined(): { m: OplockMachine; p2: Peer; p3: Peer } {
  const m = node();
  const p2 = new Peer(2);
  const p3 = new Peer(3);
  const r = intent(m, 'share');
  intent(m, 'unshare');
  deliver(m, p2, p2.ack(requestTo(r, 2, 'join'), 'joined'));
  deliver(m, p3, p3.nak(requestTo(r, 3, 'join'), 'out'));
  return { m, p2, p3 };
}

/** Node 1 in WantToShare, waiting for peer 2's answer (3 is not interested). */
function wantToShare(): { m: OplockMachine; p2: Peer; p3: Peer; share: Request } {
  const m = node();
  const p2 = new Peer(2);
  const p3 = new Peer(3);
  const r = intent(m, 'share');
  deliver(m, p3, p3.nak(requestTo(r, 3, 'join'), 'out'));
  const r2 = deliver(m, p2, p2.ack(requestTo(r, 2, 'join'), 'joined'));
  return { m, p2, p3, share: requestTo(r2, 2, 'share') };
}

/** Node 1 in WantToAcquire, waiting for peer 2 (a sharer); 3 is not interested. */
function wantToAcquire(flags: { restrictive?: boolean; nonVolatile?: boolean } = {}): { m: OplockMachine; p2: Peer; p3: Peer; acquire: Request } {
  const m = node();
  const p2 = new Peer(2);
  const p3 = new Peer(3);
  toSharing(m, [[p2, 'sharing'], [p3, 'out']]);
  const r = intent(m, 'acquire', flags);
  return { m, p2, p3, acquire: requestTo(r, 2, 'acquire') };
}

// ---------------------------------------------------------------- one scenario per transition

const scenarioKeys = new Set<string>();

function transition(from: OplockState, on: string, title: string, script: (t: import('ava').ExecutionContext) => OplockMachine): void {
  const key = transitionKey(from, on);
  const row = TRANSITIONS.find((r) => transitionKey(r.from, r.on) === key);
  scenarioKeys.add(key);
  test(`${key} ${row?.to ?? '?'}: ${title}`, (t) => {
    t.truthy(row, `${key} is not in TRANSITIONS`);
    const m = script(t);
    t.true(m.coverage().has(key), `the scenario never took ${key}`);
  });
}

transition('Boot', 'booted', 'a booting node naks joins, and its first tick puts it in the jlist', (t) => {
  const m = new OplockMachine(1, [2, 3], OPTS);
  const p2 = new Peer(2);
  t.is(m.state(L), 'Boot');
  const r = deliver(m, p2, p2.join());
  t.deepEqual(wire(r), ['nak(join)→2']);
  t.is(answerTo(r, 2).state, 'out');
  m.step({ kind: 'tick' });
  t.is(m.state(L), 'Uninterested');
  return m;
});

transition('Uninterested', 'want', 'a share intent broadcasts join to the whole jlist', (t) => {
  const m = node();
  const r = intent(m, 'share');
  t.is(m.state(L), 'WantToJoin');
  t.deepEqual(wire(r), ['join→2', 'join→3']);
  return m;
});

transition('WantToJoin', 'joined', 'every peer answered: an ack adds to the slist, a nak means not interested', (t) => {
  const { m } = joined();
  t.is(m.state(L), 'Joined');
  t.deepEqual(m.lists(L), { slist: [2], alist: [] });
  return m;
});

transition('WantToJoin', 'timeout', 'silent peers are resent the join, then reported for eviction; eviction answers for them', (t) => {
  const m = node();
  intent(m, 'share');
  const r = tick(m, ACK_TIMEOUT_TICKS);
  t.true(wire(r).filter((w) => w === 'join→2').length >= 3, 'join resent while waiting');
  t.deepEqual(r.evict, [2, 3]);
  t.is(m.state(L), 'WantToJoin');
  m.step({ kind: 'evicted', node: 2 });
  m.step({ kind: 'evicted', node: 3 });
  const after = m.ready();
  t.is(m.state(L), 'Sharing', 'alone now: joined and shared with no one to ask');
  t.deepEqual(after.granted.map((g) => g.mode), ['share']);
  return m;
});

transition('Joined', 'want-share', 'a share intent broadcasts share to the slist only', (t) => {
  const { m } = joined();
  const r = intent(m, 'share');
  t.is(m.state(L), 'WantToShare');
  t.deepEqual(wire(r), ['share→2']);
  return m;
});

transition('Joined', 'leave', 'unshare when only joined leaves: leave goes to the slist', (t) => {
  const { m } = joined();
  const r = intent(m, 'unshare');
  t.is(m.state(L), 'Uninterested');
  t.deepEqual(wire(r), ['leave→2']);
  return m;
});

transition('WantToShare', 'shared', 'the last share ack grants share', (t) => {
  const { m, p2, share } = wantToShare();
  const r = deliver(m, p2, p2.ack(share, 'joined'));
  t.is(m.state(L), 'Sharing');
  t.deepEqual(r.granted, [{ lock: L, mode: 'share', purge: false, cleanup: false, restrictive: false }]);
  return m;
});

transition('WantToShare', 'nak', 'a nak drops the attempt; the share is retried after the backoff', (t) => {
  const { m, p2, share } = wantToShare();
  const r = deliver(m, p2, p2.nak(share, 'sharing'));
  t.deepEqual(wire(r), []);
  t.deepEqual(r.granted, []);
  t.deepEqual(wire(tick(m, BACKOFF_TICKS - 1)), [], 'nothing before the backoff elapses');
  t.deepEqual(wire(tick(m)), ['share→2']);
  return m;
});

transition('WantToShare', 'retry', 'a release from the holder is the retry signal: share again at once', (t) => {
  const { m, p2, share } = wantToShare();
  deliver(m, p2, p2.nak(share, 'sharing'));
  const r = deliver(m, p2, p2.release());
  t.deepEqual(wire(r), ['share→2']);
  return m;
});

transition('WantToShare', 'acquire-seen', 'acking an acquire restarts the share, so the acquirer can nak it', (t) => {
  const { m, p3 } = wantToShare();
  const r = deliver(m, p3, p3.acquire());
  t.deepEqual(wire(r), ['ack(acquire)→3', 'share→2', 'share→3']);
  t.is(m.state(L), 'WantToShare');
  return m;
});

transition('WantToShare', 'timeout', 'a silent sharer is reported for eviction after ackTimeoutTicks', (t) => {
  const { m } = wantToShare();
  const r = tick(m, ACK_TIMEOUT_TICKS);
  t.deepEqual(r.evict, [2]);
  t.is(m.state(L), 'WantToShare');
  return m;
});

transition('WantToShare', 'cancel', 'an unshare intent before the grant goes back to Joined and says unshare', (t) => {
  const { m } = wantToShare();
  const r = intent(m, 'unshare');
  t.is(m.state(L), 'Joined');
  t.deepEqual(wire(r), ['unshare→2']);
  return m;
});

transition('Sharing', 'want-acquire', 'an acquire intent broadcasts acquire to the alist (sharers only)', (t) => {
  const m = node();
  const p2 = new Peer(2);
  const p3 = new Peer(3);
  toSharing(m, [[p2, 'sharing'], [p3, 'joined']]);
  t.deepEqual(m.lists(L), { slist: [2, 3], alist: [2] });
  const r = intent(m, 'acquire');
  t.is(m.state(L), 'WantToAcquire');
  t.deepEqual(wire(r), ['acquire→2']);
  t.like(r.send[0]!.message, { restrictive: true, nonVolatile: false });
  return m;
});

transition('Sharing', 'unrestrictive-acquire', 'an unrestrictive acquire is acked at once; the sharer keeps serving a stale copy', (t) => {
  const m = node();
  const p2 = new Peer(2);
  toSharing(m, [[p2, 'sharing'], [new Peer(3), 'out']]);
  const r = deliver(m, p2, p2.acquire(L, { restrictive: false }));
  t.deepEqual(wire(r), ['ack(acquire)→2']);
  t.deepEqual(r.revoke, [{ lock: L, restrictive: false, flush: false }], 'a notice: refresh when convenient');
  t.is(m.state(L), 'Sharing');
  t.is(m.owner(L), 2);
  return m;
});

transition('Sharing', 'restrictive-revoked', 'a restrictive acquire is acked only after the CP revoked and drained', (t) => {
  const m = node();
  const p2 = new Peer(2);
  toSharing(m, [[p2, 'sharing'], [new Peer(3), 'out']]);
  const r = deliver(m, p2, p2.acquire());
  t.deepEqual(wire(r), [], 'no ack before the CP confirms');
  t.deepEqual(r.revoke, [{ lock: L, restrictive: true, flush: false }]);
  t.is(m.state(L), 'Sharing');
  m.step({ kind: 'revoked', lock: L });
  const after = m.ready();
  t.deepEqual(wire(after), ['unshare→2', 'ack(acquire)→2', 'share→2'], 'ack, then share again: the CP still wants to');
  t.like(answerTo(after, 2), { type: 'ack', state: 'joined', dirty: false });
  return m;
});

transition('Sharing', 'unshare', 'an unshare intent stops caching and says so to the slist', (t) => {
  const m = node();
  const p2 = new Peer(2);
  toSharing(m, [[p2, 'joined'], [new Peer(3), 'out']]);
  const r = intent(m, 'unshare');
  t.is(m.state(L), 'Joined');
  t.deepEqual(wire(r), ['unshare→2']);
  return m;
});

transition('WantToAcquire', 'acquired', 'the last ack grants acquire', (t) => {
  const { m, p2, acquire } = wantToAcquire();
  const r = deliver(m, p2, p2.ack(acquire, 'joined'));
  t.is(m.state(L), 'Acquired');
  t.is(m.owner(L), 1);
  t.deepEqual(r.granted, [{ lock: L, mode: 'acquire', purge: false, cleanup: false, restrictive: true }]);
  return m;
});

transition('WantToAcquire', 'nak', 'a nak: release to those asked, back off', (t) => {
  const { m, p2, acquire } = wantToAcquire();
  const r = deliver(m, p2, p2.nak(acquire, 'sharing'));
  t.deepEqual(wire(r), ['release→2']);
  t.is(m.state(L), 'WantToAcquire');
  t.deepEqual(wire(tick(m, BACKOFF_TICKS - 1)), []);
  return m;
});

transition('WantToAcquire', 'retry', 'after the backoff the acquire is sent again, with a new req', (t) => {
  const { m, p2, acquire } = wantToAcquire();
  deliver(m, p2, p2.nak(acquire, 'sharing'));
  const r = tick(m, BACKOFF_TICKS);
  t.deepEqual(wire(r), ['acquire→2']);
  t.true(requestTo(r, 2, 'acquire').req > acquire.req);
  return m;
});

transition('WantToAcquire', 'preempted', 'an acquire from a lower id wins: abandon ours, honour theirs', (t) => {
  const m = node(2, [1, 3]);
  const p1 = new Peer(1);
  toSharing(m, [[p1, 'sharing'], [new Peer(3), 'out']]);
  intent(m, 'acquire');
  const r = deliver(m, p1, p1.acquire());
  t.deepEqual(wire(r), ['release→1'], 'our attempt is dropped');
  t.deepEqual(r.revoke, [{ lock: L, restrictive: true, flush: false }]);
  t.is(m.state(L), 'WantToAcquire');
  return m;
});

transition('WantToAcquire', 'restrictive-revoked', 'once the CP revoked, the preempted node acks and drops to Joined', (t) => {
  const m = node(2, [1, 3]);
  const p1 = new Peer(1);
  toSharing(m, [[p1, 'sharing'], [new Peer(3), 'out']]);
  intent(m, 'acquire');
  deliver(m, p1, p1.acquire());
  m.step({ kind: 'revoked', lock: L });
  const r = m.ready();
  t.like(answerTo(r, 1), { type: 'ack', answers: 'acquire', state: 'joined' });
  t.deepEqual(wire(r), ['unshare→1', 'ack(acquire)→1', 'share→1'], 'and it starts over: share, then acquire');
  return m;
});

transition('WantToAcquire', 'timeout', 'a silent sharer is reported; its eviction counts as its release (purge)', (t) => {
  const { m } = wantToAcquire();
  const r = tick(m, ACK_TIMEOUT_TICKS);
  t.deepEqual(r.evict, [2]);
  t.true(wire(r).includes('acquire→2'), 'resent while waiting');
  m.step({ kind: 'evicted', node: 2 });
  t.is(m.state(L), 'Acquired');
  t.like(m.ready().granted[0], { mode: 'acquire', purge: true });
  return m;
});

transition('WantToAcquire', 'cancel', 'a release intent before the grant cancels: release to those asked', (t) => {
  const { m } = wantToAcquire();
  const r = intent(m, 'release');
  t.is(m.state(L), 'Sharing');
  t.deepEqual(wire(r), ['release→2']);
  return m;
});

transition('Acquired', 'release', 'a release intent clears the journal record and tells the slist', (t) => {
  const m = node();
  toSharing(m, [[new Peer(2), 'joined'], [new Peer(3), 'out']]);
  const got = intent(m, 'acquire', { nonVolatile: true });
  t.deepEqual(got.journal, [{ lock: L, owner: 1 }]);
  const r = intent(m, 'release');
  t.is(m.state(L), 'Sharing');
  t.deepEqual(r.journal, [{ lock: L, owner: null }]);
  t.deepEqual(wire(r), ['release→2']);
  return m;
});

transition('Acquired', 'idle', 'a non-volatile oplock unused for idleReleaseTicks is released by the sweep', (t) => {
  const m = node();
  toSharing(m, [[new Peer(2), 'out'], [new Peer(3), 'out']]);
  intent(m, 'acquire', { nonVolatile: true });
  t.deepEqual(tick(m, IDLE_RELEASE_TICKS - 1).released, []);
  const r = tick(m);
  t.deepEqual(r.released, [L]);
  t.deepEqual(r.journal, [{ lock: L, owner: null }]);
  t.is(m.state(L), 'Sharing');
  return m;
});

test('the tables: every TRANSITIONS row has a scenario above, and every state answers every request', (t) => {
  const keys = TRANSITIONS.map((r) => transitionKey(r.from, r.on));
  t.deepEqual(keys.filter((k) => !scenarioKeys.has(k)), []);
  t.deepEqual([...scenarioKeys].filter((k) => !keys.includes(k)), []);
  t.is(new Set(keys).size, keys.length);
  for (const s of OPLOCK_STATES) {
    t.true(TRANSITIONS.some((r) => r.from === s || r.to === s), `${s} is unreachable`);
    t.deepEqual(Object.keys(ANSWERS[s]).sort(), ['acquire', 'join', 'share']);
  }
});

// ---------------------------------------------------------------- the ANSWERS table, state by state

/** A machine with id `id` in `state`; its peers are 1..3 minus itself. */
function inState(state: OplockState, id: NodeId): OplockMachine {
  const peers = [1, 2, 3].filter((p) => p !== id);
  const [a, b] = peers.map((p) => new Peer(p, 7)) as [Peer, Peer];
  if (state === 'Boot') return new OplockMachine(id, peers, OPTS);
  const m = node(id, peers);
  switch (state) {
    case 'Uninterested':
      return m;
    case 'WantToJoin':
      intent(m, 'share');
      return m;
    case 'Joined':
      intent(m, 'share');
      intent(m, 'unshare');
      m.step({ kind: 'evicted', node: a.id });
      m.step({ kind: 'evicted', node: b.id });
      m.ready();
      return m;
    case 'WantToShare': {
      const r = intent(m, 'share');
      deliver(m, a, a.ack(requestTo(r, a.id, 'join'), 'joined'));
      deliver(m, b, b.nak(requestTo(r, b.id, 'join'), 'out'));
      return m;
    }
    case 'Sharing':
      toSharing(m, [[a, 'joined'], [b, 'out']]);
      return m;
    case 'WantToAcquire':
      toSharing(m, [[a, 'sharing'], [b, 'out']]);
      intent(m, 'acquire');
      return m;
    case 'Acquired':
      toSharing(m, [[a, 'joined'], [b, 'out']]);
      intent(m, 'acquire');
      return m;
  }
}

for (const state of OPLOCK_STATES) {
  test(`ANSWERS: ${state} answers join/share/acquire as the table says`, (t) => {
    for (const [self, asker] of [[1, 3], [3, 1]] as const) {
      for (const type of ['join', 'share', 'acquire'] as const) {
        const m = inState(state, self);
        t.is(m.state(L), state);
        const p = new Peer(asker, 9);
        const message = type === 'join' ? p.join() : type === 'share' ? p.share() : p.acquire(L, { restrictive: false });
        const r = deliver(m, p, message);
        const rule = ANSWERS[state][type];
        const expected = rule === 'nak' || (rule === 'by-priority' && asker > self) ? 'nak' : 'ack';
        t.is(answerTo(r, asker).type, expected, `${state}, ${type} from ${asker} to ${self} (${rule})`);
      }
    }
  });
}

// ---------------------------------------------------------------- behaviours

test('uncontended acquire: the only sharer acquires without a single message', (t) => {
  const m = node();
  toSharing(m, [[new Peer(2), 'joined'], [new Peer(3), 'joined']]);
  t.deepEqual(m.lists(L).alist, [], 'peers joined, none sharing');
  const r = intent(m, 'acquire');
  t.deepEqual(r.send, []);
  t.deepEqual(r.granted, [{ lock: L, mode: 'acquire', purge: false, cleanup: false, restrictive: true }]);
  t.deepEqual(wire(intent(m, 'release')), ['release→2', 'release→3'], 'a release tells the slist (the retry signal)');
  t.deepEqual(wire(intent(m, 'acquire')), [], 'and the reacquire again sends nothing');
  t.is(m.state(L), 'Acquired');
});

test('uncontended acquire on a one-node cluster: no messages at all, from Uninterested to Acquired', (t) => {
  const m = node(1, []);
  const r = intent(m, 'acquire', { nonVolatile: true });
  t.deepEqual(r.send, []);
  t.deepEqual(r.journal, [{ lock: L, owner: 1 }]);
  t.like(r.granted[0], { mode: 'acquire' });
  t.is(m.state(L), 'Acquired');
});

test('contended acquire round trip (3 nodes): sharers revoke, ack, re-share after the release', (t) => {
  const c = simCluster({ nodes: 3 });
  for (const id of [1, 2, 3]) c.node(id).share(L);
  c.run();
  t.deepEqual([1, 2, 3].map((id) => c.node(id).state(L)), ['Sharing', 'Sharing', 'Sharing']);
  const before = c.net.stats.sent;
  c.node(3).acquire(L);
  c.run();
  t.is(c.owner(L), 3);
  t.false(c.node(1).serving(L), 'restrictive: node 1 stopped serving before it acked');
  t.false(c.node(2).serving(L));
  t.deepEqual([1, 2].map((id) => c.node(id).state(L)), ['WantToShare', 'WantToShare'], 'they want to share again; the holder naks');
  t.true(c.net.stats.sent - before >= 4, 'acquire and ack both ways');
  c.node(3).release(L);
  c.run();
  t.is(c.owner(L), null);
  t.deepEqual([1, 2, 3].map((id) => c.node(id).state(L)), ['Sharing', 'Sharing', 'Sharing']);
  t.true(c.node(1).serving(L));
});

test('conflicting acquires: the lower id wins, the other gets it after the release', (t) => {
  const c = simCluster({ nodes: 2 });
  c.node(1).share(L);
  c.node(2).share(L);
  c.run();
  c.node(2).acquire(L);
  c.node(1).acquire(L);
  c.run();
  t.is(c.owner(L), 1);
  t.is(c.node(2).state(L), 'WantToShare', 'node 2 yielded: revoked, acked, waits to share again');
  c.node(1).release(L);
  c.run();
  t.is(c.owner(L), 2);
});

test('nak and back-off: an acquirer is naked while the holder holds, and gets it soon after the release', (t) => {
  const c = simCluster({ nodes: 2 });
  c.node(1).share(L);
  c.node(2).share(L);
  c.run();
  c.node(1).acquire(L);
  c.run();
  c.node(2).acquire(L);
  c.tick(4);
  t.is(c.node(2).state(L), 'WantToShare', 'naked by the holder while re-sharing');
  c.node(1).release(L);
  c.tick(8); // share, ack, acquire, revoke, ack: well inside node 2's backoff of 11 ticks
  t.is(c.owner(L), 2, 'the release is the retry signal');
});

test('acquire evicts a partitioned sharer after the ack timeout (3 nodes)', (t) => {
  const c = simCluster({ nodes: 3, seed: 1 });
  c.node(1).share(L);
  c.node(2).share(L);
  c.run();
  c.partition([2], [1, 3]);
  c.node(1).acquire(L);
  c.tick(20 + 5); // SCRIPT_DEFAULTS.ackTimeoutTicks + a few
  t.deepEqual(c.owner(L), 1);
  t.true(c.node(1).evicted(2));
  t.true(c.node(3).evicted(2), 'membership tells every live node');
  t.false(c.node(2).up, 'the evicted node is fenced');
  c.heal();
  c.restart(2);
  c.node(2).share(L);
  c.tick(10);
  t.is(c.node(2).state(L), 'WantToShare', 'back as a new incarnation; the holder naks its share');
});

test('restrictive vs unrestrictive update: only the restrictive one stops the other sharers serving', (t) => {
  const c = simCluster({ nodes: 2 });
  c.node(1).share(L);
  c.node(2).share(L);
  c.run();
  c.node(1).acquire(L, { restrictive: false });
  c.run();
  t.is(c.owner(L), 1);
  t.is(c.node(2).state(L), 'Sharing', 'unrestrictive: node 2 still shares');
  t.true(c.node(2).serving(L), 'and still serves (the update only adds authority)');
  t.true(c.node(1).machine.dirty(L), 'the update went to node 1\'s journal');
  c.node(1).release(L);
  c.run();
  c.node(1).acquire(L, { restrictive: true });
  c.run();
  t.is(c.owner(L), 1);
  t.false(c.node(2).serving(L), 'restrictive: node 2 revoked and drained first');
  t.not(c.node(2).state(L), 'Sharing');
});

test('dirty flag: the ack carries the old dirty flag after a flush, and the acquirer is told to purge', (t) => {
  // Responder side: node 1 made an unrestrictive update (dirty), then node 2 acquires.
  const m = node();
  const p2 = new Peer(2);
  toSharing(m, [[p2, 'sharing'], [new Peer(3), 'out']]);
  // Uncontended is not possible with 2 sharing: let 2 ack our unrestrictive acquire.
  const r = intent(m, 'acquire', { restrictive: false });
  deliver(m, p2, p2.ack(requestTo(r, 2, 'acquire'), 'sharing'));
  t.true(m.dirty(L));
  intent(m, 'release');
  t.true(m.dirty(L), 'release keeps the updates in the journal (lazy flush)');
  const acquire = p2.acquire(L, { restrictive: false });
  const r2 = deliver(m, p2, acquire);
  t.deepEqual(wire(r2), [], 'dirty: no ack before the flush, even for an unrestrictive acquire');
  t.deepEqual(r2.revoke, [{ lock: L, restrictive: false, flush: true }]);
  m.step({ kind: 'revoked', lock: L });
  const r3 = m.ready();
  t.like(answerTo(r3, 2), { type: 'ack', dirty: true });
  t.false(m.dirty(L));
  const dup = deliver(m, p2, acquire);
  t.like(answerTo(dup, 2), { type: 'ack', dirty: true }, 'a duplicate request gets the same answer');

  // Acquirer side: a dirty ack means purge.
  const { m: a, p2: q2, acquire: req } = wantToAcquire();
  const g = deliver(a, q2, q2.ack(req, 'sharing', true));
  t.like(g.granted[0], { mode: 'acquire', purge: true });
  const { m: b, p2: r2p, acquire: req2 } = wantToAcquire();
  t.like(deliver(b, r2p, r2p.ack(req2, 'sharing', false)).granted[0], { mode: 'acquire', purge: false });
});

test('a dirty sharer flushes before it unshares, so a dirty node is always in the alists', (t) => {
  const m = node();
  const p2 = new Peer(2);
  toSharing(m, [[p2, 'joined'], [new Peer(3), 'out']]);
  intent(m, 'acquire', { restrictive: false });
  intent(m, 'release');
  const r = intent(m, 'unshare');
  t.deepEqual(r.revoke, [{ lock: L, restrictive: false, flush: true }]);
  t.is(m.state(L), 'Sharing');
  m.step({ kind: 'revoked', lock: L });
  t.deepEqual(wire(m.ready()), ['unshare→2']);
  t.is(m.state(L), 'Joined');
  t.false(m.dirty(L));
});

test('non-volatile journal records: recorded before the grant, cleared on release, volatile never', (t) => {
  const m = node(1, []);
  const nv = intent(m, 'acquire', { nonVolatile: true });
  t.deepEqual(nv.journal, [{ lock: L, owner: 1 }]);
  t.is(nv.granted.length, 1);
  t.deepEqual(intent(m, 'release').journal, [{ lock: L, owner: null }]);
  const v = merge(intent(m, 'acquire', { nonVolatile: false }), intent(m, 'release'));
  t.deepEqual(v.journal, []);
  t.deepEqual(m.held(L), null);
});

test('idle sweep: only non-volatile acquisitions; any intent on the oplock counts as use', (t) => {
  const m = node(1, []);
  intent(m, 'acquire', { nonVolatile: false }, 'vseg7.rmap[1]');
  intent(m, 'acquire', { nonVolatile: true }, 'vseg7.rmap[2]');
  tick(m, IDLE_RELEASE_TICKS - 5);
  intent(m, 'acquire', { nonVolatile: true }, 'vseg7.rmap[2]'); // touched
  t.deepEqual(tick(m, 10).released, []);
  t.deepEqual(tick(m, IDLE_RELEASE_TICKS).released, ['vseg7.rmap[2]']);
  t.is(m.state('vseg7.rmap[1]'), 'Acquired', 'a volatile acquisition is the CP\'s to release');
});

test('crashed owner of a non-volatile oplock: exactly one survivor cleans up, exactly once', (t) => {
  const c = simCluster({ nodes: 3 });
  const NV = 'vseg7.rmap[1]';
  c.node(2).share(NV);
  c.node(3).share(NV);
  c.run();
  c.node(2).acquire(NV, { nonVolatile: true });
  c.tick(10);
  t.deepEqual(c.node(2).journal(), [NV], 'the owner is recorded in its journal');
  t.is(c.node(3).state(NV), 'WantToShare', 'node 3 revoked and wants to share again; the holder naks');
  c.crash(2);
  c.tick(40); // node 3's next share times out on the dead owner
  t.true(c.node(3).evicted(2), 'node 3 reported 2 and membership evicted it');
  t.true(c.node(1).evicted(2));
  c.run();
  const cleanups = [1, 3].map((id) => c.node(id).grants(NV).filter((g) => g.cleanup).length);
  t.deepEqual(cleanups, [0, 1], 'the evictor (node 3) cleans; node 1 does not');
  t.deepEqual(c.node(3).journal(), [NV], 'the claim sits in the cleaner\'s journal until it releases');
  c.node(3).release(NV);
  c.run();
  t.deepEqual(c.node(3).journal(), []);
  t.deepEqual(c.orphanCount(), { total: 1, cleaned: 1 });
});

test('a crashed owner nobody waits for is evicted at its restart; the lowest live node cleans', (t) => {
  const c = simCluster({ nodes: 3 });
  const NV = 'vseg7.rmap[3]';
  c.node(3).acquire(NV, { nonVolatile: true });
  c.run();
  c.crash(3);
  c.tick(50);
  t.false(c.node(1).evicted(3), 'nobody noticed');
  c.restart(3);
  c.run();
  t.deepEqual(c.node(1).grants(NV).map((g) => [g.mode, g.cleanup]), [['acquire', true]]);
  t.deepEqual(c.node(2).grants(NV), []);
  t.deepEqual(c.orphanCount(), { total: 1, cleaned: 1 });
});

test('without a named cleaner every survivor picks the same one: the lowest live id', (t) => {
  const survivors = [1, 3].map((id) => node(id, [1, 2, 3]));
  for (const m of survivors) m.step({ kind: 'evicted', node: 2, records: [L] });
  const [r1, r3] = survivors.map((m) => m.ready());
  t.deepEqual(r1!.journal, [{ lock: L, owner: 1 }], 'node 1 claims the record');
  t.true(wire(r1!).includes('join→3'), 'and sets off to acquire it');
  t.deepEqual(r3!.journal, []);
  t.deepEqual(wire(r3!), []);
});

test('without records, a survivor cleans what it saw the dead node acquire non-volatile', (t) => {
  const m = node(1, [2, 3]);
  const p2 = new Peer(2);
  toSharing(m, [[p2, 'sharing'], [new Peer(3), 'out']]);
  deliver(m, p2, p2.acquire(L, { nonVolatile: true }));
  m.step({ kind: 'revoked', lock: L });
  m.ready();
  t.is(m.owner(L), 2);
  m.step({ kind: 'evicted', node: 2 });
  const r = m.ready();
  t.deepEqual(r.journal, [{ lock: L, owner: 1 }]);
});

test('messages: stale or duplicated state messages never move a view backwards', (t) => {
  const m = node();
  const p2 = new Peer(2);
  toSharing(m, [[p2, 'joined'], [new Peer(3), 'out']]);
  const oldShare = p2.share();
  const unshare = p2.unshare();
  deliver(m, p2, unshare);
  deliver(m, p2, oldShare); // reordered: arrives after the newer unshare
  t.deepEqual(m.lists(L).alist, [], 'the older share does not put 2 back in the alist');
  deliver(m, p2, p2.share());
  t.deepEqual(m.lists(L).alist, [2]);
  const restarted = new Peer(2, 1);
  deliver(m, restarted, restarted.leave());
  t.deepEqual(m.lists(L).slist, [], 'a new incarnation replaces the old view');
  deliver(m, p2, p2.share()); // from the old incarnation: dropped
  t.deepEqual(m.lists(L).alist, []);
});

test('messages from strangers and about malformed oplocks are ignored; intents must name a valid oplock', (t) => {
  const m = node();
  const p9 = new Peer(9);
  t.deepEqual(wire(deliver(m, p9, p9.join())), []);
  t.throws(() => m.step({ kind: 'intent', lock: 'not a lock', want: 'share' }), { message: /malformed oplock id/ });
});

// ---------------------------------------------------------------- wire format

const GOOD: OplockMessage[] = [
  { type: 'join', lock: L, inc: 0, seq: 1, req: 1 },
  { type: 'leave', lock: L, inc: 0, seq: 2 },
  { type: 'share', lock: L, inc: 3, seq: 4, req: 4 },
  { type: 'unshare', lock: L, inc: 3, seq: 5 },
  { type: 'acquire', lock: 'vseg7.rmap[12]', inc: 1, seq: 9, req: 9, restrictive: false, nonVolatile: true },
  { type: 'release', lock: L, inc: 1, seq: 10 },
  { type: 'ack', lock: L, inc: 0, seq: 3, answers: 'acquire', req: 9, state: 'joined', dirty: true },
  { type: 'nak', lock: L, inc: 0, seq: 3, answers: 'share', req: 4, state: 'sharing' },
];

test('parser: every message kind survives a msgpack round trip', (t) => {
  const packr = new Packr({ useRecords: false });
  for (const m of GOOD) t.deepEqual(parseOplockMessage(packr.unpack(packr.pack(m))), m);
});

test('parser: extra fields are dropped, not passed on', (t) => {
  const parsed = parseOplockMessage({ ...GOOD[0], evil: true, __proto__: { polluted: 1 } });
  t.deepEqual(parsed, GOOD[0]);
});

const BAD: [string, unknown][] = [
  ['null', null],
  ['a number', 7],
  ['an array', [GOOD[0]]],
  ['unknown type', { ...GOOD[0], type: 'grant' }],
  ['missing type', { lock: L, inc: 0, seq: 1, req: 1 }],
  ['lock not a string', { ...GOOD[0], lock: 3 }],
  ['lock without index', { ...GOOD[0], lock: 'vseg7.rmap' }],
  ['lock with leading zero', { ...GOOD[0], lock: 'vseg7.rmap[01]' }],
  ['lock with spaces', { ...GOOD[0], lock: 'vseg 7.rmap[0]' }],
  ['lock too long', { ...GOOD[0], lock: `${'v'.repeat(65)}.rmap[0]` }],
  ['negative seq', { ...GOOD[0], seq: -1 }],
  ['fractional seq', { ...GOOD[0], seq: 1.5 }],
  ['huge seq', { ...GOOD[0], seq: 2 ** 60 }],
  ['NaN inc', { ...GOOD[0], inc: Number.NaN }],
  ['string inc', { ...GOOD[0], inc: '0' }],
  ['join without req', { type: 'join', lock: L, inc: 0, seq: 1 }],
  ['acquire without flags', { type: 'acquire', lock: L, inc: 0, seq: 1, req: 1 }],
  ['acquire with non-boolean restrictive', { ...GOOD[4], restrictive: 1 }],
  ['ack answering a release', { ...GOOD[6], answers: 'release' }],
  ['ack with unknown state', { ...GOOD[6], state: 'owner' }],
  ['ack without dirty', { type: 'ack', lock: L, inc: 0, seq: 3, answers: 'join', req: 1, state: 'out' }],
  ['nak without req', { type: 'nak', lock: L, inc: 0, seq: 3, answers: 'join', state: 'out' }],
];

for (const [what, frame] of BAD) {
  test(`parser rejects ${what}`, (t) => {
    const r = parseOplockMessage(frame);
    t.true('error' in r, JSON.stringify(r));
  });
}

// ---------------------------------------------------------------- oplock addresses (Fig. 26)

test('oplock ids are guid.luid[index]', (t) => {
  t.is(lockId('vol7', 'rmap', 3), 'vol7.rmap[3]');
  t.deepEqual(parseLockId('vol7.rmap[3]'), { guid: 'vol7', luid: 'rmap', index: 3 });
  t.is(parseLockId('vol7.rmap[-1]'), null);
  t.throws(() => lockId('vol.7', 'rmap', 0));
});

test('a variable extent takes every fixed-size chunk oplock it covers, to the lock boundaries (Fig. 26)', (t) => {
  const MiB = 1024 * 1024;
  const CHUNK = 32 * MiB;
  t.deepEqual(locksCovering('vseg1', 'rmap', 0, CHUNK, CHUNK), ['vseg1.rmap[0]']);
  t.deepEqual(locksCovering('vseg1', 'rmap', CHUNK - 512, 1024, CHUNK), ['vseg1.rmap[0]', 'vseg1.rmap[1]']);
  t.deepEqual(locksCovering('vseg1', 'rmap', 10 * MiB, 2 * CHUNK, CHUNK), ['vseg1.rmap[0]', 'vseg1.rmap[1]', 'vseg1.rmap[2]']);
  t.throws(() => locksCovering('vseg1', 'rmap', 0, 0, CHUNK));
});
