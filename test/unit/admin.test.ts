/**
 * The admin endpoint, its client, node files and the operator CLI, against a fake
 * in-memory engine behind a real admin server on an ephemeral port.
 */
import test from 'ava';
import type { ExecutionContext } from 'ava';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import { AdminClient } from '../../src/admin/client.js';
import { findAdminEndpoint, readNodeFiles, removeNodeFile, writeNodeFile, type NodeFileInfo } from '../../src/admin/node-file.js';
import { startAdminServer } from '../../src/admin/server.js';
import {
  AdminError,
  type AdminErrorCode, type DiskInfo, type EngineAdmin, type NodeStatus, type TaskInfo,
  type VerifyReport, type VolumeCreateRequest, type VolumeInfo,
} from '../../src/engine/admin-api.js';
import { formatFraction, formatPercent, table } from '../../src/cli/format.js';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

// ---------------------------------------------------------------- the fake engine

class FakeEngine implements EngineAdmin {
  readonly volumes = new Map<string, VolumeInfo>();
  readonly disks = new Map<string, DiskInfo>();
  readonly tasks: TaskInfo[] = [];
  readonly calls: string[] = [];
  /** Thrown by the next call (then cleared). */
  failNext: Error | null = null;
  mismatches: VerifyReport['mismatches'] = [];
  adminPort = 0;

  constructor() {
    for (const id of ['d1', 'd2', 'd3']) {
      this.disks.set(id, { id, path: `/var/lib/dve/${id}.img`, sizeBytes: 4 * GiB, blockDevice: false, state: 'online', extentBytes: 4 * MiB, extents: 1024, freeExtents: 1024 });
    }
  }

  private enter(what: string): void {
    this.calls.push(what);
    const e = this.failNext;
    if (e) {
      this.failNext = null;
      throw e;
    }
  }

  private vol(name: string): VolumeInfo {
    const v = this.volumes.get(name);
    if (!v) throw new AdminError('ENOENT', `no volume named "${name}"`);
    return v;
  }

  status(): NodeStatus {
    this.enter('status');
    for (const t of this.tasks) {
      if (t.state !== 'running') continue;
      t.percent = Math.min(100, t.percent + 25);
      t.doneBytes = Math.round((t.totalBytes * t.percent) / 100);
      if (t.percent >= 100) {
        t.state = 'done';
        t.finishedAt = new Date().toISOString();
      }
    }
    return {
      nodes: [{ id: 1, pid: process.pid, state: 'online', nbd: { host: '127.0.0.1', port: 10809 }, admin: { host: '127.0.0.1', port: this.adminPort }, startedAt: '2025-01-01T00:00:00.000Z' }],
      volumes: [...this.volumes.values()],
      disks: [...this.disks.values()],
      tasks: this.tasks,
      metadata: { path: '/var/lib/dve/meta.img', chunkCount: 1024, chunksUsed: 3, chunkBytes: 64 * 1024 },
    };
  }

  listVolumes(): VolumeInfo[] {
    this.enter('listVolumes');
    return [...this.volumes.values()];
  }

  showVolume(name: string): VolumeInfo {
    this.enter(`showVolume ${name}`);
    return this.vol(name);
  }

  async createVolume(req: VolumeCreateRequest): Promise<VolumeInfo> {
    this.enter(`createVolume ${JSON.stringify(req)}`);
    if (this.volumes.has(req.name)) throw new AdminError('EEXIST', `volume "${req.name}" already exists`);
    const mirrored = req.layout === 'mirrored' || req.layout === 'striped-mirrored';
    const striped = req.layout === 'striped' || req.layout === 'striped-mirrored';
    const v: VolumeInfo = {
      name: req.name,
      sizeBytes: req.sizeBytes,
      layout: req.layout,
      copies: mirrored ? (req.copies ?? 2) : 1,
      stripeBytes: striped ? (req.stripeBytes ?? 64 * 1024) : null,
      columns: striped ? (req.columns ?? 2) : 1,
      disks: req.disks ?? ['d1', 'd2'],
      vsegs: 1,
      extents: Math.ceil(req.sizeBytes / (4 * MiB)),
      state: 'ok',
      uris: [`nbd://127.0.0.1:10809/${req.name}`, `nbd+unix:///${req.name}?socket=/run/dve.sock`],
      allocatedBytes: req.sizeBytes,
      fp: { hits: 995, faults: { miss: 4, lock: 1 }, cpDispatched: 5, pendingUpstream: 0, pendingDownstream: 0, cachedMappings: 7, fpShare: 0.995 },
    };
    this.volumes.set(v.name, v);
    return v;
  }

