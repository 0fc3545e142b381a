/**
 * The admin endpoint: the EngineAdmin API carried over HTTP+JSON on loopback, for
 * `dve volume …`, `dve disk …` and `dve status` (src/admin/client.ts speaks it).
 *
 * Routes (v1):
 *   GET    /v1/status                 → NodeStatus
 *   GET    /v1/volumes                → VolumeInfo[]
 *   POST   /v1/volumes                  VolumeCreateRequest → 201 VolumeInfo
 *   GET    /v1/volumes/:name          → VolumeInfo
 *   DELETE /v1/volumes/:name          → 204
 *   POST   /v1/volumes/:name/grow       { sizeBytes } → VolumeInfo
 *   POST   /v1/volumes/:name/verify   → VerifyReport
 *   GET    /v1/disks                  → DiskInfo[]
 *   POST   /v1/disks/:id/offline      → DiskInfo
 *   POST   /v1/disks/:id/online       → TaskInfo | null
 *   GET    /v1/snapshots              → VolumeInfo[] (snapshots and clones)
 *   POST   /v1/snapshots                { snapshots: [{ volume, name }], timeoutMs? } → 201 VolumeInfo[]
 *   POST   /v1/snapshots/:name/complete → TaskInfo
 *   POST   /v1/clones                   { source, name } → 201 VolumeInfo
 *   POST   /v1/volumes/:name/migrate    { to: [disk ids] } → TaskInfo
 *   POST   /v1/tasks/:id/cancel       → TaskInfo
 *   POST   /v1/volumes/:name/reconfigure { split: offset } | { merge: vseg index } → VolumeInfo
 *
 * Every error is `{ error: { code, message } }` with a stable AdminErrorCode. Request
 * bodies are validated strictly (unknown fields, types, sizes as whole numbers) before
 * the engine sees them, and nothing a request does can take the process down.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { Endpoint } from '../config/config.js';
import {
  AdminError, LAYOUTS,
  type AdminErrorCode, type EngineAdmin, type Layout, type VolumeCreateRequest,
} from '../engine/admin-api.js';

/** Largest request body accepted (413 beyond). */
export const MAX_BODY_BYTES = 1024 * 1024;

/** HTTP status for each AdminError code; the client maps back through the body's code. */
export const STATUS_BY_CODE: Record<AdminErrorCode, number> = {
  ENOENT: 404,
  EEXIST: 409,
  ENOSPC: 507,
  EINVAL: 400,
  EBUSY: 409,
  EIO: 500,
};

export interface AdminServer {
  port: number;
  close(): Promise<void>;
}

/** An error answered with an explicit HTTP status (validation, routing, body size). */
class HttpError extends Error {
  constructor(readonly status: number, readonly code: AdminErrorCode, message: string) {
    super(message);
  }
}

interface Reply {
  status: number;
  body?: unknown;
}

type Handler = (params: string[], body: Buffer) => Promise<Reply>;

interface Route {
  method: string;
  pattern: RegExp;
  handler: Handler;
}

export function startAdminServer(engine: EngineAdmin, endpoint: Endpoint, log: Logger): Promise<AdminServer> {
  const routes = buildRoutes(engine);
  const server = http.createServer((req, res) => {
    const started = process.hrtime.bigint();
    const method = req.method ?? 'GET';
    const url = req.url ?? '/';
    res.on('finish', () => {
      if (log.isLevelEnabled('debug')) {
        const ms = Number(process.hrtime.bigint() - started) / 1e6;
        log.debug({ method, url, status: res.statusCode, ms: Math.round(ms * 10) / 10 }, 'admin request');
      }
    });
    handle(routes, req, res, log).catch((err: unknown) => {
      // handle() answers everything itself; this is the last line of defence.
      log.error({ err: (err as Error)?.message ?? String(err), method, url }, 'admin request failed');
      if (!res.headersSent) send(res, 500, errorBody('EIO', String((err as Error)?.message ?? err)));
      else res.destroy();
    });
  });
  server.headersTimeout = 30_000;
  server.requestTimeout = 0; // verify may legitimately take minutes
  server.on('clientError', (err, socket) => {
    log.debug({ err: err.message }, 'admin: bad HTTP from client');
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
    else socket.destroy();
  });

  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    server.once('error', onError);
    server.listen(endpoint.port, endpoint.host, () => {
      server.off('error', onError);
      server.on('error', (err) => log.error({ err: err.message }, 'admin server error'));
      const port = (server.address() as AddressInfo).port;
      log.debug({ host: endpoint.host, port }, 'admin endpoint listening');
      resolve({
        port,
        close: () =>
          new Promise<void>((done) => {
            // Idle keep-alive connections go at once; a request still running (a long
            // verify) gets a few seconds before its connection is cut.
            const force = setTimeout(() => server.closeAllConnections(), 5000);
            force.unref();
            server.close(() => {
              clearTimeout(force);
              done();
            });
            server.closeIdleConnections();
          }),
      });
    });
  });
}

