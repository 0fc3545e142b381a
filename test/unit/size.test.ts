/**
 * Sizes as people type them (binary multiples throughout), and back.
 */
import test from 'ava';
import fc from 'fast-check';
import { strictEqual } from 'node:assert/strict';

import { formatSize, parseSize } from '../../src/util/size.js';

const KiB = 2 ** 10;
const MiB = 2 ** 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const PiB = 2 ** 50;

const GOOD: [string, number][] = [
  ['512', 512],
  ['1', 1],
  ['512b', 512],
  ['512B', 512],
  ['4k', 4 * KiB],
  ['4K', 4 * KiB],
  ['4kb', 4 * KiB],
  ['4KiB', 4 * KiB],
  ['64K', 64 * KiB],
  ['512M', 512 * MiB],
  ['512MB', 512 * MiB],
  ['1G', GiB],
  ['1g', GiB],
  ['1GiB', GiB],
  ['1gib', GiB],
  ['1GB', GiB],
  ['1.5G', 1.5 * GiB],
  ['0.5k', 512],
  ['1T', TiB],
  ['1.5T', 1.5 * TiB],
  ['2P', 2 * PiB],
  ['16', 16],
  ['007', 7],
  [' 4k', 4 * KiB],
  ['4k ', 4 * KiB],
  ['  1 G  ', GiB],
  ['1 GiB', GiB],
  ['\t2M\n', 2 * MiB],
];

for (const [text, bytes] of GOOD) {
  test(`parseSize(${JSON.stringify(text)}) = ${bytes}`, (t) => {
    t.is(parseSize(text), bytes);
  });
}

const BAD: [string, RegExp][] = [
  ['', /not a size/],
  ['abc', /not a size/],
  ['-1', /not a size/],
  ['-1G', /not a size/],
  ['0', /greater than zero/],
  ['0k', /greater than zero/],
  ['0.0', /greater than zero/],
  ['1.3', /whole number of bytes/],
  ['1.5', /whole number of bytes/],
  ['1.0001k', /whole number of bytes/],
  ['10X', /not a size/],
  ['10 XB', /not a size/],
  ['1e3', /not a size/],
  ['.5G', /not a size/],
  ['1.G', /not a size/],
  ['1,5G', /not a size/],
  ['1 G B', /not a size/],
  ['G', /not a size/],
  ['4k4', /not a size/],
  ['0x10', /not a size/],
  ['Infinity', /not a size/],
];

for (const [text, why] of BAD) {
  test(`parseSize(${JSON.stringify(text)}) throws, naming the text`, (t) => {
    const e = t.throws(() => parseSize(text));
    t.regex(e?.message ?? '', why);
    t.true(e?.message.includes(`"${text}"`), e?.message);
  });
}

test('parseSize: the error names what was being parsed', (t) => {
  const e = t.throws(() => parseSize('lots', '--size'));
  t.true(e?.message.startsWith('--size:'), e?.message);
  t.true(e?.message.includes('"lots"'));
  t.true(t.throws(() => parseSize('lots'))?.message.startsWith('size:'));
});

test('parseSize: sizes past 2^53 bytes are refused, not rounded', (t) => {
  t.throws(() => parseSize('8P')); // 2^53: not a safe integer
  t.throws(() => parseSize('9007199254740993'));
  t.is(parseSize('9007199254740991'), Number.MAX_SAFE_INTEGER);
});

const FORMATTED: [number, string][] = [
  [0, '0 B'],
  [1, '1 B'],
  [512, '512 B'],
  [1023, '1023 B'],
  [KiB, '1 KiB'],
  [1536, '1.5 KiB'],
  [4 * KiB, '4 KiB'],
  [512 * MiB, '512 MiB'],
  [GiB, '1 GiB'],
  [1.5 * GiB, '1.5 GiB'],
  [TiB, '1 TiB'],
  [PiB, '1 PiB'],
  [1024 * PiB, '1024 PiB'],
];

for (const [bytes, text] of FORMATTED) {
  test(`formatSize(${bytes}) = ${JSON.stringify(text)}`, (t) => {
    t.is(formatSize(bytes), text);
  });
}

test('property: parseSize(formatSize(n)) = n for whole multiples of a unit', (t) => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 1023 }), fc.integer({ min: 0, max: 5 }), (k, e) => {
      const n = k * 1024 ** e;
      fc.pre(Number.isSafeInteger(n)); // 8 PiB and up are past 2^53
      strictEqual(parseSize(formatSize(n)), n);
    }),
  );
  t.pass();
});

test('property: "<n><unit>" parses to n × unit for every unit spelling', (t) => {
  const units: [string[], number][] = [
    [['', 'b', 'B'], 1],
    [['k', 'K', 'kb', 'KB', 'kib', 'KiB'], KiB],
    [['m', 'M', 'mb', 'MB', 'mib', 'MiB'], MiB],
    [['g', 'G', 'gb', 'GB', 'gib', 'GiB'], GiB],
    [['t', 'T', 'tb', 'TB', 'tib', 'TiB'], TiB],
  ];
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 4096 }), fc.constantFrom(...units), fc.nat(), fc.constantFrom('', ' ', '  '), (n, [spellings, mult], i, sp) => {
      const unit = spellings[i % spellings.length]!;
      strictEqual(parseSize(`${n}${sp}${unit}`), n * mult);
    }),
  );
  t.pass();
});
