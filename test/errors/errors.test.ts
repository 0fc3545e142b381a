/**
 * One test per error path, through a raw client that sends what a polite client
 * never would. Each checks the wire error the spec calls for, that the server
 * logged it where it should, and that the connection (or the server) goes on.
 */
import test from 'ava';
import os from 'node:os';
import { RawClient } from '../support/raw-client.js';
import { startTestServer, type TestServer } from '../support/in-process.js';
import {
  IHAVEOPT, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EPERM, NBD_OPT_GO,
  NBD_REP_ERR_UNSUP, NBD_REPLY_TYPE_ERROR,
} from '../../nbd/constants.js';
import { MAX_BLOCK_BYTES } from '../../nbd/export.js';

const SIZE = 16 * 1024 * 1024;

async function session(t: { teardown(f: () => unknown): void }, o: { readOnly?: boolean; structured?: boolean; metaContext?: boolean } = {}): Promise<{ srv: TestServer; c: RawClient }> {
  const srv = await startTestServer({ sizeBytes: SIZE, readOnly: o.readOnly });
  const c = await RawClient.connect(srv.port);
  t.teardown(async () => {
    c.close();
    await srv.stop();
  });
  await c.handshake('disk', { structured: o.structured, metaContext: o.metaContext });
  return { srv, c };
}

/** The connection still works: a write and read round-trip. */
async function stillServes(c: RawClient): Promise<boolean> {
  const data = Buffer.alloc(512, 0x5c);
  c.sendRequest(NBD_CMD_WRITE, { cookie: 900n, offset: 4096, payload: data });
  const w = await c.reply();
  c.sendRequest(NBD_CMD_READ, { cookie: 901n, offset: 4096, length: 512 });
  const r = await c.reply(512);
  return w?.error === 0 && w.cookie === 900n && r?.error === 0 && r.data.equals(data);
}

test('errors-out-of-range-read: NBD_EINVAL, connection goes on', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_READ, { cookie: 7n, offset: SIZE - 512, length: 1024 });
  const r = await c.reply(1024);
  t.is(r?.error, NBD_EINVAL);
  t.is(r?.cookie, 7n);
  t.is(r?.data.length, 0, 'no payload follows an error reply');
  t.true(await stillServes(c));
});

test('errors-out-of-range-read with a 64-bit offset past 2^53: NBD_EINVAL', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_READ, { offset: 0xffff_ffff_ffff_f000n, length: 4096 });
  t.is((await c.reply(4096))?.error, NBD_EINVAL);
  t.true(await stillServes(c));
});

test('errors-out-of-range-trim: NBD_EINVAL', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_TRIM, { offset: SIZE, length: 4096 });
  t.is((await c.reply())?.error, NBD_EINVAL);
  t.true(await stillServes(c));
});

test('errors-out-of-range-block-status: NBD_EINVAL (structured error chunk)', async (t) => {
  const { c } = await session(t, { structured: true, metaContext: true });
  c.sendRequest(NBD_CMD_BLOCK_STATUS, { offset: SIZE - 4096, length: 8192 });
  const r = await c.reply();
  t.is(r?.error, NBD_EINVAL);
  t.is(r?.chunks[0]?.type, NBD_REPLY_TYPE_ERROR);
  t.true(await stillServes(c));
});

test('errors-block-status-without-meta-context: NBD_EINVAL', async (t) => {
  const { c } = await session(t, { structured: true });
  c.sendRequest(NBD_CMD_BLOCK_STATUS, { offset: 0, length: 4096 });
  t.is((await c.reply())?.error, NBD_EINVAL);
});

test('errors-write-past-end: NBD_ENOSPC, payload consumed', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_WRITE, { offset: SIZE - 100, payload: Buffer.alloc(200, 1) });
  t.is((await c.reply())?.error, NBD_ENOSPC);
  t.true(await stillServes(c));
});

test('errors-write-zeroes-past-end: NBD_ENOSPC', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_WRITE_ZEROES, { offset: SIZE, length: 1 });
  t.is((await c.reply())?.error, NBD_ENOSPC);
  t.true(await stillServes(c));
});

