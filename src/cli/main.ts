/**
 * The `dve` command line. Each subcommand validates its arguments and names the bad
 * one in its error; parsing is commander's job.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { createLogger } from '../log.js';
import { parseSize } from '../util/size.js';
import { attachHelp, startServe } from './serve.js';
import { runUp, runDown, runNodeStart, runNodeSignal, type NodeStartOptions, type UpOptions } from './up.js';
import { MAX_NODE_ID } from '../config/config.js';
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

const stateDirOption = (): Option => new Option('--state-dir <dir>', 'state directory').default(process.env.DVE_STATE_DIR ?? './dve-state');
const nodeIdArg = (v: string): number => {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || n > MAX_NODE_ID) throw new InvalidArgumentError(`node id "${v}" is not an integer from 0 to ${MAX_NODE_ID}`);
  return n;
};
/** The options `dve up` and `dve node start` share. */
function startOptions(cmd: Command): Command {
  return cmd
    .addOption(stateDirOption())
    .option('--config <file>', 'cluster configuration (YAML or JSON); default: the embedded default in --state-dir')
    .option('--port <port>', 'base NBD TCP port of the embedded default: node i listens on PORT+i-1 (admin and mesh ports follow from it)', portArg, 10809)
    .option('--bind <address>', 'address to listen on', '127.0.0.1')
    .addOption(logLevelOption());
}

startOptions(program
  .command('up')
  .description('bring up the main job: every node of the configuration, each its own process (the embedded default without --config: nodes 1, 2, 3); in the foreground it supervises them'))
  .option('--detach', 'return once every node serves and leave them running in the background; `dve down` stops them', false)
  .action(async (o: UpOptions) => {
    await runUp(o, onStopSignal);
  });

program
  .command('down')
  .description('stop every node (and the supervisor) started from the state directory')
  .addOption(stateDirOption())
  .action(async (o: { stateDir: string }) => {
    process.exitCode = await runDown(o.stateDir);
  });

const nodeCmd = program.command('node').description('start, stop or kill one node of the cluster (failover drills)');

startOptions(nodeCmd
  .command('start')
  .description('run one node of the configuration in the foreground (pid in STATE-DIR/node-ID.pid)')
  .requiredOption('--id <n>', `which node of the configuration (0-${MAX_NODE_ID})`, nodeIdArg))
  .option('--detach', 'run it in the background (log in STATE-DIR/node-ID.log); returns once it serves, or after 30 s once it runs but still waits for its peers', false)
  .addOption(new Option('--supervised', 'started by a foreground `dve up`: stop when stdin closes').default(false).hideHelp())
  .action(async (o: NodeStartOptions) => {
    await runNodeStart(o, onStopSignal);
  });

nodeCmd
  .command('stop')
  .description('stop one node gracefully (SIGTERM) and wait until it is gone')
  .argument('<id>', `node id (0-${MAX_NODE_ID})`, nodeIdArg)
  .addOption(stateDirOption())
  .action(async (id: number, o: { stateDir: string }) => {
    process.exitCode = await runNodeSignal(o.stateDir, id, 'SIGTERM');
  });

nodeCmd
  .command('kill')
  .description('kill one node abruptly (SIGKILL) and wait until it is gone')
  .argument('<id>', `node id (0-${MAX_NODE_ID})`, nodeIdArg)
  .addOption(stateDirOption())
  .action(async (id: number, o: { stateDir: string }) => {
    process.exitCode = await runNodeSignal(o.stateDir, id, 'SIGKILL');
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

// `dve status | head`: a closed pipe ends the output, not with a stack trace.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw e;
  });
}

program.parseAsync(process.argv).catch((e: Error) => {
  process.stderr.write(`dve: ${e.message}\n`);
  process.exit(1);
});
