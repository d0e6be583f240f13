import assert from "node:assert/strict";
import { OpusEncoder } from "../ffi/opus.ts";
import { AudioService, type ServiceOptions } from "../lib/service.ts";
import { encoderSettings, frameSamples, MICROPHONE_PRESETS, type Preset } from "../lib/quality.ts";
import { readRaw, useAlsaConfig, writeAlsaConfig } from "./alsa_devices.ts";
import { channel, dominantFrequency, prng, rmsDb, tempDir, tone } from "./audio_util.ts";
import { sleep, until } from "./wait.ts";

function counter(json: ReturnType<AudioService["metrics"]["toJSON"]>, name: string): number {
  const v = json.counters[name];
  if (typeof v === "number") return v;
  if (v === undefined) return 0;
  return Object.values(v as Record<string, number>).reduce((a, b) => a + b, 0);
}

function labelled(
  json: ReturnType<AudioService["metrics"]["toJSON"]>,
  name: string,
  label: string,
): number {
  const v = json.counters[name] as Record<string, number> | number | undefined;
  if (v === undefined || typeof v === "number") return 0;
  return Object.entries(v).filter(([k]) => k.includes(`"${label}"`)).reduce((a, [, n]) => a + n, 0);
}

// Under qemu (scripts/test-arm64.sh) the worker starts 1-4 s late and cannot keep pace with a
// sender on the wall clock: packets queue up, arrive "too early" or are dropped.
const test = Deno.env.get("KVM_AUDIO_TEST_EMULATED") === "1" ? Deno.test.ignore : Deno.test;

/**
 * A microphone-only service playing into the file PCM `kvm_test_playback` (`outfile`, in `dir`);
 * dispose `restore` to put the ALSA configuration back.
 */
async function playbackService(
  dir: string,
  options: Omit<ServiceOptions, "capture" | "playback">,
): Promise<{ service: AudioService; outfile: string; restore: Disposable }> {
  const outfile = `${dir}/out.raw`;
  const cfg = await writeAlsaConfig(dir, { kvm_test_playback: { type: "file", outfile } });
  const restore = useAlsaConfig(cfg);
  const service = new AudioService({ capture: null, playback: "kvm_test_playback", ...options });
  return { service, outfile, restore };
}

/**
 * Pushes `seconds` of a `freq` Hz tone encoded at microphone preset `p`, one frame per packet, flat
 * out — kept below the input ring's size by its backlog (a full ring would drop packets) — then
 * waits until every packet is decoded (up to 10 s). Fails when the worker takes nothing for 20 s
 * rather than wait forever. Returns the packet count.
 */
async function pushToneFlat(
  service: AudioService,
  p: Preset,
  freq: number,
  seconds: number,
  frameMs: number = p.frameMs,
): Promise<number> {
  const frame = 48 * frameMs;
  using enc = OpusEncoder.create({ channels: 1, application: p.application }, encoderSettings(p));
  const pcm = tone({ freq, frames: 48000 * seconds, amplitude: 0.4 });
  const buf = new Uint8Array(1500);
  const total = Math.floor((48000 * seconds) / frame);
  const deadline = Date.now() + 20_000;
  let pushed = 0;
  while (pushed < total) {
    assert.ok(Date.now() < deadline, `only ${pushed} of ${total} packets taken`);
    while (pushed < total && service.microphoneBacklog < 48) {
      const n = enc.encode(pcm.subarray(pushed * frame, (pushed + 1) * frame), frame, buf);
      assert.equal(
        service.pushMicrophonePacket(buf.subarray(0, n), pushed & 0xffff, pushed * frame),
        "queued",
      );
      pushed++;
    }
    await sleep(1);
  }
  const decoded = () => counter(service.metrics.toJSON(), "kvm_audio_input_packets_decoded_total");
  for (let i = 0; i < 200 && decoded() < total; i++) await sleep(50);
  return total;
}

