/**
 * Quality presets for both directions, as data: one table per direction, no per-preset code.
 *
 * Why these values (a KVM box is a small ARM CPU — Raspberry Pi 4 class Cortex-A72 — serving a
 * handful of listeners; Opus encode at complexity 10 costs about 1–2 % of one such core):
 *
 * **Output** (target → operator) carries whatever the target plays: system sounds, video, music.
 * It is coded as music, stereo from medium up.
 * - `low` — 32 kb/s mono, wideband, DTX: for a poor uplink (mobile tethering, VPN). DTX sends
 *   near-empty packets in silence, which is most of a desktop's life. Complexity 7: at these
 *   settings libopus codes CELT only, and its CELT DTX needs the signal analysis that runs from
 *   complexity 7 (libopus 1.3); at 3, digital silence came out as 3-byte packets, never flagged
 *   as silence, and RTP kept sending 50 packets a second. (Encoding cost: 91 against 78 ms per
 *   30 s of audio on this x86 VM.)
 * - `medium` — 64 kb/s stereo, super-wideband (12 kHz): clear speech and decent music at a
 *   moderate CPU cost (complexity 5).
 * - `high` — 128 kb/s stereo, full band, complexity 8: transparent for most material.
 * - `ultra` — 192 kb/s stereo, full band, complexity 10, **10 ms frames** and the
 *   restricted-low-delay (CELT-only) mode: the lowest-latency and highest-fidelity choice. Frame
 *   accumulation drops from 20 to 10 ms and the codec look-ahead from 6.5 to 2.5 ms; at 192 kb/s
 *   CELT alone is transparent, so SILK's absence costs nothing. Packets double to 100/s, which the
 *   CPU budget allows.
 * VBR is on everywhere (better quality per bit); constrained VBR from low to high keeps packet
 * sizes even for paced networks; ultra lets VBR run free. FEC is off for output: Opus in-band FEC
 * exists only in SILK/hybrid modes, which music at these rates does not use, and listeners on a
 * LAN/VPN rarely lose packets.
 *
 * **Microphone** (operator → target) carries a voice. Mono everywhere, coded as voice with the
 * VoIP application, in-band FEC on (SILK/hybrid modes carry it) with an expected loss that tunes
 * how much redundancy is sent: operators talk over the open internet.
 * - `low` 20 kb/s wideband with DTX (SILK codes in-band FEC only above about 18.4 kb/s in
 *   wideband at 10 % expected loss: at 16 kb/s the packets were the same with FEC on or off),
 *   `medium` 24 kb/s super-wideband, `high` 48 kb/s full band, `ultra` 64 kb/s full band in 10 ms
 *   frames at complexity 10 (lowest latency).
 * The service decodes these; the table also tells clients (the operator's page, gateways) what to
 * send.
 *
 * Changing bitrate, complexity, VBR, bandwidth, signal type, DTX, FEC or loss expectation is done
 * on a running encoder; a change of channels, frame duration or application needs a new encoder
 * (see {@link needsNewEncoder}).
 *
 * @module
 */

import type { EncoderSettings, OpusApplicationName } from "../ffi/opus.ts";

/** The preset names, lowest first. */
export const PRESET_NAMES = ["low", "medium", "high", "ultra"] as const;
export type PresetName = typeof PRESET_NAMES[number];

/** The two directions a preset applies to. */
export const DIRECTIONS = ["output", "microphone"] as const;
export type Direction = typeof DIRECTIONS[number];

/** One preset: every encoder setting plus the stream shape. */
export interface Preset extends EncoderSettings {
  readonly name: PresetName;
  /** 1 (mono) or 2 (stereo). */
  readonly channels: 1 | 2;
  /** Frame duration in milliseconds. */
  readonly frameMs: 10 | 20;
  /** Opus application (coding mode); fixed for an encoder's lifetime. */
  readonly application: OpusApplicationName;
}

type Row = Omit<Preset, "name">;

function table(rows: Record<PresetName, Row>): Readonly<Record<PresetName, Preset>> {
  const out = {} as Record<PresetName, Preset>;
  for (const name of PRESET_NAMES) out[name] = Object.freeze({ name, ...rows[name] });
  return Object.freeze(out);
}

