// An in-memory MetaDevice that models a disk with a volatile write cache, for
// crash-consistency tests of the metadata area.
//
// - Reads see every write issued so far (the cache).
// - `sync()` makes every write issued before it durable.
// - `crashAfter(n)` arms a power cut at the n-th device operation from now: that
//   operation and every later one reject with SimulatedCrash. If the n-th operation
//   is a write, it counts as in progress: it joins the unsynced writes.
// - `crash(rng)` is the reboot: it returns a new device holding what survives —
//   the durable image plus, for each unsynced write in issue order, nothing, all of
//   it, or a TORN part of it ('prefix': the first k of its 512-byte sectors;
//   'sectors': any subset of its sectors) — and kills this device.
// - `corrupt(offset, byte)` models media damage (sets one byte, cached and durable).
// - With a scheduler rng, operations complete after a random number of event-loop
//   turns, so concurrent operations finish in shuffled orders.
import type { MetaDevice } from '../../src/meta/chunk-store.js';

export type Rng = () => number;
export type TearMode = 'prefix' | 'sectors';

export const SIM_SECTOR_BYTES = 512;

export class SimulatedCrash extends Error {
  readonly code = 'ESIMCRASH';
  constructor(op: string) {
    super(`simulated power cut (during ${op})`);
    this.name = 'SimulatedCrash';
  }
}

interface PendingWrite {
  offset: number;
  data: Buffer;
}

/** A small deterministic PRNG (mulberry32) for reproducible crashes from a fast-check seed. */
export function seededRng(seed: number): Rng {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export class SimulatedMetaDevice implements MetaDevice {
  readonly sizeBytes: number;
  private readonly cache: Buffer;
  private readonly durable: Buffer;
  private pending: PendingWrite[] = [];
  private dead = false;
  private opsUntilCrash: number | null = null;
  /** Operations performed (read, write, sync), for choosing crash points. */
  opCount = 0;
  writeCount = 0;
  syncCount = 0;

  constructor(
    sizeOrImage: number | Buffer,
    private readonly scheduler: Rng | null = null,
  ) {
    if (typeof sizeOrImage === 'number') {
      this.sizeBytes = sizeOrImage;
      this.cache = Buffer.alloc(sizeOrImage);
    } else {
      this.sizeBytes = sizeOrImage.length;
      this.cache = Buffer.from(sizeOrImage);
    }
    this.durable = Buffer.from(this.cache);
  }

  get crashed(): boolean {
    return this.dead;
  }

  /** Writes issued since the last sync. */
  get unsyncedWrites(): number {
    return this.pending.length;
  }

  /** Arms a power cut at the `n`-th operation from now (0 = the next one). */
  crashAfter(n: number): void {
    this.opsUntilCrash = n;
  }

  async read(buf: Buffer, offsetBytes: number): Promise<void> {
    this.begin('read', buf, offsetBytes);
    this.cache.copy(buf, 0, offsetBytes, offsetBytes + buf.length);
    await this.settle();
  }

  async write(buf: Buffer, offsetBytes: number): Promise<void> {
    const data = Buffer.from(buf); // the caller may reuse buf once we resolve; snapshot now
    try {
      this.begin('write', buf, offsetBytes);
    } catch (e) {
      if (e instanceof SimulatedCrash && this.justCrashed) this.pending.push({ offset: offsetBytes, data }); // cut mid-write
      throw e;
    }
    this.writeCount++;
    this.pending.push({ offset: offsetBytes, data });
    data.copy(this.cache, offsetBytes);
    await this.settle();
  }

  async sync(): Promise<void> {
    this.begin('sync');
    this.syncCount++;
    for (const w of this.pending) w.data.copy(this.durable, w.offset);
    this.pending = [];
    await this.settle();
  }

  /**
   * Power cut and reboot: returns a device with what survived. Kills this device.
   * Each unsynced write independently vanishes, lands whole, or lands torn.
   */
  crash(rng: Rng, mode: TearMode = 'prefix'): SimulatedMetaDevice {
    this.dead = true;
    const image = Buffer.from(this.durable);
    for (const w of this.pending) {
      const r = rng();
      if (r < 1 / 3) continue; // never reached the media
      if (r < 2 / 3) {
        w.data.copy(image, w.offset);
        continue;
      }
      const sectors = Math.ceil(w.data.length / SIM_SECTOR_BYTES);
      if (mode === 'prefix') {
        const k = Math.floor(rng() * (sectors + 1)); // 0..all sectors
        w.data.copy(image, w.offset, 0, Math.min(w.data.length, k * SIM_SECTOR_BYTES));
      } else {
        for (let s = 0; s < sectors; s++) {
          if (rng() < 0.5) {
            const from = s * SIM_SECTOR_BYTES;
            w.data.copy(image, w.offset + from, from, Math.min(w.data.length, from + SIM_SECTOR_BYTES));
          }
        }
      }
    }
    this.pending = [];
    return new SimulatedMetaDevice(image, this.scheduler);
  }

  /** Media damage: sets the byte at `offset` (both what reads see and what survives a crash). */
  corrupt(offset: number, byte: number): void {
    this.cache[offset] = byte;
    this.durable[offset] = byte;
  }

  /** A copy of the bytes reads currently see. */
  snapshot(offset = 0, length = this.sizeBytes - offset): Buffer {
    return Buffer.from(this.cache.subarray(offset, offset + length));
  }

  /** Overwrites bytes in place (cached and durable), bypassing the crash model. */
  poke(offset: number, data: Buffer): void {
    data.copy(this.cache, offset);
    data.copy(this.durable, offset);
  }

  private justCrashed = false;

  private begin(op: string, buf?: Buffer, offsetBytes?: number): void {
    this.justCrashed = false;
    if (this.dead) throw new SimulatedCrash(op);
    if (buf && offsetBytes !== undefined) {
      if (!Number.isInteger(offsetBytes) || offsetBytes < 0 || offsetBytes + buf.length > this.sizeBytes) {
        throw new RangeError(`simulated device: ${op} of ${buf.length} at ${offsetBytes} is outside ${this.sizeBytes} bytes`);
      }
    }
    this.opCount++;
    if (this.opsUntilCrash !== null) {
      if (this.opsUntilCrash === 0) {
        this.dead = true;
        this.justCrashed = true;
        throw new SimulatedCrash(op);
      }
      this.opsUntilCrash--;
    }
  }

  private async settle(): Promise<void> {
    if (!this.scheduler) {
      await Promise.resolve();
      return;
    }
    const turns = Math.floor(this.scheduler() * 4);
    for (let i = 0; i < turns; i++) await new Promise<void>((resolve) => setImmediate(resolve));
  }
}
