/**
 * ffi/alsa.ts against the real libasound, on virtual devices only: the `file` plugin (unpaced,
 * sample-exact) and a private PulseAudio (paced like hardware). No sound card needed.
 */

import assert from "node:assert/strict";
import { AlsaError, alsaVersion, Pcm } from "../ffi/alsa.ts";
import {
  readRaw,
  SELF_CONTAINED_ALSA,
  useAlsaConfig,
  writeAlsaConfig,
  writeRaw,
} from "./alsa_devices.ts";
import { channel, dominantFrequency, rmsDb, tempDir, tone } from "./audio_util.ts";
import { startPulse } from "./pulse.ts";
import { sleep } from "./wait.ts";

const RATE = 48000;
const EBADFD = 77;
const ENOENT = 2;
/** Frames judged by frequency and level (0.1 s: enough for a tone, quick to analyse). */
const WINDOW = 4800;

/** Stereo samples that differ at every position, so any shift or drop shows. */
function pattern(frames: number, channels = 2): Int16Array {
  const out = new Int16Array(frames * channels);
  for (let i = 0; i < out.length; i++) out[i] = ((i * 7919) % 65536) - 32768;
  return out;
}

/** Writes all of `src` to a non-blocking playback PCM in uneven chunks. */
function writeAll(pcm: Pcm, src: Int16Array, chunkFrames = 777): void {
  const frames = src.length / pcm.channels;
  let done = 0;
  while (done < frames) {
    const n = Math.min(chunkFrames, frames - done);
    const written = pcm.writei(src.subarray(done * pcm.channels), n);
    done += written;
    if (written === 0) pcm.wait(100);
  }
}

/** Reads exactly `into.length / channels` frames from a capture PCM in uneven chunks. */
function readAll(pcm: Pcm, into: Int16Array, chunkFrames = 555): void {
  const frames = into.length / pcm.channels;
  let done = 0;
  while (done < frames) {
    const n = Math.min(chunkFrames, frames - done);
    const got = pcm.readi(into.subarray(done * pcm.channels), n);
    done += got;
    if (got === 0) pcm.wait(100);
  }
}

Deno.test("alsaVersion reports the loaded libasound", () => {
  assert.match(alsaVersion(), /^\d+\.\d+\.\d+/);
});

Deno.test("Pcm.open rejects bad arguments before reaching libasound", () => {
  // A name that does not exist: had C been reached, an AlsaError would come back instead.
  const name = "kvm_no_such_pcm";
  const ok = { stream: "capture", channels: 2, rate: RATE } as const;
  const cases: [unknown, unknown, typeof TypeError | typeof RangeError][] = [
    ["", ok, RangeError],
    ["a\0b", ok, RangeError],
    [42, ok, TypeError],
    [name, null, TypeError],
    [name, { ...ok, stream: "duplex" }, TypeError],
    [name, { ...ok, channels: 0 }, RangeError],
    [name, { ...ok, channels: 9 }, RangeError],
    [name, { ...ok, channels: 1.5 }, RangeError],
    [name, { ...ok, channels: "2" }, TypeError],
    [name, { ...ok, rate: 7999 }, RangeError],
    [name, { ...ok, rate: 400000 }, RangeError],
    [name, { ...ok, rate: NaN }, RangeError],
    [name, { ...ok, periodFrames: 8 }, RangeError],
    [name, { ...ok, periodFrames: 480, bufferFrames: 959 }, RangeError],
    [name, { ...ok, nonBlocking: "yes" }, TypeError],
  ];
  for (const [n, opts, type] of cases) {
    assert.throws(
      () => Pcm.open(n as string, opts as Parameters<typeof Pcm.open>[1]),
      (e: unknown) => e instanceof type && !(e instanceof AlsaError),
      `Pcm.open(${JSON.stringify(n)}, ${JSON.stringify(opts)})`,
    );
  }
  assert.throws(
    () => Pcm.open(name, { ...ok, channels: 9 }),
    { name: "RangeError", message: /channel count 9.*1 to 8/ },
  );
});

