/**
 * The operator's page in headless Chromium (Debian `chromium`, driven by playwright-core) against
 * a real AudioService on virtual file PCMs, served by the real app on 127.0.0.1:
 *
 * - capture: a file PCM playing a 440 Hz tone, paced by the clock → the page listens, decodes with
 *   WebCodecs and reports (through `window.kvmAudio.stats()`) the dominant frequency and level of
 *   the last second it decoded;
 * - playback: a file PCM the test reads back → the page talks with Chromium's fake microphone
 *   (a 523 Hz WAV) and the playback file must hold 523 Hz;
 * - the page's clear messages when WebCodecs is missing and when the microphone is refused.
 *
 * Skipped (ignored) when /usr/bin/chromium is not installed.
 *
 * @module
 */

import assert from "node:assert/strict";
import fs from "node:fs";
// Imported here, not mapped in deno.json: `deno compile` embeds every package deno.json maps, and
// this one (13 MB) is only for this test.
// deno-lint-ignore no-import-prefix
import type { BrowserContext, Page, Route } from "npm:playwright-core@1.65.1";
import { AudioService } from "../lib/service.ts";
import { createApp } from "../routes/app.ts";
import { webRoutes } from "../routes/web.ts";
import { readRaw, useAlsaConfig, writeAlsaConfig, writeRaw } from "./alsa_devices.ts";
import { channel, dominantFrequency, rmsDb, tempDir, tone } from "./audio_util.ts";
import { sleep, until } from "./wait.ts";

const CHROMIUM = "/usr/bin/chromium";
const haveChromium = (() => {
  try {
    return Deno.statSync(CHROMIUM).isFile;
  } catch {
    return false;
  }
})();

/**
 * The flags of /work/shared/TESTING.md (without them Chromium floods the closed network). The
 * fresh `--user-data-dir` is given through `launchPersistentContext`, which passes it on:
 * playwright refuses it among `args`.
 */
const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * playwright-core asks at load time whether it runs under WSL by testing for
 * /proc/sys/fs/binfmt_misc/WSLInterop; Deno lets only --allow-all touch /proc/sys, so with the
 * test task's flags that load would fail. Answer that one question (it is not WSL) before loading.
 */
async function loadPlaywright(): Promise<typeof import("npm:playwright-core@1.65.1")> {
  const existsSync = fs.existsSync;
  fs.existsSync =
    ((p: fs.PathLike) =>
      String(p) === "/proc/sys/fs/binfmt_misc/WSLInterop"
        ? false
        : existsSync(p)) as typeof fs.existsSync;
  try {
    // deno-lint-ignore no-import-prefix
    return await import("npm:playwright-core@1.65.1");
  } finally {
    fs.existsSync = existsSync;
  }
}

// A base64-like token: `+` and `/` must survive `?token=` (URLSearchParams reads `+` as a space).
const TOKEN = "page+test/token==";
const LISTEN_HZ = 440;
const LISTEN_AMPLITUDE = 0.4;
const TALK_HZ = 523;
const TALK_AMPLITUDE = 0.5;
const CAPTURE_SECONDS = 120;

/** A mono 16-bit PCM WAV file of `samples` at `rate`. */
function wav(samples: Int16Array, rate: number): Uint8Array {
  const bytes = new Uint8Array(44 + samples.length * 2);
  const v = new DataView(bytes.buffer);
  const ascii = (at: number, s: string) => {
    for (let i = 0; i < s.length; i++) v.setUint8(at + i, s.charCodeAt(i));
  };
  ascii(0, "RIFF");
  v.setUint32(4, 36 + samples.length * 2, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  v.setUint32(16, 16, true); // fmt chunk size
  v.setUint16(20, 1, true); // PCM
  v.setUint16(22, 1, true); // channels
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true); // byte rate
  v.setUint16(32, 2, true); // block align
  v.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) v.setInt16(44 + i * 2, samples[i]!, true);
  return bytes;
}

