/**
 * The child process of the engine benchmark ({@link ./engine.ts}): runs one {@link AudioService}
 * the way a figure needs it and reports on stdout, one JSON object per line ({@link ChildLine}),
 * so that the parent can measure this process from outside (`/proc/<pid>/stat`) and nothing of
 * the parent (its test signal, its floor loop, GStreamer's pipes) is counted in it.
 *
 * `deno run --allow-ffi --allow-read --allow-write --allow-env --allow-run --allow-net=127.0.0.1
 * scripts/bench/engine_service.ts '<config JSON>'` with a {@link ChildConfig} (`--allow-run`: Deno
 * reads /proc only with `--allow-all`, so thread times are read by `cat`):
 * - `cpu` — figure 1: both pipelines on unpaced file PCMs, flat out; reports its own CPU over a
 *   window that opens once both pipelines have carried a warm-up (see {@link cpuRun}).
 * - `paced` — figures 2 and 3: both pipelines on paced devices (PulseAudio through the ALSA
 *   configuration in the environment), output frames sent as RTP to 127.0.0.1 and received back
 *   into the microphone pipeline. Prints `started`; every `mark` line on stdin takes a metrics
 *   reading; the second one ends the run with a report.
 * - `soak` — figure 4: both pipelines on unpaced file PCMs for many frames; reports RSS at
 *   checkpoints.
 *
 * @module
 */

import { AudioService } from "../../lib/service.ts";
import { stdinLines } from "./lines.ts";
import { RtpReceiver, RtpSender } from "../../lib/transport/rtp.ts";
import { frameSamples, MICROPHONE_PRESETS, OUTPUT_PRESETS } from "../../lib/quality.ts";
import { type AlsaConfig, useAlsaConfig, writeAlsaConfig } from "../../tests/alsa_devices.ts";
import { tempDir } from "../../tests/audio_util.ts";
import { sleep, until } from "../../tests/wait.ts";
import {
  type ChildConfig,
  type ChildLine,
  counterLabelled,
  counterTotal,
  type CpuRunConfig,
  type CpuRunReport,
  type PacedMark,
  type PacedRunConfig,
  type PacedRunReport,
  processCpuSeconds,
  readPackets,
  rssParts,
  type SoakCheckpoint,
  type SoakRunConfig,
  type SoakRunReport,
  threadCpuSeconds,
} from "./engine_common.ts";

const DECODED = "kvm_audio_input_packets_decoded_total";
const PLAYED = "kvm_audio_input_frames_played_total";
const CONCEALED = "kvm_audio_input_frames_concealed_total";
const DROPPED = "kvm_audio_frames_dropped_total";

function say(line: ChildLine): void {
  console.log(JSON.stringify(line));
}

/**
 * Pushes microphone packets flat out, as many as the input ring takes: tops its backlog up to
 * {@link FLAT_BACKLOG} packets, then yields to the event loop for a timer turn (≈ 1–2 ms, in which
 * the input worker plays a few dozen of them). Resolves when `count` packets were pushed, or
 * sooner once `stop()` holds; to the index of the next packet.
 */
async function pushFlat(
  service: AudioService,
  packets: readonly Uint8Array[],
  frame: number,
  from: number,
  count: number,
  stop: () => boolean = () => false,
): Promise<number> {
  let k = from;
  while (k < from + count && !stop()) {
    while (k < from + count && service.microphoneBacklog < FLAT_BACKLOG) {
      const p = packets[k % packets.length]!;
      service.pushMicrophonePacket(p, k & 0xffff, (k * frame) >>> 0, "local");
      k++;
    }
    await sleep(1);
  }
  return k;
}

/** Packets {@link pushFlat} keeps queued: most of the input ring (64), never all of it. */
const FLAT_BACKLOG = 48;

