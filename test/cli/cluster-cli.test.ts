/**
 * The main job as a set of processes, as a user drives it from the command line:
 * `dve up` starts every node of the configuration (in the background with --detach, or
 * supervised in the foreground), `dve down` stops them all, `dve node start|stop|kill`
 * handles one node (failover drills), and bad arguments are refused with the argument
 * named.
 *
 * Each test writes its own configuration: two nodes on loopback with fixed free ports
 * (mesh peers must know each other's ports), small sparse disks. The node processes are
 * started by the CLI in their own sessions, so `timeout` does not reach them: every test
 * SIGKILLs whatever its state directory's pid files name when it ends, and the worker
 * does the same for every node pid it saw if it exits early.
 */
import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { exitStatus, run, sleep, tempDir, describeResult, type RunResult } from '../helpers/exec.js';
import { CleanupStack } from '../helpers/cleanup.js';
import { REPO_ROOT } from '../helpers/server.js';
import { nbdinfoJson } from '../helpers/clients.js';
import { freePorts } from '../helpers/ports.js';
import { processAlive } from '../../src/util/process.js';

const DVE = path.join(REPO_ROOT, 'bin/dve.js');

function dve(args: string[], timeoutSec = 90): Promise<RunResult> {
  return run(process.execPath, [DVE, ...args], { timeoutSec });
}

test.before(() => {
  if (!fs.existsSync(path.join(REPO_ROOT, 'dist/src/cli/main.js'))) {
    throw new Error('dist/src/cli/main.js is missing: build first (npx tsc -p tsconfig.json)');
  }
});

// ---------------------------------------------------------------- processes left behind

/** Pids of processes this worker saw the CLI start, with the state directory each was started for. */
const seenPids = new Map<number, string>();

/**
 * SIGKILLs pid only while it is still one of ours: a live process whose command line
 * names the state directory (a pid of a process that exited may have been reused).
 */
function killIfOurs(pid: number, stateDir: string): void {
  try {
    if (!fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(stateDir)) return;
    process.kill(pid, 'SIGKILL');
  } catch {
    /* gone */
  }
}
process.on('exit', () => {
  for (const [pid, dir] of seenPids) killIfOurs(pid, dir);
});

function pidsIn(stateDir: string): number[] {
  let names: string[] = [];
  try {
    names = fs.readdirSync(stateDir);
  } catch {
    return [];
  }
  return names
    .filter((n) => /^node-\d+\.pid$/.test(n) || n === 'dve.pid')
    .map((n) => readPidFile(path.join(stateDir, n)) ?? 0)
    .filter((p) => Number.isInteger(p) && p > 0);
}

/** A cleanup stack that SIGKILLs every process of the state directory: named by its pid files, or seen. */
function guard(t: ExecutionContext, stateDir: string): CleanupStack {
  const cleanup = new CleanupStack(t);
  cleanup.push(`kill the processes of ${stateDir}`, async () => {
    const pids = new Set([...pidsIn(stateDir), ...[...seenPids].filter(([, d]) => d === stateDir).map(([p]) => p)]);
    for (const pid of pids) killIfOurs(pid, stateDir);
    for (const pid of pids) {
      for (let i = 0; i < 100 && processAlive(pid); i++) await sleep(20);
      seenPids.delete(pid);
    }
  });
  return cleanup;
}

function notePids(r: RunResult, stateDir: string): void {
  for (const m of r.stdout.matchAll(/\(pid (\d+)\)/g)) seenPids.set(Number(m[1]), stateDir);
}