test('errors-write-read-only: WRITE, TRIM, WRITE_ZEROES get NBD_EPERM and nothing changes', async (t) => {
  const { c, srv } = await session(t, { readOnly: true });
  c.sendRequest(NBD_CMD_WRITE, { cookie: 1n, offset: 0, payload: Buffer.alloc(4096, 0xee) });
  t.is((await c.reply())?.error, NBD_EPERM);
  c.sendRequest(NBD_CMD_TRIM, { cookie: 2n, offset: 0, length: 4096 });
  t.is((await c.reply())?.error, NBD_EPERM);
  c.sendRequest(NBD_CMD_WRITE_ZEROES, { cookie: 3n, offset: 0, length: 4096 });
  t.is((await c.reply())?.error, NBD_EPERM);
  c.sendRequest(NBD_CMD_READ, { cookie: 4n, offset: 0, length: 4096 });
  const r = await c.reply(4096);
  t.is(r?.error, 0);
  t.true(r?.data.equals(Buffer.alloc(4096)));
  t.truthy(srv.logs.find((l) => l.msg === 'request rejected' && l.error === 'EPERM'));
});

test('errors-unknown-command: NBD_EINVAL', async (t) => {
  const { c } = await session(t);
  c.sendRequest(42, { cookie: 5n, offset: 0, length: 0 });
  const r = await c.reply();
  t.is(r?.error, NBD_EINVAL);
  t.is(r?.cookie, 5n);
  t.true(await stillServes(c));
});

test('errors-unknown-flags: NBD_EINVAL for undefined bits and for flags of other commands', async (t) => {
  const { c } = await session(t, { structured: true });
  const cases: [number, number][] = [
    [NBD_CMD_READ, 0x8000],
    [NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE],
    [NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_DF],
    [NBD_CMD_FLUSH, NBD_CMD_FLAG_REQ_ONE],
    [NBD_CMD_TRIM, NBD_CMD_FLAG_FAST_ZERO],
  ];
  for (const [type, flags] of cases) {
    c.sendRequest(type, { flags, offset: 0, length: type === NBD_CMD_FLUSH ? 0 : 512 });
    t.is((await c.reply(512))?.error, NBD_EINVAL, `type ${type} flags ${flags}`);
  }
  // FUA is valid on every command.
  c.sendRequest(NBD_CMD_READ, { flags: NBD_CMD_FLAG_FUA, offset: 0, length: 512 });
  t.is((await c.reply())?.error, 0);
  t.true(await stillServes(c));
});

test('errors-df-without-structured-replies: NBD_EINVAL', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_READ, { flags: NBD_CMD_FLAG_DF, offset: 0, length: 512 });
  t.is((await c.reply(512))?.error, NBD_EINVAL);
});

test('errors-flush-with-offset: NBD_EINVAL', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_FLUSH, { offset: 4096, length: 0 });
  t.is((await c.reply())?.error, NBD_EINVAL);
});

test('errors-read-too-long: NBD_EINVAL without reading data', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_READ, { offset: 0, length: MAX_BLOCK_BYTES + 1 });
  t.is((await c.reply())?.error, NBD_EINVAL);
  t.true(await stillServes(c));
});

test('errors-write-too-long: NBD_EINVAL, the announced payload is skipped, not buffered', async (t) => {
  const { c, srv } = await session(t);
  const rssBefore = process.memoryUsage().rss;
  // Announce 1 GiB past the maximum; stream it in 1 MiB pieces.
  const announced = 0xffff_f000;
  c.sendRequest(NBD_CMD_WRITE, { cookie: 77n, offset: 0, length: announced });
  const piece = Buffer.alloc(1024 * 1024, 0xaa);
  let sent = 0;
  const target = 256 * 1024 * 1024; // a quarter of it is enough to show nothing is buffered
  while (sent < target) {
    if (!c.socket.write(piece)) await new Promise((r) => c.socket.once('drain', r));
    sent += piece.length;
  }
  const rssGrowth = process.memoryUsage().rss - rssBefore;
  t.true(rssGrowth < 128 * 1024 * 1024, `rss grew by ${rssGrowth}`);
  // Finish the payload so the stream is back in sync, then check the reply and the connection.
  let left = announced - sent;
  while (left > 0) {
    const n = Math.min(left, piece.length);
    if (!c.socket.write(n === piece.length ? piece : piece.subarray(0, n))) await new Promise((r) => c.socket.once('drain', r));
    left -= n;
  }
  const r = await c.reply(0, 60_000);
  t.is(r?.error, NBD_EINVAL);
  t.is(r?.cookie, 77n);
  t.true(await stillServes(c));
  t.truthy(srv.logs.find((l) => l.msg === 'request rejected' && String(l.reason).includes('exceeds the maximum')));
});

