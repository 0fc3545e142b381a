/**
 * The operator commands: `dve volume …`, `dve disk …` and `dve status`. Each finds the
 * running node through its node file in the state directory (src/admin/node-file.ts),
 * talks to its admin endpoint (src/admin/client.ts) and prints tables or, with --json,
 * the admin API's objects verbatim. Bad arguments name the option and the value;
 * operating errors print the node's message as `dve <command>: <message>` and exit 1.
 */
import { Command, InvalidArgumentError } from 'commander';
import cliProgress from 'cli-progress';
import { AdminClient } from '../admin/client.js';
import { findAdminEndpoint } from '../admin/node-file.js';
import {
  AdminError, LAYOUTS,
  type DiskInfo, type Layout, type NodeStatus, type TaskInfo, type VerifyReport,
  type VolumeCreateRequest, type VolumeInfo,
} from '../engine/admin-api.js';
import { parseSize } from '../util/size.js';
import {
  formatFraction, formatHostPort, formatPercent, formatRate, formatSize, formatSizeExact,
  keyValues, paintState, table, useColor,
} from './format.js';

interface CommonOptions {
  stateDir: string;
  json: boolean;
  node?: number;
}

/** How often `disk online --wait` polls the node. */
const POLL_MS = Number(process.env.DVE_POLL_MS) > 0 ? Number(process.env.DVE_POLL_MS) : 250;

// ---------------------------------------------------------------- argument parsers

const sizeArg = (what: string) => (v: string): number => {
  try {
    return parseSize(v, what);
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
};

const wholeArg = (what: string, min: number) => (v: string): number => {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < min) {
    throw new InvalidArgumentError(`${what}: "${v}" is not a whole number ≥ ${min}`);
  }
  return n;
};

const layoutArg = (v: string): Layout => {
  if (!(LAYOUTS as readonly string[]).includes(v)) {
    throw new InvalidArgumentError(`--layout: "${v}" is not one of ${LAYOUTS.join(', ')}`);
  }
  return v as Layout;
};

const disksArg = (v: string): string[] => {
  const ids = v.split(',').map((s) => s.trim());
  if (ids.some((s) => s === '')) throw new InvalidArgumentError(`--disks: "${v}" is not a comma-separated list of disk ids (e.g. d1,d2)`);
  const dup = ids.find((s, i) => ids.indexOf(s) !== i);
  if (dup !== undefined) throw new InvalidArgumentError(`--disks: "${v}" lists disk ${dup} twice`);
  return ids;
};

const nameArg = (what: string) => (v: string): string => {
  if (v.trim() === '') throw new InvalidArgumentError(`${what}: "${v}" is empty`);
  return v;
};

// ---------------------------------------------------------------- plumbing

function common(cmd: Command): Command {
  return cmd
    .option('--state-dir <dir>', 'state directory of the node to talk to', process.env.DVE_STATE_DIR ?? './dve-state')
    .option('--node <id>', 'which running node to ask (default: the lowest id; any node answers for the cluster)', wholeArg('--node', 0))
    .option('--json', 'print the admin API objects as JSON', false);
}

function printJson(x: unknown): void {
  process.stdout.write(JSON.stringify(x, null, 2) + '\n');
}

function out(s: string): void {
  process.stdout.write(s.endsWith('\n') ? s : s + '\n');
}

/**
 * Finds the node, runs fn, and turns whatever goes wrong into `label: message` on
 * stderr and exit status 1. fn returns the exit status (default 0).
 */
async function withNode(label: string, o: CommonOptions, fn: (client: AdminClient) => Promise<number | void>): Promise<void> {
  try {
    const client = new AdminClient(findAdminEndpoint(o.stateDir, o.node));
    process.exitCode = (await fn(client)) ?? 0;
  } catch (e) {
    const message = e instanceof Error ? e.message : String(e);
    if (o.json && e instanceof AdminError) printJson({ error: { code: e.code, message } });
    process.stderr.write(`${label}: ${message}\n`);
    process.exitCode = 1;
  }
}

