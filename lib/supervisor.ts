/**
 * Keeps one Web Worker running: starts it, watches its heartbeat, restarts it with exponential
 * backoff when it crashes or stalls, and stops restarting (opens a breaker) when it crashes too
 * often.
 *
 * ## Control block
 *
 * Pipeline workers run synchronous loops and do not return to their event loop between frames, so
 * they cannot receive messages while running. Everything the supervisor tells a running worker
 * goes through the **control block**: an `Int32Array` over a `SharedArrayBuffer` owned by the
 * supervisor and handed to every incarnation (through `spawn`). It survives restarts, so the next
 * incarnation sees every control value set before the previous one died. Layout:
 *
 * - {@link CONTROL_WORD}`.heartbeat` — the worker adds 1 (`Atomics.add`) at least every 100 ms.
 *   When it does not change for `stallMs` (or for `startTimeoutMs` after a start), the worker is
 *   stalled: it is terminated and restarted.
 * - {@link CONTROL_WORD}`.stop` — the supervisor stores {@link STOP_REQUESTED} (and notifies, so a
 *   worker in `Atomics.wait` on this word wakes) to ask for a graceful stop; it is cleared before
 *   each start. The worker polls it between frames.
 * - {@link CONTROL_WORD}`.state` — the worker's own view, a {@link WORKER_STATE} value tagged
 *   with the incarnation that wrote it ({@link stateWord}); the supervisor stores `starting` before
 *   each start. Workers write it only through {@link storeWorkerState}.
 * - {@link CONTROL_WORD}`.incarnation` — the number of the current incarnation, written by the
 *   supervisor before each start, and {@link RETIRED} when it retires one (see below). A worker
 *   compares it with the incarnation in its init message to find out that it was replaced.
 * - Words 4 to 7 are reserved; words from {@link FIRST_PIPELINE_WORD} (8) to the end of the block
 *   belong to the caller (preset, mute, a test-only fault switch...). The supervisor never touches
 *   them.
 *
 * ## Messages from the worker
 *
 * Workers still post messages to the main thread. Every message is passed to `onMessage`; the
 * supervisor also acts on three (see {@link SupervisorMessage}): `{ type: "fatal", error }` is a
 * crash, `{ type: "ended" }` means the worker finished on its own (finite input; not a crash) and
 * `{ type: "stopped" }` means it honoured a stop request. Messages are delivered in order, so a
 * worker that posts its last metrics before `stopped`/`ended` does not lose them. A worker whose
 * state word reads `stopped` without such a message is treated the same way once the word has read
 * `stopped` for {@link STOPPED_WORD_WAIT_MS} (or `stallMs` when shorter): long enough for a last
 * message still on its way — the main thread may be busy (an emulated aarch64 run showed the
 * state word winning a race of two 100 ms watch ticks against the `ended` message before it, and
 * that message's metrics were lost with the detached listener).
 *
 * ## Crashes
 *
 * An uncaught exception in the worker (its `error` event, whose default action — ending this
 * process — is prevented), a `messageerror`, a `fatal` message or a stalled heartbeat. The
 * supervisor terminates the incarnation and starts the next one after a backoff delay
 * (`initialMs × factor^n`, at most `maxMs`; `n` goes back to 0 after an incarnation that ran for
 * `resetAfterMs`). When `maxCrashes` crashes fall within `windowMs` the breaker opens: the state
 * becomes `broken` and nothing restarts until {@link Supervisor.resetBreaker} (the service calls
 * it on every start an operator asks for). A {@link Supervisor.stop} also leaves `broken`, but
 * keeps the crashes in the window.
 *
 * ## Retiring a worker
 *
 * `Worker.terminate()` does not stop a worker that never returns to its event loop — and pipeline
 * workers never do while they run. In Deno 2.9.5 the worker goes on running JavaScript, `finally`
 * blocks included, whether it was in a C call or not (measured: a worker looping on a C call, on
 * `Atomics.wait` or on pure JavaScript still ran 5 s after `terminate()`; Deno's isolate kill two
 * seconds after a terminate does not happen — denoland/deno#35657). So retiring an incarnation
 * also stores {@link RETIRED} in the incarnation word (and wakes the stop word): a worker that
 * reads another incarnation than its own stops as if asked to and writes nothing shared on its way
 * out. A worker stalled inside a C call (a sound server that hangs in `snd_pcm_open`) does so when
 * the call returns, seconds later, while its successor already runs.
 *
 * @module
 */