  async growVolume(name: string, sizeBytes: number): Promise<VolumeInfo> {
    this.enter(`growVolume ${name} ${sizeBytes}`);
    const v = this.vol(name);
    if (sizeBytes <= v.sizeBytes) throw new AdminError('EINVAL', `new size ${sizeBytes} is not larger than ${v.sizeBytes}`);
    v.sizeBytes = sizeBytes;
    return v;
  }

  async deleteVolume(name: string): Promise<void> {
    this.enter(`deleteVolume ${name}`);
    this.vol(name);
    this.volumes.delete(name);
  }

  listDisks(): DiskInfo[] {
    this.enter('listDisks');
    return [...this.disks.values()];
  }

  private disk(id: string): DiskInfo {
    const d = this.disks.get(id);
    if (!d) throw new AdminError('ENOENT', `no disk "${id}"`);
    return d;
  }

  async offlineDisk(id: string): Promise<DiskInfo> {
    this.enter(`offlineDisk ${id}`);
    const d = this.disk(id);
    d.state = 'offline';
    return d;
  }

  async onlineDisk(id: string): Promise<TaskInfo | null> {
    this.enter(`onlineDisk ${id}`);
    const d = this.disk(id);
    const was = d.state;
    d.state = 'online';
    if (was === 'online') return null;
    const t: TaskInfo = {
      id: `t${this.tasks.length + 1}`, kind: 'resync', target: `disk ${id}`, state: 'running',
      doneBytes: 0, totalBytes: 256 * MiB, percent: 0, rateBytesPerSec: 100 * MiB,
      startedAt: new Date().toISOString(), finishedAt: null, message: null,
    };
    this.tasks.push(t);
    return t;
  }

  async verifyVolume(name: string): Promise<VerifyReport> {
    this.enter(`verifyVolume ${name}`);
    const v = this.vol(name);
    return { volume: name, comparedBytes: v.sizeBytes, mismatches: this.mismatches };
  }
}

// ---------------------------------------------------------------- fixtures

interface Fixture {
  engine: FakeEngine;
  client: AdminClient;
  port: number;
  logs: string[];
}

async function setup(t: ExecutionContext): Promise<Fixture> {
  const engine = new FakeEngine();
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logs.push(chunk.toString('utf8'));
      cb();
    },
  });
  const log = pino({ level: 'debug' }, sink);
  const server = await startAdminServer(engine, { host: '127.0.0.1', port: 0 }, log);
  engine.adminPort = server.port;
  t.teardown(() => server.close());
  return { engine, client: new AdminClient({ host: '127.0.0.1', port: server.port }), port: server.port, logs };
}

interface RawReply {
  status: number;
  body: string;
  json: unknown;
}

function raw(port: number, method: string, urlPath: string, body?: string | Buffer, headers: http.OutgoingHttpHeaders = {}): Promise<RawReply> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, agent: false, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json: unknown;
        try {
          json = text ? JSON.parse(text) : undefined;
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, body: text, json });
      });
    });
    // The server may close the connection before an oversized upload is through.
    req.on('error', reject);
    req.end(body);
  });
}

const SAMPLE: VolumeCreateRequest = { name: 'v1', sizeBytes: GiB, layout: 'mirrored', disks: ['d1', 'd2'], copies: 2 };

function errorOf(r: RawReply): { code: string; message: string } {
  return (r.json as { error: { code: string; message: string } }).error;
}

// ---------------------------------------------------------------- routes

