/**
 * What both pipeline workers share: the heartbeat and stop words, the test-only fault switch,
 * opening a device with retry and backoff, and posting metrics.
 *
 * @module
 */

import { AlsaError, Pcm, type PcmOptions } from "../../ffi/alsa.ts";
import { LibraryNotFoundError } from "../../ffi/library.ts";
import type { Registry } from "../metrics.ts";
import { CONTROL_WORD, WORKER_STATE, type WorkerStateName } from "../supervisor.ts";
import {
  CONTROL,
  FAULT,
  ORPHAN,
  ORPHAN_KINDS,
  type OrphanKind,
  orphanSlots,
  type PipelineInit,
  type WorkerMessage,
} from "./messages.ts";

/** The worker's side of its control block. */
export class WorkerControl {
  readonly words: Int32Array;
  readonly #orphans: BigInt64Array;
  readonly #allowFaults: boolean;

  constructor(init: PipelineInit) {
    this.words = new Int32Array(init.control);
    this.#orphans = orphanSlots(init.control);
    this.#allowFaults = init.allowFaults === true;
  }

  /**
   * Publishes a native object this worker holds (see `CONTROL.orphans`); one per kind, so a new
   * one replaces the token of the last (release that one first).
   */
  hold(kind: OrphanKind, native: { readonly orphanToken: bigint }): void {
    Atomics.store(this.#orphans, ORPHAN[kind], native.orphanToken);
  }

  /**
   * Closes a held native object; its token is cleared first, so a kill in between leaks, never
   * frees twice.
   */
  release(kind: OrphanKind, native: { close(): void }): void {
    Atomics.store(this.#orphans, ORPHAN[kind], 0n);
    native.close();
  }

  /**
   * {@link hold}s `native` and returns what releases it, for `using` (nothing to hold for null):
   * `using _ = ctl.holding("resampler", resampler)`.
   */
  holding(
    kind: OrphanKind,
    native: { readonly orphanToken: bigint; close(): void } | null,
  ): Disposable {
    if (native === null) return { [Symbol.dispose]() {} };
    this.hold(kind, native);
    return { [Symbol.dispose]: () => this.release(kind, native) };
  }

  /** Tells the supervisor this worker is alive. Call at least every 100 ms. */
  beat(): void {
    Atomics.add(this.words, CONTROL_WORD.heartbeat, 1);
  }

  /** Whether the supervisor asked for a graceful stop. */
  get stopRequested(): boolean {
    return Atomics.load(this.words, CONTROL_WORD.stop) !== 0;
  }

  set state(s: WorkerStateName) {
    Atomics.store(this.words, CONTROL_WORD.state, WORKER_STATE[s]);
  }

  /** Reads a pipeline word. */
  get(word: number): number {
    return Atomics.load(this.words, word);
  }

  /** Writes a pipeline word. */
  set(word: number, value: number): void {
    Atomics.store(this.words, word, value);
  }

  /**
   * Waits at most `timeoutMs` until the orphan slots hold no native object of a predecessor; call
   * it first, before creating or opening anything. A worker terminated while stalled leaves its
   * tokens there, and the service frees them 150 ms after the termination, once the old thread is
   * surely out of every C call — but only tokens still in the slots (a live worker may have
   * released one meanwhile). A successor started sooner (an operator's stop and start within
   * 150 ms) published its own over them, and the old device, encoder and resampler were never
   * freed. Returns whether the slots are clear (false after the timeout or a stop request).
   */
  waitForOrphansFreed(timeoutMs = 500): boolean {
    const end = performance.now() + timeoutMs;
    for (;;) {
      if (ORPHAN_KINDS.every((k) => Atomics.load(this.#orphans, ORPHAN[k]) === 0n)) return true;
      if (performance.now() >= end || this.stopRequested) return false;
      this.sleep(5);
    }
  }

  /** Sleeps up to `ms`, beating every 50 ms and waking early on a stop request. */
  sleep(ms: number): void {
    const end = performance.now() + ms;
    for (;;) {
      this.beat();
      const left = end - performance.now();
      if (left <= 0 || this.stopRequested) return;
      Atomics.wait(this.words, CONTROL_WORD.stop, 0, Math.min(50, left));
    }
  }

  /** Acts on the test-only fault switch (a no-op unless faults are allowed). */
  checkFault(): void {
    if (!this.#allowFaults) return;
    const f = Atomics.exchange(this.words, CONTROL.fault, FAULT.none);
    if (f === FAULT.throw) throw new Error("Injected fault: the pipeline loop threw");
    if (f === FAULT.stall) {
      // Spin without beating until stopped from outside (terminate) — a stalled device loop.
      for (;;) Atomics.wait(this.words, CONTROL.fault, 0, 1000);
    }
  }
}

/** Posts a message to the main thread. */
export function post(msg: WorkerMessage): void {
  (globalThis as unknown as { postMessage(m: unknown): void }).postMessage(msg);
}

/**
 * A pipeline worker's last message, from its loop's `finally`, before it writes the state word
 * `stopped`: how the loop ended (`ended`: finite input ran out; `stopped`: a stop request) with the
 * final metrics — the supervisor retires the worker on it, and messages arrive in order, so nothing
 * the worker counted is lost. After a throw (`end` null) only the metrics: the error event
 * reports the crash, and a `stopped` before it would hide it.
 */
export function lastWords(
  end: "ended" | "stopped" | null,
  registry: Registry,
  poster: MetricsPoster,
): void {
  if (end === null) poster.flush();
  else post({ type: end, snapshot: registry.snapshot() });
}

/** Whether an error means "the device is not there or not usable now" (retry), not a bug. */
export function isDeviceError(e: unknown): boolean {
  return e instanceof AlsaError || e instanceof LibraryNotFoundError;
}

/**
 * Opens `device`, retrying with exponential backoff (250 ms doubling to 5 s) while it is missing
 * or busy, reporting each failure. Returns `null` when a stop was requested meanwhile.
 */
export function openWithRetry(
  ctl: WorkerControl,
  device: string,
  opts: PcmOptions,
): Pcm | null {
  let backoff = 250;
  for (;;) {
    if (ctl.stopRequested) return null;
    ctl.beat();
    try {
      return Pcm.open(device, opts);
    } catch (e) {
      if (!isDeviceError(e)) throw e;
      ctl.state = "waiting-for-device";
      post({ type: "device-error", error: (e as Error).message, retryInMs: backoff });
      ctl.sleep(backoff);
      backoff = Math.min(backoff * 2, 5000);
    }
  }
}

/**
 * The device life cycle both workers share: open `device` (retrying while it is missing or
 * busy), report what it gave, run `body` on it, release it — and again if `body` returns false
 * without a stop request, until stopped. Returns true when `body` reported the end of a finite
 * input.
 *
 * A device error thrown by `body` (an {@link AlsaError}: the device vanished — a USB gadget
 * unplugged by a rebooting target, a sound server's stream killed — or failed in a way its xrun
 * recovery could not mend) is not a crash of the worker: the device is released, the loss reported
 * as a `device-error` and the device reopened after a backoff (250 ms doubling to 5 s, back to
 * 250 ms after a minute of good running). The supervisor, its restart count and its breaker stay
 * for real faults of the code.
 */
export function runDevice(
  ctl: WorkerControl,
  device: string,
  options: () => PcmOptions,
  body: (pcm: Pcm) => boolean,
): boolean {
  let backoff = 250;
  while (!ctl.stopRequested) {
    ctl.state = "starting";
    const pcm = openWithRetry(ctl, device, options());
    if (pcm === null) break;
    ctl.hold("pcm", pcm);
    const openedAt = performance.now();
    let lost: Error | null = null;
    try {
      post({
        type: "ready",
        device: {
          name: pcm.name,
          rate: pcm.rate,
          channels: pcm.channels,
          periodFrames: pcm.periodFrames,
          bufferFrames: pcm.bufferFrames,
        },
      });
      ctl.state = "running";
      if (body(pcm)) return true;
    } catch (e) {
      if (!isDeviceError(e)) throw e;
      lost = e as Error;
    } finally {
      try {
        ctl.release("pcm", pcm);
      } catch (e) {
        // A vanished device may refuse even its close; the handle is gone either way.
        // deno-lint-ignore no-unsafe-finally
        if (!isDeviceError(e)) throw e;
      }
    }
    if (lost !== null) {
      if (performance.now() - openedAt > 60_000) backoff = 250;
      ctl.state = "waiting-for-device";
      post({ type: "device-lost", error: lost.message, retryInMs: backoff });
      ctl.sleep(backoff);
      backoff = Math.min(backoff * 2, 5000);
    }
  }
  return false;
}

/** Posts a metrics snapshot every `intervalMs`. */
export class MetricsPoster {
  #next = 0;
  constructor(readonly registry: Registry, readonly intervalMs = 500) {}

  /** Posts when due. */
  tick(now: number): void {
    if (now < this.#next) return;
    this.#next = now + this.intervalMs;
    post({ type: "metrics", snapshot: this.registry.snapshot() });
  }

  /** Posts now. */
  flush(): void {
    post({ type: "metrics", snapshot: this.registry.snapshot() });
  }
}

/**
 * Paces a loop by the wall clock for unpaced devices: {@link wait} returns once the next period
 * is due (beating meanwhile). The period may change from one call to the next (a new frame
 * duration). Catches up without bursts after a long stall.
 */
export class ClockPacer {
  #due = performance.now();

  wait(ctl: WorkerControl, periodMs: number): void {
    this.#due += periodMs;
    const now = performance.now();
    if (this.#due < now - 100) this.#due = now; // fell far behind: resynchronise
    const left = this.#due - now;
    if (left > 0) ctl.sleep(left);
  }
}
