// Several connections at once, and many requests in flight on one connection.
import test from 'ava';
import path from 'node:path';
import { describeResult, tempDir } from '../helpers/exec.js';
import { startTestServer, logServersOnFailure, crashMessage, type NbdServer } from '../helpers/server.js';
import { makeSparseFile, nbdsh, qemuIo, MiB } from '../helpers/clients.js';
import type { ExecutionContext } from 'ava';

logServersOnFailure(test);

async function serve(t: ExecutionContext, size: number): Promise<NbdServer> {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  makeSparseFile(file, size);
  return startTestServer(t, file);
}

const hex = (n: number) => `0x${n.toString(16)}`;

test.serial('4 concurrent qemu-io writers on distinct (interleaved) regions, one reader verifies all', async (t) => {
  const srv = await serve(t, 32 * MiB);
  const stripe = 64 * 1024;
  const stripesPerWriter = 32;
  // Writer w owns stripes j*4+w of [0, 8M) (interleaved 64k stripes) and all of [8M+w*4M, 8M+(w+1)*4M).
  const writers = [0, 1, 2, 3].map((w) => {
    const cmds: string[] = [];
    for (let j = 0; j < stripesPerWriter; j++) cmds.push(`aio_write -P ${hex(0x41 + w)} ${(j * 4 + w) * stripe} 64k`);
    cmds.push('aio_flush');
    for (let k = 0; k < 4; k++) cmds.push(`write -P ${hex(0x61 + w)} ${8 * MiB + w * 4 * MiB + k * MiB} 1M`);
    cmds.push('flush');
    return qemuIo(srv.uri, cmds, { timeoutSec: 60 });
  });
  const results = await Promise.all(writers);
  for (const r of results) {
    t.is(r.code, 0, describeResult(r));
    t.notRegex(r.stdout + r.stderr, /failed|error/i, describeResult(r));
    t.is((r.stdout.match(/wrote 65536\/65536/g) ?? []).length, stripesPerWriter, describeResult(r));
  }
  const reads: string[] = [];
  for (let s = 0; s < stripesPerWriter * 4; s++) reads.push(`read -P ${hex(0x41 + (s % 4))} ${s * stripe} 64k`);
  for (let w = 0; w < 4; w++) reads.push(`read -P ${hex(0x61 + w)} ${8 * MiB + w * 4 * MiB} 4M`);
  reads.push(`read -P 0 ${24 * MiB} 8M`);
  const rr = await qemuIo(srv.uri, reads, { readOnly: true });
  t.is(rr.code, 0, describeResult(rr));
  t.notRegex(rr.stdout + rr.stderr, /Pattern verification failed|failed|error/i, describeResult(rr));
  t.is((rr.stdout.match(/^read \d+\/\d+ bytes/gm) ?? []).length, reads.length);
  t.true(srv.alive(), crashMessage(srv));
});

const PIPELINE_SCRIPT = String.raw`
import os, json, hashlib
results = {"ok": 0, "bad": [], "max_in_flight": 0}
sizes = [512, 4096, 65536, 1000, 200000, 131072, 7, 1048576]
# Region A [0, 16M): pre-filled synchronously, then read back by pipelined reads.
# Region B [16M, 32M): written by pipelined writes at the same time.
def layout(base, n):
    off = base; out = []
    for i in range(n):
        sz = sizes[i % len(sizes)]
        out.append((off, sz)); off += sz + 3   # odd gaps: unaligned offsets
    return out
A = layout(0, 32)
B = layout(16 << 20, 32)
adata = [os.urandom(sz) for (_, sz) in A]
for (off, sz), d in zip(A, adata):
    h.pwrite(d, off)
bdata = [os.urandom(sz) for (_, sz) in B]
ops = []
for i in range(32):
    wbuf = nbd.Buffer.from_bytearray(bytearray(bdata[i]))
    ops.append(("w", i, h.aio_pwrite(wbuf, B[i][0]), wbuf))
    rbuf = nbd.Buffer(A[i][1])
    ops.append(("r", i, h.aio_pread(rbuf, A[i][0]), rbuf))
    results["max_in_flight"] = max(results["max_in_flight"], h.aio_in_flight())
results["issued"] = len(ops)
while h.aio_in_flight() > 0:
    h.poll(-1)
for kind, i, cookie, buf in ops:
    try:
        if not h.aio_command_completed(cookie):
            results["bad"].append([kind, i, "not completed"]); continue
    except nbd.Error as e:
        results["bad"].append([kind, i, str(e)]); continue
    if kind == "r" and bytes(buf.to_bytearray()) != adata[i]:
        results["bad"].append([kind, i, "read data mismatch at %d+%d" % A[i]]); continue
    results["ok"] += 1
# Read region B back, again 32 requests in flight, and compare with what was written.
rops = []
for i in range(32):
    rbuf = nbd.Buffer(B[i][1])
    rops.append((i, h.aio_pread(rbuf, B[i][0]), rbuf))
while h.aio_in_flight() > 0:
    h.poll(-1)
results["readback_ok"] = 0
for i, cookie, buf in rops:
    if h.aio_command_completed(cookie) and bytes(buf.to_bytearray()) == bdata[i]:
        results["readback_ok"] += 1
    else:
        results["bad"].append(["readback", i, "mismatch at %d+%d" % B[i]])
print("RESULT " + json.dumps(results))
`;

