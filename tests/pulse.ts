/**
 * A private PulseAudio server for tests: paced, hardware-like virtual devices with no sound card.
 *
 * {@link startPulse} starts `pulseaudio` as an ordinary child process (its own temporary
 * `HOME`/`XDG_RUNTIME_DIR`, a native-protocol socket in a temporary directory, no D-Bus, no
 * shared memory) with a null sink, a null source and a tone, writes an ALSA configuration naming
 * them, and on dispose kills exactly that process and removes the directory. It never uses (or
 * depends on) a server left running.
 *
 * Using the PCMs:
 * - in this process and its workers: `using _ = pulse.use();` (sets `ALSA_CONFIG_PATH`; libasound
 *   reads it at each `snd_pcm_open`, see tests/alsa_devices.ts), then `Pcm.open(pulse.pcm.capture…)`;
 * - in a child process: spread `pulse.env` into its environment.
 *
 * Behaviour worth knowing: the sink's monitor delivers what is played to the sink after a start-up
 * stall of about 1–2 s, then paced; the null source is paced from the start (its first period
 * arrives after a few hundred ms).
 *
 * @module
 */

import {
  type AlsaConfig,
  type PcmDefinition,
  useAlsaConfig,
  writeAlsaConfig,
} from "./alsa_devices.ts";
import { sleep } from "./wait.ts";

/** The PCM names defined by {@link startPulse}. */
export const PULSE_PCMS = {
  /** Capture from the null source: silence, paced. */
  capture: "kvm_capture",
  /** Playback into the null sink, paced. */
  playback: "kvm_playback",
  /** Capture from the null sink's monitor: hears what is played to `playback`. */
  monitor: "kvm_monitor",
  /** Capture of a sine tone (`module-sine` into a second null sink, through its monitor). */
  tone: "kvm_tone",
} as const;

/** Options of {@link startPulse}. */
export interface PulseOptions {
  /** Sample rate of the sinks and sources (default 48000). */
  rate?: number;
  /** Channels of the sinks and sources (default 2). */
  channels?: number;
  /** Frequency of the tone on `pcm.tone`, Hz (default 440). */
  toneHz?: number;
  /** Further PCMs for the ALSA configuration, e.g. a `file` PCM with `slave: "kvm_capture"`. */
  extraPcms?: Readonly<Record<string, PcmDefinition>>;
  /** Put the system alsa.conf first in `ALSA_CONFIG_PATH` (default true). */
  includeSystemConfig?: boolean;
}

/** A running private PulseAudio with ALSA PCMs naming its devices. */
export interface PulseServer extends AsyncDisposable {
  /** Process id of the `pulseaudio` child. */
  readonly pid: number;
  /** Temporary directory holding the socket, the configs and `pulse.log`. */
  readonly dir: string;
  /** Path of the native-protocol socket. */
  readonly socket: string;
  /** PulseAudio server string, "unix:<socket>". */
  readonly server: string;
  /** PulseAudio device names. */
  readonly sink: string;
  readonly source: string;
  /** The ALSA configuration written. */
  readonly alsa: AlsaConfig;
  /** The value for `ALSA_CONFIG_PATH` (same as `alsa.configPath`). */
  readonly alsaConfigPath: string;
  /** Environment for a child process: `ALSA_CONFIG_PATH` and `PULSE_SERVER`. */
  readonly env: Record<string, string>;
  /** ALSA PCM names. */
  readonly pcm: typeof PULSE_PCMS;
  /** Points this process's `ALSA_CONFIG_PATH` here until the returned disposer runs. */
  use(): Disposable;
}

const SOCKET_PATH_MAX = 107; // sizeof(sun_path) - 1
const READY_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 5_000;