Deno.test("Pcm.open names a missing device in its AlsaError", async () => {
  await using dir = await tempDir();
  using _ = useAlsaConfig(await writeAlsaConfig(dir.path, {}));
  for (const name of ["hw:9,0", "kvm_no_such_pcm"]) {
    assert.throws(
      () => Pcm.open(name, { stream: "capture", channels: 2, rate: RATE }),
      (e: unknown) => {
        assert.ok(e instanceof AlsaError);
        assert.equal(e.name, "AlsaError");
        assert.equal(e.fn, "snd_pcm_open");
        assert.equal(e.device, name);
        assert.equal(e.code, -ENOENT);
        assert.ok(e.message.includes(`"${name}"`), e.message);
        assert.ok(e.message.includes("No such file or directory"), e.message);
        return true;
      },
    );
  }
});

Deno.test("A file PCM plays a buffer back sample-exactly", async () => {
  await using dir = await tempDir();
  const out = `${dir.path}/out.raw`;
  using _ = useAlsaConfig(await writeAlsaConfig(dir.path, {}));
  const src = pattern(RATE + 123);
  {
    using pcm = Pcm.open(`file:FILE=${out},FORMAT=raw`, {
      stream: "playback",
      channels: 2,
      rate: RATE,
      periodFrames: 480,
      bufferFrames: 1920,
    });
    assert.equal(pcm.stream, "playback");
    assert.equal(pcm.channels, 2);
    assert.equal(pcm.rate, RATE);
    assert.equal(pcm.periodFrames, 480);
    assert.equal(pcm.bufferFrames, 1920);
    assert.equal(pcm.state(), "prepared");
    writeAll(pcm, src);
    assert.equal(pcm.state(), "running");
  }
  assert.deepEqual(await readRaw(out), src);
});

Deno.test("A file PCM with an infile captures the file sample-exactly", async () => {
  await using dir = await tempDir();
  const frames = RATE / 2 + 77;
  const src = pattern(frames);
  await writeRaw(`${dir.path}/in.raw`, src);
  using _ = useAlsaConfig(
    await writeAlsaConfig(dir.path, { kvm_in: { type: "file", infile: `${dir.path}/in.raw` } }),
  );
  using pcm = Pcm.open("kvm_in", { stream: "capture", channels: 2, rate: RATE });
  const got = new Int16Array(src.length);
  readAll(pcm, got);
  assert.deepEqual(got, src);

  // Past the end of the file libasound still reports full reads but leaves the buffer as it was
  // (TESTING.md): callers must stop at the file's length.
  const past = new Int16Array(200).fill(1234);
  let n = 0;
  while (n === 0) n = pcm.readi(past);
  assert.ok(n > 0);
  assert.ok(past.every((v) => v === 1234));
});

Deno.test("readi and writei work in place on SharedArrayBuffer views", async () => {
  await using dir = await tempDir();
  const src = pattern(4800, 1);
  await writeRaw(`${dir.path}/in.raw`, src);
  using _ = useAlsaConfig(
    await writeAlsaConfig(dir.path, {
      kvm_in: { type: "file", infile: `${dir.path}/in.raw` },
      kvm_out: { type: "file", outfile: `${dir.path}/out.raw` },
    }),
  );
  const sab = new SharedArrayBuffer(2 * (src.length + 16));
  const slot = new Int16Array(sab, 2 * 8, src.length); // an offset view, like a ring slot
  {
    using cap = Pcm.open("kvm_in", { stream: "capture", channels: 1, rate: RATE });
    readAll(cap, slot);
  }
  assert.deepEqual(new Int16Array(sab, 0, 8), new Int16Array(8)); // nothing written before it
  assert.deepEqual(slot.slice(), src);
  {
    using play = Pcm.open("kvm_out", { stream: "playback", channels: 1, rate: RATE });
    writeAll(play, slot);
  }
  assert.deepEqual(await readRaw(`${dir.path}/out.raw`), src);
});

