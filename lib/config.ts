/**
 * Command-line flags, each with a `KVM_AUDIO_*` environment twin. A flag wins over its variable;
 * the variable wins over the default. Invalid values are errors that name the flag and the
 * allowed values — never logged and ignored.
 *
 * @module
 */

import { isIP } from "node:net";
import { parseArgs } from "node:util";
import { parsePresetName, type PresetName } from "./quality.ts";

/** The service's configuration. */
export interface Config {
  capture: string | null;
  playback: string | null;
  captureRate: number;
  captureChannels: number;
  playbackRate: number;
  playbackChannels: number;
  outputPreset: PresetName;
  microphonePreset: PresetName;
  listen: { hostname: string; port: number };
  token: string | null;
  stateFile: string | null;
  rtpOut: string[];
  rtpIn: number | null;
  /** Where RTP input binds: the --listen host as an address (`localhost` → 127.0.0.1). */
  rtpInHost: string;
  /** Payload type of RTP output. */
  rtpPayloadType: number;
  /** Payload type RTP input accepts: the one --rtp-pt names, else null (any dynamic type). */
  rtpInPayloadType: number | null;
  pace: "device" | "clock" | "flat";
  logLevel: "debug" | "info" | "warning" | "error";
  check: boolean;
  help: boolean;
}

/** One flag: its name, variable, kind, default and help line. */
interface FlagSpec {
  readonly flag: string;
  readonly env: string;
  readonly kind: "string" | "boolean" | "list";
  readonly help: string;
  readonly def?: string;
}

/** Every flag, in the order `--help` lists them. */
export const FLAGS: readonly FlagSpec[] = [
  {
    flag: "capture",
    env: "KVM_AUDIO_CAPTURE",
    kind: "string",
    def: "default",
    help: "ALSA capture PCM for the output pipeline (e.g. hw:0,0 for an HDMI bridge)",
  },
  {
    flag: "playback",
    env: "KVM_AUDIO_PLAYBACK",
    kind: "string",
    def: "default",
    help: "ALSA playback PCM for the microphone (e.g. hw:1,0 for the USB audio gadget)",
  },
  {
    flag: "capture-rate",
    env: "KVM_AUDIO_CAPTURE_RATE",
    kind: "string",
    def: "48000",
    help: "Sample rate asked of the capture device (resampled to 48 kHz)",
  },
  {
    flag: "capture-channels",
    env: "KVM_AUDIO_CAPTURE_CHANNELS",
    kind: "string",
    def: "2",
    help: "Channels asked of the capture device",
  },
  {
    flag: "playback-rate",
    env: "KVM_AUDIO_PLAYBACK_RATE",
    kind: "string",
    def: "48000",
    help: "Sample rate asked of the playback device",
  },
  {
    flag: "playback-channels",
    env: "KVM_AUDIO_PLAYBACK_CHANNELS",
    kind: "string",
    def: "2",
    help: "Channels asked of the playback device",
  },
  {
    flag: "output-preset",
    env: "KVM_AUDIO_OUTPUT_PRESET",
    kind: "string",
    def: "high",
    help: "Output quality: low, medium, high, ultra",
  },
  {
    flag: "mic-preset",
    env: "KVM_AUDIO_MIC_PRESET",
    kind: "string",
    def: "high",
    help: "Microphone quality: low, medium, high, ultra",
  },
  {
    flag: "listen",
    env: "KVM_AUDIO_LISTEN",
    kind: "string",
    def: "127.0.0.1:8080",
    help: "HOST:PORT of the API (loopback unless told otherwise)",
  },
  {
    flag: "token",
    env: "KVM_AUDIO_TOKEN",
    kind: "string",
    help: "Bearer token for the API and streams (required off loopback)",
  },
  {
    flag: "state-file",
    env: "KVM_AUDIO_STATE_FILE",
    kind: "string",
    help:
      "Where presets, mute and running pipelines are saved (default: $STATE_DIRECTORY, $XDG_STATE_HOME/kvm-audio or ~/.local/state/kvm-audio, state.json; 'none' to disable)",
  },
  {
    flag: "rtp-out",
    env: "KVM_AUDIO_RTP_OUT",
    kind: "list",
    help: "Send the output as Opus RTP to HOST:PORT (repeatable; env: comma-separated)",
  },
  {
    flag: "rtp-in",
    env: "KVM_AUDIO_RTP_IN",
    kind: "string",
    help: "Receive the microphone as Opus RTP on this UDP port (bound to the --listen host)",
  },
  {
    flag: "rtp-pt",
    env: "KVM_AUDIO_RTP_PT",
    kind: "string",
    def: "111",
    help:
      "RTP payload type for Opus (96-127): what --rtp-out sends; when given, the only one --rtp-in accepts (else any dynamic type, as ffmpeg sends 97)",
  },
  {
    flag: "no-output",
    env: "KVM_AUDIO_NO_OUTPUT",
    kind: "boolean",
    help: "Disable the output pipeline",
  },
  {
    flag: "no-mic",
    env: "KVM_AUDIO_NO_MIC",
    kind: "boolean",
    help: "Disable the microphone pipeline",
  },
  {
    flag: "pace",
    env: "KVM_AUDIO_PACE",
    kind: "string",
    def: "device",
    help:
      "device; clock paces unpaced virtual devices (ALSA file plugin) by the wall clock; flat runs them flat out",
  },
  {
    flag: "log-level",
    env: "KVM_AUDIO_LOG_LEVEL",
    kind: "string",
    def: "info",
    help: "debug, info, warning, error",
  },
  {
    flag: "check",
    env: "KVM_AUDIO_CHECK",
    kind: "boolean",
    help: "Print what the start-up check finds (libraries, devices, rates) and exit",
  },
  { flag: "help", env: "KVM_AUDIO_HELP", kind: "boolean", help: "Show this help" },
];

