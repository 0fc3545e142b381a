// Every volume layout of a real `dve up` node, through real NBD clients: qemu-io
// pattern writes and reads at offsets that cross stripe (64 KiB) and allocation-extent
// (4 MiB) boundaries, an nbdcopy round trip of random data, nbdinfo's size, the admin
// API's URIs, mirror verification, and the fast path's share of a sequential read pass.
import test from 'ava';
import path from 'node:path';
import type { ExecutionContext } from 'ava';
import { mustRun, tempDir } from '../helpers/exec.js';
import { nbdinfoJson, sha256File, writeRandomFile, MiB, KiB } from '../helpers/clients.js';
import {
  CleanupStack, describeFio, fileDisks, fio, logEngineNodesOnFailure, qemuIoOk, startNodeWithDisks, volumeOf,
} from '../helpers/engine-node.js';
import type { Layout, VolumeInfo } from '../../src/engine/admin-api.js';

logEngineNodesOnFailure(test);

const SIZE = 256 * MiB;
const E = 4 * MiB;

/** [pattern, offset, length]: unaligned, crossing stripes (64K), extents (4M), 16M units (4 columns x 4M), the end. */
const WRITES: [number, number, number][] = [
  [0x11, 0, 4 * KiB],
  [0x22, 64 * KiB - 512, 1024],
  [0x33, E - 12 * KiB, 24 * KiB],
  [0x44, 2 * E - 100 * KiB, 300 * KiB],
  [0x55, 4 * E - 3 * KiB, 6 * KiB + 7],
  [0x66, 8 * E - MiB, 2 * MiB],
  [0x77, 100 * MiB + 12345, 70000],
  [0x88, 192 * MiB - 40 * KiB, 5 * E / 4],
  [0x99, SIZE - 68 * KiB, 68 * KiB],
];

function fpShare(v: VolumeInfo): { hits: number; faults: number } {
  return { hits: v.fp.hits, faults: Object.values(v.fp.faults).reduce((a, b) => a + b, 0) };
}

async function layoutRoundTrip(t: ExecutionContext, layout: Layout): Promise<void> {
  const started = Date.now();
  const dir = tempDir(t, `dve-layout-${layout}-`);
  const cleanup = new CleanupStack(t);
  const node = await startNodeWithDisks(t, cleanup, dir, { disks: fileDisks(4, '1G') });
  const name = `vol-${layout}`;
  const created = await node.admin.createVolume({ name, sizeBytes: SIZE, layout });
  t.is(created.sizeBytes, SIZE);
  t.is(created.layout, layout);
  t.log(`${layout}: copies ${created.copies}, columns ${created.columns}, stripe ${created.stripeBytes}, disks ${created.disks.join(',')}, allocated ${created.allocatedBytes / MiB} MiB`);
  const uri = node.uri(name);

  // The admin API names where it is exported; nbdinfo sees the size.
  const shown = await node.admin.showVolume(name);
  t.deepEqual(shown.uris, [uri], 'GET /v1/volumes/NAME lists the nbd:// URI');
  const info = await nbdinfoJson(uri);
  t.is(info.exports?.[0]?.['export-size'], SIZE, 'nbdinfo export-size');

  // qemu-io: pattern writes crossing boundaries, then (new connection) read them back
  // and check the bytes around each one are still zero.
  await qemuIoOk(t, uri, WRITES.map(([p, off, len]) => `write -P 0x${p.toString(16)} ${off} ${len}`));
  const reads: string[] = [];
  for (const [p, off, len] of WRITES) {
    reads.push(`read -P 0x${p.toString(16)} ${off} ${len}`);
    if (off >= 512) reads.push(`read -P 0 ${off - 512} 512`);
    if (off + len + 512 <= SIZE) reads.push(`read -P 0 ${off + len} 512`);
  }
  // A large read of untouched space across an extent boundary (36M), in one request.
  reads.push(`read -P 0 ${8 * E + MiB} ${4 * MiB}`);
  await qemuIoOk(t, uri, reads);

  // nbdcopy round trip of random data over the whole volume.
  const src = path.join(dir, 'random.bin');
  const srcSum = writeRandomFile(src, SIZE);
  await mustRun('nbdcopy', ['--request-size=65536', '--connections=2', '--requests=16', src, uri], { timeoutSec: 90 });
  const out = path.join(dir, 'back.bin');
  await mustRun('nbdcopy', ['--request-size=65536', '--connections=2', '--requests=16', uri, out], { timeoutSec: 90 });
  t.is(await sha256File(out), srcSum, 'nbdcopy: data read back equals what was written');

  // A steady sequential read pass: the fast path serves it without the control path.
  const before = fpShare(volumeOf(await node.admin.status(), name));
  const r = await fio(uri, dir, 'seqread', ['--rw=read', '--bs=64k', '--iodepth=8', `--size=${SIZE}`, '--verify_state_save=0'], 60);
  t.is(r.result.code, 0, describeFio(r));
  t.is(r.json?.jobs?.[0]?.read?.io_bytes, SIZE, describeFio(r));
  const vAfter = volumeOf(await node.admin.status(), name);
  const after = fpShare(vAfter);
  const dHits = after.hits - before.hits;
  const dFaults = after.faults - before.faults;
  const passShare = dHits / Math.max(1, dHits + dFaults);
  t.log(`${layout}: read pass hits ${dHits}, faults ${dFaults} (share ${passShare.toFixed(4)}); cumulative fpShare ${vAfter.fp.fpShare.toFixed(4)}, faults ${JSON.stringify(vAfter.fp.faults)}`);
  t.true(passShare > 0.9, `FP share of the sequential read pass: ${passShare} (hits ${dHits}, faults ${dFaults})`);
  t.true(vAfter.fp.fpShare > 0.9, `status().volumes[].fp.fpShare = ${vAfter.fp.fpShare} (${JSON.stringify(vAfter.fp)})`);

  // Default nbdcopy requests (256 KiB) span stripes: the control path splits them.
  const out2 = path.join(dir, 'back2.bin');
  await mustRun('nbdcopy', [uri, out2], { timeoutSec: 90 });
  t.is(await sha256File(out2), srcSum, 'nbdcopy with default (stripe-spanning) requests reads the same data');

  if (layout === 'mirrored' || layout === 'striped-mirrored') {
    const rep = await node.admin.verifyVolume(name);
    t.is(rep.comparedBytes > 0, true);
    t.deepEqual(rep.mismatches, [], `verify ${name}: ${JSON.stringify(rep)}`);
    t.is(vAfter.state, 'ok');
  }
  t.true(node.alive(), 'the node is still running');
  t.log(`${layout}: ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

for (const layout of ['linear', 'striped', 'mirrored', 'striped-mirrored'] as Layout[]) {
  test.serial(`${layout} volume: qemu-io patterns across stripes and extents, nbdcopy round trip, nbdinfo size, uris, verify, FP share`, async (t) => {
    await layoutRoundTrip(t, layout);
  });
}
