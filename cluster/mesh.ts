/**
 * The peer mesh: one authenticated TCP connection per pair of node processes, carrying
 * ordered, reliable, exactly-once messages and request/response between them.
 *
 * Topology. For every pair, the node with the LOWER id dials and the node with the
 * higher id accepts; an inbound hello from a node this side is supposed to dial is
 * refused. So there is never a simultaneous-open race to settle, and a reconnect
 * always comes from the same side. The dialer retries with exponential backoff
 * (`reconnectMinMs` … `reconnectMaxMs`, 100 ms … 5 s by default, jittered) while it
 * has no connection; the acceptor, on a second authenticated connection from the
 * same peer, keeps the new one and closes the old (half-dead) one.
 *
 * Connection phases (one `Conn`):
 *   auth   hello/proof, see mesh-auth.ts; frames limited to AUTH_MAX_FRAME_BYTES;
 *          anything else, or a timeout (`authTimeoutMs`), → refused (logged with the
 *          peer's address, `refused` event)
 *   sync   each side sends sync { i: its incarnation, k: the peer incarnation its `a`
 *          refers to, a: last sequence number it delivered from the peer, n: the first
 *          sequence number it is about to (re)send }
 *   ready  data frames both ways, heartbeats, acks
 *
 * Reliability. Every data frame (`msg`, `res`) carries a per-peer sequence number `s`
 * (1, 2, …) and stays encoded in the peer's queue until the peer acknowledges it (a
 * cumulative `a` in `ack`, sent once per event-loop turn that delivered something,
 * and in every heartbeat). On a new connection the queue is trimmed to what the
 * peer's sync says it has, and the rest is resent in order; the receiver delivers
 * `s === last + 1`, drops `s <= last` as a duplicate, and treats a gap as a protocol
 * error (that connection is closed; the resend on the next one fills it). Each Mesh
 * instance has a random incarnation: when a peer's changes (the process restarted),
 * its receive state starts afresh and `peer-down` (reason "peer restarted") is
 * followed by `peer-up`. So delivery is exactly-once and in order for as long as both
 * processes live; across a restart, frames the dead process had not acknowledged are
 * resent to the new one, and what the dead one had received is gone with it.
 *
 * Liveness. A ready connection sends `hb` every `heartbeatMs`; a peer that was up and
 * sent nothing for `peerTimeoutMs` is `peer-down`, and its connection is closed. A
 * connection that merely drops does not make the peer down: if the dialer is back
 * within `peerTimeoutMs`, the peer never went down and nothing was lost.
 *
 * Hostile input. A peer's bytes go through FrameParser; garbage, an oversized frame,
 * a frame before authentication, an unknown frame type, a malformed body or a
 * sequence gap closes that connection with a log line and nothing else. Listener
 * exceptions are caught and logged (a request whose handler threw is answered with
 * EHANDLER). `send` writes straight to the socket (no delay, corked per tick so a
 * burst of frames leaves in few segments).
 *
 * Wire types: hello, proof (mesh-auth.ts); sync, hb, ack; msg { s, t, d } (c ≠ 0: a
 * request); res { s, d } | { s, e: { code, message } } (c: the request's).
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';

import type { Endpoint } from '../src/config/config.js';
import {
  AUTH_HELLO, AUTH_MAX_FRAME_BYTES, MeshHandshake, NONCE_BYTES, isNodeId, type NodeId,
} from './mesh-auth.js';
import {
  CORRELATION_MAX, DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_BYTES, FrameParser, describe, encodeFrame, isCorrelationId,
  type Frame,
} from './wire.js';

export type { NodeId } from './mesh-auth.js';

export const T_SYNC = 'sync';
export const T_HEARTBEAT = 'hb';
export const T_ACK = 'ack';
export const T_MSG = 'msg';
export const T_RES = 'res';

/** After refusing, the socket is ended (so the peer reads why) and destroyed if it lingers this long. */
const END_GRACE_MS = 1000;
const INCARNATION_MAX_CHARS = 64;

export interface MeshPeer {
  id: NodeId;
  /** Where this node dials the peer; used only when this node's id is the lower one. */
  endpoint: Endpoint;
}

