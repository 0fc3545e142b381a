/**
 * Group atomic I/O pause across nodes (seed 000 sync points + seed 004 "group atomic
 * operations"): pause I/O to a set of volumes on every node, do something (e.g. take
 * a snapshot of each), resume; all or none, bounded by a timeout.
 *
 * ## Protocol (one operation `op`, id `${initiator}-${counter}-${random}`)
 * 1. The initiator sends mesh request `'pause'` `{ op, volumes, timeoutMs, mask }` to
 *    every other member (`mask`: the members' sync mask as a decimal string) and
 *    pauses locally.
 * 2. Every member, on the request: checks it (EINVAL naming the field otherwise),
 *    calls `hooks.pause(volumes)` and replies at once `{ op, node }` (the ack means
 *    "accepted, pausing"; it does not wait for the drain). When the drain is done it
 *    starts `pauseIoSync(volumes, mask, op)` with the time left of `timeoutMs`
 *    (measured from when it got the request), in ticks of its SyncDriver.
 * 3. When the pause point passes on the initiator (every member drained and said so),
 *    it runs `fn`. Then it sends `'resume'` `{ op }` to the members (a plain send) and
 *    resumes locally.
 * 4. Resuming, on every node: `hooks.resume(volumes)`, stop the pause sync (saying
 *    RESUME_IO), start `resumeIoSync(volumes, mask, op)` so that everyone knows
 *    everyone resumed; each node stops it when it passes or times out. The initiator
 *    waits for it for `resumeTimeoutMs` and only logs if it times out.
 *
 * Failure (all or none): if the pause point is not passed within `timeoutMs`, or a
 * member refuses or cannot be reached (its request fails: the initiator gives up at
 * once), the initiator sends resume to every member, resumes locally, and throws
 * `IoPauseError` naming the nodes that did not pause. A member whose own pause sync
 * times out keeps its volumes paused until it hears `'resume'` (or the safety timer):
 * the initiator may have passed, and is then running `fn` counting on that pause.
 *
 * Safety: a member paused for `op` resumes by itself when it hears nothing about `op`
 * for `timeoutMs + safetyMarginMs` (the initiator may have died). While `fn` runs the
 * initiator sends `'pause-alive'` `{ op }` every third of that, so a long `fn` is not
 * cut short; a dead initiator's pause ends about `timeoutMs + safetyMarginMs` after
 * its last keepalive. (A member cut off from a live initiator for that long resumes
 * too, and logs a warning: the initiator cannot know. Seed 004 hands this case to the
 * recovering node; dve has no recovery taskset for it yet.)
 *
 * Pairing: every `hooks.pause` call on a node is followed by exactly one
 * `hooks.resume` for the same op and volumes, possibly while the pause's promise is
 * still pending (the op gave up waiting for the drain). Ops nest: the engine must
 * count, a volume stays paused while any op holds it.
 *
 * Hostile input: every body is checked; bad `'pause'` requests get EINVAL, bad or
 * foreign `'resume'`/`'pause-alive'` messages (from a node outside the op's mask, or for
 * an op not active here) are ignored with a debug log. Nothing throws out of the
 * message listener.
 */
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';

import type { SyncDriver, SyncOutcome, SyncTransport } from './sync-driver.js';
import {
  MAX_NODES, RESUME_IO_KEY, maskOf, nodesInMask, pauseIoSync, resumeIoSync, type NodeId, type SyncId,
} from './sync-point.js';

export const PAUSE_TYPE = 'pause';
export const RESUME_TYPE = 'resume';
export const PAUSE_ALIVE_TYPE = 'pause-alive';

export const MAX_PAUSE_VOLUMES = 1024;
export const MAX_VOLUME_NAME_CHARS = 256;
export const MAX_PAUSE_TIMEOUT_MS = 3_600_000;
const OP_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const MASK_RE = /^[0-9]{1,20}$/;
const FINISHED_OPS_MAX = 1024;

/** Implemented by the engine. */
export interface PauseHooks {
  /** Stop new I/O to these volumes and drain in-flight I/O; resolves when drained. */
  pause(volumes: string[]): Promise<void>;
  /** Let I/O to these volumes go again (may come while `pause` is still draining). */
  resume(volumes: string[]): void;
}

