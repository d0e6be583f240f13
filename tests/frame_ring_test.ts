import assert from "node:assert/strict";
import { epochMs, FrameFlag, FrameRing, type ReadSlot } from "../lib/frame_ring.ts";
import { openLibrary } from "../ffi/library.ts";
import { tone } from "./audio_util.ts";
import {
  checkFrame,
  type ConsumeReport,
  fillFrame,
  frameLength,
  FrameVerifier,
  letConsumerCatchUp,
} from "./fixtures/frame_ring_frames.ts";
import type { ProducerRequest } from "./fixtures/frame_ring_producer.ts";

/** Publishes frame `seq` (see fixtures/frame_ring_frames.ts). */
function push(ring: FrameRing, seq: number): void {
  const slot = ring.reserve();
  ring.publish(slot, fillFrame(slot, seq));
}

/** Claims a frame, failing the test when there is none or it is damaged. */
function take(ring: FrameRing): ReadSlot {
  const slot = ring.claim();
  assert.ok(slot !== null, "expected a frame");
  assert.equal(checkFrame(slot, ring.slotBytes), "");
  return slot;
}

/** Small deterministic PRNG (mulberry32) for the model test. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Queues a worker's messages; rejects on a worker error. */
function inbox(worker: Worker): () => Promise<Record<string, unknown>> {
  const queue: Record<string, unknown>[] = [];
  const waiters: { resolve: (m: Record<string, unknown>) => void; reject: (e: unknown) => void }[] =
    [];
  let failure: unknown = null;
  worker.onmessage = (e: MessageEvent<Record<string, unknown>>) => {
    const w = waiters.shift();
    if (w) w.resolve(e.data);
    else queue.push(e.data);
  };
  worker.onerror = (e: ErrorEvent) => {
    e.preventDefault();
    failure = new Error(`Worker failed: ${e.message}`);
    for (const w of waiters.splice(0)) w.reject(failure);
  };
  return () => {
    const m = queue.shift();
    if (m !== undefined) return Promise.resolve(m);
    if (failure !== null) return Promise.reject(failure);
    return new Promise((resolve, reject) => waiters.push({ resolve, reject }));
  };
}

function startWorker(name: string): Worker {
  return new Worker(new URL(`./fixtures/${name}`, import.meta.url).href, { type: "module" });
}

Deno.test("FrameRing.create rejects invalid options before allocating", () => {
  const ok = { slots: 8, slotBytes: 320 };
  assert.throws(() => FrameRing.create({ ...ok, slots: 6 }), {
    name: "RangeError",
    message: 'Cannot create a frame ring with slots "6": expected a power of two from 1 to 65536',
  });
  assert.throws(() => FrameRing.create({ ...ok, slots: 0 }), RangeError);
  assert.throws(() => FrameRing.create({ ...ok, slots: 131072 }), RangeError);
  assert.throws(() => FrameRing.create({ ...ok, slots: 2.5 }), RangeError);
  assert.throws(() => FrameRing.create({ ...ok, slots: "8" as unknown as number }), TypeError);
  assert.throws(() => FrameRing.create({ ...ok, slotBytes: 1275 }), {
    name: "RangeError",
    message:
      'Cannot create a frame ring with slotBytes "1275": expected an even integer from 2 to 1048576',
  });
  assert.throws(() => FrameRing.create({ ...ok, slotBytes: 0 }), RangeError);
  assert.throws(() => FrameRing.create({ ...ok, controlWords: -1 }), RangeError);
  assert.throws(() => FrameRing.create({ ...ok, startSeq: 2 ** 32 }), RangeError);
  assert.throws(() => FrameRing.create({ slots: 65536, slotBytes: 1 << 20 }), {
    name: "RangeError",
    message: /needs "\d+" bytes, expected at most 1073741824$/,
  });
  assert.throws(() => FrameRing.create(null as unknown as typeof ok), TypeError);
});

