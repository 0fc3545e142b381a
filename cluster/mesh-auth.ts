/**
 * Mesh authentication: a challenge–response over a shared cluster secret, run on every
 * new peer connection before anything else crosses it. Pure: the nonce comes in from
 * the caller, no sockets, no timers (the connection's owner turns a timeout into
 * `onTimeout()`), no logging.
 *
 * Both sides, as soon as the connection is up:
 *
 *   → hello { node: ownNode, nonce: 32 random bytes }
 *   on the peer's hello (checked: the node id is one this side expects on this connection)
 *   → proof { proof: HMAC-SHA256(secret, "dve-mesh-v1" | ownNode | peerNode | peerNonce | ownNonce) }
 *   on the peer's proof (checked with timingSafeEqual against the value computed from
 *   the peer's point of view) → authenticated
 *
 * `|` is concatenation of fixed-width fields: the 11 ASCII bytes of the context, the
 * two node ids as u32 big-endian, then the two 32-byte nonces. Fixed widths make the
 * input unambiguous without separators. Each proof binds the prover's id first and
 * covers the verifier's fresh nonce, so a proof can be neither replayed on another
 * connection nor reflected back to the node that issued the challenge.
 *
 * A proof before a hello, a second hello, any other frame type, a malformed body, an
 * unexpected node id, a wrong proof or a timeout → `refuse` with a reason; the owner
 * logs it with the peer's address and closes the connection.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';

import { describe } from './wire.js';

/** A node's id in the cluster: a small non-negative integer (u32 on the wire). */
export type NodeId = number;

export const MESH_AUTH_CONTEXT = 'dve-mesh-v1';
export const NONCE_BYTES = 32;
export const PROOF_BYTES = 32;
export const AUTH_HELLO = 'hello';
export const AUTH_PROOF = 'proof';
/** Authentication frames are tiny; a connection that has not authenticated may send no more than this per frame. */
export const AUTH_MAX_FRAME_BYTES = 1024;

export interface HelloBody {
  node: NodeId;
  nonce: Buffer;
}

export interface ProofBody {
  proof: Buffer;
}

export function isNodeId(x: unknown): x is NodeId {
  return typeof x === 'number' && Number.isInteger(x) && x >= 0 && x <= 0xffff_ffff;
}

/** One side's view of a handshake: who it is, who the peer claims to be, and both nonces. */
export interface ProofParams {
  ownNode: NodeId;
  peerNode: NodeId;
  ownNonce: Uint8Array;
  peerNonce: Uint8Array;
}

/** The bytes the HMAC covers, in the order of the module comment. */
export function proofInput(p: ProofParams): Buffer {
  if (!isNodeId(p.ownNode) || !isNodeId(p.peerNode)) throw new RangeError('proofInput: node ids must be u32');
  if (p.ownNonce.length !== NONCE_BYTES || p.peerNonce.length !== NONCE_BYTES) throw new RangeError(`proofInput: nonces must be ${NONCE_BYTES} bytes`);
  const ctx = Buffer.from(MESH_AUTH_CONTEXT, 'ascii');
  const out = Buffer.alloc(ctx.length + 8 + 2 * NONCE_BYTES);
  let at = ctx.copy(out, 0);
  at = out.writeUInt32BE(p.ownNode, at);
  at = out.writeUInt32BE(p.peerNode, at);
  out.set(p.peerNonce, at);
  out.set(p.ownNonce, at + NONCE_BYTES);
  return out;
}

/** The proof this side sends. */
export function computeProof(secret: Uint8Array, p: ProofParams): Buffer {
  return createHmac('sha256', secret).update(proofInput(p)).digest();
}

/**
 * Whether `proof` is what the peer must have sent: the same computation from the
 * peer's side (its node and nonce are "own" there). Constant time in the proof bytes.
 */
export function verifyProof(secret: Uint8Array, p: ProofParams, proof: Uint8Array): boolean {
  const expected = computeProof(secret, {
    ownNode: p.peerNode, peerNode: p.ownNode, ownNonce: p.peerNonce, peerNonce: p.ownNonce,
  });
  // The length is public (always PROOF_BYTES for an honest peer); only the bytes are secret.
  return proof.length === expected.length && timingSafeEqual(expected, proof);
}