// ---------------------------------------------------------------- registration

export function registerAdminCommands(program: Command): void {
  const volume = program.command('volume').description('create, list, show, grow, delete and verify volumes on the running node');

  volume.command('create')
    .description('create a volume and export it over NBD')
    .argument('<name>', 'volume name (also its NBD export name)', nameArg('NAME'))
    .requiredOption('--size <size>', 'volume size (512M, 10G, 1TiB)', sizeArg('--size'))
    .requiredOption('--layout <layout>', `how extents are placed: ${LAYOUTS.join(', ')}`, layoutArg)
    .option('--disks <ids>', 'comma-separated disks to allocate from (default: all online disks)', disksArg)
    .option('--copies <n>', 'mirror sides (mirrored, striped-mirrored; default 2)', wholeArg('--copies', 2))
    .option('--stripe-size <size>', 'stripe width (striped, striped-mirrored; default 64K)', sizeArg('--stripe-size'))
    .option('--columns <n>', 'stripe columns (striped, striped-mirrored)', wholeArg('--columns', 1))
    .option('--journal <size>', 'also append every write to a write journal of this size (two regions, swapped when full)', sizeArg('--journal'))
    .action(async (name: string, o: CommonOptions & { size: number; layout: Layout; disks?: string[]; copies?: number; stripeSize?: number; columns?: number; journal?: number }) => {
      const label = 'dve volume create';
      const mirrored = o.layout === 'mirrored' || o.layout === 'striped-mirrored';
      const striped = o.layout === 'striped' || o.layout === 'striped-mirrored';
      const misfit = [
        o.copies !== undefined && !mirrored ? '--copies' : null,
        o.stripeSize !== undefined && !striped ? '--stripe-size' : null,
        o.columns !== undefined && !striped ? '--columns' : null,
      ].find((x) => x !== null);
      if (misfit) {
        const which = misfit === '--copies' ? 'mirrored and striped-mirrored' : 'striped and striped-mirrored';
        process.stderr.write(`${label}: ${misfit}: applies only to the ${which} layouts, not ${o.layout}\n`);
        process.exitCode = 1;
        return;
      }
      const req: VolumeCreateRequest = { name, sizeBytes: o.size, layout: o.layout };
      if (o.disks) req.disks = o.disks;
      if (o.copies !== undefined) req.copies = o.copies;
      if (o.stripeSize !== undefined) req.stripeBytes = o.stripeSize;
      if (o.columns !== undefined) req.columns = o.columns;
      if (o.journal !== undefined) req.journalBytes = o.journal;
      await withNode(label, o, async (c) => {
        const v = await c.createVolume(req);
        if (o.json) return printJson(v);
        out(`created volume ${v.name}: ${formatSize(v.sizeBytes)}, ${describeLayout(v)}`);
        out(volumeDetails(v));
      });
    });

  volume.command('list')
    .description('list volumes')
    .action(async (o: CommonOptions) => {
      await withNode('dve volume list', o, async (c) => {
        const vols = await c.listVolumes();
        if (o.json) return printJson(vols);
        if (vols.length === 0) return out('no volumes (create one with: dve volume create NAME --size SIZE --layout linear)');
        out(volumeTable(vols));
      });
    });

  volume.command('show')
    .description('show one volume, with its NBD URIs')
    .argument('<name>', 'volume name', nameArg('NAME'))
    .action(async (name: string, o: CommonOptions) => {
      await withNode('dve volume show', o, async (c) => {
        const v = await c.showVolume(name);
        if (o.json) return printJson(v);
        out(volumeDetails(v));
      });
    });

  volume.command('grow')
    .description('grow a volume to a new size')
    .argument('<name>', 'volume name', nameArg('NAME'))
    .requiredOption('--size <size>', 'the new size (larger than the current one)', sizeArg('--size'))
    .action(async (name: string, o: CommonOptions & { size: number }) => {
      await withNode('dve volume grow', o, async (c) => {
        const v = await c.growVolume(name, o.size);
        if (o.json) return printJson(v);
        out(`volume ${v.name} is now ${formatSizeExact(v.sizeBytes)}`);
      });
    });

  volume.command('split')
    .description('split the VSEG holding an offset into two (online, metadata only)')
    .argument('<name>', 'volume name', nameArg('NAME'))
    .requiredOption('--at <offset>', 'byte offset of the new VSEG boundary (a multiple of 4K, e.g. 512M)', sizeArg('--at'))
    .action(async (name: string, o: CommonOptions & { at: number }) => {
      await withNode('dve volume split', o, async (c) => {
        const v = await c.reconfigureVolume(name, { split: o.at });
        if (o.json) return printJson(v);
        out(`volume ${v.name} now has ${plural(v.vsegs, 'vseg')}`);
      });
    });

  volume.command('merge')
    .description('merge VSEG i with the next one (online, metadata only)')
    .argument('<name>', 'volume name', nameArg('NAME'))
    .requiredOption('--vseg <i>', 'index of the left VSEG (0 is the first)', wholeArg('--vseg', 0))
    .action(async (name: string, o: CommonOptions & { vseg: number }) => {
      await withNode('dve volume merge', o, async (c) => {
        const v = await c.reconfigureVolume(name, { merge: o.vseg });
        if (o.json) return printJson(v);
        out(`volume ${v.name} now has ${plural(v.vsegs, 'vseg')}`);
      });
    });

  volume.command('delete')
    .description('delete a volume and free its extents')
    .argument('<name>', 'volume name', nameArg('NAME'))
    .action(async (name: string, o: CommonOptions) => {
      await withNode('dve volume delete', o, async (c) => {
        await c.deleteVolume(name);
        if (o.json) return printJson({ name, deleted: true });
        out(`deleted volume ${name}`);
      });
    });

  volume.command('verify')
    .description('compare the mirror sides of a volume (exit 1 when they differ)')
    .argument('<name>', 'volume name', nameArg('NAME'))
    .action(async (name: string, o: CommonOptions) => {
      await withNode('dve volume verify', o, async (c) => {
        const r = await c.verifyVolume(name);
        if (o.json) printJson(r);
        else out(verifyText(r));
        return r.mismatches.length > 0 ? 1 : 0;
      });
    });

  const disk = program.command('disk').description('list disks, take them offline and bring them back');

  disk.command('list')
    .description('list disks')
    .action(async (o: CommonOptions) => {
      await withNode('dve disk list', o, async (c) => {
        const disks = await c.listDisks();
        if (o.json) return printJson(disks);
        if (disks.length === 0) return out('no disks');
        out(diskTable(disks, true));
      });
    });

  disk.command('offline')
    .description('take a disk offline (mirrored volumes keep running, degraded)')
    .argument('<id>', 'disk id', nameArg('ID'))
    .action(async (id: string, o: CommonOptions) => {
      await withNode('dve disk offline', o, async (c) => {
        const d = await c.offlineDisk(id);
        if (o.json) return printJson(d);
        out(`disk ${d.id} is ${d.state}`);
      });
    });

  disk.command('online')
    .description('bring a disk back; its mirror sides resync in the background')
    .argument('<id>', 'disk id', nameArg('ID'))
    .option('--wait', 'wait for the resync to finish, showing progress', false)
    .action(async (id: string, o: CommonOptions & { wait: boolean }) => {
      await withNode('dve disk online', o, async (c) => {
        const task = await c.onlineDisk(id);
        if (!task) {
          if (o.json) return printJson(null);
          return out(`disk ${id} is online; nothing to resync`);
        }
        if (!o.wait) {
          if (o.json) return printJson(task);
          return out(`disk ${id} is online; resyncing ${formatSize(task.totalBytes)} in the background (task ${task.id}; follow it with: dve status)`);
        }
        const final = await waitForTask(c, task, o.json);
        if (o.json) printJson(final);
        else if (final.state === 'done') out(`disk ${id} is online; resync of ${formatSize(final.totalBytes)} done`);
        if (final.state !== 'done') {
          process.stderr.write(`dve disk online: resync task ${final.id} ${final.state}${final.message ? `: ${final.message}` : ''}\n`);
          return 1;
        }
      });
    });

  program.command('migrate')
    .description('move a volume to other disks while hosts keep doing I/O (a background task; resumed by another node if this one dies)')
    .argument('<volume>', 'volume name', nameArg('VOLUME'))
    .requiredOption('--to <disks>', 'comma-separated destination disks', disksArg)
    .option('--wait', 'wait for the migration to finish, showing progress', false)
    .action(async (volume: string, o: CommonOptions & { to: string[]; wait: boolean }) => {
      await withNode('dve migrate', o, async (c) => {
        const task = await c.migrateVolume(volume, o.to);
        if (!o.wait) {
          if (o.json) return printJson(task);
          return out(`migrating ${volume} to ${o.to.join(',')} in the background (task ${task.id}; follow it with: dve status)`);
        }
        const final = await waitForTask(c, task, o.json);
        if (o.json) printJson(final);
        else if (final.state === 'done') out(`volume ${volume} is on ${o.to.join(',')}`);
        if (final.state !== 'done') {
          process.stderr.write(`dve migrate: task ${final.id} ${final.state}${final.message ? `: ${final.message}` : ''}\n`);
          return 1;
        }
      });
    });

  const task = program.command('task').description('background tasks (resync, migration, snapshot completion)');
  task.command('cancel')
    .description('stop a running task (ask the node that runs it: dve status shows which); a migration resumes with the same dve migrate')
    .argument('<id>', 'task id (from dve status --json)', nameArg('ID'))
    .action(async (id: string, o: CommonOptions) => {
      await withNode('dve task cancel', o, async (c) => {
        const t = await c.cancelTask(id);
        if (o.json) return printJson(t);
        out(`task ${t.id} (${t.kind} of ${t.target}) stops at its next step`);
      });
    });

  const snapshot = program.command('snapshot').description('copy-on-write snapshots: instant, read-only, exported over NBD under their own name');
  snapshot.command('create')
    .description('snapshot VOL as NAME; with --group, snapshot several volumes at one instant (named VOL.NAME)')
    .argument('<volume>', 'the volume to snapshot (with --group: the snapshot name suffix)', nameArg('VOLUME'))
    .argument('[name]', 'snapshot name (omit with --group)')
    .option('--group <volumes>', 'comma-separated volumes to snapshot together (a consistency group: I/O to all of them is paused on every node meanwhile)', disksArg)
    .option('--timeout <ms>', 'give up (and resume I/O) if the nodes do not all pause within this long', wholeArg('--timeout', 1), 10_000)
    .option('--complete', 'also start the background task that copies every shared unit (the snapshot then no longer depends on its origin)', false)
    .action(async (first: string, second: string | undefined, o: CommonOptions & { group?: string[]; timeout: number; complete: boolean }) => {
      const label = 'dve snapshot create';
      // dve snapshot create VOLUME NAME, or dve snapshot create --group VOL,VOL NAME
      if ((second === undefined) === (o.group === undefined)) {
        process.stderr.write(`${label}: give either VOLUME NAME, or --group VOL,VOL… NAME\n`);
        process.exitCode = 1;
        return;
      }
      const name = o.group ? first : second!;
      if (name.trim() === '') {
        process.stderr.write(`${label}: NAME is empty\n`);
        process.exitCode = 1;
        return;
      }
      const pairs = o.group ? o.group.map((v) => ({ volume: v, name: `${v}.${name}` })) : [{ volume: first, name }];
      await withNode(label, o, async (c) => {
        const snaps = await c.createSnapshots(pairs, o.timeout);
        const tasks = o.complete ? await Promise.all(snaps.map((s) => c.completeSnapshot(s.name))) : [];
        if (o.json) return printJson(o.complete ? { snapshots: snaps, tasks } : snaps);
        for (const s of snaps) out(`created snapshot ${s.name} of ${s.base} (${formatSize(s.sizeBytes)}; read-only at ${s.uris.join(' ') || '(not exported)'})`);
        for (const t of tasks) out(`completing ${t.target} in the background (task ${t.id})`);
      });
    });
  snapshot.command('list')
    .description('list snapshots and clones')
    .action(async (o: CommonOptions) => {
      await withNode('dve snapshot list', o, async (c) => {
        const snaps = await c.listSnapshots();
        if (o.json) return printJson(snaps);
        if (snaps.length === 0) return out('no snapshots or clones (create one with: dve snapshot create VOL NAME)');
        out(table(
          ['NAME', 'KIND', 'BASE', { header: 'SIZE', align: 'right' }, { header: 'SHARED', align: 'right' }, { header: 'ALLOCATED', align: 'right' }, 'CREATED'],
          snaps.map((s) => [s.name, s.kind ?? '-', s.base ?? '-', formatSize(s.sizeBytes), formatSize(s.sharedBytes ?? 0), formatSize(s.allocatedBytes), s.createdAt ?? '-']),
        ));
      });
    });
  snapshot.command('delete')
    .description('delete a snapshot (or clone) and free its space')
    .argument('<name>', 'snapshot name', nameArg('NAME'))
    .action(async (name: string, o: CommonOptions) => {
      await withNode('dve snapshot delete', o, async (c) => {
        const v = await c.showVolume(name);
        if (v.kind !== 'snapshot' && v.kind !== 'clone') throw new AdminError('EINVAL', `${name} is a volume, not a snapshot (delete it with: dve volume delete ${name})`);
        await c.deleteVolume(name);
        if (o.json) return printJson({ name, deleted: true });
        out(`deleted ${v.kind} ${name}`);
      });
    });
  snapshot.command('complete')
    .description('copy every unit a snapshot still shares with its origin (background task)')
    .argument('<name>', 'snapshot name', nameArg('NAME'))
    .action(async (name: string, o: CommonOptions) => {
      await withNode('dve snapshot complete', o, async (c) => {
        const t = await c.completeSnapshot(name);
        if (o.json) return printJson(t);
        out(`completing snapshot ${name}: ${formatSize(t.totalBytes)} to copy (task ${t.id}; follow it with: dve status)`);
      });
    });

  const clone = program.command('clone').description('writable clones (redirect-on-write) sharing one read-only base');
  clone.command('create')
    .description('create a writable clone NEW of a snapshot (or of a volume, through a new snapshot NEW.base)')
    .argument('<source>', 'snapshot or volume', nameArg('SOURCE'))
    .argument('<name>', 'clone name (also its NBD export name)', nameArg('NAME'))
    .action(async (source: string, name: string, o: CommonOptions) => {
      await withNode('dve clone create', o, async (c) => {
        const v = await c.createClone(source, name);
        if (o.json) return printJson(v);
        out(`created clone ${v.name} of ${v.base}`);
        out(volumeDetails(v));
      });
    });

  const status = program
    .command('status')
    .description('nodes, volumes, disks and background tasks of the running node')
    .action(async (o: CommonOptions) => {
      await withNode('dve status', o, async (c) => {
        const s = await c.status();
        if (o.json) return printJson(s);
        out(statusText(s));
      });
    });

  // Listed after each command's own options in --help.
  for (const cmd of [...volume.commands, ...disk.commands, ...snapshot.commands, ...clone.commands, ...task.commands, status, program.commands.find((c) => c.name() === 'migrate')!]) common(cmd);
}

