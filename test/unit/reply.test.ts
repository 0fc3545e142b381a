/**
 * Reply encoders, decoded with hand-written decoders that follow doc/proto.md
 * ("Simple reply message", "Structured reply chunk message", "Structured reply
 * types"): every field of every message.
 */
import test from 'ava';
import fc from 'fast-check';
import { strictEqual } from 'node:assert/strict';

import {
  OFFSET_DATA_PREFIX_BYTES, blockStatusChunk, errorChunk, simpleReply, writeChunkHeader, writeOffsetDataPrefix,
  writeSimpleReplyHeader,
} from '../../nbd/reply.js';

const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const REPLY_FLAG_DONE = 1;
const REPLY_TYPE_OFFSET_DATA = 1;
const REPLY_TYPE_BLOCK_STATUS = 5;
const REPLY_TYPE_ERROR = 2 ** 15 + 1;

interface Simple {
  magic: number;
  error: number;
  cookieHi: number;
  cookieLo: number;
}
function decodeSimple(b: Buffer, at = 0): Simple {
  return { magic: b.readUInt32BE(at), error: b.readUInt32BE(at + 4), cookieHi: b.readUInt32BE(at + 8), cookieLo: b.readUInt32BE(at + 12) };
}

interface Chunk {
  magic: number;
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  length: number;
  payload: Buffer;
}
/** A whole structured chunk: the buffer must be exactly header + payload. */
function decodeChunk(b: Buffer): Chunk {
  if (b.length < 20) throw new Error('shorter than a chunk header');
  const length = b.readUInt32BE(16);
  if (b.length !== 20 + length) throw new Error(`chunk is ${b.length} bytes, header says 20 + ${length}`);
  return {
    magic: b.readUInt32BE(0), flags: b.readUInt16BE(4), type: b.readUInt16BE(6),
    cookieHi: b.readUInt32BE(8), cookieLo: b.readUInt32BE(12), length, payload: b.subarray(20),
  };
}

function decodeError(payload: Buffer): { error: number; message: string; messageLength: number } {
  if (payload.length < 6) throw new Error('error chunk payload shorter than 6');
  const messageLength = payload.readUInt16BE(4);
  if (messageLength > payload.length - 6) throw new Error('message length past the payload');
  return { error: payload.readUInt32BE(0), messageLength, message: new TextDecoder('utf-8', { fatal: true }).decode(payload.subarray(6, 6 + messageLength)) };
}

function decodeBlockStatus(payload: Buffer): { contextId: number; extents: [number, number][] } {
  if (payload.length < 4 || (payload.length - 4) % 8 !== 0) throw new Error(`block status payload length ${payload.length}`);
  const extents: [number, number][] = [];
  for (let p = 4; p < payload.length; p += 8) extents.push([payload.readUInt32BE(p), payload.readUInt32BE(p + 4)]);
  return { contextId: payload.readUInt32BE(0), extents };
}

// ── Simple replies ──────────────────────────────────────────────────────────

test('simpleReply: 16 bytes, magic, error, cookie', (t) => {
  const b = simpleReply(22, 0x01020304, 0x05060708);
  t.is(b.length, 16);
  t.deepEqual(decodeSimple(b), { magic: SIMPLE_REPLY_MAGIC, error: 22, cookieHi: 0x01020304, cookieLo: 0x05060708 });
  t.is(b.toString('hex'), '67446698' + '00000016' + '01020304' + '05060708');
});

test('simpleReply: success and extreme cookie values', (t) => {
  for (const [e, hi, lo] of [[0, 0, 0], [5, 0xffffffff, 0xffffffff], [108, 0x80000000, 1]] as const) {
    t.deepEqual(decodeSimple(simpleReply(e, hi, lo)), { magic: SIMPLE_REPLY_MAGIC, error: e, cookieHi: hi, cookieLo: lo });
  }
});

test('writeSimpleReplyHeader writes 16 bytes at the offset and nothing else', (t) => {
  const b = Buffer.alloc(16 + 40, 0xee);
  writeSimpleReplyHeader(b, 16, 0, 0xcafebabe, 0xdeadbeef);
  t.deepEqual(decodeSimple(b, 16), { magic: SIMPLE_REPLY_MAGIC, error: 0, cookieHi: 0xcafebabe, cookieLo: 0xdeadbeef });
  t.true(b.subarray(0, 16).equals(Buffer.alloc(16, 0xee)), 'bytes before untouched');
  t.true(b.subarray(32).equals(Buffer.alloc(24, 0xee)), 'bytes after untouched (the read data)');
});

