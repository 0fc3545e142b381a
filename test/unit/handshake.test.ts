/**
 * Fixed newstyle negotiation, driven byte for byte: every test feeds the pure
 * `Handshake` client bytes and checks the exact bytes it answers with, decoded by
 * a hand-written parser that follows doc/proto.md (not the module's own encoders).
 */
import test from 'ava';
import type { ExecutionContext } from 'ava';
import fc from 'fast-check';
import { deepStrictEqual } from 'node:assert/strict';

import {
  BASE_ALLOCATION_CONTEXT_ID, Handshake, MAX_OPTION_BYTES, MAX_OPTIONS,
  type ExportCatalog, type ExportInfo, type HandshakeOutcome,
} from '../../nbd/handshake.js';
import { transmissionFlagsFor } from '../../nbd/export.js';
import type { Backend } from '../../src/storage/backend.js';

// ── Spec values, written out from doc/proto.md rather than imported ─────────
const OPT_REPLY_MAGIC = 0x0003e889045565a9n;
const FLAG_FIXED_NEWSTYLE = 1; // handshake flags
const FLAG_NO_ZEROES = 2;
const C_FIXED_NEWSTYLE = 1; // client flags
const C_NO_ZEROES = 2;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_LIST = 3;
const OPT_PEEK_EXPORT = 4;
const OPT_STARTTLS = 5;
const OPT_INFO = 6;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_LIST_META_CONTEXT = 9;
const OPT_SET_META_CONTEXT = 10;
const OPT_EXTENDED_HEADERS = 11;

const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERR_UNSUP = 2 ** 31 + 1;
const REP_ERR_INVALID = 2 ** 31 + 3;
const REP_ERR_UNKNOWN = 2 ** 31 + 6;

const INFO_EXPORT = 0;
const INFO_NAME = 1;
const INFO_DESCRIPTION = 2;
const INFO_BLOCK_SIZE = 3;

const FLAG_HAS_FLAGS = 1 << 0;
const FLAG_READ_ONLY = 1 << 1;
const FLAG_SEND_FLUSH = 1 << 2;
const FLAG_SEND_FUA = 1 << 3;
const FLAG_SEND_TRIM = 1 << 5;
const FLAG_SEND_WRITE_ZEROES = 1 << 6;
const FLAG_SEND_DF = 1 << 7;
const FLAG_CAN_MULTI_CONN = 1 << 8;
const FLAG_SEND_CACHE = 1 << 10;

// ── A catalog with a default export, a read-only one and a non-ASCII name ───
const DISK: ExportInfo = {
  name: 'disk',
  description: 'a test disk',
  sizeBytes: 0x1_2345_6000, // above 2^32: both halves of the u64 matter
  transmissionFlags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE,
  minBlockBytes: 1,
  preferredBlockBytes: 4096,
  maxBlockBytes: 32 * 1024 * 1024,
};
const DATA: ExportInfo = {
  name: 'data',
  description: '',
  sizeBytes: 1024 * 1024,
  transmissionFlags: FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH,
  minBlockBytes: 512,
  preferredBlockBytes: 8192,
  maxBlockBytes: 1024 * 1024,
};
const UNICODE: ExportInfo = {
  name: 'dïsk-ü€',
  description: 'détails €',
  sizeBytes: 4096,
  transmissionFlags: FLAG_HAS_FLAGS,
  minBlockBytes: 1,
  preferredBlockBytes: 4096,
  maxBlockBytes: 4096,
};

class Catalog implements ExportCatalog {
  constructor(private readonly exports: ExportInfo[], private readonly defaultName: string | null) {}
  lookup(name: string): ExportInfo | undefined {
    const exact = this.exports.find((e) => e.name === name);
    if (exact) return exact;
    return name === '' && this.defaultName !== null ? this.exports.find((e) => e.name === this.defaultName) : undefined;
  }
  list(): readonly ExportInfo[] {
    return this.exports;
  }
}
const CATALOG = new Catalog([DISK, DATA, UNICODE], 'disk');

// ── Client-side encoders ─────────────────────────────────────────────────────
function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}
function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}
/** A u32-length-prefixed string. */
function str(s: string | Buffer): Buffer {
  const b = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
  return Buffer.concat([u32(b.length), b]);
}
const EMPTY = Buffer.alloc(0);
/** An option request; `declared` overrides the length field. */
function opt(option: number, data: Buffer = EMPTY, declared = data.length): Buffer {
  return Buffer.concat([Buffer.from('IHAVEOPT', 'ascii'), u32(option), u32(declared), data]);
}
function goData(name: string, infos: number[] = []): Buffer {
  return Buffer.concat([str(name), u16(infos.length), ...infos.map(u16)]);
}
function metaData(name: string, queries: string[]): Buffer {
  return Buffer.concat([str(name), u32(queries.length), ...queries.map((q) => str(q))]);
}

// ── Server-side decoders ────────────────────────────────────────────────────
interface OptReply {
  option: number;
  type: number;
  data: Buffer;
}
/** Split server output into option replies; throws on anything that is not one. */
function parseReplies(buf: Buffer): OptReply[] {
  const out: OptReply[] = [];
  let p = 0;
  while (p < buf.length) {
    if (buf.length - p < 20) throw new Error(`truncated option reply header at byte ${p}`);
    const magic = buf.readBigUInt64BE(p);
    if (magic !== OPT_REPLY_MAGIC) throw new Error(`bad option reply magic 0x${magic.toString(16)} at byte ${p}`);
    const len = buf.readUInt32BE(p + 16);
    if (p + 20 + len > buf.length) throw new Error(`option reply at byte ${p} announces ${len} bytes past the end`);
    out.push({ option: buf.readUInt32BE(p + 8), type: buf.readUInt32BE(p + 12), data: buf.subarray(p + 20, p + 20 + len) });
    p += 20 + len;
  }
  return out;
}

type Info =
  | { kind: 'export'; size: bigint; flags: number }
  | { kind: 'name'; name: string }
  | { kind: 'description'; description: string }
  | { kind: 'block_size'; min: number; preferred: number; max: number }
  | { kind: 'other'; type: number };

function decodeInfo(r: OptReply): Info {
  if (r.type !== REP_INFO) throw new Error(`not NBD_REP_INFO: ${r.type}`);
  if (r.data.length < 2) throw new Error('NBD_REP_INFO shorter than 2 bytes');
  const type = r.data.readUInt16BE(0);
  switch (type) {
    case INFO_EXPORT:
      if (r.data.length !== 12) throw new Error(`NBD_INFO_EXPORT length ${r.data.length}, spec says 12`);
      return { kind: 'export', size: r.data.readBigUInt64BE(2), flags: r.data.readUInt16BE(10) };
    case INFO_NAME:
      return { kind: 'name', name: r.data.toString('utf8', 2) };
    case INFO_DESCRIPTION:
      return { kind: 'description', description: r.data.toString('utf8', 2) };
    case INFO_BLOCK_SIZE:
      if (r.data.length !== 14) throw new Error(`NBD_INFO_BLOCK_SIZE length ${r.data.length}, spec says 14`);
      return { kind: 'block_size', min: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), max: r.data.readUInt32BE(10) };
    default:
      return { kind: 'other', type };
  }
}