/**
 * Figure 1: one service with `pace: "flat"` — the output pipeline capturing from an unpaced file
 * PCM flat out, the input pipeline playing packets into an unpaced file PCM one frame per packet
 * as fast as {@link pushFlat} feeds them. Both pipelines are warmed up first, as the floor's loops
 * are: the capture PCM is missing at first (the output worker loads, fails to open it and waits
 * to retry) while `warmupFrames` packets go through the input; then the capture PCM appears (a
 * new ALSA configuration; the output worker opens it at its next retry), packets keep going
 * through the input while the output warms up, and the window opens when the output listener is
 * handed the `warmupFrames`-th frame: CPU is read there, in the listener, and `seconds` of
 * packets are pushed from then on (packets still queued then are reported as
 * `inputBacklogAtOpen`: their decoding is inside the window). The window closes when the output
 * ended (its file holds exactly the window's `seconds` after the warm-up) and the input worker
 * reported every packet decoded. Frames the output worker had encoded but not handed over when
 * the window opened are reported (`outputBacklogAtOpen`): their encoding is outside the window.
 * Waits poll every 20 ms: the harness's own wake-ups count in the window, and so do the two
 * thread-time snapshots (≈ 1 ms of CPU each, by `cat`).
 */
async function cpuRun(cfg: CpuRunConfig): Promise<CpuRunReport> {
  await using dir = await tempDir("kvm-bench-engine-");
  const playback = { kvm_bench_playback: { type: "file", outfile: "/dev/null" } } as const;
  const before = await writeAlsaConfig(dir.path, playback);
  const after = await writeAlsaConfig(dir.path, {
    ...playback,
    kvm_bench_capture: { type: "file", infile: cfg.capture },
  });
  const packets = await readPackets(cfg.packets);
  const frame = frameSamples(MICROPHONE_PRESETS.ultra);
  const outputFrame = frameSamples(OUTPUT_PRESETS.ultra);
  const windowPackets = Math.round((cfg.seconds * 48000) / frame);
  const warmupPackets = cfg.input ? cfg.warmupFrames : 0;

  const alsa = { current: useAlsaConfig(before) };
  const service = new AudioService({
    capture: "kvm_bench_capture",
    playback: cfg.input ? "kvm_bench_playback" : null,
    outputPreset: "ultra",
    microphonePreset: "ultra",
    maxCaptureSamples: cfg.seconds * 48000 + cfg.warmupFrames * outputFrame,
    pace: "flat",
    metricsIntervalMs: 250,
  });
  const opened = Promise.withResolvers<void>();
  let handed = 0, cpu0 = NaN, t0 = NaN, backlog0 = 0, inputBacklog0 = 0, open = false;
  service.subscribe(() => {
    if (++handed === cfg.warmupFrames) {
      cpu0 = processCpuSeconds();
      t0 = performance.now();
      backlog0 = service.outputBacklog;
      inputBacklog0 = service.microphoneBacklog;
      open = true;
      opened.resolve();
    }
  });
  const decoded = () => counterTotal(service.metrics.toJSON(), DECODED);
  try {
    service.start();
    if (cfg.input) {
      await until("the input pipeline to run", () => service.microphoneStatus().running, 15_000);
    }
    await until("the output worker to miss its device", () => {
      return service.outputStatus().lastDeviceError !== null;
    }, 15_000);
    let pushed = 0;
    if (cfg.input) {
      pushed = await pushFlat(service, packets, frame, 0, warmupPackets);
      await until("the warm-up", () => decoded() >= warmupPackets, 30_000);
    }

    alsa.current[Symbol.dispose]();
    alsa.current = useAlsaConfig(after);
    // The input keeps streaming while the output warms up, into the window: an input worker left
    // idle there would meet the window on paths it had not run before, and V8 would throw away
    // its optimised loop and run the window in unoptimised code (seen with --trace-deopt).
    if (cfg.input) pushed = await pushFlat(service, packets, frame, pushed, Infinity, () => open);
    await opened.promise;
    const pushedBefore = pushed;
    const threads0 = await threadCpuSeconds();
    let outputEnd = NaN;
    const outputEnded = () => {
      if (Number.isNaN(outputEnd) && service.outputStatus().supervisor?.lastExit === "ended") {
        outputEnd = performance.now();
      }
      return !Number.isNaN(outputEnd);
    };
    if (cfg.input) pushed = await pushFlat(service, packets, frame, pushed, windowPackets);
    await until(
      "the window to close",
      () => outputEnded() && (!cfg.input || decoded() >= pushedBefore + windowPackets),
      cfg.seconds * 1000 + 60_000,
      20,
    );
    const threads1 = await threadCpuSeconds();
    const cpu1 = processCpuSeconds();
    const t1 = performance.now();
    const in1 = service.metrics.toJSON();

    const threads: Record<string, number> = {};
    let alive = 0;
    for (const [tid, t] of threads1) {
      const d = t.cpu - (threads0.get(tid)?.cpu ?? 0);
      alive += d;
      const group = tid === Deno.pid ? "main" : t.name.replace(/[- ]?\d+$|-w$/, "");
      threads[group] = (threads[group] ?? 0) + d;
    }
    threads["exited"] = Math.max(0, cpu1 - cpu0 - alive);
    return {
      mode: "cpu",
      cpuSeconds: cpu1 - cpu0,
      wallSeconds: (t1 - t0) / 1000,
      outputFrames: handed - cfg.warmupFrames,
      outputBacklogAtOpen: backlog0,
      outputDropped: counterTotal(in1, DROPPED),
      outputSeconds: (outputEnd - t0) / 1000,
      inputPushed: cfg.input ? windowPackets : 0,
      inputBacklogAtOpen: inputBacklog0,
      inputPushedTotal: pushed,
      inputDecodedTotal: counterTotal(in1, DECODED),
      inputConcealedTotal: counterTotal(in1, CONCEALED),
      inputPlayedTotal: counterTotal(in1, PLAYED),
      threads,
    };
  } finally {
    await service.close();
    alsa.current[Symbol.dispose]();
  }
}