test('errors-backend-eio: NBD_EIO, logged, the connection stays usable', async (t) => {
  const { c, srv } = await session(t);
  srv.faults.fail(['read', 'write', 'flush'], -os.constants.errno.EIO, 3);
  c.sendRequest(NBD_CMD_READ, { cookie: 1n, offset: 0, length: 4096 });
  t.is((await c.reply(4096))?.error, NBD_EIO);
  c.sendRequest(NBD_CMD_WRITE, { cookie: 2n, offset: 0, payload: Buffer.alloc(4096, 1) });
  t.is((await c.reply())?.error, NBD_EIO);
  c.sendRequest(NBD_CMD_FLUSH, { cookie: 3n });
  t.is((await c.reply())?.error, NBD_EIO);
  t.is(srv.logs.filter((l) => l.msg === 'I/O error').length, 3);
  t.true(await stillServes(c));
});

test('errors-backend-eio on a structured read: an NBD_REPLY_TYPE_ERROR chunk', async (t) => {
  const { c, srv } = await session(t, { structured: true });
  srv.faults.fail('read', -os.constants.errno.EIO, 1);
  c.sendRequest(NBD_CMD_READ, { offset: 0, length: 4096 });
  const r = await c.reply();
  t.is(r?.error, NBD_EIO);
  t.is(r?.chunks.length, 1);
  t.is(r?.chunks[0]?.type, NBD_REPLY_TYPE_ERROR);
  t.true(await stillServes(c));
});

test('errors-backend-enospc: mapped to NBD_ENOSPC', async (t) => {
  const { c, srv } = await session(t);
  srv.faults.fail('write', -os.constants.errno.ENOSPC, 1);
  c.sendRequest(NBD_CMD_WRITE, { offset: 0, payload: Buffer.alloc(512) });
  t.is((await c.reply())?.error, NBD_ENOSPC);
});

test('errors-bad-request-magic: closes only that connection, with a log line', async (t) => {
  const { c, srv } = await session(t);
  const other = await RawClient.connect(srv.port);
  t.teardown(() => other.close());
  await other.handshake('disk');
  c.sendRequest(NBD_CMD_READ, { magic: 0xdeadbeef, length: 512 });
  t.true(await c.closedWithin());
  t.truthy(srv.logs.find((l) => l.msg === 'bad request, closing connection'));
  t.true(await stillServes(other));
});

test('errors-garbage-after-handshake: closes that connection, server keeps serving', async (t) => {
  const { c, srv } = await session(t);
  c.write(Buffer.from('GET / HTTP/1.1\r\nHost: example\r\nUser-Agent: garbage\r\n\r\n'));
  t.true(await c.closedWithin());
  const fresh = await RawClient.connect(srv.port);
  t.teardown(() => fresh.close());
  await fresh.handshake('disk');
  t.true(await stillServes(fresh));
});

test('errors-garbage-instead-of-handshake: closes with a log line', async (t) => {
  const srv = await startTestServer();
  t.teardown(() => srv.stop());
  const c = await RawClient.connect(srv.port);
  t.teardown(() => c.close());
  await c.greeting();
  c.sendClientFlags(0xffffffff);
  t.true(await c.closedWithin());
  t.truthy(srv.logs.find((l) => l.msg === 'handshake failed, closing connection' && String(l.reason).includes('unknown client flags')));
});

test('errors-bad-option-magic: closes the connection', async (t) => {
  const srv = await startTestServer();
  t.teardown(() => srv.stop());
  const c = await RawClient.connect(srv.port);
  t.teardown(() => c.close());
  await c.greeting();
  c.sendClientFlags();
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(IHAVEOPT ^ 1n, 0);
  c.write(h);
  t.true(await c.closedWithin());
  t.truthy(srv.logs.find((l) => String(l.reason).includes('bad option magic')));
});

test('errors-absurd-option-length: closes without buffering, with a log line', async (t) => {
  const srv = await startTestServer();
  t.teardown(() => srv.stop());
  const c = await RawClient.connect(srv.port);
  t.teardown(() => c.close());
  await c.greeting();
  c.sendClientFlags();
  c.sendOption(NBD_OPT_GO, Buffer.alloc(0), 0xfffffff0);
  t.true(await c.closedWithin());
  t.truthy(srv.logs.find((l) => String(l.reason).includes('exceeds')));
});

