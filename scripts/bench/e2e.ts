/**
 * End-to-end benchmarks (issue 4): what one more WebSocket listener costs the service's main
 * thread, and how long a click takes from a paced capture device to a listener. Every figure is a
 * {@link BenchResult} against a baseline measured in the same run; goals are printed, not
 * asserted.
 *
 * **1. Main-thread CPU per listener.** The real service (`main.ts` in a child process, output
 * pipeline only, `--output-preset ultra`) captures a stereo tone-plus-noise signal through a
 * `file` PCM whose slave is PulseAudio's null source, so it is clocked like hardware. It serves
 * N = 0, 1, 10 and 50 WebSocket listeners in turn; the listeners live in another child process
 * (this file with `--listeners`) so that their CPU is not counted. For each N, after a warm-up,
 * the service's main thread's CPU time (`/proc/<pid>/task/<pid>/schedstat`, nanoseconds; the
 * main thread's id is the process id; read with `cat`, as Deno reads /proc only with
 * `--allow-all`) is taken over the window; every listener must have received at least 95 % of
 * the window's packets. The per-listener cost is the least-squares slope of CPU-ms per second
 * against N over the counts from 1 up: with nobody listening the service's output worker
 * publishes nothing, so the step from 0 to 1 listener is the frame pump starting (a wake per
 * frame), not a listener's cost. Baselines, same run, same listener process, same packets:
 * - a bare Deno WebSocket broadcaster (this file with `--broadcast`: `Deno.serve`,
 *   `Deno.upgradeWebSocket`, one 12-byte header + Opus packet message built per 10 ms and `send`
 *   to every socket, paced by a timer) — the floor of what a Deno fan-out costs per listener,
 *   with nothing of the service (no ring, no queue, no backpressure, no metrics). Ratio ≈ 1
 *   means the hub adds nothing that matters per listener;
 * - the service's own zero-listener main-thread CPU (ratio = one listener's cost as a share of
 *   what the main thread spends anyway).
 *
 * **2. Click latency.** Absolute latency needs an absolute reference, which a capture file does
 * not give: the `file` plugin reads its `infile` with no timestamps, and when the service opened
 * the device is not visible from outside (fitting arrival against sample index yields only the
 * jitter). So the click travels a loop whose start the bench itself times:
 * - a worker of this process plays a continuous stream into PulseAudio's null sink (ALSA `pulse`
 *   PCM, 10 ms periods) with a 1 ms full-scale pulse every 500 ms, each shifted by a different
 *   part of a capture period so that the clicks sample every phase of the service's periods and
 *   frames (not one phase fixed by when the devices started). Just before writing the period
 *   that holds a click it reads `snd_pcm_delay` (frames queued before a frame written now is
 *   played): the click's nominal play time is `now + (delay + offset) / 48 kHz`;
 * - the service (`main.ts`, ultra, `--rtp-out` to this process) captures the sink's *monitor*;
 * - this process's main thread is a WebSocket listener and an RTP receiver (`node:dgram`): it
 *   notes each packet's arrival time (`performance.timeOrigin + performance.now()`, comparable
 *   across threads and processes), decodes it (`OpusDecoder`) and finds the click's onset
 *   (first sample above −12 dBFS after 100 ms below). Latency = arrival of the packet holding the
 *   onset − the click's capture time (below);
 * - baseline, at the same time and for the same clicks: a second worker of this process captures
 *   the same monitor as the service does (same period and buffer, `snd_pcm_wait` + `readi`) and
 *   timestamps the period holding the onset: PulseAudio's own loop, which is part of every
 *   service figure. Ratio = service path ÷ bare device loop.
 *
 * The capture time. A null sink renders one block (its configured latency, 10 ms here, read with
 * `pactl` during the run) at the *start* of the interval the block stands for and posts it to the
 * monitor at once, so the monitor hands out a sample up to one block *before* its nominal play
 * time (measured against the nominal time the bare loop ranged from −9.3 to +0.5 ms). A hardware
 * capture device hands a period out at its *end*. The click's capture time is therefore taken as
 * its nominal play time less one block: the monitor then behaves like a capture device with
 * block-long periods, and the bare loop measures the period wait plus PulseAudio's transfer (0 to
 * about 10 ms). The shift is one constant for every path, so the paired figures do not depend on
 * it.
 *
 * Paired figures. Both capture clients get the same blocks from PulseAudio at about the same
 * moment, so the difference per click (service path − bare loop, same click) is the service's own
 * added latency — capture to encode, the ring, the hub or the RTP sender, the socket — plus the
 * codec's look-ahead: the decoded onset lags the input by 2.5 ms (restricted low delay), so a
 * click in the last 2.5 ms of a frame is first heard in the *next* packet, 10 ms later (a quarter
 * of the phases: this is what the p99 shows). Reported as p50/p99 against the frame duration
 * (10 ms at ultra; the capture period is 10 ms too, so frame accumulation waits no longer than the
 * bare loop does).
 *
 * Pairing. Clicks start only once every path has streamed for a while (the monitor stalls for a
 * second or two at start). Each path's first onset is the first click; later onsets are named by
 * their sample offset from it (timestamps of the stream, sample counts of the bare capture), so a
 * missed click cannot shift the pairing; an onset more than 5 ms from where its click should be
 * (samples lost on the way) is counted and left out. The first two clicks are left out as
 * warm-up. p99 of about 60 clicks is close to the largest.
 *
 * Standalone: `deno run -A scripts/bench/e2e.ts [--json] [--quick] [--figure cpu|latency]…`.
 * `--quick` shortens every window (5 s per listener count, 10 s of clicks).
 *
 * @module
 */

import dgram from "node:dgram";
import { endChild, LineReader, stdinLines } from "./lines.ts";
import { RUNTIME_FLAGS } from "../compile.ts";
import { Pcm } from "../../ffi/alsa.ts";
import { OpusDecoder, OpusEncoder } from "../../ffi/opus.ts";
import { epochMs } from "../../lib/frame_ring.ts";
import { encoderSettings, frameSamples, OUTPUT_PRESETS } from "../../lib/quality.ts";
import { readRtp } from "../../lib/transport/rtp.ts";
import { decodeFrame, encodeFrame, PROTOCOL_VERSION } from "../../lib/transport/ws_protocol.ts";
import { writeRaw } from "../../tests/alsa_devices.ts";
import { startPulse } from "../../tests/pulse.ts";
import { benchSignal, procCpuSeconds, readPackets, writePackets } from "./engine_common.ts";
import { type BenchResult, report, result } from "./report.ts";
import { sleep } from "../../tests/wait.ts";

