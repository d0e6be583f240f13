import assert from "node:assert/strict";
import { encoderSettings, MICROPHONE_PRESETS, OUTPUT_PRESETS } from "../lib/quality.ts";
import { inspectPacket, OpusDecoder, OpusEncoder } from "../ffi/opus.ts";
import { Registry } from "../lib/metrics.ts";
import { AudioService, type EncodedFrame, type ServiceOptions } from "../lib/service.ts";
import { type HubOptions, type HubSocket, WebSocketHub } from "../lib/transport/hub.ts";
import {
  CloseCode,
  decodeFrame,
  encodeFrame,
  FrameFlag,
  HEADER_BYTES,
  type ListenHello,
  MalformedFrameError,
  type TalkHello,
} from "../lib/transport/ws_protocol.ts";
import { createApp } from "../routes/app.ts";
import { readRaw, useAlsaConfig, writeAlsaConfig, writeRaw } from "./alsa_devices.ts";
import { channel, dominantFrequency, peakOf, rmsDb, tempDir, tone } from "./audio_util.ts";
import { rawWebSocket, serveApp, sleep, until, WsClient } from "./net_util.ts";

type Json = ReturnType<Registry["toJSON"]>;

function labelled(json: Json, name: string, label: string): number {
  const v = json.counters[name];
  if (v === undefined || typeof v === "number") return 0;
  return Object.entries(v).filter(([k]) => k === label).reduce((a, [, n]) => a + n, 0);
}

/** A real server on 127.0.0.1 over `service`; disposing it closes streams and the server. */
function serve(service: AudioService, opts: { token?: string; hub?: HubOptions } = {}) {
  return serveApp((signal) => createApp(service, { ...opts, signal }));
}

/**
 * A microphone-only service, clock-paced, playing into the file PCM `kvm_ws_playback`
 * (`out.raw` in `dir`); `alsa` restores the ALSA configuration.
 */
async function talkService(dir: string, options: Partial<ServiceOptions> = {}) {
  const cfg = await writeAlsaConfig(dir, {
    kvm_ws_playback: { type: "file", outfile: `${dir}/out.raw` },
  });
  const alsa = useAlsaConfig(cfg);
  const service = new AudioService({
    capture: null,
    playback: "kvm_ws_playback",
    pace: "clock",
    ...options,
  });
  return { service, alsa, outfile: `${dir}/out.raw` };
}

async function captureService(
  dir: string,
  { seconds, freq, ...rest }: { seconds: number; freq: number } & Partial<ServiceOptions>,
) {
  await writeRaw(
    `${dir}/in.raw`,
    tone({ freq, channels: 2, frames: 48000 * seconds, amplitude: 0.4 }),
  );
  const cfg = await writeAlsaConfig(dir, {
    kvm_ws_capture: { type: "file", infile: `${dir}/in.raw` },
  });
  return {
    cfg,
    service: () =>
      new AudioService({
        capture: "kvm_ws_capture",
        playback: null,
        pace: "clock",
        maxCaptureSamples: 48000 * seconds,
        ...rest,
      }),
  };
}

async function waitEnded(service: AudioService): Promise<void> {
  await until(
    "the capture to end",
    () => service.outputStatus().supervisor?.lastExit === "ended",
    60_000,
  );
}

