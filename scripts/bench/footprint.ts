/**
 * Footprint benchmarks (issue 5): how long the service takes to answer its API and how much
 * memory it holds, against a minimal `Deno.serve` program started by the same Deno in the same
 * run. Every figure is a {@link BenchResult}; no goals are asserted.
 *
 * How each figure is taken:
 * - **Start-up to first API answer.** `deno run <the permission flags of `deno task start`>
 *   main.ts --listen 127.0.0.1:PORT --capture … --playback … --pace clock --state-file none`,
 *   on two `file` PCMs of a private, self-contained ALSA configuration (the capture PCM reads a
 *   stereo 660 Hz tone file, the playback PCM writes into a file; `--pace clock` paces both).
 *   Milliseconds from just before `spawn()` to the first 200 from `GET /healthz`, polled every
 *   5 ms (25 ms under emulation) from this process; median of 5 runs (3 with `quick`). The
 *   baseline is a temporary script that only runs `Deno.serve(() => new Response("ok"))`, started
 *   with the same Deno and flags and timed the same way; runs of the two alternate. Both run once
 *   untimed first, so every timed run has a **warm module cache** (transpiled sources, npm
 *   packages, V8 code cache): cold start-up is not measured.
 * - **RSS at idle.** A fresh service; once `/healthz` says both pipelines are `running`, wait
 *   5 s (3 s quick) with no listener and no talker, then `VmRSS` from `/proc/<pid>/status` (the
 *   whole process: the workers are threads of it).
 * - **RSS streaming both ways.** Then one WebSocket listener on `/api/audio/stream` (reading and
 *   discarding the packets) and one talker on `/api/microphone/stream` sending Opus packets of
 *   the preset its hello names (20 ms, mono, at the default preset) on a real-time schedule;
 *   `VmRSS` after 10 s of that (5 s quick), while still streaming. Packets received on both sides
 *   are checked and logged.
 * - The RSS baseline is the minimal `Deno.serve` process's `VmRSS` after the same idle wait.
 *
 * With `arm64`, the same figures again under emulated aarch64 — `qemu-aarch64-static -L /` and
 * the aarch64 Deno that scripts/test-arm64.sh installs into .tools/arm64/ — named
 * "(aarch64, emulated)". Those times include qemu's translation overhead (tens of times slower
 * than native), and the RSS read is the emulator process's: the guest's memory plus qemu's own
 * and its translated-code cache. They say whether the program starts and streams on an aarch64
 * ABI and how it compares with a trivial Deno program there, not what real aarch64 hardware
 * would show. Missing pieces skip the aarch64 figures with a message (run
 * `deno task test:arm64` once to install them).
 *
 * Standalone: `deno run -A scripts/bench/footprint.ts [--json] [--arm64] [--quick]`.
 *
 * @module
 */

import { OpusEncoder } from "../../ffi/opus.ts";
import {
  encoderSettings,
  frameSamples,
  MICROPHONE_PRESETS,
  PRESET_NAMES,
} from "../../lib/quality.ts";
import { encodeFrame, type TalkHello } from "../../lib/transport/ws_protocol.ts";
import { writeAlsaConfig, writeRaw } from "../../tests/alsa_devices.ts";
import { tempDir, tone } from "../../tests/audio_util.ts";
import { type BenchResult, report, result } from "./report.ts";
import { RUNTIME_FLAGS } from "../compile.ts";
import { until, WsClient } from "../../tests/net_util.ts";
import { sleep } from "../../tests/wait.ts";

/** Knobs of {@link benchFootprint}. */
export interface FootprintOptions {
  /** Also measure under emulated aarch64 (qemu-user), when .tools/arm64 has the aarch64 Deno. */
  readonly arm64?: boolean;
  /** Fewer start-up runs (3) and shorter waits (3 s idle, 5 s streaming). */
  readonly quick?: boolean;
  /** Progress and notes (default: stderr). */
  readonly log?: (line: string) => void;
}