Deno.test("Transfers check the buffer, the frame count and the direction", async () => {
  await using dir = await tempDir();
  using _ = useAlsaConfig(
    await writeAlsaConfig(dir.path, { kvm_out: { type: "file", outfile: `${dir.path}/o.raw` } }),
  );
  using pcm = Pcm.open("kvm_out", { stream: "playback", channels: 2, rate: RATE });
  const buf = new Int16Array(100);
  assert.throws(() => pcm.writei(new Float32Array(100) as unknown as Int16Array), TypeError);
  assert.throws(() => pcm.writei(buf, 51), { name: "RangeError", message: /51.*holds 50/ });
  assert.throws(() => pcm.writei(buf, -1), RangeError);
  assert.throws(() => pcm.writei(buf, 1.5), RangeError);
  assert.throws(() => pcm.writei(buf, "1" as unknown as number), TypeError);
  assert.throws(() => pcm.readi(buf), { name: "TypeError", message: /opened for playback/ });
  assert.throws(() => pcm.wait(-1), RangeError);
  assert.equal(pcm.writei(buf, 0), 0);
  assert.equal(pcm.writei(buf), 50);
});

Deno.test("close is idempotent, a closed PCM refuses calls, and using closes it", async () => {
  await using dir = await tempDir();
  using _ = useAlsaConfig(
    await writeAlsaConfig(dir.path, { kvm_out: { type: "file", outfile: `${dir.path}/o.raw` } }),
  );
  let kept: Pcm | undefined;
  {
    using pcm = Pcm.open("kvm_out", { stream: "playback", channels: 1, rate: RATE });
    kept = pcm;
    assert.equal(pcm.closed, false);
  }
  assert.equal(kept.closed, true);
  kept.close();
  kept.close();
  assert.throws(() => kept.writei(new Int16Array(10)), (e: unknown) => {
    assert.ok(e instanceof AlsaError);
    assert.equal(e.code, -EBADFD);
    assert.equal(e.fn, "snd_pcm_writei");
    assert.match(e.message, /"kvm_out".*closed/);
    return true;
  });
  assert.throws(() => kept.state(), AlsaError);
});

Deno.test("drain stops a file PCM after its frames, prepare makes it usable again", async () => {
  await using dir = await tempDir();
  const out = `${dir.path}/o.raw`;
  using _ = useAlsaConfig(
    await writeAlsaConfig(dir.path, { kvm_out: { type: "file", outfile: out } }),
  );
  const src = pattern(3000, 1);
  {
    using pcm = Pcm.open("kvm_out", { stream: "playback", channels: 1, rate: RATE });
    writeAll(pcm, src);
    assert.equal(pcm.drain(), true);
    assert.equal(pcm.state(), "setup");
    pcm.prepare();
    assert.equal(pcm.state(), "prepared");
    writeAll(pcm, src);
  }
  {
    // A blocking PCM drains the same bounded way and stays blocking.
    using pcm = Pcm.open("kvm_out", {
      stream: "playback",
      channels: 1,
      rate: RATE,
      nonBlocking: false,
    });
    assert.equal(pcm.nonBlocking, false);
    assert.equal(pcm.writei(src), src.length);
    assert.equal(pcm.drain(), true);
    assert.equal(pcm.state(), "setup");
  }
  const got = await readRaw(out);
  assert.deepEqual(got, src); // the third PCM truncated the file and wrote src once
});

Deno.test("A change of ALSA_CONFIG_PATH is picked up at the next open", async () => {
  await using dir = await tempDir();
  const a = await writeAlsaConfig(dir.path, { kvm_a: { type: "file", outfile: `${dir.path}/a` } });
  const b = await writeAlsaConfig(dir.path, { kvm_b: { type: "file", outfile: `${dir.path}/b` } });
  const opts = { stream: "playback", channels: 1, rate: RATE } as const;
  {
    using _ = useAlsaConfig(a);
    using pa = Pcm.open("kvm_a", opts);
    using _b = useAlsaConfig(b);
    assert.throws(() => Pcm.open("kvm_a", opts), AlsaError);
    using pb = Pcm.open("kvm_b", opts);
    // The PCM opened under the first configuration keeps working.
    assert.equal(pa.writei(new Int16Array(100).fill(1)), 100);
    assert.equal(pb.writei(new Int16Array(100).fill(2)), 100);
  }
  assert.deepEqual(await readRaw(`${dir.path}/a`), new Int16Array(100).fill(1));
  assert.deepEqual(await readRaw(`${dir.path}/b`), new Int16Array(100).fill(2));
});

