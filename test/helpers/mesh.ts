/**
 * Real `Mesh` instances on loopback TCP for unit tests: every node listens on an
 * ephemeral port, and they start highest id first (a mesh dials only higher ids), so
 * each dialer is told the port of a peer that is already listening.
 */
import type { Mesh, NodeId } from '../../cluster/mesh.js';

/** A peer as the node being started sees it: its port, or 0 when it is not listening yet (it dials us). */
export interface MeshPeer {
  id: NodeId;
  port: number;
}

/**
 * Starts one node per id, highest first, with `startOne(id, peers)` (which builds the
 * node, starts its mesh and registers its teardown), its peers being the other ids and
 * `extraPeers`; then waits until every mesh sees every other one of `ids` up.
 */
export async function startMeshes<N extends { mesh: Mesh }>(
  ids: readonly NodeId[],
  startOne: (id: NodeId, peers: MeshPeer[]) => Promise<N>,
  opts: { extraPeers?: readonly NodeId[]; timeoutMs?: number; what?: string } = {},
): Promise<Map<NodeId, N>> {
  const nodes = new Map<NodeId, N>();
  for (const id of [...ids].sort((a, b) => b - a)) {
    const peers = [...ids, ...(opts.extraPeers ?? [])].filter((p) => p !== id).map((p) => ({ id: p, port: nodes.get(p)?.mesh.port ?? 0 }));
    nodes.set(id, await startOne(id, peers));
  }
  const timeoutMs = opts.timeoutMs ?? 3000;
  const what = opts.what ?? 'all peers up';
  const deadline = Date.now() + timeoutMs;
  while (!ids.every((a) => ids.every((b) => a === b || nodes.get(a)!.mesh.isUp(b)))) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
  return nodes;
}
