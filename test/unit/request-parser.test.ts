/**
 * Transmission request framing: requests encoded here per doc/proto.md ("Request
 * message"), fed to `RequestParser` whole and in every kind of split, with a sink
 * that records what it is handed.
 */
import test from 'ava';
import fc from 'fast-check';
import { deepStrictEqual, strictEqual } from 'node:assert/strict';

import { OFFSET_UNREPRESENTABLE, RequestParser, type RequestSink } from '../../nbd/request-parser.js';

const REQUEST_MAGIC = 0x25609513;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const CMD_CACHE = 5;
const CMD_WRITE_ZEROES = 6;
const CMD_BLOCK_STATUS = 7;

interface Req {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: bigint;
  length: number;
  /** WRITE only: exactly `length` bytes. */
  payload?: Buffer;
}

/** C: magic, u16 flags, u16 type, u64 handle, u64 offset, u32 length, (WRITE: length bytes). */
function encode(r: Req): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(REQUEST_MAGIC, 0);
  h.writeUInt16BE(r.flags, 4);
  h.writeUInt16BE(r.type, 6);
  h.writeUInt32BE(r.cookieHi, 8);
  h.writeUInt32BE(r.cookieLo, 12);
  h.writeBigUInt64BE(r.offset, 16);
  h.writeUInt32BE(r.length, 24);
  if (r.type !== CMD_WRITE) return h;
  const payload = r.payload ?? Buffer.alloc(r.length, 0xab);
  if (payload.length !== r.length) throw new Error('test bug: WRITE payload length differs from length');
  return Buffer.concat([h, payload]);
}

function req(p: Partial<Req> & { type: number }): Req {
  return { flags: 0, cookieHi: 0, cookieLo: 0, offset: 0n, length: 0, ...p };
}

interface Got {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
  payload: Buffer | null;
  oversize: boolean;
}

class Recorder implements RequestSink {
  readonly got: Got[] = [];
  readonly errors: string[] = [];
  onRequest(
    flags: number, type: number, cookieHi: number, cookieLo: number,
    offset: number, length: number, payload: Buffer | null, oversize: boolean,
  ): void {
    // Copy: the payload may be a view into the pushed chunk.
    this.got.push({ flags, type, cookieHi, cookieLo, offset, length, payload: payload ? Buffer.from(payload) : null, oversize });
  }
  onFramingError(reason: string): void {
    this.errors.push(reason);
  }
}

/** What the parser must report for `r` under `maxPayload`. */
function expected(r: Req, maxPayload: number): Got {
  const isWrite = r.type === CMD_WRITE;
  const oversize = isWrite && r.length > maxPayload;
  return {
    flags: r.flags,
    type: r.type,
    cookieHi: r.cookieHi,
    cookieLo: r.cookieLo,
    offset: r.offset >= 2n ** 53n ? OFFSET_UNREPRESENTABLE : Number(r.offset),
    length: r.length,
    payload: isWrite && r.length > 0 && !oversize ? (r.payload ?? Buffer.alloc(r.length, 0xab)) : null,
    oversize,
  };
}

function parse(chunks: Buffer[], maxPayload: number): Recorder {
  const rec = new Recorder();
  const p = new RequestParser(rec, maxPayload);
  for (const c of chunks) p.push(c);
  return rec;
}

// ── Field decoding ──────────────────────────────────────────────────────────

test('every header field is decoded (flags, type, cookie halves, offset, length)', (t) => {
  const r = req({ flags: 0x0011, type: CMD_READ, cookieHi: 0xdeadbeef, cookieLo: 0x80000001, offset: 0x1234_5678_9abcn, length: 0x0010_0000 });
  const rec = parse([encode(r)], 1 << 20);
  t.deepEqual(rec.errors, []);
  t.deepEqual(rec.got, [{
    flags: 0x11, type: CMD_READ, cookieHi: 0xdeadbeef, cookieLo: 0x80000001,
    offset: 0x1234_5678_9abc, length: 0x100000, payload: null, oversize: false,
  }]);
});