for (const ppm of [300, -300]) {
  test(`input pipeline: jitter, reordering, 5 % loss, duplicates and ${ppm} ppm drift → the tone plays`, async () => {
    await using dir = await tempDir();
    const { service, outfile, restore } = await playbackService(dir.path, {
      microphonePreset: "high",
      pace: "clock",
      metricsIntervalMs: 100,
    });
    using _ = restore;
    const p = MICROPHONE_PRESETS.high;
    const frame = frameSamples(p);
    const seconds = 6;
    service.start();
    // The sender's clock starts once the worker runs: a worker slow to start (its module
    // type-checked on a cold cache, about a second) met a second of queued packets.
    await until("the microphone running", () => service.microphoneStatus().state === "running");

    using enc = OpusEncoder.create({ channels: 1, application: p.application }, encoderSettings(p));
    const pcm = tone({ freq: 600, frames: 48000 * seconds, amplitude: 0.4 });
    const rnd = prng(ppm > 0 ? 7 : 11);
    const packets: { at: number; seq: number; ts: number; data: Uint8Array }[] = [];
    const buf = new Uint8Array(1500);
    const period = (frame / 48) * (1 - ppm * 1e-6); // sender clock vs ours
    let lost = 0, dups = 0;
    for (let i = 0; i < (48000 * seconds) / frame; i++) {
      const n = enc.encode(pcm.subarray(i * frame, (i + 1) * frame), frame, buf);
      const data = buf.slice(0, n);
      const seq = (65500 + i) & 0xffff; // wraps during the test
      const ts = (4294900000 + i * frame) >>> 0; // so does the timestamp
      if (rnd() < 0.05) {
        lost++;
        continue;
      }
      const at = i * period + rnd() * 30; // up to 30 ms of jitter: reorders neighbours
      packets.push({ at, seq, ts, data });
      if (rnd() < 0.02) {
        dups++;
        packets.push({ at: at + rnd() * 40, seq, ts, data });
      }
    }
    packets.sort((a, b) => a.at - b.at);
    let reordered = 0;
    for (let i = 1; i < packets.length; i++) {
      const d = (packets[i]!.seq - packets[i - 1]!.seq) & 0xffff;
      if (d > 0x8000) reordered++;
    }
    assert.ok(reordered > 5, `the schedule reorders packets (${reordered})`);

    // Send on schedule, sampling the playout depth as we go.
    const t0 = performance.now();
    const depths: number[] = [];
    let next = 0;
    while (next < packets.length) {
      const now = performance.now() - t0;
      while (next < packets.length && packets[next]!.at <= now) {
        const pk = packets[next++]!;
        assert.equal(service.pushMicrophonePacket(pk.data, pk.seq, pk.ts, "local"), "queued");
      }
      const g = service.metrics.toJSON().gauges["kvm_audio_playout_depth_frames"];
      if (typeof g === "number") depths.push(g);
      await sleep(5);
    }
    // Let the worker take the last packets and report (it posts metrics every 100 ms; a loaded
    // machine may delay it).
    let json = service.metrics.toJSON();
    for (let i = 0; i < 60; i++) {
      await sleep(100);
      json = service.metrics.toJSON();
      const taken = counter(json, "kvm_audio_input_packets_total");
      if (i >= 5 && taken === counter(json, "kvm_audio_input_packets_received_total")) break;
    }
    await service.close();

    // The depth stayed within the buffer's bounds (1..8 frames, +1 transient before a drop).
    const maxDepth = Math.max(...depths);
    assert.ok(maxDepth <= 9, `max depth ${maxDepth}`);

    // Counters add up.
    const received = counter(json, "kvm_audio_input_packets_received_total");
    assert.equal(received, packets.length);
    const taken = counter(json, "kvm_audio_input_packets_total");
    assert.equal(taken, received, "every received packet reached the playout buffer");
    const accepted = labelled(json, "kvm_audio_input_packets_total", "accepted");
    const duplicate = labelled(json, "kvm_audio_input_packets_total", "duplicate");
    const late = labelled(json, "kvm_audio_input_packets_total", "late");
    const tooEarly = labelled(json, "kvm_audio_input_packets_total", "too-early");
    assert.equal(
      received,
      accepted + duplicate + late + tooEarly,
      "received = accepted + duplicate + late + too early",
    );
    assert.ok(late + tooEarly < received * 0.05, `late ${late}, too early ${tooEarly}`);
    assert.ok(duplicate >= dups * 0.5, `duplicates seen ${duplicate} of ${dups}`);
    // Every accepted packet was decoded, dropped for drift or overflow, flushed, or is still held.
    const decoded = counter(json, "kvm_audio_input_packets_decoded_total");
    const drift = counter(json, "kvm_audio_input_drift_drops_total");
    const overflow = counter(json, "kvm_audio_input_overflow_drops_total");
    const flushed = counter(json, "kvm_audio_input_flushed_total");
    const held = json.gauges["kvm_audio_playout_buffered_packets"] as number;
    assert.equal(
      decoded + drift + overflow + flushed + held,
      accepted,
      `decoded ${decoded} + drift ${drift} + overflow ${overflow} + flushed ${flushed} + held ${held}`,
    );
    assert.ok(
      decoded >= accepted * 0.9,
      `${decoded} of ${accepted} decoded (drift ${drift}, overflow ${overflow}, flushed ${flushed})`,
    );
    const fec = counter(json, "kvm_audio_input_frames_fec_total");
    const plc = labelled(json, "kvm_audio_input_frames_concealed_total", "loss");
    assert.ok(fec + plc >= lost * 0.8, `losses ${lost}, recovered ${fec} + concealed ${plc}`);

    // The playback file holds the tone.
    const out = await readRaw(outfile);
    const mono = channel(out, 2);
    const mid = mono.subarray(48000, 48000 * 4);
    assert.ok(Math.abs(dominantFrequency(mid, 48000) - 600) < 6);
    const level = rmsDb(mid);
    const want = rmsDb(channel(tone({ freq: 600, frames: 48000, amplitude: 0.4 }), 1));
    assert.ok(Math.abs(level - want) < 2, `level ${level.toFixed(2)} vs ${want.toFixed(2)} dBFS`);
  });
}

