/** Free TCP ports on loopback for the configurations tests write (mesh peers must know each other's ports). */
import net from 'node:net';
import { HOST } from './server.js';

/** `count` distinct TCP ports that were free on 127.0.0.1 a moment ago (bound together, then closed). */
export async function freePorts(count: number): Promise<number[]> {
  const servers: net.Server[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const s = net.createServer();
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.listen(0, HOST, () => resolve());
      });
      servers.push(s);
    }
    return servers.map((s) => (s.address() as net.AddressInfo).port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
}
