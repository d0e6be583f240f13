import assert from "node:assert/strict";
import { defaultChannelMap, downmixMatrix, mixFrames } from "../lib/pipeline/downmix.ts";

const H = Math.SQRT1_2;

function near(actual: Float32Array, want: number[]): void {
  assert.equal(actual.length, want.length);
  actual.forEach((v, i) => assert.ok(Math.abs(v - want[i]!) < 1e-6, `[${i}] ${v} vs ${want[i]}`));
}

Deno.test("downmix: 5.1 to stereo keeps the fronts, adds centre and rears at −3 dB, drops LFE", () => {
  const map = defaultChannelMap(6);
  assert.deepEqual(map, ["FL", "FR", "RL", "RR", "FC", "LFE"]);
  near(downmixMatrix(map, 2), [1, 0, H, 0, H, 0, /* right */ 0, 1, 0, H, H, 0]);
  // Mono is the stereo downmix's mean: a front-only programme keeps the stereo presets' level.
  near(downmixMatrix(map, 1), [0.5, 0.5, H / 2, H / 2, H, 0]);
});

Deno.test("downmix: mono and stereo devices, and unknown positions", () => {
  near(downmixMatrix(["MONO"], 2), [1, 1]);
  near(downmixMatrix(["MONO"], 1), [1]);
  near(downmixMatrix(["FL", "FR"], 1), [0.5, 0.5]);
  near(downmixMatrix(["UNKNOWN"], 1), [1]);
  // A device without positions is read as front left, front right, then left out.
  near(downmixMatrix(["UNKNOWN", "UNKNOWN", "UNKNOWN"], 2), [1, 0, 0, 0, 1, 0]);
  assert.deepEqual(defaultChannelMap(12).slice(0, 3), ["FL", "FR", "UNKNOWN"]);
  // A reordered map (centre first) is followed.
  near(downmixMatrix(["FC", "FL", "FR"], 2), [H, 1, 0, H, 0, 1]);
});

Deno.test("downmix: mixing clamps instead of wrapping", () => {
  const src = new Int16Array([30000, 30000, 0, 0, 30000, 0]); // FL, FR and FC loud
  const dst = new Int16Array(2);
  mixFrames(src, dst, 1, downmixMatrix(defaultChannelMap(6), 2), 2);
  assert.deepEqual([...dst], [32767, 32767]);
  const neg = new Int16Array([-30000, -30000, 0, 0, -30000, 0]);
  mixFrames(neg, dst, 1, downmixMatrix(defaultChannelMap(6), 2), 2);
  assert.deepEqual([...dst], [-32768, -32768]);
  const quiet = new Int16Array([1000, 3000, 0, 0, 0, 5000]); // LFE is not heard
  const mono = new Int16Array(1);
  mixFrames(quiet, mono, 1, downmixMatrix(defaultChannelMap(6), 1), 1);
  assert.deepEqual([...mono], [2000]);
});
