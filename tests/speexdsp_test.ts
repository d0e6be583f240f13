import assert from "node:assert/strict";
import {
  MAX_RATE,
  MIN_RATE,
  Resampler,
  RESAMPLER_ERR_OVERFLOW,
  type ResamplerOptions,
  SpeexError,
} from "../ffi/speexdsp.ts";
import { channel, dominantFrequency, rmsDb, tone, window } from "./audio_util.ts";

/** Resamples all of `input` in chunks of `chunk` frames; checks every chunk is consumed whole. */
function resampleStream(r: Resampler, input: Int16Array, chunk: number): Int16Array {
  const ch = r.channels;
  const frames = input.length / ch;
  const out = new Int16Array(r.outputFramesFor(frames) * ch);
  let written = 0;
  for (let pos = 0; pos < frames; pos += chunk) {
    const n = Math.min(chunk, frames - pos);
    const room = r.outputFramesFor(n);
    const res = r.process(
      input.subarray(pos * ch, (pos + n) * ch),
      out.subarray(written * ch, (written + room) * ch),
    );
    assert.equal(res.inFrames, n, `chunk at frame ${pos} was not consumed whole`);
    assert.ok(res.outFrames <= room);
    written += res.outFrames;
  }
  return out.subarray(0, written * ch);
}

function checkTone(
  opts: ResamplerOptions & { channels: number },
  chunk: number,
): void {
  const seconds = 1;
  const input = tone({
    freq: 1000,
    rate: opts.inRate,
    channels: opts.channels,
    frames: opts.inRate * seconds,
  });
  using r = new Resampler(opts);
  const out = resampleStream(r, input, chunk);
  const expected = opts.outRate * seconds;
  const outFrames = out.length / opts.channels;
  assert.ok(
    Math.abs(outFrames - expected) <= r.outputLatency + 2,
    `${outFrames} output frames, expected ${expected} ± ${r.outputLatency + 2}`,
  );
  const inLevel = rmsDb(window(channel(input, opts.channels, 0), 1000, opts.inRate / 5));
  for (let c = 0; c < opts.channels; c++) {
    // Skip the filter's start-up and keep 200 ms from the steady state.
    const x = window(channel(out, opts.channels, c), 2 * r.outputLatency + 1000, opts.outRate / 5);
    const f = dominantFrequency(x, opts.outRate, 200, 4000);
    assert.ok(Math.abs(f - 1000) / 1000 < 0.005, `channel ${c}: ${f} Hz, expected 1000 Hz`);
    const level = rmsDb(x);
    assert.ok(
      Math.abs(level - inLevel) < 0.5,
      `channel ${c}: ${level.toFixed(2)} dBFS, expected ${inLevel.toFixed(2)} dBFS`,
    );
  }
}

Deno.test("Resampler converts a stereo 1 kHz tone from 44.1 kHz to 48 kHz", () => {
  checkTone({ channels: 2, inRate: 44100, outRate: 48000 }, 441);
});

Deno.test("Resampler converts a stereo 1 kHz tone from 32 kHz to 48 kHz", () => {
  checkTone({ channels: 2, inRate: 32000, outRate: 48000 }, 320);
});

Deno.test("Resampler converts a mono tone from 48 kHz down to 16 kHz at quality 3", () => {
  checkTone({ channels: 1, inRate: 48000, outRate: 16000, quality: 3 }, 960);
});

Deno.test("Resampler output does not depend on how the stream is chunked", () => {
  const input = tone({ freq: 1234, rate: 44100, channels: 2, frames: 44100 });
  using whole = new Resampler({ channels: 2, inRate: 44100, outRate: 48000 });
  using chunked = new Resampler({ channels: 2, inRate: 44100, outRate: 48000 });
  const a = resampleStream(whole, input, 44100);
  const b = resampleStream(chunked, input, 441);
  assert.equal(b.length, a.length);
  assert.deepEqual(b, a);
  const total = 44100 * 48000 / 44100;
  assert.ok(Math.abs(a.length / 2 - total) <= whole.outputLatency + 2);
});