function decodeServer(r: OptReply): { name: string; details: Buffer } {
  const n = r.data.readUInt32BE(0);
  if (n > r.data.length - 4) throw new Error('NBD_REP_SERVER name length past the reply');
  return { name: r.data.toString('utf8', 4, 4 + n), details: r.data.subarray(4 + n) };
}

function decodeMetaContext(r: OptReply): { id: number; name: string } {
  if (r.type !== REP_META_CONTEXT) throw new Error(`not NBD_REP_META_CONTEXT: ${r.type}`);
  return { id: r.data.readUInt32BE(0), name: r.data.toString('utf8', 4) };
}

/** Human-readable tag of a reply, for table comparisons: "INFO:EXPORT", "ERR_INVALID", ... */
function tag(r: OptReply): string {
  switch (r.type) {
    case REP_ACK: return 'ACK';
    case REP_SERVER: return `SERVER:${decodeServer(r).name}`;
    case REP_META_CONTEXT: return `META_CONTEXT:${decodeMetaContext(r).name}`;
    case REP_INFO: {
      const i = decodeInfo(r);
      return `INFO:${i.kind === 'other' ? i.type : i.kind.toUpperCase()}`;
    }
    case REP_ERR_UNSUP: return 'ERR_UNSUP';
    case REP_ERR_INVALID: return 'ERR_INVALID';
    case REP_ERR_UNKNOWN: return 'ERR_UNKNOWN';
    default: return `REP(${r.type})`;
  }
}

// ── A client session over one Handshake ─────────────────────────────────────
interface Sent {
  out: Buffer;
  outcome: HandshakeOutcome;
  replies(): OptReply[];
}

class Session {
  readonly h: Handshake;
  constructor(clientFlags = C_FIXED_NEWSTYLE | C_NO_ZEROES, catalog: ExportCatalog = CATALOG) {
    this.h = new Handshake(catalog);
    const step = this.h.push(u32(clientFlags));
    if (step.out.length !== 0 || step.outcome.kind !== 'continue') {
      throw new Error(`client flags 0x${clientFlags.toString(16)} were not accepted: ${JSON.stringify(step.outcome)}`);
    }
  }
  send(...chunks: Buffer[]): Sent {
    const step = this.h.push(Buffer.concat(chunks));
    const out = Buffer.concat(step.out);
    return { out, outcome: step.outcome, replies: () => parseReplies(out) };
  }
}

function transmission(t: ExecutionContext, o: HandshakeOutcome): Extract<HandshakeOutcome, { kind: 'transmission' }> {
  if (o.kind !== 'transmission') {
    t.fail(`expected transmission, got ${JSON.stringify(o)}`);
    throw new Error('not transmission');
  }
  return o;
}

/** Every reply answers `option`, and the error replies carry a printable UTF-8 message. */
function checkReplies(t: ExecutionContext, replies: OptReply[], option: number): void {
  for (const r of replies) {
    t.is(r.option, option, `reply ${tag(r)} must echo option ${option}`);
    if (r.type >= 2 ** 31) {
      t.true(r.data.length <= 4096, 'error message within the 4096-byte string limit');
      t.notThrows(() => new TextDecoder('utf-8', { fatal: true }).decode(r.data), 'error message is UTF-8');
      t.false(r.data.includes(0), 'error message contains no NUL');
    }
  }
}

/** The three infos a successful INFO/GO for `exp` must carry, whatever the order. */
function checkInfoReplies(t: ExecutionContext, replies: OptReply[], exp: ExportInfo, option: number): Info[] {
  checkReplies(t, replies, option);
  t.true(replies.length >= 3);
  const last = replies[replies.length - 1]!;
  t.is(last.type, REP_ACK, 'success ends with NBD_REP_ACK');
  t.is(last.data.length, 0, 'NBD_REP_ACK has no data');
  const infos = replies.slice(0, -1).map(decodeInfo);
  const exportInfos = infos.filter((i) => i.kind === 'export');
  t.deepEqual(exportInfos, [{ kind: 'export', size: BigInt(exp.sizeBytes), flags: exp.transmissionFlags }]);
  t.deepEqual(infos.filter((i) => i.kind === 'block_size'), [
    { kind: 'block_size', min: exp.minBlockBytes, preferred: exp.preferredBlockBytes, max: exp.maxBlockBytes },
  ]);
  return infos;
}

// ── Greeting and client flags ───────────────────────────────────────────────