/** Output (target → operator) presets. */
export const OUTPUT_PRESETS = table({
  // deno-fmt-ignore
  low:    { bitrate:  32000, channels: 1, frameMs: 20, complexity:  7, vbr: true, vbrConstraint: true,  signal: "music", maxBandwidth: "wideband",      dtx: true,  inbandFec: false, packetLossPerc: 0, application: "audio" },
  // deno-fmt-ignore
  medium: { bitrate:  64000, channels: 2, frameMs: 20, complexity:  5, vbr: true, vbrConstraint: true,  signal: "music", maxBandwidth: "superwideband", dtx: false, inbandFec: false, packetLossPerc: 0, application: "audio" },
  // deno-fmt-ignore
  high:   { bitrate: 128000, channels: 2, frameMs: 20, complexity:  8, vbr: true, vbrConstraint: true,  signal: "music", maxBandwidth: "fullband",      dtx: false, inbandFec: false, packetLossPerc: 0, application: "audio" },
  // deno-fmt-ignore
  ultra:  { bitrate: 192000, channels: 2, frameMs: 10, complexity: 10, vbr: true, vbrConstraint: false, signal: "music", maxBandwidth: "fullband",      dtx: false, inbandFec: false, packetLossPerc: 0, application: "restrictedLowDelay" },
});

/** Microphone (operator → target) presets. */
export const MICROPHONE_PRESETS = table({
  // deno-fmt-ignore
  low:    { bitrate: 20000, channels: 1, frameMs: 20, complexity:  3, vbr: true, vbrConstraint: true, signal: "voice", maxBandwidth: "wideband",      dtx: true,  inbandFec: true, packetLossPerc: 10, application: "voip" },
  // deno-fmt-ignore
  medium: { bitrate: 24000, channels: 1, frameMs: 20, complexity:  5, vbr: true, vbrConstraint: true, signal: "voice", maxBandwidth: "superwideband", dtx: false, inbandFec: true, packetLossPerc: 10, application: "voip" },
  // deno-fmt-ignore
  high:   { bitrate: 48000, channels: 1, frameMs: 20, complexity:  8, vbr: true, vbrConstraint: true, signal: "voice", maxBandwidth: "fullband",      dtx: false, inbandFec: true, packetLossPerc: 5,  application: "voip" },
  // deno-fmt-ignore
  ultra:  { bitrate: 64000, channels: 1, frameMs: 10, complexity: 10, vbr: true, vbrConstraint: true, signal: "voice", maxBandwidth: "fullband",      dtx: false, inbandFec: true, packetLossPerc: 5,  application: "voip" },
});

/** Both tables by direction. */
export const PRESETS: Readonly<Record<Direction, Readonly<Record<PresetName, Preset>>>> = Object
  .freeze({ output: OUTPUT_PRESETS, microphone: MICROPHONE_PRESETS });

/**
 * Parses a preset name. A non-string is a `TypeError`; an unknown name a `RangeError`; both quote
 * the value and list the valid names. Names are matched exactly (lower case).
 */
export function parsePresetName(value: unknown, what = "quality"): PresetName {
  if (typeof value !== "string") {
    throw new TypeError(
      `Cannot set ${what} ${JSON.stringify(value) ?? String(value)}: expected a string, one of ${
        PRESET_NAMES.join(", ")
      }`,
    );
  }
  if (!(PRESET_NAMES as readonly string[]).includes(value)) {
    throw new RangeError(
      `Cannot set ${what} ${JSON.stringify(value)}: expected one of ${PRESET_NAMES.join(", ")}`,
    );
  }
  return value as PresetName;
}

/** Parses a direction name ("output" or "microphone"). */
export function parseDirection(value: unknown): Direction {
  if (typeof value !== "string" || !(DIRECTIONS as readonly string[]).includes(value)) {
    throw new RangeError(
      `Invalid direction ${JSON.stringify(value) ?? String(value)}: expected one of ${
        DIRECTIONS.join(", ")
      }`,
    );
  }
  return value as Direction;
}

/** The preset of `direction` named `name` (validated). */
export function getPreset(direction: Direction, name: unknown): Preset {
  return PRESETS[parseDirection(direction)][parsePresetName(name, `${direction} quality`)];
}

/** The encoder settings of a preset (what `opus_encoder_ctl` sets on a live encoder). */
export function encoderSettings(p: Preset): EncoderSettings {
  return {
    bitrate: p.bitrate,
    complexity: p.complexity,
    vbr: p.vbr,
    vbrConstraint: p.vbrConstraint,
    signal: p.signal,
    maxBandwidth: p.maxBandwidth,
    dtx: p.dtx,
    inbandFec: p.inbandFec,
    packetLossPerc: p.packetLossPerc,
  };
}

/** Samples per channel in one frame of `p` at 48 kHz. */
export function frameSamples(p: Preset): number {
  return (48000 * p.frameMs) / 1000;
}

/**
 * Whether going from `a` to `b` needs a new encoder (channels, frame duration or application
 * differ) rather than `opus_encoder_ctl` on the running one.
 */
export function needsNewEncoder(a: Preset, b: Preset): boolean {
  return a.channels !== b.channels || a.frameMs !== b.frameMs || a.application !== b.application;
}
