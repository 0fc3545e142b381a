/**
 * Reusable buffers for large read replies and write payloads. Allocating a fresh
 * 64 KiB–32 MiB ArrayBuffer per request makes V8 account a stream of external
 * memory, which it answers with full (mark-compact) collections; reusing them keeps
 * the collector out of the data path.
 *
 * Sizes come in classes of 2^k + 64 bytes (room for a reply header in front of a
 * power-of-two payload). `acquire(n)` returns a view of exactly n bytes; `release`
 * takes that view back. Each buffer must be released exactly once, after the last
 * use of its bytes (for a reply: when the socket write has completed).
 */
const HEADROOM_BYTES = 64;
const MIN_CLASS_SHIFT = 14; // 16 KiB: smaller buffers come from Node's own slab
const MAX_CLASS_SHIFT = 26; // 64 MiB
const PER_CLASS = 64;

export class BufferPool {
  private readonly free: Buffer[][] = [];
  pooledBytes = 0;

  constructor(private readonly perClass = PER_CLASS) {
    for (let k = 0; k <= MAX_CLASS_SHIFT; k++) this.free.push([]);
  }

  /** True when `n` bytes come from the pool (and so must be released). */
  static pooled(n: number): boolean {
    return n > (1 << MIN_CLASS_SHIFT) + HEADROOM_BYTES && n <= (1 << MAX_CLASS_SHIFT) + HEADROOM_BYTES;
  }

  acquire(n: number): Buffer {
    if (!BufferPool.pooled(n)) return Buffer.allocUnsafe(n);
    const k = classOf(n);
    const b = this.free[k]!.pop();
    if (b) {
      this.pooledBytes -= b.length;
      return b.subarray(0, n);
    }
    return Buffer.allocUnsafeSlow((1 << k) + HEADROOM_BYTES).subarray(0, n);
  }

  release(view: Buffer): void {
    const ab = view.buffer as ArrayBuffer;
    const cap = ab.byteLength;
    const k = classOf(cap);
    if (view.byteOffset !== 0 || cap !== (1 << k) + HEADROOM_BYTES || !BufferPool.pooled(view.length)) return;
    const list = this.free[k]!;
    if (list.length >= this.perClass) return; // enough spares: let this one go
    list.push(Buffer.from(ab, 0, cap));
    this.pooledBytes += cap;
  }
}

function classOf(n: number): number {
  let k = MIN_CLASS_SHIFT;
  while ((1 << k) + HEADROOM_BYTES < n) k++;
  return k;
}

/** One pool per process: connections come and go, buffers stay warm. */
export const ioBuffers = new BufferPool();
