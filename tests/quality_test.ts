import assert from "node:assert/strict";
import {
  getPreset,
  MICROPHONE_PRESETS,
  needsNewEncoder,
  OUTPUT_PRESETS,
  parseDirection,
  parsePresetName,
  PRESET_NAMES,
} from "../lib/quality.ts";

Deno.test("preset names parse exactly and anything else is rejected with the valid names", () => {
  for (const n of PRESET_NAMES) assert.equal(parsePresetName(n), n);
  assert.throws(
    () => parsePresetName("loud"),
    (e: unknown) =>
      e instanceof RangeError &&
      e.message === 'Cannot set quality "loud": expected one of low, medium, high, ultra',
  );
  assert.throws(() => parsePresetName("High"), RangeError);
  assert.throws(() => parsePresetName(""), RangeError);
  assert.throws(() => parsePresetName(3), /Cannot set quality 3: expected a string/);
  assert.throws(() => parsePresetName(undefined), TypeError);
  assert.throws(() => parsePresetName({ preset: "low" }), TypeError);
  assert.throws(() => parseDirection("input"), /expected one of output, microphone/);
  assert.throws(() => getPreset("output", "max"), /Cannot set output quality "max"/);
});

Deno.test("preset tables are complete, frozen and ordered by bitrate", () => {
  for (const table of [OUTPUT_PRESETS, MICROPHONE_PRESETS]) {
    assert.deepEqual(Object.keys(table), [...PRESET_NAMES]);
    assert.ok(Object.isFrozen(table) && Object.isFrozen(table.low));
    const rates = PRESET_NAMES.map((n) => table[n].bitrate);
    assert.deepEqual(rates, [...rates].sort((a, b) => a - b));
    for (const n of PRESET_NAMES) assert.equal(table[n].name, n);
  }
  // Ultra is the lowest-latency choice in both directions.
  assert.ok(PRESET_NAMES.every((n) => OUTPUT_PRESETS.ultra.frameMs <= OUTPUT_PRESETS[n].frameMs));
  assert.equal(OUTPUT_PRESETS.ultra.application, "restrictedLowDelay");
  assert.ok(PRESET_NAMES.every((n) => MICROPHONE_PRESETS[n].inbandFec));
});

Deno.test("only channel, frame duration or application changes need a new encoder", () => {
  assert.equal(needsNewEncoder(OUTPUT_PRESETS.medium, OUTPUT_PRESETS.high), false);
  assert.equal(needsNewEncoder(OUTPUT_PRESETS.low, OUTPUT_PRESETS.medium), true); // mono → stereo
  assert.equal(needsNewEncoder(OUTPUT_PRESETS.high, OUTPUT_PRESETS.ultra), true); // 20 → 10 ms
  assert.equal(needsNewEncoder(MICROPHONE_PRESETS.low, MICROPHONE_PRESETS.high), false);
});