function decodeAll(packets: Uint8Array[]): Int16Array {
  using dec = OpusDecoder.create({ channels: 2 });
  const buf = new Int16Array(5760 * 2);
  const parts: Int16Array[] = [];
  for (const p of packets) parts.push(buf.slice(0, dec.decode(p, buf, 5760) * 2));
  const out = new Int16Array(parts.reduce((a, b) => a + b.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Protocol.

Deno.test("ws protocol: a frame round-trips and malformed messages are named", () => {
  const payload = new Uint8Array([0xfc, 1, 2, 3]);
  const msg = encodeFrame(
    {
      flags: FrameFlag.silence | FrameFlag.discontinuity,
      channels: 2,
      seq: 0xfffffffe,
      timestamp: 123456789,
    },
    payload,
  );
  assert.equal(msg.length, HEADER_BYTES + 4);
  assert.deepEqual([...msg.subarray(0, 4)], [1, 3, 2, 0]);
  const f = decodeFrame(msg);
  assert.equal(f.seq, 0xfffffffe);
  assert.equal(f.timestamp, 123456789);
  assert.equal(f.flags, 3);
  assert.deepEqual([...f.payload], [...payload]);
  const reason = (bytes: Uint8Array) => {
    try {
      decodeFrame(bytes);
    } catch (e) {
      assert.ok(e instanceof MalformedFrameError);
      return e.reason;
    }
    return "ok";
  };
  assert.equal(reason(new Uint8Array(11)), "header");
  assert.equal(reason(new Uint8Array([2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])), "version");
  assert.equal(reason(new Uint8Array([1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0])), "channels");
  assert.throws(
    () => encodeFrame({ flags: 0, channels: 3, seq: 0, timestamp: 0 }, payload),
    RangeError,
  );
  assert.throws(
    () => encodeFrame({ flags: 0, channels: 1, seq: 2 ** 32, timestamp: 0 }, payload),
    RangeError,
  );
});

// ---------------------------------------------------------------------------------------------
// Hub with a fake source and fake sockets: deterministic queueing.

class FakeSource {
  readonly metrics = new Registry();
  outputPreset = OUTPUT_PRESETS.high;
  muted = false;
  readonly listeners = new Set<(f: EncodedFrame) => void>();
  seq = 0;
  subscribe(l: (f: EncodedFrame) => void): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }
  emit(n = 1, samples = 960, channels = 2): void {
    for (let i = 0; i < n; i++) {
      const f: EncodedFrame = {
        data: new Uint8Array([0xfc, this.seq & 0xff, 7]),
        seq: this.seq,
        timestamp: (this.seq * samples) >>> 0,
        samples,
        channels,
        silence: false,
        capturedAt: 0,
      };
      this.seq++;
      for (const l of this.listeners) l(f);
    }
  }
}

/** A socket that records what it is sent; `bufferedAmount` is set by the test. */
class FakeSocket implements HubSocket {
  readyState = 1;
  bufferedAmount = 0;
  /** Grow `bufferedAmount` by what is sent, as a runtime that writes between turns does. */
  accumulate = false;
  readonly sent: (string | Uint8Array)[] = [];
  closedWith: [number | undefined, string | undefined] | null = null;
  send(data: string | Uint8Array<ArrayBuffer>): void {
    this.sent.push(data);
    if (this.accumulate) this.bufferedAmount += data.length;
  }
  close(code?: number, reason?: string): void {
    this.closedWith = [code, reason];
    this.readyState = 3;
  }
  get seqs(): number[] {
    return this.sent.filter((m): m is Uint8Array => typeof m !== "string").map((m) =>
      decodeFrame(m).seq
    );
  }
  get hellos(): ListenHello[] {
    return this.sent.filter((m): m is string => typeof m === "string").map((m) => JSON.parse(m));
  }
}

Deno.test("hub: a stalled listener loses the oldest packets, then is closed; a healthy one gets all", () => {
  const source = new FakeSource();
  let now = 0;
  const hub = new WebSocketHub(source, { maxQueue: 5, closeAfterMs: 1000, now: () => now });
  const healthy = new FakeSocket();
  const stalled = new FakeSocket();
  hub.add(healthy, "healthy");
  hub.add(stalled, "stalled");
  assert.equal(source.listeners.size, 1, "one subscription for all listeners");
  stalled.bufferedAmount = 1_000_000;
  source.emit(20);
  assert.deepEqual(healthy.seqs, [...Array(20).keys()]);
  assert.equal(healthy.hellos.length, 1);
  // The stalled one had its hello at join, then nothing: 5 queued, 15 dropped (oldest first).
  assert.deepEqual(stalled.seqs, []);
  const stats = Object.fromEntries(hub.listeners().map((l) => [l.label, l]));
  assert.equal(stats.stalled!.dropped, 15);
  assert.equal(stats.stalled!.queued, 5);
  assert.equal(stats.healthy!.dropped, 0);
  assert.equal(
    labelled(source.metrics.toJSON(), "kvm_audio_frames_dropped_total", 'reason="listener_slow"'),
    15,
  );
  // It catches up: the queue drains with the newest five, the gap shows in the sequence.
  stalled.bufferedAmount = 0;
  source.emit(1);
  assert.deepEqual(stalled.seqs, [15, 16, 17, 18, 19, 20]);
  // It stalls again and stays behind for closeAfterMs: closed with 4408, counted as a drop.
  stalled.bufferedAmount = 1_000_000;
  source.emit(10);
  now += 999;
  source.emit(1);
  assert.equal(stalled.closedWith, null);
  now += 1;
  source.emit(1);
  assert.deepEqual(stalled.closedWith, [CloseCode.tooSlow, "listener too slow"]);
  assert.equal(hub.size, 1);
  const json = source.metrics.toJSON();
  assert.equal(
    labelled(json, "kvm_audio_connection_drops_total", 'transport="websocket"'),
    1,
  );
  // The healthy listener never noticed.
  assert.deepEqual(healthy.seqs, [...Array(33).keys()]);
  assert.equal(
    labelled(json, "kvm_audio_output_packets_sent_total", 'transport="websocket"'),
    33 + 6,
  );
  hub.remove(healthy);
  assert.equal(source.listeners.size, 0, "unsubscribed with the last listener");
  hub.close();
});

Deno.test("hub: a burst handed over in one turn does not count as a slow listener", async () => {
  const source = new FakeSource();
  const hub = new WebSocketHub(source, { maxQueue: 5, highWaterBytes: 100 });
  const s = new FakeSocket();
  s.accumulate = true; // bufferedAmount grows with every send until the turn ends
  hub.add(s);
  source.emit(200); // 200 × 15 bytes in one turn, far over the 100-byte high-water mark
  assert.equal(s.seqs.length, 200);
  await Promise.resolve();
  // Next turn: the runtime has not written anything (bytes still buffered): now it is behind.
  source.emit(1);
  assert.equal(s.seqs.length, 200);
  assert.equal(hub.listeners()[0]!.queued, 1);
  s.bufferedAmount = 0;
  source.emit(1);
  assert.equal(s.seqs.length, 202);
  hub.close();
  assert.deepEqual(s.closedWith, [CloseCode.goingAway, "server shutting down"]);
});

Deno.test("hub: a hello precedes the first packet of a new shape, also across drops", () => {
  const source = new FakeSource();
  const hub = new WebSocketHub(source, { maxQueue: 3 });
  const s = new FakeSocket();
  hub.add(s);
  source.emit(2, 960, 2);
  source.outputPreset = OUTPUT_PRESETS.low;
  hub.refresh();
  source.emit(2, 960, 1);
  s.bufferedAmount = 1e9; // behind while the shape changes to 10 ms
  source.outputPreset = OUTPUT_PRESETS.ultra;
  source.emit(2, 960, 1);
  source.emit(4, 480, 2);
  source.muted = true;
  hub.refresh();
  s.bufferedAmount = 0;
  source.emit(1, 480, 2);
  // Replay what the client saw: every packet matches the last hello before it.
  let hello: ListenHello | null = null;
  const hellos: ListenHello[] = [];
  for (const m of s.sent) {
    if (typeof m === "string") {
      hello = JSON.parse(m);
      hellos.push(hello!);
      continue;
    }
    const f = decodeFrame(m);
    assert.ok(hello !== null);
    assert.equal(f.channels, hello.channels, `packet ${f.seq}`);
  }
  assert.deepEqual(hellos.map((h) => [h.preset, h.channels, h.frameMs, h.muted]), [
    ["high", 2, 20, false],
    ["low", 2, 20, false],
    ["low", 1, 20, false],
    ["ultra", 2, 10, false],
    ["ultra", 2, 10, true],
  ]);
  assert.deepEqual(s.seqs, [0, 1, 2, 3, 8, 9, 10]);
  // Everybody leaves after the preset changed: the next listener hears the preset's shape, not
  // the shape of the last frames seen.
  source.outputPreset = OUTPUT_PRESETS.low;
  source.emit(1, 480, 2); // a leftover of the previous shape, still in flight
  hub.remove(s);
  const later = new FakeSocket();
  hub.add(later);
  assert.deepEqual(
    later.hellos.map((h) => [h.preset, h.channels, h.frameMs]),
    [["low", 1, 20]],
  );
  hub.close();
});

// ---------------------------------------------------------------------------------------------
// Real server, real clients.

Deno.test("listen stream: hello, then packets that decode to the captured tone", async () => {
  await using dir = await tempDir();
  const seconds = 3;
  const { cfg, service: make } = await captureService(dir.path, { seconds, freq: 1000 });
  using _cfg = useAlsaConfig(cfg);
  await using service = make();
  await using server = serve(service);
  await using client = new WsClient(server.url("/api/audio/stream"));
  await client.opened;
  await until("the hello", () => client.messages.length >= 1);
  assert.deepEqual(client.messages[0], {
    type: "hello",
    version: 1,
    codec: "opus",
    sampleRate: 48000,
    channels: 2,
    frameMs: 20,
    preset: "high",
    muted: false,
  });
  service.start();
  await waitEnded(service);
  const frames = (48000 * seconds) / 960;
  await until("every packet", () => client.packets.length >= frames);
  await sleep(100);
  assert.equal(client.packets.length, frames, "one message per packet, none lost");
  assert.equal(client.texts.length, 1, "no second hello");
  const decoded = client.packets.map(decodeFrame);
  for (let i = 0; i < decoded.length; i++) {
    const f = decoded[i]!;
    assert.equal(f.version, 1);
    assert.equal(f.channels, 2);
    assert.equal(f.flags & FrameFlag.discontinuity, 0);
    if (i > 0) {
      assert.equal(f.seq, (decoded[i - 1]!.seq + 1) >>> 0);
      assert.equal(f.timestamp, (decoded[i - 1]!.timestamp + 960) >>> 0);
    }
  }
  const pcm = decodeAll(decoded.map((f) => f.payload));
  const left = channel(pcm, 2).subarray(9600, 9600 + 48000 * 2);
  assert.ok(Math.abs(dominantFrequency(left, 48000) - 1000) < 10);
  const want = rmsDb(channel(tone({ freq: 1000, frames: 48000, amplitude: 0.4 }), 1));
  assert.ok(Math.abs(rmsDb(left) - want) < 1.5, `level ${rmsDb(left)} vs ${want}`);
  const json = service.metrics.toJSON();
  assert.equal(
    labelled(json, "kvm_audio_output_packets_sent_total", 'transport="websocket"'),
    frames,
  );
  const pong = new Promise<unknown>((resolve) =>
    client.ws.addEventListener("message", (e) => {
      if (typeof e.data === "string" && JSON.parse(e.data).type === "pong") {
        resolve(JSON.parse(e.data));
      }
    })
  );
  client.ws.send(JSON.stringify({ type: "ping", id: 7 }));
  assert.equal(((await pong) as { id: number }).id, 7);
});

Deno.test("listen stream: preset and mute changes through the API send a hello before the packets they shape", async () => {
  await using dir = await tempDir();
  const seconds = 4;
  const { cfg, service: make } = await captureService(dir.path, { seconds, freq: 440 });
  using _cfg = useAlsaConfig(cfg);
  await using service = make();
  await using server = serve(service, { token: "tok-123" });
  // Browsers pass the token in the query; without it the upgrade is refused.
  const refused = new WsClient(server.url("/api/audio/stream"));
  await assert.rejects(refused.opened);
  await refused.closed;
  await using client = new WsClient(server.url("/api/audio/stream?token=tok-123"));
  await client.opened;
  service.start();
  const put = async (path: string, body: unknown) => {
    const res = await fetch(server.http(path), {
      method: "PUT",
      headers: { "content-type": "application/json", authorization: "Bearer tok-123" },
      body: JSON.stringify(body),
    });
    assert.equal(res.status, 200, await res.clone().text());
    return await res.json();
  };
  const count = (pred: (f: ReturnType<typeof decodeFrame>) => boolean) =>
    client.packets.map(decodeFrame).filter(pred).length;
  await until("packets", () => client.packets.length >= 25);
  assert.equal((await put("/api/audio/quality", { preset: "ultra" })).applied, "rebuilt");
  await until(
    "20 packets of 10 ms",
    () => count((f) => inspectPacket(f.payload).samples === 480) >= 20,
  );
  assert.equal((await put("/api/audio/quality", { preset: "low" })).applied, "rebuilt");
  await until("20 mono packets", () => count((f) => f.channels === 1) >= 20);
  await put("/api/audio/mute", { muted: true });
  await until("the muted hello", () => client.texts.some((t) => (t as ListenHello).muted));
  await waitEnded(service);
  await sleep(100);
  // Replay: every packet has the channels and duration of the last hello before it.
  let hello: ListenHello | null = null;
  let checked = 0;
  for (const m of client.messages) {
    if (!(m instanceof Uint8Array)) {
      hello = m as unknown as ListenHello;
      continue;
    }
    const f = decodeFrame(m);
    assert.ok(hello !== null, "a hello came first");
    assert.equal(f.channels, hello.channels);
    assert.equal(inspectPacket(f.payload).samples, hello.frameMs * 48);
    assert.equal(inspectPacket(f.payload).channels, f.channels);
    checked++;
  }
  const presets = (client.texts as ListenHello[]).map((h) => h.preset);
  assert.ok(presets.includes("ultra") && presets.includes("low"), presets.join(","));
  assert.ok(checked >= 65, `${checked} packets`);
});

Deno.test("talk stream: a talker's packets play as the tone", async () => {
  await using dir = await tempDir();
  const { service, alsa, outfile } = await talkService(dir.path, { microphonePreset: "high" });
  using _cfg = alsa;
  service.start();
  let sent = 0;
  {
    await using server = serve(service);
    await using client = new WsClient(server.url("/api/microphone/stream"));
    await client.opened;
    await until("the hello", () => client.texts.length >= 1);
    const hello = client.texts[0] as TalkHello;
    const p = MICROPHONE_PRESETS.high;
    assert.deepEqual(
      [hello.type, hello.codec, hello.channels, hello.frameMs, hello.frameSamples, hello.preset],
      ["hello", "opus", 1, 20, 960, "high"],
    );
    assert.equal(hello.fec, true);
    assert.deepEqual(
      [hello.signal, hello.maxBandwidth, hello.vbrConstraint],
      [p.signal, p.maxBandwidth, p.vbrConstraint],
    );
    assert.deepEqual([hello.signal, hello.maxBandwidth], ["voice", "fullband"]);
    assert.equal(hello.bitrate, p.bitrate);
    assert.equal(hello.running, true);

    using enc = OpusEncoder.create(
      { channels: hello.channels, application: p.application },
      encoderSettings(p),
    );
    const seconds = 3;
    const pcm = tone({ freq: 600, frames: 48000 * seconds, amplitude: 0.4 });
    const buf = new Uint8Array(1500);
    const t0 = performance.now();
    const first = 0xfffffff0; // the 32-bit sequence wraps, and so do its low 16 bits
    for (let i = 0; i < (48000 * seconds) / 960; i++) {
      const n = enc.encode(pcm.subarray(i * 960, (i + 1) * 960), 960, buf);
      client.ws.send(encodeFrame(
        { flags: 0, channels: 1, seq: (first + i) >>> 0, timestamp: (i * 960) >>> 0 },
        buf.subarray(0, n),
      ));
      sent++;
      const due = t0 + (i + 1) * 20 - performance.now();
      if (due > 0) await sleep(due);
    }
    await sleep(500);
  }
  const json = service.metrics.toJSON();
  await service.close();
  assert.equal(
    labelled(json, "kvm_audio_input_packets_received_total", 'transport="websocket"'),
    sent,
  );
  const out = await readRaw(outfile);
  const mid = channel(out, 2).subarray(48000, 48000 * 2.5);
  assert.ok(Math.abs(dominantFrequency(mid, 48000) - 600) < 6, `${dominantFrequency(mid, 48000)}`);
  const want = rmsDb(channel(tone({ freq: 600, frames: 48000, amplitude: 0.4 }), 1));
  assert.ok(Math.abs(rmsDb(mid) - want) < 2, `level ${rmsDb(mid)} vs ${want}`);
});

Deno.test("talk stream: a second Talk numbered from 0 again plays from its first packet, without a burst", async () => {
  await using dir = await tempDir();
  const talk = await talkService(dir.path, { microphonePreset: "high", metricsIntervalMs: 100 });
  using _cfg = talk.alsa;
  await using service = talk.service;
  service.start();
  await until("the microphone pipeline", () => service.microphoneStatus().running);
  await using server = serve(service);
  const frames = 25;
  // Two Talk sessions of half a second, each counting from 0 (as the page does), 300 ms apart:
  // the second one's numbers are ones the service has just played. Each from a new encoder as
  // ffmpeg sets one up by default (the "audio" application, 48 kb/s): a decoder kept from the
  // first session turned the second's start into a burst of nearly full scale.
  for (const freq of [700, 700]) {
    await using client = new WsClient(server.url("/api/microphone/stream"));
    await client.opened;
    await until("the hello", () => client.texts.length >= 1);
    using enc = OpusEncoder.create({ channels: 1, application: "audio" }, { bitrate: 48000 });
    const pcm = tone({ freq, frames: 960 * frames, amplitude: 0.25 });
    const buf = new Uint8Array(1500);
    const t0 = performance.now();
    for (let i = 0; i < frames; i++) {
      const n = enc.encode(pcm.subarray(i * 960, (i + 1) * 960), 960, buf);
      client.ws.send(encodeFrame(
        { flags: i === 0 ? 2 : 0, channels: 1, seq: i, timestamp: i * 960 },
        buf.subarray(0, n),
      ));
      const due = t0 + (i + 1) * 20 - performance.now();
      if (due > 0) await sleep(due);
    }
    await sleep(300);
  }
  const json = () => service.metrics.toJSON();
  const result = (r: string) => labelled(json(), "kvm_audio_input_packets_total", `result="${r}"`);
  const decoded = () => {
    const v = json().counters["kvm_audio_input_packets_decoded_total"];
    return typeof v === "number" ? v : 0;
  };
  await until("both sessions decoded", () => decoded() >= 2 * frames, 5000).catch((e) => {
    throw new Error(`${e.message}: ${JSON.stringify(json().counters)}`);
  });
  assert.equal(result("accepted"), 2 * frames);
  assert.equal(result("duplicate"), 0, "no packet of the second session taken for the first's");
  assert.equal(result("late"), 0);
  await service.close();
  const out = await readRaw(talk.outfile);
  const peak = peakOf(out);
  assert.ok(peak < 0.4, `peak ${peak.toFixed(3)} for a tone at 0.25`);
});

Deno.test("talk stream: one talker at a time, takeover, malformed messages counted and dropped", async () => {
  await using dir = await tempDir();
  const talk = await talkService(dir.path);
  using _cfg = talk.alsa;
  await using service = talk.service;
  service.start();
  await using server = serve(service);
  await using first = new WsClient(server.url("/api/microphone/stream"));
  await first.opened;
  await until("the hello", () => first.texts.length === 1);

  // A second talker is refused with a clear close code and reason.
  const second = new WsClient(server.url("/api/microphone/stream"));
  const refusal = await second.closed;
  assert.equal(refusal.code, CloseCode.busy);
  assert.equal(refusal.reason, "microphone busy");
  assert.equal(second.texts.length, 0, "the refused client was told nothing else");

  // Malformed messages from the talker: counted by reason, dropped, the connection stays.
  const malformed = () => {
    const v = service.metrics.toJSON().counters["kvm_audio_input_packets_malformed_total"];
    return typeof v === "object" ? v : {};
  };
  first.ws.send(new Uint8Array([1, 0, 1, 0, 0])); // shorter than a header
  first.ws.send(
    encodeFrame({ flags: 0, channels: 1, seq: 1, timestamp: 0 }, new Uint8Array([0xfc, 1])).map((
      b,
      i,
    ) => i === 0 ? 9 : b),
  ); // version 9
  first.ws.send(new Uint8Array([1, 0, 5, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0xfc])); // 5 channels
  first.ws.send(encodeFrame({ flags: 0, channels: 1, seq: 2, timestamp: 0 }, new Uint8Array(0))); // no packet
  first.ws.send("hello there"); // text that is not JSON
  first.ws.send(JSON.stringify({ type: "shout" })); // JSON that is not a control message
  first.ws.send(JSON.stringify({ type: "ping", id: "p1" }));
  await until("the pong", () => first.texts.some((t) => (t as { type: string }).type === "pong"));
  const m = malformed();
  assert.equal(m['reason="header"'], 1);
  assert.equal(m['reason="version"'], 1);
  assert.equal(m['reason="channels"'], 1);
  assert.equal(m['reason="size"'], 1);
  assert.equal(m['reason="text"'], 2);
  assert.equal(first.ws.readyState, WebSocket.OPEN);
  const status = await (await fetch(server.http("/api/microphone"))).json();
  assert.equal(status.talker.malformed, 4);
  assert.equal(status.talker.badText, 2);

  // Takeover: the current talker is closed with 4410, the new one gets the hello.
  await using third = new WsClient(server.url("/api/microphone/stream?takeover=1"));
  await third.opened;
  const taken = await first.closed;
  assert.equal(taken.code, CloseCode.takenOver);
  assert.equal(taken.reason, "taken over");
  await until("the new talker's hello", () => third.texts.length === 1);
  assert.equal((third.texts[0] as TalkHello).type, "hello");

  // A preset change reaches the talker as a new hello.
  const res = await fetch(server.http("/api/microphone/quality"), {
    method: "PUT",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ preset: "ultra" }),
  });
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), { preset: "ultra", applied: "stored" });
  await until("the second hello", () => third.texts.length === 2);
  assert.equal((third.texts[1] as TalkHello).frameMs, 10);
  assert.equal((third.texts[1] as TalkHello).preset, "ultra");
});

