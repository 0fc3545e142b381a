/**
 * Request validation for the transmission phase: every request is checked here
 * before anything runs, and this is where each wire error is chosen. Pure.
 *
 * The choices, from the spec (doc/proto.md) and nbdkit's practice:
 * - unknown command → EINVAL;
 * - a flag the spec does not define, or defines for another command → EINVAL
 *   (FUA is valid on every command: the spec says the server MUST accept it);
 * - DF without structured replies → EINVAL (the flag has no meaning then);
 * - WRITE, TRIM, WRITE_ZEROES on a read-only export → EPERM;
 * - READ, WRITE, CACHE longer than the advertised maximum block size → EINVAL
 *   (a WRITE's payload is skipped, never buffered);
 * - WRITE or WRITE_ZEROES past the end → ENOSPC ("no space at that offset");
 *   READ, TRIM, CACHE, BLOCK_STATUS past the end → EINVAL;
 * - FLUSH with a non-zero offset or length → EINVAL (the fields are reserved);
 * - BLOCK_STATUS without a negotiated metadata context, or of length 0 → EINVAL.
 */
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_EPERM, commandName,
} from './constants.js';

export interface SessionLimits {
  sizeBytes: number;
  readOnly: boolean;
  structuredReplies: boolean;
  baseAllocation: boolean;
  maxBlockBytes: number;
}

export interface Rejection {
  error: number;
  reason: string;
}

/** Flags each command accepts besides FUA. */
const ALLOWED_FLAGS: Record<number, number> = {
  [NBD_CMD_READ]: NBD_CMD_FLAG_DF,
  [NBD_CMD_WRITE]: 0,
  [NBD_CMD_DISC]: 0,
  [NBD_CMD_FLUSH]: 0,
  [NBD_CMD_TRIM]: 0,
  [NBD_CMD_CACHE]: 0,
  [NBD_CMD_WRITE_ZEROES]: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
  [NBD_CMD_BLOCK_STATUS]: NBD_CMD_FLAG_REQ_ONE,
};

/** null when the request may run; else the wire error and why. */
export function validateRequest(
  s: SessionLimits, type: number, flags: number, offset: number, length: number, oversize: boolean,
): Rejection | null {
  const allowed = ALLOWED_FLAGS[type];
  if (allowed === undefined) return { error: NBD_EINVAL, reason: `unknown command ${commandName(type)}` };
  const bad = flags & ~(allowed | NBD_CMD_FLAG_FUA);
  if (bad !== 0) return { error: NBD_EINVAL, reason: `${commandName(type)}: invalid flags 0x${bad.toString(16)}` };
  if ((flags & NBD_CMD_FLAG_DF) !== 0 && !s.structuredReplies) {
    return { error: NBD_EINVAL, reason: 'NBD_CMD_FLAG_DF without structured replies' };
  }
  switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_CACHE:
      if (length > s.maxBlockBytes) return tooLong(type, length, s);
      return pastEnd(s, type, offset, length, NBD_EINVAL);
    case NBD_CMD_WRITE:
      if (s.readOnly) return readOnly(type);
      if (oversize || length > s.maxBlockBytes) return tooLong(type, length, s);
      return pastEnd(s, type, offset, length, NBD_ENOSPC);
    case NBD_CMD_WRITE_ZEROES:
      if (s.readOnly) return readOnly(type);
      return pastEnd(s, type, offset, length, NBD_ENOSPC);
    case NBD_CMD_TRIM:
      if (s.readOnly) return readOnly(type);
      return pastEnd(s, type, offset, length, NBD_EINVAL);
    case NBD_CMD_FLUSH:
      if (offset !== 0 || length !== 0) return { error: NBD_EINVAL, reason: 'NBD_CMD_FLUSH: offset and length must be 0' };
      return null;
    case NBD_CMD_BLOCK_STATUS:
      if (!s.baseAllocation) return { error: NBD_EINVAL, reason: 'NBD_CMD_BLOCK_STATUS: no metadata context negotiated' };
      if (length === 0) return { error: NBD_EINVAL, reason: 'NBD_CMD_BLOCK_STATUS: length 0' };
      return pastEnd(s, type, offset, length, NBD_EINVAL);
    default: // NBD_CMD_DISC
      return null;
  }
}

function pastEnd(s: SessionLimits, type: number, offset: number, length: number, error: number): Rejection | null {
  if (offset > s.sizeBytes || length > s.sizeBytes - offset) {
    return { error, reason: `${commandName(type)}: offset ${offset} + length ${length} is past the end (${s.sizeBytes})` };
  }
  return null;
}

function tooLong(type: number, length: number, s: SessionLimits): Rejection {
  return { error: NBD_EINVAL, reason: `${commandName(type)}: length ${length} exceeds the maximum ${s.maxBlockBytes}` };
}

function readOnly(type: number): Rejection {
  return { error: NBD_EPERM, reason: `${commandName(type)} on a read-only export` };
}
