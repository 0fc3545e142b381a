/**
 * The node configuration: which nodes form the cluster (id and endpoints), the
 * disks they share, and the metadata area. YAML or JSON; every error names the
 * field (a path like `disks[1].size`) and the bad value, and nothing is half-applied:
 * a configuration either validates whole or is refused.
 *
 * With no configuration file, `embeddedDefault(stateDir)` describes the embedded
 * default: everything under the state directory, sparse files, loopback.
 */
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { parseSize } from '../util/size.js';

export interface Endpoint {
  host: string;
  port: number;
}

export interface NodeConfig {
  /** Small integer, unique in the cluster (0–63: it is a bit in sync masks). */
  id: number;
  nbd: Endpoint;
  admin: Endpoint;
  mesh: Endpoint;
}

export interface DiskConfig {
  id: string;
  /** A raw file (created sparse at sizeBytes if missing) or a block device. */
  path: string;
  sizeBytes?: number;
  /** Mirror reads prefer the live sides of lowest cost (default 1; e.g. 10 for a slow or remote disk). */
  readCost?: number;
}

export interface MetadataConfig {
  path: string;
  sizeBytes: number;
}

export interface ClusterConfig {
  name: string;
  /** The mesh secret (every node the same); or read from `secretFile`; the embedded default keeps one in the state directory. */
  secret?: string;
  secretFile?: string;
  /** Mesh heartbeat interval and the silence after which a peer is down and evicted (ms). */
  heartbeatMs: number;
  peerTimeoutMs: number;
}

export interface Config {
  cluster: ClusterConfig;
  nodes: NodeConfig[];
  disks: DiskConfig[];
  metadata: MetadataConfig;
  /** Allocation extent size (like an LVM physical extent). */
  extentBytes: number;
  /** Where relative paths in this file were resolved from. */
  baseDir: string;
}

export class ConfigError extends Error {
  readonly code = 'EDVE_CONFIG';
  constructor(readonly problems: string[], source: string) {
    super(`invalid configuration ${source}:\n  ${problems.join('\n  ')}`);
  }
}

export const MAX_NODE_ID = 63;
export const DEFAULT_EXTENT_BYTES = 4 * 1024 * 1024;

/** Read and validate a configuration file (.yaml, .yml or .json). */
export function loadConfig(file: string): Config {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError([`cannot read: ${(e as Error).message}`], file);
  }
  return parseConfig(text, file);
}

export function parseConfig(text: string, source: string): Config {
  let raw: unknown;
  try {
    raw = source.endsWith('.json') ? JSON.parse(text) : YAML.parse(text);
  } catch (e) {
    throw new ConfigError([`not valid ${source.endsWith('.json') ? 'JSON' : 'YAML'}: ${(e as Error).message.split('\n')[0]}`], source);
  }
  return validateConfig(raw, source, path.dirname(path.resolve(source)));
}