Deno.test({
  name: "Through a private PulseAudio, PCMs are paced like hardware",
  // No PulseAudio ALSA plugin under qemu on aarch64 (see alsa_devices.ts).
  ignore: SELF_CONTAINED_ALSA,
  async fn(t) {
    await using dir = await tempDir();
    const infile = `${dir.path}/paced-in.raw`;
    const paced = pattern(RATE / 2, 2);
    await writeRaw(infile, paced);
    await using pulse = await startPulse({
      toneHz: 440,
      extraPcms: { kvm_paced_file: { type: "file", infile, slave: "kvm_capture" } },
    });
    using _ = pulse.use();

    await t.step("capture of one second takes about one second of wall time", () => {
      using pcm = Pcm.open(pulse.pcm.capture, { stream: "capture", channels: 2, rate: RATE });
      const buf = new Int16Array(RATE * 2);
      const t0 = performance.now();
      readAll(pcm, buf, 960);
      const elapsed = performance.now() - t0;
      // A behaviour check (unpaced capture takes milliseconds), not a speed check.
      assert.ok(elapsed >= 800, `1 s of capture took only ${elapsed.toFixed(0)} ms`);
      assert.ok(rmsDb(channel(buf, 2)) < -90, "the null source should be silent");
    });

    await t.step("wait returns false within its timeout when no period is ready", () => {
      // A long period: the first one cannot be complete 50 ms after the start.
      using pcm = Pcm.open(pulse.pcm.capture, {
        stream: "capture",
        channels: 2,
        rate: RATE,
        periodFrames: RATE / 2,
        bufferFrames: RATE,
      });
      assert.ok(pcm.periodFrames >= RATE / 10, `period ${pcm.periodFrames}`);
      const t0 = performance.now();
      const ready = pcm.wait(50);
      const elapsed = performance.now() - t0;
      assert.equal(ready, false);
      assert.equal(pcm.state(), "running"); // wait started the prepared capture
      // Wide margin: this checks that the timeout bounds the call, not how fast it is.
      assert.ok(elapsed < 1000, `wait(50) took ${elapsed.toFixed(0)} ms`);
    });

    await t.step(
      "wait polls about once per period: the plugin's early wake-ups do not spin",
      () => {
        // PulseAudio's plugin keeps its descriptor readable while less than a period is there; a
        // wait that polled again at once made ~20 polls per 10 ms period (strace of the service).
        using pcm = Pcm.open(pulse.pcm.tone, {
          stream: "capture",
          channels: 2,
          rate: RATE,
          periodFrames: RATE / 100,
          bufferFrames: (RATE / 100) * 8,
        });
        const buf = new Int16Array(pcm.periodFrames * 2);
        let periods = 0;
        const t0 = performance.now();
        while (performance.now() - t0 < 2000) {
          if (pcm.wait(100) && pcm.readi(buf, pcm.periodFrames) > 0) periods++;
        }
        const seconds = (performance.now() - t0) / 1000;
        // PulseAudio's source takes up to ~2 s to deliver steadily after its first open; early
        // wake-ups then sleep the missing frames' time (≤ ~100 polls/s). Spinning made thousands.
        assert.ok(periods >= 20, `only ${periods} periods read in ${seconds.toFixed(1)} s`);
        assert.ok(
          pcm.polls <= 2 * periods + 150 * seconds,
          `${pcm.polls} polls for ${periods} periods in ${
            seconds.toFixed(1)
          } s (${pcm.spuriousWakeups} early wake-ups)`,
        );
      },
    );

    await t.step("the tone PCM carries the tone, with wall-clock timestamps", () => {
      using pcm = Pcm.open(pulse.pcm.tone, { stream: "capture", channels: 1, rate: RATE });
      const buf = new Int16Array(RATE);
      readAll(pcm, buf, 960);
      const last = channel(buf.subarray(RATE - WINDOW), 1);
      assert.ok(Math.abs(dominantFrequency(last, RATE) - 440) < 2);
      assert.ok(rmsDb(last) > -20, `tone level ${rmsDb(last).toFixed(1)} dBFS`);
      const ts = pcm.htimestamp();
      assert.ok(ts.avail >= 0);
      assert.ok(Math.abs(ts.epochMs - Date.now()) < 60_000, `timestamp ${ts.epochMs}`);
    });

    await t.step("playback to the sink is heard on its monitor", () => {
      using mon = Pcm.open(pulse.pcm.monitor, { stream: "capture", channels: 2, rate: RATE });
      using play = Pcm.open(pulse.pcm.playback, { stream: "playback", channels: 2, rate: RATE });
      const sine = tone({ freq: 1000, rate: RATE, channels: 2, frames: RATE, amplitude: 0.5 });
      const level = rmsDb(channel(sine, 2));
      const limit = RATE * 20; // frames: the start-up stall is 1-2 s
      const heard = new Int16Array(limit * 2);
      let played = 0, got = 0, loud = false;
      mon.start();
      // One thread serves both non-blocking PCMs until the monitor has carried the tone for a
      // whole analysis window.
      while (!loud && got < limit) {
        const at = played % RATE;
        const w = play.writei(sine.subarray(at * 2), RATE - at);
        played += w;
        const r = mon.readi(heard.subarray(got * 2), Math.min(960, limit - got));
        got += r;
        if (r > 0 && got >= WINDOW) {
          loud = rmsDb(channel(heard.subarray((got - WINDOW) * 2, got * 2), 2)) > level - 3;
        }
        if (w === 0 && r === 0) mon.wait(20);
      }
      assert.ok(loud, `nothing heard on the monitor in ${limit / RATE} s`);
      const tail = channel(heard.subarray((got - WINDOW) * 2, got * 2), 2);
      assert.ok(Math.abs(dominantFrequency(tail, RATE) - 1000) < 5);
      assert.ok(Math.abs(rmsDb(tail) - level) < 3, `${rmsDb(tail)} dBFS`);
      assert.equal(play.drain(), true);
      assert.equal(play.state(), "setup");
    });

    await t.step("drain gives up at its deadline and drops the rest", () => {
      using play = Pcm.open(pulse.pcm.playback, {
        stream: "playback",
        channels: 2,
        rate: RATE,
        periodFrames: 960,
        bufferFrames: 9600,
      });
      const buf = new Int16Array(play.bufferFrames * 2);
      let queued = 0;
      while (queued < play.bufferFrames) {
        const w = play.writei(buf, play.bufferFrames - queued);
        queued += w;
        if (w === 0) break;
      }
      assert.ok(play.delay() > RATE / 20, `only ${play.delay()} frames queued`);
      assert.equal(play.drain(0), false); // 0.2 s of audio cannot play out in 0 ms
      assert.equal(play.state(), "setup");
    });

    await t.step("a playback underrun is recovered and counted", async () => {
      using play = Pcm.open(pulse.pcm.playback, { stream: "playback", channels: 2, rate: RATE });
      const buf = new Int16Array(play.periodFrames * 2 * 2);
      while (play.state() !== "running") if (play.writei(buf) === 0) play.wait(20);
      const deadline = Date.now() + 15_000;
      while (play.xruns === 0 && Date.now() < deadline) {
        await sleep(100);
        play.avail(); // reports the underrun (recovered inside)
      }
      assert.ok(play.xruns >= 1, "no underrun after 15 s without writing");
      assert.ok(play.writei(buf) > 0, "writes go on after the recovery");
    });

    await t.step("a file PCM slaved to the source serves its infile, paced", () => {
      using pcm = Pcm.open("kvm_paced_file", { stream: "capture", channels: 2, rate: RATE });
      const got = new Int16Array(paced.length);
      const t0 = performance.now();
      readAll(pcm, got, 960);
      const elapsed = performance.now() - t0;
      assert.deepEqual(got, paced);
      assert.ok(elapsed >= 400, `0.5 s of capture took only ${elapsed.toFixed(0)} ms`);
    });

    await t.step("a child process sees the PCMs through pulse.env", async () => {
      const out = `${dir.path}/arecord.raw`;
      const res = await new Deno.Command("arecord", {
        args: ["-q", "-D", pulse.pcm.tone, "-f", "S16_LE", "-r", `${RATE}`, "-c", "1"]
          .concat(["-s", `${RATE / 4}`, "-t", "raw", out]),
        env: pulse.env,
        stdout: "null",
        stderr: "piped",
      }).output();
      assert.ok(res.success, new TextDecoder().decode(res.stderr));
      assert.equal((await Deno.stat(out)).size, RATE / 4 * 2);
    });

    const pid = pulse.pid;
    await pulse[Symbol.asyncDispose]();
    // The server is gone: its pid no longer names a running pulseaudio.
    const cmdline = await Deno.readTextFile(`/proc/${pid}/cmdline`).catch(() => "");
    assert.ok(!cmdline.includes("pulseaudio"));
  },
});

