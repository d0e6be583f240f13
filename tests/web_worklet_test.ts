/**
 * The page's AudioWorklet processors (web/audio-worklet.js), run here without a browser: the
 * worklet globals are stood in for, and `process()` is driven quantum by quantum.
 *
 * @module
 */

import assert from "node:assert/strict";

const RATE = 48000;
const QUANTUM = 128;
const PACKET = 960; // 20 ms

interface Stats {
  type: "stats";
  depthMs: number;
  targetMs: number;
  playing: boolean;
  underruns: number;
  trims: number;
  trimmedMs: number;
  stretches: number;
  stretchedMs: number;
  gaps: number;
}

interface Port {
  onmessage: ((e: { data: unknown }) => void) | null;
  postMessage(msg: unknown, transfer?: unknown[]): void;
}

interface Processor {
  port: Port;
  process(inputs: Float32Array[][], outputs: Float32Array[][]): boolean;
}

type ProcessorClass = new (options?: { processorOptions?: Record<string, number> }) => Processor;

const registered = new Map<string, ProcessorClass>();
const posted: unknown[] = [];

async function loadWorklet(): Promise<void> {
  if (registered.size > 0) return;
  const g = globalThis as Record<string, unknown>;
  g.sampleRate = RATE;
  g.currentTime = 0;
  g.AudioWorkletProcessor = class {
    port: Port = {
      onmessage: null,
      postMessage: (msg: unknown) => posted.push(msg),
    };
  };
  g.registerProcessor = (name: string, cls: ProcessorClass) => registered.set(name, cls);
  await import("../web/audio-worklet.js");
}

/** A playout processor fed 20 ms packets of a counting ramp. */
class Playout {
  readonly proc: Processor;
  next = 0; // value of the next sample pushed
  played: number[] = [];

  constructor(options: Record<string, number> = {}) {
    const cls = registered.get("kvm-playout");
    assert.ok(cls, "kvm-playout is registered");
    this.proc = new cls({ processorOptions: options });
    posted.length = 0;
  }

  push(frames = PACKET): void {
    const left = new Float32Array(frames);
    for (let i = 0; i < frames; i++) left[i] = ((this.next + i) % 1000) / 1000;
    this.next += frames;
    this.proc.port.onmessage!({ data: { type: "audio", planes: [left] } });
  }

  quantum(): Float32Array[] {
    const out = [[new Float32Array(QUANTUM), new Float32Array(QUANTUM)]];
    assert.equal(this.proc.process([], out), true);
    this.played.push(...out[0]![0]!);
    return out[0]!;
  }

  /** Plays `ms` of real time, pushing a packet whenever a sender in step would have one. */
  run(ms: number, { send = true, senderSpeed = 1 } = {}): void {
    const quanta = Math.round((ms * RATE) / 1000 / QUANTUM);
    for (let q = 0; q < quanta; q++) {
      if (send) {
        while (this.next < (this.clock + QUANTUM) * senderSpeed + this.offset) this.push();
      }
      this.quantum();
      this.clock += QUANTUM;
    }
  }

  clock = 0;
  offset = 0;

  get stats(): Stats {
    const s = posted.filter((m) => (m as Stats).type === "stats").at(-1) as Stats | undefined;
    assert.ok(s, "the processor reports");
    return s;
  }
}

Deno.test("playout worklet waits for its target depth, then plays every sample in order", async () => {
  await loadWorklet();
  const p = new Playout({ targetMs: 40 });
  p.push(); // 20 ms: not enough
  for (let i = 0; i < 10; i++) assert.ok(p.quantum()[0]!.every((v) => v === 0), "silent");
  p.push(); // 40 ms
  const out = p.quantum();
  assert.equal(out[0]![0], 0);
  assert.ok(Math.abs(out[0]![1]! - 0.001) < 1e-6);
  assert.deepEqual(out[1], out[0], "mono is played on both channels");
  // Keep feeding in step: the output is the ramp, without a gap or a repeat.
  p.clock = 0;
  p.offset = 2 * PACKET;
  p.run(2000);
  const audible = p.played.slice(10 * QUANTUM);
  for (let i = 1; i < audible.length; i++) {
    const d = (audible[i]! - audible[i - 1]! + 1) % 1;
    assert.ok(Math.abs(d - 0.001) < 1e-5, `sample ${i} follows its predecessor`);
  }
  assert.equal(p.stats.underruns, 0);
  assert.equal(p.stats.trims, 0);
  assert.equal(p.stats.targetMs, 40);
});