Deno.test("FrameRing delivers frames in order with their metadata", () => {
  const ring = FrameRing.create({ slots: 8, slotBytes: 320 });
  assert.equal(ring.claim(), null);
  assert.equal(ring.available, 0);

  const slot = ring.reserve();
  assert.equal(slot.data.length, 320);
  slot.data.set([1, 2, 3, 4, 5]);
  slot.seq = 65535;
  slot.flags = FrameFlag.fec | FrameFlag.discontinuity;
  slot.samples = 960;
  const now = epochMs();
  slot.t.set([now, now + 0.125, now + 0.25, now + 1.5]);
  ring.publish(slot, 5);
  for (let i = 1; i <= 5; i++) push(ring, i);
  assert.equal(ring.available, 6);
  assert.equal(ring.published, 6);

  const first = ring.claim();
  assert.ok(first !== null);
  assert.deepEqual([...first.data], [1, 2, 3, 4, 5]);
  assert.equal(first.length, 5);
  assert.equal(first.seq, 65535);
  assert.equal(first.flags, FrameFlag.fec | FrameFlag.discontinuity);
  assert.equal(first.samples, 960);
  assert.deepEqual([...first.t], [now, now + 0.125, now + 0.25, now + 1.5]);
  for (let i = 1; i <= 5; i++) {
    const s = take(ring);
    assert.equal(s.seq, i);
    assert.equal(s.length, frameLength(i, 320));
  }
  assert.equal(ring.claim(), null);
  assert.equal(ring.available, 0);
  assert.equal(ring.dropped, 0);
  // Epoch milliseconds, not milliseconds since the process started.
  assert.ok(Math.abs(epochMs() - Date.now()) < 1000);
});

Deno.test("FrameRing.reserve clears the metadata a slot had from an earlier frame", () => {
  const ring = FrameRing.create({ slots: 1, slotBytes: 16 });
  for (let i = 0; i < 4; i++) {
    const slot = ring.reserve();
    assert.deepEqual([slot.seq, slot.flags, slot.samples, ...slot.t], [0, 0, 0, 0, 0, 0, 0]);
    slot.seq = 7;
    slot.flags = 1;
    slot.samples = 2;
    slot.t.fill(3);
    ring.publish(slot, 4);
  }
});

Deno.test("FrameRing drops the oldest frames when full and counts them", () => {
  const ring = FrameRing.create({ slots: 4, slotBytes: 64 });
  for (let i = 0; i < 7; i++) push(ring, i);
  assert.equal(ring.available, 4);
  assert.equal(ring.dropped, 3);
  assert.equal(ring.published, 7);
  assert.deepEqual([3, 4, 5, 6].map(() => take(ring).seq), [3, 4, 5, 6]);
  assert.equal(ring.claim(), null);
});

Deno.test("FrameRing never overwrites the claimed frame while the producer drops past it", () => {
  // The case a plain "slot = seq mod slots" ring gets wrong: hold frame 0, publish 1..3,
  // then keep publishing so the producer drops frames right behind the held one.
  const ring = FrameRing.create({ slots: 4, slotBytes: 64 });
  push(ring, 0);
  const held = take(ring);
  const before = { index: held.index, bytes: [...held.data], t: [...held.t] };
  for (let i = 1; i <= 40; i++) {
    push(ring, i);
    assert.equal(checkFrame(held, ring.slotBytes), "", `after publishing frame ${i}`);
  }
  assert.equal(held.seq, 0);
  assert.deepEqual([...held.data], before.bytes);
  assert.deepEqual([...held.t], before.t);
  assert.equal(ring.dropped, 40 - 4);
  assert.deepEqual([0, 1, 2, 3].map(() => take(ring).seq), [37, 38, 39, 40]);
});