test('greeting: NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE|NO_ZEROES (18 bytes)', (t) => {
  const g = new Handshake(CATALOG).greeting();
  t.is(g.length, 18);
  t.is(g.subarray(0, 8).toString('ascii'), 'NBDMAGIC');
  t.is(g.subarray(8, 16).toString('ascii'), 'IHAVEOPT');
  t.is(g.readUInt16BE(16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
  t.is(g.toString('hex'), '4e42444d41474943' + '49484156454f5054' + '0003');
});

test('client flags: every combination of the two known flags is accepted silently', (t) => {
  for (const flags of [0, C_FIXED_NEWSTYLE, C_NO_ZEROES, C_FIXED_NEWSTYLE | C_NO_ZEROES]) {
    const step = new Handshake(CATALOG).push(u32(flags));
    t.deepEqual(step.out, [], `flags ${flags}`);
    t.deepEqual(step.outcome, { kind: 'continue' }, `flags ${flags}`);
  }
});

test('client flags: an unknown bit closes the connection (client error), nothing sent', (t) => {
  for (const flags of [1 << 2, C_FIXED_NEWSTYLE | (1 << 5), 0x80000000, 0xffffffff]) {
    const step = new Handshake(CATALOG).push(u32(flags));
    t.deepEqual(step.out, [], `flags 0x${flags.toString(16)}`);
    t.is(step.outcome.kind, 'close', `flags 0x${flags.toString(16)}`);
    if (step.outcome.kind === 'close') t.true(step.outcome.clientError);
  }
});

test('client flags arriving in pieces are waited for; options in the same chunk are handled', (t) => {
  const h = new Handshake(CATALOG);
  for (const b of u32(C_FIXED_NEWSTYLE | C_NO_ZEROES).subarray(0, 3)) {
    const step = h.push(Buffer.from([b]));
    t.deepEqual(step.out, []);
    t.deepEqual(step.outcome, { kind: 'continue' });
  }
  const step = h.push(Buffer.concat([Buffer.from([C_FIXED_NEWSTYLE | C_NO_ZEROES]), opt(OPT_STRUCTURED_REPLY)]));
  t.deepEqual(parseReplies(Buffer.concat(step.out)).map(tag), ['ACK']);
  t.deepEqual(step.options, ['NBD_OPT_STRUCTURED_REPLY']);
});

test('a push after the handshake ended is refused as a close', (t) => {
  const s = new Session();
  s.send(opt(OPT_ABORT));
  const after = s.send(opt(OPT_LIST));
  t.is(after.out.length, 0);
  t.is(after.outcome.kind, 'close');
});

// ── NBD_OPT_LIST ────────────────────────────────────────────────────────────

test('NBD_OPT_LIST: one NBD_REP_SERVER per export, names length-prefixed in bytes, then ACK', (t) => {
  const s = new Session();
  const r = s.send(opt(OPT_LIST));
  t.deepEqual(r.outcome, { kind: 'continue' });
  const replies = r.replies();
  checkReplies(t, replies, OPT_LIST);
  t.deepEqual(replies.map((x) => x.type), [REP_SERVER, REP_SERVER, REP_SERVER, REP_ACK]);
  const servers = replies.slice(0, 3).map(decodeServer);
  t.deepEqual(servers.map((x) => x.name), ['disk', 'data', 'dïsk-ü€']);
  // The length field counts UTF-8 bytes, not characters.
  t.is(replies[2]!.data.readUInt32BE(0), Buffer.byteLength('dïsk-ü€'));
  t.is(replies[3]!.data.length, 0);
});

test('NBD_OPT_LIST with data: NBD_REP_ERR_INVALID only, negotiation continues', (t) => {
  const s = new Session();
  const r = s.send(opt(OPT_LIST, Buffer.from('junk')));
  t.deepEqual(r.outcome, { kind: 'continue' });
  const replies = r.replies();
  checkReplies(t, replies, OPT_LIST);
  t.deepEqual(replies.map(tag), ['ERR_INVALID']);
  t.deepEqual(s.send(opt(OPT_LIST)).replies().map((x) => x.type), [REP_SERVER, REP_SERVER, REP_SERVER, REP_ACK]);
});

test('NBD_OPT_LIST of an empty catalog is a bare ACK', (t) => {
  const s = new Session(C_FIXED_NEWSTYLE, new Catalog([], null));
  t.deepEqual(s.send(opt(OPT_LIST)).replies().map(tag), ['ACK']);
});

// ── NBD_OPT_GO / NBD_OPT_INFO ───────────────────────────────────────────────

test('NBD_OPT_GO for a known export: INFO EXPORT + BLOCK_SIZE, ACK, then transmission', (t) => {
  const s = new Session();
  const r = s.send(opt(OPT_GO, goData('disk')));
  const replies = r.replies();
  const infos = checkInfoReplies(t, replies, DISK, OPT_GO);
  // Nothing was requested: no NAME or DESCRIPTION.
  t.deepEqual(infos.map((i) => i.kind).sort(), ['block_size', 'export']);
  // The output is exactly the replies: no zero padding after the ACK (spec MUST NOT).
  t.is(r.out.length, replies.reduce((n, x) => n + 20 + x.data.length, 0));
  t.is(r.out.subarray(-20).readUInt32BE(12), REP_ACK);
  const o = transmission(t, r.outcome);
  t.is(o.export, DISK);
  t.false(o.structuredReplies);
  t.false(o.baseAllocation);
  t.is(o.rest.length, 0);
});

test('NBD_OPT_GO size is a full u64 and flags are the export\'s transmission flags', (t) => {
  const r = new Session().send(opt(OPT_GO, goData('disk')));
  const ie = r.replies().find((x) => x.type === REP_INFO && x.data.readUInt16BE(0) === INFO_EXPORT)!;
  t.is(ie.data.length, 12);
  t.is(ie.data.readUInt32BE(2), 0x1, 'high 32 bits of the size');
  t.is(ie.data.readUInt32BE(6), 0x2345_6000, 'low 32 bits of the size');
  t.is(ie.data.readUInt16BE(10), DISK.transmissionFlags);
});

test('NBD_OPT_GO with NAME and DESCRIPTION requested sends both', (t) => {
  const r = new Session().send(opt(OPT_GO, goData('disk', [INFO_NAME, INFO_DESCRIPTION])));
  const infos = checkInfoReplies(t, r.replies(), DISK, OPT_GO);
  t.deepEqual(infos.filter((i) => i.kind === 'name'), [{ kind: 'name', name: 'disk' }]);
  t.deepEqual(infos.filter((i) => i.kind === 'description'), [{ kind: 'description', description: 'a test disk' }]);
  t.is(transmission(t, r.outcome).export, DISK);
});

test('NBD_OPT_GO with a non-ASCII name: INFO NAME carries the UTF-8 bytes', (t) => {
  const r = new Session().send(opt(OPT_GO, goData('dïsk-ü€', [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])));
  const infos = checkInfoReplies(t, r.replies(), UNICODE, OPT_GO);
  t.deepEqual(infos.filter((i) => i.kind === 'name'), [{ kind: 'name', name: 'dïsk-ü€' }]);
  t.deepEqual(infos.filter((i) => i.kind === 'description'), [{ kind: 'description', description: 'détails €' }]);
  t.is(transmission(t, r.outcome).export, UNICODE);
});

test('NBD_OPT_GO: unknown information requests are ignored, duplicates answered once', (t) => {
  const r = new Session().send(opt(OPT_GO, goData('data', [0x7777, INFO_BLOCK_SIZE, INFO_BLOCK_SIZE])));
  const infos = checkInfoReplies(t, r.replies(), DATA, OPT_GO);
  t.deepEqual(infos.filter((i) => i.kind === 'other'), []);
  t.is(transmission(t, r.outcome).export, DATA);
});

test('NBD_OPT_GO with the empty name reaches the default export (NAME gives its canonical name)', (t) => {
  const r = new Session().send(opt(OPT_GO, goData('', [INFO_NAME])));
  const infos = checkInfoReplies(t, r.replies(), DISK, OPT_GO);
  t.deepEqual(infos.filter((i) => i.kind === 'name'), [{ kind: 'name', name: 'disk' }]);
  t.is(transmission(t, r.outcome).export, DISK);
});

test('NBD_OPT_GO with the empty name and no default export: ERR_UNKNOWN', (t) => {
  const s = new Session(C_FIXED_NEWSTYLE, new Catalog([DATA], null));
  const r = s.send(opt(OPT_GO, goData('')));
  t.deepEqual(r.replies().map(tag), ['ERR_UNKNOWN']);
  t.deepEqual(r.outcome, { kind: 'continue' });
});

test('NBD_OPT_GO for an unknown export: only NBD_REP_ERR_UNKNOWN, negotiation continues', (t) => {
  const s = new Session();
  const r = s.send(opt(OPT_GO, goData('nosuch', [INFO_NAME])));
  const replies = r.replies();
  checkReplies(t, replies, OPT_GO);
  t.deepEqual(replies.map(tag), ['ERR_UNKNOWN'], 'no NBD_REP_INFO before the error (spec SHOULD NOT)');
  t.deepEqual(r.outcome, { kind: 'continue' });
  // Names are exact: case and a trailing NUL do not match.
  t.deepEqual(s.send(opt(OPT_GO, goData('DISK'))).replies().map(tag), ['ERR_UNKNOWN']);
  t.deepEqual(s.send(opt(OPT_GO, goData('disk\0'))).replies().map(tag), ['ERR_UNKNOWN']);
  const ok = s.send(opt(OPT_GO, goData('data')));
  checkInfoReplies(t, ok.replies(), DATA, OPT_GO);
  t.is(transmission(t, ok.outcome).export, DATA);
});

test('NBD_OPT_INFO answers like GO but does not end negotiation', (t) => {
  const s = new Session();
  const info = s.send(opt(OPT_INFO, goData('disk', [INFO_NAME, INFO_DESCRIPTION])));
  t.deepEqual(info.outcome, { kind: 'continue' });
  const infoReplies = info.replies();
  const infos = checkInfoReplies(t, infoReplies, DISK, OPT_INFO);
  // INFO again, then GO with the same parameters: the same set of information (spec MUST).
  const again = s.send(opt(OPT_INFO, goData('disk', [INFO_NAME, INFO_DESCRIPTION])));
  t.deepEqual(again.out, info.out);
  const go = s.send(opt(OPT_GO, goData('disk', [INFO_NAME, INFO_DESCRIPTION])));
  const goInfos = checkInfoReplies(t, go.replies(), DISK, OPT_GO);
  const key = (i: Info): string => JSON.stringify(i, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
  t.deepEqual(goInfos.map(key).sort(), infos.map(key).sort());
  t.is(transmission(t, go.outcome).export, DISK);
});

test('NBD_OPT_INFO for an unknown export: ERR_UNKNOWN and continue', (t) => {
  const r = new Session().send(opt(OPT_INFO, goData('nope')));
  t.deepEqual(r.replies().map(tag), ['ERR_UNKNOWN']);
  t.deepEqual(r.outcome, { kind: 'continue' });
});

// ── NBD_OPT_EXPORT_NAME ─────────────────────────────────────────────────────

test('NBD_OPT_EXPORT_NAME with NO_ZEROES: exactly 10 bytes (size, flags)', (t) => {
  const r = new Session(C_FIXED_NEWSTYLE | C_NO_ZEROES).send(opt(OPT_EXPORT_NAME, Buffer.from('data')));
  t.is(r.out.length, 10);
  t.is(r.out.readBigUInt64BE(0), BigInt(DATA.sizeBytes));
  t.is(r.out.readUInt16BE(8), DATA.transmissionFlags);
  const o = transmission(t, r.outcome);
  t.is(o.export, DATA);
  t.is(o.rest.length, 0);
});

test('NBD_OPT_EXPORT_NAME without NO_ZEROES: 134 bytes, the last 124 zero', (t) => {
  const r = new Session(C_FIXED_NEWSTYLE).send(opt(OPT_EXPORT_NAME, Buffer.from('disk')));
  t.is(r.out.length, 134);
  t.is(r.out.readBigUInt64BE(0), BigInt(DISK.sizeBytes));
  t.is(r.out.readUInt16BE(8), DISK.transmissionFlags);
  t.true(r.out.subarray(10).equals(Buffer.alloc(124)));
  t.is(transmission(t, r.outcome).export, DISK);
});

test('NBD_OPT_EXPORT_NAME with NO_ZEROES but without FIXED_NEWSTYLE still drops the zeroes', (t) => {
  const r = new Session(C_NO_ZEROES).send(opt(OPT_EXPORT_NAME, Buffer.from('disk')));
  t.is(r.out.length, 10);
});

test('NBD_OPT_EXPORT_NAME with the empty name reaches the default export', (t) => {
  const r = new Session().send(opt(OPT_EXPORT_NAME));
  t.is(r.out.length, 10);
  t.is(r.out.readBigUInt64BE(0), BigInt(DISK.sizeBytes));
  t.is(transmission(t, r.outcome).export, DISK);
});

test('NBD_OPT_EXPORT_NAME of an unknown export closes (the only way to refuse), nothing sent', (t) => {
  const r = new Session().send(opt(OPT_EXPORT_NAME, Buffer.from('nosuch')));
  t.is(r.out.length, 0);
  t.is(r.outcome.kind, 'close');
  if (r.outcome.kind === 'close') {
    t.true(r.outcome.clientError);
    t.regex(r.outcome.reason, /nosuch/);
  }
});

// ── NBD_OPT_STRUCTURED_REPLY ────────────────────────────────────────────────

test('NBD_OPT_STRUCTURED_REPLY: ACK, and GO reports structuredReplies', (t) => {
  const s = new Session();
  const r = s.send(opt(OPT_STRUCTURED_REPLY));
  checkReplies(t, r.replies(), OPT_STRUCTURED_REPLY);
  t.deepEqual(r.replies().map(tag), ['ACK']);
  t.is(r.replies()[0]!.data.length, 0);
  const o = transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome);
  t.true(o.structuredReplies);
  t.false(o.baseAllocation);
});

test('NBD_OPT_STRUCTURED_REPLY with data: ERR_INVALID and structured replies stay off', (t) => {
  const s = new Session();
  const r = s.send(opt(OPT_STRUCTURED_REPLY, Buffer.from([0])));
  checkReplies(t, r.replies(), OPT_STRUCTURED_REPLY);
  t.deepEqual(r.replies().map(tag), ['ERR_INVALID']);
  t.false(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).structuredReplies);
});

test('NBD_OPT_STRUCTURED_REPLY carries over to NBD_OPT_EXPORT_NAME', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  t.true(transmission(t, s.send(opt(OPT_EXPORT_NAME, Buffer.from('disk'))).outcome).structuredReplies);
});

