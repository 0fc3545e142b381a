/**
 * `dve serve FILE`: one file or block device as one NBD export, in the foreground.
 * SIGINT/SIGTERM stop accepting, finish in-flight requests, fdatasync, exit 0.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import { FileBackend } from '../storage/file-backend.js';
import { IoBatchQueue } from '../storage/io-batch.js';
import { nativeIoLoadError } from '../storage/native-io.js';
import { ExportRegistry, NbdExport } from '../../nbd/export.js';
import { NbdServer } from '../../nbd/server.js';
import { formatSize } from '../util/size.js';

export interface ServeOptions {
  file: string;
  sizeBytes?: number;
  port: number;
  bind: string;
  unixPath?: string;
  exportName?: string;
  readOnly: boolean;
}

export interface Serving {
  server: NbdServer;
  uris: string[];
  /** The bound TCP port (the real one when 0 was asked for), or null for Unix-only. */
  port: number | null;
  stop(): Promise<void>;
}

export async function startServe(o: ServeOptions, log: Logger): Promise<Serving> {
  if (nativeIoLoadError) log.warn({ err: nativeIoLoadError.message }, 'native I/O addon not loaded: no TRIM, slower I/O');
  const backend = FileBackend.open(o.file, { readOnly: o.readOnly, createSizeBytes: o.sizeBytes, queue: new IoBatchQueue() });
  const name = o.exportName ?? path.basename(o.file);
  const exports = new ExportRegistry();
  exports.add(new NbdExport(name, backend), true);
  const server = new NbdServer(exports, log);
  const listen = await server.listen({ port: o.unixPath && o.port === undefined ? undefined : o.port, host: o.bind, unixPath: o.unixPath });
  const uris: string[] = [];
  const enc = encodeURIComponent(name);
  if (listen.port !== null) uris.push(`nbd://${uriHost(o.bind)}:${listen.port}/${enc}`);
  if (o.unixPath) uris.push(`nbd+unix:///${enc}?socket=${path.resolve(o.unixPath)}`);
  log.info({ file: backend.path, sizeBytes: backend.sizeBytes, export: name, readOnly: o.readOnly, uris }, 'serving');
  let stopping: Promise<void> | null = null;
  return {
    server,
    uris,
    port: listen.port,
    stop: () => (stopping ??= (async () => {
      await server.close();
      await backend.close();
    })()),
  };
}

function uriHost(bind: string): string {
  if (bind === '0.0.0.0' || bind === '::') return '127.0.0.1';
  return bind.includes(':') ? `[${bind}]` : bind;
}

/** What a user needs on start: where it is and how to attach it. */
export function attachHelp(name: string, sizeBytes: number, file: string, uris: string[], port: number | null, host: string): string {
  const lines = [`dve: serving ${file} (${formatSize(sizeBytes)}) as export "${name}"`];
  for (const u of uris) lines.push(`  ${u}`);
  const uri = uris[0]!;
  if (port !== null) lines.push(`  attach with nbd-client:   nbd-client ${host} ${port} /dev/nbd0 -N ${name}`);
  lines.push(`  attach without nbd module: mkdir -p /mnt/dve && nbdfuse /mnt/dve '${uri}' & losetup -f --show /mnt/dve/nbd`);
  lines.push(`  attach with QEMU:          qemu-system-x86_64 -drive file=${uri},format=raw,if=virtio`);
  return lines.join('\n');
}