for (const startSeq of [0, 2 ** 31 - 9, 2 ** 32 - 9]) {
  Deno.test(`FrameRing matches a model queue across counter wraparound (startSeq ${startSeq})`, () => {
    const slots = 8;
    const ring = FrameRing.create({ slots, slotBytes: 96, startSeq });
    const model: number[] = [];
    let next = 0, dropped = 0, held: ReadSlot | null = null, heldSeq = -1;
    const rand = prng(startSeq + 1);
    for (let step = 0; step < 20_000; step++) {
      if (held !== null) assert.equal(checkFrame(held, 96), "", `held frame ${heldSeq} changed`);
      if (rand() < 0.55) {
        push(ring, next);
        model.push(next++);
        if (model.length > slots) {
          model.shift();
          dropped++;
        }
      } else {
        held = ring.claim();
        const want = model.shift();
        if (want === undefined) assert.equal(held, null);
        else {
          assert.ok(held !== null);
          assert.equal(held.seq, want);
          heldSeq = want;
        }
      }
      assert.equal(ring.available, model.length);
      assert.equal(ring.dropped, dropped);
      assert.equal(ring.published, next);
    }
    assert.ok(next > 9, "the counters crossed the wrap point");
    assert.ok(dropped > 0, "the drop path ran");
  });
}

Deno.test("FrameRing.attach opens the same ring from the buffer alone", () => {
  const ring = FrameRing.create({ slots: 16, slotBytes: 1920, controlWords: 3 });
  const other = FrameRing.attach(ring.buffer);
  assert.equal(other.slots, 16);
  assert.equal(other.slotBytes, 1920);
  assert.equal(other.control.length, 3);
  Atomics.store(ring.control, 2, 42);
  assert.equal(Atomics.load(other.control, 2), 42);
  push(ring, 5);
  assert.equal(take(other).seq, 5);
  assert.equal(ring.available, 0);
  ring.end();
  assert.equal(other.ended, true);
});

Deno.test("FrameRing.attach rejects buffers it did not make", () => {
  assert.throws(() => FrameRing.attach(new ArrayBuffer(4096) as unknown as SharedArrayBuffer), {
    name: "TypeError",
    message: 'Cannot attach a frame ring to "[object ArrayBuffer]": expected a SharedArrayBuffer',
  });
  assert.throws(() => FrameRing.attach(new SharedArrayBuffer(4096)), TypeError);
  assert.throws(() => FrameRing.attach(new SharedArrayBuffer(8)), TypeError);
  const ring = FrameRing.create({ slots: 2, slotBytes: 8 });
  const copy = new SharedArrayBuffer(ring.buffer.byteLength + 8);
  new Uint8Array(copy).set(new Uint8Array(ring.buffer));
  assert.throws(() => FrameRing.attach(copy), /header describes/);
});

Deno.test("FrameRing.publish accepts only the reserved slot and a length that fits", () => {
  const ring = FrameRing.create({ slots: 2, slotBytes: 8 });
  const slot = ring.reserve();
  assert.equal(ring.reserve(), slot, "reserving again before publishing returns the same slot");
  assert.throws(() => ring.publish(slot, 9), {
    name: "RangeError",
    message: 'Cannot publish a frame of length "9": expected an integer from 0 to 8',
  });
  assert.throws(() => ring.publish(slot, -1), RangeError);
  ring.publish(slot, 8);
  assert.throws(() => ring.publish(slot, 8), TypeError, "publishing twice");
  const other = FrameRing.create({ slots: 2, slotBytes: 8 });
  assert.throws(() => ring.publish(other.reserve(), 1), TypeError);
});

Deno.test("FrameRing slots carry int16 PCM on 8-byte aligned views", () => {
  const ring = FrameRing.create({ slots: 4, slotBytes: 1920 });
  const pcm = tone({ freq: 1000, frames: 960 });
  for (let i = 0; i < 6; i++) {
    const slot = ring.reserve();
    assert.equal(slot.pcm.length, 960);
    assert.equal(slot.pcm.byteOffset % 8, 0);
    assert.equal(slot.data.byteOffset, slot.pcm.byteOffset);
    slot.pcm.set(pcm.subarray(0, 480 + i));
    slot.samples = 480 + i;
    ring.publish(slot, (480 + i) * 2);
  }
  for (let i = 2; i < 6; i++) {
    const slot = ring.claim();
    assert.ok(slot !== null);
    assert.equal(slot.pcm.byteOffset % 8, 0);
    assert.equal(slot.t.byteOffset % 8, 0);
    assert.equal(slot.pcm.length, 480 + i);
    assert.equal(slot.samples, 480 + i);
    assert.deepEqual(slot.pcm, pcm.subarray(0, 480 + i));
  }
});

