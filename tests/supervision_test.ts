import assert from "node:assert/strict";
import { configure, type LogRecord, reset } from "@logtape/logtape";
import { OpusDecoder } from "../ffi/opus.ts";
import { CONTROL, FAULT } from "../lib/pipeline/messages.ts";
import { AudioService } from "../lib/service.ts";
import { readControlState, writeControlState } from "../lib/state_file.ts";
import { SELF_CONTAINED_ALSA, useAlsaConfig, writeAlsaConfig, writeRaw } from "./alsa_devices.ts";
import { killStreams, startPulse } from "./pulse.ts";
import { channel, dominantFrequency, rmsDb, tempDir, tone } from "./audio_util.ts";
import { sleep, until as waitUntil } from "./wait.ts";

/** {@link waitUntil} for 8 s unless told. */
const until = (what: string, cond: () => boolean, ms = 8000) => waitUntil(what, cond, ms);

/** Open descriptors of this process that point into `dir` (the virtual device's files). */
async function deviceFds(dir: string): Promise<number> {
  const out = await new Deno.Command("ls", { args: ["-l", `/proc/${Deno.pid}/fd`] }).output();
  return new TextDecoder().decode(out.stdout).split("\n").filter((l) => l.includes(dir)).length;
}
/** Threads of this process (read by `ls`, as {@link openFds}). */
async function threadCount(): Promise<number> {
  const out = await new Deno.Command("ls", { args: [`/proc/${Deno.pid}/task`] }).output();
  return new TextDecoder().decode(out.stdout).split("\n").filter(Boolean).length;
}

/** Open descriptors of this process (read by `ls`: Deno guards /proc/self behind --allow-all). */
async function openFds(): Promise<number> {
  const out = await new Deno.Command("ls", { args: [`/proc/${Deno.pid}/fd`] }).output();
  return new TextDecoder().decode(out.stdout).split("\n").filter(Boolean).length;
}

async function outputService(dir: string, opts: { breaker?: number; rate?: number } = {}) {
  await writeRaw(
    `${dir}/in.raw`,
    tone({ freq: 800, channels: 2, frames: 48000 * 60, amplitude: 0.4 }),
  );
  const cfg = await writeAlsaConfig(dir, {
    kvm_test_capture: { type: "file", infile: `${dir}/in.raw` },
  });
  const restore = useAlsaConfig(cfg);
  const service = new AudioService({
    capture: "kvm_test_capture",
    playback: null,
    ...(opts.rate !== undefined ? { captureRate: opts.rate } : {}),
    pace: "clock",
    allowFaults: true,
    supervisor: {
      stallMs: 400,
      graceMs: 200,
      backoff: { initialMs: 200, maxMs: 400 },
      breaker: { maxCrashes: opts.breaker ?? 5, windowMs: 60_000 },
    },
  });
  return { service, restore };
}

Deno.test("a crashed output worker is restarted and audio resumes; the control state survives", async () => {
  await using dir = await tempDir();
  const { service, restore } = await outputService(dir.path);
  using _ = restore;
  const packets: { seq: number; data: Uint8Array; timestamp: number; capturedAt: number }[] = [];
  service.subscribe((f) =>
    packets.push({
      seq: f.seq,
      data: f.data.slice(),
      timestamp: f.timestamp,
      capturedAt: f.capturedAt,
    })
  );
  service.setOutputPreset("medium");
  service.start();
  await until("first packets", () => packets.length > 20);
  const fdsRunning = await openFds();

  Atomics.store(service.controlBlock("output")!, CONTROL.fault, FAULT.throw);
  await until("a restart", () => (service.outputStatus().supervisor?.restarts ?? 0) >= 1);
  const before = packets.length;
  await until("audio after the restart", () => packets.length > before + 25);
  const st = service.outputStatus();
  assert.equal(st.supervisor?.lastExit, "crash");
  assert.match(st.supervisor?.lastError ?? "", /Injected fault/);
  assert.equal(st.preset, "medium");
  assert.equal(
    service.appliedOutputPreset,
    "medium",
    "the new incarnation applied the saved preset",
  );
  // The sequence continues across the restart (no reuse of numbers).
  for (let i = 1; i < packets.length; i++) assert.ok(packets[i]!.seq > packets[i - 1]!.seq);
  // The RTP timestamp follows the capture clock over the restart: it jumps by the time capture
  // missed (to a frame), so receivers see the gap instead of audio running late by it.
  let at = 1;
  for (let i = 2; i < packets.length; i++) {
    const gap = (k: number) => packets[k]!.capturedAt - packets[k - 1]!.capturedAt;
    if (gap(i) > gap(at)) at = i;
  }
  const first = packets[at]!, last = packets[at - 1]!;
  const jump = (first.timestamp - last.timestamp) >>> 0;
  const elapsed = Math.round((first.capturedAt - last.capturedAt) * 48);
  assert.ok(elapsed > 5 * 960, `capture missed ${elapsed} samples`);
  assert.ok(Math.abs(jump - elapsed) <= 960, `timestamp moved ${jump} for ${elapsed} samples`);
  assert.equal(jump % 960, 0, "by whole frames");
  // The audio after the restart is the tone.
  using dec = OpusDecoder.create({ channels: 2 });
  const pcm = new Int16Array(960 * 2 * 20);
  const tail = packets.slice(-20);
  tail.forEach((p, i) => dec.decode(p.data, pcm.subarray(i * 1920), 960));
  assert.ok(Math.abs(dominantFrequency(channel(pcm, 2).subarray(1920), 48000) - 800) < 10);
  await service.close();
  assert.ok(await openFds() <= fdsRunning, "no descriptors leaked by the crash");
});

