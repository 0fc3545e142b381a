/**
 * The main job and its processes:
 *
 *   dve node start --id N   one node, in the foreground (or --detach: in the background,
 *                           log in node-N.log), pid in node-N.pid
 *   dve up                  every node of the configuration, each its own process
 *                           (`dve node start --id N`); in the foreground it supervises
 *                           them (pid in dve.pid): signals are forwarded, a node that dies
 *                           is reported and not restarted; --detach leaves them running
 *   dve down                stops every node (and the supervisor) of a state directory
 *   dve node stop|kill N    SIGTERM or SIGKILL one node and wait for it to go
 *
 * Without --config the embedded default (defaultConfig in src/node/node.ts): nodes on
 * loopback with ports from --port up, disk files in the state directory, and the volume
 * `default` (1 GiB, 2-way mirrored) created on first boot.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { createLogger } from '../log.js';
import { attachHelp } from './serve.js';
import { loadConfig, type Config } from '../config/config.js';
import { DEFAULT_VOLUME, clusterSecret, defaultConfig, nodeConfig, startNode, type RunningNode } from '../node/node.js';
import { AdminClient, formatEndpoint } from '../admin/client.js';
import { readNodeFiles, type NodeFileInfo } from '../admin/node-file.js';
import {
  claimPidFile, describeExit, exitStatus, forgetNode, indent, livePid, liveNodePids, logTail,
  nodePidPath, nodeUp, readPid, reachable, removePidFileIf, signal, signalNodes, sleep, spawnNode,
  supervisorPidPath, waitForExit, waitForNodeUp, type NodePid, type SpawnedNode,
} from './cluster-processes.js';

export type OnStop = (log: Logger, stop: () => Promise<void>) => void;

interface CommonStartOptions {
  stateDir: string;
  /** The base NBD port of the embedded default: node i listens on port + i - 1. */
  port: number;
  bind: string;
  logLevel: string;
  config?: string;
  detach: boolean;
}

export interface NodeStartOptions extends CommonStartOptions {
  id: number;
  /** Started by a foreground `dve up`: stop when its stdin (a pipe from the supervisor) closes. */
  supervised: boolean;
}

export type UpOptions = CommonStartOptions;

/** A node's exit status when the cluster evicted it (src/node/node.ts). */
const EVICTED_STATUS = 3;
/** How long `dve node start --detach` waits for the node to serve. */
const NODE_START_TIMEOUT_MS = 30_000;
/** How long `dve up` waits for every node to serve. */
const UP_TIMEOUT_MS = 60_000;
/** How long a node that is asked to stop while still starting gets to finish starting. */
const STARTING_GRACE_MS = 5_000;
/** How long a stop (SIGTERM) or kill (SIGKILL) waits for each process to go. */
const STOP_TIMEOUT_MS = 30_000;

export const PORT_0_MESSAGE = '--port 0 cannot be used for a multi-node cluster; pick a base port';

function fail(label: string, message: string): never {
  process.stderr.write(`${label}: ${message}\n`);
  process.exit(1);
}

/** --config, else the embedded default in the state directory; errors end the command. */
function clusterConfig(label: string, o: CommonStartOptions, stateDir: string): Config {
  if (!o.config && o.port === 0) fail(label, PORT_0_MESSAGE);
  try {
    return o.config ? loadConfig(o.config) : defaultConfig(stateDir, o.port);
  } catch (e) {
    fail(label, (e as Error).message);
  }
}

function attachHost(nbdHost: string): string {
  return reachable({ host: nbdHost, port: 0 }).host;
}

// ---------------------------------------------------------------- dve node start