/** What `window.kvmAudio.stats()` returns (the parts the test reads). */
interface AudioSummary {
  samples: number;
  rate: number;
  rmsDb: number;
  frequency: number | null;
}
interface PageStats {
  listen: {
    active: boolean;
    connected: boolean;
    hello: { preset: string; channels: number; frameMs: number; muted: boolean } | null;
    packetsReceived: number;
    packetsLost: number;
    decodeErrors: number;
    decodedFrames: number;
    decodedPeak: number;
    playout: { depthMs: number; targetMs: number; playing: boolean; underruns: number } | null;
    decoded: AudioSummary;
  };
  talk: {
    active: boolean;
    connected: boolean;
    hello: { preset: string; frameMs: number; signal?: string } | null;
    packetsSent: number;
    encodeErrors: number;
    microphoneRate: number | null;
    captureRate: number | null;
    encoder: { sampleRate: number; opus: { frameDuration: number; signal?: string } } | null;
    captured: AudioSummary;
  };
}

/** The page's stats; with `analyse` also the dominant frequencies (costly for the page). */
function stats(page: Page, analyse = false): Promise<PageStats> {
  // deno-lint-ignore no-explicit-any
  return page.evaluate((analyse) => (globalThis as any).kvmAudio.stats({ analyse }), analyse);
}

/** Polls the page's stats until `ok` holds; fails with the last stats after `timeoutMs`. */
async function waitForStats(
  page: Page,
  what: string,
  ok: (s: PageStats) => boolean,
  timeoutMs = 30_000,
): Promise<PageStats> {
  const deadline = Date.now() + timeoutMs;
  let s = await stats(page);
  while (!ok(s)) {
    if (Date.now() > deadline) {
      throw new Error(`Timed out waiting for ${what}; last stats: ${JSON.stringify(s)}`);
    }
    await sleep(200);
    s = await stats(page);
  }
  return s;
}

/** Console errors and uncaught exceptions of a page. */
function collectErrors(page: Page): string[] {
  const errors: string[] = [];
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  return errors;
}

async function launch(dir: string, name: string, extra: string[] = []): Promise<BrowserContext> {
  const { chromium } = await loadPlaywright();
  return await chromium.launchPersistentContext(`${dir}/${name}-profile`, {
    executablePath: CHROMIUM,
    headless: true,
    args: [...CHROMIUM_FLAGS, ...extra],
    viewport: { width: 1200, height: 860 },
  });
}

async function firstPage(context: BrowserContext): Promise<Page> {
  return context.pages()[0] ?? await context.newPage();
}

async function loadPage(page: Page, base: string): Promise<void> {
  await page.goto(`${base}/?token=${TOKEN}`);
  // deno-lint-ignore no-explicit-any
  await page.waitForFunction(() => (globalThis as any).kvmAudio?.ready === true);
}

/** The longest stretch of `x` whose 10 ms blocks are louder than `thresholdDb`. */
function loudest(x: Float64Array, rate: number, thresholdDb = -40): Float64Array {
  const block = rate / 100;
  let best = [0, 0], start = -1;
  for (let b = 0; b * block <= x.length; b++) {
    const loud = (b + 1) * block <= x.length &&
      rmsDb(x.subarray(b * block, (b + 1) * block)) > thresholdDb;
    if (loud && start < 0) start = b;
    if (!loud && start >= 0) {
      if (b - start > best[1]! - best[0]!) best = [start, b];
      start = -1;
    }
  }
  return x.subarray(best[0]! * block, best[1]! * block);
}

/**
 * A TCP relay on 127.0.0.1 to `port` that can stop passing bytes (both ways, every connection)
 * and start again: a stalled network, with the sockets left open.
 */
class PausableRelay implements AsyncDisposable {
  readonly #listener: Deno.Listener<Deno.TcpConn>;
  readonly #conns = new Set<Deno.Conn>();
  #gate: Promise<void> | null = null;
  #open: () => void = () => {};

  private constructor(listener: Deno.Listener<Deno.TcpConn>, target: number) {
    this.#listener = listener;
    (async () => {
      for await (const a of listener) {
        const b = await Deno.connect({ hostname: "127.0.0.1", port: target });
        this.#conns.add(a).add(b);
        this.#pipe(a, b);
        this.#pipe(b, a);
      }
    })().catch(() => {});
  }

