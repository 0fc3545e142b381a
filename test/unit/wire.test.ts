/**
 * Mesh framing: frames encoded with `encodeFrame`, fed to `FrameParser` whole, one
 * byte at a time, split at every boundary and at random multi-way splits; then the
 * inputs a hostile peer would send, each of which must be refused with a reason and
 * none of which may throw.
 */
import test from 'ava';
import fc from 'fast-check';
import { deepStrictEqual } from 'node:assert/strict';
import { Packr } from 'msgpackr';

import {
  DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_BYTES, FrameParser, PROTOCOL_VERSION, decodePayload, encodeFrame,
  type Frame, type FrameSink,
} from '../../cluster/wire.js';

class Recorder implements FrameSink {
  readonly frames: Frame[] = [];
  readonly errors: string[] = [];
  onFrame(f: Frame): void {
    this.frames.push(f);
  }
  onError(reason: string): void {
    this.errors.push(reason);
  }
}

function parse(chunks: Buffer[], maxFrameBytes?: number): Recorder {
  const rec = new Recorder();
  const p = new FrameParser(rec, maxFrameBytes === undefined ? {} : { maxFrameBytes });
  for (const c of chunks) p.push(c);
  return rec;
}

const raw = new Packr({ useRecords: false });

/** A frame with an arbitrary payload object (for building invalid ones). */
function rawFrame(payload: unknown): Buffer {
  const body = raw.pack(payload);
  const h = Buffer.alloc(FRAME_HEADER_BYTES);
  h.writeUInt32BE(body.length, 0);
  return Buffer.concat([h, body]);
}

function withLength(payload: Buffer): Buffer {
  const h = Buffer.alloc(FRAME_HEADER_BYTES);
  h.writeUInt32BE(payload.length, 0);
  return Buffer.concat([h, payload]);
}

const SAMPLE: Frame[] = [
  { t: 'hello', c: 0, b: { node: 3, nonce: Buffer.alloc(32, 7) } },
  { t: 'msg', c: 1, b: { s: 1, t: 'oplock.share', d: { lock: 'vseg7.rmap[0]', gen: 12 } } },
  { t: 'res', c: 0xffff_ffff, b: null },
  { t: 'x', c: 42, b: [1, 'two', [3], { four: 4 }, true, false, null, -5, 2 ** 40, 1.5] },
  { t: 'msg', c: 0, b: { s: 2, t: 'blob', d: Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 31) & 0xff)) } },
  { t: 'ünïcødé ✓', c: 7, b: 'a string body' },
];
const SAMPLE_BYTES = Buffer.concat(SAMPLE.map(encodeFrame));

// Bodies that survive a msgpack round trip exactly (no undefined in arrays, no -0, no __proto__ keys).
const bodyArb: fc.Arbitrary<unknown> = fc.letrec<{ v: unknown }>((tie) => ({
  v: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    fc.constant(null), fc.boolean(), fc.integer(), fc.string(),
    fc.double({ noNaN: true }).filter((d) => !Object.is(d, -0)),
    fc.uint8Array({ maxLength: 64 }).map((u) => Buffer.from(u)),
    fc.array(tie('v'), { maxLength: 4 }),
    fc.dictionary(fc.string().filter((k) => k !== '__proto__'), tie('v'), { maxKeys: 4, noNullPrototype: true }),
  ),
})).v;

const frameArb: fc.Arbitrary<Frame> = fc.record({
  t: fc.string({ minLength: 1, maxLength: 20 }),
  c: fc.nat({ max: 0xffff_ffff }),
  b: bodyArb,
}, { noNullPrototype: true });

// ── Round trip ──────────────────────────────────────────────────────────────

test('encodeFrame writes a big-endian u32 payload length, then a msgpack map {v, t, c, b}', (t) => {
  const bytes = encodeFrame({ t: 'hb', c: 0, b: { a: 5 } });
  t.is(bytes.readUInt32BE(0), bytes.length - FRAME_HEADER_BYTES);
  t.deepEqual(raw.unpack(bytes.subarray(FRAME_HEADER_BYTES)), { v: PROTOCOL_VERSION, t: 'hb', c: 0, b: { a: 5 } });
});

