/**
 * A node process: the engine (control path and one fast path per volume) behind an
 * NBD listener and an admin endpoint, started from a configuration or from the
 * embedded default in a state directory.
 */
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { embeddedDefault, type Config, type NodeConfig } from '../config/config.js';
import { Engine } from '../engine/engine.js';
import { Mesh } from '../../cluster/mesh.js';
import { Coordinator } from '../../cluster/coordinator.js';
import type { NodeInfo, NodeStatus, TaskInfo } from '../engine/admin-api.js';
import { SyncDriver } from '../../cluster/sync-driver.js';
import { IoPauseCoordinator } from '../../cluster/io-pause.js';
import { NbdServer } from '../../nbd/server.js';
import { startAdminServer, type AdminServer } from '../admin/server.js';
import { removeNodeFile, writeNodeFile } from '../admin/node-file.js';
import type { VolumeCreateRequest } from '../engine/admin-api.js';

export interface NodeOptions {
  config: Config;
  nodeId: number;
  stateDir: string;
  log: Logger;
  /** Volumes to create on first boot (no volumes yet; the lowest node id creates them). */
  firstBootVolumes?: VolumeCreateRequest[];
  /** Create `cluster.secretFile` with a random secret if it is missing (the embedded default). */
  createSecret?: boolean;
  /** The cluster evicted this node (default: log and exit with status 3, so a supervisor restarts it). */
  onEvicted?: () => void;
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

/** The mesh secret: from the configuration, or its secret file (created when asked to). */
export function clusterSecret(config: Config, create: boolean): string {
  if (config.cluster.secret) return config.cluster.secret;
  const file = config.cluster.secretFile;
  if (!file) throw new Error('a cluster of more than one node needs cluster.secret or cluster.secretFile in the configuration');
  if (create && !fs.existsSync(file)) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    try {
      fs.writeFileSync(file, randomBytes(32).toString('hex') + '\n', { flag: 'wx', mode: 0o600 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
  }
  let secret: string;
  try {
    secret = fs.readFileSync(file, 'utf8').trim();
  } catch (e) {
    throw new Error(`cluster.secretFile ${file}: ${(e as Error).message}`);
  }
  if (secret.length < 16) throw new Error(`cluster.secretFile ${file}: the secret must be at least 16 characters`);
  return secret;
}

export async function startNode(o: NodeOptions): Promise<RunningNode> {
  const me = nodeConfig(o.config, o.nodeId);
  const log = o.log.child({ node: o.nodeId });
  fs.mkdirSync(o.stateDir, { recursive: true });
  const peers = o.config.nodes.filter((n) => n.id !== o.nodeId);
  let mesh: Mesh | null = null;
  if (peers.length > 0) {
    mesh = new Mesh({
      nodeId: o.nodeId, secret: clusterSecret(o.config, o.createSecret ?? false), listen: me.mesh,
      peers: peers.map((p) => ({ id: p.id, endpoint: p.mesh })), log,
      heartbeatMs: o.config.cluster.heartbeatMs, peerTimeoutMs: o.config.cluster.peerTimeoutMs,
      // A restarted peer should be found well within the boot grace.
      reconnectMaxMs: Math.max(200, Math.min(5000, Math.floor(o.config.cluster.peerTimeoutMs / 2))),
    });
    await mesh.start();
  }
  const theMesh = mesh;
  let engine: Engine;
  try {
    engine = await Engine.open({
      config: o.config, nodeId: o.nodeId, log,
      cluster: (journals) => new Coordinator({
        nodeId: o.nodeId, peers: o.config.nodes.map((n) => n.id), mesh: theMesh, journals, log, ackTimeoutMs: o.config.cluster.peerTimeoutMs,
      }),
    });
  } catch (e) {
    await mesh?.stop();
    throw e;
  }
  engine.onSelfEvicted = o.onEvicted ?? (() => {
    log.fatal('evicted by the cluster: exiting (status 3); restart the node to rejoin');
    setTimeout(() => process.exit(3), 200).unref();
  });
  const lowest = Math.min(...o.config.nodes.map((n) => n.id));
  if (o.firstBootVolumes && o.nodeId === lowest && engine.listVolumes().length === 0) {
    for (const req of o.firstBootVolumes) {
      try {
        await engine.createVolume(req);
      } catch (e) {
        log.warn({ volume: req.name, err: (e as Error).message }, 'first-boot volume not created');
      }
    }
  }
  let pauser: IoPauseCoordinator | null = null;
  let sync: SyncDriver | null = null;
  if (mesh) {
    // Group operations pause I/O on every live node at a synchronization point (seed 000).
    sync = new SyncDriver({ transport: mesh, peers: () => engine.cluster.livePeers(), log });
    const p = new IoPauseCoordinator({
      transport: mesh, sync, log,
      hooks: { pause: (v) => engine.pauseVolumes(v), resume: (v) => engine.resumeVolumes(v) },
      members: () => [o.nodeId, ...engine.cluster.livePeers()],
    });
    pauser = p;
    engine.groupPause = (volumes, timeoutMs, fn) => p.withPaused(volumes, timeoutMs, fn);
    engine.pausedOps = () => p.active();
    const driver = sync;
    engine.syncPoint = async (e) => {
      const r = await driver.start(e);
      driver.stop(e.sync);
      return r;
    };
    // Peers ask for this node's view when an operator runs `dve status` against them.
    mesh.on('message', (peer, type, _body, c) => {
      if (type !== 'status' || c === 0) return;
      const st = engine.status();
      theMesh!.reply(peer, c, { node: st.nodes.find((n) => n.id === o.nodeId) ?? null, tasks: st.tasks });
    });
  }
  const server = new NbdServer(engine.exports, log);
  let admin: AdminServer | null = null;
  try {
    const { port } = await server.listen({ port: me.nbd.port, host: me.nbd.host });
    const nbdPort = port!;
    admin = await startAdminServer(clusterAdmin(engine, mesh), me.admin, log);
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
        pauser?.close();
        sync?.close();
        await engine.close();
        await theMesh?.stop();
      })()),
    };
  } catch (e) {
    await admin?.close();
    await server.close();
    await engine.close();
    await mesh?.stop();
    throw e;
  }
}

