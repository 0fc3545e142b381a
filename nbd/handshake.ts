/**
 * Fixed newstyle negotiation as a pure state machine: bytes in, bytes out, and a
 * decision. No sockets, no timers, no logging: the connection adapter writes what
 * `push` returns and acts on the outcome.
 *
 *   greeting ─► AWAIT_CLIENT_FLAGS ─► AWAIT_OPTION_HEADER ◄──► AWAIT_OPTION_DATA
 *                                           │ EXPORT_NAME / GO ok       │ ABORT, bad input
 *                                           ▼                           ▼
 *                                      transmission                   close
 *
 * Choices, each from the spec (doc/proto.md):
 * - unknown client flags: the server MUST close;
 * - unknown options: NBD_REP_ERR_UNSUP, and negotiation goes on;
 * - an option whose data is longer than MAX_OPTION_BYTES is refused by closing, since
 *   buffering it is exactly what a hostile client wants (nbdkit does the same);
 * - NBD_OPT_EXPORT_NAME of an unknown export: the spec leaves no way to say no but
 *   to close;
 * - SET_META_CONTEXT before STRUCTURED_REPLY: NBD_REP_ERR_INVALID.
 */
import {
  BASE_ALLOCATION,
  IHAVEOPT, NBDMAGIC, NBD_FLAG_C_KNOWN, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES, NBD_FLAG_SEND_DF, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME,
  NBD_MAX_STRING_BYTES, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT, NBD_OPT_REPLY_MAGIC, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP,
  NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER, optionName,
} from './constants.js';

/** What the handshake needs to know about an export. */
export interface ExportInfo {
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  /** Transmission flags, NBD_FLAG_HAS_FLAGS included. */
  readonly transmissionFlags: number;
  readonly minBlockBytes: number;
  readonly preferredBlockBytes: number;
  readonly maxBlockBytes: number;
}

export interface ExportCatalog {
  /** The export named `name`; "" names the default export, if there is one. */
  lookup(name: string): ExportInfo | undefined;
  list(): readonly ExportInfo[];
}

/** Metadata context ids this server hands out. */
export const BASE_ALLOCATION_CONTEXT_ID = 1;

export const MAX_OPTION_BYTES = 64 * 1024;
export const MAX_OPTIONS = 1024;

export type HandshakeOutcome =
  | { kind: 'continue' }
  | {
      kind: 'transmission';
      export: ExportInfo;
      structuredReplies: boolean;
      /** base:allocation was selected with SET_META_CONTEXT. */
      baseAllocation: boolean;
      /** Bytes the client already sent past the handshake (pipelined requests). */
      rest: Buffer;
    }
  | { kind: 'close'; reason: string; clientError: boolean };

export interface HandshakeStep {
  /** Bytes to send to the client, in order. */
  out: Buffer[];
  outcome: HandshakeOutcome;
  /** Options handled in this step, for the adapter's debug log. */
  options: string[];
}

const enum State { AWAIT_CLIENT_FLAGS, AWAIT_OPTION_HEADER, AWAIT_OPTION_DATA, DONE }

export class Handshake {
  private state = State.AWAIT_CLIENT_FLAGS;
  private pending: Buffer = Buffer.alloc(0);
  private noZeroes = false;
  private structuredReplies = false;
  private baseAllocation = false;
  private metaContextExport: string | null = null;
  private optionsSeen = 0;
  private option = 0;
  private optionBytes = 0;

  constructor(private readonly catalog: ExportCatalog) {}

  /** The server's first 18 bytes. */
  greeting(): Buffer {
    const b = Buffer.alloc(18);
    b.writeBigUInt64BE(NBDMAGIC, 0);
    b.writeBigUInt64BE(IHAVEOPT, 8);
    b.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
    return b;
  }

  push(chunk: Buffer): HandshakeStep {
    const step: HandshakeStep = { out: [], outcome: { kind: 'continue' }, options: [] };
    if (this.state === State.DONE) {
      step.outcome = { kind: 'close', reason: 'data after the handshake ended', clientError: true };
      return step;
    }
    this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
    for (;;) {
      const outcome = this.advance(step);
      if (outcome === null) return step; // need more bytes
      if (outcome.kind !== 'continue') {
        this.state = State.DONE;
        step.outcome = outcome;
        return step;
      }
    }
  }