test('u16/u32 fields are unsigned at their extremes', (t) => {
  const r = req({ flags: 0xffff, type: 0xffff, cookieHi: 0xffffffff, cookieLo: 0xffffffff, offset: 0n, length: 0xffffffff });
  const [g] = parse([encode(r)], 1024).got;
  t.is(g!.flags, 0xffff);
  t.is(g!.type, 0xffff);
  t.is(g!.cookieHi, 0xffffffff);
  t.is(g!.cookieLo, 0xffffffff);
  t.is(g!.length, 0xffffffff);
});

test('the cookie halves are not swapped', (t) => {
  const [g] = parse([encode(req({ type: CMD_FLUSH, cookieHi: 1, cookieLo: 2 }))], 0).got;
  t.is(g!.cookieHi, 1);
  t.is(g!.cookieLo, 2);
});

test('64-bit offsets: values at and above 2^32 are exact', (t) => {
  const offsets: [bigint, number][] = [
    [0n, 0],
    [0xffff_ffffn, 0xffff_ffff],
    [0x1_0000_0000n, 2 ** 32],
    [0x1_0000_0001n, 2 ** 32 + 1],
    [0x1b_cdef_0123_4567n, 0x1b_cdef_0123_4567],
    [2n ** 53n - 2n, 2 ** 53 - 2],
    [2n ** 53n - 1n, 2 ** 53 - 1],
  ];
  const rec = parse([Buffer.concat(offsets.map(([o]) => encode(req({ type: CMD_READ, offset: o, length: 512 }))))], 0);
  t.deepEqual(rec.got.map((g) => g.offset), offsets.map(([, n]) => n));
});

test('offsets at or above 2^53 are reported as OFFSET_UNREPRESENTABLE (never rounded into range)', (t) => {
  t.is(OFFSET_UNREPRESENTABLE, Number.MAX_SAFE_INTEGER);
  const offsets = [2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n, 0x0020_0000_0000_0000n, 0xffff_ffff_0000_0000n];
  const rec = parse([Buffer.concat(offsets.map((o) => encode(req({ type: CMD_TRIM, offset: o, length: 1 }))))], 0);
  t.deepEqual(rec.got.map((g) => g.offset), offsets.map(() => OFFSET_UNREPRESENTABLE));
  // Always past the end of any export this server can have.
  for (const g of rec.got) t.false(Number.isSafeInteger(g.offset + 1));
});

// ── WRITE payloads ──────────────────────────────────────────────────────────

test('a WRITE payload is delivered intact, and the next request follows it', (t) => {
  const payload = Buffer.from(Array.from({ length: 1000 }, (_, i) => (i * 7 + 3) & 0xff));
  const w = req({ type: CMD_WRITE, flags: 1, cookieHi: 5, cookieLo: 6, offset: 4096n, length: payload.length, payload });
  const f = req({ type: CMD_FLUSH, cookieLo: 7 });
  const rec = parse([Buffer.concat([encode(w), encode(f)])], 4096);
  t.deepEqual(rec.got, [expected(w, 4096), expected(f, 4096)]);
  t.true(rec.got[0]!.payload!.equals(payload));
});

test('a WRITE payload split across many pushes is reassembled', (t) => {
  const payload = Buffer.from(Array.from({ length: 3000 }, (_, i) => (i * 13) & 0xff));
  const w = req({ type: CMD_WRITE, length: payload.length, payload, cookieLo: 1 });
  const bytes = encode(w);
  const rec = parse([bytes.subarray(0, 30), bytes.subarray(30, 1000), bytes.subarray(1000, 2999), bytes.subarray(2999)], 4096);
  t.is(rec.got.length, 1);
  t.true(rec.got[0]!.payload!.equals(payload));
});

test('a WRITE is delivered only once its whole payload has arrived', (t) => {
  const w = req({ type: CMD_WRITE, length: 100, payload: Buffer.alloc(100, 9) });
  const bytes = encode(w);
  const rec = new Recorder();
  const p = new RequestParser(rec, 1024);
  p.push(bytes.subarray(0, bytes.length - 1));
  t.is(rec.got.length, 0);
  t.false(p.idle);
  p.push(bytes.subarray(bytes.length - 1));
  t.is(rec.got.length, 1);
  t.true(p.idle);
});