import { epochMs } from "./frame_ring.ts";

/** The incarnation word of a supervisor whose incarnation was retired (none runs). */
export const RETIRED = -1;

/** Indices of the supervisor's words in the control block. */
export const CONTROL_WORD = {
  /** Incremented by the worker at least every 100 ms. */
  heartbeat: 0,
  /** {@link STOP_REQUESTED} when the supervisor asks for a graceful stop, otherwise 0. */
  stop: 1,
  /** The worker's state, a {@link WORKER_STATE} value (0 before the first start). */
  state: 2,
  /** Number of the current incarnation (0 for the first start). */
  incarnation: 3,
} as const;

/** Value of {@link CONTROL_WORD}`.stop` when a graceful stop is requested. */
export const STOP_REQUESTED = 1;

/**
 * How long the state word may read `stopped` before the supervisor stops waiting for the worker's
 * last message (`ended`/`stopped`) and retires it anyway (capped by `stallMs`).
 */
export const STOPPED_WORD_WAIT_MS = 2000;

/** First control word that belongs to the caller (words 4–7 are reserved for the supervisor). */
export const FIRST_PIPELINE_WORD = 8;

/** Words in a control block unless `controlWords` says otherwise. */
export const DEFAULT_CONTROL_WORDS = 32;

/** Largest control block, in words. */
export const MAX_CONTROL_WORDS = 4096;

/** Values of {@link CONTROL_WORD}`.state`, keyed by name. */
export const WORKER_STATE = {
  /** Set by the supervisor before the worker starts; the worker is loading or initialising. */
  starting: 1,
  /** Doing its work. */
  running: 2,
  /** Alive (and beating) but its device is missing or busy; it retries. */
  "waiting-for-device": 3,
  /** Left its loop, after a stop request or at the end of its input. */
  stopped: 4,
} as const;

/** Name of a worker's own state, see {@link WORKER_STATE}. */
export type WorkerStateName = keyof typeof WORKER_STATE;

/** Incarnations are tagged modulo this in the state word (2²⁸: far more restarts than happen). */
const STATE_OWNER_MASK = 0x0fffffff;
/** The state word's tag once the supervisor retired an incarnation: no worker's own. */
const RETIRED_OWNER = STATE_OWNER_MASK;

/**
 * The state word's value for `state` written by `incarnation`: `incarnation × 8 + state`.
 *
 * Why the tag: a worker checks that it is still the current incarnation and then writes its state,
 * and between the two it may lose the CPU while the supervisor retires it and starts its successor.
 * A plain store would then put the old worker's `stopped` over the successor's word, and the
 * supervisor would take the successor for finished and not restart it. With the tag the worker's
 * write is a compare-and-swap that succeeds only while the word carries its own incarnation
 * ({@link storeWorkerState}); the supervisor's own stores (`starting` for the next incarnation,
 * `stopped` with a tag no worker has when it retires one) make every later write of an old
 * worker fail.
 */
export function stateWord(incarnation: number, state: number): number {
  return ((incarnation & STATE_OWNER_MASK) << 3) | state;
}

/** The {@link WORKER_STATE} value of a state word (without its incarnation tag). */
export function stateOf(word: number): number {
  return word & 7;
}

/**
 * Writes a worker's state into the control block's state word unless the word carries another
 * incarnation than `incarnation` (the worker was retired; see {@link stateWord}). Returns whether
 * it wrote.
 */
export function storeWorkerState(
  control: Int32Array,
  incarnation: number,
  state: number,
): boolean {
  const want = stateWord(incarnation, state);
  for (;;) {
    const word = Atomics.load(control, CONTROL_WORD.state);
    if (word >>> 3 !== (incarnation & STATE_OWNER_MASK)) return false;
    if (Atomics.compareExchange(control, CONTROL_WORD.state, word, want) === word) return true;
  }
}

