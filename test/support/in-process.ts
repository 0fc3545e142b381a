/**
 * An NBD server in the test process, on a real TCP socket on 127.0.0.1 over a real
 * temp file, with an optional fault-injection layer and a captured log.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { FileBackend } from '../../src/storage/file-backend.js';
import { FaultInjectingBackend } from '../../src/storage/fault-injection.js';
import { ExportRegistry, NbdExport } from '../../nbd/export.js';
import { NbdServer } from '../../nbd/server.js';

export interface TestServer {
  port: number;
  file: string;
  faults: FaultInjectingBackend;
  server: NbdServer;
  logs: { level: number; msg: string; [k: string]: unknown }[];
  stop(): Promise<void>;
}

export async function startTestServer(o: { sizeBytes?: number; readOnly?: boolean; name?: string } = {}): Promise<TestServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dve-test-'));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, o.sizeBytes ?? 16 * 1024 * 1024);
  const faults = new FaultInjectingBackend(FileBackend.open(file, { readOnly: o.readOnly }));
  const exports = new ExportRegistry();
  exports.add(new NbdExport(o.name ?? 'disk', faults), true);
  const logs: TestServer['logs'] = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line) logs.push(JSON.parse(line));
      cb();
    },
  });
  const server = new NbdServer(exports, pino({ level: 'debug' }, sink));
  const { port } = await server.listen({ port: 0, host: '127.0.0.1' });
  return {
    port: port!, file, faults, server, logs,
    async stop() {
      await server.close(2000);
      await faults.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