test('every route round-trips through the server and the client', async (t) => {
  const { engine, client, port } = await setup(t);

  t.deepEqual(await client.listVolumes(), []);
  const created = await client.createVolume(SAMPLE);
  t.is(created.name, 'v1');
  t.is(created.copies, 2);
  t.deepEqual(created, engine.volumes.get('v1'));
  t.true(engine.calls.includes(`createVolume ${JSON.stringify(SAMPLE)}`), 'the engine got the request as sent');

  const r = await raw(port, 'POST', '/v1/volumes', JSON.stringify({ name: 'v2', sizeBytes: 8 * MiB, layout: 'striped', stripeBytes: 128 * 1024, columns: 3 }), { 'content-type': 'application/json' });
  t.is(r.status, 201);
  t.is((r.json as VolumeInfo).stripeBytes, 128 * 1024);
  t.is((r.json as VolumeInfo).columns, 3);

  t.deepEqual((await client.listVolumes()).map((v) => v.name), ['v1', 'v2']);
  const shown = await client.showVolume('v1');
  t.deepEqual(shown.uris, ['nbd://127.0.0.1:10809/v1', 'nbd+unix:///v1?socket=/run/dve.sock']);

  t.is((await client.growVolume('v1', 2 * GiB)).sizeBytes, 2 * GiB);
  t.deepEqual(await client.verifyVolume('v1'), { volume: 'v1', comparedBytes: 2 * GiB, mismatches: [] });

  t.deepEqual((await client.listDisks()).map((d) => d.id), ['d1', 'd2', 'd3']);
  const off = await client.offlineDisk('d2');
  t.is(off.state, 'offline');
  const task = await client.onlineDisk('d2');
  t.truthy(task);
  t.is(task!.kind, 'resync');
  t.is(task!.target, 'disk d2');
  t.is(await client.onlineDisk('d2'), null, 'an online disk has nothing to resync: null round-trips');

  const st = await client.status();
  t.deepEqual(st.volumes.map((v) => v.name), ['v1', 'v2']);
  t.is(st.nodes[0]!.admin.port, port);
  t.is(st.tasks.length, 1);
  t.is(st.metadata.chunksUsed, 3);

  const del = await raw(port, 'DELETE', '/v1/volumes/v2');
  t.is(del.status, 204);
  t.is(del.body, '');
  t.is(await client.deleteVolume('v1'), undefined);
  t.deepEqual(await client.listVolumes(), []);
  const e = await t.throwsAsync(client.showVolume('v1'), { instanceOf: AdminError });
  t.is(e!.code, 'ENOENT');
});

test('names with special characters survive the URL path', async (t) => {
  const { engine, client } = await setup(t);
  await client.createVolume({ name: 'a b/c%d', sizeBytes: MiB, layout: 'linear' });
  t.is((await client.showVolume('a b/c%d')).name, 'a b/c%d');
  t.true(engine.calls.includes('showVolume a b/c%d'));
});

test('every AdminError code maps to its HTTP status and back to the same AdminError', async (t) => {
  const { engine, client, port } = await setup(t);
  const expected: Record<AdminErrorCode, number> = { ENOENT: 404, EEXIST: 409, ENOSPC: 507, EINVAL: 400, EBUSY: 409, EIO: 500 };
  for (const [code, status] of Object.entries(expected) as [AdminErrorCode, number][]) {
    engine.failNext = new AdminError(code, `engine says ${code}`);
    const r = await raw(port, 'GET', '/v1/volumes');
    t.is(r.status, status, code);
    t.deepEqual(r.json, { error: { code, message: `engine says ${code}` } });

    engine.failNext = new AdminError(code, `again ${code}: "quoted" ünïcode`);
    const e = await t.throwsAsync(client.createVolume(SAMPLE), { instanceOf: AdminError });
    t.is(e!.code, code);
    t.is(e!.message, `again ${code}: "quoted" ünïcode`);
  }
  // Errors from the engine's own checks come through the same way.
  await client.createVolume(SAMPLE);
  const dup = await t.throwsAsync(client.createVolume(SAMPLE), { instanceOf: AdminError });
  t.is(dup!.code, 'EEXIST');
  t.is(dup!.message, 'volume "v1" already exists');
});