// ── Transmission flags vs negotiation (spec: NBD_FLAG_SEND_DF) ──────────────

/** The flags a real, writable NbdExport advertises (export.ts). */
const REAL_FLAGS = transmissionFlagsFor({
  readOnly: false,
  capabilities: { trim: true, fastZero: true, extents: true, multiConn: true },
} as unknown as Backend);
const REAL: ExportInfo = { ...DISK, name: 'real', transmissionFlags: REAL_FLAGS };
const REAL_CATALOG = new Catalog([REAL], 'real');

test('a real export advertises NBD_FLAG_SEND_DF (precondition of the next tests)', (t) => {
  t.not(REAL_FLAGS & FLAG_SEND_DF, 0);
  t.not(REAL_FLAGS & FLAG_HAS_FLAGS, 0);
});

test('NBD_OPT_GO after STRUCTURED_REPLY advertises NBD_FLAG_SEND_DF (READ supports DF then)', (t) => {
  const s = new Session(C_FIXED_NEWSTYLE | C_NO_ZEROES, REAL_CATALOG);
  s.send(opt(OPT_STRUCTURED_REPLY));
  const infos = s.send(opt(OPT_GO, goData('real'))).replies().slice(0, -1).map(decodeInfo);
  const ie = infos.find((i) => i.kind === 'export');
  t.truthy(ie);
  if (ie?.kind === 'export') t.not(ie.flags & FLAG_SEND_DF, 0);
});

