import fs from 'node:fs';

/**
 * True when a process with this pid exists and is not a zombie. kill(pid, 0) alone
 * is not enough: a SIGKILLed node whose parent never reaps it (PID 1 in a container)
 * stays a zombie, and a pid file naming it must not block a restart.
 */
export function processAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return true; // no /proc: trust kill(0)
  }
}
