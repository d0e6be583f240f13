/**
 * What the main thread and the pipeline workers say to each other.
 *
 * The workers run synchronous loops (a blocking-with-timeout device wait per period), so they do
 * not return to their event loop while running and cannot receive messages: everything the main
 * thread tells a running worker goes through shared memory — the supervisor's control block
 * (heartbeat, stop, state; words 0–7) plus the pipeline words below — and the frames themselves go
 * through {@link FrameRing}s. Workers do post messages *to* the main thread (ready, metrics
 * snapshots, device errors, ended).
 *
 * Ring slot conventions:
 * - **Output ring** (worker → main): one Opus packet per slot. `seq` = frame counter (wraps),
 *   `samples` = samples per channel at 48 kHz, `flags` = {@link FrameFlag} bits,
 *   `t[0]` = when the frame's last sample was captured (device time corrected by
 *   `snd_pcm_delay`), `t[1]` = encode done, `t[2]` = RTP timestamp (48 kHz ticks, uint32),
 *   `t[3]` = channels of the packet.
 * - **Input ring** (main → worker): one received Opus packet per slot. `seq` = RTP/WebSocket
 *   sequence number (uint16), `flags` = {@link INPUT_FLAG} bits, `t[0]` = arrival time, `t[1]` =
 *   media timestamp (48 kHz ticks, uint32). The worker copies it into its playout buffer at once.
 *
 * All times are epoch milliseconds ({@link epochMs}), comparable across threads.
 *
 * @module
 */

import type { RegistrySnapshot } from "../metrics.ts";
import type { PresetName } from "../quality.ts";

export { epochMs, FrameFlag } from "../frame_ring.ts";
import type { FrameRing } from "../frame_ring.ts";
export type { FrameRing };

/** Bits of an input ring slot's `flags` (pipeline bits start at 8, see {@link FrameFlag}). */
export const INPUT_FLAG = {
  /**
   * The packet is the first of a new sender's stream (a new talker connection): the playout
   * buffer resynchronises on it (`PlayoutBuffer.push`, `newStream`).
   */
  newStream: 1 << 8,
} as const;

/** Pipeline control words (after the supervisor's generic words 0–7). */
export const CONTROL = {
  /** Index into PRESET_NAMES of the preset the worker should use; the main thread writes it. */
  preset: 8,
  /** 1 = muted (output: capture continues, nothing is encoded or published). */
  muted: 9,
  /** Test-only fault switch, see {@link FAULT}; ignored unless the worker was started with faults allowed. */
  fault: 10,
  /** The preset index the worker has applied (the worker writes it). */
  appliedPreset: 11,
  /** Encoders rebuilt for a preset change so far (the worker writes it). */
  rebuilds: 12,
  /** Live `opus_encoder_ctl` preset changes so far (the worker writes it). */
  liveChanges: 13,
  /** Bumped by the main thread after writing `preset`, so the worker notices a change. */
  generation: 14,
  /**
   * Words 16–21 (three 64-bit slots, {@link ORPHAN}): the orphan tokens of the native objects the
   * worker holds — its open PCM, its Opus encoder or decoder, its resampler — 0 where it holds
   * none. When the supervisor retires a worker (stalled, crashed, stopped) the service takes over
   * what these still name and frees it (`Pcm.closeOrphan`, `OpusEncoder.destroyOrphan`, …) once
   * the worker has finished — see `WorkerControl` in worker_common.ts on who frees what.
   */
  orphans: 16,
  /**
   * RTP input read by the worker itself (words 22–24): the UDP socket's descriptor, lent by the
   * main thread (-1: none), the payload type it accepts (-1: any dynamic one), and 1 while the
   * worker is reading the socket — the main thread clears the descriptor, then waits for this to
   * be 0 before it closes the socket (up to 2 s; after that it leaves the socket open: see
   * `AudioService.detachRtpInput`). A starting input worker clears it.
   */
  rtpFd: 22,
  rtpPayloadType: 23,
  rtpBusy: 24,
  /**
   * Output: how many listeners of encoded frames the main thread has (the service writes it).
   * At 0 the worker publishes nothing — no frame wakes the main thread for nobody — and unless an
   * RTP sender is active (which the worker serves itself) it encodes nothing either, and resets
   * its encoder before the next frame it encodes.
   */
  listeners: 25,
  /**
   * Output: the sequence number and RTP timestamp (uint32 stored as int32) of the worker's next
   * frame, written by the worker after every frame, encoded or not: where a restart goes on.
   */
  nextSeq: 26,
  nextTimestamp: 27,
  /**
   * Output, words 28–29 (a float64, {@link lastFrameAtCell}): the capture time (epoch ms) of the
   * last frame the worker went through, encoded or not; 0 before the first. After a gap in
   * capture — a reopened device, a restarted worker, an overrun — the next incarnation or the
   * reopened loop moves the RTP timestamp on by the frames the gap held.
   */
  lastFrameAt: 28,
} as const;

/** The control block's float64 view of {@link CONTROL.lastFrameAt}. */
export function lastFrameAtCell(control: SharedArrayBuffer): Float64Array {
  return new Float64Array(control, CONTROL.lastFrameAt * 4, 1);
}

/** The slots of {@link orphanSlots}: what a worker may leave behind. */
export const ORPHAN = { pcm: 0, codec: 1, resampler: 2 } as const;
export type OrphanKind = keyof typeof ORPHAN;
/** Every {@link OrphanKind}. */
export const ORPHAN_KINDS = Object.keys(ORPHAN) as OrphanKind[];

