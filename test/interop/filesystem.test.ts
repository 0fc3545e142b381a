// A real filesystem on the export, the way a host without the nbd kernel module uses it:
// nbdfuse exposes the export as a file, a loop device turns that into a block device, ext4
// goes on top. Everything is attached twice (write, detach all, reattach, verify) so the
// second round reads what the server stored, not the kernel's page cache.
import test from 'ava';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync, lstatSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { ExecutionContext } from 'ava';
import { describeResult, exitStatus, mountsUnder, mustRun, run, sleep, tempDir } from '../helpers/exec.js';
import { startNbdfuse } from '../helpers/engine-node.js';
import { CleanupStack } from '../helpers/cleanup.js';
import { startTestServer, logServersOnFailure, crashMessage, HOST, type NbdServer } from '../helpers/server.js';
import { makeSparseFile, sha256, MiB, KiB } from '../helpers/clients.js';

logServersOnFailure(test);

const EXPORT_SIZE = 256 * MiB;

interface BlockDevice {
  dev: string;
  /** Strict detach (throws on failure); the forced version is on the cleanup stack. */
  detach(): Promise<void>;
}

function isMounted(dir: string): boolean {
  return mountsUnder(dir).includes(path.resolve(dir));
}

/** nbdfuse on `fuseDir`: the shared helper (test/helpers/engine-node.ts) with this export's size. */
function attachNbdfuse(_t: ExecutionContext, cleanup: CleanupStack, srv: NbdServer, fuseDir: string): Promise<{ file: string; unmount(): Promise<void> }> {
  return startNbdfuse(cleanup, srv.uri, fuseDir, EXPORT_SIZE);
}

async function attachLoop(cleanup: CleanupStack, file: string): Promise<BlockDevice> {
  const r = await mustRun('losetup', ['-f', '--show', '--direct-io=off', file], { timeoutSec: 30 });
  const dev = r.stdout.trim();
  if (!/^\/dev\/loop\d+$/.test(dev)) throw new Error(`losetup printed ${JSON.stringify(r.stdout)}`);
  const dismiss = cleanup.push(`losetup -d ${dev}`, async () => {
    await run('losetup', ['-d', dev], { timeoutSec: 20 });
  });
  return {
    dev,
    async detach() {
      await mustRun('losetup', ['-d', dev], { timeoutSec: 30 });
      dismiss();
    },
  };
}

async function mountFs(cleanup: CleanupStack, dev: string, mnt: string): Promise<{ umount(): Promise<void> }> {
  mkdirSync(mnt, { recursive: true });
  await mustRun('mount', ['-t', 'ext4', dev, mnt], { timeoutSec: 30 });
  const dismiss = cleanup.push(`umount ${mnt}`, async () => {
    if (isMounted(mnt)) await run('umount', ['-l', mnt], { timeoutSec: 20 });
  });
  return {
    async umount() {
      await mustRun('umount', [mnt], { timeoutSec: 60 });
      dismiss();
    },
  };
}

/** Writes a set of files (some MB of random data and a small directory tree); returns relative path → sha256. */
function populate(root: string): Map<string, string> {
  const sums = new Map<string, string>();
  const put = (rel: string, data: Buffer) => {
    const p = path.join(root, rel);
    mkdirSync(path.dirname(p), { recursive: true });
    writeFileSync(p, data);
    sums.set(rel, sha256(data));
  };
  put('big-8M.bin', randomBytes(8 * MiB));
  put('odd-size.bin', randomBytes(5 * MiB + 123));
  for (let i = 0; i < 4; i++) {
    for (let j = 0; j < 6; j++) put(`tree/d${i}/sub${j % 2}/f${j}.dat`, randomBytes(((i * 7 + j * 13) % 64 + 1) * KiB + j));
  }
  put('tree/deep/a/b/c/d/e/leaf.txt', Buffer.from('leaf\n'));
  put('empty.txt', Buffer.alloc(0));
  mkdirSync(path.join(root, 'tree/empty-dir'), { recursive: true });
  sums.set('tree/empty-dir/', 'dir');
  return sums;
}

/** Relative path → sha256 for every file below root ('dir' for empty directories), lost+found excluded. */
function snapshot(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (rel: string) => {
    const entries = readdirSync(path.join(root, rel));
    if (entries.length === 0 && rel !== '') out.set(rel + '/', 'dir');
    for (const name of entries) {
      const r = rel ? `${rel}/${name}` : name;
      if (r === 'lost+found') continue;
      const st = lstatSync(path.join(root, r));
      if (st.isDirectory()) walk(r);
      else out.set(r, sha256(readFileSync(path.join(root, r))));
    }
  };
  walk('');
  return out;
}

