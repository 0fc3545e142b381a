// An undo stack for tests that build layered state (FUSE mount → loop device → filesystem
// mount): steps are undone in reverse order, each at most once, failures are collected
// instead of stopping the rest, and whatever is left runs from t.teardown even when the
// test fails half-way.
import type { ExecutionContext } from 'ava';

interface Step {
  name: string;
  fn: () => Promise<void>;
}

export class CleanupStack {
  private steps: Step[] = [];
  readonly errors: string[] = [];

  /** Registers the stack with t.teardown (call it before creating anything). */
  constructor(t: ExecutionContext) {
    t.teardown(async () => {
      await this.unwindAll();
      if (this.errors.length > 0) console.error(`[interop] cleanup problems:\n${this.errors.join('\n')}`);
    });
  }

  /**
   * Adds a forceful undo step (for teardown). Returns `dismiss`, to call once the test has
   * undone the thing itself the strict way (so a failed strict undo still gets forced).
   */
  push(name: string, fn: () => Promise<void>): () => void {
    const step: Step = { name, fn };
    this.steps.push(step);
    return () => {
      const i = this.steps.indexOf(step);
      if (i >= 0) this.steps.splice(i, 1);
    };
  }

  async unwindAll(): Promise<void> {
    while (this.steps.length > 0) {
      const step = this.steps.pop()!;
      try {
        await step.fn();
      } catch (e) {
        this.errors.push(`${step.name}: ${(e as Error).message}`);
      }
    }
  }
}
