/**
 * The peer mesh over real TCP on 127.0.0.1 (ephemeral ports): authentication, ordered
 * exactly-once delivery across forced reconnects, request/response, liveness, and a
 * raw client sending what no mesh peer would. The pure parts (proofs, the handshake
 * machine, backoff) are tested first, without sockets.
 *
 * Meshes are started highest id first: a node dials only higher ids, so each node's
 * peers to dial are already listening (lower ids get a placeholder endpoint, unused).
 */
import test, { type ExecutionContext } from 'ava';
import fc from 'fast-check';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import pino from 'pino';

import {
  AUTH_MAX_FRAME_BYTES, MeshHandshake, NONCE_BYTES, computeProof, proofInput, verifyProof,
} from '../../cluster/mesh-auth.js';
import { Mesh, MeshError, reconnectDelayMs, type MeshOptions, type NodeId } from '../../cluster/mesh.js';
import { FrameParser, encodeFrame, type Frame } from '../../cluster/wire.js';
import { startMeshes, type MeshPeer } from '../helpers/mesh.js';

const HOST = '127.0.0.1';
const SECRET = 'test-cluster-secret';

// ── Pure: proofs, handshake, backoff ────────────────────────────────────────

const nonceA = Buffer.alloc(NONCE_BYTES, 0xa1);
const nonceB = Buffer.alloc(NONCE_BYTES, 0xb2);

test('proof input: context | ownNode u32 | peerNode u32 | peerNonce | ownNonce', (t) => {
  const input = proofInput({ ownNode: 1, peerNode: 0x0102_0304, ownNonce: nonceA, peerNonce: nonceB });
  t.is(input.length, 11 + 4 + 4 + 32 + 32);
  t.is(input.subarray(0, 11).toString('ascii'), 'dve-mesh-v1');
  t.is(input.readUInt32BE(11), 1);
  t.is(input.readUInt32BE(15), 0x0102_0304);
  t.true(input.subarray(19, 51).equals(nonceB));
  t.true(input.subarray(51, 83).equals(nonceA));
});

test('a proof verifies from the other side, and not with another secret, swapped ids or another nonce', (t) => {
  const secret = Buffer.from(SECRET);
  const proofBy1 = computeProof(secret, { ownNode: 1, peerNode: 2, ownNonce: nonceA, peerNonce: nonceB });
  t.is(proofBy1.length, 32);
  // Node 2 checks it from its side: own 2, peer 1, its nonce B, peer's nonce A.
  t.true(verifyProof(secret, { ownNode: 2, peerNode: 1, ownNonce: nonceB, peerNonce: nonceA }, proofBy1));
  t.false(verifyProof(Buffer.from('other'), { ownNode: 2, peerNode: 1, ownNonce: nonceB, peerNonce: nonceA }, proofBy1));
  t.false(verifyProof(secret, { ownNode: 1, peerNode: 2, ownNonce: nonceA, peerNonce: nonceB }, proofBy1), 'not reflectable');
  t.false(verifyProof(secret, { ownNode: 2, peerNode: 3, ownNonce: nonceB, peerNonce: nonceA }, proofBy1));
  t.false(verifyProof(secret, { ownNode: 2, peerNode: 1, ownNonce: Buffer.alloc(32, 9), peerNonce: nonceA }, proofBy1));
  t.false(verifyProof(secret, { ownNode: 2, peerNode: 1, ownNonce: nonceB, peerNonce: nonceA }, proofBy1.subarray(0, 31)));
});

function handshakePair(secret1: string, secret2: string): [MeshHandshake, MeshHandshake] {
  const h1 = new MeshHandshake({ secret: Buffer.from(secret1), self: 1, nonce: randomBytes(32), checkPeer: (n) => (n === 2 ? null : 'dialed 2') });
  const h2 = new MeshHandshake({ secret: Buffer.from(secret2), self: 2, nonce: randomBytes(32), checkPeer: (n) => (n === 1 ? null : 'not a peer') });
  return [h1, h2];
}

test('handshake machine: both sides authenticate with the same secret', (t) => {
  const [h1, h2] = handshakePair(SECRET, SECRET);
  const p1 = h1.onFrame('hello', h2.hello());
  const p2 = h2.onFrame('hello', h1.hello());
  if (p1.kind !== 'send' || p2.kind !== 'send') return t.fail('expected proofs');
  t.deepEqual(h1.onFrame('proof', p2.body), { kind: 'authenticated', peer: 2 });
  t.deepEqual(h2.onFrame('proof', p1.body), { kind: 'authenticated', peer: 1 });
});

