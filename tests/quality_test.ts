import assert from "node:assert/strict";
import { OPUS_MAX_PACKET, OpusEncoder } from "../ffi/opus.ts";
import { tone } from "./audio_util.ts";
import {
  encoderSettings,
  frameSamples,
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

Deno.test("every preset's promises hold in libopus: DTX flags digital silence, FEC is coded", () => {
  const out = new Uint8Array(OPUS_MAX_PACKET);
  for (const direction of ["output", "microphone"] as const) {
    for (const name of PRESET_NAMES) {
      const p = getPreset(direction, name);
      const fs = frameSamples(p);
      // DTX: digital silence becomes packets the pipeline flags as silence (≤ 2 bytes), so RTP
      // sends none. (The output's low preset at complexity 3 gave 3-byte packets forever.)
      if (p.dtx) {
        using enc = OpusEncoder.create(
          { channels: p.channels, application: p.application },
          encoderSettings(p),
        );
        const zeros = new Int16Array(fs * p.channels);
        const sizes = Array.from({ length: 50 }, () => enc.encode(zeros, fs, out));
        assert.ok(
          sizes.slice(-10).every((n) => n <= 2),
          `${direction} ${name}: ${sizes.slice(-10)}`,
        );
      }
      // FEC: the packets of a voice-band signal carry redundancy, so they differ from the same
      // encoder's without FEC. (The microphone's low preset at 16 kb/s coded none: byte for byte
      // the same packets.)
      if (p.inbandFec) {
        const signal = tone({ freq: 300, frames: fs * 100, amplitude: 0.3, channels: p.channels });
        const packets = (fec: boolean) => {
          using enc = OpusEncoder.create(
            { channels: p.channels, application: p.application },
            encoderSettings({ ...p, inbandFec: fec }),
          );
          const all: number[] = [];
          for (let i = 0; i < 100; i++) {
            const n = enc.encode(
              signal.subarray(i * fs * p.channels, (i + 1) * fs * p.channels),
              fs,
              out,
            );
            all.push(n, ...out.subarray(0, n));
          }
          return all;
        };
        const on = packets(true), off = packets(false);
        assert.ok(
          on.length !== off.length || on.some((b, i) => b !== off[i]),
          `${direction} ${name}: the same packets with FEC on and off`,
        );
      }
    }
  }
});