/** Knobs of {@link benchE2e}. */
export interface E2eOptions {
  /** Shorter windows: 5 s per listener count, 10 s of clicks (unless set below). */
  readonly quick?: boolean;
  /** Measured window per listener count, seconds (default 15; quick 5). */
  readonly cpuSeconds?: number;
  /** Listener counts of figure 1 (default 0, 1, 10, 50; must include 0 and two from 1 up). */
  readonly listenerCounts?: readonly number[];
  /** Seconds of clicks for figure 2 (default 30; quick 10). */
  readonly clickSeconds?: number;
  /** Which figures to run (default both). */
  readonly figures?: readonly E2eFigure[];
  /** Progress and notes (default: stderr). */
  readonly log?: (line: string) => void;
}

/** The figure groups of {@link benchE2e}. */
export type E2eFigure = "cpu" | "latency";

const RATE = 48000;
const CHANNELS = 2;
/** The capture period of the output worker (lib/pipeline/output_worker.ts): 10 ms, 8 periods. */
const PERIOD = RATE / 100;
const CAPTURE_BUFFER = PERIOD * 8;
/** Playback queue of the click player. */
const PLAY_BUFFER = PERIOD * 8;
/** A click every 500 ms (plus {@link clickShift})… */
const CLICK_PERIOD = RATE / 2;
/** …of 1 ms at full scale. */
const CLICK_SAMPLES = RATE / 1000;
const CLICK_LEVEL = 32000;
/** Onset: a sample above −12 dBFS… */
const ONSET_THRESHOLD = 8192;
/** …after at least 100 ms below it. */
const ONSET_QUIET = RATE / 10;
/** An onset further than this from where its click should be is misaligned (5 ms). */
const ALIGN_TOLERANCE = RATE / 200;

/** Clicks left out at the start of the run. */
const WARMUP_CLICKS = 2;
/** Share of a window's packets every listener must receive for the window to count. */
const MIN_DELIVERY = 0.95;
/** Warm-up before each CPU window, ms. */
const CPU_WARMUP_MS = 3000;

const ROOT = new URL("../../", import.meta.url).pathname;
const SELF = new URL(import.meta.url).pathname;
const MAIN = new URL("../../main.ts", import.meta.url).pathname;
const ULTRA = OUTPUT_PRESETS.ultra;
// The service as deployed (`deno task start`'s flags), its network narrowed to loopback.
const SERVICE_FLAGS = [
  "--no-prompt",
  ...RUNTIME_FLAGS.map((f) => f === "--allow-net" ? "--allow-net=127.0.0.1" : f),
];
const CLIENT_FLAGS = ["--no-prompt", "--allow-net=127.0.0.1", "--allow-read"];

/**
 * Where click `k` sits after its 500 ms mark, in frames: 0 to one capture period, spread evenly
 * (golden-ratio sequence), so that the clicks land at every phase of the service's capture
 * periods and frames instead of one phase fixed by when the devices happened to start.
 */
function clickShift(k: number): number {
  return Math.floor(((k * 0.6180339887498949) % 1) * PERIOD);
}

function checkPositive(what: string, v: unknown, max: number): number {
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new TypeError(`Invalid ${what} ${JSON.stringify(v) ?? String(v)}: expected a number`);
  }
  if (v <= 0 || v > max) {
    throw new RangeError(`Invalid ${what} ${v}: expected above 0, at most ${max}`);
  }
  return v;
}

/** Quantile `p` of `xs` by linear interpolation between closest ranks. */
function quantile(xs: readonly number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const r = p * (s.length - 1);
  const lo = Math.floor(r), hi = Math.ceil(r);
  return s[lo]! + (s[hi]! - s[lo]!) * (r - lo);
}

// ---------------------------------------------------------------------------------------------
// Click onsets.

/** Finds click onsets in a stream of interleaved samples: above the threshold after quiet. */
class OnsetDetector {
  #quiet = 0;