// ---------------------------------------------------------------- --wait

/**
 * Polls status until the task is no longer running. On a terminal: a progress bar on
 * stderr; otherwise a line per 10% (on stdout, or stderr under --json).
 */
async function waitForTask(c: AdminClient, first: TaskInfo, json: boolean): Promise<TaskInfo> {
  const tty = !!process.stderr.isTTY;
  const lineOut = json ? process.stderr : process.stdout;
  let bar: cliProgress.SingleBar | null = null;
  let lastDecile = -1;
  const show = (t: TaskInfo): void => {
    // (cli-progress reserves {total}, {value}, {eta}: these names stay clear of them)
    const payload = {
      target: t.target, doneSize: formatSize(t.doneBytes), totalSize: formatSize(t.totalBytes),
      rate: formatRate(t.rateBytesPerSec), left: formatEta(t),
    };
    if (tty) {
      if (!bar) {
        bar = new cliProgress.SingleBar({
          format: 'resync {target} [{bar}] {percentage}% | {doneSize} / {totalSize} | {rate} | {left}',
          stream: process.stderr,
          hideCursor: true,
          clearOnComplete: false,
        }, cliProgress.Presets.shades_classic);
        bar.start(100, 0, payload);
      }
      bar.update(Math.floor(Math.min(100, t.percent)), payload);
      return;
    }
    const decile = Math.floor(Math.min(100, Math.max(0, t.percent)) / 10);
    if (decile > lastDecile) {
      lastDecile = decile;
      lineOut.write(`resync ${t.target}: ${formatPercent(t.percent)} (${payload.doneSize} of ${payload.totalSize}, ${payload.rate})\n`);
    }
  };
  // Ctrl-C stops the waiting, not the resync: put the cursor back and say so.
  const onInterrupt = (): void => {
    (bar as cliProgress.SingleBar | null)?.stop();
    process.stderr.write(`\ndve disk online: stopped waiting; the resync (task ${first.id}) continues on the node (see dve status)\n`);
    process.exit(130);
  };
  process.once('SIGINT', onInterrupt);
  let task = first;
  try {
    for (;;) {
      if (task.state === 'running') show(task);
      else {
        if (task.state === 'done') show({ ...task, percent: 100 });
        return task;
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
      const s = await c.status();
      // A task set resumed by another node (its node died) continues under a new id there.
      task = s.tasks.find((t) => t.id === first.id)
        ?? s.tasks.find((t) => t.kind === first.kind && t.target === first.target && t.state === 'running')
        ?? s.tasks.find((t) => t.kind === first.kind && t.target === first.target && t.startedAt >= first.startedAt && t.state === 'done')
        ?? vanished(first, s);
    }
  } finally {
    process.off('SIGINT', onInterrupt);
    (bar as cliProgress.SingleBar | null)?.stop();
  }
}

/** "about 2m 5s left" from the task's own rate; "" when it cannot tell. */
function formatEta(t: TaskInfo): string {
  const left = t.totalBytes - t.doneBytes;
  if (t.state !== 'running' || left <= 0 || !(t.rateBytesPerSec > 0)) return '';
  const s = Math.ceil(left / t.rateBytesPerSec);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return `about ${h > 0 ? `${h}h ${m}m` : m > 0 ? `${m}m ${s % 60}s` : `${s}s`} left`;
}

/** The node stopped listing the task: judge by the disk and its volumes. */
function vanished(task: TaskInfo, s: NodeStatus): TaskInfo {
  const resyncing = s.volumes.some((v) => v.state === 'resyncing');
  const failed = s.disks.some((d) => task.target === `disk ${d.id}` && d.state !== 'online');
  const ok = !resyncing && !failed;
  return {
    ...task,
    state: ok ? 'done' : 'failed',
    percent: ok ? 100 : task.percent,
    doneBytes: ok ? task.totalBytes : task.doneBytes,
    message: ok ? null : 'the node no longer lists the task and the volumes are not back in sync; see dve status',
  };
}

// ---------------------------------------------------------------- text output

function describeLayout(v: VolumeInfo): string {
  const parts: string[] = [];
  if (v.layout === 'mirrored' || v.layout === 'striped-mirrored') parts.push(`${v.copies} copies`);
  if (v.layout === 'striped' || v.layout === 'striped-mirrored') {
    parts.push(`${v.columns} columns`);
    if (v.stripeBytes !== null) parts.push(`${formatSize(v.stripeBytes)} stripes`);
  }
  return parts.length > 0 ? `${v.layout} (${parts.join(', ')})` : v.layout;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

function totalFaults(v: VolumeInfo): number {
  return Object.values(v.fp.faults).reduce((a, b) => a + b, 0);
}

function volumeTable(vols: VolumeInfo[]): string {
  return table(
    ['NAME', { header: 'SIZE', align: 'right' }, 'LAYOUT', { header: 'COPIES', align: 'right' }, 'STATE', 'DISKS',
      { header: 'ALLOCATED', align: 'right' }, { header: 'FP SHARE', align: 'right' }],
    vols.map((v) => [v.name, formatSize(v.sizeBytes), v.layout, v.copies, v.state, v.disks.join(',') || '-',
      formatSize(v.allocatedBytes), formatFraction(v.fp.fpShare)]),
  );
}

function volumeDetails(v: VolumeInfo): string {
  const color = useColor();
  const faults = Object.entries(v.fp.faults).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`);
  const pairs: [string, string | number][] = [
    ['name', v.name],
    ['size', formatSizeExact(v.sizeBytes)],
    ['layout', describeLayout(v)],
    ...(v.kind && v.kind !== 'volume' ? [['kind', `${v.kind} of ${v.base ?? '-'}${v.readOnly ? ' (read-only)' : ''}, ${formatSize(v.sharedBytes ?? 0)} still shared`] as [string, string]] : []),
    ['state', paintState(v.state, color)],
    ['disks', v.disks.join(', ') || '-'],
    ['allocated', `${formatSize(v.allocatedBytes)} in ${plural(v.extents, 'extent')}, ${plural(v.vsegs, 'vseg')}`],
    ['fast path', `${formatFraction(v.fp.fpShare)} hits (${v.fp.hits} hits, ${totalFaults(v)} faults${faults.length ? `: ${faults.join(', ')}` : ''})`],
    ['', `${v.fp.cachedMappings} cached mappings, ${v.fp.cpDispatched} sent to the control path, pending ${v.fp.pendingUpstream} up / ${v.fp.pendingDownstream} down`],
  ];
  const uris = v.uris.length > 0 ? v.uris : ['(not exported)'];
  uris.forEach((u, i) => pairs.push([i === 0 ? 'uris' : '', u]));
  return keyValues(pairs);
}

function diskTable(disks: DiskInfo[], withPath: boolean): string {
  const cols = ['ID', 'STATE', { header: 'FREE', align: 'right' as const }, { header: 'TOTAL', align: 'right' as const },
    { header: 'USED', align: 'right' as const }, { header: 'EXTENTS', align: 'right' as const }];
  return table(
    withPath ? [...cols, 'PATH'] : cols,
    disks.map((d) => {
      const total = d.extents * d.extentBytes;
      const free = d.freeExtents * d.extentBytes;
      const row: (string | number)[] = [d.id, d.state, formatSize(free), formatSize(total),
        d.extents > 0 ? formatFraction((d.extents - d.freeExtents) / d.extents) : '-', `${d.extents - d.freeExtents}/${d.extents}`];
      if (withPath) row.push(d.blockDevice ? `${d.path} (block device)` : d.path);
      return row;
    }),
  );
}

function verifyText(r: VerifyReport): string {
  if (r.mismatches.length === 0 && r.comparedBytes === 0) return `volume ${r.volume}: no mirror sides to compare`;
  if (r.mismatches.length === 0) {
    return `volume ${r.volume}: mirror sides agree (${formatSize(r.comparedBytes)} compared)`;
  }
  const differing = r.mismatches.reduce((a, m) => a + m.lengthBytes, 0);
  const head = `volume ${r.volume}: ${r.mismatches.length} mismatched range${r.mismatches.length === 1 ? '' : 's'}, ` +
    `${formatSize(differing)} of ${formatSize(r.comparedBytes)} compared`;
  return `${head}\n${table(
    [{ header: 'OFFSET', align: 'right' }, { header: 'LENGTH', align: 'right' }, 'SIDES DIFFERING FROM SIDE 0'],
    r.mismatches.map((m) => [m.offsetBytes, m.lengthBytes, m.sides.join(',')]),
  )}`;
}

/** "Sharing 3, Acquired 1": the oplock states a node is in, the empty ones left out. */
function formatOplocks(o: Record<string, number> | undefined): string {
  if (!o) return '-';
  const parts = Object.entries(o).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`);
  return parts.length > 0 ? parts.join(', ') : 'none';
}

function statusText(s: NodeStatus): string {
  const sections: string[] = [];
  sections.push('NODES\n' + (s.nodes.length === 0 ? '(none)' : table(
    ['ID', 'PID', 'STATE', 'NBD', 'ADMIN', { header: 'BOOT', align: 'right' }, 'OPLOCKS', { header: 'JOURNAL', align: 'right' }, 'STARTED'],
    s.nodes.map((n) => [n.id, n.pid ?? '-', n.state, formatHostPort(n.nbd), formatHostPort(n.admin), n.boot ?? '-', formatOplocks(n.oplocks),
      n.journalRecords ?? '-', n.startedAt ?? '-']),
  )));
  if (s.cluster) {
    const c = s.cluster;
    const r = c.recovery;
    sections.push(`CLUSTER\nevictor node ${c.evictor}, ${c.quorum ? 'quorum' : 'NO QUORUM (evictions suspended)'}; ` +
      `${r.evictions} eviction(s) seen, ${r.reconciledExtents} extent(s) reconciled (${formatSize(r.reconciledBytes)}); ` +
      `mesh ${c.messages.sent} sent / ${c.messages.received} received / ${c.messages.rejected} rejected` +
      (c.paused.length > 0 ? `\npaused: ${c.paused.map((p) => `${p.volumes.join(',')} (op ${p.op} since ${p.since})`).join('; ')}` : ''));
  }
  sections.push('VOLUMES\n' + (s.volumes.length === 0 ? '(none)' : table(
    ['NAME', { header: 'SIZE', align: 'right' }, 'LAYOUT', 'STATE', 'NODES', { header: 'FP SHARE', align: 'right' }, { header: 'FAULTS', align: 'right' }],
    s.volumes.map((v) => [v.name, formatSize(v.sizeBytes), v.layout, v.state, v.nodes?.join(',') ?? '-', formatFraction(v.fp.fpShare), totalFaults(v)]),
  )));
  sections.push('DISKS\n' + (s.disks.length === 0 ? '(none)' : diskTable(s.disks, false)));
  sections.push('TASKS\n' + (s.tasks.length === 0 ? '(none)' : table(
    ['KIND', 'TARGET', 'STATE', { header: 'PERCENT', align: 'right' }, { header: 'RATE', align: 'right' }],
    s.tasks.map((t) => [t.kind, t.target, t.state, formatPercent(t.percent), t.state === 'running' ? formatRate(t.rateBytesPerSec) : '-']),
  )));
  const m = s.metadata;
  sections.push(`METADATA\n${m.path}: ${m.chunksUsed} of ${m.chunkCount} chunks used (${formatSize(m.chunkBytes)} each)`);
  return sections.join('\n\n');
}