export type PauseTransport = SyncTransport & {
  request(peer: number, type: string, body: unknown, timeoutMs: number): Promise<unknown>;
  reply(peer: number, correlationId: number, body: unknown): boolean;
  replyError(peer: number, correlationId: number, code: string, message: string): boolean;
};

export interface IoPauseOptions {
  transport: PauseTransport;
  sync: SyncDriver;
  hooks: PauseHooks;
  /** Live node ids, this node included (it is added if missing). */
  members: () => number[];
  log: Logger;
  /** A member resumes by itself after `timeoutMs` + this much silence about the op. Default 2000. */
  safetyMarginMs?: number;
  /** How long the initiator waits for the resume point. Default 2000. */
  resumeTimeoutMs?: number;
}

/** The pause point was not passed: thrown by `withPaused` after everything was resumed. */
export class IoPauseError extends Error {
  constructor(
    message: string,
    readonly op: string,
    /** Nodes known not to have paused (never reached the point, refused, or unreachable). */
    readonly notPaused: NodeId[],
    /** Per node, why its pause request failed, when it did. */
    readonly reasons: Readonly<Record<number, string>>,
  ) {
    super(message);
    this.name = 'IoPauseError';
  }
}

interface PauseRequestBody {
  op: string;
  volumes: string[];
  timeoutMs: number;
  mask: string;
}

/** One op this node is paused for. */
interface PausedOp {
  readonly op: string;
  readonly volumes: string[];
  readonly mask: bigint;
  readonly members: readonly NodeId[];
  readonly initiator: NodeId;
  readonly since: Date;
  readonly timeoutMs: number;
  /** performance.now() by which the pause point must be reached. */
  readonly deadlineMs: number;
  /** The pause sync's scope, once started here. */
  pauseSync: SyncId | null;
  safetyTimer: NodeJS.Timeout | null;
}

type FieldError = { field: string; message: string };

function isPlainRecord(x: unknown): x is Record<string, unknown> {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) return false;
  const proto = Object.getPrototypeOf(x);
  return proto === Object.prototype || proto === null;
}

function checkOpField(op: unknown): FieldError | null {
  if (typeof op !== 'string' || !OP_RE.test(op)) {
    return { field: 'op', message: 'op must be a string of 1..128 chars from [A-Za-z0-9._:-]' };
  }
  return null;
}

function checkVolumesField(volumes: unknown): FieldError | null {
  if (!Array.isArray(volumes) || volumes.length === 0 || volumes.length > MAX_PAUSE_VOLUMES
    || !volumes.every((v) => typeof v === 'string' && v.length > 0 && v.length <= MAX_VOLUME_NAME_CHARS)) {
    return {
      field: 'volumes',
      message: `volumes must be a non-empty array (at most ${MAX_PAUSE_VOLUMES}) of volume names (1..${MAX_VOLUME_NAME_CHARS} chars)`,
    };
  }
  return null;
}

function checkTimeoutField(timeoutMs: unknown): FieldError | null {
  if (typeof timeoutMs !== 'number' || !Number.isFinite(timeoutMs) || timeoutMs <= 0 || timeoutMs > MAX_PAUSE_TIMEOUT_MS) {
    return { field: 'timeoutMs', message: `timeoutMs must be a number in (0, ${MAX_PAUSE_TIMEOUT_MS}]` };
  }
  return null;
}

/** The request body checked; the mask must include the sender and this node. */
export function parsePauseRequest(body: unknown, from: NodeId, self: NodeId): { ok: PauseRequestBody & { maskBits: bigint } } | { error: FieldError } {
  if (!isPlainRecord(body)) return { error: { field: 'body', message: 'body must be a map { op, volumes, timeoutMs, mask }' } };
  const e = checkOpField(body.op) ?? checkVolumesField(body.volumes) ?? checkTimeoutField(body.timeoutMs);
  if (e !== null) return { error: e };
  const mask = body.mask;
  let maskBits: bigint | null = null;
  if (typeof mask === 'string' && MASK_RE.test(mask)) {
    const m = BigInt(mask);
    if (m > 0n && m >> BigInt(MAX_NODES) === 0n) maskBits = m;
  }
  if (maskBits === null) return { error: { field: 'mask', message: `mask must be a decimal string of a non-zero ${MAX_NODES}-bit node mask` } };
  const has = (n: NodeId): boolean => n >= 0 && n < MAX_NODES && ((maskBits >> BigInt(n)) & 1n) === 1n;
  if (!has(from) || !has(self)) {
    return { error: { field: 'mask', message: `mask [${nodesInMask(maskBits).join(',')}] must include the sender (${from}) and this node (${self})` } };
  }
  return {
    ok: {
      op: body.op as string, volumes: [...new Set(body.volumes as string[])], timeoutMs: body.timeoutMs as number,
      mask: maskBits.toString(), maskBits,
    },
  };
}

function errMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

export class IoPauseCoordinator {
  readonly nodeId: NodeId;
  private readonly transport: PauseTransport;
  private readonly sync: SyncDriver;
  private readonly hooks: PauseHooks;
  private readonly members: () => number[];
  private readonly log: Logger;
  private readonly safetyMarginMs: number;
  private readonly resumeTimeoutMs: number;
  private readonly paused = new Map<string, PausedOp>();
  /** Ops that ended here, oldest first: a late request for one is refused. */
  private readonly finished = new Set<string>();
  private readonly keepalives = new Set<NodeJS.Timeout>();
  private counter = 0;
  private closed = false;

  constructor(o: IoPauseOptions) {
    this.transport = o.transport;
    this.nodeId = o.transport.nodeId;
    this.sync = o.sync;
    this.hooks = o.hooks;
    this.members = o.members;
    this.log = o.log.child({ component: 'io-pause', node: this.nodeId });
    this.safetyMarginMs = o.safetyMarginMs ?? 2000;
    if (!(Number.isFinite(this.safetyMarginMs) && this.safetyMarginMs >= 0)) {
      throw new RangeError(`IoPauseCoordinator: safetyMarginMs must be a non-negative number, got ${this.safetyMarginMs}`);
    }
    this.resumeTimeoutMs = o.resumeTimeoutMs ?? 2000;
    if (!(Number.isFinite(this.resumeTimeoutMs) && this.resumeTimeoutMs > 0)) {
      throw new RangeError(`IoPauseCoordinator: resumeTimeoutMs must be a positive number, got ${this.resumeTimeoutMs}`);
    }
    o.transport.on('message', (peer, type, body, c) => {
      if (type !== PAUSE_TYPE && type !== RESUME_TYPE && type !== PAUSE_ALIVE_TYPE) return;
      if (this.closed) {
        if (type === PAUSE_TYPE && c !== 0) this.safeReplyError(peer, c, 'ESTOPPED', `node ${this.nodeId}: io pause coordinator closed`);
        return;
      }
      try {
        if (type === PAUSE_TYPE) this.onPause(peer, body, c);
        else if (type === RESUME_TYPE) this.onResume(peer, body);
        else this.onAlive(peer, body);
      } catch (err) {
        this.log.error({ err, peer, type }, 'io pause message handling failed');
      }
    });
  }