test('malformed bodies are refused with 400 naming the field, and the engine is never called', async (t) => {
  const { engine, port } = await setup(t);
  const post = (p: string, body: string) => raw(port, 'POST', p, body, { 'content-type': 'application/json' });
  const cases: [string, string, RegExp][] = [
    ['/v1/volumes', '{"name": "v1", ', /^request body: not valid JSON/],
    ['/v1/volumes', '', /^request body: is missing/],
    ['/v1/volumes', '[1,2]', /^request body: \[1,2\] is not a JSON object/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, colour: 'blue' }), /^colour: unknown field/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, sizeBytes: '1G' }), /^sizeBytes: "1G" is not a whole number of bytes/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, sizeBytes: -4096 }), /^sizeBytes: -4096 is not a whole number of bytes greater than zero/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, sizeBytes: 1.5 }), /^sizeBytes: 1.5 /],
    ['/v1/volumes', JSON.stringify({ sizeBytes: GiB, layout: 'linear' }), /^name: is missing/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, name: 7 }), /^name: 7 is not a non-empty string/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, layout: 'raid7' }), /^layout: "raid7" is not one of linear, striped, mirrored, striped-mirrored/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, disks: 'd1' }), /^disks: "d1" is not a list/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, disks: ['d1', 3] }), /^disks\[1\]: 3 is not a non-empty string/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, copies: 1 }), /^copies: 1 is not a whole number ≥ 2/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, copies: null }), /^copies: null /],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, stripeBytes: '64K' }), /^stripeBytes: "64K"/],
    ['/v1/volumes', JSON.stringify({ ...SAMPLE, columns: 0 }), /^columns: 0 is not a whole number ≥ 1/],
    ['/v1/volumes/v1/grow', JSON.stringify({ sizeBytes: '2G' }), /^sizeBytes: "2G"/],
    ['/v1/volumes/v1/grow', JSON.stringify({}), /^sizeBytes: is missing/],
    ['/v1/volumes/v1/grow', JSON.stringify({ sizeBytes: GiB, force: true }), /^force: unknown field/],
    ['/v1/volumes/v1/verify', JSON.stringify({ deep: true }), /^deep: unknown field \(this request takes no fields\)/],
    ['/v1/disks/d1/offline', 'nope', /^request body: not valid JSON/],
  ];
  for (const [p, body, re] of cases) {
    const r = await post(p, body);
    t.is(r.status, 400, `${p} ${body}`);
    t.is(errorOf(r).code, 'EINVAL');
    t.regex(errorOf(r).message, re, `${p} ${body}`);
  }
  t.deepEqual(engine.calls, [], 'no malformed request reached the engine');
  // An empty JSON object is fine where no fields are taken.
  t.is((await post('/v1/disks/d1/offline', '{}')).status, 200);
});

test('an unknown route is 404, a known path with the wrong method is 405', async (t) => {
  const { engine, port, client } = await setup(t);
  for (const p of ['/', '/v2/status', '/v1/volume', '/v1/volumes/v1/shrink', '/v1/status/extra']) {
    const r = await raw(port, 'GET', p);
    t.is(r.status, 404, p);
    t.is(errorOf(r).code, 'ENOENT');
    t.regex(errorOf(r).message, /no such admin route/);
  }
  const r = await raw(port, 'PUT', '/v1/volumes');
  t.is(r.status, 405);
  t.regex(errorOf(r).message, /PUT is not supported on \/v1\/volumes \(use GET or POST\)/);
  t.deepEqual(engine.calls, []);
  t.deepEqual(await client.listVolumes(), []);
});

test('a body over 1 MiB is refused with 413, declared or streamed', async (t) => {
  const { engine, port, client } = await setup(t);
  const big = JSON.stringify({ ...SAMPLE, name: 'x'.repeat(2 * MiB) });
  const declared = await raw(port, 'POST', '/v1/volumes', big, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(big) });
  t.is(declared.status, 413);
  t.regex(errorOf(declared).message, /larger than 1048576 bytes/);

  const streamed = await new Promise<number>((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method: 'POST', path: '/v1/volumes', agent: false, headers: { 'transfer-encoding': 'chunked' } }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', reject);
    for (let i = 0; i < 3; i++) req.write(Buffer.alloc(512 * 1024, 0x20));
    req.end();
  });
  t.is(streamed, 413);
  t.deepEqual(engine.calls, []);
  t.deepEqual(await client.listVolumes(), [], 'still serving');
});

test('an engine method throwing a plain Error is a 500 with its message; the server keeps serving', async (t) => {
  const { engine, port, client, logs } = await setup(t);
  engine.failNext = new Error('disk controller on fire');
  const r = await raw(port, 'GET', '/v1/disks');
  t.is(r.status, 500);
  t.deepEqual(r.json, { error: { code: 'EIO', message: 'disk controller on fire' } });
  t.true(logs.some((l) => l.includes('disk controller on fire') && l.includes('"level":50')), 'logged as an error');

  engine.failNext = new TypeError('cannot read properties of undefined');
  const e = await t.throwsAsync(client.status(), { instanceOf: AdminError });
  t.is(e!.code, 'EIO');
  t.is(e!.message, 'cannot read properties of undefined');

  t.is((await client.listDisks()).length, 3, 'still serving');
  t.true(logs.some((l) => l.includes('"msg":"admin request"') && l.includes('"url":"/v1/disks"')), 'requests are logged at debug');
});