// Spec, "Transmission flags", bit 7: the server "MUST leave this flag clear if
// structured replies have not been negotiated".
test('NBD_OPT_GO without STRUCTURED_REPLY must not advertise NBD_FLAG_SEND_DF', (t) => {
  const s = new Session(C_FIXED_NEWSTYLE | C_NO_ZEROES, REAL_CATALOG);
  const r = s.send(opt(OPT_GO, goData('real')));
  const ie = r.replies().slice(0, -1).map(decodeInfo).find((i) => i.kind === 'export');
  t.truthy(ie);
  if (ie?.kind === 'export') t.is(ie.flags & FLAG_SEND_DF, 0, `NBD_INFO_EXPORT flags 0x${ie.flags.toString(16)} have SEND_DF set`);
});

test('NBD_OPT_EXPORT_NAME without STRUCTURED_REPLY must not advertise NBD_FLAG_SEND_DF', (t) => {
  const r = new Session(C_FIXED_NEWSTYLE | C_NO_ZEROES, REAL_CATALOG).send(opt(OPT_EXPORT_NAME, Buffer.from('real')));
  t.is(r.out.length, 10);
  const flags = r.out.readUInt16BE(8);
  t.is(flags & FLAG_SEND_DF, 0, `transmission flags 0x${flags.toString(16)} have SEND_DF set`);
});

// ── Metadata contexts ───────────────────────────────────────────────────────

test('NBD_OPT_SET_META_CONTEXT before STRUCTURED_REPLY: ERR_INVALID, nothing selected', (t) => {
  const s = new Session();
  const r = s.send(opt(OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
  checkReplies(t, r.replies(), OPT_SET_META_CONTEXT);
  t.deepEqual(r.replies().map(tag), ['ERR_INVALID']);
  t.deepEqual(r.outcome, { kind: 'continue' });
  s.send(opt(OPT_STRUCTURED_REPLY));
  const o = transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome);
  t.true(o.structuredReplies);
  t.false(o.baseAllocation);
});

test('NBD_OPT_SET_META_CONTEXT base:allocation: META_CONTEXT (id 1) + ACK; GO reports baseAllocation', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  const r = s.send(opt(OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
  const replies = r.replies();
  checkReplies(t, replies, OPT_SET_META_CONTEXT);
  t.deepEqual(replies.map((x) => x.type), [REP_META_CONTEXT, REP_ACK]);
  t.deepEqual(decodeMetaContext(replies[0]!), { id: 1, name: 'base:allocation' });
  t.is(BASE_ALLOCATION_CONTEXT_ID, 1);
  t.is(replies[0]!.data.length, 4 + 'base:allocation'.length);
  const o = transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome);
  t.true(o.structuredReplies);
  t.true(o.baseAllocation);
});

test('NBD_OPT_SET_META_CONTEXT: base:allocation among unknown queries is still selected once', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  const r = s.send(opt(OPT_SET_META_CONTEXT, metaData('disk', ['x-foo:bar', 'base:allocation', 'qemu:dirty-bitmap:a'])));
  t.deepEqual(r.replies().map(tag), ['META_CONTEXT:base:allocation', 'ACK']);
  t.true(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).baseAllocation);
});

test('NBD_OPT_SET_META_CONTEXT: "base:", unknown leaf, unknown namespace, or no query select nothing', (t) => {
  for (const queries of [['base:'], ['base:nosuch'], ['x-foo:bar'], [], ['BASE:ALLOCATION']]) {
    const s = new Session();
    s.send(opt(OPT_STRUCTURED_REPLY));
    const r = s.send(opt(OPT_SET_META_CONTEXT, metaData('disk', queries)));
    t.deepEqual(r.replies().map(tag), ['ACK'], JSON.stringify(queries));
    t.false(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).baseAllocation, JSON.stringify(queries));
  }
});

test('NBD_OPT_SET_META_CONTEXT replaces the previous selection', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  s.send(opt(OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
  t.deepEqual(s.send(opt(OPT_SET_META_CONTEXT, metaData('disk', ['x-foo:bar']))).replies().map(tag), ['ACK']);
  t.false(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).baseAllocation);
});

test('NBD_OPT_SET_META_CONTEXT for an unknown export: ERR_UNKNOWN', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  const r = s.send(opt(OPT_SET_META_CONTEXT, metaData('nosuch', ['base:allocation'])));
  checkReplies(t, r.replies(), OPT_SET_META_CONTEXT);
  t.deepEqual(r.replies().map(tag), ['ERR_UNKNOWN']);
  t.false(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).baseAllocation);
});

// Spec, NBD_OPT_SET_META_CONTEXT: "Issuing this command replaces all
// previously-set metadata contexts (including when this command fails)".
test('a failed NBD_OPT_SET_META_CONTEXT (unknown export) clears an earlier selection', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  t.deepEqual(s.send(opt(OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation']))).replies().map(tag),
    ['META_CONTEXT:base:allocation', 'ACK']);
  t.deepEqual(s.send(opt(OPT_SET_META_CONTEXT, metaData('nosuch', ['base:allocation']))).replies().map(tag), ['ERR_UNKNOWN']);
  t.false(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).baseAllocation,
    'the failed SET_META_CONTEXT must leave no context selected');
});

test('a failed NBD_OPT_SET_META_CONTEXT (malformed) clears an earlier selection', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  s.send(opt(OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
  const bad = Buffer.concat([str('disk'), u32(2), str('base:allocation')]); // 2 queries announced, 1 sent
  t.deepEqual(s.send(opt(OPT_SET_META_CONTEXT, bad)).replies().map(tag), ['ERR_INVALID']);
  t.false(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).baseAllocation,
    'the failed SET_META_CONTEXT must leave no context selected');
});

test('NBD_OPT_LIST_META_CONTEXT with zero queries lists base:allocation', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  const r = s.send(opt(OPT_LIST_META_CONTEXT, metaData('disk', [])));
  const replies = r.replies();
  checkReplies(t, replies, OPT_LIST_META_CONTEXT);
  t.deepEqual(replies.map(tag), ['META_CONTEXT:base:allocation', 'ACK']);
  t.deepEqual(r.outcome, { kind: 'continue' });
});

test('NBD_OPT_LIST_META_CONTEXT: "base:" (wildcard) and "base:allocation" list it; others list nothing', (t) => {
  const cases: [string[], string[]][] = [
    [['base:'], ['META_CONTEXT:base:allocation', 'ACK']],
    [['base:allocation'], ['META_CONTEXT:base:allocation', 'ACK']],
    [['x-foo:', 'base:'], ['META_CONTEXT:base:allocation', 'ACK']],
    [['base:', 'base:allocation'], ['META_CONTEXT:base:allocation', 'ACK']],
    [['x-foo:bar'], ['ACK']],
    [['base:nosuch'], ['ACK']],
    [['qemu:'], ['ACK']],
  ];
  for (const [queries, expected] of cases) {
    const s = new Session();
    s.send(opt(OPT_STRUCTURED_REPLY));
    t.deepEqual(s.send(opt(OPT_LIST_META_CONTEXT, metaData('disk', queries))).replies().map(tag), expected, JSON.stringify(queries));
  }
});

test('NBD_OPT_LIST_META_CONTEXT does not select anything', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  s.send(opt(OPT_LIST_META_CONTEXT, metaData('disk', ['base:allocation'])));
  t.false(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).baseAllocation);
});