test("input pipeline: the sender switching from 20 ms to 10 ms frames mid-stream plays cleanly", async () => {
  await using dir = await tempDir();
  const { service, outfile, restore } = await playbackService(dir.path, { pace: "clock" });
  using _ = restore;
  service.start();
  await until("the microphone running", () => service.microphoneStatus().state === "running");
  const pcm = tone({ freq: 523, frames: 48000 * 4, amplitude: 0.4 });
  const buf = new Uint8Array(1500);
  const t0 = performance.now();
  let seq = 0, pos = 0;
  for (const [preset, seconds] of [["high", 2], ["ultra", 2]] as const) {
    const p = MICROPHONE_PRESETS[preset];
    const frame = frameSamples(p);
    service.setMicrophonePreset(preset);
    using enc = OpusEncoder.create({ channels: 1, application: p.application }, encoderSettings(p));
    const end = pos + 48000 * seconds;
    for (; pos < end; pos += frame) {
      const wait = t0 + pos / 48 - performance.now();
      if (wait > 0) await sleep(wait);
      const n = enc.encode(pcm.subarray(pos, pos + frame), frame, buf);
      service.pushMicrophonePacket(buf.subarray(0, n), seq++ & 0xffff, pos);
    }
  }
  await sleep(400);
  await service.close();
  const mono = channel(await readRaw(outfile), 2);
  // The 100 ms blocks after start-up hold the tone: no garbling at the switch. (A block or two may
  // be concealed when this shared machine starves the worker; a garbled switch spoils them all.)
  const start = mono.findIndex((v) => Math.abs(v) > 0.05) + 4800;
  let blocks = 0, good = 0;
  for (let s = start; s + 4800 <= Math.min(mono.length, start + 48000 * 3.4); s += 4800) {
    const f = dominantFrequency(mono.subarray(s, s + 4800), 48000, 200, 2000);
    if (Math.abs(f - 523) < 523 * 0.01 && Math.abs(rmsDb(mono.subarray(s, s + 4800)) + 11) < 1.5) {
      good++;
    }
    blocks++;
  }
  assert.ok(good >= blocks * 0.9, `${good} of ${blocks} blocks hold the tone`);
  // And all of it was played: 4 s sent → about 4 s written (not half of the 10 ms part).
  const played = (mono.length - start) / 48000;
  assert.ok(played > 3.6, `${played.toFixed(2)} s played`);
  assert.ok(blocks >= 30, `${blocks} blocks checked`);
});

