/**
 * Compile-readiness: `deno compile` cannot fetch its `denort` base runtime on these machines, so
 * this proves the program needs nothing from the source tree at run time another way — it is
 * bundled (workers included), copied into an empty directory outside the repository, started
 * there with read access to that directory only, and must serve its API and page and stream
 * audio from a virtual device.
 */
import assert from "node:assert/strict";
import { OpusDecoder } from "../ffi/opus.ts";
import { writeAlsaConfig, writeRaw } from "./alsa_devices.ts";
import { channel, dominantFrequency, tempDir, tone } from "./audio_util.ts";
import { sleep } from "./wait.ts";

const repo = new URL("..", import.meta.url).pathname;
function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

Deno.test("the bundled program runs from an empty directory outside the source tree", async () => {
  await using tmp = await tempDir("kvm-audio-bundle-");
  const build = `${tmp.path}/build`;
  const run = `${tmp.path}/run`;
  const audio = `${tmp.path}/audio`;
  await Deno.mkdir(run);
  await Deno.mkdir(audio);

  const bundled = await new Deno.Command(Deno.execPath(), {
    args: [
      "bundle",
      "--quiet",
      "--outdir",
      build,
      "main.ts",
      "lib/pipeline/output_worker.ts",
      "lib/pipeline/input_worker.ts",
    ],
    cwd: repo,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(bundled.success, new TextDecoder().decode(bundled.stderr));
  // Copy the bundle into the empty run directory.
  const copy = await new Deno.Command("cp", { args: ["-r", `${build}/.`, run] }).output();
  assert.ok(copy.success);
  for (const f of ["main.js", "lib/pipeline/output_worker.js", "lib/pipeline/input_worker.js"]) {
    assert.ok((await Deno.stat(`${run}/${f}`)).isFile, f);
  }

  await writeRaw(
    `${audio}/in.raw`,
    tone({ freq: 660, channels: 2, frames: 48000 * 30, amplitude: 0.4 }),
  );
  const cfg = await writeAlsaConfig(audio, {
    kvm_b_capture: { type: "file", infile: `${audio}/in.raw` },
    kvm_b_playback: { type: "file", outfile: `${audio}/out.raw` },
  });
  const port = freePort();
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-ffi",
      `--allow-read=${run}`,
      `--allow-write=${audio}`,
      "--allow-env",
      "--allow-net=127.0.0.1",
      "--allow-sys",
      `${run}/main.js`,
      "--listen",
      `127.0.0.1:${port}`,
      "--capture",
      "kvm_b_capture",
      "--playback",
      "kvm_b_playback",
      "--pace",
      "clock",
      "--state-file",
      "none",
    ],
    cwd: run,
    env: { ...cfg.env, NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const logs: string[] = [];
  const drain = async (s: ReadableStream<Uint8Array>) => {
    for await (const c of s.pipeThrough(new TextDecoderStream())) logs.push(c);
  };
  const drained = Promise.all([drain(child.stdout), drain(child.stderr)]);
  const base = `http://127.0.0.1:${port}`;
  try {
    let up = false;
    for (let i = 0; i < 200 && !up; i++) {
      try {
        const r = await fetch(`${base}/healthz`);
        await r.body?.cancel();
        up = r.ok;
      } catch {
        await sleep(100);
      }
    }
    assert.ok(up, `the API answered; logs:\n${logs.join("")}`);

    const page = await fetch(`${base}/`);
    assert.equal(page.status, 200);
    assert.match(await page.text(), /kvm-audio/i);

    const status = await (await fetch(`${base}/api/audio`)).json();
    assert.equal(status.device, "kvm_b_capture");

    // Listen over the WebSocket and decode the tone.
    const ws = new WebSocket(`ws://127.0.0.1:${port}/api/audio/stream`);
    ws.binaryType = "arraybuffer";
    const packets: Uint8Array[] = [];
    let hello: Record<string, unknown> | null = null;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no audio over the WebSocket")), 15000);
      ws.onmessage = (e) => {
        if (typeof e.data === "string") hello = JSON.parse(e.data);
        else packets.push(new Uint8Array(e.data).slice(12));
        if (packets.length >= 60) {
          clearTimeout(timer);
          resolve();
        }
      };
      ws.onerror = () => {
        clearTimeout(timer);
        reject(new Error("WebSocket error"));
      };
    });
    ws.close();
    assert.equal(hello!["type"], "hello");
    using dec = OpusDecoder.create({ channels: 2 });
    const pcm = new Int16Array(packets.length * 960 * 2);
    let off = 0;
    for (const p of packets) off += dec.decode(p, pcm.subarray(off), 960) * 2;
    const left = channel(pcm.subarray(0, off), 2).subarray(9600);
    assert.ok(Math.abs(dominantFrequency(left, 48000) - 660) < 7);
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await drained;
  }
});
