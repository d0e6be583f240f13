/**
 * The start-up check: what the service found (libraries and their versions, sound cards, the
 * configured devices and the rates they give) and, when it cannot start, why.
 *
 * Fatal: a native library that does not load (nothing can work without libopus or libasound).
 * Not fatal: a device that is missing or busy — the API comes up and the pipeline retries with
 * backoff, reporting `waiting-for-device`.
 *
 * @module
 */

import { alsaVersion, Pcm } from "../ffi/alsa.ts";
import { opusVersion } from "../ffi/opus.ts";
import { Resampler } from "../ffi/speexdsp.ts";
import type { Config } from "./config.ts";

/** What the check found. */
export interface StartupCheck {
  readonly ok: boolean;
  /** Why the service cannot start (when `ok` is false). */
  readonly fatal: string | null;
  /** Human-readable lines. */
  readonly report: string;
}

function tryRead(path: string): string | null {
  try {
    return Deno.readTextFileSync(path).trim();
  } catch {
    return null;
  }
}

/** Runs the check for `config`. Opens each configured device briefly to learn its rate. */
export function runStartupCheck(
  config: Pick<
    Config,
    | "capture"
    | "playback"
    | "captureRate"
    | "captureChannels"
    | "playbackRate"
    | "playbackChannels"
  >,
): StartupCheck {
  const lines: string[] = [];
  const fatal: string[] = [];
  lines.push(`kvm-audio on ${Deno.build.os}/${Deno.build.arch}, Deno ${Deno.version.deno}`);

  const lib = (name: string, probe: () => string) => {
    try {
      lines.push(`${name}: ${probe()}`);
    } catch (e) {
      lines.push(`${name}: NOT LOADED — ${(e as Error).message}`);
      fatal.push(`${name} cannot be loaded: ${(e as Error).message}`);
    }
  };
  lib("libopus", opusVersion);
  lib("libasound", () => `alsa-lib ${alsaVersion()}`);
  lib("libspeexdsp", () => {
    Resampler.create({ channels: 1, inRate: 44100, outRate: 48000 }).close();
    return "resampler available";
  });

  const cards = tryRead("/proc/asound/cards");
  lines.push(
    cards
      ? `sound cards:\n${cards.split("\n").map((l) => `  ${l}`).join("\n")}`
      : "sound cards: none (/proc/asound/cards missing: no ALSA kernel driver; virtual PCMs only)",
  );

  const device = (
    what: string,
    name: string | null,
    stream: "capture" | "playback",
    rate: number,
    channels: number,
  ) => {
    if (name === null) {
      lines.push(`${what}: disabled`);
      return;
    }
    if (fatal.length > 0) return;
    try {
      using pcm = Pcm.open(name, { stream, rate, channels });
      const resample = pcm.rate === 48000 ? "" : ` (resampled ${pcm.rate} → 48000 Hz)`;
      lines.push(
        `${what}: "${name}" ${pcm.rate} Hz, ${pcm.channels} ch, period ${pcm.periodFrames}, ` +
          `buffer ${pcm.bufferFrames} frames${resample}`,
      );
    } catch (e) {
      lines.push(
        `${what}: "${name}" unavailable — ${(e as Error).message}; the API starts and the ` +
          `pipeline retries with backoff (find devices with arecord -l / aplay -l)`,
      );
    }
  };
  device("capture", config.capture, "capture", config.captureRate, config.captureChannels);
  device("playback", config.playback, "playback", config.playbackRate, config.playbackChannels);

  return {
    ok: fatal.length === 0,
    fatal: fatal.length ? fatal.join("; ") : null,
    report: lines.join("\n"),
  };
}