test('the client against a closed port says no node is answering (EIO)', async (t) => {
  const port = await new Promise<number>((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
  const client = new AdminClient({ host: '127.0.0.1', port });
  const e = await t.throwsAsync(client.listVolumes(), { instanceOf: AdminError });
  t.is(e!.code, 'EIO');
  t.is(e!.message, `no dve node is answering at 127.0.0.1:${port} (is it running? start it with \`dve up\`)`);
});

test('the client times out a node that never answers', async (t) => {
  const sockets: net.Socket[] = [];
  const s = net.createServer((c) => sockets.push(c));
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  t.teardown(() => {
    sockets.forEach((c) => c.destroy());
    s.close();
  });
  const client = new AdminClient({ host: '127.0.0.1', port: (s.address() as net.AddressInfo).port }, { timeoutMs: 200 });
  const e = await t.throwsAsync(client.status(), { instanceOf: AdminError });
  t.is(e!.code, 'EIO');
  t.regex(e!.message, /did not answer GET \/v1\/status within 0\.2 s/);
});

// ---------------------------------------------------------------- node files

function deadPid(): number {
  const r = spawnSync(process.execPath, ['-e', '']);
  return r.pid!;
}

function tmp(t: ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-admin-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('node files: write, read, skip dead pids and junk, remove, find the admin endpoint', (t) => {
  const dir = path.join(tmp(t), 'state');
  t.deepEqual(readNodeFiles(dir), [], 'a missing state dir has no nodes');
  const e = t.throws(() => findAdminEndpoint(dir), { instanceOf: AdminError });
  t.is(e!.code, 'EIO');
  t.is(e!.message, `no dve node is running in ${dir} (start one with \`dve up\`)`);

  const live: NodeFileInfo = { id: 2, pid: process.pid, admin: { host: '127.0.0.1', port: 10910 }, nbd: { host: '127.0.0.1', port: 10810 }, startedAt: '2025-01-01T00:00:00.000Z' };
  const dead: NodeFileInfo = { ...live, id: 1, pid: deadPid(), admin: { host: '127.0.0.1', port: 10909 } };
  const live3: NodeFileInfo = { ...live, id: 3, admin: { host: '127.0.0.1', port: 10911 } };
  writeNodeFile(dir, live3);
  writeNodeFile(dir, dead);
  writeNodeFile(dir, live);
  fs.writeFileSync(path.join(dir, 'node-9.json'), '{ half a fi');
  fs.writeFileSync(path.join(dir, 'node-8.json'), JSON.stringify({ id: 8, pid: process.pid }));
  fs.writeFileSync(path.join(dir, 'notes.json'), JSON.stringify(live));

  t.deepEqual(JSON.parse(fs.readFileSync(path.join(dir, 'node-2.json'), 'utf8')), live);
  t.deepEqual(readNodeFiles(dir), [live, live3], 'live nodes by id; the dead pid and junk are skipped');
  t.deepEqual(findAdminEndpoint(dir), live.admin);

  removeNodeFile(dir, 2);
  t.false(fs.existsSync(path.join(dir, 'node-2.json')));
  removeNodeFile(dir, 2); // idempotent
  t.deepEqual(findAdminEndpoint(dir), live3.admin);
  removeNodeFile(dir, 3);
  t.throws(() => findAdminEndpoint(dir), { instanceOf: AdminError, message: /no dve node is running in/ });
  t.false(fs.readdirSync(dir).some((n) => n.endsWith('.tmp')), 'no temp files left');
});

// ---------------------------------------------------------------- format

test('format: aligned plain tables, percentages', (t) => {
  const s = table(['NAME', { header: 'SIZE', align: 'right' }, 'STATE'], [['v1', '1 GiB', 'ok'], ['volume-two', '512 MiB', 'degraded']], { color: false });
  t.is(s, [
    'NAME           SIZE  STATE',
    'v1            1 GiB  ok',
    'volume-two  512 MiB  degraded',
  ].join('\n'));
  t.false(s.includes('\x1b'));
  t.true(table(['A'], [['ok']], { color: true }).includes('\x1b[32mok'));
  t.is(formatFraction(0.995), '99.5%');
  t.is(formatFraction(1), '100%');
  t.is(formatPercent(45.25), '45.3%');
});

// ---------------------------------------------------------------- the CLI

const DVE = path.join(REPO_ROOT, 'bin/dve.js');
const CLI_SOURCES = ['src/cli/main.ts', 'src/cli/admin-commands.ts', 'src/cli/format.ts', 'src/admin/client.ts', 'src/admin/node-file.ts'];

/** Compiles the CLI unless dist/ is already newer than its sources. */
async function ensureBuilt(): Promise<void> {
  const stale = CLI_SOURCES.some((src) => {
    const js = path.join(REPO_ROOT, 'dist', src.replace(/\.ts$/, '.js'));
    try {
      return fs.statSync(js).mtimeMs < fs.statSync(path.join(REPO_ROOT, src)).mtimeMs;
    } catch {
      return true;
    }
  });
  if (!stale) return;
  // tsc emits even when files being edited elsewhere in the tree do not type-check.
  await new Promise<void>((resolve) => {
    const c = spawn('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: REPO_ROOT, stdio: 'ignore' });
    c.on('close', () => resolve());
    c.on('error', () => resolve());
  });
}

const built = ensureBuilt();

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

async function dve(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  await built;
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, [DVE, ...args], { cwd: REPO_ROOT, env: { ...process.env, NO_COLOR: '1', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d) => (stdout += d));
    c.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => c.kill('SIGKILL'), 30_000);
    c.on('error', reject);
    c.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 128, stdout, stderr });
    });
  });
}