  /** Frame offset within `pcm` of an onset among its first `frames` frames, or -1. */
  feed(pcm: Int16Array, frames: number, channels: number): number {
    let found = -1;
    for (let i = 0; i < frames; i++) {
      let loud = false;
      for (let c = 0; c < channels; c++) {
        const s = pcm[i * channels + c]!;
        if (s > ONSET_THRESHOLD || s < -ONSET_THRESHOLD) loud = true;
      }
      if (!loud) {
        this.#quiet++;
        continue;
      }
      if (found < 0 && this.#quiet >= ONSET_QUIET) found = i;
      this.#quiet = 0;
    }
    return found;
  }
}

/** An onset seen by one path: when it arrived and its sample index in that path's stream. */
interface Onset {
  readonly at: number;
  readonly index: number;
}

// ---------------------------------------------------------------------------------------------
// Workers (this file, started as a module worker): the click player and the bare loop.

/** What a worker of this file is asked to do. */
type WorkerRequest =
  | { readonly role: "play"; readonly device: string; readonly control: SharedArrayBuffer }
  | { readonly role: "loop"; readonly device: string; readonly control: SharedArrayBuffer };

/** Words of the shared control array. */
const CTL = { stop: 0, clicking: 1 } as const;

/** What the workers post. */
type WorkerMessage =
  | {
    readonly type: "click";
    readonly k: number;
    readonly at: number;
    /** Playback queue ahead of the click when it was written, ms. */
    readonly queuedMs: number;
    readonly xruns: number;
  }
  | { readonly type: "onset"; readonly at: number; readonly index: number }
  | { readonly type: "progress"; readonly frames: number; readonly xruns: number }
  | { readonly type: "error"; readonly message: string }
  | { readonly type: "stopped"; readonly frames: number; readonly xruns: number };

const IN_WORKER = typeof (globalThis as { WorkerGlobalScope?: unknown }).WorkerGlobalScope !==
    "undefined" &&
  self instanceof (globalThis as unknown as { WorkerGlobalScope: typeof EventTarget })
      .WorkerGlobalScope;

function workerPost(m: WorkerMessage): void {
  (self as unknown as { postMessage(m: WorkerMessage): void }).postMessage(m);
}

/**
 * Plays silence with a click every {@link CLICK_PERIOD} once `clicking` is set (clicks are
 * numbered from 0 at the first one), posting each click's reference time (see the module notes).
 */
function playClicks(device: string, control: Int32Array): void {
  using pcm = Pcm.open(device, {
    stream: "playback",
    channels: CHANNELS,
    rate: RATE,
    periodFrames: PERIOD,
    bufferFrames: PLAY_BUFFER,
  });
  const buf = new Int16Array(pcm.periodFrames * CHANNELS);
  const period = pcm.periodFrames;
  let written = 0;
  /** Stream frame of click 0, once clicking. */
  let first = -1;
  let lastProgress = 0;
  while (Atomics.load(control, CTL.stop) === 0) {
    if (!pcm.wait(100)) continue;
    let avail = pcm.avail();
    while (avail >= period) {
      buf.fill(0);
      let clickAt = -1;
      if (first < 0 && Atomics.load(control, CTL.clicking) === 1) {
        first = Math.ceil(written / CLICK_PERIOD) * CLICK_PERIOD;
      }
      if (first >= 0) {
        for (let i = 0; i < period; i++) {
          const n = written + i - first;
          if (n < 0) continue;
          const phase = (n % CLICK_PERIOD) - clickShift(Math.floor(n / CLICK_PERIOD));
          if (phase === 0) clickAt = i;
          if (phase >= 0 && phase < CLICK_SAMPLES) {
            for (let c = 0; c < CHANNELS; c++) buf[i * CHANNELS + c] = CLICK_LEVEL;
          }
        }
      }
      let at = NaN, queuedMs = NaN;
      if (clickAt >= 0 && pcm.state() === "running") {
        queuedMs = ((pcm.delay() + clickAt) / RATE) * 1000;
        at = epochMs() + queuedMs;
      }
      const xruns = pcm.xruns;
      const n = pcm.writei(buf, period);
      if (n < period) break; // An underrun was recovered (n = 0): refill this period next turn.
      if (clickAt >= 0) {
        workerPost({
          type: "click",
          k: Math.floor((written + clickAt - first) / CLICK_PERIOD),
          at: pcm.xruns === xruns ? at : NaN,
          queuedMs,
          xruns: pcm.xruns,
        });
      }
      written += n;
      avail -= n;
    }
    if (written - lastProgress >= RATE) {
      lastProgress = written;
      workerPost({ type: "progress", frames: written, xruns: pcm.xruns });
    }
  }
  workerPost({ type: "stopped", frames: written, xruns: pcm.xruns });
}

/** Captures `device` as the output worker does and posts every onset with its period's time. */
function bareLoop(device: string, control: Int32Array): void {
  using pcm = Pcm.open(device, {
    stream: "capture",
    channels: CHANNELS,
    rate: RATE,
    periodFrames: PERIOD,
    bufferFrames: CAPTURE_BUFFER,
  });
  const buf = new Int16Array(pcm.periodFrames * CHANNELS);
  const detector = new OnsetDetector();
  let index = 0;
  let lastProgress = 0;
  pcm.start();
  while (Atomics.load(control, CTL.stop) === 0) {
    if (!pcm.wait(100)) continue;
    const n = pcm.readi(buf, pcm.periodFrames);
    if (n === 0) continue;
    const at = epochMs();
    const o = detector.feed(buf, n, CHANNELS);
    if (o >= 0) workerPost({ type: "onset", at, index: index + o });
    index += n;
    if (index - lastProgress >= RATE / 10) {
      lastProgress = index;
      workerPost({ type: "progress", frames: index, xruns: pcm.xruns });
    }
  }
  workerPost({ type: "stopped", frames: index, xruns: pcm.xruns });
}

if (IN_WORKER) {
  const scope = self as unknown as {
    onmessage: ((ev: MessageEvent<WorkerRequest>) => void) | null;
    close(): void;
  };
  scope.onmessage = (ev) => {
    scope.onmessage = null;
    const req = ev.data;
    const control = new Int32Array(req.control);
    try {
      if (req.role === "play") playClicks(req.device, control);
      else bareLoop(req.device, control);
    } catch (e) {
      workerPost({ type: "error", message: (e as Error).message });
    }
    scope.close();
  };
}

/** A worker of this file, seen from the main thread. */
class BenchWorker {
  readonly #worker: Worker;
  readonly #control = new Int32Array(new SharedArrayBuffer(8));
  readonly #stopped: Promise<{ frames: number; xruns: number }>;
  frames = 0;
  xruns = 0;
  error: string | null = null;