async function pactlReady(server: string): Promise<boolean> {
  const out = await new Deno.Command("pactl", {
    args: [`--server=${server}`, "info"],
    env: { PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin", LANG: "C" },
    clearEnv: true,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).output();
  return out.success;
}

async function logTail(path: string): Promise<string> {
  try {
    return (await Deno.readTextFile(path)).trim().split("\n").slice(-15).join("\n");
  } catch {
    return "(no log)";
  }
}

/**
 * Starts a private PulseAudio and writes the ALSA configuration for its devices.
 * Resolves once the server answers on its socket.
 */
export async function startPulse(opts: PulseOptions = {}): Promise<PulseServer> {
  const rate = opts.rate ?? 48000;
  const channels = opts.channels ?? 2;
  const toneHz = opts.toneHz ?? 440;
  if (!Number.isInteger(rate) || rate < 8000 || rate > 384000) {
    throw new RangeError(`Invalid rate ${rate}: expected an integer from 8000 to 384000`);
  }
  if (!Number.isInteger(channels) || channels < 1 || channels > 8) {
    throw new RangeError(`Invalid channels ${channels}: expected an integer from 1 to 8`);
  }
  if (!(toneHz > 0 && toneHz < rate / 2)) {
    throw new RangeError(`Invalid tone frequency ${toneHz}: expected 0 < Hz < ${rate / 2}`);
  }

  const dir = await Deno.makeTempDir({ prefix: "kvm-pulse-" });
  const socket = `${dir}/pulse.sock`;
  if (socket.length > SOCKET_PATH_MAX) {
    await Deno.remove(dir, { recursive: true });
    throw new RangeError(
      `Socket path ${JSON.stringify(socket)} is too long: expected at most ${SOCKET_PATH_MAX} ` +
        `characters (set TMPDIR to a shorter directory)`,
    );
  }
  const server = `unix:${socket}`;
  const sink = "kvm_sink";
  const source = "kvm_source";
  const toneSink = "kvm_tone_sink";
  const spec = `rate=${rate} channels=${channels} format=s16le`;
  const script = [
    `load-module module-native-protocol-unix socket=${socket} auth-anonymous=1`,
    `load-module module-null-sink sink_name=${sink} ${spec}`,
    `load-module module-null-source source_name=${source} ${spec}`,
    `load-module module-null-sink sink_name=${toneSink} ${spec}`,
    `load-module module-sine sink=${toneSink} frequency=${toneHz}`,
    `set-default-sink ${sink}`,
    `set-default-source ${source}`,
    "",
  ].join("\n");
  await Deno.mkdir(`${dir}/home`);
  await Deno.mkdir(`${dir}/run`, { mode: 0o700 });
  await Deno.writeTextFile(`${dir}/server.pa`, script);
  const log = `${dir}/pulse.log`;

  const child = new Deno.Command("pulseaudio", {
    args: [
      "-n", // no default script: only what server.pa loads
      `--file=${dir}/server.pa`,
      "--daemonize=no",
      "--exit-idle-time=-1",
      "--disable-shm=yes",
      "--use-pid-file=no",
      "--realtime=no",
      "--high-priority=no",
      `--log-target=file:${log}`,
    ],
    env: {
      PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
      HOME: `${dir}/home`,
      XDG_RUNTIME_DIR: `${dir}/run`,
      LANG: "C",
    },
    clearEnv: true,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();

  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => stopping ??= kill();

  async function kill(): Promise<void> {
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch {
        // Already gone.
      }
      const timer = sleep(STOP_TIMEOUT_MS).then(() => "timeout" as const);
      if ((await Promise.race([status, timer])) === "timeout" && !exited) {
        child.kill("SIGKILL");
      }
    }
    await status;
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }

  try {
    const deadline = performance.now() + READY_TIMEOUT_MS;
    for (;;) {
      if (exited) {
        const s = await status;
        throw new Error(
          `Cannot start pulseaudio: it exited with code ${s.code}; log:\n${await logTail(log)}`,
        );
      }
      if (await pactlReady(server)) break;
      if (performance.now() > deadline) {
        throw new Error(
          `Cannot start pulseaudio: no answer on ${JSON.stringify(socket)} within ` +
            `${READY_TIMEOUT_MS} ms; log:\n${await logTail(log)}`,
        );
      }
      await sleep(50);
    }
    const alsa = await writeAlsaConfig(
      dir,
      {
        [PULSE_PCMS.capture]: { type: "pulse", server, device: source },
        [PULSE_PCMS.playback]: { type: "pulse", server, device: sink },
        [PULSE_PCMS.monitor]: { type: "pulse", server, device: `${sink}.monitor` },
        [PULSE_PCMS.tone]: { type: "pulse", server, device: `${toneSink}.monitor` },
        ...opts.extraPcms,
      },
      { includeSystem: opts.includeSystemConfig ?? true },
    );
    return {
      pid: child.pid,
      dir,
      socket,
      server,
      sink,
      source,
      alsa,
      alsaConfigPath: alsa.configPath,
      env: { ...alsa.env, PULSE_SERVER: server },
      pcm: PULSE_PCMS,
      use: () => useAlsaConfig(alsa),
      [Symbol.asyncDispose]: stop,
    };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** Runs `pactl` against `server`; returns its output, throws with its error when it fails. */
export async function pactl(server: string, ...args: string[]): Promise<string> {
  const out = await new Deno.Command("pactl", {
    args: [`--server=${server}`, ...args],
    env: { PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin", LANG: "C" },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(`pactl ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
  return new TextDecoder().decode(out.stdout);
}

/**
 * Kills every record stream (`"record"`: `pacmd kill-source-output`) or playback stream
 * (`"playback"`: `kill-sink-input`) of the server's clients, as a server restart or a vanished
 * device would:
 * clients see their stream fail. Returns how many were killed. pacmd finds a server by the pid
 * file in its runtime directory (a private server writes none) and talks to the CLI socket there,
 * so both are made in a temporary directory.
 */
export async function killStreams(
  pulse: PulseServer,
  which: "record" | "playback",
): Promise<number> {
  const runtime = await Deno.makeTempDir({ prefix: "kvm-pacmd-" });
  try {
    await Deno.writeTextFile(`${runtime}/pid`, `${pulse.pid}\n`);
    await pactl(pulse.server, "load-module", "module-cli-protocol-unix", `socket=${runtime}/cli`);
    const [list, kill] = which === "record"
      ? ["source-outputs", "kill-source-output"]
      : ["sink-inputs", "kill-sink-input"];
    // Client streams only (driver protocol-native.c): not the server's own tone generator.
    const ids = (await pactl(pulse.server, "list", "short", list))
      .split("\n").map((l) => l.split("\t")).filter((c) => /native/.test(c[3] ?? ""))
      .map((c) => c[0]!).filter((id) => /^[0-9]+$/.test(id));
    const child = new Deno.Command("pacmd", {
      env: {
        PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
        HOME: runtime,
        PULSE_RUNTIME_PATH: runtime,
        LANG: "C",
      },
      clearEnv: true,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const w = child.stdin.getWriter();
    await w.write(new TextEncoder().encode(ids.map((id) => `${kill} ${id}\n`).join("")));
    await w.close();
    const out = await child.output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    // A stream gone meanwhile only fails its own kill; no server at all is an error.
    if (!out.success || /No PulseAudio daemon/.test(text)) throw new Error(`pacmd: ${text}`);
    return ids.length;
  } finally {
    await Deno.remove(runtime, { recursive: true });
  }
}