Deno.test("Resampler streams 320-frame chunks of 32 kHz into the expected 48 kHz frame count", () => {
  using r = new Resampler({ channels: 1, inRate: 32000, outRate: 48000 });
  const input = tone({ freq: 440, rate: 32000, frames: 32000 * 3 });
  const out = resampleStream(r, input, 320);
  assert.ok(Math.abs(out.length - 48000 * 3) <= r.outputLatency + 2, `${out.length} frames`);
});

Deno.test("Resampler reads from and writes to SharedArrayBuffer views in place", () => {
  const plain = tone({ freq: 1000, rate: 32000, channels: 2, frames: 3200 });
  const shared = new Int16Array(new SharedArrayBuffer(plain.byteLength + 64), 32, plain.length);
  shared.set(plain);
  const sharedOut = new Int16Array(new SharedArrayBuffer(2 * 2 * 6000));
  const plainOut = new Int16Array(2 * 6000);
  using a = new Resampler({ channels: 2, inRate: 32000, outRate: 48000 });
  using b = new Resampler({ channels: 2, inRate: 32000, outRate: 48000 });
  const ra = a.process(shared, sharedOut.subarray(100 * 2));
  const rb = b.process(plain, plainOut);
  assert.deepEqual(ra, rb);
  assert.equal(ra.inFrames, 3200);
  assert.deepEqual(sharedOut.subarray(0, 200), new Int16Array(200), "wrote before the view");
  assert.deepEqual(
    sharedOut.subarray(200, 200 + ra.outFrames * 2),
    plainOut.subarray(0, rb.outFrames * 2),
  );
  assert.ok(rmsDb(channel(plainOut.subarray(0, rb.outFrames * 2), 2)) > -20);
});

Deno.test("Resampler stops when the output is full and reports the input it consumed", () => {
  using r = new Resampler({ channels: 1, inRate: 44100, outRate: 48000 });
  const input = tone({ freq: 1000, rate: 44100, frames: 4410 });
  const res = r.process(input, new Int16Array(100));
  assert.equal(res.outFrames, 100);
  assert.ok(res.inFrames > 80 && res.inFrames < 100, `consumed ${res.inFrames}`);
});

Deno.test("Resampler skipZeros drops the leading filter delay", () => {
  const input = tone({ freq: 1000, rate: 32000, frames: 32000 });
  using plain = new Resampler({ channels: 1, inRate: 32000, outRate: 48000 });
  using skipped = new Resampler({ channels: 1, inRate: 32000, outRate: 48000 });
  skipped.skipZeros();
  const a = resampleStream(plain, input, 320);
  const b = resampleStream(skipped, input, 320);
  const latency = plain.outputLatency;
  assert.ok(latency > 0);
  assert.ok(Math.abs(a.length - b.length - latency) <= 2, `${a.length} vs ${b.length}`);
  // The unskipped output starts with the filter delay's worth of near-silence.
  assert.ok(rmsDb(channel(a.subarray(0, latency / 2), 1)) < -40);
  assert.ok(rmsDb(channel(b.subarray(0, latency / 2), 1)) > -20);
});

Deno.test("Resampler reset starts the stream again", () => {
  const input = tone({ freq: 700, rate: 44100, frames: 4410 });
  using fresh = new Resampler({ channels: 1, inRate: 44100, outRate: 48000 });
  using reused = new Resampler({ channels: 1, inRate: 44100, outRate: 48000 });
  resampleStream(reused, tone({ freq: 3000, rate: 44100, frames: 1000, phase: 0.3 }), 441);
  reused.reset();
  assert.deepEqual(resampleStream(reused, input, 441), resampleStream(fresh, input, 441));
});

Deno.test("Resampler reports its latency in input and output frames", () => {
  using r = new Resampler({ channels: 1, inRate: 24000, outRate: 48000, quality: 10 });
  assert.ok(r.inputLatency > 0);
  assert.ok(Math.abs(r.outputLatency - 2 * r.inputLatency) <= 1);
  using low = new Resampler({ channels: 1, inRate: 24000, outRate: 48000, quality: 0 });
  assert.ok(low.inputLatency < r.inputLatency);
});