export interface MeshOptions {
  nodeId: NodeId;
  /** The cluster secret; the same on every node. */
  secret: string | Uint8Array;
  /** Port 0 binds an ephemeral port; read it from `mesh.port` after `start()`. */
  listen: Endpoint;
  peers: readonly MeshPeer[];
  log: Logger;
  heartbeatMs?: number;
  peerTimeoutMs?: number;
  /** Largest frame payload sent or accepted once authenticated (default 4 MiB). */
  maxFrameBytes?: number;
  /** Time a new connection has to connect, authenticate and sync (default peerTimeoutMs). */
  authTimeoutMs?: number;
  /** Per peer: frames held (unsent or unacknowledged) before `send` returns false (default 10000). */
  maxQueueFrames?: number;
  /** Per peer: bytes held before `send` returns false (default 64 MiB). */
  maxQueueBytes?: number;
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** Inbound connections allowed in the auth phase at once (default 32). */
  maxPendingConnections?: number;
}

export type MeshErrorCode = 'ETIMEDOUT' | 'EQUEUEFULL' | 'EMSGSIZE' | 'ESTOPPED' | 'EREMOTE';

export class MeshError extends Error {
  /** For EREMOTE: the code the peer answered with (e.g. EHANDLER, ENOHANDLER, or an application code). */
  readonly remoteCode: string | undefined;
  constructor(readonly code: MeshErrorCode, message: string, remoteCode?: string) {
    super(message);
    this.name = 'MeshError';
    this.remoteCode = remoteCode;
  }
}

export interface MeshEvents {
  /** `correlationId` is 0 for `send`; otherwise answer with `reply`/`replyError`. */
  message: [peer: NodeId, type: string, body: unknown, correlationId: number];
  'peer-up': [peer: NodeId];
  'peer-down': [peer: NodeId, reason: string];
  refused: [address: string, reason: string];
}

/** Exponential backoff with jitter: attempt 0 → minMs, then up to min(maxMs, minMs·2^attempt), drawn from its upper half. */
export function reconnectDelayMs(attempt: number, minMs: number, maxMs: number, random: () => number = Math.random): number {
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  return Math.max(minMs, Math.round(ceiling * (0.5 + 0.5 * random())));
}

interface Outbound {
  seq: number;
  bytes: Buffer;
}

/** FIFO of encoded data frames awaiting acknowledgement; O(1) at both ends. */
class OutQueue {
  private items: Outbound[] = [];
  private head = 0;
  bytes = 0;

  get length(): number {
    return this.items.length - this.head;
  }

  get first(): Outbound | undefined {
    return this.items[this.head];
  }

  push(o: Outbound): void {
    this.items.push(o);
    this.bytes += o.bytes.length;
  }