/** The control block's 64-bit view of {@link CONTROL.orphans}, indexed by {@link ORPHAN}. */
export function orphanSlots(control: SharedArrayBuffer): BigInt64Array {
  return new BigInt64Array(control, CONTROL.orphans * 4, 3);
}

/** Values of the test-only fault switch. */
export const FAULT = {
  none: 0,
  /** Throw an exception from the loop (a crash the supervisor must restart). */
  throw: 1,
  /** Spin without beating (a stall the supervisor must detect). */
  stall: 2,
  /** Block inside a C call for 3 s (a stall the worker only leaves when the call returns). */
  block: 3,
} as const;

/** Shared init fields of both pipeline workers. */
interface InitCommon {
  /** The supervisor's control block. */
  readonly control: SharedArrayBuffer;
  /** Which restart this is (0 = first start). */
  readonly incarnation: number;
  /**
   * One int32 the worker sets to 1 when it is done with every native object it held
   * (`WorkerControl.finish`): what the service took over at its retirement may be freed then.
   */
  readonly exit?: SharedArrayBuffer;
  /** Honour the fault switch (tests only). */
  readonly allowFaults?: boolean;
  /** How often to post a metrics snapshot. */
  readonly metricsIntervalMs?: number;
  /**
   * Pacing: "device" (default) waits on the PCM; "clock" paces by the wall clock for unpaced
   * virtual devices (the ALSA `file` plugin over `null`), as hardware would; "flat" runs with no
   * clock at all on unpaced devices — the output as fast as the device delivers and the main
   * thread takes the frames (waiting for room in its ring instead of dropping; RTP senders are
   * not waited for: what the socket buffer cannot hold is dropped as `rtp_backlog`), the input one
   * frame per packet as fast as packets come (see input_worker.ts) — for benchmarks and offline
   * encoding and decoding.
   */
  readonly pace?: Pace;
}

/** How a pipeline loop is paced (see {@link InitCommon.pace}). */
export type Pace = "device" | "clock" | "flat";

/** Init message of the output (capture → Opus) worker. */
export interface OutputInit extends InitCommon {
  readonly kind: "output";
  /** Opus frames out. */
  readonly ring: SharedArrayBuffer;
  /** ALSA capture PCM name, e.g. "hw:0,0" or "default". */
  readonly device: string;
  /** Rate asked of the device; resampled to 48 kHz when the device gives another. */
  readonly deviceRate: number;
  /** Channels asked of the device (down- or up-mixed to the preset's). */
  readonly deviceChannels: number;
  /** Stop after this many 48 kHz sample frames captured (finite test input). */
  readonly maxSamples?: number;
  /** Sequence number of the first frame (continues across restarts). */
  readonly firstSeq: number;
  /** RTP timestamp (48 kHz ticks) of the first frame (continues across restarts). */
  readonly firstTimestamp: number;
  /** The service's RTP output table (`RtpOutTable`): the worker sends to its senders itself. */
  readonly rtpOut: SharedArrayBuffer;
}

/** Init message of the input (Opus → playback) worker. */
export interface InputInit extends InitCommon {
  readonly kind: "input";
  /** Received Opus packets in. */
  readonly ring: SharedArrayBuffer;
  /** ALSA playback PCM name, e.g. "hw:1,0". */
  readonly device: string;
  readonly deviceRate: number;
  readonly deviceChannels: number;
  /** Playout buffer bounds in frames. */
  readonly minDepth?: number;
  readonly maxDepth?: number;
  /** Where the worker counts the RTP input it reads ({@link RTP_STATS}). */
  readonly rtpStats: SharedArrayBuffer;
}

export type PipelineInit = OutputInit | InputInit;

/** What the device gave when opened. */
export interface DeviceInfo {
  readonly name: string;
  readonly rate: number;
  readonly channels: number;
  readonly periodFrames: number;
  readonly bufferFrames: number;
}

/** Messages a pipeline worker posts to the main thread. */
export type WorkerMessage =
  | { readonly type: "ready"; readonly device: DeviceInfo }
  | { readonly type: "device-error"; readonly error: string; readonly retryInMs: number }
  /** The open device failed mid-stream; the worker released it and reopens it after a backoff. */
  | { readonly type: "device-lost"; readonly error: string; readonly retryInMs: number }
  | { readonly type: "metrics"; readonly snapshot: RegistrySnapshot }
  | {
    readonly type: "preset";
    readonly preset: PresetName;
    readonly how: "live" | "rebuilt";
  }
  /** The last message: the loop ended (finite input) or honoured a stop; final metrics. */
  | { readonly type: "ended" | "stopped"; readonly snapshot: RegistrySnapshot }
  | { readonly type: "fatal"; readonly error: string }
  /** A send to an RTP destination failed with a new error (`errno`); the main thread logs it. */
  | {
    readonly type: "rtp-error";
    readonly slot: number;
    readonly destination: number;
    readonly errno: number;
  };

/** Output ring geometry: 1500-byte slots hold any packet our presets produce; 64 slots ≈ 0.6–1.3 s. */
export const OUTPUT_RING = { slots: 64, slotBytes: 1500 } as const;
/** Input ring geometry: any packet up to 1500 bytes; the worker drains it every period. */
export const INPUT_RING = { slots: 64, slotBytes: 1500 } as const;
