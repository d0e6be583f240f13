/**
 * The audio service: owns both pipelines (each a supervised Web Worker), their rings, the
 * control state and the metrics. The one object the API talks to.
 *
 * - Output: capture worker → output ring → {@link AudioService.subscribe}d listeners (WebSocket).
 *   RTP senders are served by the capture worker itself ({@link AudioService.rtpOutput}). The main
 *   thread only moves packets; it never does codec or device work.
 * - Microphone: {@link AudioService.pushMicrophonePacket} validates a received packet and writes it
 *   into the input ring → input worker → playback device.
 * - Control state (presets, mute, which pipelines run) lives in the supervisors' shared control
 *   blocks, so a worker restart loses none of it, and in a state file, so a process restart loses
 *   none of it either. When a state file exists its values win over the start-up flags: they are
 *   the operator's latest choice.
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import { Pcm } from "../ffi/alsa.ts";
import { OpusDecoder, OpusEncoder } from "../ffi/opus.ts";
import { Resampler } from "../ffi/speexdsp.ts";
import { FrameRing, type ReadSlot } from "./frame_ring.ts";
import { Registry } from "./metrics.ts";
import {
  CONTROL,
  type DeviceInfo,
  epochMs,
  FrameFlag,
  INPUT_FLAG,
  INPUT_RING,
  type InputInit,
  ORPHAN,
  ORPHAN_KINDS,
  type OrphanKind,
  orphanSlots,
  OUTPUT_RING,
  type OutputInit,
  type Pace,
  type WorkerMessage,
} from "./pipeline/messages.ts";
import {
  inputMetrics,
  microphoneMalformedSeries,
  outputMetrics,
  transportMetrics,
} from "./pipeline/pipeline_metrics.ts";
import { checkMicrophonePacket } from "./pipeline/microphone_packet.ts";
import { RTP_STATS_BYTES } from "./transport/rtp_header.ts";
import { RtpOutTable } from "./transport/rtp_out.ts";
import { pollUntil, WORKER_CALL_WAIT_MS } from "./poll.ts";
import {
  frameSamples,
  getPreset,
  MICROPHONE_PRESETS,
  needsNewEncoder,
  OUTPUT_PRESETS,
  type Preset,
  PRESET_NAMES,
  type PresetName,
} from "./quality.ts";
import { type ControlState, readControlState, writeControlState } from "./state_file.ts";
import {
  STATE_CHANGE_EVENT,
  Supervisor,
  type SupervisorOptions,
  type SupervisorStateEvent,
  type SupervisorStatus,
} from "./supervisor.ts";

const log = getLogger(["kvm-audio", "service"]);

/**
 * The frame pump batches its wake-ups when frames come closer together than this (ms): below the
 * shortest Opus frame (2.5 ms), so a paced stream is never batched.
 */
const COALESCE_BELOW_MS = 2;
/** Consecutive wake-ups closer than {@link COALESCE_BELOW_MS} before the pump batches. */
const COALESCE_AFTER = 4;
/**
 * How long a batching pump lets frames gather (ms). Flat out the output worker encodes an ultra
 * frame in ≈ 0.1 ms, so 4 ms gathers ≈ 40 of the ring's 64 (and under flat pacing the worker waits
 * for room rather than drop); each timer turn of Deno's event loop costs ≈ 0.2 ms of CPU here.
 */
const COALESCE_SLEEP_MS = 4;

/** Options of {@link AudioService}. */
export interface ServiceOptions {
  /** ALSA capture PCM for the output pipeline; `null` disables the output pipeline. */
  capture: string | null;
  /** ALSA playback PCM for the microphone pipeline; `null` disables it. */
  playback: string | null;
  captureRate?: number;
  captureChannels?: number;
  playbackRate?: number;
  playbackChannels?: number;
  outputPreset?: PresetName;
  microphonePreset?: PresetName;
  /** Where control state is saved; none when unset. */
  stateFile?: string;
  /**
   * "clock" paces unpaced virtual devices by the wall clock (tests, demos); "flat" runs both
   * pipelines flat out with no clock (benchmarks, offline decoding; see {@link Pace}).
   */
  pace?: Pace;
  /** Stop capture after this many 48 kHz samples (finite test input). */
  maxCaptureSamples?: number;
  /** Honour the test-only fault switch. */
  allowFaults?: boolean;
  /** Supervisor tuning (stall detection, backoff, breaker). */
  supervisor?: Partial<Omit<SupervisorOptions, "name" | "spawn" | "onMessage">>;
  /** Playout buffer bounds, frames. */
  minDepth?: number;
  maxDepth?: number;
  metricsIntervalMs?: number;
}

