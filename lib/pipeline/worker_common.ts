/**
 * What both pipeline workers share: the heartbeat and stop words, the test-only fault switch,
 * opening a device with retry and backoff, and posting metrics.
 *
 * @module
 */

import { AlsaError, Pcm, type PcmOptions } from "../../ffi/alsa.ts";
import { LibraryNotFoundError } from "../../ffi/library.ts";
import { libc } from "../../ffi/libc.ts";
import type { Registry } from "../metrics.ts";
import {
  CONTROL_WORD,
  storeWorkerState,
  WORKER_STATE,
  type WorkerStateName,
} from "../supervisor.ts";
import {
  CONTROL,
  FAULT,
  ORPHAN,
  type OrphanKind,
  orphanSlots,
  type PipelineInit,
  type WorkerMessage,
} from "./messages.ts";

/**
 * The worker's side of its control block.
 *
 * **Retirement.** `Worker.terminate()` does not stop a running pipeline worker (see
 * lib/supervisor.ts, "Retiring a worker"): the supervisor marks the incarnation word instead, and
 * a worker that finds another incarnation than its own there is *retired* — {@link stopRequested}
 * holds, and it writes nothing shared any more (heartbeat, state, pipeline words, orphan slots),
 * so that it cannot pass for its successor. It goes on to unwind its loops as after a stop.
 * The look and the write are two steps, and a worker can lose the CPU between them: its state is
 * therefore written with a compare-and-swap tagged with its incarnation (`storeWorkerState`), which
 * fails once the supervisor has moved on. The heartbeat and pipeline words keep the two steps: at
 * most one late write each — one beat more for the successor, a change counter one too high, a
 * `nextSeq` the successor overwrites with its next frame.
 *
 * **Native objects.** The worker lists what it holds in the orphan slots ({@link hold}). When an
 * incarnation is retired the service takes the listed objects over at once (it swaps the slots to
 * 0) and frees them when the worker reports that it has finished ({@link runPipeline}) — not before: the retired
 * worker may still be inside a C call on them. So {@link release} frees an object only when its
 * slot still holds it (a compare-and-swap to 0); one the service took is left to the service.
 * Exactly one of the two frees each object. Objects made after retirement are never listed and
 * are the worker's own.
 */
export class WorkerControl {
  readonly words: Int32Array;
  readonly #orphans: BigInt64Array;
  readonly #allowFaults: boolean;
  readonly #incarnation: number;
  /** Objects held while retired: never listed, freed by {@link release} itself. */
  readonly #unlisted = new Set<unknown>();

  constructor(init: Pick<PipelineInit, "control" | "incarnation" | "allowFaults">) {
    this.words = new Int32Array(init.control);
    this.#orphans = orphanSlots(init.control);
    this.#allowFaults = init.allowFaults === true;
    this.#incarnation = init.incarnation;
  }

  /** Whether the supervisor retired this incarnation (see the class notes). */
  get retired(): boolean {
    return Atomics.load(this.words, CONTROL_WORD.incarnation) !== this.#incarnation;
  }

  /**
   * Lists a native object this worker holds in the orphan slots (see `CONTROL.orphans`); one per
   * kind, so release the last one of a kind first. A retired worker lists nothing.
   */
  hold(kind: OrphanKind, native: { readonly orphanToken: bigint }): void {
    if (this.retired) {
      this.#unlisted.add(native);
      return;
    }
    const token = native.orphanToken;
    Atomics.store(this.#orphans, ORPHAN[kind], token);
    // Retired between the look and the store: the service may have swapped the slots already and
    // would not see this one. Take it back unless the service did.
    if (this.retired && Atomics.compareExchange(this.#orphans, ORPHAN[kind], token, 0n) === token) {
      this.#unlisted.add(native);
    }
  }

  /**
   * Frees a held native object — unless the service took it over (see the class notes): the slot
   * is swapped from its token to 0 first, so a free by both is impossible.
   */
  release(kind: OrphanKind, native: { readonly orphanToken: bigint; close(): void }): void {
    if (this.#unlisted.delete(native)) {
      native.close();
      return;
    }
    const token = native.orphanToken;
    if (Atomics.compareExchange(this.#orphans, ORPHAN[kind], token, 0n) === token) native.close();
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
    if (!this.retired) Atomics.add(this.words, CONTROL_WORD.heartbeat, 1);
  }

  /** Whether the supervisor asked for a graceful stop, or retired this worker. */
  get stopRequested(): boolean {
    return Atomics.load(this.words, CONTROL_WORD.stop) !== 0 || this.retired;
  }

  /** Writes this worker's state — never over a successor's (see `stateWord` in supervisor.ts). */
  set state(s: WorkerStateName) {
    storeWorkerState(this.words, this.#incarnation, WORKER_STATE[s]);
  }

  /** Reads a pipeline word. */
  get(word: number): number {
    return Atomics.load(this.words, word);
  }

  /** Writes a pipeline word (not when retired). */
  set(word: number, value: number): void {
    if (!this.retired) Atomics.store(this.words, word, value);
  }

  /** Adds to a pipeline word (not when retired). */
  add(word: number, delta: number): void {
    if (!this.retired) Atomics.add(this.words, word, delta);
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
      // Wait without beating until retired — a stalled device loop. (terminate() would not end
      // it: see the class notes.)
      while (!this.retired) Atomics.wait(this.words, CONTROL_WORD.stop, 0, 50);
    }
    if (f === FAULT.block) {
      // Block inside a C call for 3 s, not beating — a sound server hanging in snd_pcm_open.
      libc().poll(new Uint8Array(8), 0n, 3000);
    }
  }
}

/**
 * Runs a pipeline worker's `run(init)` once, then says so in `init.exit` — whatever the way out:
 * the service frees what it took over at a retirement only then — and closes the worker after a
 * normal return (a throw reaches the supervisor as the worker's error event).
 */
export function runPipeline<I extends PipelineInit>(run: (init: I) => void): void {
  const scope = self as unknown as {
    onmessage: ((ev: MessageEvent<I>) => void) | null;
    close(): void;
  };
  scope.onmessage = (ev) => {
    scope.onmessage = null;
    try {
      run(ev.data);
    } finally {
      if (ev.data.exit) Atomics.store(new Int32Array(ev.data.exit), 0, 1);
    }
    scope.close();
  };
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