/** Figures 2 and 3 (see the module notes). */
async function pacedRun(cfg: PacedRunConfig): Promise<PacedRunReport> {
  const service = new AudioService({
    capture: cfg.capture,
    playback: cfg.playback,
    outputPreset: "ultra",
    microphonePreset: "ultra",
  });
  const receiver = await RtpReceiver.listen(service, { port: 0 });
  const sender = await RtpSender.open(service, { destinations: [`127.0.0.1:${receiver.port}`] });
  const marks: PacedMark[] = [];
  const depthSamples: number[] = [];
  const targetSamples: number[] = [];
  let sampler: ReturnType<typeof setInterval> | undefined;
  try {
    service.start();
    say({ event: "started" });
    for await (const line of stdinLines()) {
      if (line.trim() !== "mark") continue;
      marks.push({ at: Date.now(), metrics: service.metrics.toJSON() });
      say({ event: "marked", index: marks.length - 1 });
      if (marks.length === 1) {
        // Twice a second: a full metrics snapshot is this harness's cost, counted in the window.
        sampler = setInterval(() => {
          const g = service.metrics.toJSON().gauges;
          const d = g["kvm_audio_playout_depth_frames"], t = g["kvm_audio_playout_target_frames"];
          if (typeof d === "number") depthSamples.push(d);
          if (typeof t === "number") targetSamples.push(t);
        }, 500);
      } else break;
    }
  } finally {
    clearInterval(sampler);
    await sender.close();
    await receiver.close();
    await service.close();
  }
  return {
    mode: "paced",
    marks,
    depthSamples,
    targetSamples,
    frameMs: MICROPHONE_PRESETS.ultra.frameMs,
  };
}