test('a zero-length WRITE has no payload and does not swallow the next header', (t) => {
  const w = req({ type: CMD_WRITE, length: 0, cookieLo: 1 });
  const r = req({ type: CMD_READ, length: 512, cookieLo: 2 });
  const rec = parse([Buffer.concat([encode(w), encode(r)])], 1024);
  t.deepEqual(rec.got, [expected(w, 1024), expected(r, 1024)]);
  t.is(rec.got[0]!.payload, null);
  t.false(rec.got[0]!.oversize);
});

test('non-WRITE commands carry no payload, whatever their length', (t) => {
  const reqs = [CMD_READ, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, 8, 0x1234]
    .map((type, i) => req({ type, length: 0xffff_fff0, cookieLo: i }));
  const rec = parse([Buffer.concat(reqs.map(encode))], 16);
  t.deepEqual(rec.got, reqs.map((r) => expected(r, 16)));
});

test('WRITE of exactly maxPayloadBytes is delivered with its payload', (t) => {
  const payload = Buffer.alloc(1024, 0x5a);
  const w = req({ type: CMD_WRITE, length: 1024, payload });
  const rec = parse([encode(w)], 1024);
  t.false(rec.got[0]!.oversize);
  t.true(rec.got[0]!.payload!.equals(payload));
});

test('WRITE over maxPayloadBytes: payload null, oversize, bytes skipped, next request parsed', (t) => {
  const big = req({ type: CMD_WRITE, length: 1025, payload: Buffer.alloc(1025, 0x25), cookieLo: 1, offset: 512n });
  const next = req({ type: CMD_READ, length: 4096, cookieHi: 0xaaaa, cookieLo: 2, offset: 8192n });
  const bytes = Buffer.concat([encode(big), encode(next)]);
  for (const chunks of [[bytes], [...bytes].map((b) => Buffer.from([b])), [bytes.subarray(0, 28), bytes.subarray(28, 600), bytes.subarray(600)]]) {
    const rec = parse(chunks, 1024);
    t.deepEqual(rec.errors, []);
    t.deepEqual(rec.got, [
      { flags: 0, type: CMD_WRITE, cookieHi: 0, cookieLo: 1, offset: 512, length: 1025, payload: null, oversize: true },
      expected(next, 1024),
    ]);
  }
});

test('an oversize WRITE whose payload bytes look like request headers is still skipped', (t) => {
  const inner = Buffer.concat([encode(req({ type: CMD_DISC })), encode(req({ type: CMD_FLUSH }))]);
  const big = req({ type: CMD_WRITE, length: inner.length, payload: inner });
  const after = req({ type: CMD_CACHE, length: 1, cookieLo: 9 });
  const rec = parse([Buffer.concat([encode(big), encode(after)])], 8);
  t.deepEqual(rec.got.map((g) => [g.type, g.oversize]), [[CMD_WRITE, true], [CMD_CACHE, false]]);
});

test('maxPayloadBytes 0: every non-empty WRITE is oversize', (t) => {
  const rec = parse([encode(req({ type: CMD_WRITE, length: 1, payload: Buffer.from([1]) }))], 0);
  t.deepEqual(rec.got.map((g) => [g.payload, g.oversize]), [[null, true]]);
});

// ── Framing errors ──────────────────────────────────────────────────────────

test('bad magic: onFramingError once, nothing parsed after, even well-formed requests', (t) => {
  const good = req({ type: CMD_READ, length: 512, cookieLo: 1 });
  const bad = encode(req({ type: CMD_READ, length: 512 }));
  bad.writeUInt32BE(0x25609514, 0);
  const rec = new Recorder();
  const p = new RequestParser(rec, 1024);
  p.push(Buffer.concat([encode(good), bad, encode(good)]));
  t.is(rec.got.length, 1);
  t.is(rec.errors.length, 1);
  t.regex(rec.errors[0]!, /25609514/);
  t.true(p.failed);
  t.false(p.idle);
  p.push(encode(good));
  p.push(bad);
  t.is(rec.got.length, 1);
  t.is(rec.errors.length, 1);
});

test('bad magic arriving one byte at a time is reported once the header is complete', (t) => {
  const bad = encode(req({ type: CMD_FLUSH }));
  bad.writeUInt32BE(0x67446698, 0); // a reply magic, not a request magic
  const rec = new Recorder();
  const p = new RequestParser(rec, 1024);
  for (const b of bad) p.push(Buffer.from([b]));
  t.deepEqual(rec.got, []);
  t.is(rec.errors.length, 1);
  t.true(p.failed);
});