const ROOT = new URL("../../", import.meta.url).pathname;
const MAIN = `${ROOT}main.ts`;
const QEMU = "qemu-aarch64-static";
/** The aarch64 libraries the service loads, as Debian's arm64 multiarch packages install them. */
const ARM64_LIBS = ["libopus.so.0", "libasound.so.2", "libspeexdsp.so.1"].map((l) =>
  `/usr/lib/aarch64-linux-gnu/${l}`
);
const CAPTURE = "kvm_fp_capture";
const PLAYBACK = "kvm_fp_playback";
const BASELINE_SOURCE = [
  "// Written by kvm-audio scripts/bench/footprint.ts: the start-up and RSS baseline.",
  "const port = Number(Deno.args[0]);",
  'Deno.serve({ hostname: "127.0.0.1", port, onListen() {} }, () => new Response("ok"));',
  "",
].join("\n");

const median = (xs: readonly number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

/** How to start a Deno of one architecture. */
interface Runtime {
  /** Appended to every figure's name: "" natively, " (aarch64, emulated)" under qemu. */
  readonly suffix: string;
  /** The program spawned and the arguments before Deno's own (`run …`). */
  readonly command: string;
  readonly prefix: readonly string[];
  /** Poll interval for the first answer, ms. */
  readonly pollMs: number;
  /** Longest a start-up may take, ms. */
  readonly startTimeoutMs: number;
}

function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/**
 * The text of a /proc file. Deno refuses to read /proc without `--allow-all`, so unless it may,
 * `cat` reads it.
 */
async function readProc(path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied)) {
      throw e;
    }
  }
  const out = await new Deno.Command("cat", { args: [path], stdout: "piped", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`Cannot read ${path}: ${new TextDecoder().decode(out.stderr).trim()}`);
  }
  return new TextDecoder().decode(out.stdout);
}

/** `VmRSS` and `VmHWM` (peak) of process `pid`, bytes. */
async function memory(pid: number): Promise<{ rss: number; hwm: number }> {
  const text = await readProc(`/proc/${pid}/status`);
  const field = (name: string) => {
    const m = new RegExp(`^${name}:\\s+(\\d+) kB$`, "m").exec(text);
    if (m === null) {
      throw new Error(`Cannot find ${name} in /proc/${pid}/status: expected "${name}: N kB"`);
    }
    return Number(m[1]) * 1024;
  };
  return { rss: field("VmRSS"), hwm: field("VmHWM") };
}

const MiB = (bytes: number) => bytes / 2 ** 20;

/** A spawned program with an HTTP port; keeps the tail of its output for error messages. */
class Program implements AsyncDisposable {
  readonly #process: Deno.ChildProcess;
  readonly #drained: Promise<unknown>;
  readonly #what: string;
  #output = "";
  /** `performance.now()` just before the spawn. */
  readonly spawnedAt: number;
  readonly port: number;