/** `--help` text. */
export function helpText(): string {
  const rows = FLAGS.map((f) => {
    const name = `--${f.flag}${f.kind === "boolean" ? "" : " VALUE"}`;
    const def = f.def !== undefined ? ` (default ${f.def})` : "";
    return `  ${name.padEnd(26)} ${f.help}${def}\n  ${"".padEnd(26)} env ${f.env}`;
  });
  return `kvm-audio — two-way low-latency audio for KVM-over-IP devices\n\nUsage: kvm-audio [flags]\n\n${
    rows.join("\n")
  }\n`;
}

/** A configuration error: names the flag and what it accepts. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

function int(flag: string, v: string, lo: number, hi: number): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || n < lo || n > hi) {
    throw new ConfigError(`Invalid --${flag} "${v}": expected an integer from ${lo} to ${hi}`);
  }
  return n;
}

/**
 * Whether `host` is a loopback address (an IPv4 literal in 127.0.0.0/8, or `::1`) or `localhost`.
 * Only literals count: a DNS name such as `127.example.com` may resolve anywhere.
 */
export function isLoopback(host: string): boolean {
  if (host === "localhost" || host === "::1" || host === "[::1]") return true;
  const m = /^127\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(host);
  return m !== null && m.slice(1).every((o) => Number(o) <= 255);
}

/** Parses `HOST:PORT` (IPv6 in brackets). */
export function parseListen(v: string, flag = "listen"): { hostname: string; port: number } {
  // An IPv6 literal may carry a zone ([fe80::1%eth0]:5004): the RTP socket uses it as its scope.
  const m = /^(\[[0-9a-fA-F:.]+(?:%[^\]\s]+)?\]|[^:\s]+):(\d+)$/.exec(v);
  if (!m) {
    throw new ConfigError(`Invalid --${flag} "${v}": expected HOST:PORT, e.g. 127.0.0.1:8080`);
  }
  return { hostname: m[1]!.replace(/^\[|\]$/g, ""), port: int(flag, m[2]!, 0, 65535) };
}

