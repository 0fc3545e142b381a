/**
 * The `dve` command line. Each subcommand validates its arguments and names the bad
 * one in its error; parsing is commander's job.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { createLogger } from '../log.js';
import { parseSize } from '../util/size.js';
import { attachHelp, startServe } from './serve.js';
import { runUp, runDown } from './up.js';
import { registerAdminCommands } from './admin-commands.js';

const program = new Command();
program
  .name('dve')
  .description('dve: a distributed virtualization engine for block storage, served over NBD')
  .version('0.1.0')
  .showHelpAfterError('(run with --help for usage)')
  .configureOutput({ outputError: (s, write) => write(s) });

const sizeArg = (what: string) => (v: string): number => {
  try {
    return parseSize(v, what);
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
};
const portArg = (v: string): number => {
  const n = Number(v);
  if (!/^\d+$/.test(v) || n > 65535) throw new InvalidArgumentError(`"${v}" is not a TCP port (0-65535; 0 picks a free one)`);
  return n;
};
const logLevelOption = (): Option => new Option('--log-level <level>', 'log level').choices(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']).default(process.env.DVE_LOG_LEVEL ?? 'info');

program
  .command('serve')
  .description('serve one raw file or block device as an NBD export (foreground)')
  .argument('<file>', 'raw file or block device (e.g. /dev/loop0)')
  .option('--size <size>', 'create FILE as a sparse file of this size if missing (512M, 1G, 1GiB)', sizeArg('--size'))
  .option('--port <port>', 'TCP port (0 picks a free one)', portArg, 10809)
  .option('--bind <address>', 'address to listen on', '127.0.0.1')
  .option('--unix <path>', 'also listen on this Unix socket')
  .option('--export <name>', 'export name (default: the file\'s base name; "" reaches it too)')
  .option('--read-only', 'refuse writes', false)
  .addOption(logLevelOption())
  .action(async (file: string, o: { size?: number; port: number; bind: string; unix?: string; export?: string; readOnly: boolean; logLevel: string }) => {
    const log = createLogger(o.logLevel);
    let serving;
    try {
      serving = await startServe({ file, sizeBytes: o.size, port: o.port, bind: o.bind, unixPath: o.unix, exportName: o.export, readOnly: o.readOnly }, log);
    } catch (e) {
      process.stderr.write(`dve serve: ${(e as Error).message}\n`);
      process.exit(1);
    }
    const exp = serving.server.exports.list()[0]!;
    process.stdout.write(attachHelp(exp.name, exp.sizeBytes, exp.description, serving.uris, serving.port, o.bind) + '\n');
    onStopSignal(log, () => serving.stop());
  });

program
  .command('up')
  .description('bring up the main job: a node serving its volumes (the embedded default without --config)')
  .option('--state-dir <dir>', 'state directory', process.env.DVE_STATE_DIR ?? './dve-state')
  .option('--port <port>', 'NBD TCP port', portArg, 10809)
  .option('--bind <address>', 'address to listen on', '127.0.0.1')
  .option('--config <file>', 'node configuration (YAML or JSON); default: the embedded default in --state-dir')
  .option('--id <n>', 'which node of the configuration this is (default: the first)', (v: string) => {
    if (!/^\d+$/.test(v)) throw new InvalidArgumentError(`"${v}" is not a node id`);
    return Number(v);
  })
  .option('--detach', 'run in the background; `dve down` stops it', false)
  .addOption(logLevelOption())
  .action(async (o: { stateDir: string; port: number; bind: string; detach: boolean; logLevel: string; config?: string; id?: number }) => {
    (o as { nodeId?: number }).nodeId = o.id;
    await runUp(o, onStopSignal);
  });

program
  .command('down')
  .description('stop the main job started by `dve up`')
  .option('--state-dir <dir>', 'state directory', process.env.DVE_STATE_DIR ?? './dve-state')
  .action(async (o: { stateDir: string }) => {
    process.exitCode = await runDown(o.stateDir);
  });

registerAdminCommands(program);

/** SIGINT/SIGTERM: graceful stop, exit 0; a second signal exits at once. */
function onStopSignal(log: ReturnType<typeof createLogger>, stop: () => Promise<void>): void {
  let stopping = false;
  const handler = (signal: NodeJS.Signals): void => {
    if (stopping) {
      log.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    log.info({ signal }, 'stopping: finishing in-flight requests');
    stop().then(
      () => {
        log.info('stopped');
        process.exit(0);
      },
      (err: Error) => {
        log.error({ err: err.message }, 'error while stopping');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
}

program.parseAsync(process.argv).catch((e: Error) => {
  process.stderr.write(`dve: ${e.message}\n`);
  process.exit(1);
});
