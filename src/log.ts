/**
 * Logging: pino, JSON lines on stderr by default (stdout is for what the user asked
 * for: URIs, tables), human-readable when stderr is a terminal. The data path logs
 * only at trace, behind isLevelEnabled.
 */
import pino, { type Logger, type LevelWithSilent } from 'pino';
import pretty from 'pino-pretty';

export const LOG_LEVELS: readonly LevelWithSilent[] = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

export function createLogger(level: string = process.env.DVE_LOG_LEVEL ?? 'info', name = 'dve'): Logger {
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new Error(`--log-level: "${level}" is not one of ${LOG_LEVELS.join(', ')}`);
  }
  const opts = { name, level, base: { pid: process.pid } };
  if (process.stderr.isTTY) {
    return pino(opts, pretty({ destination: 2, sync: true, colorize: true, ignore: 'pid,hostname', translateTime: 'SYS:HH:MM:ss.l' }));
  }
  return pino(opts, pino.destination({ dest: 2, sync: true }));
}