/** One encoded output frame as handed to listeners; valid only during the call. */
export interface EncodedFrame {
  /** The Opus packet (a view onto the ring slot: copy it to keep it). */
  readonly data: Uint8Array;
  /** Frame counter (wraps at 2³²). */
  readonly seq: number;
  /** RTP timestamp, 48 kHz ticks. */
  readonly timestamp: number;
  /** Samples per channel at 48 kHz. */
  readonly samples: number;
  readonly channels: number;
  /** DTX/silence packet. */
  readonly silence: boolean;
  /** Epoch ms the frame's last sample was captured. */
  readonly capturedAt: number;
}

/** A listener of encoded output frames. Must not block; must copy what it keeps. */
export type FrameListener = (frame: EncodedFrame) => void;

/** How a preset change was applied. */
export type PresetChange = "unchanged" | "live" | "rebuilt" | "stored";

/** Status of one pipeline. */
export interface PipelineStatus {
  readonly enabled: boolean;
  /** The worker runs with its device open. */
  readonly running: boolean;
  /**
   * The supervisor's state (`stopped`, `starting`, `running`, `stopping`, `backoff`, `broken`),
   * `waiting-for-device` while the worker runs without its device, or `disabled`.
   */
  readonly state: string;
  readonly device: string | null;
  /** What the device gave when last opened. */
  readonly obtained: DeviceInfo | null;
  readonly lastDeviceError: string | null;
  readonly preset: PresetName;
  readonly supervisor: SupervisorStatus | null;
}

/** Why a microphone packet was refused. */
export type PushResult = "queued" | "malformed" | "not-running";

/**
 * Where the worker modules are. From source (and in a `deno compile` executable, which keeps the
 * source layout and embeds the workers through `--include`) they sit beside this file. In a bundle
 * (`deno task bundle`), this code is inlined into the bundle's entry `main.js`, and the workers
 * were bundled as entries of their own under `lib/pipeline/` beside it.
 */
function workerUrl(name: "output_worker" | "input_worker"): string {
  const here = import.meta.url;
  return here.endsWith("/lib/service.ts")
    ? new URL(`./pipeline/${name}.ts`, here).href
    : new URL(`./lib/pipeline/${name}.js`, here).href;
}

const WORKER_URLS = { output: workerUrl("output_worker"), input: workerUrl("input_worker") };

/** How often a retired worker's exit word is looked at while its orphans wait to be freed. */
const ORPHAN_POLL_MS = 50;

class Pipeline {
  readonly supervisor: Supervisor;
  readonly ring: FrameRing;
  obtained: DeviceInfo | null = null;
  lastDeviceError: string | null = null;
  wanted = false;
  /** Native objects of retired workers freed by {@link Pipeline.#takeOrphans}, by kind. */
  readonly orphansReleased: Record<OrphanKind, number> = { pcm: 0, codec: 0, resampler: 0 };

  constructor(
    readonly kind: "output" | "input",
    readonly device: string | null,
    ringGeometry: { slots: number; slotBytes: number },
    makeInit: (
      control: SharedArrayBuffer,
      incarnation: number,
      ring: SharedArrayBuffer,
    ) => OutputInit | InputInit,
    onMessage: (msg: WorkerMessage) => void,
    options: ServiceOptions["supervisor"],
  ) {
    this.ring = FrameRing.create(ringGeometry);
    this.supervisor = new Supervisor({
      ...options,
      name: kind,
      spawn: (control, incarnation) => {
        const w = new Worker(WORKER_URLS[kind], { type: "module", name: `kvm-audio-${kind}` });
        // No preset is applied until the new worker has made its encoder.
        Atomics.store(new Int32Array(control), CONTROL.appliedPreset, -1);
        const exit = new SharedArrayBuffer(4);
        this.#exit = new Int32Array(exit);
        w.postMessage({ ...makeInit(control, incarnation, this.ring.buffer), exit });
        return w;
      },
      onMessage: (msg) => onMessage(msg as WorkerMessage),
    });
    this.supervisor.addEventListener(STATE_CHANGE_EVENT, (e) => {
      const to = (e as SupervisorStateEvent).to;
      if (to === "backoff" || to === "broken" || to === "stopped") {
        // Nothing encodes now: the dead worker's preset is not "applied" (see appliedOutputPreset).
        Atomics.store(this.supervisor.control, CONTROL.appliedPreset, -1);
        this.#takeOrphans();
      }
    });
  }

  /** The exit word of the last incarnation spawned (see `PipelineInit.exit`). */
  #exit: Int32Array | null = null;
  /** Orphans taken over and not freed yet (their worker has not finished): for `close`. */
  #pending = 0;