// ── OFFSET_DATA ─────────────────────────────────────────────────────────────

test('OFFSET_DATA_PREFIX_BYTES is the chunk header plus a u64 offset', (t) => {
  t.is(OFFSET_DATA_PREFIX_BYTES, 28);
});

test('writeOffsetDataPrefix: final OFFSET_DATA chunk, length 8 + data, u64 offset; data untouched', (t) => {
  const dataBytes = 100;
  const data = Buffer.from(Array.from({ length: dataBytes }, (_, i) => i));
  for (const offset of [0, 512, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 4096, 0x1234_5678_9abc, 2 ** 53 - 1]) {
    const b = Buffer.alloc(OFFSET_DATA_PREFIX_BYTES + dataBytes, 0xff);
    data.copy(b, OFFSET_DATA_PREFIX_BYTES);
    writeOffsetDataPrefix(b, 0x11111111, 0x22222222, offset, dataBytes);
    const c = decodeChunk(b);
    t.is(c.magic, STRUCTURED_REPLY_MAGIC);
    t.is(c.flags, REPLY_FLAG_DONE);
    t.is(c.type, REPLY_TYPE_OFFSET_DATA);
    t.is(c.cookieHi, 0x11111111);
    t.is(c.cookieLo, 0x22222222);
    t.is(c.length, 8 + dataBytes);
    t.is(c.payload.readBigUInt64BE(0), BigInt(offset), `offset ${offset}`);
    t.true(c.payload.subarray(8).equals(data));
  }
});

test('writeOffsetDataPrefix: offset halves are exact (hi and lo words)', (t) => {
  const b = Buffer.alloc(OFFSET_DATA_PREFIX_BYTES + 1);
  writeOffsetDataPrefix(b, 0, 0, 0x0007_8000_0001 * 1, 1);
  t.is(b.readUInt32BE(20), 0x0007);
  t.is(b.readUInt32BE(24), 0x8000_0001);
});

// ── ERROR ───────────────────────────────────────────────────────────────────

test('errorChunk: final ERROR chunk with error, message length and message', (t) => {
  const b = errorChunk(28, 0xabcdef01, 0x23456789, 'no space left');
  const c = decodeChunk(b);
  t.is(c.magic, STRUCTURED_REPLY_MAGIC);
  t.is(c.flags, REPLY_FLAG_DONE);
  t.is(c.type, REPLY_TYPE_ERROR);
  t.is(c.cookieHi, 0xabcdef01);
  t.is(c.cookieLo, 0x23456789);
  t.is(c.length, 6 + 'no space left'.length);
  t.deepEqual(decodeError(c.payload), { error: 28, messageLength: 13, message: 'no space left' });
});

test('errorChunk: empty message', (t) => {
  const c = decodeChunk(errorChunk(5, 1, 2, ''));
  t.is(c.length, 6);
  t.deepEqual(decodeError(c.payload), { error: 5, messageLength: 0, message: '' });
});

test('errorChunk: message length counts UTF-8 bytes', (t) => {
  const msg = 'écrire: €';
  const c = decodeChunk(errorChunk(1, 0, 0, msg));
  t.is(c.length, 6 + Buffer.byteLength(msg));
  t.deepEqual(decodeError(c.payload), { error: 1, messageLength: Buffer.byteLength(msg), message: msg });
});

test('errorChunk: long messages are truncated (to 1024 characters), lengths consistent', (t) => {
  const long = 'x'.repeat(5000);
  const c = decodeChunk(errorChunk(22, 0, 0, long));
  const e = decodeError(c.payload);
  t.is(e.messageLength, 1024);
  t.is(e.message, 'x'.repeat(1024));
  t.is(c.length, 6 + 1024);
});

test('errorChunk: a long multi-byte message stays within the 4096-byte string limit', (t) => {
  const long = '€'.repeat(3000); // 3 bytes each
  const c = decodeChunk(errorChunk(22, 0, 0, long));
  const e = decodeError(c.payload);
  t.true(e.messageLength <= 4096);
  t.is(e.message, '€'.repeat(1024));
  t.is(c.length, 6 + e.messageLength);
});

