/**
 * One-way hop latency of an Opus-sized frame between the main thread and a worker: the
 * {@link FrameRing} (producer publishes and notifies; a worker consumer blocks in `Atomics.wait`,
 * a main-thread consumer awaits `Atomics.waitAsync` through `nextAsync`, as the service's frame
 * pump does) against `postMessage` of the same frame
 * (a copied `Uint8Array`).
 *
 * Each frame carries its send time (`performance.timeOrigin + performance.now()`, comparable across
 * threads); the receiver subtracts it from its own clock on arrival. Measured paced (the receiver
 * idle between frames, as with 20 ms audio frames) and flat out (back to back). Flat out the two
 * fail differently: the ring drops what the consumer cannot take (see the "delivered" line) and
 * delivers fresh frames, `postMessage` queues everything and its latency grows with the queue.
 * The first frames of every run warm up the JIT and are not counted. Timestamps are doubles of
 * about 1.8e12 ms, so figures come in steps of 2⁻¹² ms (0.24 µs).
 *
 * The floor under both, measured in the same run: {@link ./ring_hop_native.c}, the same hop
 * between two C threads through a shared slot and the Linux futex (what `Atomics.wait` and
 * `Atomics.notify` stand on), paced the same way. Its median against `postMessage`'s says how
 * far below `postMessage` any shared-memory hop can go on this machine.
 *
 * Standalone: `deno run --allow-read --allow-write --allow-run --allow-env
 * scripts/bench/ring_hop.ts [--json] [--frames N] [--paced N] [--interval MS]` (run, write and
 * env to build the C floor with `cc`, or `$CC`, and run it).
 *
 * @module
 */

import { epochMs, FrameRing } from "../../lib/frame_ring.ts";
import { type BenchResult, report, result } from "./report.ts";
import { compileC } from "./opus_codec.ts";
import { sleep as pause } from "../../tests/wait.ts";
import type { HopMessage, HopRequest } from "./ring_hop_worker.ts";

/** Knobs of {@link benchRingHop}. */
export interface RingHopOptions {
  /** Frames measured flat out (default 20 000). */
  readonly frames?: number;
  /** Frames measured paced (default 5 000). */
  readonly pacedFrames?: number;
  /** Gap between paced frames in ms (default 1). */
  readonly intervalMs?: number;
  /** Bytes per frame (default 320, a 20 ms Opus frame at 128 kb/s). */
  readonly frameBytes?: number;
  /** Ring slots (default 64). */
  readonly slots?: number;
  /** Leading frames of each run not counted (default 500). */
  readonly warmup?: number;
}

type Direction = "main→worker" | "worker→main";

interface Run {
  readonly direction: Direction;
  readonly frames: number;
  readonly intervalMs: number;
  readonly frameBytes: number;
  readonly slots: number;
}

interface Stats {
  readonly medianUs: number;
  readonly p99Us: number;
  /** Percentage of the counted frames that arrived. */
  readonly delivered: number;
}

const sleeper = new Int32Array(new SharedArrayBuffer(4));

function sleep(ms: number): void {
  if (ms > 0) Atomics.wait(sleeper, 0, 0, ms);
}

function startWorker(): Worker {
  return new Worker(new URL("./ring_hop_worker.ts", import.meta.url).href, { type: "module" });
}

/** Next message of `worker` whose `type` is `type`. */
function message<T>(worker: Worker, type: string): Promise<T> {
  return new Promise((resolve, reject) => {
    worker.onmessage = (e: MessageEvent<{ type?: string }>) => {
      if (e.data.type === type) resolve(e.data as T);
    };
    worker.onerror = (e: ErrorEvent) => {
      e.preventDefault();
      reject(new Error(`Hop worker failed: ${e.message}`));
    };
  });
}

function payloadOf(bytes: number): Uint8Array {
  return new Uint8Array(bytes).map((_, i) => i * 31);
}