Deno.test("playout worklet grows its target after an underrun", async () => {
  await loadWorklet();
  const p = new Playout({ targetMs: 40, stepMs: 20 });
  p.offset = 2 * PACKET;
  p.run(1000);
  assert.equal(p.stats.underruns, 0);
  // The network stalls for 150 ms, then delivers the backlog at once.
  p.run(150, { send: false });
  assert.equal(p.stats.underruns, 1);
  p.run(500);
  assert.equal(p.stats.targetMs, 60, "one step up");
  assert.equal(p.stats.playing, true, "playing again after rebuffering");
  // A bounded buffer: the target never exceeds maxMs however often it runs dry.
  const q = new Playout({ targetMs: 40, stepMs: 20, maxMs: 100 });
  q.offset = 2 * PACKET;
  for (let i = 0; i < 10; i++) {
    q.run(300);
    q.run(200, { send: false });
    q.next += 0.2 * RATE; // the stalled packets never come
  }
  q.run(200);
  assert.ok(q.stats.underruns >= 5);
  assert.equal(q.stats.targetMs, 100);
});

Deno.test("playout worklet trims a buffer that stays too deep", async () => {
  await loadWorklet();
  const p = new Playout({ targetMs: 40 });
  p.offset = 2 * PACKET;
  p.run(500);
  // A burst of 200 ms extra arrives (a stall upstream that the sender caught up on).
  p.offset += 10 * PACKET;
  p.run(300);
  assert.ok(p.stats.depthMs > 200, `deep: ${p.stats.depthMs} ms`);
  p.run(2500);
  assert.ok(p.stats.trims >= 1, "trimmed");
  assert.ok(p.stats.depthMs < 40 + 25, `back near the target: ${p.stats.depthMs} ms`);
  assert.equal(p.stats.underruns, 0);
  assert.ok(Math.abs(p.stats.trimmedMs - 200) < 25, `trimmed ${p.stats.trimmedMs} ms`);
});

Deno.test("playout worklet follows a sender whose clock runs 1 % fast", async () => {
  await loadWorklet();
  const p = new Playout({ targetMs: 40 });
  p.offset = 2 * PACKET;
  p.run(30_000, { senderSpeed: 1.01 });
  // 300 ms more arrived than was played: the trims removed it, the depth stayed bounded.
  assert.ok(p.stats.depthMs < 40 + 40, `depth ${p.stats.depthMs} ms`);
  assert.ok(p.stats.trimmedMs > 200, `trimmed ${p.stats.trimmedMs} ms`);
  assert.equal(p.stats.underruns, 0);
});

Deno.test("playout worklet follows a sender whose clock runs 0.3 % slow by stretching, without running dry", async () => {
  await loadWorklet();
  // Ten times the worst crystal (±300 ppm): 180 ms fewer arrive in 60 s than are played.
  const p = new Playout({ targetMs: 40 });
  p.offset = 2 * PACKET;
  p.run(60_000, { senderSpeed: 0.997 });
  // Stretches made it up: no underrun (before, the buffer ran dry and rebuffered).
  assert.equal(p.stats.underruns, 0);
  assert.ok(p.stats.stretches >= 10, `stretches ${p.stats.stretches}`);
  assert.ok(p.stats.stretchedMs > 120, `stretched ${p.stats.stretchedMs} ms`);
  assert.ok(p.stats.depthMs > 5, `depth ${p.stats.depthMs} ms`);
  // In step, nothing is stretched.
  const q = new Playout({ targetMs: 40 });
  q.offset = 2 * PACKET;
  q.run(10_000);
  assert.equal(q.stats.stretches, 0);
  assert.equal(q.stats.trims, 0);
});

