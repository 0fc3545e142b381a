/**
 * A node process: the engine (control path and one fast path per volume) behind an
 * NBD listener and an admin endpoint, started from a configuration or from the
 * embedded default in a state directory.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { embeddedDefault, type Config, type NodeConfig } from '../config/config.js';
import { Engine } from '../engine/engine.js';
import { NbdServer } from '../../nbd/server.js';
import { startAdminServer, type AdminServer } from '../admin/server.js';
import { removeNodeFile, writeNodeFile } from '../admin/node-file.js';
import type { VolumeCreateRequest } from '../engine/admin-api.js';

export interface NodeOptions {
  config: Config;
  nodeId: number;
  stateDir: string;
  log: Logger;
  /** Volumes to create on first boot (no volumes yet). */
  firstBootVolumes?: VolumeCreateRequest[];
}

export interface RunningNode {
  engine: Engine;
  nbdPort: number;
  adminPort: number;
  uriBase: string;
  stop(): Promise<void>;
}

/** The default volume `npm start` serves on first boot. */
export const DEFAULT_VOLUME: VolumeCreateRequest = { name: 'default', sizeBytes: 1024 ** 3, layout: 'mirrored', copies: 2 };

export function nodeConfig(config: Config, id: number): NodeConfig {
  const n = config.nodes.find((x) => x.id === id);
  if (!n) throw new Error(`node ${id} is not in the configuration (nodes: ${config.nodes.map((x) => x.id).join(', ')})`);
  return n;
}

export async function startNode(o: NodeOptions): Promise<RunningNode> {
  const me = nodeConfig(o.config, o.nodeId);
  const log = o.log.child({ node: o.nodeId });
  fs.mkdirSync(o.stateDir, { recursive: true });
  const engine = await Engine.open({ config: o.config, nodeId: o.nodeId, log });
  if (o.firstBootVolumes && engine.listVolumes().length === 0) {
    for (const req of o.firstBootVolumes) await engine.createVolume(req);
  }
  const server = new NbdServer(engine.exports, log);
  let admin: AdminServer | null = null;
  try {
    const { port } = await server.listen({ port: me.nbd.port, host: me.nbd.host });
    const nbdPort = port!;
    admin = await startAdminServer(engine, me.admin, log);
    const host = me.nbd.host === '0.0.0.0' ? '127.0.0.1' : me.nbd.host;
    const uriBase = `nbd://${host.includes(':') ? `[${host}]` : host}:${nbdPort}`;
    engine.uriBases = [uriBase];
    engine.onVolumeRemoved = (name) => server.closeExport(name);
    const startedAt = new Date().toISOString();
    engine.nodeInfo = {
      id: o.nodeId, pid: process.pid, state: 'online', startedAt,
      nbd: { host: me.nbd.host, port: nbdPort }, admin: { host: me.admin.host, port: admin.port },
    };
    writeNodeFile(o.stateDir, { id: o.nodeId, pid: process.pid, admin: { host: me.admin.host, port: admin.port }, nbd: { host: me.nbd.host, port: nbdPort }, startedAt });
    log.info({ nbd: uriBase, admin: `${me.admin.host}:${admin.port}`, volumes: engine.listVolumes().map((v) => v.name) }, 'node online');
    let stopping: Promise<void> | null = null;
    const adminServer = admin;
    return {
      engine, nbdPort, adminPort: admin.port, uriBase,
      stop: () => (stopping ??= (async () => {
        removeNodeFile(o.stateDir, o.nodeId);
        await adminServer.close();
        await server.close();
        await engine.close();
      })()),
    };
  } catch (e) {
    await admin?.close();
    await server.close();
    await engine.close();
    throw e;
  }
}

/** The configuration `dve up` uses without --config: the embedded default under the state directory. */
export function defaultConfig(stateDir: string, nbdPort: number): Config {
  return embeddedDefault(path.resolve(stateDir), { nodes: 1, basePort: nbdPort });
}