Deno.test("FrameRing slot views are FFI buffer arguments pointing into the shared memory", () => {
  const symbols = {
    // void *memset(void *s, int c, size_t n);
    memset: { parameters: ["buffer", "i32", "usize"], result: "pointer" },
  } as const satisfies Deno.ForeignLibraryInterface;
  const lib = openLibrary(
    { name: "libc", envVar: "KVM_AUDIO_LIBC", candidates: ["libc.so.6"] },
    symbols,
  );
  try {
    const ring = FrameRing.create({ slots: 4, slotBytes: 320 });
    const base = Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(ring.buffer)));
    const slot = ring.reserve();
    const at = Deno.UnsafePointer.value(Deno.UnsafePointer.of(slot.data));
    assert.equal(at, base + BigInt(slot.data.byteOffset));
    lib.symbols.memset(slot.data, 0xab, BigInt(slot.data.length));
    lib.symbols.memset(slot.pcm.subarray(10), 0x01, 4n);
    ring.publish(slot, 100);
    const read = ring.claim();
    assert.ok(read !== null);
    assert.equal(
      Deno.UnsafePointer.value(Deno.UnsafePointer.of(read.data)),
      base + BigInt(read.data.byteOffset),
    );
    const expected = new Uint8Array(100).fill(0xab).fill(0x01, 20, 24);
    assert.deepEqual(read.data, expected);
  } finally {
    lib.close();
  }
});

Deno.test("FrameRing.waitForData returns ok, ended or timed-out", () => {
  const ring = FrameRing.create({ slots: 2, slotBytes: 8 });
  assert.equal(ring.waitForData(0), "timed-out");
  assert.equal(ring.waitForData(5), "timed-out");
  assert.throws(() => ring.waitForData(-1), RangeError);
  assert.throws(() => ring.waitForData(NaN), RangeError);
  push(ring, 1);
  assert.equal(ring.waitForData(1000), "ok");
  ring.end();
  assert.equal(ring.waitForData(1000), "ok", "frames left after end are still delivered");
  take(ring);
  assert.equal(ring.waitForData(1000), "ended");
});

Deno.test("FrameRing.waitForDataAsync times out with nothing else keeping the event loop alive", async () => {
  // Deno does not count a pending Atomics.waitAsync as event-loop work; without the timer the
  // method holds, this test ends with "Promise resolution is still pending".
  const ring = FrameRing.create({ slots: 4, slotBytes: 64 });
  assert.equal(await ring.waitForDataAsync(5), "timed-out");
  assert.equal(await ring.waitForDataAsync(0), "timed-out");
  await assert.rejects(() => ring.waitForDataAsync(-5), RangeError);
  push(ring, 3);
  assert.equal(await ring.waitForDataAsync(0), "ok");
});

/** Runs `body` as on a runtime without `Atomics.waitAsync`. */
async function withoutWaitAsync(body: () => Promise<void>): Promise<void> {
  const atomics = Atomics as { waitAsync?: unknown };
  const original = atomics.waitAsync;
  atomics.waitAsync = undefined;
  try {
    await body();
  } finally {
    atomics.waitAsync = original;
  }
}

Deno.test("FrameRing.waitForDataAsync falls back to polling without Atomics.waitAsync", () =>
  withoutWaitAsync(async () => {
    const ring = FrameRing.create({ slots: 2, slotBytes: 8 });
    assert.equal(await ring.waitForDataAsync(3), "timed-out");
    const timer = setTimeout(() => push(ring, 1), 5);
    try {
      assert.equal(await ring.waitForDataAsync(30_000), "ok");
    } finally {
      clearTimeout(timer);
    }
    take(ring);
    ring.end();
    assert.equal(await ring.waitForDataAsync(30_000), "ended");
  }));