  static to(port: number): Promise<PausableRelay> {
    return Promise.resolve(
      new PausableRelay(Deno.listen({ hostname: "127.0.0.1", port: 0 }), port),
    );
  }

  get port(): number {
    return (this.#listener.addr as Deno.NetAddr).port;
  }

  pause(): void {
    this.#gate ??= new Promise((r) => (this.#open = r));
  }

  resume(): void {
    this.#open();
    this.#gate = null;
  }

  async #pipe(from: Deno.Conn, to: Deno.Conn): Promise<void> {
    const buf = new Uint8Array(65536);
    try {
      for (;;) {
        if (this.#gate) await this.#gate;
        const n = await from.read(buf);
        if (n === null) break;
        if (this.#gate) await this.#gate;
        for (let at = 0; at < n;) at += await to.write(buf.subarray(at, n));
      }
    } catch {
      // Closed.
    }
    try {
      to.close();
    } catch {
      // Closed already.
    }
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.resume();
    this.#listener.close();
    for (const c of this.#conns) {
      try {
        c.close();
      } catch {
        // Closed already.
      }
    }
    return Promise.resolve();
  }
}

Deno.test({
  name: "operator page in headless Chromium",
  ignore: !haveChromium,
  // playwright keeps a child process and pipes open between steps.
  sanitizeOps: false,
  sanitizeResources: false,
}, async (t) => {
  await using dir = await tempDir("kvm-audio-browser-");
  // The target's audio: a steady tone the service captures (stereo, paced by the clock).
  const capture = `${dir.path}/capture.raw`;
  await writeRaw(
    capture,
    tone({
      freq: LISTEN_HZ,
      channels: 2,
      frames: 48000 * CAPTURE_SECONDS,
      amplitude: LISTEN_AMPLITUDE,
    }),
  );
  const playback = `${dir.path}/playback.raw`;
  const cfg = await writeAlsaConfig(dir.path, {
    kvm_page_capture: { type: "file", infile: capture },
    kvm_page_playback: { type: "file", outfile: playback },
  });
  using _cfg = useAlsaConfig(cfg);
  // The operator's microphone: Chromium's fake device plays this file (and loops it).
  const micWav = `${dir.path}/mic.wav`;
  await Deno.writeFile(
    micWav,
    wav(tone({ freq: TALK_HZ, frames: 48000 * 10, amplitude: TALK_AMPLITUDE }), 48000),
  );

  await using service = new AudioService({
    capture: "kvm_page_capture",
    playback: "kvm_page_playback",
    outputPreset: "high",
    microphonePreset: "high",
    pace: "clock",
    maxCaptureSamples: 48000 * CAPTURE_SECONDS,
    metricsIntervalMs: 200,
  });
  service.start();
  const shutdown = new AbortController();
  const app = createApp(service, { token: TOKEN, signal: shutdown.signal });
  // The page from routes/web.ts; answered by the app itself once createApp mounts it.
  const web = webRoutes();
  const handler = async (req: Request): Promise<Response> => {
    const res = await app.fetch(req);
    if (res.status !== 404) return res;
    const page = await web.fetch(req);
    return page.status === 404 ? res : page;
  };
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: shutdown.signal, onListen: () => {} },
    handler,
  );
  const base = `http://127.0.0.1:${server.addr.port}`;

  // Browser A: no fake UI, so a microphone request is refused.
  const plain = await launch(dir.path, "plain", [
    "--use-fake-device-for-media-stream",
    `--use-file-for-fake-audio-capture=${micWav}`,
  ]);
  // Browser B: the fake microphone, permission granted.
  const talking = await launch(dir.path, "talk", [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    `--use-file-for-fake-audio-capture=${micWav}`,
  ]);

  try {
    const page = await firstPage(plain);
    const errors = collectErrors(page);

    await t.step("the page loads without console errors and shows the service", async () => {
      await loadPage(page, base);
      const options = await page.locator("#output-preset option").allTextContents();
      assert.equal(options.length, 4, options.join(" | "));
      assert.ok(options[2]!.startsWith("high — 128 kb/s stereo, 20 ms"), options[2]);
      assert.equal(await page.inputValue("#output-preset"), "high");
      await page.locator("#connection", { hasText: "service reachable" }).waitFor();
      // The metrics table fills from /api/metrics.
      await page.locator("#stages td", { hasText: "Capture → encoded" }).waitFor();
      assert.match(await page.textContent("#stages") ?? "", /Capture → encoded/);
      assert.equal(await page.isDisabled("#listen"), false);
      assert.equal(await page.isDisabled("#talk"), false);
      assert.deepEqual(errors, []);
    });

    await t.step("listening: the page decodes the captured 440 Hz tone", async () => {
      await page.click("#listen");
      await waitForStats(
        page,
        "two seconds of decoded audio",
        (s) => s.listen.decoded.samples >= 2 * 48000,
      );
      const s = await stats(page, true);
      assert.equal(s.listen.connected, true);
      assert.equal(s.listen.hello?.preset, "high");
      assert.equal(s.listen.hello?.channels, 2);
      assert.equal(s.listen.decodeErrors, 0);
      const f = s.listen.decoded.frequency!;
      assert.ok(Math.abs(f - LISTEN_HZ) / LISTEN_HZ < 0.01, `decoded ${f.toFixed(2)} Hz`);
      const want = rmsDb(
        channel(tone({ freq: LISTEN_HZ, frames: 48000, amplitude: LISTEN_AMPLITUDE }), 1),
      );
      const level = s.listen.decoded.rmsDb;
      assert.ok(Math.abs(level - want) < 3, `level ${level.toFixed(2)} vs ${want.toFixed(2)} dBFS`);
      // The playout worklet is playing what was decoded.
      const p = await waitForStats(page, "the playout buffer", (s) => s.listen.playout !== null);
      assert.ok(p.listen.playout!.targetMs >= 20, JSON.stringify(p.listen.playout));
      assert.ok(p.listen.packetsReceived > 50);
      assert.match(await page.textContent("#listen-packets") ?? "", /\d+ received/);
      const meter = await page.$eval(
        "#listen-meter",
        (m) => (m as unknown as { value: number }).value,
      );
      assert.ok(meter > -30, `listen meter ${meter}`);
    });

    await t.step("choosing a preset on the page changes the stream", async () => {
      await page.selectOption("#output-preset", "ultra");
      const s = await waitForStats(
        page,
        "the ultra stream",
        (s) => s.listen.hello?.preset === "ultra" && s.listen.hello.frameMs === 10,
      );
      assert.equal(service.outputPreset.name, "ultra");
      const before = s.listen.decodedFrames;
      await waitForStats(
        page,
        "a second of ultra audio",
        (s) => s.listen.decodedFrames >= before + 48000,
      );
      const after = await stats(page, true);
      const f = after.listen.decoded.frequency!;
      assert.ok(Math.abs(f - LISTEN_HZ) / LISTEN_HZ < 0.01, `decoded ${f.toFixed(2)} Hz`);
    });

    await t.step("muting on the page stops the stream, and adds no delay or losses", async () => {
      const before = await stats(page);
      for (let cycle = 0; cycle < 2; cycle++) {
        await page.check("#mute-output");
        await waitForStats(page, "the muted hello", (s) => s.listen.hello?.muted === true);
        assert.equal(service.muted, true);
        const a = (await stats(page)).listen.packetsReceived;
        await sleep(500);
        const b = (await stats(page)).listen.packetsReceived;
        assert.equal(b, a, "no packets while muted");
        await page.uncheck("#mute-output");
        await waitForStats(page, "packets again", (s) => s.listen.packetsReceived > b + 10);
        assert.equal(service.muted, false);
      }
      await waitForStats(page, "playing again", (s) => s.listen.playout?.playing === true);
      const after = await stats(page);
      // Before, each mute ran the buffer dry as if the network had failed (+20 ms of target each
      // time) and counted the frames the service did not send as lost.
      assert.equal(after.listen.playout?.targetMs, before.listen.playout?.targetMs);
      assert.equal(after.listen.playout?.underruns, before.listen.playout?.underruns);
      assert.equal(after.listen.packetsLost, before.listen.packetsLost);
      // Neither the preset changes nor the mutes were heard as bursts: the page's decoder went
      // on across them as the service's encoder did (a new decoder after each unmute, against an
      // encoder that went on, peaked at 2.5 times the tone; a reset encoder against this decoder,
      // and a rebuilt one, at full scale).
      const peak = after.listen.decodedPeak;
      assert.ok(peak < LISTEN_AMPLITUDE * 1.15, `decoded peak ${peak.toFixed(3)}`);
      await page.click("#listen"); // stop
      assert.deepEqual(errors, [], "no console errors while listening");
    });

    await t.step("Listen, Stop, Listen in quick succession ends listening", async () => {
      // Three clicks while the first start still waits for its worklet module.
      await page.evaluate(() => {
        // deno-lint-ignore no-explicit-any
        const b = (globalThis as any).document.getElementById("listen");
        b.click();
        b.click();
        b.click();
      });
      const s = await waitForStats(
        page,
        "decoding after the third click",
        (s) => s.listen.active && s.listen.decodedFrames >= 48000,
      );
      assert.equal(s.listen.connected, true);
      await page.click("#listen"); // stop
      assert.deepEqual(errors, []);
    });

    await t.step("the quality list keeps the keyboard: two arrow keys, two changes", async () => {
      await page.focus("#output-preset");
      const from = await page.inputValue("#output-preset");
      await page.keyboard.press("ArrowUp");
      await page.keyboard.press("ArrowUp");
      // Disabled while its request ran, the list lost focus to the page and the second key.
      assert.equal(
        // deno-lint-ignore no-explicit-any
        await page.evaluate(() => (globalThis as any).document.activeElement?.id),
        "output-preset",
      );
      const names = ["low", "medium", "high", "ultra"];
      const want = names[Math.max(0, names.indexOf(from) - 2)];
      await until("the service has the second choice", () => service.outputPreset.name === want);
      assert.deepEqual(
        await page.$$eval("meter", (ms) => ms.map((m) => m.getAttribute("aria-label"))),
        ["Listen level", "Talk level"],
      );
    });

    await t.step(
      "of two quality changes in flight, the page shows what the service took",
      async () => {
        // The first request hangs and fails (as the 4 s timeout ends it); the second, made while
        // the first is pending, succeeds. The first's failure reverted the list to the value before
        // it, and a focused list is not updated by the polls: it showed what the service did not have.
        let puts = 0;
        const hangFirst = async (route: Route) => {
          if (route.request().method() !== "PUT" || ++puts > 1) return route.continue();
          await sleep(1500);
          return route.abort("timedout");
        };
        await page.route("**/api/audio/quality", hangFirst);
        try {
          await page.focus("#output-preset");
          const first = service.outputPreset.name === "low" ? "ultra" : "low";
          const second = first === "low" ? "high" : "medium";
          await page.selectOption("#output-preset", first);
          await sleep(200);
          await page.selectOption("#output-preset", second);
          await until(
            "the service has the second choice",
            () => service.outputPreset.name === second,
          );
          await sleep(2500); // the first fails meanwhile; polls follow
          assert.equal(puts, 2);
          assert.equal(await page.inputValue("#output-preset"), second);
        } finally {
          await page.unroute("**/api/audio/quality", hangFirst);
        }
      },
    );

    await t.step("while listening the page says why nothing can be heard", async () => {
      await page.click("#listen");
      await waitForStats(page, "packets", (s) => s.listen.packetsReceived > 20);
      await service.stopOutput();
      const notice = page.locator(".notice[data-key=listen-pipeline]");
      await notice.waitFor();
      assert.match(await notice.textContent() ?? "", /Nothing to hear: .*pipeline is stopped/);
      service.startOutput();
      await notice.waitFor({ state: "detached" });
      await page.click("#listen"); // stop
    });

    await t.step("a stalled connection is noticed and reopened; the API times out", async () => {
      // The page through a relay that can stop passing bytes: a network that drops everything
      // leaves sockets open. Before, the page said "service reachable" and "connected" for as
      // long as it lasted, and then played the backlog late.
      await using relay = await PausableRelay.to(server.addr.port);
      const far = await plain.newPage();
      try {
        await loadPage(far, `http://127.0.0.1:${relay.port}`);
        await far.click("#listen");
        await waitForStats(far, "packets", (s) => s.listen.packetsReceived > 20);
        relay.pause();
        const notice = far.locator(".notice[data-key=listen]");
        await notice.waitFor({ timeout: 10_000 });
        assert.match(await notice.textContent() ?? "", /no audio arrived for 3 s/);
        await far.locator("#connection", { hasText: "service unreachable" }).waitFor({
          timeout: 15_000,
        });
        relay.resume();
        await far.locator("#connection", { hasText: "service reachable" }).waitFor({
          timeout: 15_000,
        });
        const before = (await stats(far)).listen.packetsReceived;
        await waitForStats(far, "packets again", (s) => s.listen.packetsReceived > before + 20);
      } finally {
        await far.close();
      }
    });

    await t.step("a refused microphone says so", async () => {
      await page.click("#talk");
      await page.waitForSelector(".notice[data-key=mic]");
      const text = await page.textContent(".notice[data-key=mic]") ?? "";
      assert.match(text, /microphone was refused/);
      assert.equal((await stats(page)).talk.active, false);
    });

    await t.step("without WebCodecs the page says so", async () => {
      const bare = await plain.newPage();
      await bare.addInitScript(() => {
        // deno-lint-ignore no-explicit-any
        delete (globalThis as any).AudioDecoder;
      });
      await loadPage(bare, base);
      const text = await bare.textContent(".notice[data-key=webcodecs]") ?? "";
      assert.match(text, /lacks WebCodecs AudioDecoder/);
      assert.match(text, /cannot listen/);
      assert.equal(await bare.isDisabled("#listen"), true);
      assert.equal(await bare.isDisabled("#talk"), false, "talking needs only the encoder");
      await bare.close();
    });

    const tp = await firstPage(talking);
    const talkErrors = collectErrors(tp);

    await t.step("talking: the fake microphone's 523 Hz reaches the playback device", async () => {
      await loadPage(tp, base);
      // Chromium's echo canceller, noise suppressor and gain control reshape a steady tone
      // (level swings of 20 dB, gaps): judge the transport with them off.
      await tp.uncheck("#voice-processing");
      await tp.click("#talk");
      await waitForStats(tp, "three seconds of talk packets", (s) => s.talk.packetsSent >= 150);
      const s = await stats(tp, true);
      assert.equal(s.talk.hello?.preset, "high");
      assert.equal(s.talk.encodeErrors, 0);
      // Read at the start of Talk only: not changeable while talking.
      assert.equal(await tp.isDisabled("#voice-processing"), true);
      assert.equal(s.talk.captureRate, 48000, "captured through a 48 kHz context");
      assert.equal(s.talk.microphoneRate, 44100, "Chromium's fake microphone runs at 44.1 kHz");
      assert.equal(s.talk.encoder?.sampleRate, 48000);
      assert.equal(s.talk.encoder?.opus.frameDuration, 20_000);
      assert.equal(s.talk.hello?.signal, "voice");
      assert.equal(s.talk.encoder?.opus.signal, "voice", "the encoder tuned as the hello says");
      const captured = s.talk.captured.frequency!;
      assert.ok(Math.abs(captured - TALK_HZ) / TALK_HZ < 0.01, `captured ${captured} Hz`);

      // The service plays it: wait for 2.5 s of sound in the playback file.
      let heard: Float64Array = new Float64Array(0);
      const deadline = Date.now() + 30_000;
      while (heard.length < 48000 * 2.5) {
        assert.ok(Date.now() < deadline, `only ${heard.length / 48000} s of sound played`);
        await sleep(250);
        heard = loudest(channel(await readRaw(playback), 2), 48000);
      }
      const mid = heard.subarray(9600);
      const f = dominantFrequency(mid, 48000);
      assert.ok(Math.abs(f - TALK_HZ) / TALK_HZ < 0.01, `played ${f.toFixed(2)} Hz`);
      const level = rmsDb(mid);
      const want = rmsDb(
        channel(tone({ freq: TALK_HZ, frames: 48000, amplitude: TALK_AMPLITUDE }), 1),
      );
      assert.ok(
        Math.abs(level - want) < 3,
        `played at ${level.toFixed(2)} vs ${want.toFixed(2)} dBFS`,
      );
      const json = service.metrics.toJSON();
      const received = json.counters["kvm_audio_input_packets_received_total"] as Record<
        string,
        number
      >;
      const viaWs = Object.entries(received).find(([k]) => k.includes("websocket"))?.[1] ?? 0;
      const sent = (await stats(tp)).talk.packetsSent;
      assert.ok(viaWs >= s.talk.packetsSent && viaWs <= sent, `received ${viaWs} of ${sent}`);

      // Muting the microphone for a second pauses the stream: after it, nothing the page sends is
      // dropped as late (before, the first packet after each unmute was).
      const inputCounter = (result: string) =>
        (service.metrics.toJSON().counters["kvm_audio_input_packets_total"] as Record<
          string,
          number
        >)[`result="${result}"`] ?? 0;
      const lateBefore = inputCounter("late");
      for (let cycle = 0; cycle < 2; cycle++) {
        await tp.check("#mute-mic");
        await sleep(1000);
        const muted = (await stats(tp)).talk.packetsSent;
        await tp.uncheck("#mute-mic");
        await waitForStats(tp, "talk packets again", (x) => x.talk.packetsSent >= muted + 50);
      }
      // Every packet the page sent has been counted by the service before `late` is read.
      const sentNow = (await stats(tp)).talk.packetsSent;
      const viaWebSocket = () =>
        (service.metrics.toJSON().counters["kvm_audio_input_packets_received_total"] as Record<
          string,
          number
        >)['transport="websocket"'] ?? 0;
      const played = () =>
        service.metrics.toJSON().counters["kvm_audio_input_frames_played_total"] as number;
      await until("the service to count the page's packets", () => viaWebSocket() >= sentNow);
      // Then a worker snapshot taken after the worker had taken them (snapshots every 200 ms;
      // one 400 ms of playing later is past them).
      const playedBefore = played();
      await until("a later worker snapshot", () => played() >= playedBefore + 20);
      assert.equal(inputCounter("late"), lateBefore, "no packet after an unmute came late");
    });

    await t.step(
      "choosing the microphone preset on the page re-configures its encoder",
      async () => {
        await tp.selectOption("#mic-preset", "ultra");
        const u = await waitForStats(
          tp,
          "10 ms talk frames",
          (s) => s.talk.hello?.preset === "ultra" && s.talk.encoder?.opus.frameDuration === 10_000,
        );
        assert.equal(service.microphonePreset.name, "ultra");
        assert.equal(u.talk.encoder?.sampleRate, 48000);
        await waitForStats(
          tp,
          "ultra packets",
          (s) => s.talk.packetsSent >= u.talk.packetsSent + 100,
        );
        assert.equal((await stats(tp)).talk.encodeErrors, 0);
        // Listen too, for a screenshot with both directions busy.
        await tp.click("#listen");
        await waitForStats(tp, "listening", (s) => s.listen.decodedFrames >= 48000);
        await sleep(1200); // one more metrics refresh
        await tp.screenshot({ path: "/tmp/kvm-audio-page.png", fullPage: true });
        await tp.click("#talk"); // stop
        await tp.click("#listen");
        assert.deepEqual(talkErrors, []);
      },
    );
  } finally {
    await plain.close();
    await talking.close();
    shutdown.abort();
    await server.finished;
  }
});
