import assert from "node:assert/strict";
import { configure, type LogRecord, reset } from "@logtape/logtape";
import { OpusDecoder, OpusEncoder } from "../ffi/opus.ts";
import { AudioService } from "../lib/service.ts";
import { encoderSettings, frameSamples, MICROPHONE_PRESETS } from "../lib/quality.ts";
import { readRaw } from "./alsa_devices.ts";
import { channel, dominantFrequency, rmsDb, tempDir, tone } from "./audio_util.ts";
import { startPulse } from "./pulse.ts";
import { sleep, until } from "./wait.ts";

interface HistogramJson {
  count: number;
  p50: number;
  p99: number;
  max: number;
}

function stage(service: AudioService, name: string): HistogramJson {
  const h = service.metrics.toJSON().histograms["kvm_audio_stage_latency_ms"] as unknown as Record<
    string,
    HistogramJson
  >;
  const entry = Object.entries(h).find(([k]) => k.includes(`"${name}"`));
  assert.ok(entry, `stage ${name} recorded`);
  return entry[1];
}

Deno.test("paced virtual devices: both pipelines run for 6 s with plausible stage latencies", async () => {
  await using pulse = await startPulse({ toneHz: 440 });
  using _env = pulse.use();
  await using dir = await tempDir();
  await using service = new AudioService({
    capture: pulse.pcm.tone,
    playback: pulse.pcm.playback,
    outputPreset: "ultra",
    microphonePreset: "high",
    metricsIntervalMs: 200,
  });
  const out: Uint8Array[] = [];
  const arrivals: number[] = [];
  service.subscribe((f) => {
    out.push(f.data.slice());
    arrivals.push(performance.now());
  });
  service.start();

  // Record what the playback device plays, through the sink's monitor (a real client: arecord).
  const recording = `${dir.path}/monitor.raw`;
  const arecord = new Deno.Command("arecord", {
    args: [
      "-q",
      "-D",
      pulse.pcm.monitor,
      "-f",
      "S16_LE",
      "-r",
      "48000",
      "-c",
      "2",
      "-t",
      "raw",
      "-d",
      "9",
      recording,
    ],
    env: pulse.env,
    stdout: "null",
    stderr: "piped",
  }).spawn();

  // Talk: a 700 Hz tone as 20 ms Opus packets, sent in real time.
  const p = MICROPHONE_PRESETS.high;
  const frame = frameSamples(p);
  using enc = OpusEncoder.create({ channels: 1, application: p.application }, encoderSettings(p));
  const pcm = tone({ freq: 700, frames: 48000 * 7, amplitude: 0.4 });
  const buf = new Uint8Array(1500);
  const t0 = performance.now();
  for (let i = 0; i < (48000 * 7) / frame; i++) {
    const due = t0 + i * (frame / 48);
    const wait = due - performance.now();
    if (wait > 0) await sleep(wait);
    const n = enc.encode(pcm.subarray(i * frame, (i + 1) * frame), frame, buf);
    assert.equal(
      service.pushMicrophonePacket(buf.subarray(0, n), i & 0xffff, (i * frame) >>> 0),
      "queued",
    );
  }
  const end = performance.now();
  await sleep(300);

  // Output: real-time capture gives 100 packets/s at ultra (10 ms), once started.
  const rate = arrivals.filter((t) => t > end - 3000 && t <= end).length / 3;
  assert.ok(rate > 80 && rate < 110, `output packets per second ${rate.toFixed(1)}`);
  using dec = OpusDecoder.create({ channels: 2 });
  const decoded = new Int16Array(out.length * 480 * 2);
  out.forEach((pk, i) => dec.decode(pk, decoded.subarray(i * 960), 480));
  const tail = channel(decoded, 2).subarray(decoded.length / 2 - 48000);
  assert.ok(Math.abs(dominantFrequency(tail, 48000) - 440) < 5, "the captured tone");

  // Per-stage latency histograms are filled with plausible values.
  const cap = stage(service, "capture_to_encoded");
  const hand = stage(service, "encoded_to_handed");
  const play = stage(service, "received_to_played");
  assert.ok(
    cap.count > 400 && cap.p50 > 0 && cap.p50 < 50,
    `capture→encoded ${JSON.stringify(cap)}`,
  );
  assert.ok(
    hand.count > 400 && hand.p50 >= 0 && hand.p50 < 20,
    `encoded→handed ${JSON.stringify(hand)}`,
  );
  assert.ok(
    play.count > 200 && play.p50 > 0 && play.p50 < 400,
    `received→played ${JSON.stringify(play)}`,
  );
  // What the code adds inside those stages: well under a frame.
  const read = stage(service, "read_to_encoded");
  const due = stage(service, "due_to_written");
  assert.ok(
    read.count === cap.count && read.p50 >= 0 && read.p50 < 10,
    `read→encoded ${JSON.stringify(read)}`,
  );
  assert.ok(read.p50 <= cap.p50, `read→encoded ${read.p50} within capture→encoded ${cap.p50}`);
  assert.ok(
    due.count >= play.count && due.p50 >= 0 && due.p50 < 10,
    `due→written ${JSON.stringify(due)}`,
  );
  const depth = service.metrics.toJSON().gauges["kvm_audio_playout_depth_frames"] as number;
  assert.ok(depth >= 0 && depth <= 9, `playout depth ${depth}`);

  // The playback device played the microphone's tone.
  const status = await arecord.status;
  assert.ok(
    status.success,
    new TextDecoder().decode((await arecord.stderr.getReader().read()).value),
  );
  const heard = channel(await readRaw(recording), 2);
  // The monitor starts late (PulseAudio start-up); look at the loudest second.
  let best = 0, bestDb = -200;
  for (let s = 0; s + 48000 <= heard.length; s += 12000) {
    const db = rmsDb(heard.subarray(s, s + 48000));
    if (db > bestDb) [best, bestDb] = [s, db];
  }
  assert.ok(bestDb > -16, `the monitor heard ${bestDb.toFixed(1)} dBFS`);
  assert.ok(Math.abs(dominantFrequency(heard.subarray(best, best + 48000), 48000) - 700) < 7);
});