/** `host:port` as a URL writes it: an IPv6 address in brackets. */
export function hostPort(a: { readonly hostname: string; readonly port: number }): string {
  return a.hostname.includes(":") ? `[${a.hostname}]:${a.port}` : `${a.hostname}:${a.port}`;
}

function defaultStateFile(env: (k: string) => string | undefined): string | null {
  const dir = env("STATE_DIRECTORY")?.split(":")[0] ||
    (env("XDG_STATE_HOME") ? `${env("XDG_STATE_HOME")}/kvm-audio` : null) ||
    (env("HOME") ? `${env("HOME")}/.local/state/kvm-audio` : null);
  return dir ? `${dir}/state.json` : null;
}

type ArgValues = Record<string, string | boolean | string[] | undefined>;

/** The command line as `node:util` parseArgs reads it. */
function parseFlags(args: readonly string[]): ArgValues {
  const options: Record<string, { type: "string" | "boolean"; multiple?: boolean }> = {};
  for (const f of FLAGS) {
    options[f.flag] = f.kind === "boolean"
      ? { type: "boolean" }
      : f.kind === "list"
      ? { type: "string", multiple: true }
      : { type: "string" };
  }
  return parseArgs({ args: [...args], options, strict: true, allowPositionals: false })
    .values as ArgValues;
}

/**
 * Whether the command line asks for `--help` — looked at before anything is validated, so that
 * help is shown whatever the environment holds (a bad `KVM_AUDIO_*` value made `--help` fail).
 */
export function asksForHelp(args: readonly string[]): boolean {
  try {
    return parseFlags(args).help === true;
  } catch {
    return false; // An unknown flag: parseConfig says which.
  }
}

/**
 * Parses `args` and the environment (read through `env`) into a {@link Config}.
 * @throws {ConfigError} naming the flag and the allowed values.
 */