export async function runNodeStart(o: NodeStartOptions, onStop: OnStop): Promise<void> {
  const label = 'dve node start';
  const stateDir = path.resolve(o.stateDir);
  const config = clusterConfig(label, o, stateDir);
  try {
    nodeConfig(config, o.id);
  } catch (e) {
    fail(label, (e as Error).message);
  }
  fs.mkdirSync(stateDir, { recursive: true });
  const pidPath = nodePidPath(stateDir, o.id);
  const running = livePid(pidPath);
  if (running !== null && running !== process.pid) {
    fail(label, `node ${o.id} is already running (pid ${running}); stop it with: dve node stop ${o.id} --state-dir ${o.stateDir}`);
  }
  if (o.detach) return detachNode(o, stateDir);

  // The pid file is claimed before the engine opens: a second start of the same node
  // is refused, and `dve down` finds a node that is still starting.
  const holder = claimPidFile(pidPath);
  if (holder !== null) fail(label, `node ${o.id} is already running (pid ${holder})`);
  process.on('exit', () => removePidFileIf(pidPath, process.pid));

  const log = createLogger(o.logLevel);
  let stopRequested = false;
  const starting = startNode({
    config, nodeId: o.id, stateDir, log,
    firstBootVolumes: o.config ? [] : [DEFAULT_VOLUME],
    createSecret: !o.config,
  });
  starting.catch(() => { /* reported below */ });
  onStop(log, async () => {
    stopRequested = true;
    // A node still starting (e.g. waiting for its peers) gets a moment to finish, then
    // goes without a graceful stop: it serves nothing yet.
    const node = await Promise.race([starting.catch(() => null), sleep(STARTING_GRACE_MS).then(() => 'starting' as const)]);
    if (node === 'starting') log.warn({ graceMs: STARTING_GRACE_MS }, 'still starting (waiting for the cluster?): exiting without serving');
    else await node?.stop();
    removePidFileIf(pidPath, process.pid);
  });
  if (o.supervised) stopWhenSupervisorGoes(() => stopRequested);

  let node: RunningNode;
  try {
    node = await starting;
  } catch (e) {
    if (stopRequested) return; // the stop handler exits
    removePidFileIf(pidPath, process.pid);
    fail(label, (e as Error).message);
  }
  if (stopRequested) return;
  const info = node.engine.nodeInfo!;
  process.stdout.write(`dve node: node ${o.id} (pid ${process.pid}), state directory ${stateDir}\n`);
  process.stdout.write(`  nbd: ${formatEndpoint(info.nbd)}   admin: ${formatEndpoint(info.admin)}   (dve status --state-dir ${o.stateDir})\n`);
  for (const v of node.engine.listVolumes()) {
    if (v.uris.length === 0) continue;
    process.stdout.write(attachHelp(v.name, v.sizeBytes, `${v.layout} volume`, v.uris, node.nbdPort, attachHost(info.nbd.host)) + '\n');
  }
}

/**
 * A node started by a foreground `dve up` has a pipe from the supervisor on stdin: when
 * it closes (the supervisor died, even by SIGKILL), the node stops gracefully instead of
 * running on unsupervised.
 */
function stopWhenSupervisorGoes(stopRequested: () => boolean): void {
  let signalled = false;
  const gone = (): void => {
    if (signalled || stopRequested()) return;
    signalled = true;
    process.kill(process.pid, 'SIGTERM');
  };
  process.stdin.on('data', () => { /* nothing is sent */ });
  process.stdin.once('end', gone);
  process.stdin.once('close', gone);
  process.stdin.on('error', gone);
  process.stdin.resume();
}

/** `dve node start --detach`: the same command in the background; return once it serves. */
async function detachNode(o: NodeStartOptions, stateDir: string): Promise<void> {
  const label = 'dve node start';
  const node = spawnNode({ stateDir, id: o.id, port: o.port, bind: o.bind, logLevel: o.logLevel, config: o.config, supervised: false });
  node.child.unref();
  let info: NodeFileInfo | null;
  try {
    info = await waitForNodeUp(stateDir, o.id, node.pid, NODE_START_TIMEOUT_MS, () => node.exit !== null);
  } catch (e) {
    if (node.exit === null && readPid(nodePidPath(stateDir, o.id)) === node.pid) {
      // Running, but not serving yet: a node waits for its peers to form the cluster
      // (a drill restarting a node while the others are down). Leave it running.
      process.stdout.write(`dve node start: node ${o.id} is running in the background (pid ${node.pid}) but not serving yet after ${NODE_START_TIMEOUT_MS / 1000} s (waiting for its peers?); log ${node.logPath}; stop with: dve node stop ${o.id} --state-dir ${o.stateDir}\n`);
      return;
    }
    await stopSpawned(stateDir, [node]);
    fail(label, `${(e as Error).message}; last lines of ${node.logPath}:\n${indent(logTail(node.logPath))}`);
  }
  if (!info) {
    fail(label, `node ${o.id} exited (${describeExit(node.exit!)}) before it came up; last lines of ${node.logPath}:\n${indent(logTail(node.logPath))}`);
  }
  process.stdout.write(`dve node start: node ${o.id} running in the background (pid ${node.pid}); nbd ${formatEndpoint(info.nbd)}, admin ${formatEndpoint(info.admin)}; log ${node.logPath}; stop with: dve node stop ${o.id} --state-dir ${o.stateDir}\n`);
}