test('sample frames round-trip through one push', (t) => {
  const rec = parse([SAMPLE_BYTES]);
  t.deepEqual(rec.errors, []);
  t.deepEqual(rec.frames, SAMPLE);
});

test('arbitrary frames round-trip (fast-check)', (t) => {
  fc.assert(fc.property(fc.array(frameArb, { minLength: 1, maxLength: 5 }), (frames) => {
    const rec = parse([Buffer.concat(frames.map(encodeFrame))]);
    deepStrictEqual(rec.errors, []);
    deepStrictEqual(rec.frames, frames);
  }), { numRuns: 200 });
  t.pass();
});

// ── Splits ──────────────────────────────────────────────────────────────────

test('split at every byte boundary: the same frames', (t) => {
  for (let i = 0; i <= SAMPLE_BYTES.length; i++) {
    const rec = parse([SAMPLE_BYTES.subarray(0, i), SAMPLE_BYTES.subarray(i)]);
    deepStrictEqual(rec.errors, [], `split at ${i}`);
    deepStrictEqual(rec.frames, SAMPLE, `split at ${i}`);
  }
  t.pass();
});

test('one byte per push: the same frames, and each is delivered only on its last byte', (t) => {
  const rec = new Recorder();
  const p = new FrameParser(rec);
  const ends = new Set<number>();
  let at = 0;
  for (const f of SAMPLE) ends.add((at += encodeFrame(f).length));
  for (let i = 0; i < SAMPLE_BYTES.length; i++) {
    const before = rec.frames.length;
    p.push(SAMPLE_BYTES.subarray(i, i + 1));
    t.is(rec.frames.length - before, ends.has(i + 1) ? 1 : 0);
    if (ends.has(i + 1) !== p.idle) t.fail(`idle is ${p.idle} after byte ${i}`);
  }
  t.deepEqual(rec.errors, []);
  t.deepEqual(rec.frames, SAMPLE);
});

test('random multi-way splits give the same frames (fast-check)', (t) => {
  fc.assert(fc.property(
    fc.array(frameArb, { minLength: 1, maxLength: 6 }),
    fc.array(fc.nat(), { maxLength: 12 }),
    (frames, cutSeeds) => {
      const bytes = Buffer.concat(frames.map(encodeFrame));
      const cuts = [...new Set(cutSeeds.map((s) => s % (bytes.length + 1)))].sort((a, b) => a - b);
      const chunks: Buffer[] = [];
      let prev = 0;
      for (const c of [...cuts, bytes.length]) {
        chunks.push(bytes.subarray(prev, c));
        prev = c;
      }
      const rec = parse(chunks);
      deepStrictEqual(rec.errors, []);
      deepStrictEqual(rec.frames, frames);
    },
  ), { numRuns: 300 });
  t.pass();
});

test('a frame of exactly maxFrameBytes is accepted', (t) => {
  const f: Frame = { t: 'msg', c: 1, b: 'x'.repeat(100) };
  const bytes = encodeFrame(f);
  const rec = parse([bytes], bytes.length - FRAME_HEADER_BYTES);
  t.deepEqual(rec.errors, []);
  t.deepEqual(rec.frames, [f]);
});

// ── Oversized frames ────────────────────────────────────────────────────────

test('the default maximum is 4 MiB', (t) => {
  t.is(DEFAULT_MAX_FRAME_BYTES, 4 * 1024 * 1024);
  const h = Buffer.alloc(4);
  h.writeUInt32BE(DEFAULT_MAX_FRAME_BYTES + 1, 0);
  t.regex(parse([h]).errors[0] ?? '', /exceeds the maximum 4194304/);
});