export type HandshakeStep =
  | { kind: 'send'; type: typeof AUTH_PROOF; body: ProofBody }
  | { kind: 'authenticated'; peer: NodeId }
  | { kind: 'refuse'; reason: string };

export interface HandshakeOptions {
  secret: Uint8Array;
  self: NodeId;
  /** This side's nonce for this connection: NONCE_BYTES fresh random bytes. */
  nonce: Buffer;
  /** Null if `node` may be on the other end of this connection, else why not. */
  checkPeer(node: NodeId): string | null;
}

const enum HsState { AWAIT_HELLO, AWAIT_PROOF, DONE, REFUSED }

export class MeshHandshake {
  private state = HsState.AWAIT_HELLO;
  private peerNode: NodeId | null = null;
  private peerNonce: Buffer | null = null;

  constructor(private readonly opts: HandshakeOptions) {
    if (opts.nonce.length !== NONCE_BYTES) throw new RangeError(`MeshHandshake: nonce must be ${NONCE_BYTES} bytes`);
  }

  /** The node the peer claims to be (known after its hello; proven once authenticated). */
  get peer(): NodeId | null {
    return this.peerNode;
  }

  get authenticated(): boolean {
    return this.state === HsState.DONE;
  }

  /** The first frame this side sends. */
  hello(): HelloBody {
    return { node: this.opts.self, nonce: this.opts.nonce };
  }

  onFrame(type: string, body: unknown): HandshakeStep {
    switch (this.state) {
      case HsState.AWAIT_HELLO:
        if (type === AUTH_HELLO) return this.onHello(body);
        if (type === AUTH_PROOF) return this.refuse('proof before hello');
        return this.refuse(`frame ${describe(type)} before authentication`);
      case HsState.AWAIT_PROOF:
        if (type === AUTH_PROOF) return this.onProof(body);
        if (type === AUTH_HELLO) return this.refuse('second hello');
        return this.refuse(`frame ${describe(type)} before authentication`);
      case HsState.DONE:
        return this.refuse(`authentication frame ${describe(type)} after authentication`);
      case HsState.REFUSED:
        return this.refuse('handshake already refused');
    }
  }

  onTimeout(): HandshakeStep {
    return this.refuse('authentication timed out');
  }

  private onHello(body: unknown): HandshakeStep {
    if (!isRecord(body)) return this.refuse(`hello body is not a map (got ${describe(body)})`);
    if (!isNodeId(body.node)) return this.refuse(`hello node is not a u32 node id (got ${describe(body.node)})`);
    if (!(body.nonce instanceof Uint8Array) || body.nonce.length !== NONCE_BYTES) {
      return this.refuse(`hello nonce is not ${NONCE_BYTES} bytes (got ${describe(body.nonce)})`);
    }
    const node = body.node;
    if (node === this.opts.self) return this.refuse(`peer claims this node's own id ${node}`);
    const why = this.opts.checkPeer(node);
    if (why !== null) return this.refuse(`unexpected node id ${node}: ${why}`);
    const nonce = Buffer.from(body.nonce); // copy: the body may be a view into a socket chunk
    if (nonce.equals(this.opts.nonce)) return this.refuse('peer echoed this side\'s nonce');
    this.peerNode = node;
    this.peerNonce = nonce;
    this.state = HsState.AWAIT_PROOF;
    const proof = computeProof(this.opts.secret, this.params());
    return { kind: 'send', type: AUTH_PROOF, body: { proof } };
  }

  private onProof(body: unknown): HandshakeStep {
    if (!isRecord(body)) return this.refuse(`proof body is not a map (got ${describe(body)})`);
    if (!(body.proof instanceof Uint8Array)) return this.refuse(`proof is not binary (got ${describe(body.proof)})`);
    if (!verifyProof(this.opts.secret, this.params(), body.proof)) {
      return this.refuse(`proof mismatch from node ${this.peerNode} (wrong cluster secret?)`);
    }
    this.state = HsState.DONE;
    return { kind: 'authenticated', peer: this.peerNode! };
  }

  private params(): ProofParams {
    return { ownNode: this.opts.self, peerNode: this.peerNode!, ownNonce: this.opts.nonce, peerNonce: this.peerNonce! };
  }

  private refuse(reason: string): HandshakeStep {
    this.state = HsState.REFUSED;
    return { kind: 'refuse', reason };
  }
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && Object.getPrototypeOf(x) === Object.prototype;
}