function sorted(m: Map<string, string>): Record<string, string> {
  return Object.fromEntries([...m].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/**
 * Round 1: attach, mkfs.ext4, mount, write files, sync, umount, detach everything.
 * Round 2: attach again, fsck.ext4 -fn must be clean, mount, the same files with the same
 * checksums, umount, fsck again, detach.
 */
async function filesystemRoundTrip(t: ExecutionContext, attach: (round: number) => Promise<BlockDevice>, dir: string, cleanup: CleanupStack) {
  const mnt = path.join(dir, 'mnt');

  const dev1 = await attach(1);
  await mustRun('mkfs.ext4', ['-F', '-q', dev1.dev], { timeoutSec: 60 });
  const m1 = await mountFs(cleanup, dev1.dev, mnt);
  const written = populate(mnt);
  await mustRun('sync', [], { timeoutSec: 60 });
  t.deepEqual(sorted(snapshot(mnt)), sorted(written), 'files read back while still mounted');
  await m1.umount();
  const fsck1 = await run('fsck.ext4', ['-fn', dev1.dev], { timeoutSec: 60 });
  t.is(fsck1.code, 0, describeResult(fsck1));
  await dev1.detach();

  const dev2 = await attach(2);
  const fsck2 = await run('fsck.ext4', ['-fn', dev2.dev], { timeoutSec: 60 });
  t.is(fsck2.code, 0, `fsck after reattaching (data from the server):\n${describeResult(fsck2)}`);
  const m2 = await mountFs(cleanup, dev2.dev, mnt);
  t.deepEqual(sorted(snapshot(mnt)), sorted(written), 'files and checksums after detaching and reattaching');
  await m2.umount();
  await dev2.detach();
}

test.serial('ext4 on nbdfuse + loop device: mkfs, write, fsck clean, remount, checksums match', async (t) => {
  const dir = tempDir(t);
  const disk = path.join(dir, 'disk.img');
  makeSparseFile(disk, EXPORT_SIZE);
  const srv = await startTestServer(t, disk);
  const cleanup = new CleanupStack(t); // runs before the server is stopped and the temp dir removed

  await filesystemRoundTrip(
    t,
    async (round) => {
      const fuse = await attachNbdfuse(t, cleanup, srv, path.join(dir, `fuse${round}`));
      const loop = await attachLoop(cleanup, fuse.file);
      return {
        dev: loop.dev,
        async detach() {
          await loop.detach();
          await fuse.unmount();
        },
      };
    },
    dir,
    cleanup,
  );
  t.true(srv.alive(), crashMessage(srv));
});

// With the nbd kernel module (/dev/nbd0 present) the same through nbd-client.
if (existsSync('/dev/nbd0')) {
  test.serial('ext4 on nbd-client /dev/nbdX: mkfs, write, fsck clean, remount, checksums match', async (t) => {
    const dir = tempDir(t);
    const disk = path.join(dir, 'disk.img');
    makeSparseFile(disk, EXPORT_SIZE);
    const srv = await startTestServer(t, disk);
    const cleanup = new CleanupStack(t);

    await filesystemRoundTrip(
      t,
      async () => {
        const dev = freeNbdDevice();
        await mustRun('nbd-client', [HOST, String(srv.port), dev, '-N', srv.exportName], { timeoutSec: 30 });
        const dismiss = cleanup.push(`nbd-client -d ${dev}`, async () => {
          await run('nbd-client', ['-d', dev], { timeoutSec: 20 });
        });
        const deadline = Date.now() + 10_000;
        while (sizeOf(dev) !== EXPORT_SIZE && Date.now() < deadline) await sleep(50);
        t.is(sizeOf(dev), EXPORT_SIZE, `${dev} size`);
        return {
          dev,
          async detach() {
            await mustRun('nbd-client', ['-d', dev], { timeoutSec: 30 });
            dismiss();
          },
        };
      },
      dir,
      cleanup,
    );
    t.true(srv.alive(), crashMessage(srv));
  });
} else {
  console.log('[interop] filesystem: /dev/nbd0 does not exist (no nbd kernel module), so the nbd-client test is not registered');
}

function sizeOf(dev: string): number {
  try {
    return Number(readFileSync(`/sys/block/${path.basename(dev)}/size`, 'utf8').trim()) * 512;
  } catch {
    return -1;
  }
}

function freeNbdDevice(): string {
  for (let i = 0; i < 64; i++) {
    const name = `nbd${i}`;
    if (!existsSync(`/dev/${name}`)) break;
    if (!existsSync(`/sys/block/${name}/pid`) && sizeOf(`/dev/${name}`) === 0) return `/dev/${name}`;
  }
  throw new Error('no free /dev/nbdX device');
}
