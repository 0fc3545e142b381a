/**
 * The client side of the admin endpoint (src/admin/server.ts): one method per route,
 * each resolving to the typed result or rejecting with an AdminError carrying the
 * server's code and message. Transport problems are AdminError('EIO') with a message
 * an operator can act on.
 */
import http from 'node:http';
import type { Endpoint } from '../config/config.js';
import {
  AdminError,
  type AdminErrorCode, type DiskInfo, type NodeStatus, type TaskInfo,
  type VerifyReport, type VolumeCreateRequest, type VolumeInfo,
} from '../engine/admin-api.js';

const CODES: readonly AdminErrorCode[] = ['ENOENT', 'EEXIST', 'ENOSPC', 'EINVAL', 'EBUSY', 'EIO'];

export interface AdminClientOptions {
  /** Per-request limit (default 30 s). */
  timeoutMs?: number;
  /** Limit for verify, which reads whole volumes (default 10 min). */
  verifyTimeoutMs?: number;
}

/** "127.0.0.1:10909", "[::1]:10909". */
export function formatEndpoint(e: Endpoint): string {
  return e.host.includes(':') ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
}

export class AdminClient {
  private readonly timeoutMs: number;
  private readonly verifyTimeoutMs: number;
  /** Where requests go: a wildcard listen address is reached on loopback. */
  private readonly host: string;

  constructor(readonly endpoint: Endpoint, opts: AdminClientOptions = {}) {
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.verifyTimeoutMs = opts.verifyTimeoutMs ?? 10 * 60_000;
    this.host = endpoint.host === '0.0.0.0' || endpoint.host === '' ? '127.0.0.1' : endpoint.host === '::' ? '::1' : endpoint.host;
  }

  status(): Promise<NodeStatus> {
    return this.request('GET', '/v1/status');
  }

  listVolumes(): Promise<VolumeInfo[]> {
    return this.request('GET', '/v1/volumes');
  }

  showVolume(name: string): Promise<VolumeInfo> {
    return this.request('GET', `/v1/volumes/${seg(name)}`);
  }

  createVolume(req: VolumeCreateRequest): Promise<VolumeInfo> {
    return this.request('POST', '/v1/volumes', req);
  }

  growVolume(name: string, sizeBytes: number): Promise<VolumeInfo> {
    return this.request('POST', `/v1/volumes/${seg(name)}/grow`, { sizeBytes });
  }

  async deleteVolume(name: string): Promise<void> {
    await this.request<undefined>('DELETE', `/v1/volumes/${seg(name)}`);
  }

  verifyVolume(name: string): Promise<VerifyReport> {
    return this.request('POST', `/v1/volumes/${seg(name)}/verify`, undefined, this.verifyTimeoutMs);
  }

  listDisks(): Promise<DiskInfo[]> {
    return this.request('GET', '/v1/disks');
  }

  offlineDisk(id: string): Promise<DiskInfo> {
    return this.request('POST', `/v1/disks/${seg(id)}/offline`);
  }

  onlineDisk(id: string): Promise<TaskInfo | null> {
    return this.request('POST', `/v1/disks/${seg(id)}/online`);
  }

  cancelTask(id: string): Promise<TaskInfo> {
    return this.request('POST', `/v1/tasks/${seg(id)}/cancel`);
  }

  reconfigureVolume(name: string, op: { split: number } | { merge: number }): Promise<VolumeInfo> {
    return this.request('POST', `/v1/volumes/${seg(name)}/reconfigure`, op);
  }

  migrateVolume(name: string, to: string[]): Promise<TaskInfo> {
    return this.request('POST', `/v1/volumes/${seg(name)}/migrate`, { to });
  }

  listSnapshots(): Promise<VolumeInfo[]> {
    return this.request('GET', '/v1/snapshots');
  }

  createSnapshots(pairs: { volume: string; name: string }[], timeoutMs?: number): Promise<VolumeInfo[]> {
    return this.request('POST', '/v1/snapshots', timeoutMs === undefined ? { snapshots: pairs } : { snapshots: pairs, timeoutMs }, this.verifyTimeoutMs);
  }

  completeSnapshot(name: string): Promise<TaskInfo> {
    return this.request('POST', `/v1/snapshots/${seg(name)}/complete`);
  }

  createClone(source: string, name: string): Promise<VolumeInfo> {
    return this.request('POST', '/v1/clones', { source, name }, this.verifyTimeoutMs);
  }

  private request<T>(method: string, path: string, body?: unknown, timeoutMs = this.timeoutMs): Promise<T> {
    const where = formatEndpoint(this.endpoint);
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body), 'utf8');
    return new Promise<T>((resolve, reject) => {
      let settled = false;
      const finish = (err: AdminError | null, value?: T): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(value as T);
      };
      const req = http.request({
        host: this.host,
        port: this.endpoint.port,
        method,
        path,
        agent: false,
        headers: {
          Accept: 'application/json',
          ...(payload ? { 'Content-Type': 'application/json', 'Content-Length': payload.length } : {}),
        },
      }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (e) => finish(new AdminError('EIO', `lost the connection to the dve node at ${where}: ${e.message}`)));
        res.on('end', () => {
          const status = res.statusCode ?? 0;
          const text = Buffer.concat(chunks).toString('utf8');
          if (status >= 200 && status < 300) {
            if (status === 204 || text === '') return finish(null, undefined as T);
            try {
              return finish(null, JSON.parse(text) as T);
            } catch {
              return finish(new AdminError('EIO', `the dve node at ${where} sent a reply that is not JSON (HTTP ${status})`));
            }
          }
          finish(errorFromReply(status, text, where));
        });
      });
      const timer = setTimeout(() => {
        finish(new AdminError('EIO', `the dve node at ${where} did not answer ${method} ${path} within ${formatDuration(timeoutMs)}`));
        req.destroy();
      }, timeoutMs);
      req.on('error', (e: NodeJS.ErrnoException) => {
        if (e.code === 'ECONNREFUSED') {
          finish(new AdminError('EIO', `no dve node is answering at ${where} (is it running? start it with \`dve up\`)`));
        } else {
          finish(new AdminError('EIO', `cannot reach the dve node at ${where}: ${e.message}`));
        }
      });
      req.end(payload);
    });
  }
}

function seg(s: string): string {
  return encodeURIComponent(s);
}

function formatDuration(ms: number): string {
  return ms % 60_000 === 0 ? `${ms / 60_000} min` : `${Math.round(ms / 100) / 10} s`;
}

function errorFromReply(status: number, text: string, where: string): AdminError {
  try {
    const o = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
    const code = o?.error?.code;
    const message = o?.error?.message;
    if (typeof code === 'string' && (CODES as readonly string[]).includes(code) && typeof message === 'string') {
      return new AdminError(code as AdminErrorCode, message);
    }
  } catch {
    // fall through
  }
  const snippet = text.trim().slice(0, 200);
  return new AdminError('EIO', `the dve node at ${where} answered HTTP ${status}${snippet ? `: ${snippet}` : ''}`);
}
