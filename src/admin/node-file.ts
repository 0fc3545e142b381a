/**
 * How the CLI finds a running node: each node writes `<stateDir>/node-<id>.json`
 * ({ id, pid, admin, nbd, startedAt }) once it is up and removes it when it stops.
 * A file left behind by a node that died is ignored (its pid is not alive).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Endpoint } from '../config/config.js';
import { AdminError } from '../engine/admin-api.js';
import { processAlive } from '../util/process.js';

export interface NodeFileInfo {
  id: number;
  pid: number;
  admin: Endpoint;
  nbd: Endpoint;
  startedAt: string;
}

const NAME = /^node-(\d+)\.json$/;

export function nodeFilePath(stateDir: string, id: number): string {
  return path.join(stateDir, `node-${id}.json`);
}

/** Written atomically (temp file + rename): a reader never sees half a file. */
export function writeNodeFile(stateDir: string, info: NodeFileInfo): void {
  fs.mkdirSync(stateDir, { recursive: true });
  const file = nodeFilePath(stateDir, info.id);
  const tmp = `${file}.${process.pid}.tmp`;
  const { id, pid, admin, nbd, startedAt } = info;
  fs.writeFileSync(tmp, JSON.stringify({ id, pid, admin, nbd, startedAt }, null, 2) + '\n');
  fs.renameSync(tmp, file);
}

export function removeNodeFile(stateDir: string, id: number): void {
  fs.rmSync(nodeFilePath(stateDir, id), { force: true });
}

/** True when a process with this pid exists and is not a zombie. */
export function pidAlive(pid: number): boolean {
  return processAlive(pid);
}

/** The node files of live nodes in stateDir, by id; stale and unreadable files are skipped. */
export function readNodeFiles(stateDir: string): NodeFileInfo[] {
  let names: string[];
  try {
    names = fs.readdirSync(stateDir);
  } catch {
    return [];
  }
  const out: NodeFileInfo[] = [];
  for (const name of names) {
    if (!NAME.test(name)) continue;
    let raw: unknown;
    try {
      raw = JSON.parse(fs.readFileSync(path.join(stateDir, name), 'utf8'));
    } catch {
      continue;
    }
    const info = asNodeFileInfo(raw);
    if (info && pidAlive(info.pid)) out.push(info);
  }
  return out.sort((a, b) => a.id - b.id);
}

/** The admin endpoint of node `id` (default: the first live node) in stateDir. Any live node answers for the cluster. */
export function findAdminEndpoint(stateDir: string, id?: number): Endpoint {
  const nodes = readNodeFiles(stateDir);
  if (nodes.length === 0) {
    throw new AdminError('EIO', `no dve node is running in ${path.resolve(stateDir)} (start one with \`dve up\`)`);
  }
  if (id === undefined) return nodes[0]!.admin;
  const n = nodes.find((x) => x.id === id);
  if (!n) throw new AdminError('ENOENT', `node ${id} is not running in ${path.resolve(stateDir)} (running: ${nodes.map((x) => x.id).join(', ')})`);
  return n.admin;
}

function asEndpoint(x: unknown): Endpoint | null {
  if (typeof x !== 'object' || x === null) return null;
  const o = x as Record<string, unknown>;
  if (typeof o.host !== 'string' || typeof o.port !== 'number' || !Number.isInteger(o.port) || o.port < 0 || o.port > 65535) return null;
  return { host: o.host, port: o.port };
}

function asNodeFileInfo(x: unknown): NodeFileInfo | null {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) return null;
  const o = x as Record<string, unknown>;
  const admin = asEndpoint(o.admin);
  const nbd = asEndpoint(o.nbd);
  if (typeof o.id !== 'number' || !Number.isInteger(o.id) || typeof o.pid !== 'number' || !admin || !nbd) return null;
  return { id: o.id, pid: o.pid, admin, nbd, startedAt: typeof o.startedAt === 'string' ? o.startedAt : '' };
}