/** The engine's admin API, with `status` gathering each live peer's own view of itself over the mesh. */
function clusterAdmin(engine: Engine, mesh: Mesh | null): Engine {
  if (!mesh) return engine;
  return new Proxy(engine, {
    get(target, prop, receiver) {
      if (prop !== 'status') {
        const v = Reflect.get(target, prop, receiver) as unknown;
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      }
      return async (): Promise<NodeStatus> => {
        const s = target.status();
        await Promise.all(s.nodes.map(async (n, i) => {
          if (n.state !== 'joined') return;
          try {
            const r = (await mesh.request(n.id, 'status', {}, 1000)) as { node?: NodeInfo | null; tasks?: TaskInfo[] } | null;
            const peer = r?.node;
            if (peer && typeof peer === 'object' && peer.id === n.id) s.nodes[i] = { ...n, ...peer, state: 'joined', evictions: n.evictions };
            if (Array.isArray(r?.tasks)) for (const t of r.tasks) if (!s.tasks.some((x) => x.id === t.id)) s.tasks.push({ ...t, message: t.message ? `${t.message} (node ${n.id})` : `node ${n.id}` });
          } catch {
            // A peer that does not answer keeps the entry the membership gives.
          }
        }));
        // Every serving node exports every volume.
        const serving = s.nodes.filter((n) => n.state === 'online' || n.state === 'joined');
        for (const v of s.volumes) {
          const more = serving.filter((n) => n.state === 'joined').map((n) => `nbd://${n.nbd.host === '0.0.0.0' ? '127.0.0.1' : n.nbd.host}:${n.nbd.port}/${encodeURIComponent(v.name)}`);
          v.uris = [...v.uris, ...more.filter((u) => !v.uris.includes(u))];
        }
        return s;
      };
    },
  });
}

/** The configuration `dve up` uses without --config: the embedded default under the state directory. */
export function defaultConfig(stateDir: string, nbdPort: number, nodes = 3): Config {
  return embeddedDefault(path.resolve(stateDir), { nodes, basePort: nbdPort });
}