test('a WRITE payload is not mistaken for a header: bad magic after a payload is caught', (t) => {
  const w = req({ type: CMD_WRITE, length: 4, payload: Buffer.from('abcd') });
  const rec = parse([encode(w), Buffer.alloc(28)], 1024);
  t.is(rec.got.length, 1);
  t.is(rec.errors.length, 1);
});

// ── idle ────────────────────────────────────────────────────────────────────

test('idle is true exactly between requests', (t) => {
  const reqs = [
    req({ type: CMD_READ, length: 512 }),
    req({ type: CMD_WRITE, length: 5, payload: Buffer.from('hello') }),
    req({ type: CMD_WRITE, length: 0 }),
    req({ type: CMD_WRITE, length: 40, payload: Buffer.alloc(40, 1) }), // oversize at 16
    req({ type: CMD_DISC }),
  ];
  const stream = Buffer.concat(reqs.map(encode));
  const boundaries = new Set<number>([0]);
  let at = 0;
  for (const r of reqs) boundaries.add((at += encode(r).length));
  const rec = new Recorder();
  const p = new RequestParser(rec, 16);
  t.true(p.idle);
  for (let i = 0; i < stream.length; i++) {
    p.push(stream.subarray(i, i + 1));
    t.is(p.idle, boundaries.has(i + 1), `after byte ${i + 1}`);
  }
  t.is(rec.got.length, reqs.length);
});

// ── Properties ──────────────────────────────────────────────────────────────

const MAX_PAYLOAD = 2048;

const arbOffset = fc.oneof(
  fc.bigInt({ min: 0n, max: 2n ** 32n }),
  fc.bigInt({ min: 0n, max: 2n ** 53n - 1n }),
  fc.bigInt({ min: 2n ** 53n - 2n, max: 2n ** 53n + 2n }),
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
);

const arbRequest: fc.Arbitrary<Req> = fc.oneof(
  {
    arbitrary: fc.record({
      flags: fc.integer({ min: 0, max: 0xffff }),
      type: fc.oneof(fc.integer({ min: 0, max: 8 }).filter((x) => x !== CMD_WRITE), fc.integer({ min: 9, max: 0xffff })),
      cookieHi: fc.nat({ max: 0xffffffff }),
      cookieLo: fc.nat({ max: 0xffffffff }),
      offset: arbOffset,
      length: fc.nat({ max: 0xffffffff }),
    }),
    weight: 2,
  },
  {
    arbitrary: fc.record({
      flags: fc.integer({ min: 0, max: 0xffff }),
      cookieHi: fc.nat({ max: 0xffffffff }),
      cookieLo: fc.nat({ max: 0xffffffff }),
      offset: arbOffset,
      payload: fc.uint8Array({ maxLength: 4096 }),
    }).map((w): Req => ({ ...w, type: CMD_WRITE, length: w.payload.length, payload: Buffer.from(w.payload) })),
    weight: 3,
  },
);

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

test('property: whole stream = the model; random multi-way splits give the same requests', (t) => {
  fc.assert(
    fc.property(fc.array(arbRequest, { maxLength: 12 }), fc.array(fc.nat(), { maxLength: 20 }), (reqs, cuts) => {
      const stream = Buffer.concat(reqs.map(encode));
      const want = reqs.map((r) => expected(r, MAX_PAYLOAD));
      const whole = parse([stream], MAX_PAYLOAD);
      deepStrictEqual(whole.errors, []);
      deepStrictEqual(whole.got, want);
      const split = parse(splitAt(stream, cuts), MAX_PAYLOAD);
      deepStrictEqual(split.errors, []);
      deepStrictEqual(split.got, want);
    }),
    { numRuns: 300 },
  );
  t.pass();
});