async function ringMainToWorker(run: Run): Promise<Float64Array> {
  const ring = FrameRing.create({
    slots: run.slots,
    slotBytes: run.frameBytes + (run.frameBytes & 1),
  });
  const worker = startWorker();
  try {
    const ready = message(worker, "ready");
    worker.postMessage(
      { role: "ring-consumer", buffer: ring.buffer, frames: run.frames } satisfies HopRequest,
    );
    await ready;
    await pause(20); // let the consumer block in Atomics.wait
    const done = message<{ latency: Float64Array }>(worker, "latency");
    const payload = payloadOf(run.frameBytes);
    for (let seq = 0; seq < run.frames; seq++) {
      const slot = ring.reserve();
      slot.data.set(payload);
      slot.seq = seq;
      slot.t[0] = epochMs();
      ring.publish(slot, payload.length);
      sleep(run.intervalMs);
    }
    ring.end();
    return (await done).latency;
  } finally {
    worker.terminate();
  }
}

async function postMainToWorker(run: Run): Promise<Float64Array> {
  const worker = startWorker();
  try {
    const ready = message(worker, "ready");
    worker.postMessage({ role: "post-consumer", frames: run.frames } satisfies HopRequest);
    await ready;
    await pause(20);
    const done = message<{ latency: Float64Array }>(worker, "latency");
    const payload = payloadOf(run.frameBytes);
    for (let seq = 0; seq < run.frames; seq++) {
      payload[0] = seq;
      worker.postMessage({ seq, t0: epochMs(), bytes: payload } satisfies HopMessage);
      sleep(run.intervalMs);
    }
    worker.postMessage({ type: "end" });
    return (await done).latency;
  } finally {
    worker.terminate();
  }
}

async function ringWorkerToMain(run: Run): Promise<Float64Array> {
  const ring = FrameRing.create({
    slots: run.slots,
    slotBytes: run.frameBytes + (run.frameBytes & 1),
  });
  const worker = startWorker();
  const latency = new Float64Array(run.frames).fill(NaN);
  try {
    const ready = message(worker, "ready");
    worker.postMessage(
      {
        role: "ring-producer",
        buffer: ring.buffer,
        frames: run.frames,
        frameBytes: run.frameBytes,
        intervalMs: run.intervalMs,
      } satisfies HopRequest,
    );
    await ready;
    // nextAsync holds no timer: this one keeps the event loop alive, and ends a stuck run.
    const watchdog = setTimeout(() => ring.end(), 120_000);
    worker.postMessage("go");
    for (;;) {
      const slot = ring.claim();
      if (slot !== null) {
        const now = epochMs();
        const seq = slot.seq;
        if (seq >= 0 && seq < run.frames) latency[seq] = now - slot.t[0]!;
        continue;
      }
      if (ring.ended) break;
      await ring.nextAsync(); // as the service's frame pump waits
    }
    clearTimeout(watchdog);
    return latency;
  } finally {
    worker.terminate();
  }
}

async function postWorkerToMain(run: Run): Promise<Float64Array> {
  const worker = startWorker();
  const latency = new Float64Array(run.frames).fill(NaN);
  try {
    const ready = message(worker, "ready");
    worker.postMessage(
      {
        role: "post-producer",
        frames: run.frames,
        frameBytes: run.frameBytes,
        intervalMs: run.intervalMs,
      } satisfies HopRequest,
    );
    await ready;
    await new Promise<void>((resolve) => {
      worker.onmessage = (e: MessageEvent<HopMessage | { type: "end" }>) => {
        const now = epochMs();
        const m = e.data;
        if (!("seq" in m)) resolve();
        else if (m.seq >= 0 && m.seq < run.frames) latency[m.seq] = now - m.t0;
      };
      worker.postMessage("go");
    });
    return latency;
  } finally {
    worker.terminate();
  }
}