const WORKER_STATE_NAMES: ReadonlyMap<number, WorkerStateName> = new Map(
  (Object.entries(WORKER_STATE) as [WorkerStateName, number][]).map(([k, v]) => [v, k]),
);

/**
 * State of a supervisor:
 * - `stopped` — no worker, none planned (initially, after {@link Supervisor.stop}, or after the
 *   worker ended on its own);
 * - `starting` — a worker was spawned and has not beaten yet;
 * - `running` — the worker's heartbeat advances;
 * - `stopping` — a graceful stop was requested; waiting for the worker or the grace period;
 * - `backoff` — the worker crashed; the next one starts at `nextRestartAt`;
 * - `broken` — the breaker is open after too many crashes; nothing restarts on its own.
 */
export type SupervisorState =
  | "stopped"
  | "starting"
  | "running"
  | "stopping"
  | "backoff"
  | "broken";

/** How the last incarnation ended. */
export type ExitKind =
  /** Uncaught exception, `messageerror`, `fatal` message, or `spawn` threw. */
  | "crash"
  /** The heartbeat did not advance in time. */
  | "stall"
  /** The worker finished on its own (`ended` message or state word). */
  | "ended"
  /** Stopped on request (gracefully or, after the grace period, by terminate). */
  | "stopped";

/** Messages from a worker that the supervisor acts on (all messages also go to `onMessage`). */
export type SupervisorMessage =
  | { readonly type: "fatal"; readonly error: string }
  | { readonly type: "ended" }
  | { readonly type: "stopped" };

/** Restart delays. */
export interface BackoffOptions {
  /** Delay before the first restart after a crash (default 250 ms). */
  readonly initialMs?: number;
  /** Longest delay (default 10 000 ms). */
  readonly maxMs?: number;
  /** Growth of the delay per consecutive crash, at least 1 (default 2). */
  readonly factor?: number;
  /** An incarnation that ran this long before crashing starts the delays over (default 30 000 ms). */
  readonly resetAfterMs?: number;
}

/** Crash-loop breaker. */
export interface BreakerOptions {
  /** Crashes within `windowMs` that open the breaker (default 5). */
  readonly maxCrashes?: number;
  /** Length of the window (default 300 000 ms). */
  readonly windowMs?: number;
}

/** Options of a {@link Supervisor}. */
export interface SupervisorOptions {
  /** Name for status and messages, e.g. "output". */
  readonly name: string;
  /**
   * Creates a worker incarnation and sends it its init message, which must carry `control` (and
   * should carry `incarnation`, 0 for the first start). Throwing counts as a crash.
   */
  readonly spawn: (control: SharedArrayBuffer, incarnation: number) => Worker;
  /** Receives every message of the current incarnation (messages of replaced ones are dropped). */
  readonly onMessage?: (message: unknown, incarnation: number) => void;
  /** Words in the control block, from 8 to 4096 (default 32). */
  readonly controlWords?: number;
  /** A running worker whose heartbeat did not advance for this long is stalled (default 2000 ms). */
  readonly stallMs?: number;
  /** Time from spawn to the first heartbeat before the start counts as stalled (default 10 000 ms). */
  readonly startTimeoutMs?: number;
  /** Time a worker has to honour a stop request before it is terminated (default 500 ms). */
  readonly graceMs?: number;
  /** Restart delays. */
  readonly backoff?: BackoffOptions;
  /** Crash-loop breaker. */
  readonly breaker?: BreakerOptions;
  /**
   * Clock in milliseconds for timestamps and durations (heartbeat age, run length, breaker
   * window); defaults to a monotonic clock in epoch milliseconds (`epochMs`), so a wall-clock
   * step cannot look like a stall. Timers always run on real time.
   */
  readonly now?: () => number;
}

