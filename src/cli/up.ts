/**
 * `dve up` / `dve down`: the main job. With no configuration, the embedded default:
 * one node over four sparse disk files and a metadata area in the state directory,
 * serving the volume `default` (1 GiB, 2-way mirrored) created on first boot.
 */
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createLogger } from '../log.js';
import { processAlive } from '../util/process.js';
import { attachHelp } from './serve.js';
import { loadConfig } from '../config/config.js';
import { DEFAULT_VOLUME, defaultConfig, startNode } from '../node/node.js';


interface UpOptions { stateDir: string; port: number; bind: string; detach: boolean; logLevel: string; config?: string; nodeId?: number }

function pidFile(stateDir: string): string {
  return path.join(stateDir, 'dve.pid');
}

function runningPid(stateDir: string): number | null {
  try {
    const pid = Number(fs.readFileSync(pidFile(stateDir), 'utf8').trim());
    return processAlive(pid) ? pid : null;
  } catch {
    return null;
  }
}

export async function runUp(o: UpOptions, onStop: (log: ReturnType<typeof createLogger>, stop: () => Promise<void>) => void): Promise<void> {
  const stateDir = path.resolve(o.stateDir);
  fs.mkdirSync(stateDir, { recursive: true });
  const pid = runningPid(stateDir);
  if (pid !== null) {
    process.stderr.write(`dve up: already running (pid ${pid}, state dir ${stateDir}); stop it with: dve down --state-dir ${o.stateDir}\n`);
    process.exit(1);
  }
  if (o.detach) return detach(o, stateDir);
  const log = createLogger(o.logLevel);
  let node;
  try {
    const config = o.config ? loadConfig(o.config) : defaultConfig(stateDir, o.port);
    node = await startNode({
      config, nodeId: o.nodeId ?? config.nodes[0]!.id, stateDir, log,
      firstBootVolumes: o.config ? [] : [DEFAULT_VOLUME],
    });
  } catch (e) {
    process.stderr.write(`dve up: ${(e as Error).message}\n`);
    process.exit(1);
  }
  fs.writeFileSync(pidFile(stateDir), `${process.pid}\n`);
  const running = node;
  process.stdout.write(`dve up: node ${running.engine.nodeInfo!.id} (pid ${process.pid}), state directory ${stateDir}\n`);
  process.stdout.write(`  admin: 127.0.0.1:${running.adminPort}   (dve status --state-dir ${o.stateDir})\n`);
  for (const v of running.engine.listVolumes()) {
    process.stdout.write(attachHelp(v.name, v.sizeBytes, `${v.layout} volume`, v.uris, running.nbdPort, '127.0.0.1') + '\n');
  }
  onStop(log, async () => {
    await running.stop();
    fs.rmSync(pidFile(stateDir), { force: true });
  });
}

/** Re-run `dve up` in the background, logging to the state directory; return once it serves. */
async function detach(o: UpOptions, stateDir: string): Promise<void> {
  const logPath = path.join(stateDir, 'dve.log');
  const out = fs.openSync(logPath, 'a');
  const bin = fileURLToPath(new URL('../../../bin/dve.js', import.meta.url));
  const args = [bin, 'up', '--state-dir', stateDir, '--port', String(o.port), '--bind', o.bind, '--log-level', o.logLevel];
  if (o.config) args.push('--config', path.resolve(o.config));
  if (o.nodeId !== undefined) args.push('--id', String(o.nodeId));
  const child = spawn(process.execPath, args, {
    detached: true, stdio: ['ignore', out, out],
  });
  child.unref();
  for (let i = 0; i < 100; i++) {
    await new Promise((r) => setTimeout(r, 100));
    if (runningPid(stateDir) === child.pid) {
      process.stdout.write(`dve up: running in the background (pid ${child.pid}); log ${logPath}; stop with: dve down --state-dir ${o.stateDir}\n`);
      return;
    }
    if (child.exitCode !== null) break;
  }
  process.stderr.write(`dve up: the background node did not start; see ${logPath}\n`);
  process.exit(1);
}

export async function runDown(stateDir: string): Promise<number> {
  const pid = runningPid(path.resolve(stateDir));
  if (pid === null) {
    process.stderr.write(`dve down: nothing is running in ${path.resolve(stateDir)}\n`);
    return 1;
  }
  process.kill(pid, 'SIGTERM');
  for (let i = 0; i < 300; i++) {
    await new Promise((r) => setTimeout(r, 100));
    if (!processAlive(pid)) {
      process.stdout.write(`dve down: stopped pid ${pid}\n`);
      return 0;
    }
  }
  process.stderr.write(`dve down: pid ${pid} did not stop within 30 s\n`);
  return 1;
}