Deno.test("Resampler setRate changes the ratio mid-stream", () => {
  using r = new Resampler({ channels: 1, inRate: 48000, outRate: 48000 });
  const input = tone({ freq: 1000, rate: 48000, frames: 48000 });
  resampleStream(r, input.subarray(0, 4800), 480);
  r.setRate(48000, 24000);
  assert.equal(r.inRate, 48000);
  assert.equal(r.outRate, 24000);
  const out = resampleStream(r, input.subarray(4800), 480);
  assert.ok(Math.abs(out.length - 43200 / 2) <= r.outputLatency + 2, `${out.length} frames`);
  const f = dominantFrequency(window(channel(out, 1), 2000, 4800), 24000, 200, 4000);
  assert.ok(Math.abs(f - 1000) < 5, `${f} Hz`);
});

Deno.test("Resampler setRate throws SpeexError on overflow and keeps working at the old rates", () => {
  // libspeexdsp rescales its fractional position to the new ratio with 32-bit arithmetic; with
  // both reduced denominators near 96000 a large position overflows (RESAMPLER_ERR_OVERFLOW).
  using r = new Resampler({ channels: 1, inRate: 96000, outRate: 95999 });
  const input = tone({ freq: 1000, rate: 96000, frames: 96000 });
  const out = new Int16Array(r.outputFramesFor(input.length));
  let error: unknown;
  for (let k = 1; k < 2000 && error === undefined; k++) {
    r.process(input.subarray(0, (13 * k + 5) % 4000), out);
    try {
      r.setRate(96000, 96001);
      r.setRate(96000, 95999);
    } catch (e) {
      error = e;
    }
  }
  assert.ok(error instanceof SpeexError, `expected a SpeexError, got ${String(error)}`);
  assert.equal(error.name, "SpeexError");
  assert.equal(error.code, RESAMPLER_ERR_OVERFLOW);
  assert.equal(error.fn, "speex_resampler_set_rate");
  assert.match(error.message, /^speex_resampler_set_rate failed .*RESAMPLER_ERR_OVERFLOW, code 5/);
  assert.equal(r.inRate, 96000);
  assert.equal(r.outRate, 95999);
  const res = r.process(input, out);
  assert.equal(res.inFrames, 96000);
  // Back at the old rates with a cleared history: exactly what a fresh resampler produces.
  using fresh = new Resampler({ channels: 1, inRate: 96000, outRate: 95999 });
  const freshOut = new Int16Array(out.length);
  assert.deepEqual(fresh.process(input, freshOut), res);
  assert.deepEqual(out, freshOut);
  assert.ok(Math.abs(res.outFrames - 95999) <= r.outputLatency + 2);
  const f = dominantFrequency(window(channel(out, 1), 1000, 9600), 95999, 200, 4000);
  assert.ok(Math.abs(f - 1000) < 5, `${f} Hz`);
});

Deno.test("Resampler rejects bad options before calling libspeexdsp", () => {
  const good = { channels: 2, inRate: 44100, outRate: 48000 };
  const cases: [Record<string, unknown>, typeof Error][] = [
    [{ channels: 0 }, RangeError],
    [{ channels: 9 }, RangeError],
    [{ channels: 1.5 }, RangeError],
    [{ channels: "2" }, TypeError],
    [{ inRate: MIN_RATE - 1 }, RangeError],
    [{ outRate: MAX_RATE + 1 }, RangeError],
    [{ inRate: 44100.5 }, RangeError],
    [{ outRate: NaN }, RangeError],
    [{ inRate: undefined }, TypeError],
    [{ quality: 11 }, RangeError],
    [{ quality: -1 }, RangeError],
  ];
  for (const [patch, type] of cases) {
    assert.throws(
      () => new Resampler({ ...good, ...patch } as ResamplerOptions),
      type,
      JSON.stringify(patch),
    );
  }
  assert.throws(() => new Resampler(null as unknown as ResamplerOptions), TypeError);
  assert.throws(
    () => Resampler.create({ ...good, quality: 12 }),
    { name: "RangeError", message: 'Cannot use quality "12": expected an integer from 0 to 10' },
  );
  using ok = Resampler.create({ ...good, quality: 0 });
  assert.equal(ok.quality, 0);
  assert.equal(new Resampler(good).quality, 5);
});

