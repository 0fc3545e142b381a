/**
 * Reply encoders for the transmission phase: simple replies, and structured reply
 * chunks (OFFSET_DATA, BLOCK_STATUS, ERROR). Read replies are built in place: the
 * caller allocates header + data in one buffer, reads into the data part, then
 * writes the header, so a read reply is one socket write and no copy.
 */
import {
  NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_SIMPLE_REPLY_HEADER_BYTES, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_HEADER_BYTES,
  NBD_STRUCTURED_REPLY_MAGIC,
} from './constants.js';

/** Bytes in front of the data of a structured OFFSET_DATA read reply: chunk header + u64 offset. */
export const OFFSET_DATA_PREFIX_BYTES = NBD_STRUCTURED_REPLY_HEADER_BYTES + 8;

export function writeSimpleReplyHeader(b: Buffer, at: number, error: number, cookieHi: number, cookieLo: number): void {
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
}

export function simpleReply(error: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(NBD_SIMPLE_REPLY_HEADER_BYTES);
  writeSimpleReplyHeader(b, 0, error, cookieHi, cookieLo);
  return b;
}

export function writeChunkHeader(
  b: Buffer, at: number, flags: number, type: number, cookieHi: number, cookieLo: number, payloadBytes: number,
): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
  b.writeUInt32BE(payloadBytes, at + 16);
}

/** The prefix of a final OFFSET_DATA chunk carrying `dataBytes` at `offset`. */
export function writeOffsetDataPrefix(b: Buffer, cookieHi: number, cookieLo: number, offset: number, dataBytes: number): void {
  writeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + dataBytes);
  b.writeUInt32BE(Math.floor(offset / 0x100000000), 20);
  b.writeUInt32BE(offset >>> 0, 24);
}

/** A final NBD_REPLY_TYPE_ERROR chunk with a human-readable message. */
export function errorChunk(error: number, cookieHi: number, cookieLo: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 1024), 'utf8');
  const b = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES + 6 + msg.length);
  writeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookieHi, cookieLo, 6 + msg.length);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  return b;
}

/** A final BLOCK_STATUS chunk: context id, then (length, flags) descriptors. */
export function blockStatusChunk(
  cookieHi: number, cookieLo: number, contextId: number, lengths: readonly number[], flags: readonly number[],
): Buffer {
  const n = lengths.length;
  const b = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES + 4 + 8 * n);
  writeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, 4 + 8 * n);
  b.writeUInt32BE(contextId, 20);
  for (let i = 0; i < n; i++) {
    b.writeUInt32BE(lengths[i]!, 24 + 8 * i);
    b.writeUInt32BE(flags[i]!, 28 + 8 * i);
  }
  return b;
}