Deno.test("a stalled output worker is terminated, its device, encoder and resampler freed, and restarted", async () => {
  await using dir = await tempDir();
  // At 44.1 kHz the worker also holds a resampler.
  const { service, restore } = await outputService(dir.path, { rate: 44100 });
  using _ = restore;
  let count = 0;
  service.subscribe(() => count++);
  service.start();
  await until("first packets", () => count > 10);
  for (let i = 0; i < 3; i++) {
    const restarts = service.outputStatus().supervisor?.restarts ?? 0;
    Atomics.store(service.controlBlock("output")!, CONTROL.fault, FAULT.stall);
    await until(
      "a stall restart",
      () => (service.outputStatus().supervisor?.restarts ?? 0) > restarts,
    );
    assert.equal(service.outputStatus().supervisor?.lastExit, "stall");
    const c = count;
    await until("audio after the stall", () => count > c + 10);
    // The terminated worker's PCM (its open input file) was closed through its orphan token,
    // and its encoder and resampler freed through theirs.
    await sleep(300);
    assert.equal(await deviceFds(dir.path), 1, "only the running incarnation holds the device");
    assert.deepEqual(service.orphansReleased("output"), {
      pcm: i + 1,
      codec: i + 1,
      resampler: i + 1,
    });
  }
  assert.equal(service.outputStatus().obtained?.rate, 44100, "the device ran at 44.1 kHz");
  await service.close();
  await sleep(300);
  assert.equal(await deviceFds(dir.path), 0);
  // (Deno itself keeps a few event-loop descriptors per terminated worker; not ours to close.)
});

Deno.test("a stalled output worker stopped and started again at once: what it held is freed", async () => {
  await using dir = await tempDir();
  const { service, restore } = await outputService(dir.path, { rate: 44100 });
  using _ = restore;
  let count = 0;
  service.subscribe(() => count++);
  service.start();
  await until("first packets", () => count > 10);
  Atomics.store(service.controlBlock("output")!, CONTROL.fault, FAULT.stall);
  await sleep(50);
  // An operator's stop (the stalled worker is terminated after the grace period) and start at
  // once: the new worker starts within the 150 ms before the old one's objects are freed.
  await service.stopOutput();
  service.startOutput();
  const c = count;
  await until("audio after the start", () => count > c + 10);
  await sleep(300);
  assert.deepEqual(service.orphansReleased("output"), { pcm: 1, codec: 1, resampler: 1 });
  assert.equal(await deviceFds(dir.path), 1, "only the running incarnation holds the device");
  await service.close();
  await sleep(300);
  assert.equal(await deviceFds(dir.path), 0);
});