Deno.test("playout worklet: a pause of the stream on purpose is no underrun", async () => {
  await loadWorklet();
  // Muted: the page says so ({type: "pause"}); the buffer plays out and waits.
  const p = new Playout({ targetMs: 40, stepMs: 20 });
  p.offset = 2 * PACKET;
  p.run(1000);
  p.proc.port.onmessage!({ data: { type: "pause" } });
  p.run(500, { send: false });
  p.next += 0.5 * RATE; // nothing was sent while muted
  p.run(1000);
  assert.equal(p.stats.underruns, 0);
  assert.equal(p.stats.gaps, 1);
  assert.equal(p.stats.targetMs, 40, "no delay added");
  assert.equal(p.stats.playing, true);
  // A gap the sender meant (DTX, a restart), known only when the next packet says so: the
  // underrun counted meanwhile is taken back.
  const q = new Playout({ targetMs: 40, stepMs: 20 });
  q.offset = 2 * PACKET;
  q.run(1000);
  q.run(300, { send: false });
  assert.equal(q.stats.underruns, 1);
  q.next += 0.3 * RATE;
  q.proc.port.onmessage!({ data: { type: "gap" } });
  q.run(1000);
  assert.equal(q.stats.underruns, 0);
  assert.equal(q.stats.gaps, 1);
  assert.equal(q.stats.targetMs, 40);
  // A real stall (no "gap" after it) still counts and raises the target.
  q.run(300, { send: false });
  q.next += 0.3 * RATE;
  q.run(1000);
  assert.equal(q.stats.underruns, 1);
  assert.equal(q.stats.targetMs, 60);
});

Deno.test("playout worklet lowers its target again after a calm stretch", async () => {
  await loadWorklet();
  const p = new Playout({ targetMs: 40, stepMs: 20, minMs: 20, decayMs: 5 });
  p.offset = 2 * PACKET;
  p.run(500);
  p.run(100, { send: false });
  p.run(500);
  assert.equal(p.stats.targetMs, 60);
  p.run(25_000);
  assert.ok(p.stats.targetMs <= 50, `target ${p.stats.targetMs} ms after 25 s without underrun`);
  p.run(120_000);
  assert.equal(p.stats.targetMs, 20, "never below minMs");
});

Deno.test("capture worklet cuts the microphone into frames of the requested size", async () => {
  await loadWorklet();
  const cls = registered.get("kvm-capture");
  assert.ok(cls);
  const proc = new cls({ processorOptions: { frameSamples: 960 } });
  posted.length = 0;
  let n = 0;
  const feed = (quanta: number) => {
    for (let q = 0; q < quanta; q++) {
      const x = new Float32Array(QUANTUM);
      for (let i = 0; i < QUANTUM; i++) x[i] = Math.sin(n++ / 10) * 0.5;
      assert.equal(proc.process([[x]], []), true);
    }
  };
  feed(15); // 1920 samples
  const frames = posted as { type: string; samples: Float32Array; peak: number; rms: number }[];
  assert.equal(frames.length, 2);
  assert.ok(frames.every((f) => f.type === "frame" && f.samples.length === 960));
  assert.ok(Math.abs(frames[1]!.samples[0]! - Math.sin(960 / 10) * 0.5) < 1e-6, "contiguous");
  assert.ok(frames[0]!.peak > 0.49 && frames[0]!.peak <= 0.5);
  assert.ok(Math.abs(frames[0]!.rms - 0.5 / Math.SQRT2) < 0.01);
  // A new frame size (a preset with 10 ms frames) applies from the next frame on.
  feed(3); // a frame under way
  proc.port.onmessage!({ data: { type: "frameSamples", frameSamples: 480 } });
  feed(12);
  assert.deepEqual(frames.slice(2).map((f) => f.samples.length), [960, 480, 480]);
  // With no frame under way it applies at once.
  proc.port.onmessage!({ data: { type: "frameSamples", frameSamples: 960 } });
  feed(15);
  assert.deepEqual(frames.slice(5).map((f) => f.samples.length), [960, 960]);
  // No input (the source ended): nothing posted, still alive.
  const before = frames.length;
  assert.equal(proc.process([[]], []), true);
  assert.equal(frames.length, before);
});