// Flat pacing has no clock to keep: it runs under emulation too.
Deno.test("input pipeline, flat pacing: one frame per packet as fast as packets come → the tone, nothing concealed", async () => {
  await using dir = await tempDir();
  const { service, outfile, restore } = await playbackService(dir.path, {
    microphonePreset: "ultra",
    pace: "flat",
    metricsIntervalMs: 50,
  });
  using _ = restore;
  const p = MICROPHONE_PRESETS.ultra;
  const frame = frameSamples(p);
  const seconds = 8;
  service.start();
  const total = await pushToneFlat(service, p, 700, seconds);
  let json = service.metrics.toJSON();
  await service.close();
  json = service.metrics.toJSON();
  assert.equal(counter(json, "kvm_audio_frames_dropped_total"), 0, "no packet dropped");
  assert.equal(labelled(json, "kvm_audio_input_packets_total", "accepted"), total);
  assert.equal(
    counter(json, "kvm_audio_input_packets_decoded_total"),
    total,
    "every packet decoded",
  );
  assert.equal(counter(json, "kvm_audio_input_frames_concealed_total"), 0, "nothing concealed");
  assert.equal(counter(json, "kvm_audio_input_drift_drops_total"), 0, "nothing dropped for drift");

  // The file holds the whole tone, packet for packet (plus the few silent frames before the
  // first packet came and after the last).
  const mono = channel(await readRaw(outfile), 2);
  const start = mono.findIndex((v) => Math.abs(v) > 0.05);
  assert.ok(start >= 0, "the tone was played");
  const played = mono.length - start;
  assert.ok(
    Math.abs(played - 48000 * seconds) <= 4 * frame,
    `${played} samples from the first sound, expected ${48000 * seconds}`,
  );
  const mid = mono.subarray(start + 48000, start + 48000 * (seconds - 1));
  assert.ok(Math.abs(dominantFrequency(mid, 48000) - 700) < 6);
  const want = rmsDb(channel(tone({ freq: 700, frames: 48000, amplitude: 0.4 }), 1));
  assert.ok(
    Math.abs(rmsDb(mid) - want) < 2,
    `level ${rmsDb(mid).toFixed(2)} vs ${want.toFixed(2)}`,
  );
});

// RFC 7587 allows packets of up to 120 ms (libopus and ffmpeg make 80, 100 and 120 ms ones): they
// were refused as malformed ("duration"), and the microphone stayed silent.
for (const ms of [80, 120]) {
  test(`input pipeline: ${ms} ms packets play`, async () => {
    await using dir = await tempDir();
    const { service, outfile, restore } = await playbackService(dir.path, {
      pace: "flat",
      metricsIntervalMs: 50,
    });
    using _ = restore;
    const seconds = 3;
    service.start();
    const total = await pushToneFlat(service, MICROPHONE_PRESETS.low, 700, seconds, ms);
    await service.close();
    const json = service.metrics.toJSON();
    assert.equal(counter(json, "kvm_audio_input_packets_malformed_total"), 0);
    assert.equal(counter(json, "kvm_audio_input_packets_decoded_total"), total);
    const mono = channel(await readRaw(outfile), 2);
    const start = mono.findIndex((v) => Math.abs(v) > 0.05);
    assert.ok(start >= 0, "the tone was played");
    assert.ok(mono.length - start >= 48000 * (seconds - 0.2), `${mono.length - start} samples`);
    const mid = mono.subarray(start + 24000, start + 48000 * (seconds - 1));
    assert.ok(Math.abs(dominantFrequency(mid, 48000) - 700) < 6);
    assert.ok(rmsDb(mid) > -14 && rmsDb(mid) < -8, `level ${rmsDb(mid)}`);
  });
}

for (const [rate, channels] of [[44100, 4], [32000, 1], [44100, 6]] as const) {
  test(`input pipeline: a ${rate} Hz ${channels}-channel playback device gets the tone, resampled`, async () => {
    await using dir = await tempDir();
    const { service, outfile, restore } = await playbackService(dir.path, {
      playbackRate: rate,
      playbackChannels: channels,
      microphonePreset: "high",
      pace: "flat",
      metricsIntervalMs: 50,
    });
    using _ = restore;
    const frame = frameSamples(MICROPHONE_PRESETS.high);
    const seconds = 3;
    service.start();
    const total = await pushToneFlat(service, MICROPHONE_PRESETS.high, 700, seconds);
    // Before, a device of more than two channels at another rate crashed the worker every frame.
    assert.equal(service.microphoneStatus().supervisor?.crashes, 0);
    await service.close();
    assert.equal(counter(service.metrics.toJSON(), "kvm_audio_input_packets_decoded_total"), total);
    const raw = await readRaw(outfile);
    for (const c of [0, channels - 1]) {
      const x = channel(raw, channels, c);
      const start = x.findIndex((v) => Math.abs(v) > 0.05);
      assert.ok(start >= 0, `channel ${c} played the tone`);
      const played = x.length - start;
      assert.ok(
        Math.abs(played - rate * seconds) <= (4 * frame * rate) / 48000,
        `channel ${c}: ${played} frames from the first sound, expected ${rate * seconds}`,
      );
      const mid = x.subarray(start + rate / 2, start + rate * 2);
      assert.ok(Math.abs(dominantFrequency(mid, rate) - 700) < 5, `channel ${c} frequency`);
      assert.ok(rmsDb(mid) > -14 && rmsDb(mid) < -8, `channel ${c} level ${rmsDb(mid)}`);
    }
  });
}
