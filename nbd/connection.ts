/**
 * One client connection: the socket adapter around the pure handshake, the request
 * parser and request validation. It is the only NBD code that touches a socket.
 *
 * Many requests are in flight per connection; each completes whenever its backend
 * I/O does, and replies go out in completion order, matched by cookie. Replies
 * written during one turn of the event loop are corked into one writev.
 *
 * Back-pressure: past MAX_INFLIGHT requests or WRITE_HIGH_WATER unsent reply bytes
 * the socket stops being read until the client catches up, so a client that sends
 * without reading cannot grow server memory.
 *
 * The connection closes only where the stream can no longer be trusted (bad magic,
 * a client that hangs up mid-request), on NBD_CMD_DISC after in-flight requests
 * finish, or on server shutdown after the same.
 */
import type net from 'node:net';
import type { Logger } from 'pino';
import { Handshake, BASE_ALLOCATION_CONTEXT_ID, type HandshakeStep } from './handshake.js';
import { RequestParser, type RequestSink } from './request-parser.js';
import { validateRequest, type SessionLimits } from './transmission.js';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES, NBD_SIMPLE_REPLY_HEADER_BYTES, NBD_STATE_HOLE, NBD_STATE_ZERO, commandName,
} from './constants.js';
import { nbdErrorFromResult, nbdErrorName } from './errno.js';
import {
  OFFSET_DATA_PREFIX_BYTES, blockStatusChunk, errorChunk, simpleReply, writeOffsetDataPrefix,
  writeSimpleReplyHeader,
} from './reply.js';
import type { ExportRegistry, NbdExport } from './export.js';
import type { Extent } from '../src/storage/backend.js';
import { BufferPool, ioBuffers } from './buffer-pool.js';

export const MAX_INFLIGHT = 256;
export const WRITE_HIGH_WATER_BYTES = 64 * 1024 * 1024;
export const HANDSHAKE_TIMEOUT_MS = 30_000;

const enum Phase { HANDSHAKE, TRANSMISSION, DRAINING, CLOSED }

/** A request in flight. Pooled per connection; its callbacks are bound once. */
class InflightRequest {
  type = 0;
  flags = 0;
  cookieHi = 0;
  cookieLo = 0;
  offset = 0;
  length = 0;
  /** READ: header + data in one buffer. */
  reply: Buffer | null = null;
  /** WRITE: a pooled payload to release when the write is done. */
  payload: Buffer | null = null;
  readonly onDone = (result: number): void => this.conn.complete(this, result);
  readonly onExtents = (result: number, extents: Extent[]): void => this.conn.completeBlockStatus(this, result, extents);
  constructor(private readonly conn: Connection) {}
}

export class Connection implements RequestSink {
  private phase = Phase.HANDSHAKE;
  private readonly handshake: Handshake;
  private parser: RequestParser | null = null;
  private exp: NbdExport | null = null;
  private limits: SessionLimits | null = null;
  private inflight = 0;
  private readonly pool: InflightRequest[] = [];
  private readonly outbox: Buffer[] = [];
  private paused = false;
  private handshakeTimer: NodeJS.Timeout | null;
  private readonly trace: boolean;
  private closedResolve: (() => void) | null = null;
  readonly closed: Promise<void>;

  constructor(
    readonly id: number,
    private readonly socket: net.Socket,
    private readonly exports: ExportRegistry,
    private readonly log: Logger,
  ) {
    this.trace = log.isLevelEnabled('trace');
    this.closed = new Promise((r) => (this.closedResolve = r));
    this.handshake = new Handshake(exports);
    socket.setNoDelay(true);
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    socket.on('drain', this.maybeResume);
    this.handshakeTimer = setTimeout(() => this.abort('handshake timed out'), HANDSHAKE_TIMEOUT_MS);
    this.handshakeTimer.unref();
    socket.write(this.handshake.greeting());
  }

  get exportName(): string | null {
    return this.exp?.name ?? null;
  }