test('NBD_OPT_LIST_META_CONTEXT for an unknown export: ERR_UNKNOWN', (t) => {
  const s = new Session();
  s.send(opt(OPT_STRUCTURED_REPLY));
  t.deepEqual(s.send(opt(OPT_LIST_META_CONTEXT, metaData('nosuch', []))).replies().map(tag), ['ERR_UNKNOWN']);
});

// ── Malformed option data ───────────────────────────────────────────────────

const MALFORMED: { name: string; option: number; data: Buffer }[] = [
  { name: 'GO: shorter than the name length field', option: OPT_GO, data: Buffer.from([0, 0]) },
  { name: 'GO: name length past the end', option: OPT_GO, data: Buffer.concat([u32(100), Buffer.from('disk'), u16(0)]) },
  { name: 'GO: no info count', option: OPT_GO, data: str('disk') },
  { name: 'GO: count 2, one request', option: OPT_GO, data: Buffer.concat([str('disk'), u16(2), u16(INFO_NAME)]) },
  { name: 'GO: count 0, a trailing request', option: OPT_GO, data: Buffer.concat([str('disk'), u16(0), u16(INFO_NAME)]) },
  { name: 'GO: odd trailing byte', option: OPT_GO, data: Buffer.concat([str('disk'), u16(1), u16(INFO_NAME), Buffer.from([0])]) },
  { name: 'GO: name over 4096 bytes', option: OPT_GO, data: goData('x'.repeat(4097)) },
  { name: 'INFO: name length past the end', option: OPT_INFO, data: Buffer.concat([u32(5), Buffer.from('disk')]) },
  { name: 'LIST_META: empty', option: OPT_LIST_META_CONTEXT, data: EMPTY },
  { name: 'LIST_META: no query count', option: OPT_LIST_META_CONTEXT, data: str('disk') },
  { name: 'LIST_META: query length past the end', option: OPT_LIST_META_CONTEXT, data: Buffer.concat([str('disk'), u32(1), u32(50), Buffer.from('base:')]) },
  { name: 'LIST_META: count 3, two queries', option: OPT_LIST_META_CONTEXT, data: Buffer.concat([str('disk'), u32(3), str('base:'), str('x-a:b')]) },
  { name: 'LIST_META: trailing bytes', option: OPT_LIST_META_CONTEXT, data: Buffer.concat([metaData('disk', ['base:']), Buffer.from([1, 2])]) },
  { name: 'SET_META: export name length past the end', option: OPT_SET_META_CONTEXT, data: Buffer.concat([u32(9), Buffer.from('disk')]) },
  { name: 'SET_META: count 1, no query', option: OPT_SET_META_CONTEXT, data: Buffer.concat([str('disk'), u32(1)]) },
  { name: 'SET_META: huge count', option: OPT_SET_META_CONTEXT, data: Buffer.concat([str('disk'), u32(0xffffffff), str('base:allocation')]) },
];

for (const m of MALFORMED) {
  test(`malformed option data → ERR_INVALID, negotiation continues: ${m.name}`, (t) => {
    const s = new Session();
    s.send(opt(OPT_STRUCTURED_REPLY)); // so SET_META reaches its parser
    const r = s.send(opt(m.option, m.data));
    const replies = r.replies();
    checkReplies(t, replies, m.option);
    t.deepEqual(replies.map(tag), ['ERR_INVALID']);
    t.deepEqual(r.outcome, { kind: 'continue' });
    // The stream stays in step: the next option is parsed normally.
    const go = s.send(opt(OPT_GO, goData('disk')));
    checkInfoReplies(t, go.replies(), DISK, OPT_GO);
    t.is(transmission(t, go.outcome).export, DISK);
  });
}

// ── Unsupported options ─────────────────────────────────────────────────────

test('unknown options, PEEK_EXPORT, STARTTLS, EXTENDED_HEADERS → ERR_UNSUP and continue', (t) => {
  const s = new Session();
  for (const [option, data] of [
    [OPT_STARTTLS, EMPTY], [OPT_EXTENDED_HEADERS, EMPTY], [OPT_PEEK_EXPORT, EMPTY], [0x1234, Buffer.from('whatever')],
    [0, EMPTY], [12, Buffer.alloc(300, 7)], [0xffffffff, EMPTY], [0x80000001, Buffer.from([1])],
  ] as [number, Buffer][]) {
    const r = s.send(opt(option, data));
    const replies = r.replies();
    checkReplies(t, replies, option);
    t.deepEqual(replies.map(tag), ['ERR_UNSUP'], `option ${option}`);
    t.deepEqual(r.outcome, { kind: 'continue' }, `option ${option}`);
  }
  // Their data was skipped exactly: the stream is still in step.
  t.is(transmission(t, s.send(opt(OPT_GO, goData('disk'))).outcome).export, DISK);
});

// ── Ending negotiation without transmission ─────────────────────────────────

test('NBD_OPT_ABORT: ACK then close, not a client error', (t) => {
  const r = new Session().send(opt(OPT_ABORT));
  const replies = r.replies();
  checkReplies(t, replies, OPT_ABORT);
  t.deepEqual(replies.map(tag), ['ACK']);
  t.is(replies[0]!.data.length, 0);
  t.is(r.outcome.kind, 'close');
  if (r.outcome.kind === 'close') t.false(r.outcome.clientError);
});

test('NBD_OPT_ABORT with data is still ACKed (spec: the server SHOULD ignore the data)', (t) => {
  const r = new Session().send(opt(OPT_ABORT, Buffer.from('bye')));
  t.deepEqual(r.replies().map(tag), ['ACK']);
  t.is(r.outcome.kind, 'close');
});

test('option length MAX_OPTION_BYTES is read; one more closes before any data arrives', (t) => {
  const s = new Session();
  const r = s.send(opt(0x4242, Buffer.alloc(MAX_OPTION_BYTES, 1)));
  t.deepEqual(r.replies().map(tag), ['ERR_UNSUP']);
  t.deepEqual(r.outcome, { kind: 'continue' });
  const big = s.send(opt(OPT_GO, EMPTY, MAX_OPTION_BYTES + 1)); // header only
  t.is(big.out.length, 0);
  t.is(big.outcome.kind, 'close');
  if (big.outcome.kind === 'close') t.true(big.outcome.clientError);
});

test('option length 0xffffffff closes', (t) => {
  const r = new Session().send(opt(OPT_LIST, EMPTY, 0xffffffff));
  t.is(r.outcome.kind, 'close');
  t.is(r.out.length, 0);
});

test(`MAX_OPTIONS (${MAX_OPTIONS}) options are answered; the next one closes`, (t) => {
  const s = new Session();
  const many = Buffer.concat(Array.from({ length: MAX_OPTIONS }, () => opt(0x4242)));
  const r = s.send(many);
  t.deepEqual(r.outcome, { kind: 'continue' });
  const replies = r.replies();
  t.is(replies.length, MAX_OPTIONS);
  t.true(replies.every((x) => x.type === REP_ERR_UNSUP));
  const last = s.send(opt(OPT_LIST));
  t.is(last.out.length, 0);
  t.is(last.outcome.kind, 'close');
  if (last.outcome.kind === 'close') t.true(last.outcome.clientError);
});