Deno.test("a worker stalled inside a C call is replaced; when the call returns it stops, and what it held is freed once", async () => {
  await using dir = await tempDir();
  const { service, restore } = await outputService(dir.path, { rate: 44100 });
  using _ = restore;
  const seqs: number[] = [];
  service.subscribe((f) => seqs.push(f.seq));
  service.start();
  await until("first packets", () => seqs.length > 10);
  const threads0 = await threadCount();
  // 3 s inside a C call without a heartbeat (a sound server hanging in snd_pcm_open):
  // terminate() cannot stop it, so the old worker is still there when its successor starts.
  Atomics.store(service.controlBlock("output")!, CONTROL.fault, FAULT.block);
  await until("a stall restart", () => (service.outputStatus().supervisor?.restarts ?? 0) >= 1);
  const c = seqs.length;
  await until("audio from the successor", () => seqs.length > c + 10);
  assert.deepEqual(
    service.orphansReleased("output"),
    { pcm: 0, codec: 0, resampler: 0 },
    "nothing freed while the old worker may still use it",
  );
  // A preset change now is the successor's to apply — once (the old worker, when its call
  // returned, applied it too and counted a second rebuild).
  assert.equal(service.setOutputPreset("low"), "rebuilt");
  // The call returns after 3 s: the old worker finds itself retired and stops; what it held is
  // freed then, once (before, it was freed at 150 ms and again by the worker: a double free).
  await until("the old worker's objects freed", () => {
    return service.orphansReleased("output")?.codec === 1;
  }, 6000);
  await sleep(300);
  assert.deepEqual(service.orphansReleased("output"), { pcm: 1, codec: 1, resampler: 1 });
  assert.deepEqual(service.outputPresetChanges, { live: 0, rebuilt: 1 });
  assert.equal(service.appliedOutputPreset, "low");
  assert.equal(await deviceFds(dir.path), 1, "only the running incarnation holds the device");
  assert.ok(await threadCount() <= threads0, "the old worker's thread ended");
  // Nothing of the old worker reached the ring: the successor's numbering only goes up.
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i]! > seqs[i - 1]!, `seq ${seqs[i]}`);
  await service.close();
  await sleep(300);
  assert.equal(await deviceFds(dir.path), 0);
});

Deno.test("a stalled input worker is terminated, its device and decoder freed, and restarted", async () => {
  await using dir = await tempDir();
  const cfg = await writeAlsaConfig(dir.path, {
    kvm_test_playback: { type: "file", outfile: `${dir.path}/out.raw` },
  });
  using _ = useAlsaConfig(cfg);
  const service = new AudioService({
    capture: null,
    playback: "kvm_test_playback",
    pace: "clock",
    allowFaults: true,
    metricsIntervalMs: 50,
    supervisor: { stallMs: 400, graceMs: 200, backoff: { initialMs: 200, maxMs: 400 } },
  });
  const played = () =>
    service.metrics.toJSON().counters["kvm_audio_input_frames_played_total"] as number ?? 0;
  try {
    service.start();
    await until("playing", () => played() > 10);
    Atomics.store(service.controlBlock("input")!, CONTROL.fault, FAULT.stall);
    await until(
      "a stall restart",
      () => (service.microphoneStatus().supervisor?.restarts ?? 0) > 0,
    );
    assert.equal(service.microphoneStatus().supervisor?.lastExit, "stall");
    await sleep(300);
    assert.equal(await deviceFds(dir.path), 1, "only the running incarnation holds the device");
    // 48 kHz: no resampler to free.
    assert.deepEqual(service.orphansReleased("input"), { pcm: 1, codec: 1, resampler: 0 });
    const p = played();
    await until("playing after the restart", () => played() > p + 10);
  } finally {
    await service.close();
  }
  await sleep(300);
  assert.equal(await deviceFds(dir.path), 0);
});

Deno.test("repeated crashes open the breaker and the status says so", async () => {
  await using dir = await tempDir();
  const { service, restore } = await outputService(dir.path, { breaker: 3 });
  using _ = restore;
  service.start();
  for (let i = 0; i < 3; i++) {
    await until("running", () => service.outputStatus().state === "running");
    await sleep(100);
    Atomics.store(service.controlBlock("output")!, CONTROL.fault, FAULT.throw);
    await until("crash seen", () => (service.outputStatus().supervisor?.crashes ?? 0) > i);
  }
  await until("broken", () => service.outputStatus().state === "broken");
  const st = service.outputStatus();
  assert.equal(st.supervisor?.breakerOpen, true);
  assert.equal(st.running, false);
  await sleep(600);
  assert.equal(service.outputStatus().state, "broken", "no restart while the breaker is open");
  service.supervisors.output!.resetBreaker();
  await until("running again", () => service.outputStatus().state === "running");
  await service.close();
});