Deno.test("scripts/virtual-audio.sh starts once, serves a paced tone and stops", {
  ignore: SELF_CONTAINED_ALSA, // no PulseAudio ALSA plugin under qemu on aarch64
}, async () => {
  await using dir = await tempDir("kvm-va-");
  const script = new URL("../scripts/virtual-audio.sh", import.meta.url).pathname;
  const run = async (cmd: string) => {
    const out = await new Deno.Command("bash", {
      args: [script, cmd, dir.path],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    return {
      code: out.code,
      stdout: new TextDecoder().decode(out.stdout),
      stderr: new TextDecoder().decode(out.stderr),
    };
  };
  try {
    const first = await run("start");
    assert.equal(first.code, 0, first.stderr);
    assert.match(
      first.stdout,
      new RegExp(`^export ALSA_CONFIG_PATH=${dir.path}/asound.conf$`, "m"),
    );
    const pid = (await Deno.readTextFile(`${dir.path}/pulse.pid`)).trim();
    const again = await run("start"); // idempotent: the same server
    assert.equal(again.code, 0, again.stderr);
    assert.equal((await Deno.readTextFile(`${dir.path}/pulse.pid`)).trim(), pid);
    assert.equal((await run("status")).code, 0);

    using _ = useAlsaConfig({
      file: `${dir.path}/asound.conf`,
      configPath: `${dir.path}/asound.conf`,
      env: { ALSA_CONFIG_PATH: `${dir.path}/asound.conf` },
      names: ["kvm_capture", "kvm_playback"],
    });
    using cap = Pcm.open("kvm_capture", { stream: "capture", channels: 1, rate: RATE });
    using play = Pcm.open("kvm_playback", { stream: "playback", channels: 2, rate: RATE });
    assert.equal(play.rate, RATE);
    const buf = new Int16Array(RATE);
    readAll(cap, buf, 960);
    assert.ok(Math.abs(dominantFrequency(channel(buf.subarray(RATE - WINDOW), 1), RATE) - 440) < 2);
    cap.close();
    play.close();

    assert.equal((await run("stop")).code, 0);
    assert.equal((await run("stop")).code, 0); // idempotent
    assert.notEqual((await run("status")).code, 0);
    const cmdline = await Deno.readTextFile(`/proc/${pid}/cmdline`).catch(() => "");
    assert.ok(!cmdline.includes("pulseaudio"));
  } finally {
    await run("stop");
  }
});