test('handshake machine: refusals name what was wrong', (t) => {
  const refuse = (h: MeshHandshake, type: string, body: unknown): string => {
    const s = h.onFrame(type, body);
    return s.kind === 'refuse' ? s.reason : `not refused: ${s.kind}`;
  };
  const fresh = (): MeshHandshake => handshakePair(SECRET, SECRET)[1];
  t.regex(refuse(fresh(), 'proof', { proof: Buffer.alloc(32) }), /proof before hello/);
  t.regex(refuse(fresh(), 'msg', {}), /frame "msg" before authentication/);
  t.regex(refuse(fresh(), 'hello', { node: 7, nonce: nonceA }), /unexpected node id 7: not a peer/);
  t.regex(refuse(fresh(), 'hello', { node: 2, nonce: nonceA }), /own id 2/);
  t.regex(refuse(fresh(), 'hello', { node: 1, nonce: Buffer.alloc(31) }), /nonce is not 32 bytes/);
  t.regex(refuse(fresh(), 'hello', { node: '1', nonce: nonceA }), /node is not a u32/);
  t.regex(refuse(fresh(), 'hello', [1]), /hello body is not a map/);
  const h = fresh();
  h.onFrame('hello', { node: 1, nonce: nonceA });
  t.regex(refuse(h, 'proof', { proof: Buffer.alloc(32) }), /proof mismatch from node 1/);
  const [a, b] = handshakePair(SECRET, 'another secret');
  const pa = a.onFrame('hello', b.hello());
  b.onFrame('hello', a.hello());
  if (pa.kind !== 'send') return t.fail();
  t.regex(refuse(b, 'proof', pa.body), /proof mismatch/);
  t.regex(refuse(fresh(), 'hello', { node: 1, nonce: nonceA }) + '', /not refused: send/);
  t.deepEqual(fresh().onTimeout(), { kind: 'refuse', reason: 'authentication timed out' });
});

test('reconnect backoff: starts at the minimum, doubles, is capped and jittered', (t) => {
  t.is(reconnectDelayMs(0, 100, 5000, () => 1), 100);
  t.is(reconnectDelayMs(0, 100, 5000, () => 0), 100);
  t.is(reconnectDelayMs(3, 100, 5000, () => 1), 800);
  t.is(reconnectDelayMs(3, 100, 5000, () => 0), 400);
  t.is(reconnectDelayMs(20, 100, 5000, () => 1), 5000);
  t.is(reconnectDelayMs(1000, 100, 5000, () => 0), 2500);
  fc.assert(fc.property(fc.nat(100), fc.double({ min: 0, max: 1, noNaN: true }), (attempt, r) => {
    const d = reconnectDelayMs(attempt, 100, 5000, () => r);
    return d >= 100 && d <= 5000;
  }));
});

// ── Harness ─────────────────────────────────────────────────────────────────

interface LogLine {
  level: number;
  msg: string;
  node?: number;
  remote?: string;
  reason?: string;
  [k: string]: unknown;
}

function memoryLogger(): { log: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const log = pino({ level: 'debug', base: null }, { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) });
  return { log, lines };
}

interface Node {
  mesh: Mesh;
  lines: LogLine[];
  /** Messages received: [from, type, body]. */
  got: [NodeId, string, unknown][];
}

type Tuning = Partial<Omit<MeshOptions, 'nodeId' | 'listen' | 'peers' | 'log' | 'secret'>> & { secret?: string };

async function startNode(
  t: ExecutionContext, id: NodeId, peers: MeshPeer[], tuning: Tuning = {}, port = 0,
): Promise<Node> {
  const { log, lines } = memoryLogger();
  const mesh = new Mesh({
    heartbeatMs: 50, peerTimeoutMs: 1500, reconnectMaxMs: 400,
    ...tuning,
    nodeId: id, secret: tuning.secret ?? SECRET, listen: { host: HOST, port }, log,
    peers: peers.map((p) => ({ id: p.id, endpoint: { host: HOST, port: p.port } })),
  });
  const node: Node = { mesh, lines, got: [] };
  mesh.on('message', (from, type, body) => void node.got.push([from, type, body]));
  t.teardown(() => mesh.stop());
  await mesh.start();
  return node;
}

