/**
 * Oplock wire messages (seed 004, Fig. 27): plain objects that msgpack encodes as
 * they are, plus the one validator every network input goes through. The protocol
 * itself (what each message means, who sends it when) is in `oplock.ts`.
 *
 * Every message names one oplock and carries the sender's incarnation (`inc`, bumped
 * on every boot of the node) and its per-oplock sequence number (`seq`, bumped on
 * every change of what the sender advertises and on every new request). A receiver
 * keeps, per peer and oplock, the highest `seq` it has seen and what it said, so a
 * duplicated or reordered message can never move its view of a peer backwards.
 *
 * Requests (join, share, acquire) carry `req`, the id of the attempt; answers (ack,
 * nak) echo it in `req` and say which request kind they answer in `answers`, and
 * report the responder's own advertised state so the requester's view catches up.
 *
 * Oplock ids are `guid.luid[index]` (seed 004: global_id = volume segment, local_id =
 * the attribute such as `rmap`, index = the fixed-size chunk). A variable-length
 * extent takes every chunk oplock it touches, out to the next lock boundary
 * (Fig. 26): `locksCovering`.
 */

/** A node of the cluster. Lower ids win conflicts (see `oplock.ts`). */
export type NodeId = number;
/** `guid.luid[index]`, e.g. `vol7.rmap[3]`. */
export type LockId = string;
/** What a node tells its peers about itself for one oplock: the basis of slist and alist. */
export type Advertised = 'out' | 'joined' | 'sharing';
/** The requests that are answered with ack or nak. */
export type RequestType = 'join' | 'share' | 'acquire';

interface Header {
  lock: LockId;
  /** Sender's incarnation (boot count). */
  inc: number;
  /** Sender's per-oplock sequence number. */
  seq: number;
}

/** "I want to join this oplock's cluster": broadcast to the jlist. Implies `joined`. */
export interface JoinMessage extends Header { type: 'join'; req: number }
/** "I no longer care about this oplock": to the slist, not answered. Implies `out`. */
export interface LeaveMessage extends Header { type: 'leave' }
/** "I want to cache the metadata": broadcast to the slist. Implies `sharing`. */
export interface ShareMessage extends Header { type: 'share'; req: number }
/** "I stopped caching": to the slist, not answered. Implies `joined`. */
export interface UnshareMessage extends Header { type: 'unshare' }
/**
 * "I want to update the metadata": broadcast to the alist. `restrictive` asks sharers
 * to revoke and drain before they ack; `nonVolatile` says the sender records the
 * ownership in its journal. Implies `sharing`.
 */
export interface AcquireMessage extends Header { type: 'acquire'; req: number; restrictive: boolean; nonVolatile: boolean }
/** "I released (or gave up trying)": to the slist, not answered; the retry signal. Implies `sharing`. */
export interface ReleaseMessage extends Header { type: 'release' }
/**
 * Positive answer to request `req`. `dirty`: for an acquire, the responder's old dirty
 * flag (it had unflushed unrestrictive updates, flushed them before answering, and the
 * acquirer must purge its cached copy); for a share, that the responder holds
 * unflushed updates now (the sharer's copy will miss them); false for a join.
 */
export interface AckMessage extends Header { type: 'ack'; answers: RequestType; req: number; state: Advertised; dirty: boolean }
/** Negative answer to request `req`: not interested (join) or busy (share, acquire). */
export interface NakMessage extends Header { type: 'nak'; answers: RequestType; req: number; state: Advertised }

export type OplockMessage =
  | JoinMessage
  | LeaveMessage
  | ShareMessage
  | UnshareMessage
  | AcquireMessage
  | ReleaseMessage
  | AckMessage
  | NakMessage;

export type OplockMessageType = OplockMessage['type'];

export const OPLOCK_MESSAGE_TYPES: readonly OplockMessageType[] = [
  'join', 'leave', 'share', 'unshare', 'acquire', 'release', 'ack', 'nak',
];

// ---------------------------------------------------------------- lock ids

const NAME = '[A-Za-z0-9_-]{1,64}';
const LOCK_ID = new RegExp(`^(${NAME})\\.(${NAME})\\[(0|[1-9][0-9]{0,14})\\]$`);
const INDEX_MAX = Number.MAX_SAFE_INTEGER;

export interface LockAddress { guid: string; luid: string; index: number }

export function lockId(guid: string, luid: string, index: number): LockId {
  const id = `${guid}.${luid}[${index}]`;
  if (parseLockId(id) === null) throw new RangeError(`invalid oplock address ${JSON.stringify(id)}`);
  return id;
}