test('bad option magic closes (client error), even after good options', (t) => {
  const s = new Session();
  t.deepEqual(s.send(opt(OPT_STRUCTURED_REPLY)).replies().map(tag), ['ACK']);
  const bad = opt(OPT_LIST);
  bad.write('IHAVEOPS', 0, 'ascii');
  const r = s.send(bad);
  t.is(r.out.length, 0);
  t.is(r.outcome.kind, 'close');
  if (r.outcome.kind === 'close') t.true(r.outcome.clientError);
});

test('bad option magic in the same chunk as good options: the good ones are answered first', (t) => {
  const s = new Session();
  const bad = opt(OPT_LIST);
  bad.writeUInt8(0, 0);
  const r = s.send(opt(OPT_STRUCTURED_REPLY), opt(OPT_LIST), bad);
  t.deepEqual(r.replies().map((x) => x.type), [REP_ACK, REP_SERVER, REP_SERVER, REP_SERVER, REP_ACK]);
  t.is(r.outcome.kind, 'close');
});

// ── Pipelined bytes ─────────────────────────────────────────────────────────

test('bytes pipelined after GO come back in rest, untouched', (t) => {
  const pipelined = Buffer.from('25609513' + '0000' + '0000' + 'deadbeefcafebabe' + '0000000000000000' + '00000200', 'hex');
  const r = new Session().send(opt(OPT_STRUCTURED_REPLY), opt(OPT_GO, goData('disk')), pipelined, Buffer.from('more'));
  const o = transmission(t, r.outcome);
  t.true(o.rest.equals(Buffer.concat([pipelined, Buffer.from('more')])));
  t.true(o.structuredReplies);
  // The output holds the ACK for STRUCTURED_REPLY and the GO replies, nothing else.
  const replies = r.replies();
  t.deepEqual(replies.map((x) => x.option), [OPT_STRUCTURED_REPLY, OPT_GO, OPT_GO, OPT_GO]);
});

test('bytes pipelined after EXPORT_NAME come back in rest', (t) => {
  const r = new Session(C_FIXED_NEWSTYLE).send(opt(OPT_EXPORT_NAME, Buffer.from('disk')), Buffer.from([1, 2, 3]));
  t.is(r.out.length, 134);
  t.deepEqual([...transmission(t, r.outcome).rest], [1, 2, 3]);
});

test('options in the same chunk as the client flags are answered in order', (t) => {
  const h = new Handshake(CATALOG);
  const step = h.push(Buffer.concat([u32(C_FIXED_NEWSTYLE), opt(OPT_LIST), opt(OPT_GO, goData('data'))]));
  const replies = parseReplies(Buffer.concat(step.out));
  t.deepEqual(replies.map((x) => x.option), [OPT_LIST, OPT_LIST, OPT_LIST, OPT_LIST, OPT_GO, OPT_GO, OPT_GO]);
  t.deepEqual(step.options, ['NBD_OPT_LIST', 'NBD_OPT_GO']);
  t.is(transmission(t, step.outcome).export, DATA);
});

// ── Declared table: for each option, the reply types ────────────────────────

interface Row {
  name: string;
  /** Options sent (and answered) first; their replies are not checked here. */
  before?: Buffer[];
  option: number;
  data?: Buffer;
  /** Reply tags; all but the last are compared as a set (the spec leaves their order free). */
  replies: string[];
  outcome: HandshakeOutcome['kind'];
}

const TABLE: Row[] = [
  { name: 'LIST', option: OPT_LIST, replies: ['SERVER:disk', 'SERVER:data', 'SERVER:dïsk-ü€', 'ACK'], outcome: 'continue' },
  { name: 'LIST with data', option: OPT_LIST, data: Buffer.from([0]), replies: ['ERR_INVALID'], outcome: 'continue' },
  { name: 'ABORT', option: OPT_ABORT, replies: ['ACK'], outcome: 'close' },
  { name: 'PEEK_EXPORT', option: OPT_PEEK_EXPORT, replies: ['ERR_UNSUP'], outcome: 'continue' },
  { name: 'STARTTLS', option: OPT_STARTTLS, replies: ['ERR_UNSUP'], outcome: 'continue' },
  { name: 'INFO disk', option: OPT_INFO, data: goData('disk'), replies: ['INFO:BLOCK_SIZE', 'INFO:EXPORT', 'ACK'], outcome: 'continue' },
  {
    name: 'INFO disk +NAME +DESCRIPTION', option: OPT_INFO, data: goData('disk', [INFO_DESCRIPTION, INFO_NAME]),
    replies: ['INFO:BLOCK_SIZE', 'INFO:DESCRIPTION', 'INFO:EXPORT', 'INFO:NAME', 'ACK'], outcome: 'continue',
  },
  { name: 'INFO unknown', option: OPT_INFO, data: goData('x'), replies: ['ERR_UNKNOWN'], outcome: 'continue' },
  { name: 'GO disk', option: OPT_GO, data: goData('disk'), replies: ['INFO:BLOCK_SIZE', 'INFO:EXPORT', 'ACK'], outcome: 'transmission' },
  { name: 'GO default', option: OPT_GO, data: goData(''), replies: ['INFO:BLOCK_SIZE', 'INFO:EXPORT', 'ACK'], outcome: 'transmission' },
  { name: 'GO unknown', option: OPT_GO, data: goData('x'), replies: ['ERR_UNKNOWN'], outcome: 'continue' },
  { name: 'GO malformed', option: OPT_GO, data: Buffer.from([0, 0, 0, 9]), replies: ['ERR_INVALID'], outcome: 'continue' },
  { name: 'STRUCTURED_REPLY', option: OPT_STRUCTURED_REPLY, replies: ['ACK'], outcome: 'continue' },
  { name: 'STRUCTURED_REPLY with data', option: OPT_STRUCTURED_REPLY, data: Buffer.from([1]), replies: ['ERR_INVALID'], outcome: 'continue' },
  {
    name: 'LIST_META_CONTEXT (all)', before: [opt(OPT_STRUCTURED_REPLY)], option: OPT_LIST_META_CONTEXT,
    data: metaData('disk', []), replies: ['META_CONTEXT:base:allocation', 'ACK'], outcome: 'continue',
  },
  {
    name: 'LIST_META_CONTEXT unknown query', before: [opt(OPT_STRUCTURED_REPLY)], option: OPT_LIST_META_CONTEXT,
    data: metaData('disk', ['x-y:z']), replies: ['ACK'], outcome: 'continue',
  },
  {
    name: 'SET_META_CONTEXT without STRUCTURED_REPLY', option: OPT_SET_META_CONTEXT,
    data: metaData('disk', ['base:allocation']), replies: ['ERR_INVALID'], outcome: 'continue',
  },
  {
    name: 'SET_META_CONTEXT base:allocation', before: [opt(OPT_STRUCTURED_REPLY)], option: OPT_SET_META_CONTEXT,
    data: metaData('disk', ['base:allocation']), replies: ['META_CONTEXT:base:allocation', 'ACK'], outcome: 'continue',
  },
  {
    name: 'SET_META_CONTEXT unknown export', before: [opt(OPT_STRUCTURED_REPLY)], option: OPT_SET_META_CONTEXT,
    data: metaData('x', ['base:allocation']), replies: ['ERR_UNKNOWN'], outcome: 'continue',
  },
  { name: 'EXTENDED_HEADERS', option: OPT_EXTENDED_HEADERS, replies: ['ERR_UNSUP'], outcome: 'continue' },
  { name: 'unknown (99)', option: 99, data: Buffer.from('zz'), replies: ['ERR_UNSUP'], outcome: 'continue' },
];