  /**
   * Initiator: pause `volumes` on every live node, run `fn` while all are paused, then
   * resume everywhere. Throws IoPauseError (after resuming everywhere) if the pause
   * point is not passed within `timeoutMs`; `fn`'s own error is rethrown after resuming.
   */
  async withPaused<T>(volumes: string[], timeoutMs: number, fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new Error('IoPauseCoordinator: closed');
    const bad = checkVolumesField(volumes) ?? checkTimeoutField(timeoutMs);
    if (bad !== null) throw new RangeError(`withPaused: ${bad.message}`);
    const members = [...new Set([...this.members(), this.nodeId])].sort((a, b) => a - b);
    const mask = maskOf(members); // RangeError for a node id outside 0..63
    const others = members.filter((m) => m !== this.nodeId);
    const op = `${this.nodeId}-${++this.counter}-${randomBytes(4).toString('hex')}`;
    const vols = [...new Set(volumes)];
    const startedAt = performance.now();
    const log = this.log.child({ op });
    log.info({ volumes: vols, members, timeoutMs }, 'io pause: pausing');

    const rec = this.newOp(op, vols, mask, this.nodeId, timeoutMs, startedAt);
    const local = this.pauseHere(rec);

    // A member that refuses or cannot be reached will not pause: give up at once.
    const reasons: Record<number, string> = {};
    let settled = false;
    let abort!: () => void;
    const aborted = new Promise<'aborted'>((r) => {
      abort = () => r('aborted');
    });
    const body: PauseRequestBody = { op, volumes: vols, timeoutMs, mask: mask.toString() };
    for (const peer of others) {
      let req: Promise<unknown>;
      try {
        req = this.transport.request(peer, PAUSE_TYPE, body, timeoutMs);
      } catch (err) {
        req = Promise.reject(err);
      }
      req.then(
        () => log.debug({ peer }, 'io pause: request acknowledged'),
        (err: unknown) => {
          if (settled) {
            log.debug({ peer, err: errMessage(err) }, 'io pause: request failed after the op was decided');
            return;
          }
          reasons[peer] = errMessage(err);
          log.info({ peer, err: reasons[peer] }, 'io pause: pause request failed');
          abort();
        },
      );
    }
    const keepaliveMs = Math.max(10, Math.floor((timeoutMs + this.safetyMarginMs) / 3));
    const keepalive = setInterval(() => {
      for (const peer of others) this.safeSend(peer, PAUSE_ALIVE_TYPE, { op });
    }, keepaliveMs);
    this.keepalives.add(keepalive);
    const stopKeepalive = (): void => {
      clearInterval(keepalive);
      this.keepalives.delete(keepalive);
    };

    let deadlineTimer: NodeJS.Timeout | undefined;
    const deadline = new Promise<'deadline'>((r) => {
      deadlineTimer = setTimeout(() => r('deadline'), timeoutMs + 2 * this.sync.tickMs);
    });
    const first = await Promise.race([local, aborted, deadline]);
    clearTimeout(deadlineTimer);
    settled = true;

    if (typeof first === 'object' && first !== null && first.state === 'passed') {
      log.info({ elapsedMs: Math.round(performance.now() - startedAt) }, 'io pause: every node paused');
      try {
        return await fn();
      } finally {
        stopKeepalive();
        await this.resumeAll(rec, others, true, log);
      }
    }

    // Not passed: resume everywhere, then say who did not pause.
    stopKeepalive();
    const localStarted = rec.pauseSync !== null;
    await this.resumeAll(rec, others, false, log);
    // Who did not pause: on an early abort, the members that refused or were unreachable
    // (the rest may just not have finished draining yet); on a timeout, also every node
    // never seen at the point, this one included if its own drain did not finish.
    const notPaused = new Set<NodeId>(Object.keys(reasons).map(Number));
    if (first !== 'aborted') {
      let outcome: SyncOutcome | null = typeof first === 'object' ? first : null;
      if (outcome === null && localStarted) outcome = await local; // stopped by the resume: resolves now
      if (outcome !== null) for (const n of outcome.waitingFor) notPaused.add(n);
      if (!localStarted) notPaused.add(this.nodeId);
    }
    const list = [...notPaused].sort((a, b) => a - b);
    const why = Object.entries(reasons).map(([n, r]) => `node ${n}: ${r}`).join('; ');
    const elapsedMs = Math.round(performance.now() - startedAt);
    const msg = `io pause ${op} of ${vols.length} volume(s) failed after ${elapsedMs} ms: `
      + (list.length > 0 ? `node(s) ${list.join(', ')} did not pause within ${timeoutMs} ms` : `pause point not passed within ${timeoutMs} ms`)
      + (why.length > 0 ? ` (${why})` : '');
    log.warn({ notPaused: list, reasons, elapsedMs }, 'io pause failed; resumed everywhere');
    throw new IoPauseError(msg, op, list, reasons);
  }

  /** For status: operations this node is currently paused for. */
  active(): { op: string; volumes: string[]; since: string }[] {
    return [...this.paused.values()].map((r) => ({ op: r.op, volumes: [...r.volumes], since: r.since.toISOString() }));
  }