  /** Drops every frame with seq ≤ `ack`. */
  trim(ack: number): void {
    while (this.head < this.items.length && this.items[this.head]!.seq <= ack) {
      this.bytes -= this.items[this.head]!.bytes.length;
      this.items[this.head] = undefined as unknown as Outbound;
      this.head++;
    }
    if (this.head === this.items.length) {
      this.items = [];
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
  }

  *[Symbol.iterator](): IterableIterator<Outbound> {
    for (let i = this.head; i < this.items.length; i++) yield this.items[i]!;
  }
}

interface PeerState {
  readonly id: NodeId;
  readonly endpoint: Endpoint;
  /** This node dials the peer (this node's id is lower). */
  readonly dialer: boolean;
  readonly log: Logger;
  /** The authenticated connection (sync or ready), if any. */
  conn: Conn | null;
  /** The outbound connection still authenticating, if any. */
  dialing: Conn | null;
  dialTimer: NodeJS.Timeout | null;
  attempt: number;
  up: boolean;
  lastHeardMs: number;
  /** The peer incarnation `recvSeq` counts in; null before the first sync. */
  peerInc: string | null;
  /** Last sequence number delivered from the peer. */
  recvSeq: number;
  nextSeq: number;
  readonly out: OutQueue;
  ackScheduled: boolean;
}

type ConnState = 'auth' | 'sync' | 'ready' | 'closed';

interface Conn {
  state: ConnState;
  readonly socket: net.Socket;
  /** host:port of the other end. */
  readonly address: string;
  /** For an outbound connection, the peer dialed. */
  readonly target: PeerState | null;
  /** Set once authenticated. */
  peer: PeerState | null;
  readonly handshake: MeshHandshake;
  readonly parser: FrameParser;
  readonly deadlineMs: number;
  log: Logger;
  connected: boolean;
  corked: boolean;
  detached: boolean;
  errorCode: string | null;
}

interface PendingRequest {
  peer: NodeId;
  type: string;
  resolve(body: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

type MeshState = 'new' | 'running' | 'stopped';

export class Mesh extends EventEmitter<MeshEvents> {
  readonly nodeId: NodeId;
  /** Random per instance: lets peers tell a restarted process from a reconnect. */
  readonly incarnation = randomBytes(8).toString('hex');
  private readonly secret: Buffer;
  private readonly listenAt: Endpoint;
  private readonly log: Logger;
  private readonly heartbeatMs: number;
  private readonly peerTimeoutMs: number;
  private readonly maxFrameBytes: number;
  private readonly authTimeoutMs: number;
  private readonly maxQueueFrames: number;
  private readonly maxQueueBytes: number;
  private readonly reconnectMinMs: number;
  private readonly reconnectMaxMs: number;
  private readonly maxPendingConnections: number;
  private readonly peers = new Map<NodeId, PeerState>();
  private readonly conns = new Set<Conn>();
  private readonly sockets = new Set<net.Socket>();
  private readonly pending = new Map<number, PendingRequest>();
  private state: MeshState = 'new';
  private server: net.Server | null = null;
  private boundPort = 0;
  private ticker: NodeJS.Timeout | null = null;
  private lastCorrelation = 0;

  constructor(opts: MeshOptions) {
    super();
    if (!isNodeId(opts.nodeId)) throw new RangeError(`Mesh: nodeId ${String(opts.nodeId)} is not a u32 node id`);
    this.nodeId = opts.nodeId;
    this.secret = typeof opts.secret === 'string' ? Buffer.from(opts.secret, 'utf8') : Buffer.from(opts.secret);
    if (this.secret.length === 0) throw new RangeError('Mesh: the cluster secret is empty');
    this.listenAt = opts.listen;
    this.log = opts.log.child({ component: 'mesh', node: opts.nodeId });
    this.heartbeatMs = positive('heartbeatMs', opts.heartbeatMs ?? 500);
    this.peerTimeoutMs = positive('peerTimeoutMs', opts.peerTimeoutMs ?? 3000);
    if (this.peerTimeoutMs <= this.heartbeatMs) throw new RangeError('Mesh: peerTimeoutMs must exceed heartbeatMs');
    this.maxFrameBytes = positive('maxFrameBytes', opts.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES);
    this.authTimeoutMs = positive('authTimeoutMs', opts.authTimeoutMs ?? this.peerTimeoutMs);
    this.maxQueueFrames = positive('maxQueueFrames', opts.maxQueueFrames ?? 10_000);
    this.maxQueueBytes = positive('maxQueueBytes', opts.maxQueueBytes ?? 64 * 1024 * 1024);
    this.reconnectMinMs = positive('reconnectMinMs', opts.reconnectMinMs ?? 100);
    this.reconnectMaxMs = positive('reconnectMaxMs', opts.reconnectMaxMs ?? 5000);
    this.maxPendingConnections = positive('maxPendingConnections', opts.maxPendingConnections ?? 32);
    for (const p of opts.peers) {
      if (!isNodeId(p.id)) throw new RangeError(`Mesh: peer id ${String(p.id)} is not a u32 node id`);
      if (p.id === this.nodeId) throw new RangeError(`Mesh: node ${p.id} is listed as its own peer`);
      if (this.peers.has(p.id)) throw new RangeError(`Mesh: peer ${p.id} is listed twice`);
      this.peers.set(p.id, {
        id: p.id, endpoint: p.endpoint, dialer: this.nodeId < p.id, log: this.log.child({ peer: p.id }),
        conn: null, dialing: null, dialTimer: null, attempt: 0, up: false, lastHeardMs: 0,
        peerInc: null, recvSeq: 0, nextSeq: 1, out: new OutQueue(), ackScheduled: false,
      });
    }
  }

  /** The bound port (after `start()`). */
  get port(): number {
    return this.boundPort;
  }

  isUp(peer: NodeId): boolean {
    return this.peerState(peer).up;
  }

  /** Frames held for the peer: not yet sent or not yet acknowledged. */
  queued(peer: NodeId): number {
    return this.peerState(peer).out.length;
  }

  /** The socket of the peer's authenticated connection, for diagnostics and fault-injection tests. */
  peerSocket(peer: NodeId): net.Socket | null {
    return this.peerState(peer).conn?.socket ?? null;
  }

  async start(): Promise<void> {
    if (this.state !== 'new') throw new Error(`Mesh.start: the mesh is ${this.state}`);
    const server = net.createServer(socket => this.onAccept(socket));
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ host: this.listenAt.host, port: this.listenAt.port }, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } catch (err) {
      this.state = 'stopped';
      throw err;
    }
    server.on('error', err => this.log.error({ err }, 'mesh listener error'));
    this.server = server;
    this.boundPort = (server.address() as net.AddressInfo).port;
    this.state = 'running';
    this.ticker = setInterval(() => this.onTick(), this.heartbeatMs);
    this.log.info({ listen: `${this.listenAt.host}:${this.boundPort}`, peers: [...this.peers.keys()] }, 'mesh started');
    for (const ps of this.peers.values()) if (ps.dialer) this.dial(ps);
  }