  constructor(
    what: string,
    runtime: Runtime,
    args: readonly string[],
    port: number,
    env: Record<string, string>,
  ) {
    this.#what = what;
    this.port = port;
    this.spawnedAt = performance.now();
    this.#process = new Deno.Command(runtime.command, {
      args: [...runtime.prefix, ...args],
      cwd: ROOT,
      env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1", ...env },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const drain = async (s: ReadableStream<Uint8Array>) => {
      for await (const chunk of s.pipeThrough(new TextDecoderStream())) {
        this.#output = (this.#output + chunk).slice(-4000);
      }
    };
    this.#drained = Promise.all([drain(this.#process.stdout), drain(this.#process.stderr)]);
  }

  get pid(): number {
    return this.#process.pid;
  }

  url(path: string): string {
    return `http://127.0.0.1:${this.port}${path}`;
  }

  /** Milliseconds from the spawn to the first 200 of `path`. */
  async firstAnswer(path: string, runtime: Runtime): Promise<number> {
    let exited = false;
    this.#process.status.then(() => exited = true);
    const deadline = this.spawnedAt + runtime.startTimeoutMs;
    for (;;) {
      try {
        const r = await fetch(this.url(path));
        await r.body?.cancel();
        if (r.status === 200) return performance.now() - this.spawnedAt;
      } catch {
        // Not listening yet.
      }
      if (exited || performance.now() > deadline) {
        throw new Error(
          `${this.#what} did not answer 200 on ${path} ${
            exited ? "before it exited" : `within ${runtime.startTimeoutMs} ms`
          }; its output ends:\n${this.#output.trim()}`,
        );
      }
      await sleep(runtime.pollMs);
    }
  }

  /** Polls `/healthz` until both pipelines say `running`. */
  async pipelinesRunning(timeoutMs: number): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    let last: unknown = null;
    while (performance.now() < deadline) {
      try {
        const h = await (await fetch(this.url("/healthz"))).json() as {
          output?: { state?: string };
          microphone?: { state?: string };
        };
        last = h;
        if (h.output?.state === "running" && h.microphone?.state === "running") return;
      } catch {
        // Keep polling.
      }
      await sleep(100);
    }
    throw new Error(
      `${this.#what}: the pipelines were not both running within ${timeoutMs} ms: last /healthz ${
        JSON.stringify(last)
      }; output ends:\n${this.#output.trim()}`,
    );
  }

  /** SIGTERM, then SIGKILL if it has not exited within `graceMs`. */
  async stop(graceMs = 15_000): Promise<void> {
    try {
      this.#process.kill("SIGTERM");
    } catch {
      // Already exited.
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const killed = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        try {
          this.#process.kill("SIGKILL");
        } catch {
          // Exited meanwhile.
        }
        resolve();
      }, graceMs);
    });
    await Promise.race([this.#process.status, killed]);
    clearTimeout(timer);
    await this.#process.status;
    await this.#drained.catch(() => {});
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}

/** The first text message (the hello) a client received, waiting up to `timeoutMs` for it. */
async function firstText(socket: WsClient, timeoutMs: number): Promise<Record<string, unknown>> {
  await until(`a hello on ${socket.ws.url}`, () => socket.texts.length > 0, timeoutMs);
  return socket.texts[0] as Record<string, unknown>;
}

/** Sends pre-encoded packets of a talk hello's shape on a real-time schedule until stopped. */
function talk(socket: WsClient, hello: TalkHello): { stop(): Promise<number> } {
  const preset = MICROPHONE_PRESETS[
    (PRESET_NAMES as readonly string[]).includes(hello.preset)
      ? hello.preset as typeof PRESET_NAMES[number]
      : "high"
  ];
  const fs = frameSamples(preset);
  if (fs !== hello.frameSamples || preset.channels !== hello.channels) {
    throw new Error(
      `Talk hello ${JSON.stringify(hello)} does not match preset "${preset.name}": expected ` +
        `${preset.channels} channel(s) of ${fs} samples`,
    );
  }
  // One second of a 600 Hz voice-range tone, encoded once, sent in a loop.
  const perSecond = 48000 / fs;
  const pcm = tone({ freq: 600, channels: preset.channels, frames: 48000, amplitude: 0.3 });
  const packets: Uint8Array[] = [];
  {
    using enc = OpusEncoder.create(
      { channels: preset.channels, application: preset.application },
      encoderSettings(preset),
    );
    const buf = new Uint8Array(1500);
    for (let i = 0; i < perSecond; i++) {
      const frame = pcm.subarray(i * fs * preset.channels, (i + 1) * fs * preset.channels);
      packets.push(buf.slice(0, enc.encode(frame, fs, buf)));
    }
  }
  let running = true;
  let sent = 0;
  const done = (async () => {
    const t0 = performance.now();
    for (let i = 0; running; i++) {
      if (socket.ws.readyState !== WebSocket.OPEN) break;
      socket.ws.send(encodeFrame(
        { flags: 0, channels: preset.channels, seq: i >>> 0, timestamp: (i * fs) >>> 0 },
        packets[i % packets.length]!,
      ));
      sent++;
      await sleep(t0 + (i + 1) * preset.frameMs - performance.now());
    }
  })();
  return {
    async stop() {
      running = false;
      await done;
      return sent;
    },
  };
}

/** The aarch64 runtime, or why it is not available. */
async function arm64Runtime(): Promise<Runtime | string> {
  const help = "run `deno task test:arm64` (scripts/test-arm64.sh) once to install it";
  let version: string | undefined;
  try {
    const lock = JSON.parse(await Deno.readTextFile(`${ROOT}.tools/package-lock.json`)) as {
      packages?: Record<string, { version?: string }>;
    };
    version = lock.packages?.["node_modules/@deno/linux-arm64-glibc"]?.version;
  } catch {
    // Reported below.
  }
  if (version === undefined) {
    return `no @deno/linux-arm64-glibc entry in ${ROOT}.tools/package-lock.json`;
  }
  const deno = `${ROOT}.tools/arm64/deno-${version}/deno`;
  try {
    if (!(await Deno.stat(deno)).isFile) return `${deno} is not a file; ${help}`;
  } catch {
    return `no aarch64 Deno at ${deno}; ${help}`;
  }
  for (const lib of ARM64_LIBS) {
    try {
      await Deno.stat(lib);
    } catch {
      return `no ${lib} (Debian arm64 multiarch library); ${help}`;
    }
  }
  try {
    const out = await new Deno.Command(QEMU, {
      args: ["-L", "/", deno, "--version"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const first = new TextDecoder().decode(out.stdout).split("\n")[0] ?? "";
    if (!out.success || !first.includes("aarch64")) {
      return `${QEMU} -L / ${deno} --version printed "${first}": expected an aarch64 Deno`;
    }
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return `no ${QEMU} on PATH; ${help}`;
    throw e;
  }
  return {
    suffix: " (aarch64, emulated)",
    command: QEMU,
    prefix: ["-L", "/", deno],
    pollMs: 25,
    startTimeoutMs: 300_000,
  };
}

/** Runs every figure for one runtime. */
async function measure(
  runtime: Runtime,
  dir: string,
  { runs, idleSeconds, streamSeconds, log }: {
    runs: number;
    idleSeconds: number;
    streamSeconds: number;
    log: (line: string) => void;
  },
): Promise<BenchResult[]> {
  // The service as deployed: `deno task start`'s flags (tests/compile_test.ts keeps them equal).
  const perms = RUNTIME_FLAGS;
  const baselineScript = `${dir}/baseline_serve.ts`;
  await Deno.writeTextFile(baselineScript, BASELINE_SOURCE);
  // Self-contained: the same configuration works natively and under qemu (where the system one
  // cannot load, see tests/alsa_devices.ts).
  const alsa = await writeAlsaConfig(dir, {
    [CAPTURE]: { type: "file", infile: `${dir}/in.raw` },
    [PLAYBACK]: { type: "file", outfile: `${dir}/out.raw` },
  }, { includeSystem: false });

  const ours = (port: number) =>
    new Program(
      "kvm-audio",
      runtime,
      [
        "run",
        ...perms,
        MAIN,
        "--listen",
        `127.0.0.1:${port}`,
        "--capture",
        CAPTURE,
        "--playback",
        PLAYBACK,
        "--pace",
        "clock",
        "--state-file",
        "none",
      ],
      port,
      alsa.env,
    );
  const baseline = (port: number) =>
    new Program(
      "the baseline Deno.serve",
      runtime,
      [
        "run",
        ...perms,
        baselineScript,
        String(port),
      ],
      port,
      {},
    );

  // --- Start-up: one untimed run each (warm module cache), then alternating timed runs. --------
  const startup = async (make: (port: number) => Program) => {
    await using p = make(freePort());
    return await p.firstAnswer("/healthz", runtime);
  };
  log(`footprint${runtime.suffix}: warming the module cache (one untimed run each)`);
  await startup(ours);
  await startup(baseline);
  const oursMs: number[] = [], baseMs: number[] = [];
  for (let i = 0; i < runs; i++) {
    oursMs.push(await startup(ours));
    baseMs.push(await startup(baseline));
  }
  const fmt = (xs: number[]) => xs.map((x) => x.toFixed(0)).join(", ");
  log(
    `footprint${runtime.suffix}: start-up ms: kvm-audio ${fmt(oursMs)}; baseline ${fmt(baseMs)}`,
  );

  // --- RSS of the baseline after the idle wait. ------------------------------------------------
  let baseRss: number;
  {
    await using p = baseline(freePort());
    await p.firstAnswer("/healthz", runtime);
    await sleep(idleSeconds * 1000);
    const m = await memory(p.pid);
    baseRss = m.rss;
    log(`footprint${runtime.suffix}: baseline VmRSS ${MiB(m.rss).toFixed(1)} MiB`);
  }

  // --- RSS of the service: idle, then streaming both ways. -------------------------------------
  let idle: { rss: number; hwm: number };
  let streaming: { rss: number; hwm: number };
  {
    await using p = ours(freePort());
    await p.firstAnswer("/healthz", runtime);
    await p.pipelinesRunning(runtime.startTimeoutMs);
    await sleep(idleSeconds * 1000);
    idle = await memory(p.pid);

    const listener = new WsClient(`ws://127.0.0.1:${p.port}/api/audio/stream`);
    const talker = new WsClient(`ws://127.0.0.1:${p.port}/api/microphone/stream`);
    try {
      await Promise.all([listener.opened, talker.opened]);
      const hello = await firstText(talker, 30_000) as unknown as TalkHello;
      await firstText(listener, 30_000);
      const sender = talk(talker, hello);
      const listened0 = listener.binary;
      await sleep(streamSeconds * 1000);
      streaming = await memory(p.pid);
      const listened = listener.binary - listened0;
      const sent = await sender.stop();
      await sleep(300);
      const mic = await (await fetch(p.url("/api/microphone"))).json() as {
        talker?: { received?: number; malformed?: number } | null;
      };
      const received = mic.talker?.received ?? 0;
      log(
        `footprint${runtime.suffix}: over ${streamSeconds} s streaming the listener got ` +
          `${listened} packets; the talker sent ${sent} (${hello.frameMs} ms, ${hello.channels} ch, ` +
          `preset ${hello.preset}), the service received ${received}, malformed ${
            mic.talker?.malformed ?? "?"
          }`,
      );
      if (listened === 0 || received === 0) {
        throw new Error(
          `Streaming did not flow: the listener got ${listened} packets, the service received ` +
            `${received} of ${sent} talker packets`,
        );
      }
    } finally {
      await Promise.all([listener.close(), talker.close()]);
    }
    log(
      `footprint${runtime.suffix}: kvm-audio VmRSS idle ${MiB(idle.rss).toFixed(1)} MiB, ` +
        `streaming ${MiB(streaming.rss).toFixed(1)} MiB, peak (VmHWM) ${
          MiB(streaming.hwm).toFixed(1)
        } MiB`,
    );
  }

  const rssNote = runtime.prefix.length > 0 ? ", qemu process" : "";
  return [
    result(
      `startup to first /healthz 200, warm cache, median of ${runs}${runtime.suffix}`,
      median(oursMs),
      "ms",
      median(baseMs),
    ),
    result(
      `RSS idle, both pipelines running, after ${idleSeconds} s${rssNote}${runtime.suffix}`,
      MiB(idle.rss),
      "MiB",
      MiB(baseRss),
    ),
    result(
      `RSS streaming (1 listener + 1 talker), after ${streamSeconds} s${rssNote}${runtime.suffix}`,
      MiB(streaming.rss),
      "MiB",
      MiB(baseRss),
    ),
  ];
}

/**
 * Start-up time to the first API answer and RSS at idle and while streaming both ways, against
 * a minimal `Deno.serve` program (see the module notes for the method). With `arm64`, the same
 * under emulated aarch64 when the toolchain is installed; skipped with a message otherwise.
 */
export async function benchFootprint(opts: FootprintOptions = {}): Promise<BenchResult[]> {
  const log = opts.log ?? ((line: string) => console.error(line));
  const quick = opts.quick ?? false;
  const settings = {
    runs: quick ? 3 : 5,
    idleSeconds: quick ? 3 : 5,
    streamSeconds: quick ? 5 : 10,
    log,
  };
  await using dir = await tempDir("kvm-audio-footprint-");
  // The capture file: a stereo tone long enough for every run (a file PCM past its end keeps
  // reading without new data).
  await writeRaw(
    `${dir.path}/in.raw`,
    tone({ freq: 660, channels: 2, frames: 48000 * 60, amplitude: 0.4 }),
  );
  const native: Runtime = {
    suffix: "",
    command: Deno.execPath(),
    prefix: [],
    pollMs: 5,
    startTimeoutMs: 60_000,
  };
  const results = await measure(native, dir.path, settings);
  if (opts.arm64) {
    const arm = await arm64Runtime();
    if (typeof arm === "string") {
      log(`footprint: skipping the aarch64 figures: ${arm}`);
    } else {
      results.push(...await measure(arm, dir.path, settings));
    }
  }
  return results;
}

if (import.meta.main) {
  const known = ["--json", "--arm64", "--quick"];
  const unknown = Deno.args.filter((a) => !known.includes(a));
  if (unknown.length > 0) {
    console.error(
      `Unknown argument ${JSON.stringify(unknown[0])}: expected ${known.join(", ")}`,
    );
    Deno.exit(2);
  }
  const results = await benchFootprint({
    arm64: Deno.args.includes("--arm64"),
    quick: Deno.args.includes("--quick"),
  });
  report(results, Deno.args.includes("--json"));
}
