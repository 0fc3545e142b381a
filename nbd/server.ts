/**
 * The NBD listener: TCP and/or a Unix socket, a Connection per client, and a
 * graceful stop (stop accepting, let every connection answer what it has in
 * flight, close).
 */
import net from 'node:net';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { Connection } from './connection.js';
import type { ExportRegistry } from './export.js';

export interface ListenOptions {
  port?: number;
  host?: string;
  unixPath?: string;
}

export class NbdServer {
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  private unixPath: string | null = null;
  private nextConnectionId = 1;

  constructor(readonly exports: ExportRegistry, private readonly log: Logger) {}

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Listen on TCP (when `port` is given) and on a Unix socket (when `unixPath` is). Resolves to the bound TCP port. */
  async listen(o: ListenOptions): Promise<{ port: number | null }> {
    let port: number | null = null;
    if (o.port !== undefined) {
      const s = this.makeServer();
      await listenOn(s, { port: o.port, host: o.host ?? '127.0.0.1' });
      port = (s.address() as net.AddressInfo).port;
    }
    if (o.unixPath !== undefined) {
      if (fs.existsSync(o.unixPath)) {
        if (!fs.statSync(o.unixPath).isSocket()) throw new Error(`${o.unixPath} exists and is not a socket`);
        fs.unlinkSync(o.unixPath); // a stale socket from a previous run
      }
      const s = this.makeServer();
      await listenOn(s, { path: o.unixPath });
      this.unixPath = o.unixPath;
    }
    return { port };
  }

  private makeServer(): net.Server {
    const s = net.createServer({ allowHalfOpen: true, noDelay: true }, (socket) => {
      const remote = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
      const id = this.nextConnectionId++;
      const c = new Connection(id, socket, this.exports, this.log.child({ conn: id, remote }));
      this.connections.add(c);
      this.log.debug({ conn: c.id, remote }, 'client connected');
      void c.closed.then(() => {
        this.connections.delete(c);
        this.log.debug({ conn: c.id }, 'client disconnected');
      });
    });
    s.on('error', (err) => this.log.error({ err: err.message }, 'listener error'));
    this.servers.push(s);
    return s;
  }

  /** Close every connection to an export that went away (its storage may be reused). */
  closeExport(name: string): number {
    let n = 0;
    for (const c of this.connections) {
      if (c.exportName === name) {
        c.destroy();
        n++;
      }
    }
    if (n > 0) this.log.info({ export: name, connections: n }, 'export removed: connections closed');
    return n;
  }

  /** Stop accepting, drain every connection (bounded by `timeoutMs`), close. */
  async close(timeoutMs = 30_000): Promise<void> {
    await Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    if (this.unixPath) fs.rmSync(this.unixPath, { force: true });
    for (const c of this.connections) c.drainThenClose();
    const all = Promise.all([...this.connections].map((c) => c.closed));
    const timer = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), timeoutMs).unref());
    if ((await Promise.race([all, timer])) === 'timeout') {
      this.log.warn({ connections: this.connections.size }, 'connections did not drain in time; closing them');
      for (const c of this.connections) c.destroy();
    }
  }
}

function listenOn(s: net.Server, opts: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    s.once('error', onError);
    s.listen(opts, () => {
      s.off('error', onError);
      resolve();
    });
  });
}