  // ── socket events ────────────────────────────────────────────────────────
  private readonly onData = (chunk: Buffer): void => {
    if (this.phase === Phase.TRANSMISSION) {
      this.parser!.push(chunk);
      return;
    }
    if (this.phase === Phase.HANDSHAKE) this.onHandshakeData(chunk);
    // DRAINING / CLOSED: nothing more is read.
  };

  private readonly onEnd = (): void => {
    if (this.phase === Phase.HANDSHAKE) {
      this.log.info('client closed the connection during the handshake');
    } else if (this.parser && !this.parser.idle && this.phase === Phase.TRANSMISSION) {
      this.log.warn('client hung up mid-request');
    } else if (this.phase === Phase.TRANSMISSION) {
      this.log.info('client closed the connection without NBD_CMD_DISC');
    }
    this.drainThenClose();
  };

  private readonly onError = (err: Error): void => {
    this.log.info({ err: err.message }, 'socket error');
    this.destroy();
  };

  private readonly onClose = (): void => {
    if (this.phase !== Phase.CLOSED) this.phase = Phase.CLOSED;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    if (this.exp) this.exp.stats.connections--;
    this.closedResolve?.();
    this.closedResolve = null;
  };

  // ── handshake ────────────────────────────────────────────────────────────
  private onHandshakeData(chunk: Buffer): void {
    const step: HandshakeStep = this.handshake.push(chunk);
    for (const b of step.out) this.socket.write(b);
    if (step.options.length > 0 && this.log.isLevelEnabled('debug')) this.log.debug({ options: step.options }, 'options');
    const o = step.outcome;
    if (o.kind === 'continue') return;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    if (o.kind === 'close') {
      if (o.clientError) this.log.warn({ reason: o.reason }, 'handshake failed, closing connection');
      else this.log.info({ reason: o.reason }, 'handshake ended');
      this.socket.end();
      this.phase = Phase.CLOSED;
      return;
    }
    const exp = this.exports.lookup(o.export.name);
    if (!exp) { // removed in between: nothing to serve
      this.abort(`export "${o.export.name}" went away`);
      return;
    }
    this.exp = exp;
    exp.stats.connections++;
    this.limits = {
      sizeBytes: exp.sizeBytes,
      readOnly: exp.readOnly,
      structuredReplies: o.structuredReplies,
      baseAllocation: o.baseAllocation,
      maxBlockBytes: exp.maxBlockBytes,
    };
    this.log.info({ export: exp.name, structuredReplies: o.structuredReplies, baseAllocation: o.baseAllocation }, 'transmission started');
    this.phase = Phase.TRANSMISSION;
    this.parser = new RequestParser(this, exp.maxBlockBytes, (n) => ioBuffers.acquire(n));
    if (o.rest.length > 0) this.parser.push(o.rest);
  }

  // ── transmission ─────────────────────────────────────────────────────────
  onFramingError(reason: string): void {
    this.log.warn({ reason }, 'bad request, closing connection');
    this.drainThenClose();
  }