  /** One state transition; null when it needs more bytes. */
  private advance(step: HandshakeStep): HandshakeOutcome | null {
    switch (this.state) {
      case State.AWAIT_CLIENT_FLAGS: {
        if (this.pending.length < 4) return null;
        const flags = this.pending.readUInt32BE(0);
        this.consume(4);
        if ((flags & ~NBD_FLAG_C_KNOWN) !== 0) {
          return { kind: 'close', reason: `unknown client flags 0x${flags.toString(16)}`, clientError: true };
        }
        this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
        this.state = State.AWAIT_OPTION_HEADER;
        return { kind: 'continue' };
      }
      case State.AWAIT_OPTION_HEADER: {
        if (this.pending.length < 16) return null;
        const magic = this.pending.readBigUInt64BE(0);
        if (magic !== IHAVEOPT) {
          return { kind: 'close', reason: `bad option magic 0x${magic.toString(16)}`, clientError: true };
        }
        this.option = this.pending.readUInt32BE(8);
        this.optionBytes = this.pending.readUInt32BE(12);
        this.consume(16);
        if (this.optionBytes > MAX_OPTION_BYTES) {
          return {
            kind: 'close',
            reason: `${optionName(this.option)} length ${this.optionBytes} exceeds ${MAX_OPTION_BYTES}`,
            clientError: true,
          };
        }
        if (++this.optionsSeen > MAX_OPTIONS) {
          return { kind: 'close', reason: `more than ${MAX_OPTIONS} options`, clientError: true };
        }
        this.state = State.AWAIT_OPTION_DATA;
        return { kind: 'continue' };
      }
      case State.AWAIT_OPTION_DATA: {
        if (this.pending.length < this.optionBytes) return null;
        const data = this.pending.subarray(0, this.optionBytes);
        this.consume(this.optionBytes);
        this.state = State.AWAIT_OPTION_HEADER;
        step.options.push(optionName(this.option));
        return this.onOption(this.option, data, step.out);
      }
      case State.DONE:
        return { kind: 'close', reason: 'handshake already ended', clientError: true };
    }
  }

  private consume(n: number): void {
    this.pending = this.pending.subarray(n);
  }