Deno.test("paced playback follows the packets' frame duration: 10, 40, 60 and 20 ms frames all play", async () => {
  await using pulse = await startPulse();
  using _env = pulse.use();
  // Ultra: the playback device is opened for 10 ms frames (period 10 ms, buffer 30 ms).
  await using service = new AudioService({
    capture: null,
    playback: pulse.pcm.playback,
    microphonePreset: "ultra",
    metricsIntervalMs: 100,
  });
  service.start();
  const decoded = () =>
    service.metrics.toJSON().counters["kvm_audio_input_packets_decoded_total"] as number ?? 0;
  const period = () => service.microphoneStatus().obtained?.periodFrames;
  await until("the microphone running", () => service.microphoneStatus().state === "running");
  using enc = OpusEncoder.create({ channels: 1, application: "voip" });
  const signal = tone({ freq: 600, frames: 48000 * 6, amplitude: 0.4 });
  const packet = new Uint8Array(1500);
  let seq = 0, ts = 0, at = 0;
  // Each phase is 5 s: a PulseAudio stream stalls for up to 2 s after it opens (see TESTING.md),
  // and the device is reopened for each new duration. The first phase warms up, not counted.
  for (const [k, ms] of [10, 40, 60, 20].entries()) {
    const frame = 48 * ms, count = Math.round(5000 / ms);
    const before = decoded();
    const t0 = performance.now();
    for (let i = 0; i < count; i++) {
      const n = enc.encode(signal.subarray(at, at + frame), frame, packet);
      at = (at + frame) % (signal.length - 2880);
      // Real time: each packet when its audio would have been captured.
      while (performance.now() - t0 < i * ms) await sleep(2);
      service.pushMicrophonePacket(packet.slice(0, n), seq++ & 0xffff, ts >>> 0, "local");
      ts += frame;
    }
    await sleep(300);
    if (k === 0) continue;
    const got = decoded() - before;
    // Kept open for 10 ms frames, the device took no 40 or 60 ms frame (none fits its 30 ms
    // buffer): none was decoded.
    assert.ok(got >= count * 0.4, `${ms} ms packets: ${got} of ${count} decoded`);
    assert.equal(period(), frame, `the device reopened for ${ms} ms frames`);
  }
  assert.equal(service.microphoneStatus().supervisor?.crashes, 0);
});

Deno.test("paced playback: a stray packet of another frame duration, rejected as late, does not reopen the device", async () => {
  const opens: unknown[] = [];
  await configure({
    sinks: {
      memory: (r: LogRecord) => {
        if (String(r.rawMessage).includes("device {name} open")) opens.push(r.properties);
      },
    },
    loggers: [
      { category: ["kvm-audio", "service"], lowestLevel: "info", sinks: ["memory"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: [] },
    ],
    reset: true,
  });
  try {
    await using pulse = await startPulse();
    using _env = pulse.use();
    await using service = new AudioService({
      capture: null,
      playback: pulse.pcm.playback,
      microphonePreset: "high",
      metricsIntervalMs: 100,
    });
    service.start();
    await until("the microphone running", () => service.microphoneStatus().state === "running");
    using enc = OpusEncoder.create({ channels: 1, application: "voip" });
    using enc10 = OpusEncoder.create({ channels: 1, application: "voip" });
    const signal = tone({ freq: 600, frames: 48000 * 6, amplitude: 0.4 });
    const packet = new Uint8Array(1500);
    const t0 = performance.now();
    let opensBefore = 0;
    for (let i = 0; i < 250; i++) {
      while (performance.now() - t0 < i * 20) await sleep(2);
      const n = enc.encode(signal.subarray(i * 960, (i + 1) * 960), 960, packet);
      service.pushMicrophonePacket(packet.slice(0, n), i, i * 960, "local");
      if (i === 200) {
        // Half-way to the next packet: one 10 ms packet numbered 150, played long ago.
        opensBefore = opens.length;
        while (performance.now() - t0 < i * 20 + 10) await sleep(1);
        const m = enc10.encode(signal.subarray(0, 480), 480, packet);
        assert.equal(service.pushMicrophonePacket(packet.slice(0, m), 150, 150 * 960), "queued");
      }
    }
    await sleep(300);
    const c = service.metrics.toJSON().counters;
    const late = (c["kvm_audio_input_packets_total"] as Record<string, number>)['result="late"'];
    assert.ok(opensBefore >= 1);
    assert.equal(opens.length, opensBefore, `device opened again: ${JSON.stringify(opens)}`);
    assert.equal(late, 1, "the stray was rejected as late");
    assert.equal(service.microphoneStatus().obtained?.periodFrames, 960);
  } finally {
    await reset();
  }
});