/** Validate a parsed document; relative paths resolve against baseDir. */
export function validateConfig(raw: unknown, source: string, baseDir: string): Config {
  const v = new Validator();
  const root = v.object(raw, '');
  if (!root) throw new ConfigError(v.problems, source);
  v.known(root, '', ['cluster', 'nodes', 'disks', 'metadata', 'extentSize']);

  const clusterRaw = root.cluster === undefined ? {} : v.object(root.cluster, 'cluster');
  const cluster: ClusterConfig = { name: 'dve', heartbeatMs: 500, peerTimeoutMs: 3000 };
  if (clusterRaw) {
    v.known(clusterRaw, 'cluster', ['name', 'secret', 'secretFile', 'heartbeat', 'peerTimeout']);
    cluster.name = v.string(clusterRaw.name ?? 'dve', 'cluster.name') ?? 'dve';
    if (clusterRaw.secret !== undefined) {
      const sec = v.string(clusterRaw.secret, 'cluster.secret');
      if (sec !== null && sec.length < 16) v.problem('cluster.secret', '(hidden)', 'must be at least 16 characters');
      else if (sec !== null) cluster.secret = sec;
    }
    if (clusterRaw.secretFile !== undefined) {
      const f = v.string(clusterRaw.secretFile, 'cluster.secretFile');
      if (f !== null) cluster.secretFile = path.resolve(baseDir, f);
    }
    if (clusterRaw.secret !== undefined && clusterRaw.secretFile !== undefined) v.problem('cluster.secretFile', clusterRaw.secretFile, 'cannot be given together with cluster.secret');
    if (clusterRaw.heartbeat !== undefined) cluster.heartbeatMs = v.integer(clusterRaw.heartbeat, 'cluster.heartbeat', 10, 60_000) ?? 500;
    if (clusterRaw.peerTimeout !== undefined) cluster.peerTimeoutMs = v.integer(clusterRaw.peerTimeout, 'cluster.peerTimeout', 50, 600_000) ?? 3000;
    if (cluster.peerTimeoutMs <= cluster.heartbeatMs) v.problem('cluster.peerTimeout', cluster.peerTimeoutMs, `must be longer than cluster.heartbeat (${cluster.heartbeatMs})`);
  }

  const nodes: NodeConfig[] = [];
  const nodesRaw = v.array(root.nodes, 'nodes');
  if (nodesRaw && nodesRaw.length === 0) v.problem('nodes', nodesRaw, 'must list at least one node');
  const usedPorts = new Map<string, string>();
  nodesRaw?.forEach((n, i) => {
    const at = `nodes[${i}]`;
    const o = v.object(n, at);
    if (!o) return;
    v.known(o, at, ['id', 'nbd', 'admin', 'mesh']);
    const id = v.integer(o.id, `${at}.id`, 0, MAX_NODE_ID);
    const ep = (k: 'nbd' | 'admin' | 'mesh'): Endpoint | null => {
      const e = v.endpoint(o[k], `${at}.${k}`);
      if (e) {
        const key = `${e.host}:${e.port}`;
        const prev = usedPorts.get(key);
        if (prev && e.port !== 0) v.problem(`${at}.${k}`, key, `is already used by ${prev}`);
        usedPorts.set(key, `${at}.${k}`);
      }
      return e;
    };
    const nbd = ep('nbd');
    const admin = ep('admin');
    const mesh = ep('mesh');
    if (id !== null && nodes.some((x) => x.id === id)) v.problem(`${at}.id`, id, 'is used by another node');
    if (id !== null && nbd && admin && mesh) nodes.push({ id, nbd, admin, mesh });
  });

  const disks: DiskConfig[] = [];
  const disksRaw = v.array(root.disks, 'disks');
  if (disksRaw && disksRaw.length === 0) v.problem('disks', disksRaw, 'must list at least one disk');
  const seenIds = new Set<string>();
  const seenPaths = new Set<string>();
  disksRaw?.forEach((d, i) => {
    const at = `disks[${i}]`;
    const o = v.object(d, at);
    if (!o) return;
    v.known(o, at, ['id', 'path', 'size', 'readCost']);
    const id = v.string(o.id, `${at}.id`);
    if (id !== null && !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(id)) v.problem(`${at}.id`, id, 'must be 1-64 letters, digits, "_", "." or "-"');
    if (id !== null && seenIds.has(id)) v.problem(`${at}.id`, id, 'is used by another disk');
    if (id !== null) seenIds.add(id);
    const p = v.string(o.path, `${at}.path`);
    const size = o.size === undefined ? undefined : v.size(o.size, `${at}.size`);
    if (p !== null && seenPaths.has(path.resolve(baseDir, p))) v.problem(`${at}.path`, p, 'is used by another disk');
    if (p !== null) seenPaths.add(path.resolve(baseDir, p));
    const readCost = o.readCost === undefined ? 1 : v.integer(o.readCost, `${at}.readCost`, 0, 1_000_000);
    if (id !== null && p !== null && size !== null && readCost !== null) disks.push({ id, path: path.resolve(baseDir, p), sizeBytes: size, readCost });
  });

  const metaRaw = v.object(root.metadata, 'metadata');
  let metadata: MetadataConfig | null = null;
  if (metaRaw) {
    v.known(metaRaw, 'metadata', ['path', 'size']);
    const p = v.string(metaRaw.path, 'metadata.path');
    const size = v.size(metaRaw.size ?? '64M', 'metadata.size');
    if (size !== null && size < 16 * 1024 * 1024) v.problem('metadata.size', metaRaw.size, 'must be at least 16M (64 chunks are node journals)');
    if (p !== null && size !== null) metadata = { path: path.resolve(baseDir, p), sizeBytes: size };
    if (p !== null && disks.some((d) => d.path === path.resolve(baseDir, p))) v.problem('metadata.path', p, 'is also a disk');
  }

  const extentBytes = root.extentSize === undefined ? DEFAULT_EXTENT_BYTES : v.size(root.extentSize, 'extentSize');
  if (extentBytes !== null && (extentBytes < 64 * 1024 || (extentBytes & (extentBytes - 1)) !== 0)) {
    v.problem('extentSize', root.extentSize, 'must be a power of two, at least 64K');
  }

  if (v.problems.length > 0 || !metadata || extentBytes === null) throw new ConfigError(v.problems, source);
  return { cluster, nodes, disks, metadata, extentBytes, baseDir };
}