  /** Stops listening and resumes every op paused here (shutdown). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const t of this.keepalives) clearInterval(t);
    this.keepalives.clear();
    for (const rec of [...this.paused.values()]) {
      if (rec.safetyTimer !== null) clearTimeout(rec.safetyTimer);
      this.paused.delete(rec.op);
      this.callResume(rec);
    }
  }

  // ----------------------------------------------------------------- members' side

  private onPause(peer: NodeId, body: unknown, c: number): void {
    if (c === 0) {
      this.log.debug({ peer }, 'io pause: pause sent without a request; ignored');
      return;
    }
    const parsed = parsePauseRequest(body, peer, this.nodeId);
    if ('error' in parsed) {
      this.log.debug({ peer, field: parsed.error.field }, 'io pause: malformed pause request refused');
      this.safeReplyError(peer, c, 'EINVAL', `pause: ${parsed.error.message}`);
      return;
    }
    const req = parsed.ok;
    if (this.paused.has(req.op) || this.finished.has(req.op)) {
      this.safeReplyError(peer, c, 'EEXIST', `pause: op ${req.op} is already ${this.paused.has(req.op) ? 'active' : 'finished'} on node ${this.nodeId}`);
      return;
    }
    const rec = this.newOp(req.op, req.volumes, req.maskBits, peer, req.timeoutMs, performance.now());
    this.log.info({ op: rec.op, initiator: peer, volumes: rec.volumes }, 'io pause: pausing for a peer');
    void this.pauseHere(rec).then((o) => {
      if (o !== null && o.state === 'timed-out') {
        this.log.info({ op: rec.op, waitingFor: o.waitingFor }, 'io pause: pause point timed out here; staying paused until resume');
      }
    });
    this.armSafety(rec);
    this.safeReply(peer, c, { op: rec.op, node: this.nodeId });
  }

  private onResume(peer: NodeId, body: unknown): void {
    const rec = this.opFor(peer, body, RESUME_TYPE);
    if (rec === null) return;
    void this.resumeHere(rec, `resume from node ${peer}`);
  }

  private onAlive(peer: NodeId, body: unknown): void {
    const rec = this.opFor(peer, body, PAUSE_ALIVE_TYPE);
    if (rec !== null) this.armSafety(rec);
  }

  /** The active op a resume/keepalive names, if well-formed and from one of its members. */
  private opFor(peer: NodeId, body: unknown, type: string): PausedOp | null {
    const op = isPlainRecord(body) ? body.op : undefined;
    if (checkOpField(op) !== null) {
      this.log.debug({ peer, type }, 'io pause: malformed message ignored');
      return null;
    }
    const rec = this.paused.get(op as string);
    if (rec === undefined) {
      this.log.debug({ peer, type, op }, 'io pause: message for an op not active here; ignored');
      return null;
    }
    if (!rec.members.includes(peer)) {
      this.log.debug({ peer, type, op }, 'io pause: message from a node outside the op; ignored');
      return null;
    }
    return rec;
  }

  // ----------------------------------------------------------------- both sides

  private newOp(op: string, volumes: string[], mask: bigint, initiator: NodeId, timeoutMs: number, atMs: number): PausedOp {
    return {
      op, volumes, mask, members: nodesInMask(mask), initiator, since: new Date(), timeoutMs,
      deadlineMs: atMs + timeoutMs, pauseSync: null, safetyTimer: null,
    };
  }

  /**
   * Registers the op, calls hooks.pause (synchronously), and once drained starts the
   * pause sync with the time left. Resolves with its outcome, or null if the sync was
   * never started (the drain failed, took too long, or the op was resumed first).
   */
  private async pauseHere(rec: PausedOp): Promise<SyncOutcome | null> {
    this.paused.set(rec.op, rec);
    try {
      await this.hooks.pause([...rec.volumes]);
    } catch (err) {
      this.log.warn({ err, op: rec.op }, 'io pause: hooks.pause failed; this node will not reach the pause point');
      return null;
    }
    if (this.paused.get(rec.op) !== rec) return null;
    const leftMs = rec.deadlineMs - performance.now();
    if (leftMs <= 0) {
      this.log.warn({ op: rec.op, overMs: Math.round(-leftMs) }, 'io pause: drain outlasted the timeout; not joining the pause point');
      return null;
    }
    const ev = pauseIoSync(rec.volumes, rec.mask, rec.op, { timeoutTicks: this.sync.msToTicks(leftMs) });
    rec.pauseSync = ev.sync;
    try {
      return await this.sync.start(ev);
    } catch (err) {
      this.log.error({ err, op: rec.op }, 'io pause: could not start the pause sync');
      return null;
    }
  }