export function parseLockId(id: string): LockAddress | null {
  const m = LOCK_ID.exec(id);
  if (m === null) return null;
  const index = Number(m[3]);
  if (!Number.isSafeInteger(index) || index > INDEX_MAX) return null;
  return { guid: m[1]!, luid: m[2]!, index };
}

export function isLockId(x: unknown): x is LockId {
  return typeof x === 'string' && x.length <= 160 && parseLockId(x) !== null;
}

/**
 * The chunk oplocks a byte range of `guid.luid` needs (Fig. 26): every fixed-size
 * chunk the range touches, i.e. from the lock boundary at or below the start to the
 * next boundary at or above the end.
 */
export function locksCovering(guid: string, luid: string, offsetBytes: number, lengthBytes: number, chunkBytes: number): LockId[] {
  if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0) throw new RangeError(`offsetBytes ${offsetBytes}`);
  if (!Number.isSafeInteger(lengthBytes) || lengthBytes <= 0) throw new RangeError(`lengthBytes ${lengthBytes}`);
  if (!Number.isSafeInteger(chunkBytes) || chunkBytes <= 0) throw new RangeError(`chunkBytes ${chunkBytes}`);
  const first = Math.floor(offsetBytes / chunkBytes);
  const last = Math.floor((offsetBytes + lengthBytes - 1) / chunkBytes);
  const out: LockId[] = [];
  for (let i = first; i <= last; i++) out.push(lockId(guid, luid, i));
  return out;
}

// ---------------------------------------------------------------- validation

const ADVERTISED: readonly string[] = ['out', 'joined', 'sharing'];
const REQUEST_TYPES: readonly string[] = ['join', 'share', 'acquire'];
/** Counters are bounded well inside the safe-integer range so `+ 1` stays exact. */
const COUNTER_MAX = 2 ** 48;

function isCounter(x: unknown): x is number {
  return typeof x === 'number' && Number.isInteger(x) && x >= 0 && x <= COUNTER_MAX;
}

/**
 * Checks a decoded network frame and returns a fresh message holding only the known
 * fields, or `{ error }` saying what is wrong. Never throws: peers are not trusted to
 * be well-formed (a corrupted frame, an old or new version, a bug elsewhere).
 */
export function parseOplockMessage(x: unknown): OplockMessage | { error: string } {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) return { error: 'oplock message: not an object' };
  const o = x as Record<string, unknown>;
  const type = o['type'];
  if (typeof type !== 'string' || !(OPLOCK_MESSAGE_TYPES as readonly string[]).includes(type)) {
    return { error: `oplock message: unknown type ${JSON.stringify(type)?.slice(0, 40)}` };
  }
  const lock = o['lock'];
  if (!isLockId(lock)) return { error: `oplock ${type}: invalid lock id` };
  const inc = o['inc'];
  if (!isCounter(inc)) return { error: `oplock ${type}: invalid inc` };
  const seq = o['seq'];
  if (!isCounter(seq)) return { error: `oplock ${type}: invalid seq` };
  const h = { lock, inc, seq };
  const req = o['req'];
  switch (type as OplockMessageType) {
    case 'leave':
    case 'unshare':
    case 'release':
      return { type: type as 'leave' | 'unshare' | 'release', ...h };
    case 'join':
    case 'share':
      if (!isCounter(req)) return { error: `oplock ${type}: invalid req` };
      return { type: type as 'join' | 'share', ...h, req };
    case 'acquire': {
      if (!isCounter(req)) return { error: 'oplock acquire: invalid req' };
      const restrictive = o['restrictive'];
      const nonVolatile = o['nonVolatile'];
      if (typeof restrictive !== 'boolean') return { error: 'oplock acquire: restrictive is not a boolean' };
      if (typeof nonVolatile !== 'boolean') return { error: 'oplock acquire: nonVolatile is not a boolean' };
      return { type: 'acquire', ...h, req, restrictive, nonVolatile };
    }
    case 'ack':
    case 'nak': {
      if (!isCounter(req)) return { error: `oplock ${type}: invalid req` };
      const answers = o['answers'];
      if (typeof answers !== 'string' || !REQUEST_TYPES.includes(answers)) return { error: `oplock ${type}: invalid answers` };
      const state = o['state'];
      if (typeof state !== 'string' || !ADVERTISED.includes(state)) return { error: `oplock ${type}: invalid state` };
      if (type === 'nak') return { type: 'nak', ...h, answers: answers as RequestType, req, state: state as Advertised };
      const dirty = o['dirty'];
      if (typeof dirty !== 'boolean') return { error: 'oplock ack: dirty is not a boolean' };
      return { type: 'ack', ...h, answers: answers as RequestType, req, state: state as Advertised, dirty };
    }
  }
}

export function isParseError(x: OplockMessage | { error: string }): x is { error: string } {
  return 'error' in x;
}