const arbSmallRequest: fc.Arbitrary<Req> = fc.oneof(
  fc.record({
    flags: fc.integer({ min: 0, max: 0xffff }),
    type: fc.constantFrom(CMD_READ, CMD_FLUSH, CMD_TRIM, CMD_DISC, CMD_BLOCK_STATUS),
    cookieHi: fc.nat({ max: 0xffffffff }),
    cookieLo: fc.nat({ max: 0xffffffff }),
    offset: arbOffset,
    length: fc.nat({ max: 0xffffffff }),
  }),
  fc.record({
    cookieLo: fc.nat({ max: 0xffffffff }),
    offset: arbOffset,
    payload: fc.uint8Array({ maxLength: 48 }),
  }).map((w): Req => ({ flags: 0, cookieHi: 0, ...w, type: CMD_WRITE, length: w.payload.length, payload: Buffer.from(w.payload) })),
);

test('property (small streams): every two-way split and byte-at-a-time equal the whole; idle at boundaries', (t) => {
  const max = 24; // so the small WRITEs are sometimes oversize
  fc.assert(
    fc.property(fc.array(arbSmallRequest, { minLength: 1, maxLength: 4 }), (reqs) => {
      const encoded = reqs.map(encode);
      const stream = Buffer.concat(encoded);
      const want = reqs.map((r) => expected(r, max));
      deepStrictEqual(parse([stream], max).got, want);
      for (let i = 0; i <= stream.length; i++) {
        const rec = parse([stream.subarray(0, i), stream.subarray(i)], max);
        deepStrictEqual(rec.errors, []);
        deepStrictEqual(rec.got, want, `split at ${i}`);
      }
      const boundaries = new Set<number>([0]);
      let at = 0;
      for (const e of encoded) boundaries.add((at += e.length));
      const rec = new Recorder();
      const p = new RequestParser(rec, max);
      for (let i = 0; i < stream.length; i++) {
        p.push(stream.subarray(i, i + 1));
        strictEqual(p.idle, boundaries.has(i + 1), `idle after byte ${i + 1}`);
        // Requests are delivered as soon as their last byte arrives, not later.
        strictEqual(rec.got.length, [...boundaries].filter((b) => b > 0 && b <= i + 1).length);
      }
      deepStrictEqual(rec.got, want);
    }),
    { numRuns: 200 },
  );
  t.pass();
});

test('property: random garbage never throws; at most one framing error, and nothing after it', (t) => {
  const arbStream = fc.oneof(
    fc.uint8Array({ maxLength: 600 }).map((b) => Buffer.from(b)),
    // Valid requests, then garbage: the valid prefix must still be parsed.
    fc.tuple(fc.array(arbSmallRequest, { maxLength: 3 }), fc.uint8Array({ minLength: 28, maxLength: 200 }))
      .map(([reqs, junk]) => Buffer.concat([...reqs.map(encode), Buffer.from(junk)])),
    // Garbage behind a valid magic: headers with arbitrary fields.
    fc.array(fc.uint8Array({ minLength: 24, maxLength: 24 }), { maxLength: 6 })
      .map((hs) => Buffer.concat(hs.map((h) => Buffer.concat([Buffer.from('25609513', 'hex'), Buffer.from(h)])))),
  );
  fc.assert(
    fc.property(arbStream, fc.array(fc.nat(), { maxLength: 10 }), fc.integer({ min: 0, max: 64 }), (stream, cuts, max) => {
      const rec = new Recorder();
      let gotAtError = -1;
      const sink: RequestSink = {
        onRequest: (...a) => {
          if (gotAtError >= 0) throw new Error('request delivered after a framing error');
          rec.onRequest(...a);
        },
        onFramingError: (r) => {
          gotAtError = rec.got.length;
          rec.onFramingError(r);
        },
      };
      const q = new RequestParser(sink, max);
      for (const c of splitAt(stream, cuts)) q.push(c);
      strictEqual(rec.errors.length <= 1, true);
      strictEqual(q.failed, rec.errors.length === 1);
      if (q.failed) strictEqual(q.idle, false);
      for (const g of rec.got) {
        strictEqual(Number.isSafeInteger(g.offset) && g.offset >= 0, true);
        if (g.payload) strictEqual(g.payload.length, g.length);
      }
      // Chunking does not matter for garbage either.
      const whole = parse([stream], max);
      deepStrictEqual(whole.got, rec.got);
      deepStrictEqual(whole.errors, rec.errors);
    }),
    { numRuns: 500 },
  );
  t.pass();
});