Deno.test("FrameRing.nextAsync resolves on data, end or wake, and waits otherwise", async () => {
  const ring = FrameRing.create({ slots: 4, slotBytes: 64 });
  // It holds no timer: this one keeps the event loop alive while it waits.
  const keepAlive = setInterval(() => {}, 60_000);
  try {
    let resolved = false;
    const settle = (p: Promise<void>) => p.then(() => resolved = true);
    // A wait that never ends fails the test instead of hanging it.
    const within = async (p: Promise<unknown>, what: string) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`nextAsync did not return on ${what}`)), 2000);
      });
      try {
        await Promise.race([p, late]);
      } finally {
        clearTimeout(timer);
      }
    };
    // Nothing there: it waits until a frame is published.
    const first = settle(ring.nextAsync());
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(resolved, false, "no frame, no end, no wake: still waiting");
    push(ring, 1);
    await within(first, "a publish");
    // A frame not yet claimed: at once.
    await ring.nextAsync();
    take(ring);
    // wake() ends a wait without a frame.
    resolved = false;
    const woken = settle(ring.nextAsync());
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(resolved, false);
    ring.wake();
    await within(woken, "wake()");
    assert.equal(ring.available, 0);
    // Ended: at once, every time.
    ring.end();
    await ring.nextAsync();
    await ring.nextAsync();
  } finally {
    clearInterval(keepAlive);
  }
});

Deno.test("FrameRing.nextAsync checks again after a millisecond without Atomics.waitAsync", () =>
  withoutWaitAsync(async () => {
    const ring = FrameRing.create({ slots: 2, slotBytes: 8 });
    const t0 = performance.now();
    await ring.nextAsync();
    assert.ok(performance.now() - t0 >= 0.5, "it slept before returning empty-handed");
    assert.equal(ring.available, 0);
  }));

Deno.test("FrameRing.waitForDataAsync wakes when a worker publishes", async () => {
  const ring = FrameRing.create({ slots: 4, slotBytes: 64 });
  const worker = startWorker("frame_ring_producer.ts");
  try {
    const next = inbox(worker);
    const waiting = ring.waitForDataAsync(30_000);
    const request: ProducerRequest = {
      buffer: ring.buffer,
      frames: 1,
      pauseAfter: -1,
      catchUpEvery: 0,
    };
    worker.postMessage(request);
    assert.equal(await waiting, "ok");
    assert.equal(take(ring).seq, 0);
    assert.deepEqual(await next(), { type: "done", produced: 1 });
    assert.equal(await ring.waitForDataAsync(30_000), "ended");
  } finally {
    worker.terminate();
  }
});

const STRESS_FRAMES = 200_000;

Deno.test("FrameRing: worker producer, main-thread consumer, 200 000 frames intact", async () => {
  const ring = FrameRing.create({ slots: 16, slotBytes: 320 });
  const worker = startWorker("frame_ring_producer.ts");
  try {
    const next = inbox(worker);
    const request: ProducerRequest = {
      buffer: ring.buffer,
      frames: STRESS_FRAMES,
      pauseAfter: 3 * 16,
      catchUpEvery: 256,
    };
    worker.postMessage(request);
    // The producer publishes 48 frames into 16 slots, then pauses: 32 drops for sure.
    assert.deepEqual(await next(), { type: "paused" });
    assert.equal(ring.dropped, 32);
    Atomics.store(ring.control, 0, 1);
    Atomics.notify(ring.control, 0);

    const verifier = new FrameVerifier(ring, 1000);
    for (;;) {
      const slot = ring.claim();
      if (slot !== null) {
        verifier.verify(slot);
        continue;
      }
      const r = await ring.waitForDataAsync(10_000);
      if (r === "ended") break;
      assert.notEqual(r, "timed-out", "the producer went quiet");
    }
    assert.deepEqual(await next(), { type: "done", produced: STRESS_FRAMES });
    const report = verifier.report();
    assert.deepEqual(report.errors, []);
    assert.equal(ring.published, STRESS_FRAMES);
    assert.equal(report.consumed + ring.dropped, STRESS_FRAMES);
    assert.equal(report.lastSeq, STRESS_FRAMES - 1, "the last frame is never dropped");
    assert.ok(report.holds > 0);
    console.log(
      `consumed ${report.consumed}, dropped ${ring.dropped}, held slowly ${report.holds} times`,
    );
  } finally {
    worker.terminate();
  }
});

