/**
 * A raw NBD client for tests: it speaks the protocol byte by byte and will send
 * what a polite client never would (bad magic, unknown commands, lying lengths).
 */
import net from 'node:net';
import {
  BASE_ALLOCATION, IHAVEOPT, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REP_ACK, NBD_REP_INFO,
  NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, NBD_INFO_EXPORT,
} from '../../nbd/constants.js';

export interface Reply {
  structured: boolean;
  error: number;
  cookie: bigint;
  /** Simple read data, or structured chunks' payloads. */
  data: Buffer;
  chunks: { flags: number; type: number; payload: Buffer }[];
}

export class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  ended = false;
  sizeBytes = 0;
  transmissionFlags = 0;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    const end = (): void => {
      this.ended = true;
      this.wake();
    };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', end);
  }

  static connect(port: number, host = '127.0.0.1'): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host }, () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Exactly n bytes, or null if the server closed first. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.ended) return null;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes (have ${this.buf.length})`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves true when the server closes the connection within timeoutMs. */
  async closedWithin(timeoutMs = 3000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return this.ended;
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  close(): void {
    this.socket.destroy();
  }

  // ── handshake ──────────────────────────────────────────────────────────────
  async greeting(): Promise<number> {
    const g = await this.read(18);
    if (!g) throw new Error('no greeting');
    return g.readUInt16BE(16);
  }

  sendClientFlags(flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags);
    this.write(b);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), announcedLength = data.length): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(announcedLength, 12);
    this.write(Buffer.concat([h, data]));
  }

  /** One option reply: { option, type, data }, or null on close. */
  async optionReply(): Promise<{ option: number; type: number; data: Buffer } | null> {
    const h = await this.read(20);
    if (!h) return null;
    const len = h.readUInt32BE(16);
    const data = len ? await this.read(len) : Buffer.alloc(0);
    if (!data) return null;
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** Replies to one option up to and including its ACK or error. */
  async optionReplies(): Promise<{ option: number; type: number; data: Buffer }[]> {
    const out = [];
    for (;;) {
      const r = await this.optionReply();
      if (!r) return out;
      out.push(r);
      if (r.type !== NBD_REP_INFO && r.type !== 2 && r.type !== 4) return out;
    }
  }

  /** Full polite handshake with NBD_OPT_GO; optionally structured replies + base:allocation. */
  async handshake(exportName = '', o: { structured?: boolean; metaContext?: boolean } = {}): Promise<void> {
    await this.greeting();
    this.sendClientFlags();
    if (o.structured) {
      this.sendOption(NBD_OPT_STRUCTURED_REPLY);
      const r = await this.optionReply();
      if (r?.type !== NBD_REP_ACK) throw new Error('structured replies refused');
    }
    if (o.metaContext) {
      const name = Buffer.from(exportName);
      const q = Buffer.from(BASE_ALLOCATION);
      const d = Buffer.alloc(4 + name.length + 4 + 4 + q.length);
      d.writeUInt32BE(name.length, 0);
      name.copy(d, 4);
      d.writeUInt32BE(1, 4 + name.length);
      d.writeUInt32BE(q.length, 8 + name.length);
      q.copy(d, 12 + name.length);
      this.sendOption(NBD_OPT_SET_META_CONTEXT, d);
      await this.optionReplies();
    }
    const name = Buffer.from(exportName);
    const d = Buffer.alloc(4 + name.length + 2);
    d.writeUInt32BE(name.length, 0);
    name.copy(d, 4);
    this.sendOption(NBD_OPT_GO, d);
    for (const r of await this.optionReplies()) {
      if (r.type === NBD_REP_INFO && r.data.readUInt16BE(0) === NBD_INFO_EXPORT) {
        this.sizeBytes = Number(r.data.readBigUInt64BE(2));
        this.transmissionFlags = r.data.readUInt16BE(10);
      } else if (r.type !== NBD_REP_INFO && r.type !== NBD_REP_ACK) {
        throw new Error(`NBD_OPT_GO failed: reply type 0x${r.type.toString(16)} ${r.data.toString()}`);
      }
    }
  }

  // ── transmission ───────────────────────────────────────────────────────────
  sendRequest(type: number, o: { flags?: number; cookie?: bigint; offset?: bigint | number; length?: number; payload?: Buffer; magic?: number } = {}): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(o.magic ?? NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(o.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(o.cookie ?? 1n, 8);
    h.writeBigUInt64BE(BigInt(o.offset ?? 0), 16);
    h.writeUInt32BE(o.length ?? o.payload?.length ?? 0, 24);
    this.write(o.payload ? Buffer.concat([h, o.payload]) : h);
  }

  /**
   * One reply. For a simple reply to a read, pass readLength to collect the data.
   * Structured replies are collected chunk by chunk until the DONE flag.
   */
  async reply(readLength = 0, timeoutMs = 5000): Promise<Reply | null> {
    const magicBuf = await this.read(4, timeoutMs);
    if (!magicBuf) return null;
    const magic = magicBuf.readUInt32BE(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      const h = await this.read(12, timeoutMs);
      if (!h) return null;
      const error = h.readUInt32BE(0);
      const data = error === 0 && readLength > 0 ? await this.read(readLength, timeoutMs) : Buffer.alloc(0);
      if (!data) return null;
      return { structured: false, error, cookie: h.readBigUInt64BE(4), data, chunks: [] };
    }
    if (magic !== NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const chunks: Reply['chunks'] = [];
    let cookie = 0n;
    let error = 0;
    let flags = 0;
    let first = true;
    do {
      if (!first) {
        const m = await this.read(4, timeoutMs);
        if (!m) return null;
      }
      first = false;
      const h = await this.read(16, timeoutMs);
      if (!h) return null;
      flags = h.readUInt16BE(0);
      const type = h.readUInt16BE(2);
      cookie = h.readBigUInt64BE(4);
      const len = h.readUInt32BE(12);
      const payload = len ? await this.read(len, timeoutMs) : Buffer.alloc(0);
      if (!payload) return null;
      if (type & 0x8000) error = payload.readUInt32BE(0);
      chunks.push({ flags, type, payload });
    } while ((flags & NBD_REPLY_FLAG_DONE) === 0);
    const data = Buffer.concat(chunks.filter((c) => c.type === 1).map((c) => c.payload.subarray(8)));
    return { structured: true, error, cookie, data, chunks };
  }
}