export function parseConfig(
  args: readonly string[],
  env: (name: string) => string | undefined = (k) => Deno.env.get(k),
): Config {
  let values: ArgValues;
  try {
    values = parseFlags(args);
  } catch (e) {
    throw new ConfigError(`${(e as Error).message}; see --help`);
  }
  const get = (flag: string): string | undefined => {
    const spec = FLAGS.find((f) => f.flag === flag)!;
    const v = values[flag];
    // An empty flag value is a mistake (an unset shell variable: --state-file "$DIR"), not a
    // choice: it turned saving off, or named the PCM "". An empty variable counts as unset, as
    // systemd's environment files write it.
    if (v === "") {
      throw new ConfigError(
        `Invalid --${flag} "": expected a value; leave the flag out for the default${
          flag === "state-file" ? ', or give "none" for no state file' : ""
        }`,
      );
    }
    if (typeof v === "string") return v;
    const e = env(spec.env);
    return e !== undefined && e !== "" ? e : spec.def;
  };
  const bool = (flag: string): boolean => {
    if (values[flag] === true) return true;
    const spec = FLAGS.find((f) => f.flag === flag)!;
    const e = env(spec.env);
    if (e === undefined || e === "" || e === "0" || e === "false") return false;
    if (e === "1" || e === "true") return true;
    throw new ConfigError(`Invalid ${spec.env} "${e}": expected 1, true, 0 or false`);
  };
  const preset = (flag: string) => {
    try {
      return parsePresetName(get(flag));
    } catch (e) {
      throw new ConfigError(`Invalid --${flag}: ${(e as Error).message}`);
    }
  };
  const oneOf = <T extends string>(flag: string, allowed: readonly T[]): T => {
    const v = get(flag)!;
    if (!(allowed as readonly string[]).includes(v)) {
      throw new ConfigError(`Invalid --${flag} "${v}": expected one of ${allowed.join(", ")}`);
    }
    return v as T;
  };

  const listen = parseListen(get("listen")!);
  const token = get("token") ?? null;
  // The token travels in `Authorization: Bearer <token>`, which carries no spaces and only ASCII.
  if (token !== null && !/^[\x21-\x7e]+$/.test(token)) {
    throw new ConfigError(
      "Invalid --token: expected visible ASCII characters only (no spaces), as an HTTP " +
        "Authorization header carries it",
    );
  }
  if (!isLoopback(listen.hostname) && !token) {
    throw new ConfigError(
      `Refusing --listen ${hostPort(listen)} without a token: set --token or ` +
        `KVM_AUDIO_TOKEN, or listen on 127.0.0.1`,
    );
  }
  const rtpOutFlag = values["rtp-out"] as string[] | undefined;
  const rtpOutEnv = env("KVM_AUDIO_RTP_OUT");
  const rtpOut = rtpOutFlag ??
    (rtpOutEnv ? rtpOutEnv.split(",").map((s) => s.trim()).filter(Boolean) : []);
  for (const d of rtpOut) {
    // A destination needs a port to send to (0 means "any" only to bind): refused here, as a
    // configuration error (exit 2), not at the sender's start (exit 1, restarted by systemd).
    if (parseListen(d, "rtp-out").port === 0) {
      throw new ConfigError(`Invalid --rtp-out "${d}": expected a port from 1 to 65535`);
    }
  }
  const rtpIn = get("rtp-in");
  const stateFlag = get("state-file");
  if (rtpIn !== undefined && bool("no-mic")) {
    // The microphone pipeline's worker is what reads RTP input.
    throw new ConfigError(
      `Refusing --rtp-in ${rtpIn} with --no-mic: RTP input plays into the microphone pipeline`,
    );
  }
  if (rtpOut.length > 0 && bool("no-output")) {
    // The output pipeline's worker is what sends RTP.
    throw new ConfigError(
      `Refusing --rtp-out ${rtpOut.join(",")} with --no-output: RTP output sends the output ` +
        "pipeline's audio",
    );
  }
  // RTP input binds on the --listen host, which must be an address for a socket of its own.
  let rtpInHost = listen.hostname;
  if (rtpIn !== undefined && isIP(rtpInHost) === 0) {
    if (rtpInHost !== "localhost") {
      throw new ConfigError(
        `Refusing --rtp-in ${rtpIn} with --listen ${rtpInHost}: RTP input binds on the --listen ` +
          "host, which must then be an IP address (or localhost)",
      );
    }
    rtpInHost = "127.0.0.1";
  }
  const ptGiven = typeof values["rtp-pt"] === "string" || !!env("KVM_AUDIO_RTP_PT");
  const rtpPayloadType = int("rtp-pt", get("rtp-pt")!, 96, 127);

  return {
    capture: bool("no-output") ? null : get("capture")!,
    playback: bool("no-mic") ? null : get("playback")!,
    captureRate: int("capture-rate", get("capture-rate")!, 8000, 384000),
    captureChannels: int("capture-channels", get("capture-channels")!, 1, 8),
    playbackRate: int("playback-rate", get("playback-rate")!, 8000, 384000),
    playbackChannels: int("playback-channels", get("playback-channels")!, 1, 8),
    outputPreset: preset("output-preset"),
    microphonePreset: preset("mic-preset"),
    listen,
    token,
    stateFile: stateFlag === "none" ? null : stateFlag ?? defaultStateFile(env),
    rtpOut,
    rtpIn: rtpIn === undefined ? null : int("rtp-in", rtpIn, 1, 65535),
    rtpInHost,
    rtpPayloadType,
    rtpInPayloadType: ptGiven ? rtpPayloadType : null,
    pace: oneOf("pace", ["device", "clock", "flat"] as const),
    logLevel: oneOf("log-level", ["debug", "info", "warning", "error"] as const),
    check: bool("check"),
    help: bool("help"),
  };
}