/**
 * Figure 4. Both pipelines run flat out on file PCMs in one service with `pace: "flat"`. The
 * capture file is short: past its end the `file` plugin leaves the read buffer as it was, so the
 * last period repeats (no end is set; under flat pacing the output worker waits for the main
 * thread rather than dropping). Microphone packets are pushed with {@link pushFlat}, the input
 * worker playing one frame per packet. Checkpoints are taken when both the frames handed over and
 * the packets decoded reach a count; a full GC first when `--expose-gc` is given, so that RSS
 * reflects what is live plus what the heap keeps reserved.
 */
async function soakRun(cfg: SoakRunConfig): Promise<SoakRunReport> {
  await using dir = await tempDir("kvm-bench-engine-");
  const alsa: AlsaConfig = await writeAlsaConfig(dir.path, {
    kvm_bench_capture: { type: "file", infile: cfg.capture },
    kvm_bench_playback: { type: "file", outfile: "/dev/null" },
  });
  using _alsa = useAlsaConfig(alsa);
  const packets = await readPackets(cfg.packets);
  const frame = frameSamples(MICROPHONE_PRESETS.ultra);
  const service = new AudioService({
    capture: "kvm_bench_capture",
    playback: "kvm_bench_playback",
    outputPreset: "ultra",
    microphonePreset: "ultra",
    pace: "flat",
    metricsIntervalMs: 250,
  });
  let handed = 0;
  service.subscribe(() => handed++);
  const gc = (globalThis as { gc?: () => void }).gc;
  const checkpoints: SoakCheckpoint[] = [];
  const t0 = performance.now();
  let pushed = 0;
  let json = service.metrics.toJSON();
  try {
    service.start();
    await until("the input pipeline to run", () => service.microphoneStatus().running, 15_000);
    const deadline = t0 + cfg.timeoutSeconds * 1000;
    let next = 0;
    while (next < cfg.checkpoints.length && performance.now() < deadline) {
      // A metrics snapshot every 500 packets (≈ 5 s of audio): the harness's own garbage stays
      // small next to the service's.
      pushed = await pushFlat(service, packets, frame, pushed, 500);
      json = service.metrics.toJSON();
      const decoded = counterTotal(json, DECODED);
      const target = cfg.checkpoints[next]!;
      if (handed >= target && decoded >= target) {
        gc?.();
        const mem = Deno.memoryUsage();
        const parts = await rssParts();
        checkpoints.push({
          outputFrames: handed,
          inputDecoded: decoded,
          inputPlayed: counterTotal(json, PLAYED),
          rss: mem.rss,
          rssParts: parts,
          heapUsed: mem.heapUsed,
          seconds: (performance.now() - t0) / 1000,
        });
        next++;
      }
    }
    json = service.metrics.toJSON();
    return {
      mode: "soak",
      checkpoints,
      completed: next === cfg.checkpoints.length,
      outputFrames: handed,
      inputDecoded: counterTotal(json, DECODED),
      inputPlayed: counterTotal(json, PLAYED),
      seconds: (performance.now() - t0) / 1000,
      pushed,
      inputRingDrops: counterLabelled(json, DROPPED, `reason="input_ring_full"`),
      outputRingDrops: counterLabelled(json, DROPPED, `reason="ring_full"`),
    };
  } finally {
    await service.close();
  }
}

if (import.meta.main) {
  const arg = Deno.args[0];
  if (arg === undefined) {
    console.error("Usage: engine_service.ts '<config JSON>'");
    Deno.exit(2);
  }
  const cfg = JSON.parse(arg) as ChildConfig;
  const report = cfg.mode === "cpu"
    ? await cpuRun(cfg)
    : cfg.mode === "paced"
    ? await pacedRun(cfg)
    : cfg.mode === "soak"
    ? await soakRun(cfg)
    : (() => {
      throw new RangeError(
        `Invalid mode ${
          JSON.stringify((cfg as { mode: unknown }).mode)
        }: expected cpu, paced or soak`,
      );
    })();
  say({ event: "report", report });
  // Workers and sockets are closed; leave without waiting for stray timers.
  Deno.exit(0);
}
