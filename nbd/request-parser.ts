/**
 * Transmission-phase request parser: `push(chunk)` keeps partial headers and
 * payloads across calls and hands each complete request to a sink. Pure: no
 * sockets, no validation beyond framing (validation is `transmission.ts`'s job).
 *
 * Only NBD_CMD_WRITE carries a payload (no extended headers). A WRITE whose length
 * exceeds `maxPayloadBytes` is delivered with `payload === null` and `oversize`
 * set, and its announced payload is skipped as it streams in, never buffered.
 * Bad request magic is the one framing error: after it nothing in the stream can be
 * trusted, so the parser stops and reports it.
 */
import { NBD_CMD_WRITE, NBD_REQUEST_HEADER_BYTES, NBD_REQUEST_MAGIC } from './constants.js';

/** Offsets at or above 2^53 cannot be represented exactly; they are reported as this (always out of range). */
export const OFFSET_UNREPRESENTABLE = Number.MAX_SAFE_INTEGER;

export interface RequestSink {
  /**
   * One request. `cookieHi`/`cookieLo` are the client's opaque 8-byte handle as two
   * u32 so the hot path allocates nothing for it. `payload` is a view into the
   * received bytes where possible (no copy).
   */
  onRequest(
    flags: number, type: number, cookieHi: number, cookieLo: number,
    offset: number, length: number, payload: Buffer | null, oversize: boolean,
    /** The payload came from `allocatePayload` (so it is the sink's to release), not a view of received bytes. */
    payloadAllocated: boolean,
  ): void;
  onFramingError(reason: string): void;
}

const enum State { HEADER, PAYLOAD, SKIP, FAILED }

export class RequestParser {
  private state = State.HEADER;
  private readonly header = Buffer.alloc(NBD_REQUEST_HEADER_BYTES);
  private headerFill = 0;
  // The request whose payload is being collected or skipped.
  private flags = 0;
  private type = 0;
  private cookieHi = 0;
  private cookieLo = 0;
  private offset = 0;
  private length = 0;
  private payload: Buffer | null = null;
  private payloadFill = 0;
  private skipLeft = 0;

  constructor(
    private readonly sink: RequestSink,
    private readonly maxPayloadBytes: number,
    /** Where payloads that straddle reads are assembled (a pool, in the server). */
    private readonly allocatePayload: (n: number) => Buffer = Buffer.allocUnsafe,
  ) {}

  /** True between requests (no partial header or payload held). */
  get idle(): boolean {
    return this.state === State.HEADER && this.headerFill === 0;
  }

  get failed(): boolean {
    return this.state === State.FAILED;
  }

  push(chunk: Buffer): void {
    let pos = 0;
    const end = chunk.length;
    while (pos < end && this.state !== State.FAILED) {
      switch (this.state) {
        case State.HEADER: {
          if (this.headerFill === 0 && end - pos >= NBD_REQUEST_HEADER_BYTES) {
            // Fast path: the whole header is in this chunk.
            this.onHeader(chunk, pos);
            pos += NBD_REQUEST_HEADER_BYTES;
          } else {
            const n = Math.min(NBD_REQUEST_HEADER_BYTES - this.headerFill, end - pos);
            chunk.copy(this.header, this.headerFill, pos, pos + n);
            this.headerFill += n;
            pos += n;
            if (this.headerFill === NBD_REQUEST_HEADER_BYTES) {
              this.headerFill = 0;
              this.onHeader(this.header, 0);
            }
          }
          break;
        }
        case State.PAYLOAD: {
          const need = this.length - this.payloadFill;
          if (this.payload === null && end - pos >= need) {
            // The whole payload is here: hand out a view, no copy.
            const view = chunk.subarray(pos, pos + need);
            pos += need;
            this.state = State.HEADER;
            this.emit(view, false, false);
          } else {
            if (this.payload === null) this.payload = this.allocatePayload(this.length);
            const n = Math.min(need, end - pos);
            chunk.copy(this.payload, this.payloadFill, pos, pos + n);
            this.payloadFill += n;
            pos += n;
            if (this.payloadFill === this.length) {
              const full = this.payload;
              this.payload = null;
              this.payloadFill = 0;
              this.state = State.HEADER;
              this.emit(full, false, true);
            }
          }
          break;
        }
        case State.SKIP: {
          const n = Math.min(this.skipLeft, end - pos);
          this.skipLeft -= n;
          pos += n;
          if (this.skipLeft === 0) {
            this.state = State.HEADER;
            this.emit(null, true, false);
          }
          break;
        }
      }
    }
  }

  private onHeader(b: Buffer, at: number): void {
    const magic = b.readUInt32BE(at);
    if (magic !== NBD_REQUEST_MAGIC) {
      this.state = State.FAILED;
      this.sink.onFramingError(`bad request magic 0x${magic.toString(16).padStart(8, '0')}`);
      return;
    }
    this.flags = b.readUInt16BE(at + 4);
    this.type = b.readUInt16BE(at + 6);
    this.cookieHi = b.readUInt32BE(at + 8);
    this.cookieLo = b.readUInt32BE(at + 12);
    const offHi = b.readUInt32BE(at + 16);
    const offLo = b.readUInt32BE(at + 20);
    this.offset = offHi >= 0x200000 ? OFFSET_UNREPRESENTABLE : offHi * 0x100000000 + offLo;
    this.length = b.readUInt32BE(at + 24);
    if (this.type !== NBD_CMD_WRITE || this.length === 0) {
      this.emit(null, false, false);
    } else if (this.length > this.maxPayloadBytes) {
      this.skipLeft = this.length;
      this.state = State.SKIP;
    } else {
      this.payloadFill = 0;
      this.payload = null;
      this.state = State.PAYLOAD;
    }
  }

  private emit(payload: Buffer | null, oversize: boolean, allocated: boolean): void {
    this.sink.onRequest(this.flags, this.type, this.cookieHi, this.cookieLo, this.offset, this.length, payload, oversize, allocated);
  }
}
