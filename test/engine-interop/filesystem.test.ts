// ext4 on dve volumes the way a host without the nbd kernel module uses them:
// nbdfuse exposes the volume as a file, a loop device turns it into a block device,
// ext4 goes on top. Everything is attached twice (write, detach all, reattach, verify)
// so the second round reads what the engine stored, not the kernel's page cache.
import test from 'ava';
import path from 'node:path';
import { tempDir } from '../helpers/exec.js';
import { MiB } from '../helpers/clients.js';
import {
  CleanupStack, attachNbdBlockDevice, ext4RoundTrip, fileDisks, logEngineNodesOnFailure, startNodeWithDisks,
} from '../helpers/engine-node.js';
import type { Layout } from '../../src/engine/admin-api.js';

logEngineNodesOnFailure(test);

const SIZE = 256 * MiB;

for (const layout of ['striped', 'mirrored'] as Layout[]) {
  test.serial(`ext4 on a ${layout} volume via nbdfuse + loop: mkfs, write, fsck clean, remount, checksums match`, async (t) => {
    const started = Date.now();
    const dir = tempDir(t, `dve-fs-${layout}-`);
    const cleanup = new CleanupStack(t);
    const node = await startNodeWithDisks(t, cleanup, dir, { disks: fileDisks(4, '1G') });
    const name = `fs-${layout}`;
    await node.admin.createVolume({ name, sizeBytes: SIZE, layout });
    const uri = node.uri(name);

    await ext4RoundTrip(t, cleanup, dir, (round) => attachNbdBlockDevice(cleanup, uri, path.join(dir, `fuse${round}`), SIZE));

    if (layout === 'mirrored') {
      const rep = await node.admin.verifyVolume(name);
      t.deepEqual(rep.mismatches, [], `verify after the filesystem round trip: ${JSON.stringify(rep)}`);
    }
    const v = await node.admin.showVolume(name);
    t.is(v.state, 'ok');
    t.true(node.alive(), 'the node is still running');
    t.log(`${layout}: fpShare ${v.fp.fpShare.toFixed(4)}, faults ${JSON.stringify(v.fp.faults)}; ${((Date.now() - started) / 1000).toFixed(1)} s`);
  });
}