  /**
   * Resumes the op here (once): hooks.resume, the pause sync stopped saying RESUME_IO,
   * the resume sync started. Resolves with the resume sync's outcome (null if none).
   */
  private resumeHere(rec: PausedOp, why: string): Promise<SyncOutcome | null> {
    if (this.paused.get(rec.op) !== rec) return Promise.resolve(null);
    this.paused.delete(rec.op);
    this.finished.add(rec.op);
    if (this.finished.size > FINISHED_OPS_MAX) {
      const oldest = this.finished.values().next();
      if (oldest.done !== true) this.finished.delete(oldest.value);
    }
    if (rec.safetyTimer !== null) clearTimeout(rec.safetyTimer);
    rec.safetyTimer = null;
    this.log.info({ op: rec.op, why, pausedMs: Date.now() - rec.since.getTime() }, 'io pause: resuming');
    this.callResume(rec);
    if (rec.pauseSync !== null) this.sync.stop(rec.pauseSync, RESUME_IO_KEY);
    let ev;
    try {
      ev = resumeIoSync(rec.volumes, rec.mask, rec.op, { timeoutTicks: this.sync.msToTicks(this.resumeTimeoutMs) });
    } catch (err) {
      this.log.error({ err, op: rec.op }, 'io pause: bad resume sync');
      return Promise.resolve(null);
    }
    const sync = ev.sync;
    return this.sync.start(ev).then(
      (o) => {
        this.sync.stop(sync);
        return o;
      },
      (err: unknown) => {
        this.log.debug({ err: errMessage(err), op: rec.op }, 'io pause: resume sync not started');
        return null;
      },
    );
  }

  private async resumeAll(rec: PausedOp, others: NodeId[], wait: boolean, log: Logger): Promise<void> {
    for (const peer of others) {
      if (!this.safeSend(peer, RESUME_TYPE, { op: rec.op })) log.warn({ peer }, 'io pause: could not send resume');
    }
    const done = this.resumeHere(rec, 'initiator');
    if (!wait) return;
    const o = await done;
    if (o === null || o.state !== 'passed') {
      log.warn({ waitingFor: o?.waitingFor ?? [] }, 'io pause: not every node confirmed the resume in time');
    } else {
      log.info({ elapsedMs: o.elapsedMs }, 'io pause: resumed everywhere');
    }
  }

  private callResume(rec: PausedOp): void {
    try {
      this.hooks.resume([...rec.volumes]);
    } catch (err) {
      this.log.error({ err, op: rec.op }, 'io pause: hooks.resume threw');
    }
  }

  private armSafety(rec: PausedOp): void {
    if (rec.initiator === this.nodeId) return; // the initiator resumes in withPaused's finally
    if (rec.safetyTimer !== null) clearTimeout(rec.safetyTimer);
    const ms = rec.timeoutMs + this.safetyMarginMs;
    rec.safetyTimer = setTimeout(() => {
      rec.safetyTimer = null;
      this.log.warn({ op: rec.op, initiator: rec.initiator, silentMs: ms }, 'io pause: no word from the initiator; resuming by itself');
      void this.resumeHere(rec, `no word for ${ms} ms`);
    }, ms);
  }

  private safeSend(peer: NodeId, type: string, body: unknown): boolean {
    try {
      return this.transport.send(peer, type, body);
    } catch (err) {
      this.log.warn({ err, peer, type }, 'io pause: send failed');
      return false;
    }
  }

  private safeReply(peer: NodeId, c: number, body: unknown): void {
    try {
      this.transport.reply(peer, c, body);
    } catch (err) {
      this.log.warn({ err, peer }, 'io pause: reply failed');
    }
  }

  private safeReplyError(peer: NodeId, c: number, code: string, message: string): void {
    try {
      this.transport.replyError(peer, c, code, message);
    } catch (err) {
      this.log.warn({ err, peer }, 'io pause: error reply failed');
    }
  }
}