for (const row of TABLE) {
  test(`table: ${row.name} → ${row.replies.join(', ')} (${row.outcome})`, (t) => {
    const s = new Session();
    for (const b of row.before ?? []) t.deepEqual(s.send(b).outcome, { kind: 'continue' });
    const r = s.send(opt(row.option, row.data));
    const replies = r.replies();
    checkReplies(t, replies, row.option);
    const tags = replies.map(tag);
    const sortHead = (x: string[]): string[] => [...x.slice(0, -1).sort(), ...x.slice(-1)];
    t.deepEqual(sortHead(tags), sortHead(row.replies));
    t.is(r.outcome.kind, row.outcome);
  });
}

test('table: NBD_OPT_EXPORT_NAME sends no option reply, only the export data', (t) => {
  const r = new Session().send(opt(OPT_EXPORT_NAME, Buffer.from('disk')));
  t.is(r.out.length, 10);
  t.throws(() => parseReplies(r.out)); // not an option reply
  t.is(r.outcome.kind, 'transmission');
});

// ── Property: chunking does not matter ──────────────────────────────────────

const arbName = fc.constantFrom('', 'disk', 'data', 'dïsk-ü€', 'nosuch');
const arbInfos = fc.uniqueArray(fc.constantFrom(INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x55), { maxLength: 4 });
const arbQueries = fc.array(fc.constantFrom('base:', 'base:allocation', 'base:x', 'x-a:b', ''), { maxLength: 3 });

/** Options after which negotiation continues. */
const arbContinueOption: fc.Arbitrary<Buffer> = fc.oneof(
  fc.constant(opt(OPT_LIST)),
  fc.constant(opt(OPT_LIST, Buffer.from('x'))),
  fc.constant(opt(OPT_STRUCTURED_REPLY)),
  fc.tuple(arbName, arbInfos).map(([n, i]) => opt(OPT_INFO, goData(n, i))),
  fc.constant(opt(OPT_GO, goData('nosuch'))),
  fc.tuple(arbName, arbQueries).map(([n, q]) => opt(OPT_LIST_META_CONTEXT, metaData(n, q))),
  fc.tuple(arbName, arbQueries).map(([n, q]) => opt(OPT_SET_META_CONTEXT, metaData(n, q))),
  fc.uint8Array({ maxLength: 24 }).map((d) => opt(OPT_GO, Buffer.from(d))), // mostly malformed
  fc.tuple(fc.constantFrom(OPT_STARTTLS, OPT_EXTENDED_HEADERS, OPT_PEEK_EXPORT, 0x1234, 4000), fc.uint8Array({ maxLength: 40 }))
    .map(([o, d]) => opt(o, Buffer.from(d))),
);
/** The option that ends negotiation. */
const arbFinalOption: fc.Arbitrary<Buffer> = fc.oneof(
  fc.tuple(fc.constantFrom('', 'disk', 'data', 'dïsk-ü€'), arbInfos).map(([n, i]) => opt(OPT_GO, goData(n, i))),
  fc.constantFrom('', 'disk', 'data').map((n) => opt(OPT_EXPORT_NAME, Buffer.from(n))),
  fc.constant(opt(OPT_ABORT)),
  fc.constant(opt(OPT_EXPORT_NAME, Buffer.from('nosuch'))),
);

interface Fed {
  out: string;
  outcome: unknown;
  /** `rest` plus every chunk that was never pushed. */
  after: string;
}

function feed(chunks: Buffer[]): Fed {
  const h = new Handshake(CATALOG);
  const out: Buffer[] = [];
  let outcome: HandshakeOutcome = { kind: 'continue' };
  let i = 0;
  while (i < chunks.length) {
    const step = h.push(chunks[i++]!);
    out.push(...step.out);
    if (step.outcome.kind !== 'continue') {
      outcome = step.outcome;
      break;
    }
  }
  const left = Buffer.concat(chunks.slice(i));
  let summary: unknown = outcome;
  let after = EMPTY; // after a close, whatever was not read is irrelevant
  if (outcome.kind === 'continue') after = left;
  if (outcome.kind === 'transmission') {
    summary = { kind: outcome.kind, export: outcome.export.name, sr: outcome.structuredReplies, ba: outcome.baseAllocation };
    after = Buffer.concat([outcome.rest, left]);
  }
  return { out: Buffer.concat(out).toString('hex'), outcome: summary, after: after.toString('hex') };
}

function splitAt(buf: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (buf.length + 1)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let prev = 0;
  for (const p of points) {
    chunks.push(buf.subarray(prev, p));
    prev = p;
  }
  chunks.push(buf.subarray(prev));
  return chunks;
}

test('property: whole, byte-at-a-time and random splits give identical output and outcome', (t) => {
  fc.assert(
    fc.property(
      fc.constantFrom(0, 1, 2, 3),
      fc.array(arbContinueOption, { maxLength: 8 }),
      arbFinalOption,
      fc.uint8Array({ maxLength: 40 }),
      fc.array(fc.nat(), { maxLength: 12 }),
      (flags, options, final, trailing, cuts) => {
        const stream = Buffer.concat([u32(flags), ...options, final, Buffer.from(trailing)]);
        const whole = feed([stream]);
        const bytes = feed([...stream].map((b) => Buffer.from([b])));
        const split = feed(splitAt(stream, cuts));
        deepStrictEqual(bytes, whole);
        deepStrictEqual(split, whole);
        // Every option before the final one was answered, and the output parses.
        const outcome = whole.outcome as { kind: string };
        if (outcome.kind === 'transmission') {
          deepStrictEqual(whole.after, Buffer.from(trailing).toString('hex'));
        }
        if (outcome.kind !== 'transmission' || final.readUInt32BE(8) !== OPT_EXPORT_NAME) {
          parseReplies(Buffer.from(whole.out, 'hex'));
        }
      },
    ),
    { numRuns: 300 },
  );
  t.pass();
});

test('property: pushing empty chunks anywhere changes nothing', (t) => {
  fc.assert(
    fc.property(fc.array(arbContinueOption, { maxLength: 5 }), arbFinalOption, fc.array(fc.nat(), { maxLength: 6 }), (options, final, cuts) => {
      const stream = Buffer.concat([u32(3), ...options, final]);
      const chunks = splitAt(stream, cuts).flatMap((c) => [EMPTY, c, EMPTY]);
      deepStrictEqual(feed(chunks), feed([stream]));
    }),
    { numRuns: 100 },
  );
  t.pass();
});
