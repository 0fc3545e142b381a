/**
 * A Backend layer that injects faults: errors (a host errno) on chosen operations,
 * for a number of calls or until cleared, and added latency. Used by unit and
 * error-path tests, and by simulations; it passes everything else straight through.
 */
import type { Backend, ExtentsDone, IoDone, ZeroOptions } from './backend.js';

export type FaultOp = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'cache' | 'extents';

interface Fault {
  ops: Set<FaultOp>;
  result: number;
  /** Calls left to fail; Infinity until cleared. */
  remaining: number;
}

export class FaultInjectingBackend implements Backend {
  private faults: Fault[] = [];
  latencyMs = 0;
  injected = 0;

  constructor(private readonly inner: Backend) {}

  get sizeBytes(): number { return this.inner.sizeBytes; }
  get readOnly(): boolean { return this.inner.readOnly; }
  get capabilities() { return this.inner.capabilities; }
  get description(): string { return `fault-injecting ${this.inner.description}`; }

  /** Fail `ops` with `result` (e.g. -EIO) for the next `count` calls (default: until clear()). */
  fail(ops: FaultOp | FaultOp[], result: number, count = Infinity): void {
    if (result >= 0) throw new RangeError('fault result must be a negative errno');
    this.faults.push({ ops: new Set(Array.isArray(ops) ? ops : [ops]), result, remaining: count });
  }

  clear(): void {
    this.faults = [];
  }

  private take(op: FaultOp): number {
    for (const f of this.faults) {
      if (f.remaining > 0 && f.ops.has(op)) {
        f.remaining--;
        this.injected++;
        return f.result;
      }
    }
    return 0;
  }

  private run(op: FaultOp, done: IoDone, go: (d: IoDone) => void): void {
    const r = this.take(op);
    const act = (): void => (r < 0 ? done(r) : go(done));
    if (this.latencyMs > 0) setTimeout(act, this.latencyMs);
    else act();
  }

  read(buf: Buffer, off: number, done: IoDone): void { this.run('read', done, (d) => this.inner.read(buf, off, d)); }
  write(buf: Buffer, off: number, fua: boolean, done: IoDone): void { this.run('write', done, (d) => this.inner.write(buf, off, fua, d)); }
  flush(done: IoDone): void { this.run('flush', done, (d) => this.inner.flush(d)); }
  trim(off: number, len: number, fua: boolean, done: IoDone): void { this.run('trim', done, (d) => this.inner.trim(off, len, fua, d)); }
  zero(off: number, len: number, o: ZeroOptions, done: IoDone): void { this.run('zero', done, (d) => this.inner.zero(off, len, o, d)); }
  cache(off: number, len: number, done: IoDone): void { this.run('cache', done, (d) => this.inner.cache(off, len, d)); }
  extents(off: number, len: number, done: ExtentsDone): void {
    this.run('extents', (r) => done(r, []), () => this.inner.extents(off, len, done));
  }
  close(): Promise<void> { return this.inner.close(); }
}