/** A supervisor's state as plain data. Times are in the clock of `now` (epoch ms by default). */
export interface SupervisorStatus {
  readonly name: string;
  readonly state: SupervisorState;
  /** What the worker last wrote to its state word; `null` before the first start. */
  readonly workerState: WorkerStateName | null;
  /** Number of the current or last incarnation (0 = first start); `null` before the first start. */
  readonly incarnation: number | null;
  /** Incarnations started after the first (automatic and manual). */
  readonly restarts: number;
  /** Crashes and stalls within the breaker window. */
  readonly crashes: number;
  /** Message of the last crash, stall or worker error; `null` if there was none. */
  readonly lastError: string | null;
  /** How the last incarnation ended; `null` if none has ended. */
  readonly lastExit: ExitKind | null;
  /** When the last incarnation ended. */
  readonly lastExitAt: number | null;
  /** When the next restart is due (state `backoff`). */
  readonly nextRestartAt: number | null;
  /** Whether the crash-loop breaker is open (state `broken`). */
  readonly breakerOpen: boolean;
  /** How long the current incarnation has been up (0 without one). */
  readonly uptimeMs: number;
  /** Time since the heartbeat last advanced (or since the start); `null` without a worker. */
  readonly heartbeatAgeMs: number | null;
}

/** Name of the event a {@link Supervisor} dispatches on every state change. */
export const STATE_CHANGE_EVENT = "statechange";

/** Dispatched by a {@link Supervisor} on every change of state. */
export class SupervisorStateEvent extends Event {
  /** State before the change. */
  readonly from: SupervisorState;
  /** State after the change. */
  readonly to: SupervisorState;
  /** Why, e.g. "heartbeat", "stop requested", or the crash message. */
  readonly reason: string;
  /** Delay before the next restart (when `to` is `backoff`), otherwise `null`. */
  readonly delayMs: number | null;
  /** Status after the change. */
  readonly status: SupervisorStatus;

  constructor(
    from: SupervisorState,
    to: SupervisorState,
    reason: string,
    delayMs: number | null,
    status: SupervisorStatus,
  ) {
    super(STATE_CHANGE_EVENT);
    this.from = from;
    this.to = to;
    this.reason = reason;
    this.delayMs = delayMs;
    this.status = status;
  }
}

/** One worker incarnation and the listeners attached to it. */
interface Incarnation {
  readonly n: number;
  readonly worker: Worker;
  readonly startedAt: number;
  lastBeat: number;
  lastBeatAt: number;
  alive: boolean;
  /** When the state word was first seen reading `stopped` (`null`: not yet). */
  stoppedSince: number | null;
  readonly onMessage: (e: MessageEvent) => void;
  readonly onMessageError: (e: MessageEvent) => void;
  readonly onError: (e: ErrorEvent) => void;
}

interface Settings {
  readonly stallMs: number;
  readonly startTimeoutMs: number;
  readonly graceMs: number;
  readonly initialMs: number;
  readonly maxMs: number;
  readonly factor: number;
  readonly resetAfterMs: number;
  readonly maxCrashes: number;
  readonly windowMs: number;
  readonly watchMs: number;
}

const DAY_MS = 86_400_000;

type Timer = ReturnType<typeof setTimeout>;

function checkNumber(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number") {
    throw new TypeError(`Invalid ${name} "${String(value)}": expected a number`);
  }
  if (!(value >= min && value <= max)) {
    throw new RangeError(`Invalid ${name} "${value}": expected a number from ${min} to ${max}`);
  }
  return value;
}

function checkInteger(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number") {
    throw new TypeError(`Invalid ${name} "${String(value)}": expected a number`);
  }
  if (!(Number.isInteger(value) && value >= min && value <= max)) {
    throw new RangeError(`Invalid ${name} "${value}": expected an integer from ${min} to ${max}`);
  }
  return value;
}

function checkObject(name: string, value: unknown): Record<string, unknown> {
  if (value === undefined) return {};
  if (typeof value !== "object" || value === null) {
    throw new TypeError(`Invalid ${name} "${String(value)}": expected an object`);
  }
  return value as Record<string, unknown>;
}