  /**
   * An incarnation was retired (it ended, crashed, stalled or was stopped): takes over what it
   * still lists in the orphan slots — nothing, when it released everything on its way out — and
   * frees it once the worker says it has finished (see `WorkerControl`). `terminate()` does not
   * stop a worker stuck in a C call (lib/supervisor.ts, "Retiring a worker"): it goes on when the
   * call returns, and freeing its objects at a fixed delay (150 ms, as until 2026-11-25) freed an
   * encoder the worker later freed again — a double free that aborted the process after
   * PulseAudio hung for 8 s while a device was missing. A worker that never finishes (a C call
   * that never returns) keeps its objects: they are in use. The slots are empty again at once, so
   * the next incarnation lists its own without waiting.
   */
  #takeOrphans(): void {
    const slots = orphanSlots(this.supervisor.buffer);
    const tokens = ORPHAN_KINDS.map((k) => Atomics.exchange(slots, ORPHAN[k], 0n));
    const exit = this.#exit;
    if (tokens.every((t) => t === 0n)) return;
    this.#pending++;
    const free = () => {
      this.#pending--;
      ORPHAN_KINDS.forEach((kind, i) => {
        const token = tokens[i]!;
        if (token === 0n) return;
        try {
          if (kind === "pcm") Pcm.closeOrphan(token);
          else if (kind === "resampler") Resampler.destroyOrphan(token);
          else if (this.kind === "output") OpusEncoder.destroyOrphan(token);
          else OpusDecoder.destroyOrphan(token);
          this.orphansReleased[kind]++;
          log.warn("Freed the {what} left by a retired {kind} worker", {
            what: kind === "pcm" ? "device" : kind,
            kind: this.kind,
          });
        } catch (e) {
          log.error("Cannot free the {what} left by a retired {kind} worker: {error}", {
            what: kind === "pcm" ? "device" : kind,
            kind: this.kind,
            error: (e as Error).message,
          });
        }
      });
    };
    // Polled: the worker cannot notify the main thread's event loop cheaply, and this is rare.
    const poll = () => {
      if (exit !== null && Atomics.load(exit, 0) === 1) return free();
      const t = setTimeout(poll, ORPHAN_POLL_MS);
      Deno.unrefTimer(t);
    };
    poll();
  }

  /** Orphans taken over from retired workers that have not finished yet. */
  get pendingOrphans(): number {
    return this.#pending;
  }

  get control(): Int32Array {
    return this.supervisor.control;
  }
}