test('an oversized length is refused as soon as its header is in, without waiting for (or buffering) the payload', (t) => {
  for (const length of [65, 1000, 0xffff_ffff]) {
    const h = Buffer.alloc(4);
    h.writeUInt32BE(length, 0);
    const rec = new Recorder();
    const p = new FrameParser(rec, { maxFrameBytes: 64 });
    p.push(h.subarray(0, 3));
    t.deepEqual(rec.errors, [], 'three header bytes are not enough to judge');
    p.push(h.subarray(3));
    t.deepEqual(rec.errors, [`frame length ${length} exceeds the maximum 64`]);
    t.true(p.failed);
    // The announced payload streaming in is ignored, not collected.
    p.push(Buffer.alloc(100_000));
    p.push(encodeFrame({ t: 'ok', c: 0, b: null }));
    t.is(rec.errors.length, 1);
    t.deepEqual(rec.frames, []);
  }
});

test('a frame after a good one is judged by the limit in force at its header (raised after authentication)', (t) => {
  const small = encodeFrame({ t: 'hello', c: 0, b: 1 });
  const big = encodeFrame({ t: 'msg', c: 0, b: 'y'.repeat(500) });
  const rec = new Recorder();
  const p = new FrameParser({
    onFrame: (f) => {
      rec.onFrame(f);
      p.maxFrameBytes = 1024;
    },
    onError: (r) => rec.onError(r),
  }, { maxFrameBytes: 64 });
  p.push(Buffer.concat([small, big]));
  t.deepEqual(rec.errors, []);
  t.is(rec.frames.length, 2);
});

// ── Garbage ─────────────────────────────────────────────────────────────────

const MALFORMED: [string, Buffer, RegExp][] = [
  ['length 0', Buffer.alloc(4), /empty payload/],
  ['invalid msgpack (0xc1 is never used)', withLength(Buffer.from([0xc1])), /not a map|not valid msgpack/],
  ['truncated msgpack (str8 of 200 with 3 bytes)', withLength(Buffer.from([0xd9, 200, 0x61, 0x62, 0x63])), /not valid msgpack/],
  ['trailing bytes after the map', withLength(Buffer.concat([raw.pack({ v: 1, t: 'a', c: 0, b: 1 }), Buffer.from([0])])), /not valid msgpack/],
  ['an array payload', rawFrame([1, 'a', 0, null]), /not a map \(got array\)/],
  ['a string payload', rawFrame('hello'), /not a map \(got "hello"\)/],
  ['a nil payload', rawFrame(null), /not a map \(got null\)/],
  ['an integer payload', rawFrame(7), /not a map \(got 7\)/],
  ['a binary payload', rawFrame(Buffer.alloc(3)), /not a map \(got binary\(3\)\)/],
  ['an ext-typed payload (timestamp)', rawFrame(new Date(0)), /not a map \(got Date\)/],
  ['no version', rawFrame({ t: 'a', c: 0, b: 1 }), /protocol version nothing, expected 1/],
  ['version 2', rawFrame({ v: 2, t: 'a', c: 0, b: 1 }), /protocol version 2, expected 1/],
  ['version as a string', rawFrame({ v: '1', t: 'a', c: 0, b: 1 }), /protocol version "1", expected 1/],
  ['type missing', rawFrame({ v: 1, c: 0, b: 1 }), /frame type \(t\) is not a string \(got nothing\)/],
  ['type a number', rawFrame({ v: 1, t: 5, c: 0, b: 1 }), /frame type \(t\) is not a string \(got 5\)/],
  ['type binary', rawFrame({ v: 1, t: Buffer.from('msg'), c: 0, b: 1 }), /frame type \(t\) is not a string \(got binary\(3\)\)/],
  ['type empty', rawFrame({ v: 1, t: '', c: 0, b: 1 }), /frame type \(t\) is empty/],
  ['correlation id missing', rawFrame({ v: 1, t: 'a', b: 1 }), /correlation id \(c\) is not a u32 integer \(got nothing\)/],
  ['correlation id negative', rawFrame({ v: 1, t: 'a', c: -1, b: 1 }), /correlation id \(c\) is not a u32 integer \(got -1\)/],
  ['correlation id fractional', rawFrame({ v: 1, t: 'a', c: 1.5, b: 1 }), /\(got 1\.5\)/],
  ['correlation id 2^32', rawFrame({ v: 1, t: 'a', c: 2 ** 32, b: 1 }), /\(got 4294967296\)/],
  ['correlation id a string', rawFrame({ v: 1, t: 'a', c: '1', b: 1 }), /\(got "1"\)/],
];