Deno.test("Resampler rejects bad buffers and rates before calling libspeexdsp", () => {
  using r = new Resampler({ channels: 2, inRate: 44100, outRate: 48000 });
  const out = new Int16Array(2000);
  assert.throws(
    () => r.process(new Float32Array(10) as unknown as Int16Array, out),
    TypeError,
  );
  assert.throws(() => r.process(new Int16Array(10), [] as unknown as Int16Array), TypeError);
  assert.throws(() => r.process(new Int16Array(11), out), RangeError);
  assert.throws(() => r.process(new Int16Array(10), out.subarray(0, 7)), RangeError);
  assert.throws(() => r.process(out.subarray(0, 100), out.subarray(50, 300)), RangeError);
  assert.deepEqual(r.process(out.subarray(0, 100), out.subarray(100, 300)).inFrames, 50);
  assert.throws(() => r.outputFramesFor(-1), RangeError);
  assert.throws(() => r.outputFramesFor(1.5), RangeError);
  assert.throws(() => r.setRate(0, 48000), RangeError);
  assert.throws(() => r.setRate(44100, 400000), RangeError);
  assert.throws(() => r.setRate(44100, "48000" as unknown as number), TypeError);
  assert.equal(r.inRate, 44100);
  assert.equal(r.outRate, 48000);
});

Deno.test("Resampler outputFramesFor bounds a chunk's output", () => {
  using r = new Resampler({ channels: 1, inRate: 44100, outRate: 48000 });
  assert.ok(r.outputFramesFor(441) >= 480);
  assert.ok(r.outputFramesFor(441) <= 480 + r.outputLatency + 2);
  assert.ok(r.outputFramesFor(0) >= 0);
});

Deno.test("Resampler close is idempotent and later use throws", () => {
  const r = new Resampler({ channels: 1, inRate: 8000, outRate: 16000 });
  assert.equal(r.closed, false);
  r.close();
  r.close();
  r[Symbol.dispose]();
  assert.equal(r.closed, true);
  assert.throws(() => r.process(new Int16Array(8), new Int16Array(32)), {
    name: "TypeError",
    message: "Cannot process audio with a closed Resampler",
  });
  assert.throws(() => r.inputLatency, /closed/);
  assert.throws(() => r.setRate(8000, 48000), /closed/);
  let escaped: Resampler | undefined;
  {
    using s = new Resampler({ channels: 1, inRate: 8000, outRate: 16000 });
    escaped = s;
    assert.equal(s.closed, false);
  }
  assert.equal(escaped.closed, true);
});

Deno.test("libspeexdsp path override names the variable when it fails", {
  // Under qemu-user without binfmt_misc (scripts/test-arm64.sh) Deno.execPath() cannot run (127).
  ignore: Deno.env.get("KVM_AUDIO_TEST_EMULATED") === "1",
}, async () => {
  const code = `
    const { Resampler } = await import(${
    JSON.stringify(import.meta.resolve("../ffi/speexdsp.ts"))
  });
    try { new Resampler({ channels: 1, inRate: 8000, outRate: 16000 }); console.log("loaded"); }
    catch (e) { console.log(e.name + ": " + e.message); }
  `;
  const { stdout, success } = await new Deno.Command(Deno.execPath(), {
    args: ["eval", code], // eval runs with all permissions
    env: { KVM_AUDIO_LIBSPEEXDSP: "/nonexistent/libspeexdsp.so.1" },
    stdout: "piped",
    stderr: "inherit",
  }).output();
  assert.ok(success);
  const text = new TextDecoder().decode(stdout);
  assert.match(text, /^LibraryNotFoundError: Cannot load libspeexdsp: tried "\/nonexistent/);
  assert.match(text, /KVM_AUDIO_LIBSPEEXDSP/);
});