async function handle(routes: Route[], req: http.IncomingMessage, res: http.ServerResponse, log: Logger): Promise<void> {
  const method = req.method ?? 'GET';
  try {
    const pathname = new URL(req.url ?? '/', 'http://admin.invalid').pathname;
    let pathMatched = false;
    let route: Route | undefined;
    let match: RegExpExecArray | null = null;
    for (const r of routes) {
      const m = r.pattern.exec(pathname);
      if (!m) continue;
      pathMatched = true;
      if (r.method === method) {
        route = r;
        match = m;
        break;
      }
    }
    if (!route || !match) {
      if (pathMatched) {
        const allowed = routes.filter((r) => r.pattern.test(pathname)).map((r) => r.method);
        res.setHeader('Allow', allowed.join(', '));
        throw new HttpError(405, 'EINVAL', `${method} is not supported on ${pathname} (use ${allowed.join(' or ')})`);
      }
      throw new HttpError(404, 'ENOENT', `no such admin route: ${method} ${pathname}`);
    }
    const params = match.slice(1).map((p, i) => decodeParam(p, i));
    const body = await readBody(req);
    const reply = await route.handler(params, body);
    send(res, reply.status, reply.body);
  } catch (e) {
    if (e instanceof HttpError) {
      if (e.status === 413) {
        res.setHeader('Connection', 'close');
        // Let the rest of the upload drain so the client sees the answer.
        req.resume();
      }
      send(res, e.status, errorBody(e.code, e.message));
    } else if (e instanceof AdminError) {
      send(res, STATUS_BY_CODE[e.code] ?? 500, errorBody(e.code, e.message));
    } else {
      const message = e instanceof Error ? e.message : String(e);
      log.error({ err: message, stack: e instanceof Error ? e.stack : undefined, method, url: req.url }, 'admin request failed');
      send(res, 500, errorBody('EIO', message || 'internal error'));
    }
  }
}

function decodeParam(p: string, i: number): string {
  try {
    const v = decodeURIComponent(p);
    if (v.length === 0) throw new Error('empty');
    return v;
  } catch {
    throw new HttpError(400, 'EINVAL', `path parameter ${i + 1}: "${p}" is not valid percent-encoding`);
  }
}

function errorBody(code: AdminErrorCode, message: string): { error: { code: AdminErrorCode; message: string } } {
  return { error: { code, message } };
}

function send(res: http.ServerResponse, status: number, body?: unknown): void {
  if (res.headersSent || res.writableEnded) return;
  if (status === 204 || body === undefined) {
    res.writeHead(status);
    res.end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
    'Cache-Control': 'no-store',
  });
  res.end(text);
}

function readBody(req: http.IncomingMessage): Promise<Buffer> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > MAX_BODY_BYTES) {
    return Promise.reject(tooLarge());
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let total = 0;
    let done = false;
    const onData = (c: Buffer): void => {
      if (done) return;
      total += c.length;
      if (total > MAX_BODY_BYTES) {
        done = true;
        chunks.length = 0;
        reject(tooLarge());
        return;
      }
      chunks.push(c);
    };
    req.on('data', onData);
    req.on('end', () => {
      if (done) return;
      done = true;
      resolve(Buffer.concat(chunks));
    });
    req.on('error', (err) => {
      if (done) return;
      done = true;
      reject(new HttpError(400, 'EINVAL', `request body: ${err.message}`));
    });
  });
}

function tooLarge(): HttpError {
  return new HttpError(413, 'EINVAL', `request body: larger than ${MAX_BODY_BYTES} bytes`);
}

// ---------------------------------------------------------------- routes