/** The C floor ({@link ./ring_hop_native.c}): median and p99 of a futex hop, µs. */
async function nativeHop(
  binary: string,
  frames: number,
  intervalMs: number,
  frameBytes: number,
  warmup: number,
): Promise<{ medianUs: number; p99Us: number }> {
  const out = await new Deno.Command(binary, {
    args: [String(frames), String(intervalMs), String(frameBytes), String(warmup)],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout).trim();
  const [median, p99] = text.split(" ").map(Number);
  if (!out.success || !Number.isFinite(median) || !Number.isFinite(p99)) {
    throw new Error(
      `The native hop failed (code ${out.code}): ${
        new TextDecoder().decode(out.stderr).trim() || text
      }`,
    );
  }
  return { medianUs: median!, p99Us: p99! };
}

function stats(latencyMs: Float64Array, warmup: number): Stats {
  const counted = latencyMs.subarray(Math.min(warmup, latencyMs.length));
  const got = counted.filter((v) => !Number.isNaN(v)).map((v) => v * 1000).sort();
  const at = (q: number) =>
    got.length === 0 ? NaN : got[Math.min(got.length - 1, Math.floor(q * got.length))]!;
  return {
    medianUs: at(0.5),
    p99Us: at(0.99),
    delivered: counted.length === 0 ? NaN : (100 * got.length) / counted.length,
  };
}

/**
 * Measures the hop both ways, paced and flat out, ring against `postMessage`. Latency results
 * have the ring as `value` and `postMessage` as `baseline` (lower is better: the goal is a ratio
 * of 0.2 or less, i.e. at least 5× faster, and a paced ring median of 20 µs or less).
 */
export async function benchRingHop(options: RingHopOptions = {}): Promise<BenchResult[]> {
  const warmup = options.warmup ?? 500;
  const frameBytes = options.frameBytes ?? 320;
  const slots = options.slots ?? 64;
  const intervalMs = options.intervalMs ?? 1;
  const modes = [
    { label: `paced ${intervalMs} ms`, frames: options.pacedFrames ?? 5000, intervalMs },
    { label: "flat out", frames: options.frames ?? 20_000, intervalMs: 0 },
  ];
  const out: BenchResult[] = [];
  const dir = await Deno.makeTempDir({ prefix: "kvm-audio-bench-hop-" });
  try {
    const binary = await compileC(
      Deno.env.get("CC") ?? "cc",
      "ring_hop_native.c",
      `${dir}/ring_hop_native`,
      ["-lpthread"],
    );
    const paced = modes[0]!;
    const native = await nativeHop(binary, paced.frames + warmup, intervalMs, frameBytes, warmup);
    out.push(...await hops(modes, warmup, frameBytes, slots, native));
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
  return out;
}

async function hops(
  modes: readonly { label: string; frames: number; intervalMs: number }[],
  warmup: number,
  frameBytes: number,
  slots: number,
  native: { medianUs: number; p99Us: number },
): Promise<BenchResult[]> {
  const out: BenchResult[] = [];
  for (const direction of ["main→worker", "worker→main"] as const) {
    for (const mode of modes) {
      const run: Run = {
        direction,
        frames: mode.frames + warmup,
        intervalMs: mode.intervalMs,
        frameBytes,
        slots,
      };
      const ring = stats(
        direction === "main→worker" ? await ringMainToWorker(run) : await ringWorkerToMain(run),
        warmup,
      );
      const post = stats(
        direction === "main→worker" ? await postMainToWorker(run) : await postWorkerToMain(run),
        warmup,
      );
      const name = `ring hop ${direction} ${frameBytes} B ${mode.label}`;
      out.push(
        result(
          `${name} median`,
          ring.medianUs,
          "µs",
          post.medianUs,
          mode.intervalMs > 0 ? "value <= 20, ratio <= 0.2" : "ratio <= 0.2",
        ),
        result(`${name} p99`, ring.p99Us, "µs", post.p99Us, "ratio <= 0.2"),
      );
      if (mode.intervalMs === 0 || ring.delivered < 100) {
        out.push(result(`${name} delivered (${slots} slots)`, ring.delivered, "%", post.delivered));
      }
      if (mode.intervalMs > 0) {
        out.push(
          result(`${name} median vs native C futex hop`, ring.medianUs, "µs", native.medianUs),
          result(
            `native C futex hop ${frameBytes} B ${mode.label} median vs postMessage ${direction}`,
            native.medianUs,
            "µs",
            post.medianUs,
          ),
        );
      }
    }
  }
  return out;
}

function flag(name: string): number | undefined {
  const i = Deno.args.indexOf(name);
  if (i < 0) return undefined;
  const v = Number(Deno.args[i + 1]);
  if (!Number.isFinite(v) || v < 0) {
    throw new RangeError(
      `Cannot use ${name} "${Deno.args[i + 1]}": expected a number of 0 or more`,
    );
  }
  return v;
}

if (import.meta.main) {
  const options: { -readonly [K in keyof RingHopOptions]: RingHopOptions[K] } = {};
  const frames = flag("--frames"), paced = flag("--paced"), interval = flag("--interval");
  if (frames !== undefined) options.frames = frames;
  if (paced !== undefined) options.pacedFrames = paced;
  if (interval !== undefined) options.intervalMs = interval;
  report(await benchRingHop(options), Deno.args.includes("--json"));
}
