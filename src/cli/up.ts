/**
 * `dve up` / `dve down`: the main job on the embedded default. Today that is one
 * node serving the default volume, a sparse file in the state directory; the
 * engine and cluster grow it into volumes over disks and a 3-node cluster.
 */
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createLogger } from '../log.js';
import { attachHelp, startServe } from './serve.js';

export const DEFAULT_VOLUME_BYTES = 1024 ** 3;
export const DEFAULT_VOLUME_NAME = 'default';

interface UpOptions { stateDir: string; port: number; bind: string; detach: boolean; logLevel: string }

function pidFile(stateDir: string): string {
  return path.join(stateDir, 'dve.pid');
}

function runningPid(stateDir: string): number | null {
  try {
    const pid = Number(fs.readFileSync(pidFile(stateDir), 'utf8').trim());
    if (!Number.isInteger(pid) || pid <= 0) return null;
    process.kill(pid, 0);
    return pid;
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
  const file = path.join(stateDir, 'volumes', `${DEFAULT_VOLUME_NAME}.img`);
  const serving = await startServe({
    file, sizeBytes: fs.existsSync(file) ? undefined : DEFAULT_VOLUME_BYTES,
    port: o.port, bind: o.bind, exportName: DEFAULT_VOLUME_NAME, readOnly: false,
  }, log).catch((e: Error) => {
    process.stderr.write(`dve up: ${e.message}\n`);
    process.exit(1);
  });
  fs.writeFileSync(pidFile(stateDir), `${process.pid}\n`);
  const exp = serving.server.exports.list()[0]!;
  process.stdout.write(`dve up: state directory ${stateDir} (pid ${process.pid})\n`);
  process.stdout.write(attachHelp(exp.name, exp.sizeBytes, exp.description, serving.uris, serving.port, o.bind) + '\n');
  onStop(log, async () => {
    await serving.stop();
    fs.rmSync(pidFile(stateDir), { force: true });
  });
}

/** Re-run `dve up` in the background, logging to the state directory; return once it serves. */
async function detach(o: UpOptions, stateDir: string): Promise<void> {
  const logPath = path.join(stateDir, 'dve.log');
  const out = fs.openSync(logPath, 'a');
  const bin = fileURLToPath(new URL('../../../bin/dve.js', import.meta.url));
  const child = spawn(process.execPath, [bin, 'up', '--state-dir', stateDir, '--port', String(o.port), '--bind', o.bind, '--log-level', o.logLevel], {
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
    try {
      process.kill(pid, 0);
    } catch {
      process.stdout.write(`dve down: stopped pid ${pid}\n`);
      return 0;
    }
  }
  process.stderr.write(`dve down: pid ${pid} did not stop within 30 s\n`);
  return 1;
}