function buildRoutes(engine: EngineAdmin): Route[] {
  const SEG = '([^/]+)';
  const r = (method: string, path: string, handler: Handler): Route => ({
    method,
    pattern: new RegExp(`^${path.replace(/:[a-z]+/g, SEG)}$`),
    handler,
  });
  const ok = (body: unknown): Reply => ({ status: 200, body });
  return [
    r('GET', '/v1/status', async (_, b) => {
      noBody(b);
      return ok(await engine.status());
    }),
    r('GET', '/v1/volumes', async (_, b) => {
      noBody(b);
      return ok(await engine.listVolumes());
    }),
    r('POST', '/v1/volumes', async (_, b) => {
      const req = parseCreateRequest(parseJson(b));
      return { status: 201, body: await engine.createVolume(req) };
    }),
    r('GET', '/v1/volumes/:name', async ([name], b) => {
      noBody(b);
      return ok(await engine.showVolume(name!));
    }),
    r('DELETE', '/v1/volumes/:name', async ([name], b) => {
      noBody(b);
      await engine.deleteVolume(name!);
      return { status: 204 };
    }),
    r('POST', '/v1/volumes/:name/grow', async ([name], b) => {
      const o = object(parseJson(b), ['sizeBytes']);
      const sizeBytes = positiveSize(o.sizeBytes, 'sizeBytes');
      return ok(await engine.growVolume(name!, sizeBytes));
    }),
    r('POST', '/v1/volumes/:name/verify', async ([name], b) => {
      noBody(b);
      return ok(await engine.verifyVolume(name!));
    }),
    r('GET', '/v1/disks', async (_, b) => {
      noBody(b);
      return ok(await engine.listDisks());
    }),
    r('POST', '/v1/disks/:id/offline', async ([id], b) => {
      noBody(b);
      return ok(await engine.offlineDisk(id!));
    }),
    r('POST', '/v1/disks/:id/online', async ([id], b) => {
      noBody(b);
      return ok((await engine.onlineDisk(id!)) ?? null);
    }),
    r('GET', '/v1/snapshots', async (_, b) => {
      noBody(b);
      return ok((await engine.listVolumes()).filter((v) => v.kind === 'snapshot' || v.kind === 'clone'));
    }),
    r('POST', '/v1/snapshots', async (_, b) => {
      const o = object(parseJson(b), ['snapshots', 'timeoutMs']);
      if (!Array.isArray(o.snapshots) || o.snapshots.length === 0 || o.snapshots.length > 64) throw bad(`snapshots: ${describe(o.snapshots)} is not a list of 1 to 64 { volume, name }`);
      const pairs = o.snapshots.map((x, i) => {
        const p = object(x, ['volume', 'name']);
        return { volume: nonEmptyString(p.volume, `snapshots[${i}].volume`), name: nonEmptyString(p.name, `snapshots[${i}].name`) };
      });
      const timeoutMs = o.timeoutMs === undefined ? undefined : positiveSize(o.timeoutMs, 'timeoutMs');
      return { status: 201, body: await engine.createSnapshots(pairs, timeoutMs) };
    }),
    r('POST', '/v1/snapshots/:name/complete', async ([name], b) => {
      noBody(b);
      return ok(engine.completeSnapshot(name!));
    }),
    r('POST', '/v1/tasks/:id/cancel', async ([id], b) => {
      noBody(b);
      return ok(engine.cancelTask(id!));
    }),
    r('POST', '/v1/volumes/:name/reconfigure', async ([name], b) => {
      const o = object(parseJson(b), ['split', 'merge']);
      if ((o.split === undefined) === (o.merge === undefined)) throw bad('give exactly one of split (a byte offset) or merge (a VSEG index)');
      if (o.split !== undefined) return ok(await engine.reconfigureVolume(name!, { split: positiveSize(o.split, 'split') }));
      if (typeof o.merge !== 'number' || !Number.isInteger(o.merge) || o.merge < 0) throw bad(`merge: ${describe(o.merge)} is not a VSEG index`);
      return ok(await engine.reconfigureVolume(name!, { merge: o.merge }));
    }),
    r('POST', '/v1/volumes/:name/migrate', async ([name], b) => {
      const o = object(parseJson(b), ['to']);
      if (!Array.isArray(o.to) || o.to.length === 0 || !o.to.every((x) => typeof x === 'string' && x.length > 0)) throw bad(`to: ${describe(o.to)} is not a non-empty list of disk ids`);
      return ok(await engine.migrateVolume(name!, o.to as string[]));
    }),
    r('POST', '/v1/clones', async (_, b) => {
      const o = object(parseJson(b), ['source', 'name']);
      return { status: 201, body: await engine.createClone(nonEmptyString(o.source, 'source'), nonEmptyString(o.name, 'name')) };
    }),
  ];
}