test('property: errorChunk is always a well-formed, final ERROR chunk whose message is a prefix', (t) => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 0xffffffff }),
      fc.nat({ max: 0xffffffff }),
      fc.nat({ max: 0xffffffff }),
      fc.string({ unit: 'binary', maxLength: 2000 }),
      (error, hi, lo, message) => {
        const c = decodeChunk(errorChunk(error, hi, lo, message));
        strictEqual(c.magic, STRUCTURED_REPLY_MAGIC);
        strictEqual(c.flags, REPLY_FLAG_DONE);
        strictEqual(c.type, REPLY_TYPE_ERROR);
        strictEqual(c.cookieHi, hi);
        strictEqual(c.cookieLo, lo);
        const e = decodeError(c.payload); // throws unless valid UTF-8 and lengths consistent
        strictEqual(e.error, error);
        strictEqual(c.length, 6 + e.messageLength);
        strictEqual(e.messageLength <= 4096, true);
        strictEqual(message.startsWith(e.message), true);
        if (Buffer.byteLength(message) <= 1024) strictEqual(e.message, message);
      },
    ),
    { numRuns: 300 },
  );
  t.pass();
});

// ── BLOCK_STATUS ────────────────────────────────────────────────────────────

test('blockStatusChunk: final BLOCK_STATUS chunk, context id, (length, flags) descriptors in order', (t) => {
  const lengths = [4096, 0x8000_0000, 512, 0xffff_ffff];
  const flags = [0, 3, 1, 2];
  const c = decodeChunk(blockStatusChunk(0x0a0b0c0d, 0x01020304, 1, lengths, flags));
  t.is(c.magic, STRUCTURED_REPLY_MAGIC);
  t.is(c.flags, REPLY_FLAG_DONE);
  t.is(c.type, REPLY_TYPE_BLOCK_STATUS);
  t.is(c.cookieHi, 0x0a0b0c0d);
  t.is(c.cookieLo, 0x01020304);
  t.is(c.length, 4 + 8 * 4);
  t.deepEqual(decodeBlockStatus(c.payload), {
    contextId: 1,
    extents: [[4096, 0], [0x8000_0000, 3], [512, 1], [0xffff_ffff, 2]],
  });
});

test('blockStatusChunk: one extent, exact bytes', (t) => {
  const b = blockStatusChunk(0, 7, 1, [65536], [2]);
  t.is(b.toString('hex'), '668e33ef' + '0001' + '0005' + '00000000' + '00000007' + '0000000c' + '00000001' + '00010000' + '00000002');
});

test('property: blockStatusChunk round-trips any descriptor list', (t) => {
  fc.assert(
    fc.property(
      fc.array(fc.tuple(fc.integer({ min: 1, max: 0xffffffff }), fc.integer({ min: 0, max: 3 })), { minLength: 1, maxLength: 50 }),
      fc.nat({ max: 0xffffffff }),
      fc.nat({ max: 0xffffffff }),
      fc.nat({ max: 0xffffffff }),
      (ext, ctx, hi, lo) => {
        const c = decodeChunk(blockStatusChunk(hi, lo, ctx, ext.map((e) => e[0]), ext.map((e) => e[1])));
        strictEqual(c.cookieHi, hi);
        strictEqual(c.cookieLo, lo);
        strictEqual(c.length, 4 + 8 * ext.length);
        const d = decodeBlockStatus(c.payload);
        strictEqual(d.contextId, ctx);
        strictEqual(JSON.stringify(d.extents), JSON.stringify(ext));
      },
    ),
    { numRuns: 200 },
  );
  t.pass();
});

// ── Generic chunk header ────────────────────────────────────────────────────

test('writeChunkHeader: every field at its offset, from a non-zero position', (t) => {
  const b = Buffer.alloc(8 + 20, 0x77);
  writeChunkHeader(b, 8, 0, 2, 0xffffffff, 0, 12);
  t.true(b.subarray(0, 8).equals(Buffer.alloc(8, 0x77)));
  t.is(b.subarray(8).toString('hex'), '668e33ef' + '0000' + '0002' + 'ffffffff' + '00000000' + '0000000c');
});