/** The audio service. Create, {@link start}, and {@link close} when done. */
export class AudioService implements AsyncDisposable {
  readonly options: Readonly<ServiceOptions>;
  /** Every metric of the service; worker series are absorbed from their snapshots. */
  readonly metrics = new Registry();
  readonly #t = transportMetrics(this.metrics);
  /** The series {@link AudioService.pushMicrophonePacket} counts in, bound once (per packet). */
  readonly #micSeries = (() => {
    const t = this.#t;
    return {
      received: {
        websocket: t.received.labels({ transport: "websocket" }),
        rtp: t.received.labels({ transport: "rtp" }),
        local: t.received.labels({ transport: "local" }),
      },
      malformed: microphoneMalformedSeries(t),
      stopped: t.dropped.labels({ reason: "microphone_stopped" }),
      ringFull: t.dropped.labels({ reason: "input_ring_full" }),
    };
  })();
  readonly #output: Pipeline | null;
  readonly #input: Pipeline | null;
  /**
   * Where the input worker counts the RTP input it reads (`RTP_STATS` words; see
   * {@link AudioService.attachRtpInput}).
   */
  readonly rtpInputStats: SharedArrayBuffer = new SharedArrayBuffer(RTP_STATS_BYTES);
  /**
   * The RTP senders the output worker sends to itself, as it encodes (see `RtpSender`): RTP
   * output wakes no thread but the worker.
   */
  readonly rtpOutput: RtpOutTable = RtpOutTable.create();
  #rtpAttached = false;
  #state: ControlState;
  readonly #listeners = new Set<FrameListener>();
  readonly #controlListeners = new Set<() => void>();
  #pumping = false;
  #closed = false;
  #pump: Promise<void> | null = null;

  constructor(options: ServiceOptions) {
    this.options = Object.freeze({ ...options });
    // Register the worker series here too, so they are exposed (as zero) before any snapshot.
    outputMetrics(this.metrics);
    inputMetrics(this.metrics);

    const saved = options.stateFile
      ? readControlState(options.stateFile, (msg) => log.warn(msg))
      : null;
    this.#state = {
      outputPreset: saved?.outputPreset ??
        (options.outputPreset ? getPreset("output", options.outputPreset).name : "high"),
      microphonePreset: saved?.microphonePreset ??
        (options.microphonePreset
          ? getPreset("microphone", options.microphonePreset).name
          : "high"),
      muted: saved?.muted ?? false,
      // Whether the operator wants a pipeline running: yes unless one stopped it. A pipeline
      // disabled by a flag keeps this (from the file, or true) without running, so the file still
      // says what the operator chose once the flag goes; start() starts only enabled pipelines.
      outputRunning: saved?.outputRunning ?? true,
      microphoneRunning: saved?.microphoneRunning ?? true,
    };
    if (saved) {
      // The saved choices win over the flags: say so, or a pipeline an operator stopped last
      // time stays stopped with nothing in the log to tell why.
      const st = this.#state;
      const run = (on: boolean, enabled: boolean, start: string) =>
        !enabled ? "disabled" : on ? "running" : `stopped (${start} starts it)`;
      const output = run(st.outputRunning, options.capture !== null, "POST /api/audio/start");
      const mic = run(
        st.microphoneRunning,
        options.playback !== null,
        "POST /api/microphone/start",
      );
      // One plain message (property values would be quoted); braces in the path are escaped, as
      // LogTape reads `{…}` in a message as a placeholder.
      const path = options.stateFile!.replaceAll("{", "{{").replaceAll("}", "}}");
      log.info(
        `Control state from ${path}: output ${output}, preset ${st.outputPreset}${
          st.muted ? ", muted" : ""
        }; microphone ${mic}, preset ${st.microphonePreset}`,
      );
    }

    const common = {
      allowFaults: options.allowFaults ?? false,
      metricsIntervalMs: options.metricsIntervalMs ?? 500,
      pace: options.pace ?? "device",
    } as const;
    this.#output = options.capture === null ? null : new Pipeline(
      "output",
      options.capture,
      OUTPUT_RING,
      (control, incarnation, ring): OutputInit => ({
        kind: "output",
        control,
        incarnation,
        ring,
        device: options.capture!,
        deviceRate: options.captureRate ?? 48000,
        deviceChannels: options.captureChannels ?? 2,
        // Where the previous incarnation stopped (0 at the first start).
        firstSeq: Atomics.load(new Int32Array(control), CONTROL.nextSeq),
        firstTimestamp: Atomics.load(new Int32Array(control), CONTROL.nextTimestamp) >>> 0,
        rtpOut: this.rtpOutput.buffer,
        ...(options.maxCaptureSamples !== undefined
          ? { maxSamples: options.maxCaptureSamples }
          : {}),
        ...common,
      }),
      (msg) => this.#onWorkerMessage("output", msg),
      options.supervisor,
    );
    this.#input = options.playback === null ? null : new Pipeline(
      "input",
      options.playback,
      INPUT_RING,
      (control, incarnation, ring): InputInit => ({
        kind: "input",
        control,
        incarnation,
        ring,
        device: options.playback!,
        deviceRate: options.playbackRate ?? 48000,
        deviceChannels: options.playbackChannels ?? 2,
        ...(options.minDepth !== undefined ? { minDepth: options.minDepth } : {}),
        ...(options.maxDepth !== undefined ? { maxDepth: options.maxDepth } : {}),
        rtpStats: this.rtpInputStats,
        ...common,
      }),
      (msg) => this.#onWorkerMessage("input", msg),
      options.supervisor,
    );
    if (this.#input) Atomics.store(this.#input.control, CONTROL.rtpFd, -1);
    // Both pipelines' loss counters exist from the start (0 is news too).
    if (this.#output) this.#t.deviceLost.labels({ pipeline: "output" });
    if (this.#input) this.#t.deviceLost.labels({ pipeline: "input" });
    this.#writeControlWords();
  }

  /** Starts the enabled pipelines the control state says should run. */
  start(): void {
    if (this.#output && this.#state.outputRunning) this.startOutput();
    if (this.#input && this.#state.microphoneRunning) this.startMicrophone();
  }

  // -------------------------------------------------------------------------------------------
  // Control.

  #writeControlWords(): void {
    if (this.#output) {
      const c = this.#output.control;
      Atomics.store(c, CONTROL.preset, PRESET_NAMES.indexOf(this.#state.outputPreset));
      Atomics.store(c, CONTROL.muted, this.#state.muted ? 1 : 0);
      Atomics.add(c, CONTROL.generation, 1);
    }
    if (this.#input) {
      const c = this.#input.control;
      Atomics.store(c, CONTROL.preset, PRESET_NAMES.indexOf(this.#state.microphonePreset));
      Atomics.add(c, CONTROL.generation, 1);
    }
  }

  #saveError: string | null = null;

  /**
   * Adds a listener called after every control change (preset, mute, start, stop), whoever made
   * it; returns its removal.
   */
  onControlChange(listener: () => void): () => void {
    this.#controlListeners.add(listener);
    return () => this.#controlListeners.delete(listener);
  }

  #changed(): void {
    for (const l of this.#controlListeners) {
      try {
        l();
      } catch (e) {
        log.error("Control listener failed: {error}", { error: (e as Error).message });
      }
    }
  }

  #save(): void {
    if (!this.options.stateFile) return;
    try {
      writeControlState(this.options.stateFile, this.#state);
      this.#saveError = null;
    } catch (e) {
      const error = (e as Error).message;
      // The change stands (it is in effect); only its survival of a restart is lost. Health says
      // so until a save works again (routes/health.ts).
      this.#saveError = `cannot save ${this.options.stateFile}: ${error}`;
      log.error("Cannot save state file {path}: {error}", { path: this.options.stateFile, error });
    }
  }

  /**
   * Why the last save of the state file failed — the control state in effect would not survive a
   * restart; null when the last save worked, or none was needed.
   */
  get stateFileProblem(): string | null {
    return this.#saveError;
  }

  /** The saved control state. */
  get controlState(): Readonly<ControlState> {
    return { ...this.#state };
  }

  /**
   * Starts (or resumes) the output pipeline. A start is the operator trying again: past crashes
   * are forgotten (an open crash-loop breaker closes; after a stop, the next crash does not reopen
   * it at once).
   */
  startOutput(): void {
    const p = this.#require(this.#output, "output");
    p.wanted = true;
    this.#state.outputRunning = true;
    this.#save();
    p.supervisor.resetBreaker();
    p.supervisor.start();
    this.#startPump();
    this.#changed();
  }

  /**
   * Stops the output pipeline (gracefully, then by terminate). Resolves once the frames the
   * worker published before it stopped have gone to the listeners too (waited for up to a second).
   */
  async stopOutput(): Promise<void> {
    const p = this.#require(this.#output, "output");
    p.wanted = false;
    this.#state.outputRunning = false;
    this.#save();
    this.#changed();
    await p.supervisor.stop();
    // The frame pump hands frames over synchronously, in the turn that claims them.
    await pollUntil(() => !this.#pumping || p.ring.available === 0, 1000);
  }

  /** Starts the microphone (input) pipeline; past crashes are forgotten, as for the output. */
  startMicrophone(): void {
    const p = this.#require(this.#input, "microphone");
    p.wanted = true;
    this.#state.microphoneRunning = true;
    this.#save();
    p.supervisor.resetBreaker();
    p.supervisor.start();
    this.#changed();
  }

  /** Stops the microphone pipeline. */
  async stopMicrophone(): Promise<void> {
    const p = this.#require(this.#input, "microphone");
    p.wanted = false;
    this.#state.microphoneRunning = false;
    this.#save();
    this.#changed();
    await p.supervisor.stop();
  }

  #require(p: Pipeline | null, what: string): Pipeline {
    if (p === null) {
      throw new ServiceUnavailableError(
        `Cannot control the ${what} pipeline: it is disabled (no ${
          what === "output" ? "capture" : "playback"
        } device configured)`,
      );
    }
    return p;
  }

  /**
   * Sets the output preset. Codec settings change on the running encoder (`"live"`); a change
   * of channels, frame duration or application builds a new encoder at a frame boundary
   * (`"rebuilt"`). When the pipeline is not running the choice is only stored (`"stored"`).
   * "live" or "rebuilt" is judged against the preset the worker encodes with at the call — not
   * the one chosen last: two quick changes (high → low → medium) reach the worker as one, from
   * high to medium, live.
   */
  setOutputPreset(name: unknown): PresetChange {
    const next = getPreset("output", name);
    const prev = OUTPUT_PRESETS[this.#state.outputPreset];
    if (next === prev) return "unchanged";
    const encoding = this.appliedOutputPreset;
    this.#state.outputPreset = next.name;
    this.#save();
    this.#writeControlWords();
    this.#changed();
    // Not running, starting, in backoff or broken: the next worker starts with it.
    if (!this.#output?.wanted || encoding === null) return "stored";
    return needsNewEncoder(OUTPUT_PRESETS[encoding], next) ? "rebuilt" : "live";
  }

  /**
   * Sets the microphone preset: what clients are told to send. The decoder follows whatever
   * frame duration the packets carry, so nothing restarts.
   */
  setMicrophonePreset(name: unknown): PresetChange {
    const next = getPreset("microphone", name);
    if (next.name === this.#state.microphonePreset) return "unchanged";
    this.#state.microphonePreset = next.name;
    this.#save();
    this.#writeControlWords();
    this.#changed();
    return "stored";
  }

  /** Mutes or unmutes the output: a muted output sends no packets at all (not silent ones). */
  setMuted(muted: unknown): void {
    if (typeof muted !== "boolean") {
      throw new TypeError(
        `Cannot set muted ${JSON.stringify(muted) ?? String(muted)}: expected true or false`,
      );
    }
    this.#state.muted = muted;
    this.#save();
    this.#writeControlWords();
    this.#changed();
  }

  get outputPreset(): Preset {
    return OUTPUT_PRESETS[this.#state.outputPreset];
  }

  get microphonePreset(): Preset {
    return MICROPHONE_PRESETS[this.#state.microphonePreset];
  }

  get muted(): boolean {
    return this.#state.muted;
  }

  /** Counts of preset changes the output worker applied: live and by a new encoder. */
  get outputPresetChanges(): { live: number; rebuilt: number } {
    const c = this.#output?.control;
    return {
      live: c ? Atomics.load(c, CONTROL.liveChanges) : 0,
      rebuilt: c ? Atomics.load(c, CONTROL.rebuilds) : 0,
    };
  }

  /**
   * The preset the output worker currently encodes with (it applies changes between frames);
   * null while no worker has an encoder — stopped, starting, in backoff, breaker open.
   */
  get appliedOutputPreset(): PresetName | null {
    const c = this.#output?.control;
    if (!c || !this.#output?.wanted) return null;
    return PRESET_NAMES[Atomics.load(c, CONTROL.appliedPreset)] ?? null;
  }

  // -------------------------------------------------------------------------------------------
  // Output frames.

  /** Adds a listener of encoded output frames; returns its removal. */
  subscribe(listener: FrameListener): () => void {
    this.#listeners.add(listener);
    this.#tellListeners();
    return () => {
      this.#listeners.delete(listener);
      this.#tellListeners();
    };
  }

  /** The output worker encodes only while someone listens (see `CONTROL.listeners`). */
  #tellListeners(): void {
    if (this.#output) Atomics.store(this.#output.control, CONTROL.listeners, this.#listeners.size);
  }

  get listenerCount(): number {
    return this.#listeners.size;
  }

  #startPump(): void {
    if (this.#pumping || !this.#output) return;
    this.#pumping = true;
    const ring = this.#output.ring;
    const handed = this.#t.encodedToHanded;
    const dropped = this.#t.dropped.labels({ reason: "ring_full" });
    let lastDropped = ring.dropped;
    const frame: { -readonly [K in keyof EncodedFrame]: EncodedFrame[K] } = {
      data: new Uint8Array(0),
      seq: 0,
      timestamp: 0,
      samples: 0,
      channels: 0,
      silence: false,
      capturedAt: 0,
    };
    const deliver = (slot: ReadSlot) => {
      frame.data = slot.data;
      frame.seq = slot.seq >>> 0;
      frame.timestamp = slot.t[2]! >>> 0;
      frame.samples = slot.samples;
      frame.channels = slot.t[3]!;
      frame.silence = (slot.flags & FrameFlag.silence) !== 0;
      frame.capturedAt = slot.t[0]!;
      for (const l of this.#listeners) {
        try {
          l(frame);
        } catch (e) {
          log.error("Output listener failed: {error}", { error: (e as Error).message });
        }
      }
      handed.observe(epochMs() - slot.t[1]!);
    };
    // One long-lived timer keeps the event loop alive while the pump waits (instead of one timer
    // per wait, a hundred times a second).
    const keepAlive = setInterval(() => {}, 60_000);
    this.#pump = (async () => {
      let lastWake = -Infinity, fastWakes = 0;
      while (!this.#closed) {
        // No timeout: close() wakes the ring (see nextAsync on what a timeout costs per frame).
        await ring.nextAsync();
        const now = performance.now();
        fastWakes = now - lastWake < COALESCE_BELOW_MS ? fastWakes + 1 : 0;
        lastWake = now;
        if (ring.available > 0 && fastWakes >= COALESCE_AFTER) {
          // Frames keep coming faster than one per COALESCE_BELOW_MS (a flat-out source): take
          // them in batches after a short timer instead of one wake-up of this thread (and one
          // notify by the worker) per frame. A paced stream never gets here — its frames are
          // 2.5–60 ms apart, and a device's burst of a few periods is fewer than COALESCE_AFTER
          // — so this adds no latency to live audio.
          await new Promise((resolve) => setTimeout(resolve, COALESCE_SLEEP_MS));
        }
        for (let s = ring.claim(); s !== null; s = ring.claim()) deliver(s);
        const d = ring.dropped;
        if (d !== lastDropped) {
          dropped.inc(d - lastDropped);
          lastDropped = d;
        }
        if (ring.ended && ring.available === 0) break;
      }
      clearInterval(keepAlive);
      this.#pumping = false;
    })();
  }

  // -------------------------------------------------------------------------------------------
  // Microphone packets.

  /**
   * Validates a received microphone packet and queues it for the input worker. A malformed packet
   * (empty, oversized, unparseable TOC, not 2.5–120 ms, bad sequence/timestamp) is counted and
   * dropped; it never reaches the decoder. `newStream` marks the first packet of a new sender's
   * stream (a new talker connection): the playout buffer starts over at its number instead of
   * judging it against the previous sender's (see `PlayoutBuffer.push`). A caller whose marked
   * packet was not queued should mark its next one.
   */
  pushMicrophonePacket(
    packet: Uint8Array,
    seq: number,
    timestamp: number,
    transport: "websocket" | "rtp" | "local" = "local",
    newStream = false,
  ): PushResult {
    const m = this.#micSeries;
    m.received[transport].inc();
    this.#t.receivedBytes.inc(packet.length);
    const samples = checkMicrophonePacket(packet, seq, timestamp);
    if (typeof samples === "string") {
      m.malformed[samples].inc();
      return "malformed";
    }
    const p = this.#input;
    if (!p?.wanted) {
      m.stopped.inc();
      return "not-running";
    }
    const slot = p.ring.reserve();
    slot.data.set(packet);
    slot.seq = seq;
    slot.samples = samples;
    slot.flags = newStream ? INPUT_FLAG.newStream : 0;
    slot.t[0] = epochMs();
    slot.t[1] = timestamp;
    const before = p.ring.dropped;
    p.ring.publish(slot, packet.length);
    if (p.ring.dropped !== before) {
      m.ringFull.inc(p.ring.dropped - before);
    }
    return "queued";
  }

  /**
   * Microphone packets queued for the input worker and not yet taken by it (0 when the pipeline
   * is disabled). A full queue drops its oldest packet; a sender flat out (a benchmark, an
   * offline decode under `pace: "flat"`) can keep below {@link INPUT_RING}'s slots with it.
   */
  get microphoneBacklog(): number {
    return this.#input?.ring.available ?? 0;
  }

  /**
   * Lends the input worker a bound, non-blocking UDP socket (`fd`) to read RTP input from itself
   * (see `RtpReceiver`): whenever it wakes for the device, it takes every waiting datagram with
   * the kernel's arrival time, so no packet wakes the main thread. `payloadType` null accepts any
   * dynamic payload type. The socket stays the caller's; call {@link detachRtpInput} before
   * closing it. One socket at a time.
   *
   * @throws {ServiceUnavailableError} without a microphone pipeline, or when one is attached
   */
  attachRtpInput(fd: number, payloadType: number | null): void {
    const p = this.#input;
    if (!p) {
      throw new ServiceUnavailableError(
        "Cannot receive RTP: the microphone pipeline is disabled (no playback device)",
      );
    }
    if (this.#rtpAttached) {
      throw new ServiceUnavailableError("Cannot receive RTP: a socket is attached already");
    }
    if (!Number.isInteger(fd) || fd < 0) {
      throw new RangeError(`Invalid socket descriptor ${fd}: expected an integer of 0 or more`);
    }
    this.#rtpAttached = true;
    Atomics.store(p.control, CONTROL.rtpPayloadType, payloadType ?? -1);
    Atomics.store(p.control, CONTROL.rtpFd, fd);
  }

  /**
   * Takes the RTP socket back from the input worker. Resolves true once the worker no longer
   * reads it (a worker mid-read finishes first — microseconds) and the caller may close it; false
   * when the worker's busy flag stayed raised for 2 s (a worker terminated mid-read, or stalled
   * there): then the caller must leave the socket open, as a descriptor number reused by another
   * socket would be read from. The next input worker clears a flag its predecessor left.
   */
  async detachRtpInput(): Promise<boolean> {
    const p = this.#input;
    if (!p || !this.#rtpAttached) return true;
    Atomics.store(p.control, CONTROL.rtpFd, -1);
    const idle = await pollUntil(
      () => Atomics.load(p.control, CONTROL.rtpBusy) === 0,
      WORKER_CALL_WAIT_MS,
    );
    this.#rtpAttached = false;
    return idle;
  }

  /**
   * Output frames the output worker has published to the main thread so far (only while it has
   * {@link subscribe}d listeners; RTP senders are served by the worker without publishing).
   */
  get outputFramesPublished(): number {
    return this.#output?.ring.published ?? 0;
  }

  /**
   * Output frames the output worker has encoded that the frame pump has not yet handed to
   * listeners (0 when the pipeline is not running).
   */
  get outputBacklog(): number {
    return this.#output?.ring.available ?? 0;
  }

  /** Samples per channel a microphone client should put in each packet. */
  get microphoneFrameSamples(): number {
    return frameSamples(this.microphonePreset);
  }

  // -------------------------------------------------------------------------------------------
  // Status and metrics.

  #onWorkerMessage(kind: "output" | "input", msg: WorkerMessage): void {
    const p = kind === "output" ? this.#output : this.#input;
    if (!p) return;
    switch (msg.type) {
      case "ready":
        p.obtained = msg.device;
        p.lastDeviceError = null;
        log.info("{kind} device {name} open at {rate} Hz, {channels} ch", {
          kind,
          ...msg.device,
        });
        break;
      case "device-lost":
        log.warn("{kind} device lost, reopening in {ms} ms: {error}", {
          kind,
          ms: msg.retryInMs,
          error: msg.error,
        });
        p.lastDeviceError = msg.error;
        this.#t.deviceLost.inc(1, { pipeline: kind });
        break;
      case "device-error":
        if (p.lastDeviceError !== msg.error) {
          log.warn("{kind} device unavailable, retrying in {ms} ms: {error}", {
            kind,
            ms: msg.retryInMs,
            error: msg.error,
          });
        }
        p.lastDeviceError = msg.error;
        break;
      case "metrics":
      case "ended":
      case "stopped":
        this.metrics.absorb(kind, msg.snapshot);
        break;
      case "preset":
        log.debug("{kind} preset {preset} applied ({how})", { kind, ...msg });
        break;
      case "fatal":
        break; // the supervisor restarts the worker
      case "rtp-error":
        this.rtpOutput.logError(msg.slot, msg.destination, msg.errno);
        break;
    }
  }

  #status(p: Pipeline | null, preset: PresetName): PipelineStatus {
    if (!p) {
      return {
        enabled: false,
        running: false,
        state: "disabled",
        device: null,
        obtained: null,
        lastDeviceError: null,
        preset,
        supervisor: null,
      };
    }
    const s = p.supervisor.status;
    // A worker that runs but has no device (missing, or being reopened) plays nothing: say so
    // rather than "running" (the supervisor's state is about the worker).
    const waiting = s.state === "running" && s.workerState === "waiting-for-device";
    return {
      enabled: true,
      running: s.state === "running" && !waiting,
      state: waiting ? "waiting-for-device" : s.state,
      device: p.device,
      obtained: p.obtained,
      lastDeviceError: p.lastDeviceError,
      preset,
      supervisor: s,
    };
  }

  /** Status of the output pipeline. */
  outputStatus(): PipelineStatus & { muted: boolean; listeners: number; rtpSenders: number } {
    return {
      ...this.#status(this.#output, this.#state.outputPreset),
      muted: this.#state.muted,
      listeners: this.#listeners.size,
      rtpSenders: this.rtpOutput.active,
    };
  }

  /** Status of the microphone pipeline. */
  microphoneStatus(): PipelineStatus {
    return this.#status(this.#input, this.#state.microphonePreset);
  }

  /** The supervisors, for tests and the health check. */
  get supervisors(): { output: Supervisor | null; input: Supervisor | null } {
    return { output: this.#output?.supervisor ?? null, input: this.#input?.supervisor ?? null };
  }

  /**
   * Native objects (device, codec, resampler) that retired workers of a pipeline still listed and
   * the service took over and freed, by kind (see `WorkerControl`); null when the pipeline is
   * disabled.
   */
  orphansReleased(kind: "output" | "input"): Readonly<Record<OrphanKind, number>> | null {
    const p = kind === "output" ? this.#output : this.#input;
    return p === null ? null : { ...p.orphansReleased };
  }

  /** Control blocks of the pipelines (test-only fault injection goes through them). */
  controlBlock(kind: "output" | "input"): Int32Array | null {
    return (kind === "output" ? this.#output : this.#input)?.control ?? null;
  }

  /** Stops everything and releases the workers. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#output?.ring.wake(); // the frame pump waits without a timeout
    await Promise.all([this.#output?.supervisor.stop(), this.#input?.supervisor.stop()]);
    await this.#pump;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** A request the service cannot serve in its configuration (maps to HTTP 409/503). */
export class ServiceUnavailableError extends Error {
  override name = "ServiceUnavailableError";
}

// Restart counting hooks into the supervisors' status: exposed through metrics at scrape time.
export function refreshSupervisorMetrics(service: AudioService): void {
  const t = transportMetrics(service.metrics);
  for (const [name, sup] of Object.entries(service.supervisors)) {
    if (!sup) continue;
    const series = t.restarts.labels({ pipeline: name });
    const have = series.value;
    const now = sup.status.restarts;
    if (now > have) series.inc(now - have);
  }
}