test.serial('nbdsh: 64 pipelined aio_pread/aio_pwrite on one connection all complete correctly', async (t) => {
  const srv = await serve(t, 32 * MiB);
  const r = await nbdsh(srv.uri, PIPELINE_SCRIPT, 60);
  t.is(r.code, 0, describeResult(r));
  t.truthy(r.result, describeResult(r));
  if (!r.result) return;
  t.deepEqual(r.result.bad, []);
  t.is(r.result.issued, 64);
  t.is(r.result.ok, 64);
  t.is(r.result.readback_ok, 32);
  t.true(r.result.max_in_flight > 1, `requests were really in flight together (max ${r.result.max_in_flight})`);
  t.true(srv.alive(), crashMessage(srv));
});

const FLUSH_SCRIPT = (uri: string) => String.raw`
import os, json
uri = ${JSON.stringify(uri)}
res = {}
a = h
b = nbd.NBD()
b.connect_uri(uri)
res["multi_conn_a"] = a.can_multi_conn()
res["multi_conn_b"] = b.can_multi_conn()
res["can_flush_b"] = b.can_flush()
off = 3 << 20
before = b.pread(65536, off)          # B has looked at the region before A writes it
data = os.urandom(65536)
a.pwrite(data, off)                   # completed on A, no FUA
b.flush()                             # must succeed, and with multi-conn covers A's write
res["flush_ok"] = True
res["b_sees_a"] = bytes(b.pread(65536, off)) == data
# Writes completed on 3 more connections, one flush on B.
others = []
datas = []
for i in range(3):
    c = nbd.NBD(); c.connect_uri(uri); others.append(c)
    d = os.urandom(4096 * (i + 1)); datas.append(d)
    c.pwrite(d, (8 << 20) + i * 65536)
b.flush()
res["b_sees_all"] = all(bytes(b.pread(len(d), (8 << 20) + i * 65536)) == d for i, d in enumerate(datas))
# aio write on A, flush on B after it completed
d2 = os.urandom(131072)
ck = a.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d2)), 12 << 20)
while not a.aio_command_completed(ck):
    a.poll(-1)
b.flush()
res["b_sees_aio"] = bytes(b.pread(131072, 12 << 20)) == d2
for c in others: c.shutdown()
b.shutdown()
print("RESULT " + json.dumps(res))
`;

test.serial('multi-conn: flush on connection B after writes completed on A (and others) succeeds; B sees the data', async (t) => {
  const srv = await serve(t, 16 * MiB);
  const r = await nbdsh(srv.uri, FLUSH_SCRIPT(srv.uri), 60);
  t.is(r.code, 0, describeResult(r));
  t.deepEqual(r.result, {
    multi_conn_a: true,
    multi_conn_b: true,
    can_flush_b: true,
    flush_ok: true,
    b_sees_a: true,
    b_sees_all: true,
    b_sees_aio: true,
  }, describeResult(r));
  t.true(srv.alive(), crashMessage(srv));
});
