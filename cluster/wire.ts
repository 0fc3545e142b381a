/**
 * Mesh framing: what crosses a peer connection, byte for byte. Pure: no sockets, no
 * timers, no logging.
 *
 *   frame   = u32 length (big-endian, payload bytes only) + payload
 *   payload = msgpack map { v: PROTOCOL_VERSION, t: type (string), c: correlation id (u32), b: body }
 *
 * `FrameParser.push(chunk)` keeps a partial header or payload across calls and hands
 * each complete, validated frame to a sink. Everything a peer sends is untrusted: a
 * length over `maxFrameBytes` is refused as soon as its 4 header bytes are in (the
 * payload is never buffered), and a payload that is not msgpack, not a map, of
 * another protocol version, or with a mistyped field is refused with a reason naming
 * what was wrong. After the first error nothing further in the stream can be trusted:
 * the parser stops (its owner closes the connection) and never throws for bad input.
 *
 * Binary fields of a body may be views into the pushed chunk (msgpackr does not copy
 * them); the parser never reuses a buffer it handed out.
 */
import { Packr, Unpackr } from 'msgpackr';

export const PROTOCOL_VERSION = 1;
export const FRAME_HEADER_BYTES = 4;
export const DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024;
/** Largest correlation id (u32). 0 means "no correlation". */
export const CORRELATION_MAX = 0xffff_ffff;
/** Reasons quote at most this many characters of peer-controlled text (msgpackr quotes whole payloads). */
const REASON_QUOTE_MAX = 120;

export interface Frame {
  /** Frame type, e.g. `hello`, `msg`. */
  t: string;
  /** Correlation id, u32; 0 when the frame answers nothing and expects no answer. */
  c: number;
  /** Body: any msgpack-encodable value. */
  b: unknown;
}

export interface FrameSink {
  onFrame(frame: Frame): void;
  /** The stream is broken; called once, after which the parser ignores all input. */
  onError(reason: string): void;
}

// Plain maps both ways (no msgpackr records), so any msgpack implementation can talk to us.
const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true });

/** Encodes one frame, header included. A malformed frame is a programmer error: it throws. */
export function encodeFrame(frame: Frame): Buffer {
  if (typeof frame.t !== 'string' || frame.t.length === 0) throw new TypeError(`encodeFrame: type must be a non-empty string, got ${describe(frame.t)}`);
  if (!isCorrelationId(frame.c)) throw new TypeError(`encodeFrame: correlation id must be a u32, got ${describe(frame.c)}`);
  const payload = packr.pack({ v: PROTOCOL_VERSION, t: frame.t, c: frame.c, b: frame.b });
  const out = Buffer.allocUnsafe(FRAME_HEADER_BYTES + payload.length);
  out.writeUInt32BE(payload.length, 0);
  payload.copy(out, FRAME_HEADER_BYTES);
  return out;
}

export function isCorrelationId(x: unknown): x is number {
  return typeof x === 'number' && Number.isInteger(x) && x >= 0 && x <= CORRELATION_MAX;
}

/**
 * Validates a decoded payload. Returns the frame, or the reason it is not one.
 * Exported for tests and for anything that receives payloads by other means.
 */
export function decodePayload(payload: Buffer): Frame | string {
  if (payload.length === 0) return 'empty payload';
  let x: unknown;
  try {
    x = unpackr.unpack(payload);
  } catch (err) {
    return `payload is not valid msgpack: ${clip(err instanceof Error ? err.message : String(err))}`;
  }
  if (typeof x !== 'object' || x === null || Object.getPrototypeOf(x) !== Object.prototype) {
    return `payload is not a map (got ${describe(x)})`;
  }
  const o = x as Record<string, unknown>;
  if (o.v !== PROTOCOL_VERSION) return `protocol version ${describe(o.v)}, expected ${PROTOCOL_VERSION}`;
  if (typeof o.t !== 'string') return `frame type (t) is not a string (got ${describe(o.t)})`;
  if (o.t.length === 0) return 'frame type (t) is empty';
  if (!isCorrelationId(o.c)) return `correlation id (c) is not a u32 integer (got ${describe(o.c)})`;
  return { t: o.t, c: o.c, b: o.b };
}

const enum State { HEADER, PAYLOAD, FAILED }