  private onOption(option: number, data: Buffer, out: Buffer[]): HandshakeOutcome {
    switch (option) {
      case NBD_OPT_EXPORT_NAME: {
        const exp = this.catalog.lookup(data.toString('utf8'));
        if (!exp) return { kind: 'close', reason: `NBD_OPT_EXPORT_NAME: no export "${data.toString('utf8')}"`, clientError: true };
        const b = Buffer.alloc(this.noZeroes ? 10 : 134);
        b.writeBigUInt64BE(BigInt(exp.sizeBytes), 0);
        b.writeUInt16BE(this.flagsFor(exp), 8);
        out.push(b);
        return this.enterTransmission(exp);
      }
      case NBD_OPT_ABORT:
        // The spec lets the server ACK before closing; clients tolerate both.
        out.push(optionReply(option, NBD_REP_ACK));
        return { kind: 'close', reason: 'client sent NBD_OPT_ABORT', clientError: false };
      case NBD_OPT_LIST:
        if (data.length !== 0) return this.reject(out, option, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        for (const exp of this.catalog.list()) {
          const name = Buffer.from(exp.name, 'utf8');
          const payload = Buffer.alloc(4 + name.length);
          payload.writeUInt32BE(name.length, 0);
          name.copy(payload, 4);
          out.push(optionReply(option, NBD_REP_SERVER, payload));
        }
        out.push(optionReply(option, NBD_REP_ACK));
        return { kind: 'continue' };
      case NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.reject(out, option, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structuredReplies = true;
        out.push(optionReply(option, NBD_REP_ACK));
        return { kind: 'continue' };
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
        return this.onInfoOrGo(option, data, out);
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        return this.onMetaContext(option, data, out);
      default:
        // STARTTLS, EXTENDED_HEADERS, PEEK_EXPORT and anything unknown.
        return this.reject(out, option, NBD_REP_ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  private onInfoOrGo(option: number, data: Buffer, out: Buffer[]): HandshakeOutcome {
    const r = new Reader(data);
    const name = r.string();
    const count = r.u16();
    if (name === null || count === null || r.remaining !== count * 2) {
      return this.reject(out, option, NBD_REP_ERR_INVALID, `${optionName(option)}: malformed data`);
    }
    const requested = new Set<number>();
    for (let i = 0; i < count; i++) requested.add(r.u16()!);
    const exp = this.catalog.lookup(name);
    if (!exp) return this.reject(out, option, NBD_REP_ERR_UNKNOWN, `no export named "${name}"`);

    if (requested.has(NBD_INFO_NAME)) {
      const n = Buffer.from(exp.name, 'utf8');
      const p = Buffer.alloc(2 + n.length);
      p.writeUInt16BE(NBD_INFO_NAME, 0);
      n.copy(p, 2);
      out.push(optionReply(option, NBD_REP_INFO, p));
    }
    if (requested.has(NBD_INFO_DESCRIPTION) && exp.description !== '') {
      const d = Buffer.from(exp.description, 'utf8');
      const p = Buffer.alloc(2 + d.length);
      p.writeUInt16BE(NBD_INFO_DESCRIPTION, 0);
      d.copy(p, 2);
      out.push(optionReply(option, NBD_REP_INFO, p));
    }
    // Block sizes are always sent: minimum 1 means any alignment works.
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
    bs.writeUInt32BE(exp.minBlockBytes, 2);
    bs.writeUInt32BE(exp.preferredBlockBytes, 6);
    bs.writeUInt32BE(exp.maxBlockBytes, 10);
    out.push(optionReply(option, NBD_REP_INFO, bs));
    // NBD_INFO_EXPORT is mandatory.
    const ie = Buffer.alloc(12);
    ie.writeUInt16BE(NBD_INFO_EXPORT, 0);
    ie.writeBigUInt64BE(BigInt(exp.sizeBytes), 2);
    ie.writeUInt16BE(this.flagsFor(exp), 10);
    out.push(optionReply(option, NBD_REP_INFO, ie));
    out.push(optionReply(option, NBD_REP_ACK));
    return option === NBD_OPT_GO ? this.enterTransmission(exp) : { kind: 'continue' };
  }

  private onMetaContext(option: number, data: Buffer, out: Buffer[]): HandshakeOutcome {
    const set = option === NBD_OPT_SET_META_CONTEXT;
    // SET replaces the previous selection, "including when this command fails".
    if (set) {
      this.baseAllocation = false;
      this.metaContextExport = null;
    }
    if (set && !this.structuredReplies) {
      return this.reject(out, option, NBD_REP_ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first');
    }
    const r = new Reader(data);
    const name = r.string();
    const count = r.u32();
    if (name === null || count === null) return this.reject(out, option, NBD_REP_ERR_INVALID, `${optionName(option)}: malformed data`);
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      const q = r.string();
      if (q === null) return this.reject(out, option, NBD_REP_ERR_INVALID, `${optionName(option)}: malformed query ${i}`);
      queries.push(q);
    }
    if (r.remaining !== 0) return this.reject(out, option, NBD_REP_ERR_INVALID, `${optionName(option)}: trailing bytes`);
    if (!this.catalog.lookup(name)) return this.reject(out, option, NBD_REP_ERR_UNKNOWN, `no export named "${name}"`);

    // LIST with no queries lists everything; "base:" is a namespace wildcard for LIST only.
    const matches = (q: string): boolean => q === BASE_ALLOCATION || (!set && q === 'base:');
    const selected = set ? queries.some((q) => q === BASE_ALLOCATION) : count === 0 || queries.some(matches);
    if (selected) {
      const n = Buffer.from(BASE_ALLOCATION, 'utf8');
      const p = Buffer.alloc(4 + n.length);
      // LIST replies SHOULD carry id 0; SET hands out the id used in replies.
      p.writeUInt32BE(set ? BASE_ALLOCATION_CONTEXT_ID : 0, 0);
      n.copy(p, 4);
      out.push(optionReply(option, NBD_REP_META_CONTEXT, p));
    }
    if (set) {
      this.baseAllocation = selected;
      this.metaContextExport = name;
    }
    out.push(optionReply(option, NBD_REP_ACK));
    return { kind: 'continue' };
  }

  /** The spec: SEND_DF MUST be clear unless structured replies were negotiated. */
  private flagsFor(exp: ExportInfo): number {
    return this.structuredReplies ? exp.transmissionFlags : exp.transmissionFlags & ~NBD_FLAG_SEND_DF;
  }

  private enterTransmission(exp: ExportInfo): HandshakeOutcome {
    const rest = this.pending;
    this.pending = Buffer.alloc(0);
    return {
      kind: 'transmission',
      export: exp,
      structuredReplies: this.structuredReplies,
      // Contexts were selected for one export: going to another drops them (as nbdkit does).
      baseAllocation: this.baseAllocation && this.structuredReplies && this.sameExport(exp),
      rest,
    };
  }

  private sameExport(exp: ExportInfo): boolean {
    const chosen = this.metaContextExport === null ? undefined : this.catalog.lookup(this.metaContextExport);
    return chosen !== undefined && chosen.name === exp.name;
  }

  private reject(out: Buffer[], option: number, type: number, message: string): HandshakeOutcome {
    out.push(optionReply(option, type, Buffer.from(message, 'utf8')));
    return { kind: 'continue' };
  }
}

/** An option reply: magic, option, reply type, length, data. */
export function optionReply(option: number, type: number, data?: Buffer): Buffer {
  const len = data ? data.length : 0;
  const b = Buffer.alloc(20 + len);
  b.writeBigUInt64BE(NBD_OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  if (data) data.copy(b, 20);
  return b;
}

/** Bounds-checked reader over option data: every read returns null past the end. */
class Reader {
  private pos = 0;
  constructor(private readonly buf: Buffer) {}
  get remaining(): number {
    return this.buf.length - this.pos;
  }
  u16(): number | null {
    if (this.remaining < 2) return null;
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number | null {
    if (this.remaining < 4) return null;
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  /** A u32 length-prefixed string of at most NBD_MAX_STRING_BYTES. */
  string(): string | null {
    const n = this.u32();
    if (n === null || n > NBD_MAX_STRING_BYTES || this.remaining < n) return null;
    const s = this.buf.toString('utf8', this.pos, this.pos + n);
    this.pos += n;
    return s;
  }
}