/** Starts ids (any order given) highest first, each knowing the ports of the higher ones. */
async function cluster(t: ExecutionContext, ids: NodeId[], tuning: Tuning = {}, extraPeers: NodeId[] = []): Promise<Map<NodeId, Node>> {
  return startMeshes(ids, (id, peers) => startNode(t, id, peers, tuning), { extraPeers });
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

function once<T extends unknown[]>(m: Mesh, event: 'peer-up' | 'peer-down' | 'refused', filter: (...a: T) => boolean, timeoutMs: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      m.off(event, on as never);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${event}`));
    }, timeoutMs);
    function on(...a: T): void {
      if (!filter(...a)) return;
      clearTimeout(timer);
      m.off(event, on as never);
      resolve(a);
    }
    m.on(event, on as never);
  });
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}

// ── Connect and exchange ────────────────────────────────────────────────────

test.serial('3 meshes connect (lower id dials) and exchange messages in order', async (t) => {
  const nodes = await cluster(t, [1, 2, 3]);
  for (const [id, n] of nodes) {
    for (const [peer, m] of nodes) {
      if (peer === id) continue;
      t.true(n.mesh.isUp(peer));
      // The dialer's connection is outbound to the peer's listen port.
      if (id < peer) t.is(n.mesh.peerSocket(peer)!.remotePort, m.mesh.port);
      else t.is(n.mesh.peerSocket(peer)!.localPort, n.mesh.port);
    }
  }
  const N = 200;
  for (const [id, n] of nodes) {
    for (const peer of nodes.keys()) if (peer !== id) for (let i = 1; i <= N; i++) t.true(n.mesh.send(peer, 'seq', { from: id, i }));
  }
  await waitFor(() => [...nodes.values()].every((n) => n.got.length === 2 * N), 5000, 'all messages');
  for (const [id, n] of nodes) {
    for (const from of nodes.keys()) {
      if (from === id) continue;
      const seen = n.got.filter(([f]) => f === from).map(([, type, b]) => {
        t.is(type, 'seq');
        t.is((b as { from: number }).from, from);
        return (b as { i: number }).i;
      });
      t.deepEqual(seen, range(1, N), `node ${id} from ${from}`);
    }
  }
  // Acks empty the queues.
  await waitFor(() => [...nodes].every(([id, n]) => [...nodes.keys()].every((p) => p === id || n.mesh.queued(p) === 0)), 2000, 'queues drained');
  t.true(nodes.get(1)!.lines.some((l) => l.msg === 'peer up' && l.peer === 3));
});

test.serial('request/response both ways; error replies, throwing and missing handlers, timeouts', async (t) => {
  const nodes = await cluster(t, [1, 2]);
  const m1 = nodes.get(1)!.mesh;
  const m2 = nodes.get(2)!.mesh;
  for (const m of [m1, m2]) {
    m.on('message', (from, type, body, c) => {
      if (type === 'echo') m.reply(from, c, { echoed: body, by: m.nodeId });
      if (type === 'fail') m.replyError(from, c, 'ENOSPC', 'no space for that');
      if (type === 'throw') throw new Error('handler exploded');
    });
  }
  t.deepEqual(await m1.request(2, 'echo', { x: 1 }, 2000), { echoed: { x: 1 }, by: 2 });
  t.deepEqual(await m2.request(1, 'echo', 'from the acceptor side', 2000), { echoed: 'from the acceptor side', by: 1 });
  const many = await Promise.all(range(1, 100).map((i) => m1.request(2, 'echo', i, 2000)));
  t.deepEqual(many.map((r) => (r as { echoed: number }).echoed), range(1, 100));

  const failed = await t.throwsAsync(m1.request(2, 'fail', null, 2000), { instanceOf: MeshError });
  t.is(failed.code, 'EREMOTE');
  t.is(failed.remoteCode, 'ENOSPC');
  t.regex(failed.message, /no space for that/);

  const threw = await t.throwsAsync(m1.request(2, 'throw', null, 2000), { instanceOf: MeshError });
  t.is(threw.remoteCode, 'EHANDLER');
  t.true(nodes.get(2)!.lines.some((l) => l.msg === 'mesh message handler threw'));

  const silent = await t.throwsAsync(m1.request(2, 'ignored', null, 150), { instanceOf: MeshError });
  t.is(silent.code, 'ETIMEDOUT');

  // Still serving after all that.
  t.deepEqual(await m1.request(2, 'echo', 'still here', 2000), { echoed: 'still here', by: 2 });
  t.throws(() => m1.send(9, 'x', null), { instanceOf: RangeError });
  const big = await t.throwsAsync(m1.request(2, 'echo', Buffer.alloc(5 * 1024 * 1024), 1000), { instanceOf: MeshError });
  t.is(big.code, 'EMSGSIZE');
});

test.serial('a request to a node with no message listener is answered ENOHANDLER', async (t) => {
  const nodes = await cluster(t, [1, 2]);
  nodes.get(2)!.mesh.removeAllListeners('message');
  const err = await t.throwsAsync(nodes.get(1)!.mesh.request(2, 'anything', null, 2000), { instanceOf: MeshError });
  t.is(err.remoteCode, 'ENOHANDLER');
});

// ── Authentication ──────────────────────────────────────────────────────────

test.serial('a peer with the wrong secret is refused, and both sides log the address and reason', async (t) => {
  const n2 = await startNode(t, 2, [{ id: 1, port: 0 }], { secret: 'right' });
  const refused2 = once<[string, string]>(n2.mesh, 'refused', () => true, 3000);
  const n1 = await startNode(t, 1, [{ id: 2, port: n2.mesh.port }], { secret: 'wrong' });
  const refused1 = once<[string, string]>(n1.mesh, 'refused', () => true, 3000);
  const [addr1, reason1] = await refused1;
  const [addr2, reason2] = await refused2;
  t.is(addr1, `${HOST}:${n2.mesh.port}`);
  t.regex(addr2, /^127\.0\.0\.1:\d+$/);
  t.regex(reason1, /proof mismatch from node 2/);
  t.regex(reason2, /proof mismatch from node 1/);
  for (const [n, addr, reason] of [[n1, addr1, reason1], [n2, addr2, reason2]] as const) {
    const line = n.lines.find((l) => l.msg === 'mesh connection refused');
    t.truthy(line);
    t.is(line!.remote, addr);
    t.is(line!.reason, reason);
  }
  t.false(n1.mesh.isUp(2));
  t.false(n2.mesh.isUp(1));
  t.true(n1.mesh.send(2, 'queued', 1), 'sends queue while the peer is unreachable');
  t.is(n2.got.length, 0);
});

// ── Reliability ─────────────────────────────────────────────────────────────

test.serial('1000 numbered messages across forced reconnects arrive exactly once, in order', async (t) => {
  const nodes = await cluster(t, [1, 2], { heartbeatMs: 50, peerTimeoutMs: 2000 });
  const m1 = nodes.get(1)!.mesh;
  const m2 = nodes.get(2)!.mesh;
  const got: number[] = [];
  const downs: unknown[] = [];
  m1.on('peer-down', (p) => downs.push(p));
  m2.on('peer-down', (p) => downs.push(p));
  let killedInHandler = false;
  m2.on('message', (_from, type, body) => {
    if (type !== 'n') return;
    const n = (body as { n: number }).n;
    got.push(n);
    // Receiver side: drop the connection right after delivering, before the ack goes out.
    if (n === 500 && !killedInHandler) {
      killedInHandler = true;
      m2.peerSocket(1)!.destroy();
    }
  });
  const resumes = (): number => nodes.get(1)!.lines.filter((l) => l.msg === 'mesh connection resumed').length;

  // 1. Dialer side, before the corked burst is even flushed: all 300 are lost on the wire.
  for (let n = 1; n <= 300; n++) t.true(m1.send(2, 'n', { n }));
  m1.peerSocket(2)!.destroy();
  for (let n = 301; n <= 400; n++) t.true(m1.send(2, 'n', { n }));
  await waitFor(() => got.length >= 100 && resumes() >= 1, 3000, 'delivery after the first reconnect');
  // 2. The receiver drops the connection at 500 (see the handler).
  for (let n = 401; n <= 700; n++) t.true(m1.send(2, 'n', { n }));
  await waitFor(() => resumes() >= 2 && m1.peerSocket(2) !== null, 3000, 'the second reconnect');
  // 3. Sender side again, once the burst has left the process: frames in flight are lost.
  for (let n = 701; n <= 1000; n++) t.true(m1.send(2, 'n', { n }));
  await new Promise((r) => setImmediate(r));
  m1.peerSocket(2)?.destroy();
  await waitFor(() => got.length >= 1000, 5000, '1000 messages');
  await sleep(200); // let any duplicate show itself
  t.is(got.length, 1000);
  t.deepEqual(got, range(1, 1000));
  t.true(killedInHandler);
  t.true(resumes() >= 3, `${resumes()} resumes`);
  const resent = nodes.get(1)!.lines.filter((l) => l.msg === 'mesh connection resumed').map((l) => l.resent as number);
  t.true(resent[0]! >= 300, `the first reconnect resent ${resent[0]} frames`);
  await waitFor(() => m1.queued(2) === 0, 2000, 'all acknowledged');
  t.deepEqual(downs, [], 'a quick reconnect is not a peer-down');
});

test.serial('sends while the peer is down are queued and delivered when it returns; the queue is bounded', async (t) => {
  const n2 = await startNode(t, 2, [{ id: 1, port: 0 }]);
  const port2 = n2.mesh.port;
  await n2.mesh.stop();
  const n1 = await startNode(t, 1, [{ id: 2, port: port2 }], { maxQueueFrames: 50 });
  for (let i = 1; i <= 50; i++) t.true(n1.mesh.send(2, 'early', i));
  t.false(n1.mesh.send(2, 'early', 51), 'the 51st does not fit');
  await t.throwsAsync(n1.mesh.request(2, 'x', null, 1000), { instanceOf: MeshError, message: /queue is full/ });
  const n2b = await startNode(t, 2, [{ id: 1, port: 0 }], {}, port2);
  await waitFor(() => n2b.got.length === 50, 3000, 'queued messages delivered');
  t.deepEqual(n2b.got.map(([, , b]) => b), range(1, 50));
});

// ── Liveness ────────────────────────────────────────────────────────────────

test.serial('peer-down fires after peerTimeoutMs when a peer stops; peer-up when it returns', async (t) => {
  const PEER_TIMEOUT_MS = 400;
  const tuning: Tuning = { heartbeatMs: 50, peerTimeoutMs: PEER_TIMEOUT_MS, reconnectMaxMs: 300 };
  const nodes = await cluster(t, [1, 2, 3], tuning);
  const m1 = nodes.get(1)!.mesh;
  const m3 = nodes.get(3)!.mesh;
  const port2 = nodes.get(2)!.mesh.port;

  const down1 = once<[NodeId, string]>(m1, 'peer-down', (p) => p === 2, 3000);
  const down3 = once<[NodeId, string]>(m3, 'peer-down', (p) => p === 2, 3000);
  const stoppedAt = Date.now();
  await nodes.get(2)!.mesh.stop();
  const [[, reason1]] = await Promise.all([down1, down3]);
  const elapsed = Date.now() - stoppedAt;
  t.true(elapsed >= PEER_TIMEOUT_MS - 60, `peer-down after ${elapsed} ms`);
  t.true(elapsed < PEER_TIMEOUT_MS + 1000, `peer-down after ${elapsed} ms`);
  t.regex(reason1, /no heartbeat for \d+ ms/);
  t.false(m1.isUp(2));
  t.true(m1.isUp(3), 'the others stay up');
  t.true(m1.send(2, 'while-down', 'hello again'));

  // A new process for node 2 on the same port: node 1 redials it, it dials node 3.
  const up1 = once<[NodeId]>(m1, 'peer-up', (p) => p === 2, 3000);
  const up3 = once<[NodeId]>(m3, 'peer-up', (p) => p === 2, 3000);
  const n2 = await startNode(t, 2, [{ id: 1, port: 0 }, { id: 3, port: m3.port }], tuning, port2);
  await Promise.all([up1, up3]);
  await waitFor(() => n2.mesh.isUp(1) && n2.mesh.isUp(3), 2000, 'new node 2 sees both');
  await waitFor(() => n2.got.length === 1, 2000, 'the message queued while down');
  t.deepEqual(n2.got, [[1, 'while-down', 'hello again']]);
  // Sequence numbers restart with the new incarnation: nothing of its is taken for a duplicate.
  n2.mesh.send(3, 'fresh', 1);
  await waitFor(() => nodes.get(3)!.got.some(([f, type]) => f === 2 && type === 'fresh'), 2000, 'message from the new node 2');
  t.pass();
});

// ── Hostile input ───────────────────────────────────────────────────────────

interface Raw {
  socket: net.Socket;
  frames: Frame[];
  closed: Promise<void>;
}

function rawConnect(port: number): Promise<Raw> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: HOST, port });
    const frames: Frame[] = [];
    const parser = new FrameParser({ onFrame: (f) => void frames.push(f), onError: () => {} });
    socket.on('data', (d) => parser.push(d));
    socket.on('error', () => {});
    const closed = new Promise<void>((r) => socket.once('close', () => r()));
    socket.once('connect', () => resolve({ socket, frames, closed }));
    socket.once('error', reject);
  });
}

async function expectClosed(t: ExecutionContext, raw: Raw, what: string): Promise<void> {
  const timeout = sleep(3000).then(() => 'timeout');
  t.is(await Promise.race([raw.closed.then(() => 'closed'), timeout]), 'closed', `${what}: the mesh closes the connection`);
}

function lengthPrefixed(payload: Buffer): Buffer {
  const h = Buffer.alloc(4);
  h.writeUInt32BE(payload.length, 0);
  return Buffer.concat([h, payload]);
}

test.serial('fuzz: garbage, oversized frames and frames without auth close only that connection', async (t) => {
  // Node 0 is configured on node 2 but never runs: the raw client impersonates it (knowing the secret).
  const nodes = await cluster(t, [1, 2], { authTimeoutMs: 500, maxFrameBytes: 64 * 1024 }, [0]);
  const n2 = nodes.get(2)!;
  const m1 = nodes.get(1)!.mesh;
  const m2 = n2.mesh;
  const refusals: string[] = [];
  m2.on('refused', (_addr, reason) => refusals.push(reason));
  const downs: unknown[] = [];
  m1.on('peer-down', (p) => downs.push(p));
  m2.on('peer-down', (p) => downs.push(p));

  const cases: [string, Buffer | null, RegExp][] = [
    ['HTTP request', Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), /framing error: frame length \d+ exceeds the maximum 1024/],
    ['length 0xffffffff', Buffer.from([0xff, 0xff, 0xff, 0xff]), /exceeds the maximum/],
    ['valid length, invalid msgpack', lengthPrefixed(Buffer.from([0xc1, 0xc1, 0xc1])), /framing error: payload/],
    ['wrong version', lengthPrefixed(Buffer.from([0x83, 0xa1, 0x76, 0x07, 0xa1, 0x74, 0xa1, 0x78, 0xa1, 0x63, 0x00])), /protocol version 7/],
    ['msg without auth', encodeFrame({ t: 'msg', c: 0, b: { s: 1, t: 'x', d: null } }), /frame "msg" before authentication/],
    ['sync without auth', encodeFrame({ t: 'sync', c: 0, b: {} }), /frame "sync" before authentication/],
    ['proof without hello', encodeFrame({ t: 'proof', c: 0, b: { proof: Buffer.alloc(32) } }), /proof before hello/],
    ['hello from an unknown node', encodeFrame({ t: 'hello', c: 0, b: { node: 99, nonce: randomBytes(32) } }), /unexpected node id 99: not a configured peer/],
    ['hello as node 1, then a forged proof', Buffer.concat([
      encodeFrame({ t: 'hello', c: 0, b: { node: 1, nonce: randomBytes(32) } }),
      encodeFrame({ t: 'proof', c: 0, b: { proof: randomBytes(32) } }),
    ]), /proof mismatch from node 1/],
    ['an auth frame over the pre-auth limit', encodeFrame({ t: 'hello', c: 0, b: { node: 1, nonce: randomBytes(32), pad: 'p'.repeat(AUTH_MAX_FRAME_BYTES) } }), /exceeds the maximum 1024/],
    ['silence', null, /authentication timed out/],
  ];
  for (const [what, bytes, reason] of cases) {
    const raw = await rawConnect(m2.port);
    if (bytes) raw.socket.write(bytes);
    await expectClosed(t, raw, what);
    t.regex(refusals.at(-1) ?? '', reason, what);
    t.true(raw.frames.every((f) => f.t === 'hello' || f.t === 'proof'), `${what}: only authentication frames were sent`);
  }
  {
    // Node 1 dials node 2, never the other way round.
    const refused1 = once<[string, string]>(m1, 'refused', () => true, 3000);
    const raw = await rawConnect(m1.port);
    raw.socket.write(encodeFrame({ t: 'hello', c: 0, b: { node: 2, nonce: randomBytes(32) } }));
    await expectClosed(t, raw, 'hello to the dialer');
    t.regex((await refused1)[1], /unexpected node id 2: node 2 has the higher id, so this node dials it/);
  }

  // Random bytes (fast-check): whatever they are, only that connection is affected.
  await fc.assert(fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 256 }), async (bytes) => {
    const raw = await rawConnect(m2.port);
    raw.socket.end(Buffer.from(bytes));
    await raw.closed;
  }), { numRuns: 15 });

  // Authenticated (as node 0), then protocol violations: those close too.
  const afterAuth: [string, (peerHello: Frame) => Buffer[], RegExp][] = [
    ['unknown frame type', () => [encodeFrame({ t: 'bogus', c: 0, b: null })], /unknown frame type "bogus"/],
    ['a sequence gap', () => [encodeFrame({ t: 'msg', c: 0, b: { s: 5, t: 'x', d: null } })], /sequence gap: expected 1, got 5/],
    ['a malformed msg', () => [encodeFrame({ t: 'msg', c: 0, b: { s: 'one' } })], /malformed msg/],
    ['an ack beyond what was sent', () => [encodeFrame({ t: 'ack', c: 0, b: { a: 1e6 } })], /bad acknowledgement/],
    ['a frame over maxFrameBytes', () => [encodeFrame({ t: 'msg', c: 0, b: { s: 1, t: 'x', d: Buffer.alloc(65 * 1024) } })], /exceeds the maximum 65536/],
    ['a second hello', () => [encodeFrame({ t: 'hello', c: 0, b: { node: 0, nonce: randomBytes(32) } })], /unknown frame type "hello"/],
  ];
  for (const [what, frames, reason] of afterAuth) {
    const raw = await rawConnect(m2.port);
    await waitFor(() => raw.frames.length >= 1, 2000, 'hello from the mesh');
    const hello = raw.frames[0]!;
    const nonce = randomBytes(32);
    const peerNonce = (hello.b as { nonce: Buffer }).nonce;
    raw.socket.write(encodeFrame({ t: 'hello', c: 0, b: { node: 0, nonce } }));
    raw.socket.write(encodeFrame({
      t: 'proof', c: 0,
      b: { proof: computeProof(Buffer.from(SECRET), { ownNode: 0, peerNode: 2, ownNonce: nonce, peerNonce }) },
    }));
    await waitFor(() => raw.frames.some((f) => f.t === 'sync'), 2000, `${what}: sync from the mesh`);
    raw.socket.write(encodeFrame({ t: 'sync', c: 0, b: { i: 'raw', k: '', a: 0, n: 1 } }));
    await waitFor(() => m2.isUp(0), 2000, `${what}: node 0 up`);
    for (const b of frames(hello)) raw.socket.write(b);
    await expectClosed(t, raw, what);
    const line = n2.lines.filter((l) => l.msg === 'mesh protocol error; closing connection').at(-1);
    t.regex(line?.reason ?? '', reason, what);
  }

  // The real peers never noticed.
  t.deepEqual(downs.filter((p) => p !== 0), []);
  t.true(m1.isUp(2) && m2.isUp(1));
  t.true(m1.send(2, 'after-fuzz', 1));
  m2.on('message', (from, type, _b, c) => {
    if (type === 'ping') m2.reply(from, c, 'pong');
  });
  t.is(await m1.request(2, 'ping', null, 2000), 'pong');
  await waitFor(() => n2.got.some(([f, type]) => f === 1 && type === 'after-fuzz'), 2000, 'message after fuzz');
  // Every refusal was logged with the client's address.
  for (const l of n2.lines.filter((x) => x.msg === 'mesh connection refused')) t.regex(l.remote ?? '', /^127\.0\.0\.1:\d+$/);
});

test.serial('listen port 0 binds an ephemeral port, exposed as mesh.port', async (t) => {
  const n = await startNode(t, 5, []);
  t.true(n.mesh.port > 0);
  await t.throwsAsync(startNode(t, 6, [], {}, n.mesh.port), { code: 'EADDRINUSE' });
});