/** SIGTERM the spawned nodes still alive and wait; SIGKILL what is left after STOP_TIMEOUT_MS. */
async function stopSpawned(stateDir: string, nodes: SpawnedNode[]): Promise<void> {
  const alive = nodes.filter((n) => n.exit === null && n.pid > 0).map((n) => ({ id: n.id, pid: n.pid }));
  const left = (await signalNodes(stateDir, alive, 'SIGTERM', STOP_TIMEOUT_MS)).filter((r) => !r.stopped);
  await signalNodes(stateDir, left, 'SIGKILL', STOP_TIMEOUT_MS);
}

// ---------------------------------------------------------------- dve up

export async function runUp(o: UpOptions, onStop: OnStop): Promise<void> {
  const label = 'dve up';
  const stateDir = path.resolve(o.stateDir);
  const config = clusterConfig(label, o, stateDir);
  fs.mkdirSync(stateDir, { recursive: true });
  const supPath = supervisorPidPath(stateDir);
  const sup = livePid(supPath);
  if (sup !== null) fail(label, `already running (pid ${sup}, state dir ${stateDir}); stop it with: dve down --state-dir ${o.stateDir}`);
  const ids = config.nodes.map((n) => n.id);
  const busy = liveNodePids(stateDir).filter((n) => ids.includes(n.id));
  if (busy.length > 0) {
    fail(label, `already running: ${busy.map((n) => `node ${n.id} (pid ${n.pid})`).join(', ')}; stop it with: dve down --state-dir ${o.stateDir}`);
  }
  if (!o.detach) {
    const holder = claimPidFile(supPath);
    if (holder !== null) fail(label, `already running (pid ${holder}, state dir ${stateDir}); stop it with: dve down --state-dir ${o.stateDir}`);
    process.on('exit', () => removePidFileIf(supPath, process.pid));
  }

  if (!o.config && config.nodes.length > 1) {
    // The embedded default keeps its mesh secret in the state directory: made here,
    // once, rather than by nodes racing to create it.
    try {
      clusterSecret(config, true);
    } catch (e) {
      fail(label, (e as Error).message);
    }
  }
  const log = createLogger(o.logLevel);
  const nodes = ids.map((id) => spawnNode({
    stateDir, id, port: o.port, bind: o.bind, logLevel: o.logLevel, config: o.config, supervised: !o.detach,
  }));
  if (o.detach) for (const n of nodes) n.child.unref();

  const restartHint = (id: number): string => [
    `dve node start --id ${id} --detach --state-dir ${o.stateDir}`,
    o.config ? ` --config ${o.config}` : ` --port ${o.port}`,
  ].join('');
  const supervisor = o.detach ? null : new Supervisor(stateDir, ids, nodes, restartHint);
  if (supervisor) onStop(log, () => supervisor.stop());

  // Wait until every node serves; the first one to fail (or the deadline) ends it all.
  const up = new Map<number, NodeFileInfo>();
  const deadline = Date.now() + UP_TIMEOUT_MS;
  let failure: { node: SpawnedNode; why: string } | null = null;
  while (!failure && up.size < nodes.length) {
    if (supervisor?.stopping) return; // a signal: the stop handler takes it from here
    const files = readNodeFiles(stateDir);
    for (const n of nodes) {
      if (n.exit) {
        failure = { node: n, why: `exited (${describeExit(n.exit)}) ${up.has(n.id) ? 'after' : 'before'} it came up` };
        break;
      }
      const info = up.has(n.id) ? null : nodeUp(stateDir, n.id, n.pid, files);
      if (info) up.set(n.id, info);
    }
    if (!failure && up.size < nodes.length) {
      if (Date.now() >= deadline) {
        const late = nodes.find((n) => !up.has(n.id))!;
        failure = { node: late, why: `did not come up within ${UP_TIMEOUT_MS / 1000} s` };
      } else {
        await sleep(50);
      }
    }
  }
  if (supervisor?.stopping) return;
  if (failure) {
    if (supervisor) supervisor.stopping = true;
    process.stderr.write(`${label}: node ${failure.node.id} ${failure.why}; stopping the other nodes; last lines of ${failure.node.logPath}:\n${indent(logTail(failure.node.logPath))}\n`);
    await stopSpawned(stateDir, nodes);
    process.exit(1);
  }

  for (const n of nodes) {
    const info = up.get(n.id)!;
    process.stdout.write(`dve up: node ${n.id} (pid ${n.pid})  nbd ${formatEndpoint(info.nbd)}  admin ${formatEndpoint(info.admin)}  log ${n.logPath}\n`);
  }
  await printVolumes(o, up.get(nodes[0]!.id)!);
  if (supervisor) {
    process.stdout.write(`dve up: supervising ${plural(nodes.length, 'node')} (pid ${process.pid}); Ctrl-C or \`dve down --state-dir ${o.stateDir}\` stops them\n`);
    supervisor.watch();
  } else {
    process.stdout.write(`dve up: ${plural(nodes.length, 'node')} running in the background; status: dve status --state-dir ${o.stateDir}; stop with: dve down --state-dir ${o.stateDir}\n`);
    process.exit(0);
  }
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** The volumes and how to attach them, from the admin endpoint of one node. */
async function printVolumes(o: UpOptions, node: NodeFileInfo): Promise<void> {
  try {
    // The cluster's status lists every node's URI of each volume (listVolumes only this node's).
    const vols = (await new AdminClient(node.admin, { timeoutMs: 10_000 }).status()).volumes;
    const exported = vols.filter((v) => v.uris.length > 0);
    if (exported.length === 0) {
      process.stdout.write(`dve up: no volumes yet (create one with: dve volume create NAME --size 1G --layout mirrored --state-dir ${o.stateDir})\n`);
    }
    for (const v of exported) {
      process.stdout.write(attachHelp(v.name, v.sizeBytes, `${v.layout} volume`, v.uris, node.nbd.port, attachHost(node.nbd.host)) + '\n');
    }
  } catch (e) {
    process.stderr.write(`dve up: could not list the volumes (node ${node.id}, admin ${formatEndpoint(node.admin)}): ${(e as Error).message}\n`);
  }
}

/**
 * The foreground `dve up` after its nodes are up: reports each node that exits (and
 * does not restart it: failover drills kill nodes on purpose; an evicted node, status
 * 3, is reported with the command that brings it back), forwards a stop signal
 * to every node, and exits once no node of the configuration runs any more, with the
 * exit status of the last of its nodes to exit (128+N for signal N).
 */
class Supervisor {
  stopping = false;
  private status = 0;

  constructor(
    private readonly stateDir: string,
    private readonly ids: number[],
    private readonly nodes: SpawnedNode[],
    private readonly restartHint: (id: number) => string,
  ) {}

  /** The nodes to stop: our live children, and nodes of the configuration restarted since (`dve node start`). */
  private targets(): NodePid[] {
    const mine = this.nodes.filter((n) => n.exit === null).map((n) => ({ id: n.id, pid: n.pid }));
    const others = liveNodePids(this.stateDir).filter((p) => this.ids.includes(p.id) && !mine.some((m) => m.pid === p.pid));
    return [...mine, ...others];
  }

  watch(): void {
    for (const n of this.nodes) {
      const exited = (): void => {
        const exit = n.exit!;
        const evicted = exit.code === EVICTED_STATUS ? `: evicted by the cluster; rejoin with: ${this.restartHint(n.id)}` : '';
        process.stderr.write(`dve up: node ${n.id} exited (${describeExit(exit)}${evicted})\n`);
        this.status = exitStatus(exit);
        forgetNode(this.stateDir, n.id, n.pid);
        this.check();
      };
      if (n.exit) exited();
      else n.child.once('exit', () => setImmediate(exited)); // after spawnNode's own listener set n.exit
    }
    setInterval(() => this.check(), 1000);
  }

  private check(): void {
    if (this.stopping) return;
    if (this.targets().length > 0) return;
    process.stderr.write(`dve up: no node is running any more; exiting\n`);
    process.exit(this.status);
  }

  /** SIGTERM every node, wait for them (SIGKILL after STOP_TIMEOUT_MS); rejects when one did not stop cleanly. */
  async stop(): Promise<void> {
    this.stopping = true;
    const targets = this.targets();
    const results = await signalNodes(this.stateDir, targets, 'SIGTERM', STOP_TIMEOUT_MS);
    const stuck = results.filter((r) => !r.stopped);
    if (stuck.length > 0) await signalNodes(this.stateDir, stuck, 'SIGKILL', STOP_TIMEOUT_MS);
    await sleep(0); // let the children's exit events land
    const unclean = this.nodes.filter((n) => targets.some((t) => t.pid === n.pid) && n.exit && exitStatus(n.exit) !== 0);
    if (stuck.length > 0 || unclean.length > 0) {
      const what = [
        ...stuck.map((s) => `node ${s.id} (pid ${s.pid}) did not stop within ${STOP_TIMEOUT_MS / 1000} s and was killed`),
        ...unclean.map((n) => `node ${n.id} exited (${describeExit(n.exit!)})`),
      ];
      throw new Error(what.join('; '));
    }
  }
}

// ---------------------------------------------------------------- dve down, dve node stop|kill

export async function runDown(stateDirArg: string): Promise<number> {
  const stateDir = path.resolve(stateDirArg);
  const nodes = liveNodePids(stateDir);
  const supPath = supervisorPidPath(stateDir);
  const sup = livePid(supPath);
  if (nodes.length === 0 && sup === null) {
    process.stderr.write(`dve down: nothing is running in ${stateDir}\n`);
    return 1;
  }
  let code = 0;
  for (const r of await signalNodes(stateDir, nodes, 'SIGTERM', STOP_TIMEOUT_MS)) {
    if (r.stopped) process.stdout.write(`dve down: stopped node ${r.id} (pid ${r.pid})\n`);
    else {
      process.stderr.write(`dve down: node ${r.id} (pid ${r.pid}) did not stop within ${STOP_TIMEOUT_MS / 1000} s (force it with: dve node kill ${r.id} --state-dir ${stateDirArg})\n`);
      code = 1;
    }
  }
  if (sup !== null) {
    // The supervisor exits by itself once its nodes are gone; signalled before that, it
    // would forward a second signal to nodes that are already stopping.
    let gone = await waitForExit(sup, 5_000);
    if (!gone) {
      signal(sup, 'SIGTERM');
      gone = await waitForExit(sup, STOP_TIMEOUT_MS);
    }
    if (gone) {
      removePidFileIf(supPath, sup);
      process.stdout.write(`dve down: stopped the supervisor (pid ${sup})\n`);
    } else {
      process.stderr.write(`dve down: the supervisor (pid ${sup}) did not stop within ${STOP_TIMEOUT_MS / 1000} s\n`);
      code = 1;
    }
  }
  return code;
}

/** `dve node stop N` (SIGTERM) and `dve node kill N` (SIGKILL): signal one node and wait until it is gone. */
export async function runNodeSignal(stateDirArg: string, id: number, sig: 'SIGTERM' | 'SIGKILL'): Promise<number> {
  const label = sig === 'SIGKILL' ? 'dve node kill' : 'dve node stop';
  const stateDir = path.resolve(stateDirArg);
  const pid = livePid(nodePidPath(stateDir, id));
  if (pid === null) {
    const others = liveNodePids(stateDir);
    const running = others.length > 0 ? `running: ${others.map((n) => `node ${n.id}`).join(', ')}` : 'no node is running there';
    process.stderr.write(`${label}: node ${id} is not running in ${stateDir} (${running})\n`);
    return 1;
  }
  const [r] = await signalNodes(stateDir, [{ id, pid }], sig, STOP_TIMEOUT_MS);
  if (!r!.stopped) {
    process.stderr.write(`${label}: node ${id} (pid ${pid}) is still running after ${STOP_TIMEOUT_MS / 1000} s${sig === 'SIGTERM' ? ` (force it with: dve node kill ${id} --state-dir ${stateDirArg})` : ''}\n`);
    return 1;
  }
  process.stdout.write(`${label}: ${sig === 'SIGKILL' ? 'killed' : 'stopped'} node ${id} (pid ${pid})\n`);
  return 0;
}