async function cliFixture(t: ExecutionContext): Promise<Fixture & { dir: string }> {
  const f = await setup(t);
  const dir = tmp(t);
  writeNodeFile(dir, { id: 1, pid: process.pid, admin: { host: '127.0.0.1', port: f.port }, nbd: { host: '127.0.0.1', port: 10809 }, startedAt: new Date().toISOString() });
  return { ...f, dir };
}

test('cli: volume list / show / status print tables, --json prints the objects', async (t) => {
  const { engine, client, dir } = await cliFixture(t);
  let r = await dve(['volume', 'list', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^no volumes/);

  await client.createVolume(SAMPLE);
  await client.createVolume({ name: 'scratch', sizeBytes: 512 * MiB, layout: 'linear' });

  r = await dve(['volume', 'list', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  const lines = r.stdout.trimEnd().split('\n');
  t.regex(lines[0]!, /^NAME\s+SIZE\s+LAYOUT\s+COPIES\s+STATE\s+DISKS\s+ALLOCATED\s+FP SHARE$/);
  t.regex(lines[1]!, /^v1\s+1 GiB\s+mirrored\s+2\s+ok\s+d1,d2\s+1 GiB\s+99\.5%$/);
  t.regex(lines[2]!, /^scratch\s+512 MiB\s+linear\s+1\s+ok/);
  t.is(lines[1]!.indexOf('mirrored'), lines[0]!.indexOf('LAYOUT'), 'columns are aligned');
  t.false(r.stdout.includes('\x1b'), 'no colour when not a terminal');

  r = await dve(['volume', 'list', '--state-dir', dir, '--json']);
  t.is(r.code, 0, r.stderr);
  t.deepEqual(JSON.parse(r.stdout), [...engine.volumes.values()]);

  r = await dve(['volume', 'show', 'v1', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /uris:\s+nbd:\/\/127\.0\.0\.1:10809\/v1\n\s+nbd\+unix:\/\/\/v1\?socket=\/run\/dve\.sock/);
  t.regex(r.stdout, /layout:\s+mirrored \(2 copies\)/);
  t.regex(r.stdout, /fast path:\s+99\.5% hits \(995 hits, 5 faults: miss 4, lock 1\)/);

  r = await dve(['volume', 'show', 'v1', '--state-dir', dir, '--json']);
  t.deepEqual(JSON.parse(r.stdout), engine.volumes.get('v1'));

  await client.offlineDisk('d3');
  await client.onlineDisk('d3');
  r = await dve(['status', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /NODES\nID\s+PID\s+STATE\s+NBD\s+ADMIN\s+BOOT\s+OPLOCKS\s+JOURNAL\s+STARTED\n1\s+\d+\s+online\s+127\.0\.0\.1:10809\s+127\.0\.0\.1:\d+/);
  t.regex(r.stdout, /VOLUMES\nNAME\s+SIZE\s+LAYOUT\s+STATE\s+NODES\s+FP SHARE\s+FAULTS\nv1\s+1 GiB\s+mirrored\s+ok\s+-\s+99\.5%\s+5/);
  t.regex(r.stdout, /DISKS\nID\s+STATE\s+FREE\s+TOTAL\s+USED\s+EXTENTS\nd1\s+online\s+4 GiB\s+4 GiB\s+0%\s+0\/1024/);
  t.regex(r.stdout, /TASKS\nKIND\s+TARGET\s+STATE\s+PERCENT\s+RATE\nresync\s+disk d3\s+running\s+25%\s+100 MiB\/s/);
  t.regex(r.stdout, /METADATA\n\/var\/lib\/dve\/meta\.img: 3 of 1024 chunks used \(64 KiB each\)/);

  r = await dve(['status', '--state-dir', dir, '--json']);
  const st = JSON.parse(r.stdout) as NodeStatus;
  t.deepEqual(st.volumes.map((v) => v.name), ['v1', 'scratch']);

  r = await dve(['disk', 'list', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^ID\s+STATE\s+FREE\s+TOTAL\s+USED\s+EXTENTS\s+PATH\nd1\s+online/);
});

test('cli: volume create / grow / delete / verify and disk offline / online reach the node', async (t) => {
  const { engine, dir } = await cliFixture(t);
  let r = await dve(['volume', 'create', 'v9', '--size', '2G', '--layout', 'striped-mirrored', '--disks', 'd1,d2,d3', '--copies', '3', '--stripe-size', '128K', '--columns', '2', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.true(engine.calls.includes(`createVolume ${JSON.stringify({ name: 'v9', sizeBytes: 2 * GiB, layout: 'striped-mirrored', disks: ['d1', 'd2', 'd3'], copies: 3, stripeBytes: 128 * 1024, columns: 2 })}`), engine.calls.join('\n'));
  t.regex(r.stdout, /created volume v9: 2 GiB, striped-mirrored \(3 copies, 2 columns, 128 KiB stripes\)/);
  t.regex(r.stdout, /nbd:\/\/127\.0\.0\.1:10809\/v9/);

  r = await dve(['volume', 'create', 'v9', '--size', '1G', '--layout', 'linear', '--state-dir', dir]);
  t.is(r.code, 1);
  t.is(r.stderr, 'dve volume create: volume "v9" already exists\n');

  r = await dve(['volume', 'create', 'v9', '--size', '1G', '--layout', 'linear', '--state-dir', dir, '--json']);
  t.is(r.code, 1);
  t.deepEqual(JSON.parse(r.stdout), { error: { code: 'EEXIST', message: 'volume "v9" already exists' } });

  r = await dve(['volume', 'grow', 'v9', '--size', '3G', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.is(r.stdout, 'volume v9 is now 3 GiB\n');

  r = await dve(['volume', 'grow', 'v9', '--size', '1G', '--state-dir', dir]);
  t.is(r.code, 1);
  t.regex(r.stderr, /^dve volume grow: new size 1073741824 is not larger than/);

  r = await dve(['volume', 'verify', 'v9', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /volume v9: mirror sides agree \(3 GiB compared\)/);

  engine.mismatches = [{ offsetBytes: 4096, lengthBytes: 8192, sides: [1] }, { offsetBytes: 1048576, lengthBytes: 4096, sides: [1, 2] }];
  r = await dve(['volume', 'verify', 'v9', '--state-dir', dir]);
  t.is(r.code, 1, 'exit 1 when the sides differ');
  t.regex(r.stdout, /volume v9: 2 mismatched ranges, 12 KiB of 3 GiB compared/);
  t.regex(r.stdout, /OFFSET\s+LENGTH\s+SIDES DIFFERING FROM SIDE 0\n\s+4096\s+8192\s+1\n1048576\s+4096\s+1,2/);
  r = await dve(['volume', 'verify', 'v9', '--state-dir', dir, '--json']);
  t.is(r.code, 1);
  t.deepEqual(JSON.parse(r.stdout).mismatches, engine.mismatches);

  r = await dve(['disk', 'offline', 'd2', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.is(r.stdout, 'disk d2 is offline\n');
  t.is(engine.disks.get('d2')!.state, 'offline');

  r = await dve(['disk', 'online', 'd2', '--wait', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  const progress = r.stdout.split('\n').filter((l) => l.startsWith('resync disk d2: '));
  t.deepEqual(progress.map((l) => /: (\d+)%/.exec(l)![1]), ['0', '25', '50', '75', '100'], r.stdout);
  t.is(progress[1], 'resync disk d2: 25% (64 MiB of 256 MiB, 100 MiB/s)');
  t.regex(r.stdout, /disk d2 is online; resync of 256 MiB done\n$/);

  r = await dve(['disk', 'online', 'd2', '--state-dir', dir]);
  t.is(r.stdout, 'disk d2 is online; nothing to resync\n');

  r = await dve(['disk', 'offline', 'd7', '--state-dir', dir]);
  t.is(r.code, 1);
  t.is(r.stderr, 'dve disk offline: no disk "d7"\n');

  r = await dve(['volume', 'delete', 'v9', '--state-dir', dir]);
  t.is(r.code, 0, r.stderr);
  t.is(r.stdout, 'deleted volume v9\n');
  t.false(engine.volumes.has('v9'));
  r = await dve(['volume', 'show', 'v9', '--state-dir', dir]);
  t.is(r.code, 1);
  t.is(r.stderr, 'dve volume show: no volume named "v9"\n');
});

test('cli: option validation names the option and the value; the node is not called', async (t) => {
  const { engine, dir } = await cliFixture(t);
  const cases: [string[], RegExp][] = [
    [['volume', 'create', 'v1', '--size', '1G', '--layout', 'raid7'], /--layout: "raid7" is not one of linear, striped, mirrored, striped-mirrored/],
    [['volume', 'create', 'v1', '--size', '12 parsecs', '--layout', 'linear'], /--size: "12 parsecs" is not a size/],
    [['volume', 'create', 'v1', '--size', '0', '--layout', 'linear'], /--size: "0" must be greater than zero/],
    [['volume', 'create', 'v1', '--size', '1G', '--layout', 'mirrored', '--copies', 'x'], /--copies: "x" is not a whole number ≥ 2/],
    [['volume', 'create', 'v1', '--size', '1G', '--layout', 'mirrored', '--copies', '1'], /--copies: "1" is not a whole number ≥ 2/],
    [['volume', 'create', 'v1', '--size', '1G', '--layout', 'striped', '--columns', '-3'], /--columns: "-3" is not a whole number ≥ 1/],
    [['volume', 'create', 'v1', '--size', '1G', '--layout', 'striped', '--disks', 'd1,,d2'], /--disks: "d1,,d2" is not a comma-separated list/],
    [['volume', 'create', 'v1', '--size', '1G', '--layout', 'striped', '--disks', 'd1,d1'], /--disks: "d1,d1" lists disk d1 twice/],
    [['volume', 'create', 'v1', '--layout', 'linear'], /required option '--size <size>' not specified/],
    [['volume', 'create', 'v1', '--size', '1G', '--layout', 'linear', '--copies', '2'], /^dve volume create: --copies: applies only to the mirrored and striped-mirrored layouts, not linear/],
    [['volume', 'create', 'v1', '--size', '1G', '--layout', 'mirrored', '--columns', '2'], /^dve volume create: --columns: applies only to the striped and striped-mirrored layouts, not mirrored/],
    [['volume', 'grow', 'v1', '--size', 'big'], /--size: "big" is not a size/],
  ];
  for (const [args, re] of cases) {
    const r = await dve([...args, '--state-dir', dir]);
    t.is(r.code, 1, args.join(' '));
    t.regex(r.stderr, re, args.join(' '));
    t.is(r.stdout, '');
  }
  t.deepEqual(engine.calls, [], 'nothing reached the node');
});

test('cli: no running node is exit 1 with a helpful message', async (t) => {
  const dir = tmp(t);
  let r = await dve(['volume', 'list', '--state-dir', dir]);
  t.is(r.code, 1);
  t.is(r.stderr, `dve volume list: no dve node is running in ${dir} (start one with \`dve up\`)\n`);

  // A node file whose node is gone: the file is stale (dead pid) …
  writeNodeFile(dir, { id: 1, pid: deadPid(), admin: { host: '127.0.0.1', port: 1 }, nbd: { host: '127.0.0.1', port: 2 }, startedAt: '' });
  r = await dve(['status', '--state-dir', dir]);
  t.is(r.code, 1);
  t.regex(r.stderr, /^dve status: no dve node is running in/);

  // … or the pid lives but nothing answers.
  const port = await new Promise<number>((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
  writeNodeFile(dir, { id: 1, pid: process.pid, admin: { host: '127.0.0.1', port }, nbd: { host: '127.0.0.1', port: 2 }, startedAt: '' });
  r = await dve(['disk', 'list', '--state-dir', dir]);
  t.is(r.code, 1);
  t.is(r.stderr, `dve disk list: no dve node is answering at 127.0.0.1:${port} (is it running? start it with \`dve up\`)\n`);

  // DVE_STATE_DIR is the default state directory.
  r = await dve(['disk', 'list'], { DVE_STATE_DIR: dir });
  t.is(r.code, 1);
  t.regex(r.stderr, /no dve node is answering at/);
});