// ---------------------------------------------------------------- validation

const bad = (message: string): HttpError => new HttpError(400, 'EINVAL', message);

function describe(x: unknown): string {
  return x === undefined ? 'undefined' : JSON.stringify(x);
}

function parseJson(b: Buffer): unknown {
  const text = b.toString('utf8');
  if (text.trim() === '') throw bad('request body: is missing (expected a JSON object)');
  try {
    return JSON.parse(text);
  } catch (e) {
    throw bad(`request body: not valid JSON: ${(e as Error).message}`);
  }
}

/** Routes without parameters take no body, or an empty JSON object. */
function noBody(b: Buffer): void {
  if (b.toString('utf8').trim() === '') return;
  object(parseJson(b), []);
}

function object(x: unknown, allowed: readonly string[]): Record<string, unknown> {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) {
    throw bad(`request body: ${describe(x)} is not a JSON object`);
  }
  const o = x as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!allowed.includes(k)) {
      throw bad(allowed.length === 0
        ? `${k}: unknown field (this request takes no fields)`
        : `${k}: unknown field (expected one of ${allowed.join(', ')})`);
    }
  }
  return o;
}

function positiveSize(x: unknown, at: string): number {
  if (x === undefined) throw bad(`${at}: is missing`);
  if (typeof x !== 'number' || !Number.isSafeInteger(x) || x <= 0) {
    throw bad(`${at}: ${describe(x)} is not a whole number of bytes greater than zero`);
  }
  return x;
}

function wholeNumber(x: unknown, at: string, min: number): number {
  if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < min) {
    throw bad(`${at}: ${describe(x)} is not a whole number ≥ ${min}`);
  }
  return x;
}

function nonEmptyString(x: unknown, at: string): string {
  if (x === undefined) throw bad(`${at}: is missing`);
  if (typeof x !== 'string' || x.length === 0) throw bad(`${at}: ${describe(x)} is not a non-empty string`);
  return x;
}

const CREATE_FIELDS = ['name', 'sizeBytes', 'layout', 'disks', 'copies', 'stripeBytes', 'columns', 'journalBytes'] as const;

export function parseCreateRequest(x: unknown): VolumeCreateRequest {
  const o = object(x, CREATE_FIELDS);
  const name = nonEmptyString(o.name, 'name');
  const sizeBytes = positiveSize(o.sizeBytes, 'sizeBytes');
  if (o.layout === undefined) throw bad('layout: is missing');
  if (typeof o.layout !== 'string' || !(LAYOUTS as readonly string[]).includes(o.layout)) {
    throw bad(`layout: ${describe(o.layout)} is not one of ${LAYOUTS.join(', ')}`);
  }
  const req: VolumeCreateRequest = { name, sizeBytes, layout: o.layout as Layout };
  if (o.disks !== undefined) {
    if (!Array.isArray(o.disks)) throw bad(`disks: ${describe(o.disks)} is not a list of disk ids`);
    if (o.disks.length === 0) throw bad('disks: [] must name at least one disk');
    const seen = new Set<string>();
    req.disks = o.disks.map((d, i) => {
      const id = nonEmptyString(d, `disks[${i}]`);
      if (seen.has(id)) throw bad(`disks[${i}]: ${describe(id)} is listed twice`);
      seen.add(id);
      return id;
    });
  }
  if (o.copies !== undefined) req.copies = wholeNumber(o.copies, 'copies', 2);
  if (o.stripeBytes !== undefined) req.stripeBytes = positiveSize(o.stripeBytes, 'stripeBytes');
  if (o.columns !== undefined) req.columns = wholeNumber(o.columns, 'columns', 1);
  if (o.journalBytes !== undefined) req.journalBytes = positiveSize(o.journalBytes, 'journalBytes');
  return req;
}