export interface FrameParserOptions {
  /** Largest payload accepted (default 4 MiB). May be changed between frames (e.g. raised after authentication). */
  maxFrameBytes?: number;
}

export class FrameParser {
  /** Read at each header, so a new value applies from the next frame on. */
  maxFrameBytes: number;
  private state = State.HEADER;
  private readonly header = Buffer.alloc(FRAME_HEADER_BYTES);
  private headerFill = 0;
  private payload: Buffer | null = null;
  private payloadBytes = 0;
  private payloadFill = 0;

  constructor(private readonly sink: FrameSink, opts: FrameParserOptions = {}) {
    this.maxFrameBytes = opts.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
  }

  /** True between frames (nothing partial held). */
  get idle(): boolean {
    return this.state === State.HEADER && this.headerFill === 0;
  }

  get failed(): boolean {
    return this.state === State.FAILED;
  }

  /** Stops the parser without reporting an error (its owner closed the connection); later input is ignored. */
  stop(): void {
    this.state = State.FAILED;
    this.payload = null;
  }

  push(chunk: Buffer): void {
    let pos = 0;
    const end = chunk.length;
    while (pos < end && this.state !== State.FAILED) {
      if (this.state === State.HEADER) {
        let at: number;
        let src: Buffer;
        if (this.headerFill === 0 && end - pos >= FRAME_HEADER_BYTES) {
          src = chunk;
          at = pos;
          pos += FRAME_HEADER_BYTES;
        } else {
          const n = Math.min(FRAME_HEADER_BYTES - this.headerFill, end - pos);
          chunk.copy(this.header, this.headerFill, pos, pos + n);
          this.headerFill += n;
          pos += n;
          if (this.headerFill < FRAME_HEADER_BYTES) break;
          this.headerFill = 0;
          src = this.header;
          at = 0;
        }
        const length = src.readUInt32BE(at);
        if (length > this.maxFrameBytes) {
          this.fail(`frame length ${length} exceeds the maximum ${this.maxFrameBytes}`);
          break;
        }
        if (length === 0) {
          this.fail('empty payload');
          break;
        }
        this.payloadBytes = length;
        this.payloadFill = 0;
        this.state = State.PAYLOAD;
      } else {
        const need = this.payloadBytes - this.payloadFill;
        if (this.payload === null && end - pos >= need) {
          // The whole payload is in this chunk: decode in place, no copy.
          const view = chunk.subarray(pos, pos + need);
          pos += need;
          this.state = State.HEADER;
          this.deliver(view);
        } else {
          if (this.payload === null) this.payload = Buffer.allocUnsafe(this.payloadBytes);
          const n = Math.min(need, end - pos);
          chunk.copy(this.payload, this.payloadFill, pos, pos + n);
          this.payloadFill += n;
          pos += n;
          if (this.payloadFill === this.payloadBytes) {
            const full = this.payload;
            this.payload = null;
            this.state = State.HEADER;
            this.deliver(full);
          }
        }
      }
    }
  }

  private deliver(payload: Buffer): void {
    const r = decodePayload(payload);
    if (typeof r === 'string') this.fail(r);
    else this.sink.onFrame(r);
  }

  private fail(reason: string): void {
    this.state = State.FAILED;
    this.payload = null;
    this.sink.onError(reason);
  }
}

/** A short, log-safe description of a peer-supplied value. */
export function describe(x: unknown): string {
  if (x === null) return 'null';
  if (Array.isArray(x)) return 'array';
  if (Buffer.isBuffer(x) || x instanceof Uint8Array) return `binary(${x.length})`;
  switch (typeof x) {
    case 'string': return JSON.stringify(clip(x));
    case 'number': case 'boolean': return String(x);
    case 'bigint': return `${x}n`;
    case 'undefined': return 'nothing';
    case 'object': {
      const proto: unknown = Object.getPrototypeOf(x);
      const name = proto === null ? 'null-prototype object'
        : (proto as { constructor?: { name?: unknown } }).constructor?.name;
      return typeof name === 'string' && name !== 'Object' ? clip(name) : 'object';
    }
    default: return typeof x;
  }
}

function clip(s: string): string {
  return s.length <= REASON_QUOTE_MAX ? s : `${s.slice(0, REASON_QUOTE_MAX)}…`;
}
