/**
 * What the engine benchmark ({@link ./engine.ts}) and its child process
 * ({@link ./engine_service.ts}) share: the test signal, the pre-encoded microphone packets and
 * their file format, CPU and memory readings, the child's configuration and report shapes, and
 * quantiles of a histogram's growth between two readings.
 *
 * @module
 */

import process from "node:process";
import { OpusEncoder } from "../../ffi/opus.ts";
import type { HistogramJson, MetricsJson } from "../../lib/metrics.ts";
import { encoderSettings, frameSamples, MICROPHONE_PRESETS } from "../../lib/quality.ts";
import { tone } from "../../tests/audio_util.ts";

/** Sample rate of everything here. */
export const RATE = 48000;

// ---------------------------------------------------------------------------------------------
// Signal and packets.

/**
 * A deterministic stereo test signal of `seconds`: a 440 Hz tone on the left and a 660 Hz tone
 * on the right (−10 dBFS each) over white noise (about −40 dBFS, opposite sign per channel), so
 * that the encoder has real work in both channels. Interleaved S16.
 */
export function benchSignal(seconds: number): Int16Array {
  const frames = Math.round(seconds * RATE);
  const left = tone({ freq: 440, frames, amplitude: 0.3 });
  const right = tone({ freq: 660, frames, amplitude: 0.3 });
  const out = new Int16Array(frames * 2);
  let state = 1;
  for (let i = 0; i < frames; i++) {
    state = (Math.imul(state, 1103515245) + 12345) & 0x7fffffff;
    const n = Math.round((state / 0x7fffffff - 0.5) * 600);
    out[2 * i] = left[i]! + n;
    out[2 * i + 1] = right[i]! - n;
  }
  return out;
}

/**
 * The microphone packets of `signal` (its left channel) at the ultra microphone preset: what an
 * operator's client would send, one packet per 10 ms frame.
 */
export function microphonePackets(signal: Int16Array): Uint8Array[] {
  const p = MICROPHONE_PRESETS.ultra;
  const fs = frameSamples(p);
  const frames = Math.floor(signal.length / 2 / fs);
  using enc = OpusEncoder.create(
    { channels: p.channels, application: p.application },
    encoderSettings(p),
  );
  const mono = new Int16Array(fs);
  const buf = new Uint8Array(1500);
  const out: Uint8Array[] = [];
  for (let f = 0; f < frames; f++) {
    for (let i = 0; i < fs; i++) mono[i] = signal[2 * (f * fs + i)]!;
    const n = enc.encode(mono, fs, buf);
    out.push(buf.slice(0, n));
  }
  return out;
}

/** Writes packets as `[uint16 LE length][bytes]…`. */
export async function writePackets(path: string, packets: readonly Uint8Array[]): Promise<void> {
  const total = packets.reduce((a, p) => a + 2 + p.length, 0);
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of packets) {
    out[off] = p.length & 0xff;
    out[off + 1] = p.length >>> 8;
    out.set(p, off + 2);
    off += 2 + p.length;
  }
  await Deno.writeFile(path, out);
}