function settingsOf(opts: SupervisorOptions): Settings {
  const backoff = checkObject("backoff", opts.backoff);
  const breaker = checkObject("breaker", opts.breaker);
  const stallMs = checkNumber("stallMs", opts.stallMs ?? 2000, 1, DAY_MS);
  const startTimeoutMs = checkNumber("startTimeoutMs", opts.startTimeoutMs ?? 10_000, 1, DAY_MS);
  const initialMs = checkNumber("backoff.initialMs", backoff.initialMs ?? 250, 0, DAY_MS);
  const maxMs = checkNumber("backoff.maxMs", backoff.maxMs ?? 10_000, 0, DAY_MS);
  if (maxMs < initialMs) {
    throw new RangeError(
      `Invalid backoff.maxMs "${maxMs}": expected at least backoff.initialMs (${initialMs})`,
    );
  }
  return {
    stallMs,
    startTimeoutMs,
    graceMs: checkNumber("graceMs", opts.graceMs ?? 500, 0, DAY_MS),
    initialMs,
    maxMs,
    factor: checkNumber("backoff.factor", backoff.factor ?? 2, 1, 1000),
    resetAfterMs: checkNumber("backoff.resetAfterMs", backoff.resetAfterMs ?? 30_000, 0, DAY_MS),
    maxCrashes: checkInteger("breaker.maxCrashes", breaker.maxCrashes ?? 5, 1, 1_000_000),
    windowMs: checkNumber("breaker.windowMs", breaker.windowMs ?? 300_000, 0, 365 * DAY_MS),
    // Check often enough to notice a stall within about a quarter of the allowance.
    watchMs: Math.max(5, Math.min(100, Math.min(stallMs, startTimeoutMs) / 4)),
  };
}

function errorText(value: unknown): string {
  if (value instanceof Error) return value.message;
  if (typeof value === "string") return value;
  if (typeof value === "object" && value !== null && "message" in value) {
    return String((value as { message: unknown }).message);
  }
  return String(value);
}

function messageType(msg: unknown): string | null {
  if (typeof msg !== "object" || msg === null) return null;
  const t = (msg as { type?: unknown }).type;
  return typeof t === "string" ? t : null;
}

/**
 * Starts one worker and keeps it running: heartbeat watch, restart with exponential backoff, a
 * crash-loop breaker, graceful stop. Dispatches a {@link SupervisorStateEvent}
 * ({@link STATE_CHANGE_EVENT}) on every change of state.
 *
 * ```ts
 * const sup = new Supervisor({
 *   name: "output",
 *   spawn: (control, incarnation) => {
 *     const w = new Worker(new URL("./pipeline/output_worker.ts", import.meta.url), { type: "module" });
 *     w.postMessage({ control, incarnation, ... });
 *     return w;
 *   },
 *   onMessage: (msg) => ...,
 * });
 * sup.addEventListener(STATE_CHANGE_EVENT, (e) => log((e as SupervisorStateEvent).reason));
 * Atomics.store(sup.control, MY_PRESET_WORD, 2);
 * sup.start();
 * ...
 * await sup.stop();
 * ```
 */
export class Supervisor extends EventTarget {
  /** Name given in the options. */
  readonly name: string;
  /** The shared control block (see the module documentation); survives restarts. */
  readonly control: Int32Array;
  /** The buffer under {@link control}, as passed to `spawn`. */
  readonly buffer: SharedArrayBuffer;

  readonly #spawnWorker: (control: SharedArrayBuffer, incarnation: number) => Worker;
  readonly #onMessage: ((message: unknown, incarnation: number) => void) | undefined;
  readonly #now: () => number;
  readonly #s: Settings;

  #state: SupervisorState = "stopped";
  #current: Incarnation | null = null;
  #nextIncarnation = 0;
  #restarts = 0;
  /** Consecutive crashes that set the backoff exponent. */
  #attempt = 0;
  #crashTimes: number[] = [];
  #lastError: string | null = null;
  #lastExit: ExitKind | null = null;
  #lastExitAt: number | null = null;
  #nextRestartAt: number | null = null;
  #watchTimer: Timer | null = null;
  #backoffTimer: Timer | null = null;
  #graceTimer: Timer | null = null;
  #stopDone: (() => void) | null = null;
  #stopPromise: Promise<void> | null = null;
  #startAfterStop = false;