/** The embedded default: nodes on loopback, sparse disk files, all under stateDir. */
export function embeddedDefault(stateDir: string, o: { nodes?: number; basePort?: number } = {}): Config {
  const n = o.nodes ?? 3;
  const base = o.basePort ?? 10809;
  const nodes: NodeConfig[] = [];
  // Port 0 (tests) means "any free port" for every endpoint.
  const port = (offset: number, i: number): number => (base === 0 ? 0 : base + offset + (i - 1));
  for (let i = 1; i <= n; i++) {
    nodes.push({
      id: i,
      nbd: { host: '127.0.0.1', port: port(0, i) },
      admin: { host: '127.0.0.1', port: port(100, i) },
      mesh: { host: '127.0.0.1', port: port(200, i) },
    });
  }
  const dir = path.resolve(stateDir);
  const disks: DiskConfig[] = [1, 2, 3, 4].map((k) => ({
    id: `d${k}`, path: path.join(dir, 'disks', `d${k}.img`), sizeBytes: 4 * 1024 ** 3,
  }));
  return {
    cluster: { name: 'dve', secretFile: path.join(dir, 'cluster.secret'), heartbeatMs: 500, peerTimeoutMs: 3000 },
    nodes,
    disks,
    metadata: { path: path.join(dir, 'meta.img'), sizeBytes: 64 * 1024 * 1024 },
    extentBytes: DEFAULT_EXTENT_BYTES,
    baseDir: dir,
  };
}

/** Collects every problem (not just the first) so a user fixes a file in one go. */
class Validator {
  readonly problems: string[] = [];

  problem(at: string, value: unknown, what: string): void {
    this.problems.push(`${at || '(top level)'}: ${JSON.stringify(value)} ${what}`);
  }

  object(x: unknown, at: string): Record<string, unknown> | null {
    if (typeof x === 'object' && x !== null && !Array.isArray(x)) return x as Record<string, unknown>;
    this.problems.push(`${at || '(top level)'}: ${x === undefined ? 'is missing' : `${JSON.stringify(x)} is not a mapping`}`);
    return null;
  }

  array(x: unknown, at: string): unknown[] | null {
    if (Array.isArray(x)) return x;
    this.problems.push(`${at}: ${x === undefined ? 'is missing' : `${JSON.stringify(x)} is not a list`}`);
    return null;
  }

  known(o: Record<string, unknown>, at: string, keys: string[]): void {
    for (const k of Object.keys(o)) {
      if (!keys.includes(k)) this.problems.push(`${at ? `${at}.` : ''}${k}: unknown field (expected one of ${keys.join(', ')})`);
    }
  }

  string(x: unknown, at: string): string | null {
    if (typeof x === 'string' && x.length > 0) return x;
    this.problems.push(`${at}: ${x === undefined ? 'is missing' : `${JSON.stringify(x)} is not a non-empty string`}`);
    return null;
  }

  integer(x: unknown, at: string, min: number, max: number): number | null {
    if (typeof x === 'number' && Number.isInteger(x) && x >= min && x <= max) return x;
    this.problems.push(`${at}: ${x === undefined ? 'is missing' : `${JSON.stringify(x)} is not an integer from ${min} to ${max}`}`);
    return null;
  }

  size(x: unknown, at: string): number | null {
    if (typeof x === 'number' && Number.isSafeInteger(x) && x > 0) return x;
    if (typeof x === 'string') {
      try {
        return parseSize(x, at);
      } catch (e) {
        this.problems.push((e as Error).message);
        return null;
      }
    }
    this.problems.push(`${at}: ${x === undefined ? 'is missing' : `${JSON.stringify(x)} is not a size (examples: 512M, 4G)`}`);
    return null;
  }

  /** "127.0.0.1:10809", or { host, port }. */
  endpoint(x: unknown, at: string): Endpoint | null {
    let host: unknown;
    let port: unknown;
    if (typeof x === 'string') {
      const m = /^(.*):(\d+)$/.exec(x);
      if (!m) {
        this.problems.push(`${at}: ${JSON.stringify(x)} is not HOST:PORT`);
        return null;
      }
      host = m[1]!.replace(/^\[(.*)\]$/, '$1');
      port = Number(m[2]);
    } else {
      const o = this.object(x, at);
      if (!o) return null;
      this.known(o, at, ['host', 'port']);
      host = o.host ?? '127.0.0.1';
      port = o.port;
    }
    const h = this.string(host, `${at}.host`);
    const p = this.integer(port, `${at}.port`, 0, 65535);
    return h !== null && p !== null ? { host: h, port: p } : null;
  }
}