/** Reads what {@link writePackets} wrote. */
export async function readPackets(path: string): Promise<Uint8Array[]> {
  const bytes = await Deno.readFile(path);
  const out: Uint8Array[] = [];
  let off = 0;
  while (off + 2 <= bytes.length) {
    const n = bytes[off]! | (bytes[off + 1]! << 8);
    if (off + 2 + n > bytes.length) {
      throw new RangeError(
        `Invalid packet file "${path}": a packet of ${n} bytes at offset ${off} runs past the end`,
      );
    }
    out.push(bytes.subarray(off + 2, off + 2 + n));
    off += 2 + n;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// CPU and memory.

/** This process's CPU time (user + system, every thread), seconds. */
export function processCpuSeconds(): number {
  // getrusage(RUSAGE_SELF): the same counter as /proc/self/stat, at microsecond resolution.
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

let clockTicks: number | null = null;

/** `sysconf(_SC_CLK_TCK)`, the unit of /proc/<pid>/stat times (asked of `getconf` once). */
export async function clockTicksPerSecond(): Promise<number> {
  if (clockTicks !== null) return clockTicks;
  let v = 100;
  try {
    const out = await new Deno.Command("getconf", { args: ["CLK_TCK"], stdout: "piped" }).output();
    const n = Number(new TextDecoder().decode(out.stdout).trim());
    if (out.success && Number.isInteger(n) && n > 0) v = n;
  } catch {
    // No getconf: Linux's USER_HZ is 100 on every architecture we run on.
  }
  return clockTicks = v;
}

/**
 * The text of files under /proc. Deno refuses to read /proc without `--allow-all`, so unless it
 * may, `cat` (an `--allow-run` away) reads them; its CPU is its own, not the process read.
 */
async function readProc(paths: readonly string[]): Promise<string> {
  try {
    return paths.map((p) => Deno.readTextFileSync(p)).join("");
  } catch (e) {
    if (!(e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied)) {
      throw e;
    }
  }
  const out = await new Deno.Command("cat", {
    args: [...paths],
    stdout: "piped",
    stderr: "null",
  }).output();
  return new TextDecoder().decode(out.stdout);
}

/**
 * This process's resident memory split by kind, bytes, from `/proc/<pid>/status`: `anon` (heaps,
 * stacks, arenas: what a leak grows), `file` (mapped files, mostly the `deno` binary's pages
 * touched so far) and `shmem` (shared mappings; V8 allocates the frame rings' SharedArrayBuffers
 * as anonymous memory, so it reads 0 for the service).
 */
export async function rssParts(): Promise<{ anon: number; file: number; shmem: number }> {
  const text = await readProc([`/proc/${Deno.pid}/status`]);
  const kb = (key: string) => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(text);
    if (m === null) throw new Error(`No ${key} in /proc/${Deno.pid}/status`);
    return Number(m[1]) * 1024;
  };
  return { anon: kb("RssAnon"), file: kb("RssFile"), shmem: kb("RssShmem") };
}

/** One `/proc/…/stat` line: id, name, and utime + stime in seconds. */
export function parseStat(
  line: string,
  hz: number,
): { id: number; name: string; cpu: number } | null {
  const m = /^(\d+) \((.*)\) (.*)$/s.exec(line.trim());
  if (m === null) return null;
  // m[3] starts at field 3 (state); utime and stime are fields 14 and 15.
  const f = m[3]!.split(" ");
  const utime = Number(f[11]), stime = Number(f[12]);
  if (!Number.isFinite(utime) || !Number.isFinite(stime)) return null;
  return { id: Number(m[1]), name: m[2]!, cpu: (utime + stime) / hz };
}

/**
 * CPU time (user + system, all threads, including threads that have exited) of process `pid`
 * from `/proc/<pid>/stat`, seconds, at clock-tick resolution. Children's times are not included.
 */
export async function procCpuSeconds(pid: number): Promise<number> {
  const hz = await clockTicksPerSecond();
  const text = await readProc([`/proc/${pid}/stat`]);
  const s = parseStat(text, hz);
  if (s === null) {
    throw new Error(`Cannot read the CPU time of process ${pid}: unexpected stat "${text.trim()}"`);
  }
  return s.cpu;
}

/**
 * CPU time so far of each live thread of this process by thread id, with its name, seconds
 * (`/proc/<pid>/task/<tid>/stat`, clock-tick resolution).
 */
export async function threadCpuSeconds(): Promise<Map<number, { name: string; cpu: number }>> {
  const hz = await clockTicksPerSecond();
  const dir = `/proc/${Deno.pid}/task`;
  let tids: string[];
  try {
    tids = [...Deno.readDirSync(dir)].map((e) => e.name);
  } catch {
    const out = await new Deno.Command("ls", { args: [dir], stdout: "piped" }).output();
    tids = new TextDecoder().decode(out.stdout).split("\n").filter((t) => /^\d+$/.test(t));
  }
  const text = await readProc(tids.map((t) => `${dir}/${t}/stat`));
  const out = new Map<number, { name: string; cpu: number }>();
  for (const line of text.split("\n")) {
    const s = parseStat(line, hz);
    if (s !== null) out.set(s.id, { name: s.name, cpu: s.cpu });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Runs against a drifting floor.

/** CPU seconds of one pass of the codec floor's loops. */
export interface FloorPass {
  /** Encoding every frame of the signal. */
  readonly encode: number;
  /** Decoding every microphone packet; 0 when the pass did not time it. */
  readonly decode: number;
}

/** A run set against the floor timed beside it. */
export interface PairedRun<R> {
  readonly run: R;
  /** The floor for what this run's window held, CPU seconds. */
  readonly floor: number;
  /** The run's CPU seconds ÷ {@link PairedRun.floor}. */
  readonly ratio: number;
}

/**
 * Sets each run against its own floor (the machine's speed drifts between minutes): run `i` was
 * timed between floor passes `i` and `i + 1`, so its floor is the mean of those two, scaled by
 * `floorFor` to what the run's window held. Returns every pair in run order, and the pair whose
 * ratio is the median (of an even count, the upper of the middle two).
 */
export function pairRuns<R>(
  runs: readonly R[],
  passes: readonly FloorPass[],
  cpu: (run: R) => number,
  floorFor: (pass: FloorPass, run: R) => number,
): { paired: PairedRun<R>[]; median: PairedRun<R> } {
  if (runs.length === 0) throw new RangeError("No runs to set against the floor");
  if (passes.length !== runs.length + 1) {
    throw new RangeError(
      `${runs.length} runs need ${runs.length + 1} floor passes around them, got ${passes.length}`,
    );
  }
  const paired = runs.map((run, i) => {
    const a = passes[i]!, b = passes[i + 1]!;
    const floor = floorFor(
      { encode: (a.encode + b.encode) / 2, decode: (a.decode + b.decode) / 2 },
      run,
    );
    return { run, floor, ratio: cpu(run) / floor };
  });
  const sorted = [...paired].sort((x, y) => x.ratio - y.ratio);
  return { paired, median: sorted[Math.floor(sorted.length / 2)]! };
}

// ---------------------------------------------------------------------------------------------
// Histograms.

/** A stage's latency quantiles over an interval, ms, from bucket counts. */
export interface StageQuantiles {
  readonly count: number;
  readonly p50: number;
  readonly p99: number;
  /** Largest observation over the whole run (not only the interval). */
  readonly maxEver: number;
}

/**
 * Quantiles of what histogram `after` gained since `before` (both cumulative readings of the same
 * series), by linear interpolation inside the bucket where the rank falls, as the service's own
 * estimate does; the +Inf bucket ends at the series' largest observation. `null` when nothing was
 * observed in between.
 */
export function intervalQuantiles(
  before: HistogramJson | undefined,
  after: HistogramJson,
): StageQuantiles | null {
  const cum = (h: HistogramJson | undefined, i: number) => h?.buckets[i]?.[1] ?? 0;
  const count = after.count - (before?.count ?? 0);
  if (count <= 0) return null;
  const q = (p: number): number => {
    const rank = p * count;
    let prevBound = 0, prevCum = 0;
    for (let i = 0; i < after.buckets.length; i++) {
      const [bound] = after.buckets[i]!;
      const c = cum(after, i) - cum(before, i);
      const hi = bound === "+Inf" ? (after.max ?? prevBound) : bound;
      if (c >= rank && c > prevCum) {
        return prevBound + (hi - prevBound) * ((rank - prevCum) / (c - prevCum));
      }
      prevBound = hi;
      prevCum = c;
    }
    return prevBound;
  };
  return { count, p50: q(0.5), p99: q(0.99), maxEver: after.max ?? NaN };
}

/** The series of `kvm_audio_stage_latency_ms` for `stage`, if any. */
export function stageHistogram(json: MetricsJson, stage: string): HistogramJson | undefined {
  const family = json.histograms["kvm_audio_stage_latency_ms"] as
    | Record<string, HistogramJson>
    | undefined;
  return family?.[`stage="${stage}"`];
}

/** A counter's value, summed over its label sets. */
export function counterTotal(json: MetricsJson, name: string): number {
  const v = json.counters[name];
  if (v === undefined) return 0;
  if (typeof v === "number") return v;
  return Object.values(v).reduce((a, b) => a + b, 0);
}

/** One labelled counter series' value (0 when absent). */
export function counterLabelled(json: MetricsJson, name: string, label: string): number {
  const v = json.counters[name];
  if (v === undefined || typeof v === "number") return 0;
  return v[label] ?? 0;
}

// ---------------------------------------------------------------------------------------------
// The child's configuration and reports.

/** Figure 1: both pipelines on unpaced file PCMs, flat out, CPU measured. */
export interface CpuRunConfig {
  readonly mode: "cpu";
  /**
   * Raw S16 stereo capture input: `warmupFrames` frames of warm-up, then the `seconds` of audio
   * measured.
   */
  readonly capture: string;
  /** Microphone packets ({@link writePackets}), pushed flat out, looped if short. */
  readonly packets: string;
  /** Seconds of audio per direction in the window. */
  readonly seconds: number;
  /** Frames through each pipeline before the window opens (the JIT's warm-up, as the floor's). */
  readonly warmupFrames: number;
  /** Run the input pipeline (false: the output pipeline alone). */
  readonly input: boolean;
}

/** What a {@link CpuRunConfig} run reports. */
export interface CpuRunReport {
  readonly mode: "cpu";
  /** Process CPU over the window, seconds. */
  readonly cpuSeconds: number;
  readonly wallSeconds: number;
  /** Frames handed to the output listener in the window. */
  readonly outputFrames: number;
  /** Frames encoded before the window but handed over in it (their encoding is not counted). */
  readonly outputBacklogAtOpen: number;
  /** Output frames dropped (ring full). */
  readonly outputDropped: number;
  /** Wall seconds from the capture device's appearance to the output's end. */
  readonly outputSeconds: number;
  /** Microphone packets pushed in the window. */
  readonly inputPushed: number;
  /** Packets pushed before the window but decoded in it (their decoding is counted). */
  readonly inputBacklogAtOpen: number;
  /** Microphone packets pushed since the service started (warm-up included). */
  readonly inputPushedTotal: number;
  /**
   * The input worker's counters since the service started, as its last snapshot before the
   * window closed said. Totals, not growth over the window: the worker posts a snapshot every
   * 250 ms, so a reading at the window's opening lags by up to that much (a few thousand packets
   * when flat out), while at the close the worker has been idle since its last packet and the
   * window closes only once its snapshot counts every pushed packet decoded.
   */
  readonly inputDecodedTotal: number;
  readonly inputConcealedTotal: number;
  readonly inputPlayedTotal: number;
  /**
   * CPU over the window by thread name (`main`, `worker-N` = a Web Worker's JS thread, `V8 …`,
   * `tokio …`), seconds; `exited` is what threads gone by the window's end used (the output
   * worker ends with its input).
   */
  readonly threads: Readonly<Record<string, number>>;
}

/** Figures 2 and 3: both pipelines on paced PulseAudio devices, in an RTP loop over 127.0.0.1. */
export interface PacedRunConfig {
  readonly mode: "paced";
  /** Capture PCM (the PulseAudio tone). */
  readonly capture: string;
  /** Playback PCM (the PulseAudio null sink). */
  readonly playback: string;
}

/** One metrics reading of the paced run. */
export interface PacedMark {
  readonly at: number;
  readonly metrics: MetricsJson;
}

/** What a {@link PacedRunConfig} run reports after its second mark. */
export interface PacedRunReport {
  readonly mode: "paced";
  readonly marks: readonly PacedMark[];
  /** Playout depth and target (frames) sampled every 100 ms between the marks. */
  readonly depthSamples: readonly number[];
  readonly targetSamples: readonly number[];
  /** The microphone frame duration, ms. */
  readonly frameMs: number;
}

/** Figure 4: both pipelines unpaced for many frames; RSS at checkpoints. */
export interface SoakRunConfig {
  readonly mode: "soak";
  /** Raw S16 stereo capture input; past its end the file PCM repeats its last period. */
  readonly capture: string;
  /** Microphone packets, looped. */
  readonly packets: string;
  /** Frame counts (each pipeline) at which RSS is read, ascending. */
  readonly checkpoints: readonly number[];
  /** Give up after this many seconds. */
  readonly timeoutSeconds: number;
}

/** One RSS reading of the soak. */
export interface SoakCheckpoint {
  /** Frames the output handed over / the input decoded when read. */
  readonly outputFrames: number;
  readonly inputDecoded: number;
  readonly inputPlayed: number;
  readonly rss: number;
  /** {@link rssParts} at the same moment. */
  readonly rssParts: { readonly anon: number; readonly file: number; readonly shmem: number };
  readonly heapUsed: number;
  readonly seconds: number;
}

/** What a {@link SoakRunConfig} run reports. */
export interface SoakRunReport {
  readonly mode: "soak";
  readonly checkpoints: readonly SoakCheckpoint[];
  /** Whether the last checkpoint was reached before the timeout. */
  readonly completed: boolean;
  /** Totals at the end. */
  readonly outputFrames: number;
  readonly inputDecoded: number;
  readonly inputPlayed: number;
  readonly seconds: number;
  readonly pushed: number;
  readonly inputRingDrops: number;
  readonly outputRingDrops: number;
}

/** Any configuration of the child. */
export type ChildConfig = CpuRunConfig | PacedRunConfig | SoakRunConfig;

/** Lines the child prints on stdout, one JSON object each. */
export type ChildLine =
  | { readonly event: "started" }
  | { readonly event: "marked"; readonly index: number }
  | { readonly event: "report"; readonly report: CpuRunReport | PacedRunReport | SoakRunReport };