function readPidFile(file: string): number | null {
  try {
    const pid = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- configuration

interface Cluster {
  config: string;
  stateDir: string;
  nodes: { id: number; nbd: number; admin: number; mesh: number }[];
}

/** DIR/dve.yaml: `count` nodes (ids 1…count) on loopback with fixed free ports, two 256 MiB sparse disks. */
async function writeClusterConfig(dir: string, count = 2): Promise<Cluster> {
  const ports = await freePorts(3 * count);
  const nodes = Array.from({ length: count }, (_, i) => ({ id: i + 1, nbd: ports[3 * i]!, admin: ports[3 * i + 1]!, mesh: ports[3 * i + 2]! }));
  const config = path.join(dir, 'dve.yaml');
  fs.writeFileSync(config, [
    `cluster: { name: cli-test, secret: ${JSON.stringify(`cli-test-secret-${process.pid}-${Date.now()}`)} }`,
    'nodes:',
    ...nodes.map((n) => `  - { id: ${n.id}, nbd: "127.0.0.1:${n.nbd}", admin: "127.0.0.1:${n.admin}", mesh: "127.0.0.1:${n.mesh}" }`),
    'disks:',
    '  - { id: d1, path: disks/d1.img, size: 256M }',
    '  - { id: d2, path: disks/d2.img, size: 256M }',
    'metadata: { path: meta.img, size: 16M }',
    'extentSize: 4M',
    '',
  ].join('\n'));
  return { config, stateDir: path.join(dir, 'state'), nodes };
}

/**
 * `dve up --detach` of the cluster. Free ports are picked by binding and closing, so a
 * test file running beside this one can take one first: on EADDRINUSE, new ports and
 * again (the CLI stopped the nodes that did come up).
 */
async function dveUp(c: Cluster) {
  for (let attempt = 1; ; attempt++) {
    const up = await dve(['up', '--detach', '--config', c.config, '--state-dir', c.stateDir]);
    if (up.code === 0 || attempt === 3 || !/EADDRINUSE/.test(up.stdout + up.stderr)) return up;
    const fresh = await writeClusterConfig(path.dirname(c.config), c.nodes.length);
    c.nodes = fresh.nodes;
  }
}

/** A foreground `dve up` (the supervisor) under `timeout -s KILL`. */
function startSupervisor(cleanup: CleanupStack, stateDir: string, args: string[], lifetimeSec = 120) {
  const child = spawn('timeout', ['-s', 'KILL', String(lifetimeSec), process.execPath, DVE, 'up', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  let status: number | null = null;
  const exited = new Promise<number>((resolve) => {
    child.on('exit', (code, sig) => resolve((status = exitStatus(code, sig))));
  });
  cleanup.push('dve up (supervisor)', async () => {
    if (status === null) child.kill('SIGKILL');
    await exited;
  });
  return {
    stdout: () => stdout,
    stderr: () => stderr,
    status: () => status,
    exited,
    async waitFor(re: RegExp, timeoutMs = 60_000): Promise<void> {
      const deadline = Date.now() + timeoutMs;
      while (!re.test(stdout + stderr)) {
        if (status !== null) throw new Error(`dve up exited (${status}) before printing ${re}:\n${stdout}\n${stderr}`);
        if (Date.now() > deadline) throw new Error(`dve up did not print ${re} within ${timeoutMs} ms:\n${stdout}\n${stderr}`);
        await sleep(25);
      }
      for (const m of stdout.matchAll(/\(pid (\d+)\)/g)) seenPids.set(Number(m[1]), stateDir);
    },
  };
}

async function waitGone(pid: number, timeoutMs = 10_000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processAlive(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}

// ---------------------------------------------------------------- tests

test.serial('up --detach brings up every node of the configuration; down stops them all', async (t) => {
  const c = await writeClusterConfig(tempDir(t));
  guard(t, c.stateDir);

  const up = await dveUp(c);
  notePids(up, c.stateDir);
  t.is(up.code, 0, describeResult(up));
  const pids = new Map<number, number>();
  for (const n of c.nodes) {
    const m = new RegExp(`dve up: node ${n.id} \\(pid (\\d+)\\)  nbd 127\\.0\\.0\\.1:${n.nbd}  admin 127\\.0\\.0\\.1:${n.admin}  log (\\S+)`).exec(up.stdout);
    t.truthy(m, up.stdout);
    const pid = Number(m![1]);
    pids.set(n.id, pid);
    t.is(m![2], path.join(c.stateDir, `node-${n.id}.log`));
    t.is(readPidFile(path.join(c.stateDir, `node-${n.id}.pid`)), pid);
    t.is(JSON.parse(fs.readFileSync(path.join(c.stateDir, `node-${n.id}.json`), 'utf8')).pid, pid);
    t.true(processAlive(pid));
  }
  t.not(pids.get(1), pids.get(2), 'one process per node');
  t.regex(up.stdout, /2 nodes running in the background/);
  t.false(fs.existsSync(path.join(c.stateDir, 'dve.pid')), 'no supervisor with --detach');

  const status = await dve(['status', '--json', '--state-dir', c.stateDir]);
  t.is(status.code, 0, describeResult(status));

  const down = await dve(['down', '--state-dir', c.stateDir]);
  t.is(down.code, 0, describeResult(down));
  for (const [id, pid] of pids) {
    t.regex(down.stdout, new RegExp(`stopped node ${id} \\(pid ${pid}\\)`));
    t.false(processAlive(pid), `node ${id} is gone`);
    t.false(fs.existsSync(path.join(c.stateDir, `node-${id}.pid`)), `node-${id}.pid is gone`);
    t.false(fs.existsSync(path.join(c.stateDir, `node-${id}.json`)), `node-${id}.json is gone`);
  }
  const none = await dve(['down', '--state-dir', c.stateDir]);
  t.is(none.code, 1);
  t.regex(none.stderr, /nothing is running/);
});

/** `dve up --detach` of the cluster; returns the node pids by id. */
async function upDetached(t: ExecutionContext, c: Cluster): Promise<Map<number, number>> {
  const up = await dveUp(c);
  notePids(up, c.stateDir);
  t.is(up.code, 0, describeResult(up));
  const pids = new Map<number, number>();
  for (const n of c.nodes) {
    const pid = readPidFile(path.join(c.stateDir, `node-${n.id}.pid`));
    if (pid !== null) pids.set(n.id, pid);
  }
  t.is(pids.size, c.nodes.length, up.stdout);
  return pids;
}

test.serial('node stop 2 stops one node; node start --id 2 --detach brings it back; a second start is refused', async (t) => {
  const c = await writeClusterConfig(tempDir(t));
  guard(t, c.stateDir);
  const pids = await upDetached(t, c);
  const first = pids.get(2)!;

  const stop = await dve(['node', 'stop', '2', '--state-dir', c.stateDir]);
  t.is(stop.code, 0, describeResult(stop));
  t.regex(stop.stdout, new RegExp(`stopped node 2 \\(pid ${first}\\)`));
  t.false(processAlive(first));
  t.false(fs.existsSync(path.join(c.stateDir, 'node-2.pid')));
  t.false(fs.existsSync(path.join(c.stateDir, 'node-2.json')));
  t.regex(fs.readFileSync(path.join(c.stateDir, 'node-2.log'), 'utf8'), /"msg":"stopped"/, 'it stopped gracefully');
  t.true(processAlive(pids.get(1)!), 'node 1 keeps running');

  const start = await dve(['node', 'start', '--id', '2', '--detach', '--config', c.config, '--state-dir', c.stateDir]);
  notePids(start, c.stateDir);
  t.is(start.code, 0, describeResult(start));
  const m = /node 2 running in the background \(pid (\d+)\)/.exec(start.stdout);
  t.truthy(m, start.stdout);
  const pid = Number(m![1]);
  t.not(pid, first);
  t.regex(start.stdout, new RegExp(`nbd 127\\.0\\.0\\.1:${c.nodes[1]!.nbd}, admin 127\\.0\\.0\\.1:${c.nodes[1]!.admin}`));
  t.is(readPidFile(path.join(c.stateDir, 'node-2.pid')), pid);
  t.true(processAlive(pid));
  t.regex(fs.readFileSync(path.join(c.stateDir, 'node-2.log'), 'utf8'), new RegExp(`dve node: node 2 \\(pid ${pid}\\)`));

  const again = await dve(['node', 'start', '--id', '2', '--config', c.config, '--state-dir', c.stateDir]);
  t.is(again.code, 1);
  t.regex(again.stderr, new RegExp(`node 2 is already running \\(pid ${pid}\\)`));

  const down = await dve(['down', '--state-dir', c.stateDir]);
  t.is(down.code, 0, describeResult(down));
  t.regex(down.stdout, new RegExp(`stopped node 2 \\(pid ${pid}\\)`));
  t.deepEqual(pidsIn(c.stateDir), []);
});

test.serial('node kill 2 SIGKILLs the node and waits until it is gone; the node can be started again', async (t) => {
  const c = await writeClusterConfig(tempDir(t));
  guard(t, c.stateDir);
  const pids = await upDetached(t, c);
  const pid = pids.get(2)!;
  const kill = await dve(['node', 'kill', '2', '--state-dir', c.stateDir]);
  t.is(kill.code, 0, describeResult(kill));
  t.regex(kill.stdout, new RegExp(`killed node 2 \\(pid ${pid}\\)`));
  t.false(processAlive(pid), 'gone when the command returns');
  t.false(fs.existsSync(path.join(c.stateDir, 'node-2.pid')), 'the stale pid file is removed');
  t.false(fs.existsSync(path.join(c.stateDir, 'node-2.json')), 'and the stale node file');
  t.notRegex(fs.readFileSync(path.join(c.stateDir, 'node-2.log'), 'utf8'), /"msg":"stopped"/, 'no graceful stop');
  t.true(processAlive(pids.get(1)!), 'node 1 keeps running');

  const restart = await dve(['node', 'start', '--id', '2', '--detach', '--config', c.config, '--state-dir', c.stateDir]);
  notePids(restart, c.stateDir);
  t.is(restart.code, 0, describeResult(restart));
  t.regex(restart.stdout, /node 2 running in the background/);
  const down = await dve(['down', '--state-dir', c.stateDir]);
  t.is(down.code, 0, describeResult(down));
  t.deepEqual(pidsIn(c.stateDir), []);
});

test.serial('node stop / node kill of a node that is not running exit 1 naming it', async (t) => {
  const c = await writeClusterConfig(tempDir(t));
  guard(t, c.stateDir);
  const stop = await dve(['node', 'stop', '9', '--state-dir', c.stateDir]);
  t.is(stop.code, 1);
  t.regex(stop.stderr, /dve node stop: node 9 is not running in /);
  const kill = await dve(['node', 'kill', '9', '--state-dir', c.stateDir]);
  t.is(kill.code, 1);
  t.regex(kill.stderr, /dve node kill: node 9 is not running in /);
  // A stale pid file (its process is gone) is not a running node.
  fs.mkdirSync(c.stateDir, { recursive: true });
  fs.writeFileSync(path.join(c.stateDir, 'node-3.pid'), '999999999\n');
  const stale = await dve(['node', 'stop', '3', '--state-dir', c.stateDir]);
  t.is(stale.code, 1);
  t.regex(stale.stderr, /node 3 is not running/);
});

test.serial('node stop/kill/start refuse a node id that is not an integer from 0 to 63', async (t) => {
  for (const [cmd, bad] of [['stop', 'abc'], ['kill', '64'], ['stop', '-1'], ['kill', '1.5']] as const) {
    const r = await dve(['node', cmd, bad]);
    t.not(r.code, 0, describeResult(r));
    t.true(r.stderr.includes(`'${bad}'`) && /argument 'id'/.test(r.stderr), r.stderr);
    t.regex(r.stderr, /not an integer from 0 to 63/);
  }
  const start = await dve(['node', 'start', '--id', 'x7']);
  t.not(start.code, 0);
  t.regex(start.stderr, /--id.*'x7'.*not an integer from 0 to 63/);
  const missing = await dve(['node', 'start']);
  t.not(missing.code, 0);
  t.regex(missing.stderr, /required option '--id <n>'/);
});

test.serial('node start of an id the configuration does not list is refused', async (t) => {
  const c = await writeClusterConfig(tempDir(t));
  guard(t, c.stateDir);
  const r = await dve(['node', 'start', '--id', '5', '--detach', '--config', c.config, '--state-dir', c.stateDir]);
  t.is(r.code, 1);
  t.regex(r.stderr, /node 5 is not in the configuration \(nodes: 1, 2\)/);
  t.false(fs.existsSync(path.join(c.stateDir, 'node-5.pid')));
});

test.serial('up --port 0 without --config is refused: the nodes must know each other\'s ports', async (t) => {
  const dir = tempDir(t);
  const stateDir = path.join(dir, 'state');
  guard(t, stateDir);
  for (const args of [['up'], ['up', '--detach'], ['node', 'start', '--id', '1']]) {
    const r = await dve([...args, '--port', '0', '--state-dir', stateDir]);
    t.is(r.code, 1, describeResult(r));
    t.regex(r.stderr, /--port 0 cannot be used for a multi-node cluster; pick a base port/);
  }
  t.deepEqual(pidsIn(stateDir), [], 'nothing was started');
  t.false(fs.existsSync(path.join(stateDir, 'disks')), 'nothing was created');
});

test.serial('foreground up supervises: a second up is refused, a killed node is reported and not restarted, down stops the rest and the supervisor', async (t) => {
  const c = await writeClusterConfig(tempDir(t));
  const cleanup = guard(t, c.stateDir);
  const sup = startSupervisor(cleanup, c.stateDir, ['--config', c.config, '--state-dir', c.stateDir]);
  await sup.waitFor(/supervising 2 nodes \(pid \d+\)/);
  const supPid = readPidFile(path.join(c.stateDir, 'dve.pid'))!;
  t.regex(sup.stdout(), new RegExp(`supervising 2 nodes \\(pid ${supPid}\\)`));
  seenPids.set(supPid, c.stateDir);
  const node1 = readPidFile(path.join(c.stateDir, 'node-1.pid'))!;
  const node2 = readPidFile(path.join(c.stateDir, 'node-2.pid'))!;
  t.regex(sup.stdout(), new RegExp(`dve up: node 1 \\(pid ${node1}\\)`));
  t.regex(sup.stdout(), new RegExp(`dve up: node 2 \\(pid ${node2}\\)`));

  for (const extra of [[], ['--detach']]) {
    const again = await dve(['up', ...extra, '--config', c.config, '--state-dir', c.stateDir]);
    t.is(again.code, 1, describeResult(again));
    t.regex(again.stderr, /already running/);
  }

  const kill = await dve(['node', 'kill', '2', '--state-dir', c.stateDir]);
  t.is(kill.code, 0, describeResult(kill));
  await sup.waitFor(/node 2 exited \(signal SIGKILL\)/);
  await sleep(1500);
  t.is(sup.status(), null, 'the supervisor keeps running with node 1');
  t.false(fs.existsSync(path.join(c.stateDir, 'node-2.pid')), 'node 2 was not restarted');
  t.true(processAlive(node1));

  const down = await dve(['down', '--state-dir', c.stateDir]);
  t.is(down.code, 0, describeResult(down));
  t.regex(down.stdout, new RegExp(`stopped node 1 \\(pid ${node1}\\)`));
  t.notRegex(down.stdout, /stopped node 2/);
  t.regex(down.stdout, new RegExp(`stopped the supervisor \\(pid ${supPid}\\)`));
  t.is(await sup.exited, 0, 'the last node stopped cleanly');
  t.regex(sup.stderr(), /node 1 exited \(code 0\)/);
  t.deepEqual(pidsIn(c.stateDir), [], 'no pid file is left');
});

/** Starts a 2-node foreground `dve up`, waits until it supervises both nodes, then sends the supervisor `sig`. */
async function signalForegroundUp(t: ExecutionContext, sig: NodeJS.Signals) {
  const c = await writeClusterConfig(tempDir(t));
  const cleanup = guard(t, c.stateDir);
  const sup = startSupervisor(cleanup, c.stateDir, ['--config', c.config, '--state-dir', c.stateDir]);
  await sup.waitFor(/supervising 2 nodes/);
  const supPid = readPidFile(path.join(c.stateDir, 'dve.pid'))!;
  const nodes = [1, 2].map((id) => readPidFile(path.join(c.stateDir, `node-${id}.pid`))!);
  process.kill(supPid, sig);
  return { c, sup, nodes };
}

test.serial('foreground up forwards Ctrl-C (SIGINT) to every node and exits 0 once they stopped', async (t) => {
  const { c, sup, nodes } = await signalForegroundUp(t, 'SIGINT');
  t.is(await sup.exited, 0, sup.stdout() + sup.stderr());
  for (const pid of nodes) t.true(await waitGone(pid), `node pid ${pid} is gone`);
  for (const id of [1, 2]) {
    t.regex(fs.readFileSync(path.join(c.stateDir, `node-${id}.log`), 'utf8'), /"msg":"stopped"/, `node ${id} stopped gracefully`);
  }
  t.deepEqual(pidsIn(c.stateDir), [], 'no pid file is left');
});

test.serial('foreground up killed with SIGKILL: its nodes notice and stop', async (t) => {
  const { c, sup, nodes } = await signalForegroundUp(t, 'SIGKILL');
  await sup.exited;
  for (const pid of nodes) t.true(await waitGone(pid, 30_000), `node pid ${pid} is gone`);
  t.deepEqual(pidsIn(c.stateDir).filter(processAlive), [], 'nothing is left running');
  // A stale dve.pid does not block the next start.
  const up = await dveUp(c);
  notePids(up, c.stateDir);
  t.is(up.code, 0, describeResult(up));
  const down = await dve(['down', '--state-dir', c.stateDir]);
  t.is(down.code, 0, describeResult(down));
});

test.serial('a node that cannot start fails up: the other nodes are stopped and its log tail is shown', async (t) => {
  const c = await writeClusterConfig(tempDir(t));
  guard(t, c.stateDir);
  // Something else holds node 2's NBD port.
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(c.nodes[1]!.nbd, '127.0.0.1', () => resolve()));
  t.teardown(() => new Promise<void>((r) => blocker.close(() => r())));

  const up = await dve(['up', '--detach', '--config', c.config, '--state-dir', c.stateDir]) /* the port is taken on purpose: no retry */;
  notePids(up, c.stateDir);
  t.is(up.code, 1, describeResult(up));
  t.regex(up.stderr, /dve up: node 2 exited \(code 1\) before it came up; stopping the other nodes; last lines of .*node-2\.log/);
  t.regex(up.stderr, /EADDRINUSE/);
  t.deepEqual(pidsIn(c.stateDir).filter(processAlive), [], 'node 1 was stopped too');

  // `node start --detach` of a node that dies at once: its log tail, exit 1.
  const meshBlocker = net.createServer();
  await new Promise<void>((resolve) => meshBlocker.listen(c.nodes[1]!.mesh, '127.0.0.1', () => resolve()));
  t.teardown(() => new Promise<void>((r) => meshBlocker.close(() => r())));
  const one = await dve(['node', 'start', '--id', '2', '--detach', '--config', c.config, '--state-dir', c.stateDir]);
  t.is(one.code, 1, describeResult(one));
  t.regex(one.stderr, /node 2 exited \(code 1\) before it came up; last lines of .*node-2\.log:\n(.|\n)*EADDRINUSE/);
  t.false(fs.existsSync(path.join(c.stateDir, 'node-2.pid')));
});

test.serial('up --detach without --config serves the embedded default and its default volume', async (t) => {
  const dir = tempDir(t);
  const stateDir = path.join(dir, 'state');
  guard(t, stateDir);
  // A base port whose derived NBD, admin and mesh ports (up to 3 nodes) are free.
  let base = 0;
  for (let attempt = 0; attempt < 50 && base === 0; attempt++) {
    const p = 20000 + Math.floor(Math.random() * 30000);
    const wanted = [0, 1, 2, 100, 101, 102, 200, 201, 202].map((o) => p + o);
    if (await allFree(wanted)) base = p;
  }
  t.not(base, 0, 'found a free base port');
  const up = await dve(['up', '--detach', '--port', String(base), '--state-dir', stateDir]);
  notePids(up, stateDir);
  t.is(up.code, 0, describeResult(up));
  t.regex(up.stdout, new RegExp(`dve up: node 1 \\(pid \\d+\\)  nbd 127\\.0\\.0\\.1:${base}  admin 127\\.0\\.0\\.1:${base + 100}`));
  t.regex(up.stdout, /serving mirrored volume \(1 GiB\) as export "default"/);
  const uri = /nbd:\/\/127\.0\.0\.1:\d+\/default/.exec(up.stdout)?.[0];
  t.truthy(uri, up.stdout);
  t.regex(up.stdout, /nbd-client 127\.0\.0\.1 \d+ \/dev\/nbd0 -N default/);
  const info = await nbdinfoJson(uri!);
  t.is(info.exports[0]['export-size'], 1024 ** 3, 'served over NBD');
  const show = await dve(['volume', 'show', 'default', '--json', '--state-dir', stateDir]);
  t.is(show.code, 0, describeResult(show));
  t.is(JSON.parse(show.stdout).sizeBytes, 1024 ** 3);
  const down = await dve(['down', '--state-dir', stateDir]);
  t.is(down.code, 0, describeResult(down));
  t.regex(down.stdout, /stopped node 1 \(pid \d+\)/);
  t.deepEqual(pidsIn(stateDir), []);
});

async function allFree(ports: number[]): Promise<boolean> {
  for (const port of ports) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.createServer();
      s.once('error', () => resolve(false));
      s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
    });
    if (!ok) return false;
  }
  return true;
}