  /**
   * @throws {TypeError} when `name` is not a non-empty string, `spawn` is not a function, or an
   *   option has the wrong type
   * @throws {RangeError} when a numeric option is out of range
   */
  constructor(opts: SupervisorOptions) {
    super();
    if (typeof opts !== "object" || opts === null) {
      throw new TypeError(`Invalid options "${String(opts)}": expected an object`);
    }
    if (typeof opts.name !== "string" || opts.name === "") {
      throw new TypeError(`Invalid name "${String(opts.name)}": expected a non-empty string`);
    }
    if (typeof opts.spawn !== "function") {
      throw new TypeError(`Invalid spawn "${String(opts.spawn)}": expected a function`);
    }
    if (opts.onMessage !== undefined && typeof opts.onMessage !== "function") {
      throw new TypeError(`Invalid onMessage "${String(opts.onMessage)}": expected a function`);
    }
    if (opts.now !== undefined && typeof opts.now !== "function") {
      throw new TypeError(`Invalid now "${String(opts.now)}": expected a function`);
    }
    const words = checkInteger(
      "controlWords",
      opts.controlWords ?? DEFAULT_CONTROL_WORDS,
      FIRST_PIPELINE_WORD,
      MAX_CONTROL_WORDS,
    );
    this.#s = settingsOf(opts);
    this.name = opts.name;
    this.#spawnWorker = opts.spawn;
    this.#onMessage = opts.onMessage;
    this.#now = opts.now ?? epochMs;
    this.buffer = new SharedArrayBuffer(words * Int32Array.BYTES_PER_ELEMENT);
    this.control = new Int32Array(this.buffer);
  }

  /** Current state. */
  get state(): SupervisorState {
    return this.#state;
  }

  /** Current state and history as plain data. */
  get status(): SupervisorStatus {
    const t = this.#now();
    const inc = this.#current;
    const incarnation = this.#nextIncarnation === 0 ? null : this.#nextIncarnation - 1;
    return {
      name: this.name,
      state: this.#state,
      workerState:
        WORKER_STATE_NAMES.get(stateOf(Atomics.load(this.control, CONTROL_WORD.state))) ??
          null,
      incarnation,
      restarts: this.#restarts,
      crashes: this.#crashesInWindow(t),
      lastError: this.#lastError,
      lastExit: this.#lastExit,
      lastExitAt: this.#lastExitAt,
      nextRestartAt: this.#nextRestartAt,
      breakerOpen: this.#state === "broken",
      uptimeMs: inc === null ? 0 : Math.max(0, t - inc.startedAt),
      heartbeatAgeMs: inc === null ? null : Math.max(0, t - inc.lastBeatAt),
    };
  }