test('errors-unknown-option: NBD_REP_ERR_UNSUP and negotiation goes on', async (t) => {
  const srv = await startTestServer();
  t.teardown(() => srv.stop());
  const c = await RawClient.connect(srv.port);
  t.teardown(() => c.close());
  await c.greeting();
  c.sendClientFlags();
  c.sendOption(0x1234, Buffer.from('whatever'));
  const r = await c.optionReply();
  t.is(r?.type, NBD_REP_ERR_UNSUP);
  t.is(r?.option, 0x1234);
  const name = Buffer.from('disk');
  const d = Buffer.alloc(4 + name.length + 2);
  d.writeUInt32BE(name.length, 0);
  name.copy(d, 4);
  c.sendOption(NBD_OPT_GO, d);
  const replies = await c.optionReplies();
  t.is(replies.at(-1)?.type, 1 /* NBD_REP_ACK */);
  t.true(await stillServes(c));
});

test('errors-hangup-mid-request: logged, the server keeps serving others', async (t) => {
  const { c, srv } = await session(t);
  c.sendRequest(NBD_CMD_WRITE, { offset: 0, length: 65536, payload: Buffer.alloc(1000) });
  // The header announced 64 KiB but only 1000 bytes follow: hang up.
  await new Promise((r) => setTimeout(r, 50));
  c.socket.end();
  await c.closedWithin();
  for (let i = 0; i < 50 && !srv.logs.find((l) => l.msg === 'client hung up mid-request'); i++) await new Promise((r) => setTimeout(r, 20));
  t.truthy(srv.logs.find((l) => l.msg === 'client hung up mid-request'));
  const fresh = await RawClient.connect(srv.port);
  t.teardown(() => fresh.close());
  await fresh.handshake('disk');
  t.true(await stillServes(fresh));
});

test('errors-hangup-mid-header: the server keeps serving', async (t) => {
  const { c, srv } = await session(t);
  c.write(Buffer.alloc(10, 0x25));
  c.socket.end();
  await c.closedWithin();
  const fresh = await RawClient.connect(srv.port);
  t.teardown(() => fresh.close());
  await fresh.handshake('disk');
  t.true(await stillServes(fresh));
});

test('NBD_CMD_DISC: in-flight requests are answered, then the server closes', async (t) => {
  const { c } = await session(t);
  for (let i = 0; i < 8; i++) c.sendRequest(NBD_CMD_WRITE, { cookie: BigInt(i), offset: i * 4096, payload: Buffer.alloc(4096, i) });
  c.sendRequest(NBD_CMD_DISC);
  const cookies = new Set<bigint>();
  for (let i = 0; i < 8; i++) {
    const r = await c.reply();
    t.is(r?.error, 0);
    cookies.add(r!.cookie);
  }
  t.is(cookies.size, 8);
  t.true(await c.closedWithin());
});

test('WRITE_ZEROES with FAST_ZERO and NO_HOLE on a file: success, reads back zeros', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_WRITE, { offset: 0, payload: Buffer.alloc(65536, 0xff) });
  await c.reply();
  c.sendRequest(NBD_CMD_WRITE_ZEROES, { flags: NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE, offset: 4096, length: 8192 });
  t.is((await c.reply())?.error, 0);
  c.sendRequest(NBD_CMD_READ, { offset: 0, length: 16384 });
  const r = await c.reply(16384);
  t.true(r!.data.subarray(4096, 12288).equals(Buffer.alloc(8192)));
  t.true(r!.data.subarray(0, 4096).equals(Buffer.alloc(4096, 0xff)));
  t.true(r!.data.subarray(12288).equals(Buffer.alloc(4096, 0xff)));
});

test('CACHE within range succeeds; zero-length requests succeed', async (t) => {
  const { c } = await session(t);
  c.sendRequest(NBD_CMD_CACHE, { offset: 0, length: 1 << 20 });
  t.is((await c.reply())?.error, 0);
  for (const type of [NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES]) {
    c.sendRequest(type, { offset: SIZE, length: 0 });
    t.is((await c.reply())?.error, 0, `type ${type}`);
  }
});
