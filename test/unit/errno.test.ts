/**
 * The errno table: host errno (Linux numbering) → NBD wire error, Node errors →
 * backend results, and the names used in logs. Wire values are the spec's
 * (doc/proto.md, "Error values"), written out here.
 */
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';

import { HOST_ERRNO, nbdErrorFromResult, nbdErrorName, resultFromError } from '../../nbd/errno.js';
import * as C from '../../nbd/constants.js';

const E = os.constants.errno;

const NBD_EPERM = 1;
const NBD_EIO = 5;
const NBD_ENOMEM = 12;
const NBD_EINVAL = 22;
const NBD_ENOSPC = 28;
const NBD_EOVERFLOW = 75;
const NBD_ENOTSUP = 95;
const NBD_ESHUTDOWN = 108;

test('wire error constants have the spec\'s values', (t) => {
  t.deepEqual(
    [C.NBD_EPERM, C.NBD_EIO, C.NBD_ENOMEM, C.NBD_EINVAL, C.NBD_ENOSPC, C.NBD_EOVERFLOW, C.NBD_ENOTSUP, C.NBD_ESHUTDOWN],
    [1, 5, 12, 22, 28, 75, 95, 108],
  );
});

const MAPPED: [string, number, number][] = [
  ['EPERM', E.EPERM, NBD_EPERM],
  ['EACCES', E.EACCES, NBD_EPERM],
  ['EROFS', E.EROFS, NBD_EPERM],
  ['EIO', E.EIO, NBD_EIO],
  ['ENOMEM', E.ENOMEM, NBD_ENOMEM],
  ['EINVAL', E.EINVAL, NBD_EINVAL],
  ['ENOSPC', E.ENOSPC, NBD_ENOSPC],
  ['EDQUOT', E.EDQUOT, NBD_ENOSPC],
  ['EFBIG', E.EFBIG, NBD_ENOSPC],
  ['EOVERFLOW', E.EOVERFLOW, NBD_EOVERFLOW],
  ['ENOTSUP', E.ENOTSUP, NBD_ENOTSUP],
  ['EOPNOTSUPP', E.EOPNOTSUPP, NBD_ENOTSUP],
  ['ESHUTDOWN (108 on Linux)', 108, NBD_ESHUTDOWN],
];

for (const [name, host, wire] of MAPPED) {
  test(`nbdErrorFromResult(-${name}) = ${wire}`, (t) => {
    t.true(Number.isInteger(host) && host > 0, `host errno for ${name}`);
    t.is(nbdErrorFromResult(-host), wire);
  });
}

test('unmapped host errnos become NBD_EIO', (t) => {
  for (const host of [E.ENOENT, E.EBADF, E.EAGAIN, E.EBUSY, E.EISDIR, E.EFAULT, E.ENXIO, E.EINTR, E.ETIMEDOUT, E.ECONNRESET, 4095, 99999]) {
    t.is(nbdErrorFromResult(-host), NBD_EIO, `-${host}`);
  }
});

test('the result is always one of the spec\'s wire values', (t) => {
  const wire = new Set([0, NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN]);
  for (let r = -200; r <= 10; r++) t.true(wire.has(nbdErrorFromResult(r)), `result ${r}`);
});

test('0 and positive results (byte counts) are success', (t) => {
  for (const r of [0, 1, 512, 4096, 2 ** 31, Number.MAX_SAFE_INTEGER]) t.is(nbdErrorFromResult(r), 0, `result ${r}`);
});

test('resultFromError: a real fs error (negative errno) passes through', (t) => {
  let err: unknown;
  try {
    fs.openSync('/nonexistent-dir-for-dve-tests/x', 'r');
  } catch (e) {
    err = e;
  }
  t.is((err as NodeJS.ErrnoException).code, 'ENOENT');
  t.is(resultFromError(err), -E.ENOENT);
  t.is(nbdErrorFromResult(resultFromError(err)), NBD_EIO);
});

test('resultFromError: a real EBADF from a closed descriptor', (t) => {
  const fd = fs.openSync(os.devNull, 'r');
  fs.closeSync(fd);
  let err: unknown;
  try {
    fs.readSync(fd, Buffer.alloc(1));
  } catch (e) {
    err = e;
  }
  t.is(resultFromError(err), -E.EBADF);
});

test('resultFromError: errno negative or positive gives -errno', (t) => {
  t.is(resultFromError(Object.assign(new Error('x'), { errno: -E.ENOSPC, code: 'ENOSPC' })), -E.ENOSPC);
  t.is(resultFromError(Object.assign(new Error('x'), { errno: E.ENOSPC })), -E.ENOSPC);
  t.is(resultFromError({ errno: -E.EROFS }), -E.EROFS);
  // errno wins over a disagreeing code.
  t.is(resultFromError({ errno: -E.EIO, code: 'ENOSPC' }), -E.EIO);
});

test('resultFromError: only a code gives that errno', (t) => {
  t.is(resultFromError(Object.assign(new Error('x'), { code: 'ENOSPC' })), -E.ENOSPC);
  t.is(resultFromError({ code: 'EROFS' }), -E.EROFS);
  t.is(resultFromError({ code: 'EDQUOT' }), -E.EDQUOT);
  t.is(nbdErrorFromResult(resultFromError({ code: 'EACCES' })), NBD_EPERM);
});

test('resultFromError: anything else is -EIO', (t) => {
  for (const e of [new Error('plain'), { code: 'ERR_INVALID_ARG_TYPE' }, { code: 42 }, { errno: 'EIO' }, 'a string', 17, null, undefined, {}]) {
    t.is(resultFromError(e), -E.EIO, String(JSON.stringify(e)));
  }
});

// A thrown error must never be mapped to success: a backend would then complete a
// failed request with result 0 and the client would be told it worked.
test('resultFromError: a thrown error with errno 0 is still an error', (t) => {
  const r = resultFromError(Object.assign(new Error('weird'), { errno: 0 }));
  t.true(r < 0, `resultFromError gave ${Object.is(r, -0) ? '-0' : r}`);
  t.not(nbdErrorFromResult(r), 0);
});

test('nbdErrorName names every wire error', (t) => {
  t.is(nbdErrorName(0), 'OK');
  t.is(nbdErrorName(NBD_EPERM), 'EPERM');
  t.is(nbdErrorName(NBD_EIO), 'EIO');
  t.is(nbdErrorName(NBD_ENOMEM), 'ENOMEM');
  t.is(nbdErrorName(NBD_EINVAL), 'EINVAL');
  t.is(nbdErrorName(NBD_ENOSPC), 'ENOSPC');
  t.is(nbdErrorName(NBD_EOVERFLOW), 'EOVERFLOW');
  t.is(nbdErrorName(NBD_ENOTSUP), 'ENOTSUP');
  t.is(nbdErrorName(NBD_ESHUTDOWN), 'ESHUTDOWN');
});

test('nbdErrorName of an unknown value says so', (t) => {
  t.is(nbdErrorName(2), 'NBD_ERROR(2)');
  t.is(nbdErrorName(999), 'NBD_ERROR(999)');
});

test('HOST_ERRNO is the host errno table', (t) => {
  t.is(HOST_ERRNO.ENOSPC, E.ENOSPC);
  t.is(HOST_ERRNO.EIO, E.EIO);
});