  onRequest(flags: number, type: number, cookieHi: number, cookieLo: number, offset: number, length: number, payload: Buffer | null, oversize: boolean, payloadAllocated: boolean): void {
    if (this.phase !== Phase.TRANSMISSION) {
      if (payloadAllocated) ioBuffers.release(payload!);
      return;
    }
    const exp = this.exp!;
    exp.stats.requests++;
    if (this.trace) this.log.trace({ cmd: commandName(type), flags, offset, length }, 'request');
    const rejection = validateRequest(this.limits!, type, flags, offset, length, oversize);
    if (rejection !== null) {
      exp.stats.errors++;
      this.log.debug({ cmd: commandName(type), offset, length, error: nbdErrorName(rejection.error), reason: rejection.reason }, 'request rejected');
      this.sendError(type, cookieHi, cookieLo, rejection.error, rejection.reason);
      if (payloadAllocated) ioBuffers.release(payload!);
      return;
    }
    if (type === NBD_CMD_DISC) {
      this.log.info('client sent NBD_CMD_DISC');
      this.drainThenClose();
      return;
    }
    const r = this.pool.pop() ?? new InflightRequest(this);
    r.type = type;
    r.flags = flags;
    r.cookieHi = cookieHi;
    r.cookieLo = cookieLo;
    r.offset = offset;
    r.length = length;
    r.payload = payloadAllocated ? payload : null;
    this.inflight++;
    if (this.inflight >= MAX_INFLIGHT) this.pause();
    const backend = exp.backend;
    const fua = (flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (type) {
      case NBD_CMD_READ: {
        const prefix = this.limits!.structuredReplies ? OFFSET_DATA_PREFIX_BYTES : NBD_SIMPLE_REPLY_HEADER_BYTES;
        const reply = ioBuffers.acquire(prefix + length);
        r.reply = reply;
        backend.read(reply.subarray(prefix), offset, r.onDone);
        return;
      }
      case NBD_CMD_WRITE:
        exp.stats.writtenBytes += length;
        if (length === 0) return this.complete(r, 0);
        backend.write(payload!, offset, fua, r.onDone);
        return;
      case NBD_CMD_FLUSH:
        backend.flush(r.onDone);
        return;
      case NBD_CMD_TRIM:
        if (length === 0) return this.complete(r, 0);
        backend.trim(offset, length, fua, r.onDone);
        return;
      case NBD_CMD_WRITE_ZEROES:
        if (length === 0) return this.complete(r, 0);
        backend.zero(offset, length, {
          noHole: (flags & NBD_CMD_FLAG_NO_HOLE) !== 0,
          fastOnly: (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
          fua,
        }, r.onDone);
        return;
      case NBD_CMD_CACHE:
        if (length === 0) return this.complete(r, 0);
        backend.cache(offset, length, r.onDone);
        return;
      case NBD_CMD_BLOCK_STATUS:
        backend.extents(offset, length, r.onExtents);
        return;
    }
  }

  /** Completion of every request but BLOCK_STATUS. */
  complete(r: InflightRequest, result: number): void {
    const error = nbdErrorFromResult(result);
    const exp = this.exp!;
    if (error !== 0) {
      exp.stats.errors++;
      // A backend error is the server's problem, not the client's: always logged.
      this.log.error({ cmd: commandName(r.type), offset: r.offset, length: r.length, result, error: nbdErrorName(error) }, 'I/O error');
      this.sendError(r.type, r.cookieHi, r.cookieLo, error, `${commandName(r.type)} failed: ${nbdErrorName(error)}`);
      if (r.reply !== null) ioBuffers.release(r.reply);
    } else if (r.type === NBD_CMD_READ) {
      exp.stats.readBytes += r.length;
      const reply = r.reply!;
      if (this.limits!.structuredReplies) writeOffsetDataPrefix(reply, r.cookieHi, r.cookieLo, r.offset, r.length);
      else writeSimpleReplyHeader(reply, 0, 0, r.cookieHi, r.cookieLo);
      this.send(reply);
    } else {
      this.send(simpleReply(0, r.cookieHi, r.cookieLo));
    }
    this.release(r);
  }

  completeBlockStatus(r: InflightRequest, result: number, extents: Extent[]): void {
    if (result < 0) return this.complete(r, result);
    const lengths: number[] = [];
    const flags: number[] = [];
    let covered = 0;
    for (const e of extents) {
      const len = Math.min(e.lengthBytes, r.length - covered, 0xffffffff);
      if (len <= 0) break;
      const f = (e.hole ? NBD_STATE_HOLE : 0) | (e.zero ? NBD_STATE_ZERO : 0);
      const last = flags.length - 1;
      if (last >= 0 && flags[last] === f && lengths[last]! + len <= 0xffffffff) lengths[last]! += len;
      else {
        lengths.push(len);
        flags.push(f);
      }
      covered += len;
      if ((r.flags & NBD_CMD_FLAG_REQ_ONE) !== 0) break;
    }
    if (lengths.length === 0) { // a backend must answer something: call it data
      lengths.push(r.length);
      flags.push(0);
    }
    if ((r.flags & NBD_CMD_FLAG_REQ_ONE) !== 0) lengths.length = flags.length = 1;
    this.send(blockStatusChunk(r.cookieHi, r.cookieLo, BASE_ALLOCATION_CONTEXT_ID, lengths, flags));
    this.release(r);
  }

  private release(r: InflightRequest): void {
    r.reply = null;
    if (r.payload !== null) {
      ioBuffers.release(r.payload);
      r.payload = null;
    }
    this.pool.push(r);
    this.inflight--;
    if (this.paused) this.maybeResume();
    if (this.inflight === 0 && this.phase === Phase.DRAINING) this.finishDrain();
  }

  /** Errors: structured ERROR chunk where the client expects structured data, else a simple reply. */
  private sendError(type: number, cookieHi: number, cookieLo: number, error: number, message: string): void {
    const structured = this.limits?.structuredReplies && (type === NBD_CMD_READ || type === NBD_CMD_BLOCK_STATUS);
    this.send(structured ? errorChunk(error, cookieHi, cookieLo, message) : simpleReply(error, cookieHi, cookieLo));
  }

  /**
   * Replies produced during one turn of the event loop are written together on the
   * next tick: a lone reply as a plain write (lowest latency at queue depth 1), several
   * as one corked writev.
   */
  private send(b: Buffer): void {
    if (this.outbox.length === 0) process.nextTick(this.flushOutbox);
    this.outbox.push(b);
  }

  private readonly flushOutbox = (): void => {
    const s = this.socket;
    const out = this.outbox;
    const n = out.length;
    if (n === 0) return; // already flushed by finishDrain
    if (s.destroyed || !s.writable) {
      for (const b of out) if (BufferPool.pooled(b.length)) ioBuffers.release(b);
      out.length = 0;
      return;
    }
    let ok: boolean;
    if (n === 1) {
      ok = this.write(s, out[0]!);
    } else {
      s.cork();
      for (let i = 0; i < n - 1; i++) this.write(s, out[i]!);
      ok = this.write(s, out[n - 1]!);
      s.uncork();
    }
    out.length = 0;
    if (!ok) this.pause();
  };

  /** A pooled reply goes back to the pool once the socket is done with it (written or failed). */
  private write(s: net.Socket, b: Buffer): boolean {
    return BufferPool.pooled(b.length) ? s.write(b, () => ioBuffers.release(b)) : s.write(b);
  }

  private pause(): void {
    if (!this.paused) {
      this.paused = true;
      this.socket.pause();
    }
  }

  private readonly maybeResume = (): void => {
    if (!this.paused || this.phase !== Phase.TRANSMISSION) return;
    if (this.inflight < MAX_INFLIGHT / 2 && this.socket.writableLength < WRITE_HIGH_WATER_BYTES) {
      this.paused = false;
      this.socket.resume();
    }
  };

  // ── shutdown ─────────────────────────────────────────────────────────────
  /** Stop reading; close once in-flight requests have been answered. */
  drainThenClose(): void {
    if (this.phase === Phase.CLOSED || this.phase === Phase.DRAINING) return;
    if (this.phase === Phase.HANDSHAKE) {
      this.phase = Phase.CLOSED;
      this.socket.end();
      return;
    }
    this.phase = Phase.DRAINING;
    this.socket.pause();
    if (this.inflight === 0) this.finishDrain();
  }

  private finishDrain(): void {
    this.flushOutbox(); // replies of this tick go out before the FIN
    this.phase = Phase.CLOSED;
    this.socket.end();
  }

  private abort(reason: string): void {
    this.log.warn({ reason }, 'closing connection');
    this.destroy();
  }

  destroy(): void {
    this.phase = Phase.CLOSED;
    this.socket.destroy();
  }
}
