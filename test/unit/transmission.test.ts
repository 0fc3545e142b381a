/**
 * validateRequest as a declared table: each row is (limits, command, flags, offset,
 * length, oversize) and the wire error the module's header comment promises (or
 * null). Boundaries are covered on both sides.
 */
import test from 'ava';
import fc from 'fast-check';
import { strictEqual } from 'node:assert/strict';

import { validateRequest, type SessionLimits } from '../../nbd/transmission.js';
import { OFFSET_UNREPRESENTABLE } from '../../nbd/request-parser.js';

// Spec values (doc/proto.md), written out.
const READ = 0;
const WRITE = 1;
const DISC = 2;
const FLUSH = 3;
const TRIM = 4;
const CACHE = 5;
const WRITE_ZEROES = 6;
const BLOCK_STATUS = 7;
const RESIZE = 8;

const FUA = 1 << 0;
const NO_HOLE = 1 << 1;
const DF = 1 << 2;
const REQ_ONE = 1 << 3;
const FAST_ZERO = 1 << 4;
const PAYLOAD_LEN = 1 << 5;

const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;

const SIZE = 1024 * 1024;
const MAX = 64 * 1024;

const RW: SessionLimits = { sizeBytes: SIZE, readOnly: false, structuredReplies: true, baseAllocation: true, maxBlockBytes: MAX };
const RO: SessionLimits = { ...RW, readOnly: true };
const SIMPLE: SessionLimits = { ...RW, structuredReplies: false, baseAllocation: false };
const NOCTX: SessionLimits = { ...RW, baseAllocation: false };
const HUGE: SessionLimits = { ...RW, sizeBytes: 2 ** 50, maxBlockBytes: 32 * 1024 * 1024 };

interface Row {
  why: string;
  s: SessionLimits;
  type: number;
  flags?: number;
  offset?: number;
  length?: number;
  oversize?: boolean;
  expect: number | null;
}

const ALL_CMDS = [READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS];
const NAMES = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'];
/** A request of each command that is valid under RW, so that only the tested field varies. */
const VALID: Record<number, { offset: number; length: number }> = {
  [READ]: { offset: 0, length: 512 },
  [WRITE]: { offset: 0, length: 512 },
  [DISC]: { offset: 0, length: 0 },
  [FLUSH]: { offset: 0, length: 0 },
  [TRIM]: { offset: 0, length: 512 },
  [CACHE]: { offset: 0, length: 512 },
  [WRITE_ZEROES]: { offset: 0, length: 512 },
  [BLOCK_STATUS]: { offset: 0, length: 512 },
};

/** Flags each command may carry besides FUA (spec, "Command flags"). */
const DEFINED: Record<number, number> = {
  [READ]: DF,
  [WRITE]: 0,
  [DISC]: 0,
  [FLUSH]: 0,
  [TRIM]: 0,
  [CACHE]: 0,
  [WRITE_ZEROES]: NO_HOLE | FAST_ZERO,
  [BLOCK_STATUS]: REQ_ONE,
};