  /** Closes every connection and the listener; pending requests fail with ESTOPPED. Final: a stopped mesh does not restart. */
  async stop(): Promise<void> {
    if (this.state === 'stopped') return;
    this.state = 'stopped';
    if (this.ticker) clearInterval(this.ticker);
    this.ticker = null;
    for (const ps of this.peers.values()) {
      if (ps.dialTimer) clearTimeout(ps.dialTimer);
      ps.dialTimer = null;
    }
    for (const conn of [...this.conns]) this.closeConn(conn, 'destroy');
    for (const s of this.sockets) s.destroy();
    for (const [c, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(c);
      p.reject(new MeshError('ESTOPPED', `request ${p.type} to node ${p.peer}: the mesh stopped`));
    }
    const server = this.server;
    this.server = null;
    if (server) await new Promise<void>(resolve => server.close(() => resolve()));
    this.log.info('mesh stopped');
  }

  /**
   * Queues `body` for `peer` (sent at once if connected). False if the peer's queue is
   * full or the mesh has stopped. Throws for an unknown peer, a bad type, or a message
   * larger than maxFrameBytes (MeshError EMSGSIZE).
   */
  send(peer: NodeId, type: string, body: unknown): boolean {
    const ps = this.peerState(peer);
    checkType(type);
    return this.enqueue(ps, T_MSG, 0, s => ({ s, t: type, d: body }));
  }

  /** Sends a request; resolves with the peer's `reply` body. Rejects with MeshError (ETIMEDOUT, EQUEUEFULL, EMSGSIZE, ESTOPPED, EREMOTE). */
  request(peer: NodeId, type: string, body: unknown, timeoutMs: number): Promise<unknown> {
    const ps = this.peerState(peer);
    checkType(type);
    if (!(timeoutMs > 0)) throw new RangeError(`Mesh.request: timeoutMs must be positive, got ${timeoutMs}`);
    if (this.state === 'stopped') return Promise.reject(new MeshError('ESTOPPED', `request ${type} to node ${peer}: the mesh stopped`));
    const c = this.allocCorrelation();
    return new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(c);
        reject(new MeshError('ETIMEDOUT', `request ${type} to node ${peer}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(c, { peer, type, resolve, reject, timer });
      const fail = (err: Error): void => {
        clearTimeout(timer);
        this.pending.delete(c);
        reject(err);
      };
      try {
        if (!this.enqueue(ps, T_MSG, c, s => ({ s, t: type, d: body }))) {
          fail(new MeshError('EQUEUEFULL', `request ${type} to node ${peer}: the send queue is full`));
        }
      } catch (err) {
        fail(err instanceof Error ? err : new Error(String(err)));
      }
    });
  }

  /** Answers a request received as `message` with a non-zero correlation id. */
  reply(peer: NodeId, correlationId: number, body: unknown): boolean {
    const ps = this.peerState(peer);
    checkCorrelation(correlationId);
    return this.enqueue(ps, T_RES, correlationId, s => ({ s, d: body }));
  }

  /** Answers a request with an error: the requester's promise rejects with MeshError EREMOTE carrying `code`. */
  replyError(peer: NodeId, correlationId: number, code: string, message: string): boolean {
    const ps = this.peerState(peer);
    checkCorrelation(correlationId);
    return this.enqueue(ps, T_RES, correlationId, s => ({ s, e: { code, message } }));
  }

  // ---- sending ----

  private enqueue(ps: PeerState, t: string, c: number, build: (seq: number) => Record<string, unknown>): boolean {
    if (this.state === 'stopped') return false;
    if (ps.out.length >= this.maxQueueFrames) return false;
    const seq = ps.nextSeq;
    const bytes = encodeFrame({ t, c, b: build(seq) });
    const payloadBytes = bytes.length - FRAME_HEADER_BYTES;
    if (payloadBytes > this.maxFrameBytes) {
      throw new MeshError('EMSGSIZE', `${t} to node ${ps.id}: ${payloadBytes} bytes exceeds maxFrameBytes ${this.maxFrameBytes}`);
    }
    if (ps.out.bytes + bytes.length > this.maxQueueBytes) return false;
    ps.nextSeq = seq + 1;
    ps.out.push({ seq, bytes });
    const conn = ps.conn;
    if (conn !== null && conn.state === 'ready') this.write(conn, bytes);
    if (this.log.isLevelEnabled('trace')) ps.log.trace({ t, c, seq, bytes: bytes.length, sent: conn?.state === 'ready' }, 'mesh queue');
    return true;
  }

  /** Writes a frame, corking the socket until the end of this tick so a burst goes out in few segments. */
  private write(conn: Conn, bytes: Buffer): void {
    const s = conn.socket;
    if (conn.state === 'closed' || s.destroyed || s.writableEnded) return;
    if (!conn.corked) {
      conn.corked = true;
      s.cork();
      process.nextTick(() => {
        conn.corked = false;
        s.uncork();
      });
    }
    s.write(bytes);
  }

  private writeFrame(conn: Conn, frame: Frame): void {
    this.write(conn, encodeFrame(frame));
  }

  private scheduleAck(ps: PeerState): void {
    if (ps.ackScheduled) return;
    ps.ackScheduled = true;
    // One ack per event-loop turn covers every frame read in it.
    setImmediate(() => {
      ps.ackScheduled = false;
      const conn = ps.conn;
      if (conn !== null && conn.state === 'ready') this.writeFrame(conn, { t: T_ACK, c: 0, b: { a: ps.recvSeq } });
    });
  }

  private allocCorrelation(): number {
    for (;;) {
      this.lastCorrelation = this.lastCorrelation >= CORRELATION_MAX ? 1 : this.lastCorrelation + 1;
      if (!this.pending.has(this.lastCorrelation)) return this.lastCorrelation;
    }
  }

  // ---- connections ----

  private dial(ps: PeerState): void {
    ps.dialTimer = null;
    if (this.state !== 'running' || ps.conn !== null || ps.dialing !== null) return;
    const { host, port } = ps.endpoint;
    const socket = net.connect({ host, port });
    ps.dialing = this.attach(socket, ps, `${host}:${port}`);
  }

  private scheduleDial(ps: PeerState): void {
    if (this.state !== 'running' || !ps.dialer || ps.dialTimer !== null || ps.conn !== null || ps.dialing !== null) return;
    const delayMs = reconnectDelayMs(ps.attempt++, this.reconnectMinMs, this.reconnectMaxMs);
    ps.log.debug({ delayMs, attempt: ps.attempt }, 'mesh redial scheduled');
    ps.dialTimer = setTimeout(() => this.dial(ps), delayMs);
  }

  private onAccept(socket: net.Socket): void {
    const address = `${socket.remoteAddress}:${socket.remotePort}`;
    if (this.state !== 'running') {
      socket.destroy();
      return;
    }
    let authenticating = 0;
    for (const c of this.conns) if (c.target === null && c.state === 'auth') authenticating++;
    if (authenticating >= this.maxPendingConnections) {
      socket.on('error', () => {});
      socket.destroy();
      const reason = `too many connections authenticating (${authenticating})`;
      this.log.warn({ remote: address, reason }, 'mesh connection refused');
      this.safeEmit('refused', address, reason);
      return;
    }
    this.attach(socket, null, address);
  }

  private attach(socket: net.Socket, target: PeerState | null, address: string): Conn {
    socket.setNoDelay(true);
    const log = this.log.child(target ? { remote: address, dir: 'out', peer: target.id } : { remote: address, dir: 'in' });
    const handshake = new MeshHandshake({
      secret: this.secret,
      self: this.nodeId,
      nonce: randomBytes(NONCE_BYTES),
      checkPeer: target
        ? node => (node === target.id ? null : `this connection dialed node ${target.id}`)
        : node => this.checkInbound(node),
    });
    const conn: Conn = {
      state: 'auth', socket, address, target, peer: null, handshake,
      parser: null as unknown as FrameParser,
      deadlineMs: performance.now() + this.authTimeoutMs,
      log, connected: target === null, corked: false, detached: false, errorCode: null,
    };
    (conn as { parser: FrameParser }).parser = new FrameParser({
      onFrame: f => this.onFrame(conn, f),
      onError: reason => this.onFramingError(conn, reason),
    }, { maxFrameBytes: AUTH_MAX_FRAME_BYTES });
    this.conns.add(conn);
    this.sockets.add(socket);
    socket.on('data', (chunk: Buffer) => {
      try {
        conn.parser.push(chunk);
      } catch (err) {
        // A bug here must not take the node down: lose this connection, keep the rest.
        conn.log.error({ err }, 'mesh internal error handling a frame; closing connection');
        this.closeConn(conn, 'destroy');
      }
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      conn.errorCode = err.code ?? err.message;
    });
    socket.on('close', () => {
      this.sockets.delete(socket);
      this.onSocketClose(conn);
    });
    if (target) {
      socket.on('connect', () => {
        conn.connected = true;
        conn.log.debug('mesh dial connected');
      });
    }
    this.writeFrame(conn, { t: AUTH_HELLO, c: 0, b: handshake.hello() });
    return conn;
  }

  private checkInbound(node: NodeId): string | null {
    const ps = this.peers.get(node);
    if (ps === undefined) return 'not a configured peer';
    if (ps.dialer) return `node ${node} has the higher id, so this node dials it`;
    return null;
  }

  private onSocketClose(conn: Conn): void {
    if (conn.state !== 'closed') {
      const code = conn.errorCode ?? undefined;
      if (conn.state === 'auth') {
        if (conn.connected) {
          const reason = `connection closed during authentication${code ? ` (${code})` : ''}`;
          conn.log.warn({ reason }, 'mesh connection refused');
          this.safeEmit('refused', conn.address, reason);
        } else {
          conn.log.debug({ code }, 'mesh dial failed');
        }
      } else {
        conn.log.info({ code }, 'mesh connection lost');
      }
      conn.state = 'closed';
      conn.parser.stop();
    }
    this.detach(conn);
  }

  /** `end` lets the peer read what was already written (our proof, so it can log its own reason). */
  private closeConn(conn: Conn, how: 'end' | 'destroy'): void {
    if (conn.state === 'closed') return;
    conn.state = 'closed';
    conn.parser.stop();
    const s = conn.socket;
    if (how === 'end' && !s.destroyed) {
      s.end();
      const t = setTimeout(() => s.destroy(), END_GRACE_MS);
      t.unref();
      s.once('close', () => clearTimeout(t));
    } else {
      s.destroy();
    }
    this.detach(conn);
  }

  private detach(conn: Conn): void {
    if (conn.detached) return;
    conn.detached = true;
    this.conns.delete(conn);
    const ps = conn.target ?? conn.peer;
    if (ps === null) return;
    if (ps.dialing === conn) ps.dialing = null;
    if (ps.conn === conn) ps.conn = null;
    if (conn.target !== null) this.scheduleDial(ps);
  }

  private refuse(conn: Conn, reason: string): void {
    conn.log.warn({ reason }, 'mesh connection refused');
    this.closeConn(conn, 'end');
    this.safeEmit('refused', conn.address, reason);
  }

  private protocolError(conn: Conn, reason: string): void {
    conn.log.warn({ reason }, 'mesh protocol error; closing connection');
    this.closeConn(conn, 'destroy');
  }

  private onFramingError(conn: Conn, reason: string): void {
    if (conn.state === 'auth') this.refuse(conn, `framing error: ${reason}`);
    else this.protocolError(conn, `framing error: ${reason}`);
  }

  // ---- receiving ----

  private onFrame(conn: Conn, f: Frame): void {
    switch (conn.state) {
      case 'closed':
        return;
      case 'auth': {
        const step = conn.handshake.onFrame(f.t, f.b);
        if (step.kind === 'send') this.writeFrame(conn, { t: step.type, c: 0, b: step.body });
        else if (step.kind === 'refuse') this.refuse(conn, step.reason);
        else this.onAuthenticated(conn, step.peer);
        return;
      }
      case 'sync': {
        const ps = conn.peer!;
        ps.lastHeardMs = performance.now();
        if (f.t === T_SYNC) this.onSync(conn, ps, f.b);
        else this.protocolError(conn, `frame ${describe(f.t)} before sync`);
        return;
      }
      case 'ready': {
        const ps = conn.peer!;
        ps.lastHeardMs = performance.now();
        this.onReadyFrame(conn, ps, f);
        return;
      }
    }
  }

  private onAuthenticated(conn: Conn, peer: NodeId): void {
    const ps = this.peers.get(peer)!; // checkPeer admitted only configured peers
    conn.peer = ps;
    conn.state = 'sync';
    conn.parser.maxFrameBytes = this.maxFrameBytes;
    if (conn.target === null) conn.log = conn.log.child({ peer });
    if (ps.dialing === conn) ps.dialing = null;
    const old = ps.conn;
    ps.conn = conn; // before closing the old one, so its detach does not schedule a redial
    if (old !== null) {
      old.log.info('mesh connection replaced by a newer one from the same peer');
      this.closeConn(old, 'destroy');
    }
    conn.log.debug('mesh connection authenticated');
    this.writeFrame(conn, {
      t: T_SYNC, c: 0,
      b: { i: this.incarnation, k: ps.peerInc ?? '', a: ps.recvSeq, n: ps.out.first?.seq ?? ps.nextSeq },
    });
  }

  private onSync(conn: Conn, ps: PeerState, b: unknown): void {
    if (!isRecord(b) || typeof b.i !== 'string' || b.i.length === 0 || b.i.length > INCARNATION_MAX_CHARS
      || typeof b.k !== 'string' || !isSeqOrZero(b.a) || !isSeq(b.n)) {
      this.protocolError(conn, 'malformed sync');
      return;
    }
    if (b.k === this.incarnation) {
      if (b.a >= ps.nextSeq) {
        this.protocolError(conn, `sync acknowledges ${b.a}, beyond the last sequence number sent (${ps.nextSeq - 1})`);
        return;
      }
      ps.out.trim(b.a);
    }
    if (ps.peerInc !== b.i) {
      if (ps.peerInc !== null) {
        conn.log.info({ was: ps.peerInc, now: b.i }, 'peer restarted');
        if (ps.up) this.markDown(ps, 'peer restarted');
      }
      ps.peerInc = b.i;
      ps.recvSeq = b.n - 1;
    } else if (b.n - 1 > ps.recvSeq) {
      // Cannot happen unless the peer dropped frames we never acknowledged: say so loudly.
      conn.log.error({ expected: ps.recvSeq + 1, resumesAt: b.n }, 'mesh sequence gap on resume');
      ps.recvSeq = b.n - 1;
    }
    if (conn.state !== 'sync') return; // a peer-down listener may have stopped the mesh
    conn.state = 'ready';
    ps.attempt = 0;
    ps.lastHeardMs = performance.now();
    for (const o of ps.out) this.write(conn, o.bytes);
    if (!ps.up) {
      ps.up = true;
      ps.log.info({ remote: conn.address, resent: ps.out.length }, 'peer up');
      this.safeEmit('peer-up', ps.id);
    } else {
      conn.log.info({ resent: ps.out.length }, 'mesh connection resumed');
    }
  }

  private onReadyFrame(conn: Conn, ps: PeerState, f: Frame): void {
    const b = f.b;
    switch (f.t) {
      case T_HEARTBEAT:
      case T_ACK: {
        const a = isRecord(b) ? b.a : undefined;
        if (!isSeqOrZero(a) || a >= ps.nextSeq) {
          this.protocolError(conn, `${f.t} with a bad acknowledgement ${describe(a)}`);
          return;
        }
        ps.out.trim(a);
        return;
      }
      case T_MSG: {
        if (!isRecord(b) || !isSeq(b.s) || typeof b.t !== 'string' || b.t.length === 0) {
          this.protocolError(conn, 'malformed msg');
          return;
        }
        if (!this.acceptSeq(conn, ps, b.s)) return;
        this.deliver(conn, ps, b.t, b.d, f.c);
        return;
      }
      case T_RES: {
        if (!isRecord(b) || !isSeq(b.s) || f.c === 0 || (b.e !== undefined && !isRemoteError(b.e))) {
          this.protocolError(conn, 'malformed res');
          return;
        }
        if (!this.acceptSeq(conn, ps, b.s)) return;
        this.settle(conn, ps, f.c, b);
        return;
      }
      default:
        this.protocolError(conn, `unknown frame type ${describe(f.t)}`);
    }
  }

  /** True if `s` is the next frame to deliver; false for a duplicate (dropped) or a gap (connection closed). */
  private acceptSeq(conn: Conn, ps: PeerState, s: number): boolean {
    if (s <= ps.recvSeq) {
      if (this.log.isLevelEnabled('trace')) conn.log.trace({ s, delivered: ps.recvSeq }, 'mesh duplicate dropped');
      this.scheduleAck(ps);
      return false;
    }
    if (s !== ps.recvSeq + 1) {
      this.protocolError(conn, `sequence gap: expected ${ps.recvSeq + 1}, got ${s}`);
      return false;
    }
    ps.recvSeq = s;
    this.scheduleAck(ps);
    return true;
  }

  private deliver(conn: Conn, ps: PeerState, type: string, body: unknown, c: number): void {
    if (this.log.isLevelEnabled('trace')) conn.log.trace({ type, c, s: ps.recvSeq }, 'mesh deliver');
    let handled: boolean;
    try {
      handled = this.emit('message', ps.id, type, body, c);
    } catch (err) {
      conn.log.error({ err, type, c }, 'mesh message handler threw');
      if (c !== 0) this.replyError(ps.id, c, 'EHANDLER', (err instanceof Error ? err.message : String(err)).slice(0, 1000));
      return;
    }
    if (!handled && c !== 0) this.replyError(ps.id, c, 'ENOHANDLER', `node ${this.nodeId} has no message handler`);
  }

  private settle(conn: Conn, ps: PeerState, c: number, b: Record<string, unknown>): void {
    const p = this.pending.get(c);
    if (p === undefined || p.peer !== ps.id) {
      conn.log.debug({ c }, 'mesh reply matches no pending request (timed out?)');
      return;
    }
    this.pending.delete(c);
    clearTimeout(p.timer);
    if (b.e !== undefined) {
      const e = b.e as { code: string; message: string };
      p.reject(new MeshError('EREMOTE', `node ${ps.id} answered ${p.type} with ${e.code}: ${e.message}`, e.code));
    } else {
      p.resolve(b.d);
    }
  }

  // ---- time ----

  private onTick(): void {
    try {
      const now = performance.now();
      for (const conn of this.conns) {
        if ((conn.state === 'auth' || conn.state === 'sync') && now >= conn.deadlineMs) {
          if (conn.state === 'sync') {
            this.protocolError(conn, 'timed out waiting for sync');
          } else if (conn.connected) {
            const step = conn.handshake.onTimeout();
            this.refuse(conn, step.kind === 'refuse' ? step.reason : 'authentication timed out');
          } else {
            conn.log.debug('mesh dial timed out');
            this.closeConn(conn, 'destroy');
          }
        }
      }
      for (const ps of this.peers.values()) {
        const conn = ps.conn;
        if (conn !== null && conn.state === 'ready') this.writeFrame(conn, { t: T_HEARTBEAT, c: 0, b: { a: ps.recvSeq } });
        if (ps.up && now - ps.lastHeardMs > this.peerTimeoutMs) {
          this.markDown(ps, `no heartbeat for ${Math.round(now - ps.lastHeardMs)} ms`);
          if (ps.conn !== null) {
            ps.conn.log.info('closing the connection to a silent peer');
            this.closeConn(ps.conn, 'destroy');
          }
        }
      }
    } catch (err) {
      this.log.error({ err }, 'mesh tick failed');
    }
  }

  private markDown(ps: PeerState, reason: string): void {
    ps.up = false;
    ps.log.info({ reason, queued: ps.out.length }, 'peer down');
    this.safeEmit('peer-down', ps.id, reason);
  }

  private safeEmit<K extends keyof MeshEvents>(event: K, ...args: MeshEvents[K]): void {
    try {
      (this.emit as (e: K, ...a: MeshEvents[K]) => boolean)(event, ...args);
    } catch (err) {
      this.log.error({ err, event }, 'mesh event listener threw');
    }
  }

  private peerState(peer: NodeId): PeerState {
    const ps = this.peers.get(peer);
    if (ps === undefined) throw new RangeError(`Mesh: node ${peer} is not a configured peer of node ${this.nodeId}`);
    return ps;
  }
}

function positive(name: string, v: number): number {
  if (!(Number.isFinite(v) && v > 0)) throw new RangeError(`Mesh: ${name} must be a positive number, got ${v}`);
  return v;
}

function checkType(type: string): void {
  if (typeof type !== 'string' || type.length === 0) throw new TypeError(`Mesh: message type must be a non-empty string, got ${describe(type)}`);
}

function checkCorrelation(c: number): void {
  if (!isCorrelationId(c) || c === 0) throw new RangeError(`Mesh: ${c} is not a request's correlation id`);
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && Object.getPrototypeOf(x) === Object.prototype;
}

function isSeq(x: unknown): x is number {
  return typeof x === 'number' && Number.isSafeInteger(x) && x >= 1;
}

function isSeqOrZero(x: unknown): x is number {
  return typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
}

function isRemoteError(x: unknown): boolean {
  return isRecord(x) && typeof x.code === 'string' && typeof x.message === 'string';
}