Deno.test("a missing device leaves the service up, waiting and retrying", async () => {
  await using service = new AudioService({
    capture: "kvm_no_such_device",
    playback: null,
    supervisor: { stallMs: 2000 },
  });
  service.start();
  await until("a device error", () => service.outputStatus().lastDeviceError !== null);
  assert.match(service.outputStatus().lastDeviceError!, /kvm_no_such_device/);
  await sleep(700);
  const st = service.outputStatus();
  assert.equal(st.supervisor?.workerState, "waiting-for-device");
  assert.equal(st.supervisor?.crashes, 0, "a missing device is not a crash");
  // The status says so (it said "running").
  assert.equal(st.state, "waiting-for-device");
  assert.equal(st.running, false);
});

Deno.test("control state is saved atomically and restored by a new service", async () => {
  await using dir = await tempDir();
  // Braces in the path: LogTape must not read them as a placeholder in the start-up log.
  await Deno.mkdir(`${dir.path}/{x}`);
  const stateFile = `${dir.path}/{x}/state.json`;
  {
    // The output is stopped by the operator; the microphone is disabled by a flag.
    await using a = new AudioService({ capture: "kvm_never_opened", playback: null, stateFile });
    assert.throws(() => a.setOutputPreset("loud"), RangeError);
    a.setOutputPreset("ultra");
    a.setMicrophonePreset("low");
    a.setMuted(true);
    await a.stopOutput();
  }
  const saved = JSON.parse(await Deno.readTextFile(stateFile));
  assert.equal(saved.outputPreset, "ultra");
  assert.equal(saved.outputRunning, false);
  assert.equal(saved.microphoneRunning, true, "a disabled pipeline was not stopped by anyone");
  const records: LogRecord[] = [];
  await configure({
    sinks: { memory: (r: LogRecord) => records.push(r) },
    loggers: [
      { category: ["kvm-audio", "service"], lowestLevel: "info", sinks: ["memory"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: [] },
    ],
    reset: true,
  });
  try {
    // A capture device now (never started here): the saved state says the output was stopped.
    await using b = new AudioService({
      capture: "kvm_never_opened",
      playback: null,
      stateFile,
      outputPreset: "low",
    });
    assert.equal(b.outputPreset.name, "ultra", "the saved state wins over start-up flags");
    assert.equal(b.microphonePreset.name, "low");
    assert.equal(b.muted, true);
    assert.equal(b.controlState.outputRunning, false);
  } finally {
    await reset();
  }
  // The log says what the file decided, and how to undo a stop.
  assert.deepEqual(records.map((r) => r.message.join("")), [
    `Control state from ${stateFile}: output stopped (POST /api/audio/start starts it), ` +
    "preset ultra, muted; microphone disabled, preset low",
  ]);
  await Deno.writeTextFile(stateFile, "{not json");
  await using c = new AudioService({ capture: null, playback: null, stateFile });
  assert.equal(c.outputPreset.name, "high", "a corrupt file falls back to the flags");
  // A directory where the file should be: reported, and the service starts from its flags.
  const warnings: string[] = [];
  assert.equal(readControlState(dir.path, (m) => warnings.push(m)), null);
  assert.match(warnings[0] ?? "", /Cannot read state file ".*": .*[Dd]irectory/);
  // An array, and fields with values this version cannot use: each said, the rest kept.
  warnings.length = 0;
  await Deno.writeTextFile(stateFile, "[]");
  assert.equal(readControlState(stateFile, (m) => warnings.push(m)), null);
  assert.match(warnings[0] ?? "", /expected a JSON object/);
  warnings.length = 0;
  await Deno.writeTextFile(
    stateFile,
    JSON.stringify({ outputPreset: "Ultra", muted: "true", microphonePreset: "low", future: 1 }),
  );
  assert.deepEqual(readControlState(stateFile, (m) => warnings.push(m)), {
    microphonePreset: "low",
  });
  assert.deepEqual(warnings.map((w) => w.replace(/ in state file .*:/, ":")), [
    'Ignoring outputPreset "Ultra": expected one of low, medium, high, ultra',
    'Ignoring muted "true": expected true or false',
  ]);
});

Deno.test("a pipeline disabled by a flag keeps its saved choice and is not started", async () => {
  await using dir = await tempDir();
  const stateFile = `${dir.path}/state.json`;
  writeControlState(stateFile, {
    outputPreset: "high",
    microphonePreset: "high",
    muted: false,
    outputRunning: true,
    microphoneRunning: false,
  });
  {
    // Both disabled (--no-output --no-mic): start() starts nothing and does not throw; a change
    // saved meanwhile keeps what the file said of the pipelines.
    await using a = new AudioService({ capture: null, playback: null, stateFile });
    a.start();
    assert.equal(a.outputStatus().enabled, false);
    a.setMicrophonePreset("low");
  }
  const saved = readControlState(stateFile, (m) => assert.fail(m))!;
  assert.equal(saved.microphonePreset, "low");
  assert.equal(saved.outputRunning, true, "the output runs again once enabled");
  assert.equal(saved.microphoneRunning, false, "the operator's stop stands");
  await using b = new AudioService({ capture: "kvm_never_opened", playback: null, stateFile });
  assert.equal(b.controlState.outputRunning, true);
});

Deno.test({
  name: "devices lost mid-stream are reopened by their workers: no restart, audio resumes",
  // PulseAudio's ALSA plugin is missing under qemu (see alsa_devices.ts).
  ignore: SELF_CONTAINED_ALSA,
  async fn() {
    await using pulse = await startPulse({ toneHz: 440 });
    using _cfg = pulse.use();
    // Device pacing: the workers wait on the PCMs, where a killed stream surfaces as a poll error
    // (before, an AlsaError that crashed the worker and counted towards the breaker).
    const service = new AudioService({
      capture: pulse.pcm.tone,
      playback: pulse.pcm.playback,
      outputPreset: "ultra",
      microphonePreset: "ultra",
      metricsIntervalMs: 50,
    });
    const packets: Uint8Array[] = [];
    service.subscribe((f) => packets.push(f.data.slice()));
    const lost = (pipeline: string) => {
      const c = service.metrics.toJSON().counters["kvm_audio_device_lost_total"] as Record<
        string,
        number
      >;
      return c[`pipeline="${pipeline}"`] ?? 0;
    };
    const played = () =>
      service.metrics.toJSON().counters["kvm_audio_input_frames_played_total"] as number ?? 0;
    try {
      service.start();
      await until(
        "capture and playback running",
        () => packets.length > 50 && played() > 50,
        20_000,
      );
      assert.equal(lost("output"), 0);
      assert.equal(lost("input"), 0);

      assert.ok(await killStreams(pulse, "record") >= 1, "a record stream to kill");
      assert.ok(await killStreams(pulse, "playback") >= 1, "a playback stream to kill");
      // A killed stream surfaces as a poll error (device lost: reopened) or, when it lands in a
      // transfer, as -EPIPE (an xrun: recovered in place). Either way the worker mends it.
      const counter = (name: string) =>
        service.metrics.toJSON().counters[name] as number | undefined ?? 0;
      await until(
        "both losses handled",
        () =>
          lost("output") + counter("kvm_audio_output_xruns_total") >= 1 &&
          lost("input") + counter("kvm_audio_input_xruns_total") >= 1,
        10_000,
      );
      const [sent, heard] = [packets.length, played()];
      await until("audio after the reopen", () => packets.length > sent + 100, 20_000);
      await until("playback after the reopen", () => played() > heard + 100, 20_000);

      // Mended inside the workers: the supervisors saw no crash.
      assert.equal(service.outputStatus().supervisor?.restarts, 0, "output not restarted");
      assert.equal(service.microphoneStatus().supervisor?.restarts, 0, "input not restarted");
      assert.equal(service.outputStatus().running, true);
      // And what comes after the reopen is the tone again.
      using dec = OpusDecoder.create({ channels: 2 });
      const pcm = new Int16Array(480 * 2 * 100);
      packets.slice(-100).forEach((p, i) => dec.decode(p, pcm.subarray(i * 960), 480));
      const left = channel(pcm, 2).subarray(4800);
      assert.ok(
        Math.abs(dominantFrequency(left, 48000) - 440) < 5,
        `the tone after the reopen: ${dominantFrequency(left, 48000)} Hz, ${rmsDb(left)} dB`,
      );
    } finally {
      await service.close();
    }
  },
});