Deno.test("FrameRing: main-thread producer, worker consumer, 200 000 frames intact", async () => {
  const ring = FrameRing.create({ slots: 16, slotBytes: 320 });
  for (let i = 0; i < 3 * 16; i++) push(ring, i);
  assert.equal(ring.dropped, 32);
  const worker = startWorker("frame_ring_consumer.ts");
  try {
    const next = inbox(worker);
    worker.postMessage({ buffer: ring.buffer, holdEvery: 1000 });
    assert.deepEqual(await next(), { type: "ready" });
    for (let i = 3 * 16; i < STRESS_FRAMES; i++) {
      if (i % 256 === 0) letConsumerCatchUp(ring);
      push(ring, i);
    }
    ring.end();
    const { type, ...report } = await next() as unknown as { type: string } & ConsumeReport;
    assert.equal(type, "report");
    assert.deepEqual(report.errors, []);
    assert.equal(report.consumed + ring.dropped, STRESS_FRAMES);
    assert.equal(report.lastSeq, STRESS_FRAMES - 1);
    assert.ok(report.holds > 0);
    console.log(
      `consumed ${report.consumed}, dropped ${ring.dropped}, held slowly ${report.holds} times`,
    );
  } finally {
    worker.terminate();
  }
});

/** One wait as frame_ring_waiter.ts reported it. */
interface WakeUp {
  readonly action: "publish" | "end";
  readonly result: string;
  readonly ms: number;
  readonly wakeUps: number;
}

/** Timeout of each wait in {@link wakeUps}: far longer than any wake-up takes. */
const WAIT_TIMEOUT_MS = 20_000;

/**
 * `worker` (frame_ring_waiter.ts) blocks in `waitForData` on the empty `ring` with a 20 s
 * timeout; 50 ms later this thread publishes a frame, then, in a second wait, ends the ring. Each
 * wait reports whether the producer's signal ended its sleep (`wakeUps`) and how long it took: a
 * lost wake-up shows as a 20 s wait ended by the timeout.
 */
async function wakeUps(worker: Worker, ring: FrameRing): Promise<WakeUp[]> {
  const next = inbox(worker);
  const expect = async (type: string) => {
    const m = await next();
    assert.equal(m.type, type, JSON.stringify(m));
    return m;
  };
  const out: WakeUp[] = [];
  for (const action of ["publish", "end"] as const) {
    worker.postMessage({ buffer: ring.buffer, timeoutMs: WAIT_TIMEOUT_MS });
    await expect("sleeping");
    await new Promise((r) => setTimeout(r, 50)); // let it fall asleep
    if (action === "publish") ring.publish(ring.reserve(), 8);
    else ring.end();
    const { result, ms, wakeUps } = await expect("woke");
    out.push({ action, result: String(result), ms: Number(ms), wakeUps: Number(wakeUps) });
  }
  return out;
}

Deno.test("FrameRing: a worker sleeping in waitForData wakes on a publish and on end()", async () => {
  const ring = FrameRing.create({ slots: 4, slotBytes: 64 });
  const worker = startWorker("frame_ring_waiter.ts");
  try {
    const waits = await wakeUps(worker, ring);
    assert.deepEqual(waits.map((w) => [w.action, w.result, w.wakeUps]), [
      ["publish", "ok", 1],
      ["end", "ended", 1],
    ]);
    for (const w of waits) {
      assert.ok(w.ms < WAIT_TIMEOUT_MS / 2, `${w.action}: woke after ${w.ms} ms`);
    }
  } finally {
    worker.terminate();
  }
});