const ROWS: Row[] = [
  // Unknown commands → EINVAL.
  { why: 'RESIZE is not supported', s: RW, type: RESIZE, expect: EINVAL },
  { why: 'type 9', s: RW, type: 9, expect: EINVAL },
  { why: 'type 0xffff', s: RW, type: 0xffff, expect: EINVAL },
  { why: 'type 0x100 (not READ in the low byte)', s: RW, type: 0x100, expect: EINVAL },

  // FUA is valid on every command; every command's own flags are valid.
  ...ALL_CMDS.map((type): Row => ({ why: `${NAMES[type]} with FUA`, s: RW, type, flags: FUA, ...VALID[type], expect: null })),
  ...ALL_CMDS.filter((c) => DEFINED[c] !== 0).map((type): Row => ({
    why: `${NAMES[type]} with all its own flags + FUA`, s: RW, type, flags: DEFINED[type]! | FUA, ...VALID[type], expect: null,
  })),
  // Every flag defined for another command (or for none) → EINVAL.
  ...ALL_CMDS.flatMap((type) => [NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN, 1 << 6, 1 << 15]
    .filter((f) => (DEFINED[type]! & f) === 0)
    .map((f): Row => ({ why: `${NAMES[type]} with flag 0x${f.toString(16)}`, s: RW, type, flags: f, ...VALID[type], expect: EINVAL }))),

  // DF needs structured replies.
  { why: 'READ DF with structured replies', s: RW, type: READ, flags: DF, offset: 0, length: 512, expect: null },
  { why: 'READ DF without structured replies', s: SIMPLE, type: READ, flags: DF, offset: 0, length: 512, expect: EINVAL },
  { why: 'READ without DF, without structured replies', s: SIMPLE, type: READ, offset: 0, length: 512, expect: null },

  // Read-only exports: WRITE, TRIM, WRITE_ZEROES → EPERM; the rest run.
  { why: 'WRITE on read-only', s: RO, type: WRITE, offset: 0, length: 512, expect: EPERM },
  { why: 'TRIM on read-only', s: RO, type: TRIM, offset: 0, length: 512, expect: EPERM },
  { why: 'WRITE_ZEROES on read-only', s: RO, type: WRITE_ZEROES, offset: 0, length: 512, expect: EPERM },
  { why: 'WRITE_ZEROES NO_HOLE on read-only', s: RO, type: WRITE_ZEROES, flags: NO_HOLE, offset: 0, length: 512, expect: EPERM },
  { why: 'zero-length WRITE on read-only', s: RO, type: WRITE, offset: 0, length: 0, expect: EPERM },
  { why: 'READ on read-only', s: RO, type: READ, offset: 0, length: 512, expect: null },
  { why: 'CACHE on read-only', s: RO, type: CACHE, offset: 0, length: 512, expect: null },
  { why: 'FLUSH on read-only', s: RO, type: FLUSH, expect: null },
  { why: 'BLOCK_STATUS on read-only', s: RO, type: BLOCK_STATUS, offset: 0, length: 512, expect: null },
  { why: 'DISC on read-only', s: RO, type: DISC, expect: null },
  { why: 'READ FUA on read-only', s: RO, type: READ, flags: FUA, offset: 0, length: 1, expect: null },

  // Maximum block size: READ, WRITE, CACHE.
  { why: 'READ of exactly max', s: RW, type: READ, offset: 0, length: MAX, expect: null },
  { why: 'READ of max + 1', s: RW, type: READ, offset: 0, length: MAX + 1, expect: EINVAL },
  { why: 'READ of 2^32 - 1', s: HUGE, type: READ, offset: 0, length: 0xffffffff, expect: EINVAL },
  { why: 'WRITE of exactly max', s: RW, type: WRITE, offset: 0, length: MAX, expect: null },
  { why: 'WRITE of max + 1', s: RW, type: WRITE, offset: 0, length: MAX + 1, expect: EINVAL },
  { why: 'WRITE flagged oversize by the parser', s: RW, type: WRITE, offset: 0, length: 512, oversize: true, expect: EINVAL },
  { why: 'WRITE oversize and too long', s: RW, type: WRITE, offset: 0, length: MAX + 1, oversize: true, expect: EINVAL },
  { why: 'CACHE of exactly max', s: RW, type: CACHE, offset: 0, length: MAX, expect: null },
  { why: 'CACHE of max + 1', s: RW, type: CACHE, offset: 0, length: MAX + 1, expect: EINVAL },
  { why: 'TRIM longer than max (whole export)', s: RW, type: TRIM, offset: 0, length: SIZE, expect: null },
  { why: 'BLOCK_STATUS longer than max (a hint)', s: RW, type: BLOCK_STATUS, offset: 0, length: SIZE, expect: null },

  // The end of the export: WRITE / WRITE_ZEROES → ENOSPC; READ, TRIM, CACHE, BLOCK_STATUS → EINVAL.
  ...[READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS].flatMap((type): Row[] => {
    const past = type === WRITE || type === WRITE_ZEROES ? ENOSPC : EINVAL;
    const n = NAMES[type];
    return [
      { why: `${n} ending exactly at the end`, s: RW, type, offset: SIZE - 512, length: 512, expect: null },
      { why: `${n} ending one byte past the end`, s: RW, type, offset: SIZE - 511, length: 512, expect: past },
      { why: `${n} of the last byte`, s: RW, type, offset: SIZE - 1, length: 1, expect: null },
      { why: `${n} starting at the end`, s: RW, type, offset: SIZE, length: 1, expect: past },
      { why: `${n} starting past the end`, s: RW, type, offset: SIZE + 4096, length: 512, expect: past },
      { why: `${n} at OFFSET_UNREPRESENTABLE`, s: RW, type, offset: OFFSET_UNREPRESENTABLE, length: 1, expect: past },
      { why: `${n} whose offset + length overflows 2^53`, s: HUGE, type, offset: 2 ** 53 - 2, length: 512, expect: past },
    ];
  }),
  ...[READ, WRITE, TRIM, CACHE, WRITE_ZEROES].flatMap((type): Row[] => {
    const past = type === WRITE || type === WRITE_ZEROES ? ENOSPC : EINVAL;
    const n = NAMES[type];
    return [
      { why: `zero-length ${n} at the end`, s: RW, type, offset: SIZE, length: 0, expect: null },
      { why: `zero-length ${n} one past the end`, s: RW, type, offset: SIZE + 1, length: 0, expect: past },
      { why: `zero-length ${n} far past the end`, s: RW, type, offset: 2 ** 40, length: 0, expect: past },
    ];
  }),
  { why: 'WRITE_ZEROES of the whole export', s: RW, type: WRITE_ZEROES, offset: 0, length: SIZE, expect: null },
  { why: 'WRITE_ZEROES of the whole export + 1', s: RW, type: WRITE_ZEROES, offset: 0, length: SIZE + 1, expect: ENOSPC },
  { why: 'TRIM of the whole export + 1', s: RW, type: TRIM, offset: 0, length: SIZE + 1, expect: EINVAL },
  { why: 'READ above 2^32 in a large export', s: HUGE, type: READ, offset: 2 ** 40, length: 4096, expect: null },
  { why: 'WRITE ending exactly at the end of a large export', s: HUGE, type: WRITE, offset: 2 ** 50 - 4096, length: 4096, expect: null },
  { why: 'WRITE one past the end of a large export', s: HUGE, type: WRITE, offset: 2 ** 50 - 4095, length: 4096, expect: ENOSPC },

  // FLUSH: offset and length are reserved (zero).
  { why: 'FLUSH 0/0', s: RW, type: FLUSH, offset: 0, length: 0, expect: null },
  { why: 'FLUSH with an offset', s: RW, type: FLUSH, offset: 512, length: 0, expect: EINVAL },
  { why: 'FLUSH with a length', s: RW, type: FLUSH, offset: 0, length: 1, expect: EINVAL },
  { why: 'FLUSH with both', s: RW, type: FLUSH, offset: 1, length: 1, expect: EINVAL },

  // BLOCK_STATUS: needs a negotiated context and a non-zero length.
  { why: 'BLOCK_STATUS with base:allocation', s: RW, type: BLOCK_STATUS, offset: 4096, length: 4096, expect: null },
  { why: 'BLOCK_STATUS REQ_ONE', s: RW, type: BLOCK_STATUS, flags: REQ_ONE, offset: 0, length: 1, expect: null },
  { why: 'BLOCK_STATUS without a context', s: NOCTX, type: BLOCK_STATUS, offset: 0, length: 512, expect: EINVAL },
  { why: 'BLOCK_STATUS without structured replies', s: SIMPLE, type: BLOCK_STATUS, offset: 0, length: 512, expect: EINVAL },
  { why: 'BLOCK_STATUS of length 0', s: RW, type: BLOCK_STATUS, offset: 0, length: 0, expect: EINVAL },
  { why: 'BLOCK_STATUS of length 0 at the end', s: RW, type: BLOCK_STATUS, offset: SIZE, length: 0, expect: EINVAL },

  // DISC always goes through.
  { why: 'DISC', s: RW, type: DISC, expect: null },
  { why: 'DISC without structured replies', s: SIMPLE, type: DISC, expect: null },

  // Plain requests that must run.
  { why: 'READ 0/0', s: RW, type: READ, offset: 0, length: 0, expect: null },
  { why: 'WRITE in the middle', s: RW, type: WRITE, flags: FUA, offset: 12345, length: 678, expect: null },
  { why: 'WRITE_ZEROES FAST_ZERO|NO_HOLE', s: RW, type: WRITE_ZEROES, flags: FAST_ZERO | NO_HOLE, offset: 0, length: 4096, expect: null },
];