Deno.test("listen stream: a stalled TCP peer is dropped-oldest and closed; a healthy listener gets every packet", async () => {
  await using dir = await tempDir();
  // Unpaced capture (the file plugin over null runs as fast as the encoder): enough data to fill
  // the kernel's socket buffers of a peer that never reads (several MB on loopback).
  const second = tone({ freq: 1000, frames: 48000, amplitude: 0.4 });
  const seconds = 600;
  const file = await Deno.open(`${dir.path}/in.raw`, { write: true, create: true });
  for (let i = 0; i < seconds; i++) {
    await file.write(new Uint8Array(second.buffer));
  }
  file.close();
  const cfg = await writeAlsaConfig(dir.path, {
    kvm_ws_capture: { type: "file", infile: `${dir.path}/in.raw` },
  });
  using _cfg = useAlsaConfig(cfg);
  await using service = new AudioService({
    capture: "kvm_ws_capture",
    captureChannels: 1,
    playback: null,
    outputPreset: "ultra",
    pace: "device",
    maxCaptureSamples: 48000 * seconds,
  });
  await using server = serve(service, { hub: { maxQueue: 50, closeAfterMs: 300 } });

  // The stalled peer: a raw TCP connection that does the handshake and never reads again.
  const { conn } = await rawWebSocket(server.port, "/api/audio/stream");
  try {
    await using healthy = new WsClient(server.url("/api/audio/stream"));
    await healthy.opened;
    const status = async () => await (await server.app.request("/api/audio")).json();
    await until("two listeners", async () => (await status()).listeners === 2);

    const handed: number[] = [];
    const stop = service.subscribe((f) => handed.push(f.seq));
    service.start();
    const drops = () =>
      labelled(
        service.metrics.toJSON(),
        "kvm_audio_connection_drops_total",
        'transport="websocket"',
      );
    await until("the stalled listener to be closed", () => drops() === 1, 60_000);
    // Frames the worker published before it stopped are handed over, to both listeners, before
    // stopOutput() resolves.
    await service.stopOutput();
    assert.equal(service.outputBacklog, 0);
    stop();
    await until(
      "the healthy listener to get every packet",
      () => healthy.packets.length >= handed.length,
      60_000,
    );
    await sleep(100);

    const json = service.metrics.toJSON();
    const slow = labelled(json, "kvm_audio_frames_dropped_total", 'reason="listener_slow"');
    assert.ok(slow > 0, "the stalled listener lost packets");
    const after = await status();
    assert.equal(after.listeners, 1, "the stalled listener is gone");
    assert.equal(after.streams[0].dropped, 0, "the healthy listener lost nothing");
    const seqs = healthy.packets.map((p) => decodeFrame(p).seq);
    assert.equal(seqs.length, handed.length);
    assert.deepEqual(seqs, handed, "the healthy listener got every packet, in order");
  } finally {
    conn.close();
  }
});