  /**
   * Starts a worker when the state is `stopped` (resetting the backoff delay; crashes in the
   * breaker window still count). While `stopping`, starts one as soon as the stop completes (a
   * later {@link stop} cancels that). Does nothing in the other states: a worker is already up or
   * due, or the breaker is open (see {@link resetBreaker}).
   */
  start(): void {
    if (this.#state === "stopping") {
      this.#startAfterStop = true;
      return;
    }
    if (this.#state !== "stopped") return;
    this.#attempt = 0;
    this.#spawn("start requested");
  }

  /**
   * Stops the worker: sets the stop word and waits for the worker to report `stopped` (or
   * `ended`) — or for `graceMs` — then terminates it. Cancels a pending restart (and a start
   * queued during a stop) and closes an open breaker. Idempotent; concurrent calls share one
   * promise.
   */
  stop(): Promise<void> {
    this.#startAfterStop = false;
    if (this.#stopPromise !== null) return this.#stopPromise;
    switch (this.#state) {
      case "stopped":
        return Promise.resolve();
      case "backoff":
      case "broken":
        this.#clearBackoff();
        this.#setState("stopped", "stop requested");
        return Promise.resolve();
      case "starting":
      case "running":
      case "stopping":
        break;
    }
    const inc = this.#current!;
    Atomics.store(this.control, CONTROL_WORD.stop, STOP_REQUESTED);
    Atomics.notify(this.control, CONTROL_WORD.stop);
    this.#stopPromise = new Promise<void>((resolve) => (this.#stopDone = resolve));
    this.#graceTimer = setTimeout(() => {
      this.#graceTimer = null;
      this.#finishStop(inc, `terminated after the ${this.#s.graceMs} ms grace period`);
    }, this.#s.graceMs);
    this.#setState("stopping", "stop requested");
    return this.#stopPromise;
  }

  /**
   * Stops the worker (gracefully, as {@link stop}) and starts a new incarnation with the backoff
   * delay reset. Works from any state, including `broken` (crashes in the window still count: the
   * next crash reopens the breaker; {@link resetBreaker} forgets them).
   */
  async restart(): Promise<void> {
    await this.stop();
    this.start();
  }

  /**
   * Forgets past crashes and resets the backoff delay; when the breaker is open (state `broken`),
   * closes it and starts a worker.
   */
  resetBreaker(): void {
    this.#crashTimes = [];
    this.#attempt = 0;
    if (this.#state === "broken") this.#spawn("breaker reset");
  }

  /** Stops the worker ({@link stop}). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }

  #setState(to: SupervisorState, reason: string, delayMs: number | null = null): void {
    const from = this.#state;
    this.#state = to;
    this.dispatchEvent(new SupervisorStateEvent(from, to, reason, delayMs, this.status));
  }

  #crashesInWindow(t: number): number {
    const since = t - this.#s.windowMs;
    while (this.#crashTimes.length > 0 && this.#crashTimes[0]! <= since) this.#crashTimes.shift();
    return this.#crashTimes.length;
  }

  #clearBackoff(): void {
    if (this.#backoffTimer !== null) clearTimeout(this.#backoffTimer);
    this.#backoffTimer = null;
    this.#nextRestartAt = null;
  }

  #spawn(reason: string): void {
    const n = this.#nextIncarnation++;
    if (n > 0) this.#restarts++;
    Atomics.store(this.control, CONTROL_WORD.stop, 0);
    Atomics.store(this.control, CONTROL_WORD.state, stateWord(n, WORKER_STATE.starting));
    Atomics.store(this.control, CONTROL_WORD.incarnation, n);
    const startedAt = this.#now();
    let worker: Worker;
    try {
      worker = this.#spawnWorker(this.buffer, n);
      if (!(worker instanceof Worker)) {
        throw new TypeError(
          `Invalid worker "${String(worker)}": expected spawn to return a Worker`,
        );
      }
    } catch (e) {
      this.#setState("starting", reason);
      this.#crashed(startedAt, "crash", `Cannot start worker "${this.name}": ${errorText(e)}`);
      return;
    }
    const inc: Incarnation = {
      n,
      worker,
      startedAt,
      lastBeat: Atomics.load(this.control, CONTROL_WORD.heartbeat),
      lastBeatAt: startedAt,
      alive: false,
      stoppedSince: null,
      onMessage: (e) => this.#message(inc, e.data),
      onMessageError: () => {
        if (this.#current === inc) {
          this.#exit(inc, "crash", "A message from the worker could not be deserialized");
        }
      },
      onError: (e) => {
        e.preventDefault();
        if (this.#current === inc) {
          this.#exit(inc, "crash", e.message || "Uncaught error in the worker");
        }
      },
    };
    worker.addEventListener("message", inc.onMessage);
    worker.addEventListener("messageerror", inc.onMessageError);
    worker.addEventListener("error", inc.onError);
    this.#current = inc;
    this.#watchTimer = setInterval(() => this.#watch(inc), this.#s.watchMs);
    this.#setState("starting", reason);
  }

  #message(inc: Incarnation, msg: unknown): void {
    if (this.#current !== inc) return;
    this.#onMessage?.(msg, inc.n);
    // onMessage may have stopped or replaced the worker.
    if (this.#current !== inc) return;
    switch (messageType(msg)) {
      case "fatal":
        this.#exit(inc, "crash", errorText((msg as { error?: unknown }).error));
        break;
      case "ended":
      case "stopped":
        this.#exit(inc, "ended", null);
        break;
    }
  }

  #watch(inc: Incarnation): void {
    if (this.#current !== inc) return;
    const t = this.#now();
    const beat = Atomics.load(this.control, CONTROL_WORD.heartbeat);
    if (beat !== inc.lastBeat) {
      inc.lastBeat = beat;
      inc.lastBeatAt = t;
      if (!inc.alive) {
        inc.alive = true;
        if (this.#state === "starting") this.#setState("running", "heartbeat");
      }
    }
    // A worker whose state word says it stopped is done if its last message has not come by
    // STOPPED_WORD_WAIT_MS (the message normally ends it first, see the module notes).
    if (stateOf(Atomics.load(this.control, CONTROL_WORD.state)) === WORKER_STATE.stopped) {
      inc.stoppedSince ??= t;
      if (t - inc.stoppedSince >= Math.min(STOPPED_WORD_WAIT_MS, this.#s.stallMs)) {
        return this.#exit(inc, "ended", null);
      }
      return; // stopped, not stalled: its heartbeat has ended
    }
    if (this.#state === "stopping") return; // the grace timer bounds a stop
    const limit = inc.alive ? this.#s.stallMs : this.#s.startTimeoutMs;
    const age = t - inc.lastBeatAt;
    if (age > limit) {
      const what = inc.alive ? "No heartbeat" : "No heartbeat since the start";
      this.#exit(inc, "stall", `${what} for ${Math.round(age)} ms (limit ${limit} ms)`);
    }
  }

  /** Terminates the incarnation and detaches everything from it. */
  #retire(inc: Incarnation): void {
    inc.worker.terminate();
    // terminate() does not stop a busy worker (see "Retiring a worker"): tell it.
    Atomics.store(this.control, CONTROL_WORD.incarnation, RETIRED);
    Atomics.notify(this.control, CONTROL_WORD.stop);
    Atomics.store(this.control, CONTROL_WORD.state, stateWord(RETIRED_OWNER, WORKER_STATE.stopped));
    inc.worker.removeEventListener("message", inc.onMessage);
    inc.worker.removeEventListener("messageerror", inc.onMessageError);
    inc.worker.removeEventListener("error", inc.onError);
    if (this.#watchTimer !== null) clearInterval(this.#watchTimer);
    this.#watchTimer = null;
    if (this.#current === inc) this.#current = null;
  }

  /** The current incarnation ended, crashed or stalled. */
  #exit(inc: Incarnation, kind: ExitKind, error: string | null): void {
    if (this.#state === "stopping") {
      if (error !== null) this.#lastError = error;
      this.#finishStop(inc, error === null ? "worker stopped" : `worker exited: ${error}`);
      return;
    }
    this.#retire(inc);
    if (kind === "ended") {
      this.#lastExit = "ended";
      this.#lastExitAt = this.#now();
      this.#setState("stopped", "worker ended");
      return;
    }
    this.#crashed(inc.startedAt, kind === "stall" ? "stall" : "crash", error ?? "Unknown error");
  }

  #crashed(startedAt: number, kind: "crash" | "stall", error: string): void {
    const t = this.#now();
    this.#lastError = error;
    this.#lastExit = kind;
    this.#lastExitAt = t;
    if (t - startedAt >= this.#s.resetAfterMs) this.#attempt = 0;
    this.#crashTimes.push(t);
    const crashes = this.#crashesInWindow(t);
    if (crashes >= this.#s.maxCrashes) {
      this.#setState(
        "broken",
        `${error}; ${crashes} crashes within ${this.#s.windowMs} ms, not restarting`,
      );
      return;
    }
    const delay = Math.min(this.#s.maxMs, this.#s.initialMs * this.#s.factor ** this.#attempt);
    this.#attempt++;
    this.#nextRestartAt = t + delay;
    this.#backoffTimer = setTimeout(() => {
      this.#backoffTimer = null;
      this.#nextRestartAt = null;
      this.#spawn("restart after backoff");
    }, delay);
    this.#setState("backoff", error, delay);
  }

  #finishStop(inc: Incarnation, reason: string): void {
    if (this.#graceTimer !== null) clearTimeout(this.#graceTimer);
    this.#graceTimer = null;
    this.#retire(inc);
    this.#lastExit = "stopped";
    this.#lastExitAt = this.#now();
    const done = this.#stopDone;
    this.#stopDone = null;
    this.#stopPromise = null;
    this.#setState("stopped", reason);
    done?.();
    if (this.#startAfterStop && this.#state === "stopped") {
      this.#startAfterStop = false;
      this.start();
    }
  }
}