for (const r of ROWS) {
  const label = `${r.why} → ${r.expect === null ? 'ok' : { [EPERM]: 'EPERM', [EINVAL]: 'EINVAL', [ENOSPC]: 'ENOSPC' }[r.expect]}`;
  test(label, (t) => {
    const got = validateRequest(r.s, r.type, r.flags ?? 0, r.offset ?? 0, r.length ?? 0, r.oversize ?? false);
    if (r.expect === null) {
      t.is(got, null, got?.reason);
    } else {
      t.not(got, null);
      t.is(got?.error, r.expect, got?.reason);
      t.true(typeof got?.reason === 'string' && got.reason.length > 0);
    }
  });
}

test('the table is not trivially one-sided', (t) => {
  t.true(ROWS.filter((r) => r.expect === null).length > 20);
  t.true(ROWS.filter((r) => r.expect !== null).length > 40);
});

test('property: validateRequest never throws; errors are EPERM, EINVAL or ENOSPC with a reason', (t) => {
  const arbLimits = fc.record({
    sizeBytes: fc.oneof(fc.nat({ max: 2 ** 20 }), fc.nat({ max: Number.MAX_SAFE_INTEGER })),
    readOnly: fc.boolean(),
    structuredReplies: fc.boolean(),
    baseAllocation: fc.boolean(),
    maxBlockBytes: fc.integer({ min: 1, max: 0xffffffff }),
  });
  fc.assert(
    fc.property(
      arbLimits, fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }),
      fc.oneof(fc.nat({ max: 2 ** 21 }), fc.constant(OFFSET_UNREPRESENTABLE), fc.nat({ max: Number.MAX_SAFE_INTEGER })),
      fc.nat({ max: 0xffffffff }), fc.boolean(),
      (s, type, flags, offset, length, oversize) => {
        const r = validateRequest(s, type, flags, offset, length, oversize);
        if (r === null) {
          // Anything accepted is a known command, with known flags, inside the export.
          strictEqual(type <= BLOCK_STATUS, true);
          strictEqual((flags & ~(DEFINED[type]! | FUA)) === 0, true);
          if (type !== DISC && type !== FLUSH) strictEqual(offset + length <= s.sizeBytes, true);
          if (type === WRITE || type === TRIM || type === WRITE_ZEROES) strictEqual(s.readOnly, false);
          if (type === BLOCK_STATUS) strictEqual(s.baseAllocation && length > 0, true);
          if (type === READ || type === WRITE || type === CACHE) strictEqual(length <= s.maxBlockBytes, true);
          if (type === WRITE) strictEqual(oversize, false);
        } else {
          strictEqual([EPERM, EINVAL, ENOSPC].includes(r.error), true);
          strictEqual(typeof r.reason === 'string' && r.reason.length > 0, true);
        }
      },
    ),
    { numRuns: 2000 },
  );
  t.pass();
});
