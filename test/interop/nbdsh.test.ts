// Protocol-level checks with libnbd's Python shell (nbdsh). Where the client would normally
// refuse to send a request (read-only export, out of bounds), libnbd's strict mode is turned
// off so the request reaches the server and the server's own answer is tested.
import test from 'ava';
import path from 'node:path';
import { describeResult, tempDir } from '../helpers/exec.js';
import { startTestServer, logServersOnFailure, crashMessage, type NbdServer } from '../helpers/server.js';
import { makeSparseFile, nbdsh, MiB } from '../helpers/clients.js';
import type { ExecutionContext } from 'ava';

logServersOnFailure(test);

async function serve(t: ExecutionContext, size: number, readOnly = false): Promise<NbdServer> {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  makeSparseFile(file, size);
  return startTestServer(t, file, { readOnly });
}

/** Python: run fn, return the errno name it failed with, or "OK". */
const PY_PRELUDE = String.raw`
import os, json, errno as _errno
def err_of(fn):
    try:
        fn()
        return "OK"
    except nbd.Error as e:
        en = e.errno
        if isinstance(en, int):
            en = _errno.errorcode.get(en, str(en))
        return en or ("?" + str(e))
`;

test.serial('read-only export: the server itself refuses write, trim and zero with EPERM', async (t) => {
  const srv = await serve(t, 4 * MiB, true);
  const script = PY_PRELUDE + String.raw`
h.set_strict_mode(0)        # send the requests anyway; the server must refuse them
h.connect_uri(${JSON.stringify(srv.uri)})
res = {"ro": h.is_read_only()}
res["pwrite"] = err_of(lambda: h.pwrite(b"\xab" * 4096, 0))
res["trim"] = err_of(lambda: h.trim(4096, 0))
res["zero"] = err_of(lambda: h.zero(4096, 0))
res["still_zero"] = bytes(h.pread(4096, 0)) == bytes(4096)
print("RESULT " + json.dumps(res))
`;
  const r = await nbdsh(null, script, 60);
  t.is(r.code, 0, describeResult(r));
  t.deepEqual(r.result, { ro: true, pwrite: 'EPERM', trim: 'EPERM', zero: 'EPERM', still_zero: true }, describeResult(r));
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('requests beyond the end of the export fail cleanly and the connection keeps working', async (t) => {
  const size = 4 * MiB;
  const srv = await serve(t, size);
  const script = PY_PRELUDE + String.raw`
h.set_strict_mode(0)
h.connect_uri(${JSON.stringify(srv.uri)})
size = h.get_size()
res = {"size": size}
res["read_past_end"] = err_of(lambda: h.pread(4096, size - 2048))
res["read_far"] = err_of(lambda: h.pread(512, size + (1 << 30)))
res["write_past_end"] = err_of(lambda: h.pwrite(b"x" * 4096, size - 2048))
res["zero_past_end"] = err_of(lambda: h.zero(8192, size - 4096))
res["trim_past_end"] = err_of(lambda: h.trim(8192, size - 4096))
# The last bytes are still intact and usable.
h.pwrite(b"\x5a" * 10, size - 10)
res["tail"] = bytes(h.pread(12, size - 12)) == b"\0\0" + b"\x5a" * 10
res["before_end_untouched"] = bytes(h.pread(2038, size - 2048)) == bytes(2038)
print("RESULT " + json.dumps(res))
`;
  const r = await nbdsh(null, script, 60);
  t.is(r.code, 0, describeResult(r));
  const res = r.result;
  t.truthy(res, describeResult(r));
  if (!res) return;
  t.is(res.size, size);
  for (const k of ['read_past_end', 'read_far', 'write_past_end', 'zero_past_end', 'trim_past_end']) {
    t.true(['EINVAL', 'ENOSPC', 'EIO', 'EOVERFLOW'].includes(res[k]), `${k}: server answered ${res[k]}, expected an error (EINVAL/ENOSPC)`);
  }
  t.true(res.tail, 'the final bytes of the export can be written and read');
  t.true(res.before_end_untouched, 'a refused write past the end did not write its in-range part');
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('byte-granular I/O, large requests, FUA, cache, fast zero semantics', async (t) => {
  const srv = await serve(t, 64 * MiB);
  const script = PY_PRELUDE + String.raw`
res = {}
# 1-byte and boundary-straddling writes
h.pwrite(b"\xab" * 16384, 0)
h.pwrite(b"\x01", 1)
h.pwrite(b"\x02\x03\x04", 4095)
h.pwrite(b"\x05" * 513, 8191)
buf = bytes(h.pread(16384, 0))
exp = bytearray(b"\xab" * 16384); exp[1] = 1; exp[4095:4098] = b"\x02\x03\x04"; exp[8191:8704] = b"\x05" * 513
res["byte_granular"] = buf == bytes(exp)
# one large request each way (the advertised maximum, else 32 MiB)
mx = h.get_block_size(nbd.SIZE_MAXIMUM) or 0
big = min(mx if mx > 0 else 32 << 20, 32 << 20)
res["big"] = big
data = os.urandom(big)
h.pwrite(data, 16 << 20)
res["big_roundtrip"] = bytes(h.pread(big, 16 << 20)) == data
# FUA variants
d = os.urandom(65536)
h.pwrite(d, 1 << 20, nbd.CMD_FLAG_FUA)
res["fua_write"] = bytes(h.pread(65536, 1 << 20)) == d
h.zero(4096, 1 << 20, nbd.CMD_FLAG_FUA)
res["fua_zero"] = bytes(h.pread(8192, 1 << 20)) == bytes(4096) + d[4096:8192]
res["fua_trim"] = err_of(lambda: h.trim(4096, (1 << 20) + 8192, nbd.CMD_FLAG_FUA))
res["flush"] = err_of(lambda: h.flush())
res["cache"] = err_of(lambda: h.cache(1 << 20, 0))
# fast zero: either done (then it reads as zero) or refused with ENOTSUP
h.pwrite(b"\x77" * 65536, 2 << 20)
fz = err_of(lambda: h.zero(65536, 2 << 20, nbd.CMD_FLAG_FAST_ZERO))
res["fast_zero"] = fz
if fz == "OK":
    res["fast_zero_reads_zero"] = bytes(h.pread(65536, 2 << 20)) == bytes(65536)
else:
    res["fast_zero_reads_zero"] = True
h.zero(65536, 2 << 20)
res["slow_zero_reads_zero"] = bytes(h.pread(65536, 2 << 20)) == bytes(65536)
# zero with NO_HOLE (must read zero, must not be punched is not observable here)
h.pwrite(b"\x66" * 65536, 3 << 20)
h.zero(65536, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
res["no_hole_zero"] = bytes(h.pread(65536, 3 << 20)) == bytes(65536)
print("RESULT " + json.dumps(res))
`;
  const r = await nbdsh(srv.uri, script, 60);
  t.is(r.code, 0, describeResult(r));
  const res = r.result;
  t.truthy(res, describeResult(r));
  if (!res) return;
  t.true(res.byte_granular, 'byte-granular writes');
  t.true(res.big >= 1 * MiB, `max request size ${res.big}`);
  t.true(res.big_roundtrip, `a single ${res.big}-byte write/read round-trips`);
  t.true(res.fua_write);
  t.true(res.fua_zero);
  t.is(res.fua_trim, 'OK');
  t.is(res.flush, 'OK');
  t.is(res.cache, 'OK');
  t.true(res.fast_zero === 'OK' || res.fast_zero === 'ENOTSUP', `fast zero answered ${res.fast_zero}`);
  t.true(res.fast_zero_reads_zero);
  t.true(res.slow_zero_reads_zero);
  t.true(res.no_hole_zero);
  t.true(srv.alive(), crashMessage(srv));
});

test.serial('a client vanishing with requests in flight does not disturb the server', async (t) => {
  const srv = await serve(t, 16 * MiB);
  const script = String.raw`
import os
for i in range(32):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(65536))), i * 65536)
for i in range(32):
    h.aio_pread(nbd.Buffer(65536), i * 65536)
os._exit(0)   # no NBD_CMD_DISC, no waiting: the socket just closes
`;
  const r1 = await nbdsh(srv.uri, script, 30);
  t.is(r1.code, 0, describeResult(r1));
  // An abrupt close half-way through a request header/payload, too.
  const half = await nbdsh(srv.uri, String.raw`
import os, socket
h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(8 << 20))), 0)
h.poll(0)
os._exit(0)
`, 30);
  t.is(half.code, 0, describeResult(half));
  const check = await nbdsh(srv.uri, String.raw`
import os, json
d = os.urandom(4096)
h.pwrite(d, 12 << 20)
print("RESULT " + json.dumps({"ok": bytes(h.pread(4096, 12 << 20)) == d, "size": h.get_size()}))
`, 30);
  t.is(check.code, 0, describeResult(check));
  t.deepEqual(check.result, { ok: true, size: 16 * MiB });
  t.true(srv.alive(), crashMessage(srv));
});