Deno.test("the talk stream upgrades whatever the case of the Upgrade header (both streams share the upgrade); a broken handshake is refused (400, or 426 for the version)", async () => {
  await using dir = await tempDir();
  const talk = await talkService(dir.path);
  using _cfg = talk.alsa;
  await using service = talk.service;
  service.start();
  await using server = serve(service);
  // RFC 6455: the Upgrade value is case-insensitive ("WebSocket" was refused with 426).
  for (const upgrade of ["WebSocket", "WEBSOCKET"]) {
    const { conn } = await rawWebSocket(server.port, "/api/microphone/stream", upgrade);
    conn.close();
  }
  // A broken handshake is refused and the answer says why: no Sec-WebSocket-Key, a key that is
  // not 16 bytes in base64, a version other than 13 (426 naming the one there is) or none (all
  // three but the first were upgraded).
  const handshake = async (headers: string) => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    try {
      await conn.write(new TextEncoder().encode(
        "GET /api/microphone/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n" +
          `Connection: Upgrade\r\n${headers}\r\n`,
      ));
      const buf = new Uint8Array(4096);
      const n = await conn.read(buf);
      return new TextDecoder().decode(buf.subarray(0, n ?? 0));
    } finally {
      conn.close();
    }
  };
  const key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
  let text = await handshake("Sec-WebSocket-Version: 13\r\n");
  assert.match(text, /^HTTP\/1\.1 400 /);
  assert.match(text, /Cannot upgrade to a WebSocket/);
  text = await handshake("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: x\r\n");
  assert.match(text, /^HTTP\/1\.1 400 /);
  assert.match(text, /Sec-WebSocket-Key \\"x\\": expected 16 bytes in base64/);
  for (const version of ["Sec-WebSocket-Version: 8\r\n", ""]) {
    text = await handshake(version + key);
    assert.match(text, /^HTTP\/1\.1 426 /, version);
    assert.match(text, /\r\nsec-websocket-version: 13\r\n/i);
    assert.match(text, /\r\nupgrade: websocket\r\n/i, "a 426 names the protocol to upgrade to");
    assert.match(text, /expected Sec-WebSocket-Version: 13/);
  }
  // The RFC's own sample key, version 13: upgraded.
  assert.match(await handshake("Sec-WebSocket-Version: 13\r\n" + key), /^HTTP\/1\.1 101 /);
});