  constructor(role: WorkerRequest["role"], device: string, onMessage: (m: WorkerMessage) => void) {
    this.#worker = new Worker(import.meta.url, { type: "module" });
    this.#stopped = new Promise((resolve) => {
      this.#worker.onmessage = (ev: MessageEvent<WorkerMessage>) => {
        const m = ev.data;
        if (m.type === "progress" || m.type === "stopped") {
          this.frames = m.frames;
          this.xruns = m.xruns;
        }
        if (m.type === "error") {
          this.error = m.message;
          resolve({ frames: this.frames, xruns: this.xruns });
        } else if (m.type === "stopped") {
          resolve(m);
        } else onMessage(m);
      };
      this.#worker.onerror = (ev) => {
        ev.preventDefault();
        this.error = ev.message;
        resolve({ frames: this.frames, xruns: this.xruns });
      };
    });
    this.#worker.postMessage({ role, device, control: this.#control.buffer } as WorkerRequest);
  }

  /** Tells the player to start clicking at its next click boundary. */
  startClicking(): void {
    Atomics.store(this.#control, CTL.clicking, 1);
  }

  async stop(): Promise<{ frames: number; xruns: number }> {
    Atomics.store(this.#control, CTL.stop, 1);
    const timeout = sleep(3000).then(() => null);
    const r = await Promise.race([this.#stopped, timeout]);
    this.#worker.terminate();
    return r ?? { frames: this.frames, xruns: this.xruns };
  }
}

// ---------------------------------------------------------------------------------------------
// Child processes of this file: WebSocket listeners and the bare broadcaster.

/** Lines the listener and broadcaster children print on stdout, one JSON object each. */
type ClientLine =
  | { readonly event: "ready" }
  | {
    readonly event: "counts";
    readonly counts: readonly number[];
    /** Binary bytes received by all listeners. */
    readonly bytes: number;
    readonly closed: number;
  }
  | { readonly event: "listening"; readonly port: number }
  | { readonly event: "failed"; readonly message: string };

function say(line: ClientLine): void {
  console.log(JSON.stringify(line));
}

/**
 * `--listeners URL N`: opens N WebSocket listeners on URL and counts the binary messages of each.
 * Prints `ready` once every one has received a packet; answers each `count` line on stdin with
 * the counts; closes everything when stdin closes.
 */
async function listenersMain(url: string, n: number): Promise<void> {
  const counts = new Array<number>(n).fill(0);
  let closed = 0, ready = 0, bytes = 0;
  const sockets: WebSocket[] = [];
  for (let i = 0; i < n; i++) {
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") return;
      bytes += (ev.data as ArrayBuffer).byteLength;
      counts[i] = counts[i]! + 1;
      if (counts[i] === 1 && ++ready === n) say({ event: "ready" });
    };
    ws.onclose = () => closed++;
    ws.onerror = () => {};
    sockets.push(ws);
  }
  if (n === 0) say({ event: "ready" });
  for await (const line of stdinLines()) {
    if (line.trim() === "count") say({ event: "counts", counts, bytes, closed });
  }
  for (const ws of sockets) ws.close();
  await sleep(200);
  Deno.exit(0);
}

/**
 * `--broadcast PACKETS`: a bare Deno WebSocket broadcaster. Serves WebSockets on 127.0.0.1
 * (any port; prints `listening`), sends each a hello, then every 10 ms one message (12-byte
 * header + the next packet of the file, looped) to every open socket. Ends when stdin closes.
 */
async function broadcastMain(packetFile: string): Promise<void> {
  const packets = await readPackets(packetFile);
  const hello = JSON.stringify({
    type: "hello",
    version: PROTOCOL_VERSION,
    codec: "opus",
    sampleRate: RATE,
    channels: CHANNELS,
    frameMs: ULTRA.frameMs,
  });
  const sockets = new Set<WebSocket>();
  const ac = new AbortController();
  const server = Deno.serve({
    hostname: "127.0.0.1",
    port: 0,
    signal: ac.signal,
    onListen: ({ port }) => say({ event: "listening", port }),
  }, (req) => {
    if (req.headers.get("upgrade")?.toLowerCase() !== "websocket") {
      return new Response("expected a WebSocket upgrade", { status: 426 });
    }
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onopen = () => {
      sockets.add(socket);
      socket.send(hello);
    };
    socket.onclose = () => sockets.delete(socket);
    socket.onerror = () => sockets.delete(socket);
    return response;
  });
  const fs = frameSamples(ULTRA);
  const periodMs = ULTRA.frameMs;
  const t0 = performance.now();
  let k = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const tick = () => {
    const due = Math.floor((performance.now() - t0) / periodMs) + 1;
    while (k < due) {
      const message = encodeFrame({
        flags: 0,
        channels: CHANNELS,
        seq: k >>> 0,
        timestamp: (k * fs) >>> 0,
      }, packets[k % packets.length]!) as Uint8Array<ArrayBuffer>;
      for (const s of sockets) if (s.readyState === WebSocket.OPEN) s.send(message);
      k++;
    }
    timer = setTimeout(tick, t0 + k * periodMs - performance.now());
  };
  tick();
  for await (const _ of stdinLines()) {
    // Nothing to answer: runs until stdin closes.
  }
  clearTimeout(timer);
  for (const s of sockets) s.close();
  ac.abort();
  await server.finished;
  Deno.exit(0);
}

/** A child process of this file (`--listeners` or `--broadcast`). */
class Client implements AsyncDisposable {
  readonly #process: Deno.ChildProcess;
  readonly #lines: LineReader;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;
  readonly #stderr: Promise<string>;
  #disposed = false;

  constructor(args: string[]) {
    this.#process = new Deno.Command(Deno.execPath(), {
      args: ["run", ...CLIENT_FLAGS, SELF, ...args],
      cwd: ROOT,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#lines = new LineReader(this.#process.stdout);
    this.#stdin = this.#process.stdin.getWriter();
    this.#stderr = new Response(this.#process.stderr).text();
  }

  get pid(): number {
    return this.#process.pid;
  }

  async expect<E extends ClientLine["event"]>(
    event: E,
    timeoutMs = 20_000,
  ): Promise<Extract<ClientLine, { event: E }>> {
    const deadline = sleep(timeoutMs).then(() => "timeout" as const);
    for (;;) {
      const line = await Promise.race([this.#lines.next(), deadline]);
      if (line === "timeout") {
        throw new Error(`Timed out after ${timeoutMs} ms waiting for "${event}" from a client`);
      }
      if (line === undefined) {
        const status = await this.#process.status;
        throw new Error(
          `Benchmark client ended with code ${status.code} before "${event}": ${
            (await this.#stderr).trim().slice(-2000)
          }`,
        );
      }
      const l = JSON.parse(line) as ClientLine;
      if (l.event === event) return l as Extract<ClientLine, { event: E }>;
    }
  }

  async send(line: string): Promise<void> {
    await this.#stdin.write(new TextEncoder().encode(`${line}\n`));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    await endChild({
      process: this.#process,
      stdin: this.#stdin,
      lines: this.#lines,
      stderr: this.#stderr,
    }, 5000);
  }
}

// ---------------------------------------------------------------------------------------------
// The service (main.ts) as a child process.

/** A TCP port free on 127.0.0.1 right now. */
function freeTcpPort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** `main.ts` running in a child process. */
class Service implements AsyncDisposable {
  readonly #process: Deno.ChildProcess;
  readonly #stderr: Promise<string>;
  readonly port: number;
  #exited = false;

  constructor(capture: string, env: Record<string, string>, extra: string[] = []) {
    this.port = freeTcpPort();
    this.#process = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        ...SERVICE_FLAGS,
        MAIN,
        "--capture",
        capture,
        "--no-mic",
        "--output-preset",
        "ultra",
        "--listen",
        `127.0.0.1:${this.port}`,
        "--state-file",
        "none",
        "--log-level",
        "warning",
        ...extra,
      ],
      cwd: ROOT,
      env,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    void this.#process.status.then(() => this.#exited = true);
    this.#stderr = Promise.all([
      new Response(this.#process.stdout).text(),
      new Response(this.#process.stderr).text(),
    ]).then(([o, e]) => `${o}\n${e}`);
  }

  get pid(): number {
    return this.#process.pid;
  }

  get url(): string {
    return `ws://127.0.0.1:${this.port}/api/audio/stream`;
  }

  async #failure(what: string): Promise<Error> {
    const text = this.#exited ? await this.#stderr : "";
    return new Error(
      `The service did not ${what}${
        this.#exited ? ` (it exited: ${text.split("\n").filter((l) => l.trim()).slice(-15)})` : ""
      }`,
    );
  }

  /** Waits until the output pipeline runs. */
  async ready(timeoutMs = 20_000): Promise<void> {
    const end = performance.now() + timeoutMs;
    while (performance.now() < end && !this.#exited) {
      try {
        const r = await fetch(`http://127.0.0.1:${this.port}/api/audio`);
        const body = await r.json() as { running?: boolean };
        if (r.ok && body.running === true) return;
      } catch {
        // Not listening yet.
      }
      await sleep(100);
    }
    throw await this.#failure(`start its output pipeline within ${timeoutMs} ms`);
  }

  /** What the hub says of its listeners (after a window: the request costs the main thread). */
  async hubSummary(): Promise<string> {
    try {
      const r = await fetch(`http://127.0.0.1:${this.port}/api/audio`);
      const body = await r.json() as {
        streams?: { dropped: number; queued: number; bufferedAmount: number }[];
      };
      const s = body.streams ?? [];
      return `; hub: ${s.length} listeners, dropped ${
        s.reduce((a, x) => a + x.dropped, 0)
      }, most queued ${Math.max(0, ...s.map((x) => x.queued))}, most buffered ${
        Math.max(0, ...s.map((x) => x.bufferedAmount))
      } B`;
    } catch (e) {
      return `; hub: no status (${(e as Error).message})`;
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    const signal = (s: Deno.Signal) => {
      try {
        this.#process.kill(s);
      } catch {
        // Gone already.
      }
    };
    signal("SIGINT");
    const timer = setTimeout(() => signal("SIGKILL"), 5000);
    await this.#process.status;
    clearTimeout(timer);
    await this.#stderr.catch(() => "");
  }
}

/** CPU time of thread `tid` of process `pid` so far, ms (`schedstat`: run time in ns). */
async function threadCpuMs(pid: number, tid = pid): Promise<number> {
  const path = `/proc/${pid}/task/${tid}/schedstat`;
  const out = await new Deno.Command("cat", { args: [path], stdout: "piped", stderr: "piped" })
    .output();
  const text = new TextDecoder().decode(out.stdout).trim();
  const ns = Number(text.split(/\s+/)[0]);
  if (!out.success || !Number.isFinite(ns)) {
    throw new Error(`Cannot read the CPU time of thread ${tid} of process ${pid}: "${text}"`);
  }
  return ns / 1e6;
}

// ---------------------------------------------------------------------------------------------
// Figure 1: main-thread CPU per listener.

interface CpuPoint {
  readonly listeners: number;
  /** Main-thread CPU, ms per second of wall time. */
  readonly msPerSecond: number;
  /** Fewest packets any listener received in the window, as a share of the window's packets. */
  readonly delivery: number;
}

/** Least-squares slope of y against x. */
function slope(points: readonly { x: number; y: number }[]): number {
  const n = points.length;
  const mx = points.reduce((a, p) => a + p.x, 0) / n;
  const my = points.reduce((a, p) => a + p.y, 0) / n;
  let sxy = 0, sxx = 0;
  for (const p of points) {
    sxy += (p.x - mx) * (p.y - my);
    sxx += (p.x - mx) ** 2;
  }
  return sxy / sxx;
}

/**
 * Measures the main thread of process `pid` over `seconds` with each count of listeners on
 * `url`, in that order.
 */
async function cpuPoints(
  who: string,
  pid: number,
  url: string,
  counts: readonly number[],
  seconds: number,
  log: (line: string) => void,
  after: () => Promise<string> = () => Promise.resolve(""),
): Promise<CpuPoint[]> {
  const points: CpuPoint[] = [];
  const expected = (seconds * 1000) / ULTRA.frameMs;
  for (const n of counts) {
    await using clients = new Client(["--listeners", url, String(n)]);
    await clients.expect("ready");
    await sleep(CPU_WARMUP_MS);
    await clients.send("count");
    const c0 = await clients.expect("counts");
    const cpu0 = await threadCpuMs(pid);
    const [proc0, clients0] = [await procCpuSeconds(pid), await procCpuSeconds(clients.pid)];
    const t0 = performance.now();
    await sleep(seconds * 1000);
    const cpu1 = await threadCpuMs(pid);
    const t1 = performance.now();
    const [proc1, clients1] = [await procCpuSeconds(pid), await procCpuSeconds(clients.pid)];
    const perSecond = (cpuSeconds: number) => (cpuSeconds * 1000) / ((t1 - t0) / 1000);
    await clients.send("count");
    const c1 = await clients.expect("counts");
    const got = c1.counts.map((c, i) => c - c0.counts[i]!);
    const fewest = n === 0 ? 1 : Math.min(...got) / ((expected * (t1 - t0)) / (seconds * 1000));
    const msPerSecond = (cpu1 - cpu0) / ((t1 - t0) / 1000);
    log(
      `e2e: ${who}, ${n} listeners: main thread ${msPerSecond.toFixed(2)} CPU-ms/s ` +
        `(whole process ${perSecond(proc1 - proc0).toFixed(1)}, listener process ${
          perSecond(clients1 - clients0).toFixed(1)
        }); ` +
        `packets per listener ${n === 0 ? "-" : `${Math.min(...got)}…${Math.max(...got)}`} ` +
        `of ~${Math.round((expected * (t1 - t0)) / (seconds * 1000))}${
          n === 0
            ? ""
            : `, ${((c1.bytes - c0.bytes) / got.reduce((a, x) => a + x, 0)).toFixed(0)} B each`
        }, closed ${c1.closed}` +
        (n === 0 ? "" : await after()),
    );
    if (fewest < MIN_DELIVERY || c1.closed > 0) {
      throw new Error(
        `${who} with ${n} listeners: a listener received ${(fewest * 100).toFixed(1)} % of the ` +
          `window's packets (${c1.closed} closed), expected at least ${
            MIN_DELIVERY * 100
          } % and none closed`,
      );
    }
    points.push({ listeners: n, msPerSecond, delivery: fewest });
  }
  return points;
}

async function figureCpu(
  seconds: number,
  counts: readonly number[],
  dir: string,
  log: (line: string) => void,
): Promise<BenchResult[]> {
  // Enough signal for every window with room to spare: past its end the capture is silence.
  const total = counts.length * (seconds + CPU_WARMUP_MS / 1000 + 5) + 20;
  log(`e2e: capture signal (${Math.ceil(total)} s) and ultra packets…`);
  const signal = benchSignal(Math.ceil(total));
  const capture = `${dir}/signal.raw`, packetFile = `${dir}/ultra.bin`;
  await writeRaw(capture, signal);
  {
    // The bare broadcaster's packets: the first 20 s of the same signal at ultra (looped).
    const fs = frameSamples(ULTRA);
    using enc = OpusEncoder.create(
      { channels: ULTRA.channels, application: ULTRA.application },
      encoderSettings(ULTRA),
    );
    const out = new Uint8Array(1500);
    const packets: Uint8Array[] = [];
    for (let f = 0; f < Math.min(2000, Math.floor(signal.length / 2 / fs)); f++) {
      const n = enc.encode(signal.subarray(f * fs * 2, (f + 1) * fs * 2), fs, out);
      packets.push(out.slice(0, n));
    }
    await writePackets(packetFile, packets);
  }

  log("e2e: private PulseAudio…");
  await using pulse = await startPulse({
    extraPcms: { kvm_e2e_signal: { type: "file", infile: capture, slave: "kvm_capture" } },
  });

  let ours: CpuPoint[];
  {
    log(`e2e: the service (ultra, paced capture) with ${counts.join(", ")} listeners…`);
    await using service = new Service("kvm_e2e_signal", pulse.env);
    await service.ready();
    ours = await cpuPoints(
      "service",
      service.pid,
      service.url,
      counts,
      seconds,
      log,
      () => service.hubSummary(),
    );
  }
  let bare: CpuPoint[];
  {
    log(`e2e: bare Deno WebSocket broadcaster with ${counts.join(", ")} listeners…`);
    await using broadcaster = new Client(["--broadcast", packetFile]);
    const { port } = await broadcaster.expect("listening");
    bare = await cpuPoints(
      "bare broadcaster",
      broadcaster.pid,
      `ws://127.0.0.1:${port}/`,
      counts,
      seconds,
      log,
    );
  }
  // From one listener up (see the module notes on the step from 0 to 1).
  const fit = (ps: CpuPoint[]) =>
    slope(ps.filter((p) => p.listeners > 0).map((p) => ({ x: p.listeners, y: p.msPerSecond })));
  const oursSlope = fit(ours), bareSlope = fit(bare);
  const fitted = counts.filter((n) => n > 0);
  const zero = ours.find((p) => p.listeners === 0)!.msPerSecond;
  const most = Math.max(...counts);
  const oursMost = ours.find((p) => p.listeners === most)!.msPerSecond;
  const bareMost = bare.find((p) => p.listeners === most)!.msPerSecond;
  log(
    `e2e: per listener: service ${oursSlope.toFixed(3)} CPU-ms/s, bare ${
      bareSlope.toFixed(3)
    } CPU-ms/s; zero listeners: service ${zero.toFixed(2)}, bare ${
      bare.find((p) => p.listeners === 0)!.msPerSecond.toFixed(2)
    } CPU-ms/s`,
  );
  return [
    result(
      `main-thread CPU per WS listener (ultra, slope over ${
        fitted.join("/")
      }) vs bare Deno broadcast`,
      oursSlope,
      "CPU-ms/s",
      bareSlope,
    ),
    result(
      `main-thread CPU per WS listener (ultra) vs service main thread at 0 listeners`,
      oursSlope,
      "CPU-ms/s",
      zero,
    ),
    result(
      `main-thread CPU at ${most} WS listeners (ultra) vs bare Deno broadcast`,
      oursMost,
      "CPU-ms/s",
      bareMost,
    ),
  ];
}

// ---------------------------------------------------------------------------------------------
// Figure 2: click latency.

/**
 * The latency PulseAudio configured for sink `sink` (`pactl list sinks`: "configured N usec"),
 * ms: for a null sink, the block it renders at a time. NaN when not found.
 */
async function sinkBlockMs(server: string, sink: string): Promise<number> {
  const out = await new Deno.Command("pactl", {
    args: [`--server=${server}`, "list", "sinks"],
    env: { LANG: "C", LC_ALL: "C" },
    stdout: "piped",
    stderr: "null",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  for (const section of text.split(/^Sink #/m)) {
    if (!new RegExp(`^\\s*Name: ${sink}$`, "m").test(section)) continue;
    const m = /configured (\d+) usec/.exec(section);
    if (m) return Number(m[1]) / 1000;
  }
  return NaN;
}

/** Decodes a path's packets and collects the onsets in them. */
class PacketPath {
  readonly onsets: Onset[] = [];
  readonly #decoder = OpusDecoder.create({ channels: CHANNELS });
  readonly #pcm = new Int16Array(5760 * CHANNELS);
  readonly #detector = new OnsetDetector();
  packets = 0;
  firstAt = NaN;
  errors = 0;

  /** One packet of `timestamp` (48 kHz) that arrived at `at`. */
  push(at: number, timestamp: number, payload: Uint8Array): void {
    if (this.packets++ === 0) this.firstAt = at;
    if (payload.length === 0) return;
    let n: number;
    try {
      n = this.#decoder.decode(payload, this.#pcm, 5760);
    } catch {
      this.errors++;
      return;
    }
    const o = this.#detector.feed(this.#pcm, n, CHANNELS);
    if (o >= 0) this.onsets.push({ at, index: timestamp + o });
  }

  close(): void {
    this.#decoder.close();
  }
}

/** Latency per click number of one path; `misaligned` counts onsets off the click grid. */
function pathLatencies(
  onsets: readonly Onset[],
  clicks: ReadonlyMap<number, number>,
  wrap: number,
): { byClick: Map<number, number>; misaligned: number } {
  const byClick = new Map<number, number>();
  let misaligned = 0;
  const first = onsets[0];
  if (first === undefined) return { byClick, misaligned };
  for (const o of onsets) {
    // Sample distance from the first onset (stream timestamps wrap at 2³²).
    const d = ((o.index - first.index) % wrap + wrap) % wrap;
    const k = Math.round(d / CLICK_PERIOD);
    if (Math.abs(d - (k * CLICK_PERIOD + clickShift(k) - clickShift(0))) > ALIGN_TOLERANCE) {
      misaligned++;
      continue;
    }
    const at = clicks.get(k);
    if (at !== undefined && Number.isFinite(at)) byClick.set(k, o.at - at);
  }
  return { byClick, misaligned };
}

async function figureLatency(
  seconds: number,
  log: (line: string) => void,
): Promise<BenchResult[]> {
  log("e2e: private PulseAudio…");
  await using pulse = await startPulse();
  using _alsa = pulse.use();

  const clicks = new Map<number, number>();
  const queued: number[] = [];
  const blocks: number[] = [];
  const bareOnsets: Onset[] = [];
  const player = new BenchWorker("play", pulse.pcm.playback, (m) => {
    if (m.type !== "click") return;
    clicks.set(m.k, m.at);
    queued.push(m.queuedMs);
  });
  const loop = new BenchWorker("loop", pulse.pcm.monitor, (m) => {
    if (m.type === "onset") bareOnsets.push({ at: m.at, index: m.index });
  });

  const ws = new PacketPath(), rtp = new PacketPath();
  const udp = dgram.createSocket("udp4");
  let socket: WebSocket | null = null;
  try {
    await new Promise<void>((resolve, reject) => {
      udp.once("error", reject);
      udp.bind(0, "127.0.0.1", () => resolve());
    });
    udp.on("message", (msg: Uint8Array) => {
      const at = epochMs();
      const r = readRtp(new Uint8Array(msg.buffer, msg.byteOffset, msg.byteLength));
      if (r.kind === "rtp") rtp.push(at, r.packet.timestamp, r.packet.payload);
    });
    const rtpPort = udp.address().port;
    log(`e2e: the service (ultra) capturing the sink's monitor, RTP to port ${rtpPort}…`);
    await using service = new Service(pulse.pcm.monitor, pulse.env, [
      "--rtp-out",
      `127.0.0.1:${rtpPort}`,
    ]);
    await service.ready();
    socket = new WebSocket(service.url);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (ev) => {
      const at = epochMs();
      if (typeof ev.data === "string") return;
      const f = decodeFrame(new Uint8Array(ev.data as ArrayBuffer));
      ws.push(at, f.timestamp, f.payload);
    };

    // Every path streams steadily (the monitor stalls at first) before the first click.
    const steady = 2000;
    const end = performance.now() + 20_000;
    let since = NaN;
    for (;;) {
      const w0 = ws.packets, r0 = rtp.packets, b0 = loop.frames;
      await sleep(250);
      for (const w of [player, loop]) if (w.error) throw new Error(`Worker failed: ${w.error}`);
      const flowing = ws.packets - w0 >= 15 && rtp.packets - r0 >= 15 && loop.frames - b0 > 0;
      if (!flowing) since = NaN;
      else if (Number.isNaN(since)) since = performance.now();
      if (!Number.isNaN(since) && performance.now() - since >= steady) break;
      if (performance.now() > end) {
        throw new Error(
          `The paths did not stream steadily within 20 s: ${ws.packets} WebSocket and ` +
            `${rtp.packets} RTP packets, ${loop.frames} frames captured by the bare loop`,
        );
      }
    }
    log(`e2e: clicking for ${seconds} s…`);
    player.startClicking();
    await sleep(seconds * 500);
    blocks.push(await sinkBlockMs(pulse.server, pulse.sink));
    await sleep(seconds * 500 + 1500);
    blocks.push(await sinkBlockMs(pulse.server, pulse.sink));
  } finally {
    socket?.close();
    udp.close();
    const [p, l] = [await player.stop(), await loop.stop()];
    ws.close();
    rtp.close();
    log(
      `e2e: player ${p.frames} frames (${p.xruns} underruns), bare loop ${l.frames} frames ` +
        `(${l.xruns} overruns); ${clicks.size} clicks (playback queue ahead of them ${
          quantile(queued, 0.5).toFixed(1)
        } ms median, ${Math.min(...queued).toFixed(1)}…${
          Math.max(...queued).toFixed(1)
        }), onsets: bare ${bareOnsets.length}, ` +
        `WebSocket ${ws.onsets.length} (${ws.packets} packets), RTP ${rtp.onsets.length} ` +
        `(${rtp.packets} packets); decode errors ${ws.errors + rtp.errors}`,
    );
  }
  for (const w of [player, loop]) if (w.error) throw new Error(`Worker failed: ${w.error}`);

  // The hardware-equivalent capture time of each click: its nominal play time less one block of
  // the null sink (see the module notes).
  const block = blocks[0]!;
  if (!(block > 0 && block < 1000) || blocks.some((b) => b !== block)) {
    throw new Error(
      `Cannot tell the null sink's block: PulseAudio reported a configured latency of ${
        blocks.join(" then ")
      } ms, expected one value from 0 to 1000`,
    );
  }
  const captured = new Map([...clicks].map(([k, at]) => [k, at - block]));
  const bare = pathLatencies(bareOnsets, captured, Number.MAX_SAFE_INTEGER);
  const viaWs = pathLatencies(ws.onsets, captured, 2 ** 32);
  const viaRtp = pathLatencies(rtp.onsets, captured, 2 ** 32);
  const counted = (m: Map<number, number>) =>
    [...m].filter(([k]) => k >= WARMUP_CLICKS).map(([, v]) => v);
  const b = counted(bare.byClick), w = counted(viaWs.byClick), r = counted(viaRtp.byClick);
  const added = (m: Map<number, number>) =>
    [...m].filter(([k]) => k >= WARMUP_CLICKS && bare.byClick.has(k))
      .map(([k, v]) => v - bare.byClick.get(k)!);
  const addedWs = added(viaWs.byClick), addedRtp = added(viaRtp.byClick);
  const f = (xs: number[]) =>
    `p50 ${quantile(xs, 0.5).toFixed(2)} p99 ${quantile(xs, 0.99).toFixed(2)} min ${
      Math.min(...xs).toFixed(2)
    } max ${Math.max(...xs).toFixed(2)} ms (${xs.length})`;
  log(
    `e2e: click latency from the hardware-equivalent capture time (nominal play time − the ` +
      `null sink's ${block} ms block): bare loop ${f(b)}; WebSocket ${f(w)}; RTP ${
        f(r)
      }; service-added ` +
      `(paired with the bare loop) WebSocket ${f(addedWs)}, RTP ${f(addedRtp)}; misaligned ` +
      `onsets: bare ${bare.misaligned}, WebSocket ${viaWs.misaligned}, RTP ${viaRtp.misaligned}`,
  );
  const minimum = Math.max(3, Math.floor(((seconds * 1000) / 500 - WARMUP_CLICKS) * 0.8));
  for (const [who, xs] of [["bare loop", b], ["WebSocket", w], ["RTP", r]] as const) {
    if (xs.length < minimum) {
      throw new Error(
        `The ${who} path saw ${xs.length} of the clicks: expected at least ${minimum}`,
      );
    }
  }
  const bp50 = quantile(b, 0.5), bp99 = quantile(b, 0.99);
  return [
    result(
      "click latency p50, paced capture → WS listener (ultra) vs bare PulseAudio loop",
      quantile(w, 0.5),
      "ms",
      bp50,
    ),
    result(
      "click latency p99, paced capture → WS listener (ultra) vs bare PulseAudio loop",
      quantile(w, 0.99),
      "ms",
      bp99,
    ),
    result(
      "click latency p50, paced capture → RTP receiver (ultra) vs bare PulseAudio loop",
      quantile(r, 0.5),
      "ms",
      bp50,
    ),
    result(
      "click latency p99, paced capture → RTP receiver (ultra) vs bare PulseAudio loop",
      quantile(r, 0.99),
      "ms",
      bp99,
    ),
    result(
      "service-added click latency p50, WS − bare loop (same click) vs frame",
      quantile(addedWs, 0.5),
      "ms",
      ULTRA.frameMs,
    ),
    result(
      "service-added click latency p99, WS − bare loop (same click) vs frame",
      quantile(addedWs, 0.99),
      "ms",
      ULTRA.frameMs,
    ),
    result(
      "service-added click latency p50, RTP − bare loop (same click) vs frame",
      quantile(addedRtp, 0.5),
      "ms",
      ULTRA.frameMs,
    ),
    result(
      "service-added click latency p99, RTP − bare loop (same click) vs frame",
      quantile(addedRtp, 0.99),
      "ms",
      ULTRA.frameMs,
    ),
  ];
}

// ---------------------------------------------------------------------------------------------

/**
 * Runs the end-to-end benchmarks (see the module notes). Needs `pulseaudio` and `pactl`; spawns
 * Deno children (`--allow-run`) and reads their threads' CPU time with `cat`.
 */
export async function benchE2e(opts: E2eOptions = {}): Promise<BenchResult[]> {
  const quick = opts.quick === true;
  const cpuSeconds = checkPositive("CPU window", opts.cpuSeconds ?? (quick ? 5 : 15), 3600);
  const clickSeconds = checkPositive("click run", opts.clickSeconds ?? (quick ? 10 : 30), 3600);
  const counts = [...(opts.listenerCounts ?? [0, 1, 10, 50])];
  for (const n of counts) {
    if (!Number.isInteger(n) || n < 0 || n > 1000) {
      throw new RangeError(
        `Invalid listener count ${JSON.stringify(n)}: expected an integer from 0 to 1000`,
      );
    }
  }
  if (!counts.includes(0) || new Set(counts.filter((n) => n > 0)).size < 2) {
    throw new RangeError(
      `Invalid listener counts ${JSON.stringify(counts)}: expected 0 and at least two others`,
    );
  }
  const figures = new Set(opts.figures ?? ["cpu", "latency"]);
  for (const f of figures) {
    if (f !== "cpu" && f !== "latency") {
      throw new RangeError(`Invalid figure ${JSON.stringify(f)}: expected cpu or latency`);
    }
  }
  const log = opts.log ?? ((line: string) => console.error(line));
  const dir = await Deno.makeTempDir({ prefix: "kvm-audio-bench-e2e-" });
  try {
    const out: BenchResult[] = [];
    if (figures.has("cpu")) out.push(...await figureCpu(cpuSeconds, counts, dir, log));
    if (figures.has("latency")) out.push(...await figureLatency(clickSeconds, log));
    return out;
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main && !IN_WORKER) {
  const args = Deno.args;
  if (args[0] === "--listeners") {
    await listenersMain(args[1]!, Number(args[2]));
  } else if (args[0] === "--broadcast") {
    await broadcastMain(args[1]!);
  } else {
    const figures = args.flatMap((a, i) => args[i - 1] === "--figure" ? [a as E2eFigure] : []);
    const options: E2eOptions = {
      quick: args.includes("--quick"),
      ...(figures.length > 0 ? { figures } : {}),
    };
    report(await benchE2e(options), args.includes("--json"));
  }
}
