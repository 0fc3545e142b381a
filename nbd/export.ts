/**
 * Exports: a name, a Backend, the transmission flags it earns, and counters. The
 * registry is the handshake's catalog; "" reaches the default export.
 */
import type { Backend } from '../src/storage/backend.js';
import type { ExportCatalog, ExportInfo } from './handshake.js';
import {
  NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from './constants.js';

export const MIN_BLOCK_BYTES = 1;
export const PREFERRED_BLOCK_BYTES = 4096;
export const MAX_BLOCK_BYTES = 32 * 1024 * 1024;

export class ExportStats {
  connections = 0;
  requests = 0;
  readBytes = 0;
  writtenBytes = 0;
  errors = 0;
}

export class NbdExport implements ExportInfo {
  readonly transmissionFlags: number;
  readonly minBlockBytes = MIN_BLOCK_BYTES;
  readonly preferredBlockBytes = PREFERRED_BLOCK_BYTES;
  readonly maxBlockBytes = MAX_BLOCK_BYTES;
  readonly stats = new ExportStats();

  constructor(readonly name: string, readonly backend: Backend, readonly description = backend.description) {
    this.transmissionFlags = transmissionFlagsFor(backend);
  }

  get sizeBytes(): number {
    return this.backend.sizeBytes;
  }
  get readOnly(): boolean {
    return this.backend.readOnly;
  }
}

/** Advertise exactly what the backend can do. */
export function transmissionFlagsFor(b: Backend): number {
  let f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_DF | NBD_FLAG_SEND_CACHE;
  if (b.capabilities.multiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
  if (b.readOnly) return f | NBD_FLAG_READ_ONLY;
  f |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_WRITE_ZEROES;
  if (b.capabilities.trim) f |= NBD_FLAG_SEND_TRIM;
  if (b.capabilities.fastZero) f |= NBD_FLAG_SEND_FAST_ZERO;
  return f;
}

export class ExportRegistry implements ExportCatalog {
  private readonly byName = new Map<string, NbdExport>();
  private defaultName: string | null = null;

  add(exp: NbdExport, isDefault = false): void {
    if (this.byName.has(exp.name)) throw new Error(`export "${exp.name}" already exists`);
    this.byName.set(exp.name, exp);
    if (isDefault || this.defaultName === null) this.defaultName = exp.name;
  }

  remove(name: string): NbdExport | undefined {
    const exp = this.byName.get(name);
    this.byName.delete(name);
    if (this.defaultName === name) this.defaultName = this.byName.keys().next().value ?? null;
    return exp;
  }

  lookup(name: string): NbdExport | undefined {
    const exact = this.byName.get(name);
    if (exact) return exact;
    return name === '' && this.defaultName !== null ? this.byName.get(this.defaultName) : undefined;
  }

  list(): NbdExport[] {
    return [...this.byName.values()];
  }
}