for (const [name, bytes, reason] of MALFORMED) {
  test(`refused with a reason: ${name}`, (t) => {
    const rec = new Recorder();
    const p = new FrameParser(rec);
    t.notThrows(() => p.push(Buffer.concat([bytes, encodeFrame({ t: 'after', c: 0, b: null })])));
    t.is(rec.errors.length, 1);
    t.regex(rec.errors[0]!, reason);
    t.deepEqual(rec.frames, [], 'nothing after the error is trusted');
    t.true(p.failed);
  });
}

test('a reason quoting peer text is clipped (msgpackr quotes whole payloads)', (t) => {
  const big = withLength(Buffer.concat([raw.pack({ v: 1, t: 'a', c: 0, b: 'z'.repeat(10_000) }), Buffer.from([0])]));
  const rec = parse([big]);
  t.is(rec.errors.length, 1);
  t.true(rec.errors[0]!.length < 400, `reason is ${rec.errors[0]!.length} chars`);
});

test('good frames before a bad one are delivered; the error is reported once; later pushes are ignored', (t) => {
  const rec = new Recorder();
  const p = new FrameParser(rec);
  p.push(Buffer.concat([encodeFrame(SAMPLE[0]!), encodeFrame(SAMPLE[1]!), rawFrame({ v: 9, t: 'a', c: 0 })]));
  p.push(SAMPLE_BYTES);
  t.deepEqual(rec.frames, [SAMPLE[0], SAMPLE[1]]);
  t.is(rec.errors.length, 1);
});

test('stop() silences the parser without an error', (t) => {
  const rec = new Recorder();
  const p = new FrameParser(rec);
  p.push(SAMPLE_BYTES.subarray(0, 10));
  p.stop();
  p.push(SAMPLE_BYTES);
  t.deepEqual(rec.frames, []);
  t.deepEqual(rec.errors, []);
});

test('random bytes never throw: either frames, or exactly one error and nothing after it (fast-check)', (t) => {
  fc.assert(fc.property(
    fc.array(fc.uint8Array({ minLength: 0, maxLength: 300 }), { minLength: 1, maxLength: 5 }),
    (chunks) => {
      const events: string[] = [];
      const p = new FrameParser({
        onFrame: () => events.push('frame'),
        onError: (reason) => {
          if (typeof reason !== 'string' || reason.length === 0) throw new Error('empty reason');
          events.push('error');
        },
      }, { maxFrameBytes: 1024 });
      for (const c of chunks) p.push(Buffer.from(c));
      const firstError = events.indexOf('error');
      if (firstError >= 0 && firstError !== events.length - 1) throw new Error(`events after an error: ${events.join(',')}`);
    },
  ), { numRuns: 500 });
  t.pass();
});

test('valid length + random payload bytes: refused or decoded, never thrown (fast-check)', (t) => {
  fc.assert(fc.property(fc.uint8Array({ minLength: 1, maxLength: 200 }), (payload) => {
    const r = decodePayload(Buffer.from(payload));
    if (typeof r !== 'string') {
      // Random bytes that happen to be a valid frame must have passed every check.
      if (typeof r.t !== 'string' || !Number.isInteger(r.c)) throw new Error('an invalid frame passed');
    }
    const rec = parse([withLength(Buffer.from(payload))]);
    if (rec.errors.length + rec.frames.length !== 1) throw new Error('expected exactly one frame or one error');
  }), { numRuns: 500 });
  t.pass();
});

test('encodeFrame refuses a malformed frame (a programmer error)', (t) => {
  t.throws(() => encodeFrame({ t: '', c: 0, b: null }), { instanceOf: TypeError });
  t.throws(() => encodeFrame({ t: 'a', c: -1, b: null }), { instanceOf: TypeError });
  t.throws(() => encodeFrame({ t: 'a', c: 2 ** 32, b: null }), { instanceOf: TypeError });
  t.throws(() => encodeFrame({ t: 'a', c: 0.5, b: null }), { instanceOf: TypeError });
});
