/**
 * Every metric series the service exposes is exercised here: for each one, real behaviour of a
 * real {@link AudioService} (ALSA file PCMs, a private PulseAudio, real sockets, real libopus)
 * makes it move — a counter or histogram above zero, a gauge to an expected value — and the test
 * asserts it. A final step enumerates every series in `GET /api/metrics` and `GET /metrics` of
 * every service used and fails for any series (or metric family) that is not in {@link COVERED}
 * or {@link UNREACHABLE}: a metric added later without a driver here makes this test fail.
 *
 * A series key is written as in the exposition format: `name` or `name{label="value"}`; a
 * histogram series is keyed without `le` (its `_count` is what must move).
 *
 * @module
 */

import assert from "node:assert/strict";
import type { MetricsJson } from "../lib/metrics.ts";
import { CONTROL, FAULT } from "../lib/pipeline/messages.ts";
import { AudioService, type EncodedFrame, type FrameListener } from "../lib/service.ts";
import { RtpReceiver, RtpSender, writeRtp } from "../lib/transport/rtp.ts";
import { encodeFrame } from "../lib/transport/ws_protocol.ts";
import { createApp } from "../routes/app.ts";
import { TalkChannel } from "../routes/microphone.ts";
import { SELF_CONTAINED_ALSA, useAlsaConfig, writeAlsaConfig, writeRaw } from "./alsa_devices.ts";
import { tempDir, tone } from "./audio_util.ts";
import {
  micPackets,
  rawWebSocket,
  serveApp,
  sleep,
  udpSender,
  udpSink,
  until as poll,
  WsClient,
} from "./net_util.ts";
import { killStreams, startPulse } from "./pulse.ts";

// ---------------------------------------------------------------------------------------------
// The series, and how each one is driven.

/** Every series a driver below makes move, with how. */
const COVERED: Readonly<Record<string, string>> = {
  // Output worker.
  "kvm_audio_output_frames_captured_total": "file PCM capture",
  "kvm_audio_output_packets_encoded_total": "file PCM capture",
  "kvm_audio_output_bytes_encoded_total": "file PCM capture",
  "kvm_audio_output_frames_muted_total": "PUT /api/audio/mute while capturing",
  "kvm_audio_output_xruns_total":
    "pacmd kill-source-output: the pulse plugin reports the lost record stream as -EPIPE",
  "kvm_audio_output_gap_frames_total":
    "an output worker crashed and restarted (fault switch): the time it was down",
  'kvm_audio_stage_latency_ms{stage="capture_to_encoded"}': "file PCM capture",
  'kvm_audio_stage_latency_ms{stage="read_to_encoded"}': "file PCM capture",
  // Input worker.
  "kvm_audio_input_frames_played_total": "input worker on a file PCM",
  "kvm_audio_input_packets_decoded_total": "steady microphone stream",
  "kvm_audio_input_frames_fec_total": "one sequence number skipped in a deep buffer",
  'kvm_audio_input_frames_concealed_total{reason="loss"}': "two sequence numbers skipped",
  'kvm_audio_input_frames_concealed_total{reason="drift"}':
    "the target jumps to maxDepth (jitter): the buffer is refilled by inserted frames",
  'kvm_audio_input_frames_concealed_total{reason="late"}':
    "the sender stops: frames concealed waiting for its next packet, then silence",
  "kvm_audio_input_frames_silence_total": "playback before the first packet / after the last",
  'kvm_audio_input_packets_total{result="accepted"}': "steady microphone stream",
  'kvm_audio_input_packets_total{result="duplicate"}': "a packet pushed twice",
  'kvm_audio_input_packets_total{result="late"}': "a skipped packet sent after its turn",
  'kvm_audio_input_packets_total{result="too-early"}': "a packet 40 ahead of the stream",
  "kvm_audio_input_decode_errors_total": "a code-1 packet of odd length (valid TOC, corrupt body)",
  "kvm_audio_input_drift_drops_total": "a sender 25 % faster than playback",
  "kvm_audio_input_overflow_drops_total": "a sender 25 % faster than playback (depth cap)",
  "kvm_audio_input_flushed_total": "two packets far ahead in a row: sender restart, resync",
  "kvm_audio_playout_buffered_packets": "≥ 3 while the sender runs ahead, 0 after it stops",
  "kvm_audio_playout_depth_frames": "4..maxDepth+1 while the sender runs ahead, 0 after",
  "kvm_audio_playout_target_frames": "= maxDepth with 200 ms of timestamp jitter",
  "kvm_audio_playout_jitter_ms": "≥ 150 with 200 ms of timestamp jitter",
  "kvm_audio_input_xruns_total": "PulseAudio server stopped (SIGSTOP) for 400 ms: underrun",
  'kvm_audio_stage_latency_ms{stage="received_to_played"}': "steady microphone stream",
  'kvm_audio_stage_latency_ms{stage="due_to_written"}': "steady microphone stream",
  // Main thread: hand-over, microphone intake, transports.
  'kvm_audio_stage_latency_ms{stage="encoded_to_handed"}': "the frame pump",
  'kvm_audio_stage_latency_ms{stage="encoded_to_rtp_sent"}': "RtpSender: the output worker sends",
  'kvm_audio_output_packets_sent_total{transport="websocket"}': "a listener on the stream",
  'kvm_audio_output_bytes_sent_total{transport="websocket"}': "a listener on the stream",
  'kvm_audio_output_packets_sent_total{transport="rtp"}': "RtpSender to a UDP socket",
  'kvm_audio_output_bytes_sent_total{transport="rtp"}': "RtpSender to a UDP socket",
  'kvm_audio_frames_dropped_total{reason="ring_full"}': "main thread blocked, unpaced capture",
  'kvm_audio_frames_dropped_total{reason="microphone_stopped"}':
    "a packet after POST /api/microphone/stop",
  'kvm_audio_frames_dropped_total{reason="input_ring_full"}': "200 packets pushed at once",
  'kvm_audio_frames_dropped_total{reason="rtp_other_source"}':
    "an RTP packet of another SSRC while one plays",
  'kvm_audio_frames_dropped_total{reason="listener_slow"}': "a TCP peer that never reads",
  'kvm_audio_connection_drops_total{transport="websocket"}': "the stalled peer closed as too slow",
  'kvm_audio_input_packets_received_total{transport="local"}': "pushMicrophonePacket",
  'kvm_audio_input_packets_received_total{transport="websocket"}': "talk stream",
  'kvm_audio_input_packets_received_total{transport="rtp"}': "RtpReceiver",
  "kvm_audio_input_bytes_received_total": "any microphone packet",
  'kvm_audio_input_packets_malformed_total{reason="sequence"}': "sequence -1",
  'kvm_audio_input_packets_malformed_total{reason="timestamp"}': "timestamp 2^32",
  'kvm_audio_input_packets_malformed_total{reason="size"}': "an empty packet",
  'kvm_audio_input_packets_malformed_total{reason="toc"}': "code 3 without a frame count",
  'kvm_audio_input_packets_malformed_total{reason="duration"}': "three 10 ms frames (30 ms)",
  'kvm_audio_input_packets_malformed_total{reason="rtp"}': "a 3-byte datagram to RtpReceiver",
  'kvm_audio_input_packets_malformed_total{reason="text"}': "non-JSON text on the talk stream",
  'kvm_audio_input_packets_malformed_total{reason="header"}': "5 bytes on the talk stream",
  'kvm_audio_input_packets_malformed_total{reason="version"}': "version 9 on the talk stream",
  'kvm_audio_input_packets_malformed_total{reason="channels"}': "5 channels on the talk stream",
  'kvm_audio_input_packets_malformed_total{reason="type"}':
    "INDIRECT: TalkChannel.message with a Blob (the route's sockets deliver ArrayBuffers only)",
  'kvm_audio_pipeline_restarts_total{pipeline="output"}': "fault switch (throw), GET /metrics",
  'kvm_audio_pipeline_restarts_total{pipeline="input"}': "fault switch (throw), GET /metrics",
  'kvm_audio_device_lost_total{pipeline="output"}': "pacmd kill-source-output, device pace",
  'kvm_audio_device_lost_total{pipeline="input"}': "pacmd kill-sink-input, device pace",
  "kvm_audio_rtp_send_errors_total": "RtpSender to 127.255.255.255 (the kernel refuses: EACCES)",
  "kvm_audio_rtp_dtx_not_sent_total":
    "INDIRECT: RtpSender on the service's registry fed real 1-byte DTX packets (libopus, voip); " +
    "the output presets never produce packets of ≤ 2 bytes",
  "kvm_audio_rtp_rtcp_ignored_total": "an RTCP receiver report to RtpReceiver",
};

/** Series the service exposes that no behaviour can move today, with why (see the report). */
const UNREACHABLE: Readonly<Record<string, string>> = {
  'kvm_audio_input_packets_total{result="malformed"}':
    "pushMicrophonePacket refuses empty packets and packets over 1500 bytes before the ring, " +
    "and the worker's playout buffer takes up to 1500 bytes: it never answers malformed",
  'kvm_audio_frames_dropped_total{reason="rtp_backlog"}':
    "RtpSender sends each packet at once on a non-blocking socket; only a real interface whose " +
    "queue backs up fills the socket buffer (EAGAIN/ENOBUFS) — over loopback a datagram leaves " +
    "the sender's buffer as it is sent",
};

// Under qemu (scripts/test-arm64.sh) workers start seconds late and PulseAudio cannot be used.
const IGNORE = SELF_CONTAINED_ALSA || Deno.env.get("KVM_AUDIO_TEST_EMULATED") === "1";

// ---------------------------------------------------------------------------------------------
// Reading series.

function splitKey(key: string): [string, string] {
  const i = key.indexOf("{");
  return i < 0 ? [key, ""] : [key.slice(0, i), key.slice(i + 1, -1)];
}

type HistogramJson = { count: number; buckets: unknown[] };

function isHistogram(v: unknown): v is HistogramJson {
  return typeof v === "object" && v !== null && Array.isArray((v as HistogramJson).buckets);
}

/** Every series in a metrics JSON: key → value (a histogram's count). */
function jsonSeries(json: MetricsJson): Map<string, number> {
  const out = new Map<string, number>();
  for (const group of [json.counters, json.gauges]) {
    for (const [name, v] of Object.entries(group)) {
      if (typeof v === "number") out.set(name, v);
      else for (const [labels, n] of Object.entries(v)) out.set(`${name}{${labels}}`, n);
    }
  }
  for (const [name, h] of Object.entries(json.histograms)) {
    if (isHistogram(h)) out.set(name, h.count);
    else {
      for (const [labels, s] of Object.entries(h)) out.set(`${name}{${labels}}`, s.count);
    }
  }
  return out;
}

/** Every family (from `# TYPE`) and series (key → value, a histogram's `_count`) of the text. */
function promSeries(text: string): { families: Map<string, string>; series: Map<string, number> } {
  const families = new Map<string, string>();
  const series = new Map<string, number>();
  const lines = text.split("\n").filter((l) => l !== "");
  for (const l of lines) {
    const m = /^# TYPE (\S+) (counter|gauge|histogram)$/.exec(l);
    if (m) families.set(m[1]!, m[2]!);
  }
  for (const l of lines) {
    if (l.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(l);
    assert.ok(m, `unparseable exposition line ${JSON.stringify(l)}`);
    const [, name, labels = "", value] = m;
    if (families.has(name!) && families.get(name!) !== "histogram") {
      series.set(labels === "" ? name! : `${name}{${labels}}`, Number(value));
      continue;
    }
    const h = /^(.*)_(bucket|sum|count)$/.exec(name!);
    assert.ok(h && families.get(h[1]!) === "histogram", `sample ${name} has no family`);
    const rest = labels.replace(/,?le="[^"]*"$/, "");
    const key = rest === "" ? h[1]! : `${h[1]}{${rest}}`;
    if (h[2] === "count") series.set(key, Number(value));
    else if (!series.has(key)) series.set(key, NaN);
  }
  return { families, series };
}

function valueOf(service: AudioService, key: string): number {
  return jsonSeries(service.metrics.toJSON()).get(key) ?? NaN;
}

/** Keys proven to move, with what was seen. */
const proven = new Map<string, string>();

/** {@link poll} for 15 s unless told. */
const until = (what: string, cond: () => boolean, timeoutMs = 15_000) =>
  poll(what, cond, timeoutMs);

function prove(key: string, seen: string): void {
  assert.ok(key in COVERED, `${key} is proven but not listed in COVERED`);
  proven.set(key, seen);
}

/** Waits until a counter or histogram series is above zero. */
async function moved(service: AudioService, key: string, timeoutMs = 15_000): Promise<number> {
  await until(`${key} to move`, () => valueOf(service, key) > 0, timeoutMs);
  const v = valueOf(service, key);
  prove(key, String(v));
  return v;
}

/** Waits until a gauge satisfies `ok` (described by `expected`). */
async function gauge(
  service: AudioService,
  key: string,
  expected: string,
  ok: (v: number) => boolean,
  timeoutMs = 15_000,
): Promise<number> {
  await until(`${key} ${expected} (now ${valueOf(service, key)})`, () => {
    const v = valueOf(service, key);
    return Number.isFinite(v) && ok(v);
  }, timeoutMs);
  const v = valueOf(service, key);
  prove(key, `${v} (${expected})`);
  return v;
}

/** Series and families each service exposed at the end, through its HTTP routes. */
const exposed: { where: string; families: Map<string, string>; series: Map<string, number> }[] = [];

async function recordExposed(where: string, app: ReturnType<typeof createApp>): Promise<void> {
  const json = await (await app.request("/api/metrics")).json() as MetricsJson;
  const text = await (await app.request("/metrics")).text();
  const fromJson = jsonSeries(json);
  const prom = promSeries(text);
  assert.deepEqual(
    [...prom.series.keys()].sort(),
    [...fromJson.keys()].sort(),
    `${where}: the JSON and the Prometheus text expose the same series`,
  );
  for (const [k, v] of fromJson) {
    assert.equal(prom.series.get(k), v, `${where}: ${k} has the same value in both`);
  }
  exposed.push({ where, families: prom.families, series: fromJson });
}

// ---------------------------------------------------------------------------------------------
// Drivers.

/**
 * Sends microphone packets through `pushMicrophonePacket` on the wall clock. Timestamps follow
 * the send time (so timer hiccups on a loaded machine show as no jitter at all) unless a packet
 * is asked to look late.
 */
class MicSender {
  seq = 1000;
  readonly #t0 = performance.now();
  #i = 0;
  constructor(readonly service: AudioService, readonly packets: Uint8Array[]) {}

  push(seq: number, opts: { data?: Uint8Array; lateMs?: number } = {}): string {
    const data = opts.data ?? this.packets[this.#i++ % this.packets.length]!;
    const ts = Math.round((performance.now() - this.#t0 + 10_000 - (opts.lateMs ?? 0)) * 48);
    return this.service.pushMicrophonePacket(data, seq & 0xffff, ts >>> 0, "local");
  }

  next(opts: { data?: Uint8Array; lateMs?: number } = {}): string {
    return this.push(this.seq++, opts);
  }

  /**
   * Calls `each(k)` for packet k = 0, 1, … every `periodMs` (catching up after timer delays)
   * until `done()` holds (checked every 50 ms) or `timeoutMs` passes; returns whether done.
   */
  async run(
    periodMs: number,
    timeoutMs: number,
    each: (k: number) => void,
    done: () => boolean,
  ): Promise<boolean> {
    const start = performance.now();
    let k = 0, checked = start;
    for (;;) {
      const now = performance.now();
      const due = Math.floor((now - start) / periodMs) + 1;
      while (k < due) each(k++);
      if (now - checked >= 50) {
        checked = now;
        if (done()) return true;
      }
      if (now - start > timeoutMs) return done();
      await sleep(4);
    }
  }
}

// ---------------------------------------------------------------------------------------------

Deno.test({
  name: "metrics coverage: every metric series the service exposes is moved by real behaviour",
  ignore: IGNORE,
  async fn(t) {
    await t.step("output, microphone and transports on file PCMs (clock pace)", async () => {
      await using dir = await tempDir();
      await writeRaw(
        `${dir.path}/in.raw`,
        tone({ freq: 440, channels: 2, frames: 48000 * 2, amplitude: 0.4 }),
      );
      const cfg = await writeAlsaConfig(dir.path, {
        kvm_mc_capture: { type: "file", infile: `${dir.path}/in.raw` },
        kvm_mc_playback: { type: "file", outfile: `${dir.path}/out.raw` },
      });
      using _cfg = useAlsaConfig(cfg);
      const maxDepth = 6;
      await using service = new AudioService({
        capture: "kvm_mc_capture",
        playback: "kvm_mc_playback",
        pace: "clock",
        minDepth: 1,
        maxDepth,
        metricsIntervalMs: 50,
      });
      const ac = new AbortController();
      const app = createApp(service, { signal: ac.signal });
      {
        await using server = serveApp(app, ac);
        service.start();

        // --- Output pipeline and its transports.
        await using listener = new WsClient(server.url("/api/audio/stream"));
        await listener.opened;
        const sink = await udpSink({ keep: false });
        const rtp = await RtpSender.open(service, { destinations: [`127.0.0.1:${sink.port}`] });
        // The loopback broadcast address: never leaves the host, the kernel refuses (EACCES).
        const refused = await RtpSender.open(service, {
          destinations: [`127.255.255.255:${sink.port}`],
        });
        try {
          await until(
            "packets at the listener and the UDP sink",
            () => listener.binary >= 5 && sink.count >= 5,
          );
          for (
            const key of [
              "kvm_audio_output_frames_captured_total",
              "kvm_audio_output_packets_encoded_total",
              "kvm_audio_output_bytes_encoded_total",
              'kvm_audio_stage_latency_ms{stage="capture_to_encoded"}',
              'kvm_audio_stage_latency_ms{stage="read_to_encoded"}',
              'kvm_audio_stage_latency_ms{stage="encoded_to_handed"}',
              'kvm_audio_stage_latency_ms{stage="encoded_to_rtp_sent"}',
              'kvm_audio_output_packets_sent_total{transport="websocket"}',
              'kvm_audio_output_bytes_sent_total{transport="websocket"}',
              'kvm_audio_output_packets_sent_total{transport="rtp"}',
              'kvm_audio_output_bytes_sent_total{transport="rtp"}',
              "kvm_audio_rtp_send_errors_total",
            ]
          ) await moved(service, key);
          assert.ok(refused.stats.destinations[0]!.errors > 0);
          assert.equal(refused.stats.destinations[0]!.sent, 0);

          const mute = (muted: boolean) =>
            app.request("/api/audio/mute", {
              method: "PUT",
              headers: { "content-type": "application/json" },
              body: JSON.stringify({ muted }),
            });
          assert.equal((await mute(true)).status, 200);
          await moved(service, "kvm_audio_output_frames_muted_total");
          assert.equal((await mute(false)).status, 200);
        } finally {
          await rtp.close();
          await refused.close();
          await sink.close();
        }

        // DTX: the service's output presets never yield packets of ≤ 2 bytes with libopus
        // (CELT codes digital silence in 3), so the sender is fed real DTX packets of the voip
        // microphone preset through a source sharing the service's registry.
        {
          const silence = micPackets("low", new Int16Array(48000));
          const dtx = silence.filter((p) => p.length <= 2);
          assert.ok(dtx.length > 0, "libopus produced DTX packets");
          const listeners = new Set<FrameListener>();
          const dtxSink = await udpSink({ keep: false });
          const sender = await RtpSender.open({
            metrics: service.metrics,
            subscribe(l: FrameListener) {
              listeners.add(l);
              return () => listeners.delete(l);
            },
          }, { destinations: [`127.0.0.1:${dtxSink.port}`] });
          dtx.forEach((data, i) => {
            const f: EncodedFrame = {
              data,
              seq: i,
              timestamp: i * 960,
              samples: 960,
              channels: 1,
              silence: true,
              capturedAt: Date.now(),
            };
            for (const l of listeners) l(f);
          });
          await sender.close();
          await dtxSink.close();
          assert.equal(sender.stats.dtxNotSent, dtx.length);
          await moved(service, "kvm_audio_rtp_dtx_not_sent_total");
        }
        await service.stopOutput();

        // --- Microphone pipeline: the playout buffer's every outcome.
        const mic = new MicSender(
          service,
          micPackets("high", tone({ freq: 600, frames: 48000, amplitude: 0.4 })),
        );
        const json = () => jsonSeries(service.metrics.toJSON());
        const v = (key: string) => json().get(key) ?? 0;
        const corrupt = new Uint8Array([0xf1, 1, 2, 3]); // code 1, 2 × 10 ms, odd body length

        // Steady: one packet per 20 ms; every 25, a corrupt packet and a duplicate (repeated: a
        // catch-up burst on a loaded machine may have one dropped for depth before it is played).
        await mic.run(20, 15_000, (k) => {
          if (k % 25 === 20) mic.next({ data: corrupt });
          else if (k % 25 === 10) {
            mic.push(mic.seq);
            mic.next();
          } else mic.next();
        }, () =>
          v("kvm_audio_input_decode_errors_total") > 0 &&
          v('kvm_audio_input_packets_total{result="duplicate"}') > 0 &&
          v('kvm_audio_stage_latency_ms{stage="received_to_played"}') > 0);
        for (
          const key of [
            "kvm_audio_input_frames_silence_total",
            "kvm_audio_input_frames_played_total",
            "kvm_audio_input_packets_decoded_total",
            'kvm_audio_input_packets_total{result="accepted"}',
            'kvm_audio_stage_latency_ms{stage="received_to_played"}',
            'kvm_audio_stage_latency_ms{stage="due_to_written"}',
            "kvm_audio_input_decode_errors_total",
            'kvm_audio_input_packets_total{result="duplicate"}',
            'kvm_audio_input_packets_received_total{transport="local"}',
            "kvm_audio_input_bytes_received_total",
          ]
        ) await moved(service, key, 1000);

        // 25 % faster than playback: the buffer fills to its cap (overflow drops) and stays high
        // (drift drops). In that deep buffer, every 60 packets: two sequence numbers missing (PLC),
        // one missing (FEC), and the first missing one sent again after its turn (late).
        let maxDepthSeen = 0, maxBuffered = 0;
        let skipped = -1;
        await mic.run(16, 15_000, (k) => {
          const phase = k % 60;
          if (phase === 40) {
            skipped = mic.seq;
            mic.seq += 2;
          } else if (phase === 50) mic.seq += 1;
          else if (phase === 0 && skipped >= 0) mic.push(skipped);
          mic.next();
        }, () => {
          const s = json();
          maxDepthSeen = Math.max(maxDepthSeen, s.get("kvm_audio_playout_depth_frames") ?? 0);
          maxBuffered = Math.max(maxBuffered, s.get("kvm_audio_playout_buffered_packets") ?? 0);
          return [
            "kvm_audio_input_drift_drops_total",
            "kvm_audio_input_overflow_drops_total",
            "kvm_audio_input_frames_fec_total",
            'kvm_audio_input_frames_concealed_total{reason="loss"}',
            'kvm_audio_input_packets_total{result="late"}',
          ].every((key) => (s.get(key) ?? 0) > 0) && maxDepthSeen >= 4 && maxBuffered >= 3;
        });
        for (
          const key of [
            "kvm_audio_input_drift_drops_total",
            "kvm_audio_input_overflow_drops_total",
            "kvm_audio_input_frames_fec_total",
            'kvm_audio_input_frames_concealed_total{reason="loss"}',
            'kvm_audio_input_packets_total{result="late"}',
          ]
        ) await moved(service, key, 1000);
        assert.ok(
          maxDepthSeen >= 4 && maxDepthSeen <= maxDepth + 1,
          `depth reached ${maxDepthSeen}, expected 4..${maxDepth + 1}`,
        );
        assert.ok(maxBuffered >= 3, `buffered reached ${maxBuffered}`);

        // A packet 40 ahead is too early; the next one after it means the sender restarted:
        // the buffer is flushed and the stream starts again there.
        // (Again after refilling the buffer, should a loaded machine have let it run dry first.)
        const tooEarly = 'kvm_audio_input_packets_total{result="too-early"}';
        const flushed = "kvm_audio_input_flushed_total";
        for (let attempt = 0; attempt < 3 && !(v(tooEarly) > 0 && v(flushed) > 0); attempt++) {
          if (attempt > 0) await mic.run(16, 600, () => mic.next(), () => false);
          const base = mic.seq;
          mic.push(base + 40);
          mic.push(base + 41);
          mic.seq = base + 42;
          await until("the resync", () => v(tooEarly) > 0 && v(flushed) > 0, 2000).catch(() => {});
        }
        await moved(service, tooEarly, 1000);
        await moved(service, flushed, 1000);

        // 200 ms of timestamp jitter: the jitter estimate follows, the target jumps to maxDepth,
        // and the buffer, now far below it, is refilled by inserted concealment frames.
        await mic.run(20, 15_000, (k) => mic.next({ lateMs: k % 2 === 1 ? 200 : 0 }), () => {
          const s = json();
          return s.get("kvm_audio_playout_target_frames") === maxDepth &&
            (s.get("kvm_audio_playout_jitter_ms") ?? 0) >= 150 &&
            (s.get('kvm_audio_input_frames_concealed_total{reason="drift"}') ?? 0) > 0;
        });
        await moved(service, 'kvm_audio_input_frames_concealed_total{reason="drift"}', 1000);
        await gauge(
          service,
          "kvm_audio_playout_target_frames",
          `= maxDepth ${maxDepth}`,
          (x) => x === maxDepth,
          1000,
        );
        await gauge(
          service,
          "kvm_audio_playout_jitter_ms",
          "150..1000 ms for 200 ms injected",
          (x) => x >= 150 && x <= 1000,
          1000,
        );

        // The sender stops: the buffer drains to nothing.
        await gauge(
          service,
          "kvm_audio_playout_buffered_packets",
          `0 after the sender stopped (max ${maxBuffered} while ahead)`,
          (x) => x === 0,
        );
        await gauge(
          service,
          "kvm_audio_playout_depth_frames",
          `0 after the sender stopped (max ${maxDepthSeen} while ahead)`,
          (x) => x === 0,
        );
        // Nothing buffered: frames concealed waiting for the next packet (it may be late).
        await moved(service, 'kvm_audio_input_frames_concealed_total{reason="late"}', 2000);

        // --- Malformed local packets, each refused before the ring.
        const good = mic.packets[0]!;
        const refusals: [string, () => string][] = [
          ["sequence", () => service.pushMicrophonePacket(good, -1, 0)],
          ["timestamp", () => service.pushMicrophonePacket(good, 1, 2 ** 32)],
          ["size", () => service.pushMicrophonePacket(new Uint8Array(0), 1, 0)],
          ["toc", () => service.pushMicrophonePacket(new Uint8Array([0x03]), 1, 0)],
          [
            "duration",
            () => service.pushMicrophonePacket(new Uint8Array([0xf3, 0x03, 0, 0, 0]), 1, 0),
          ],
        ];
        for (const [reason, push] of refusals) {
          assert.equal(push(), "malformed", reason);
          await moved(service, `kvm_audio_input_packets_malformed_total{reason="${reason}"}`, 1000);
        }

        // --- RTP in: a valid packet, a runt, an RTCP receiver report.
        {
          const receiver = await RtpReceiver.listen(service, { port: 0 });
          const socket = await udpSender();
          const send = (b: Uint8Array) => socket.send(b, receiver.port);
          try {
            await send(writeRtp({ payloadType: 111, sequence: 7, timestamp: 960, ssrc: 9 }, good));
            await send(writeRtp({ payloadType: 111, sequence: 9, timestamp: 0, ssrc: 10 }, good));
            await send(new Uint8Array([0x80, 111, 0]));
            await send(new Uint8Array([0x80, 201, 0, 1, 0, 0, 0, 9]));
            await moved(service, 'kvm_audio_input_packets_received_total{transport="rtp"}');
            await moved(service, 'kvm_audio_input_packets_malformed_total{reason="rtp"}');
            await moved(service, "kvm_audio_rtp_rtcp_ignored_total");
            await moved(service, 'kvm_audio_frames_dropped_total{reason="rtp_other_source"}');
          } finally {
            await socket.close();
            await receiver.close();
          }
        }

        // --- The talk stream: a good frame and each malformed kind.
        {
          await using talker = new WsClient(server.url("/api/microphone/stream"));
          await talker.opened;
          await until("the talk hello", () => talker.texts.length >= 1);
          talker.ws.send(encodeFrame({ flags: 0, channels: 1, seq: 5, timestamp: 0 }, good));
          talker.ws.send(new Uint8Array([1, 0, 1, 0, 0])); // shorter than a header
          const v9 = encodeFrame({ flags: 0, channels: 1, seq: 6, timestamp: 0 }, good);
          v9[0] = 9;
          talker.ws.send(v9);
          talker.ws.send(new Uint8Array([1, 0, 5, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0xfc])); // 5 channels
          talker.ws.send("not a control message");
          for (const reason of ["header", "version", "channels", "text"]) {
            await moved(service, `kvm_audio_input_packets_malformed_total{reason="${reason}"}`);
          }
          await moved(service, 'kvm_audio_input_packets_received_total{transport="websocket"}');
        }
        // A socket that is neither text nor ArrayBuffer (a Blob, as a socket left with the default
        // binaryType would deliver): the route's sockets never do this, the channel still counts it.
        {
          const talk = new TalkChannel(service);
          const socket = { readyState: 1, send() {}, close() {} };
          assert.ok(talk.open(socket, { takeover: false, label: "blob" }));
          talk.message(socket, new Blob([good.slice()]));
          talk.close();
          await moved(service, 'kvm_audio_input_packets_malformed_total{reason="type"}', 1000);
        }

        // --- Input ring overflow, then packets while the microphone is stopped.
        for (let i = 0; i < 200; i++) mic.next();
        await moved(service, 'kvm_audio_frames_dropped_total{reason="input_ring_full"}', 1000);
        assert.equal((await app.request("/api/microphone/stop", { method: "POST" })).status, 200);
        assert.equal(mic.next(), "not-running");
        await moved(service, 'kvm_audio_frames_dropped_total{reason="microphone_stopped"}', 1000);
      }
      await service.close();
      await recordExposed("file PCMs, clock pace", app);
    });

    await t.step(
      "unpaced capture: ring full, a listener that never reads",
      async () => {
        await using dir = await tempDir();
        // One second of tone; past its end the file PCM leaves the buffer as it was (the last period
        // repeats): loud packets for as long as capture runs.
        await writeRaw(`${dir.path}/in.raw`, tone({ freq: 1000, frames: 48000, amplitude: 0.4 }));
        const cfg = await writeAlsaConfig(dir.path, {
          kvm_mc_fast: { type: "file", infile: `${dir.path}/in.raw` },
        });
        using _cfg = useAlsaConfig(cfg);
        await using service = new AudioService({
          capture: "kvm_mc_fast",
          captureChannels: 1,
          playback: null,
          outputPreset: "ultra",
          pace: "device", // the file PCM over null has no clock: as fast as the encoder goes
          maxCaptureSamples: 48000 * 600,
          metricsIntervalMs: 50,
        });
        const ac = new AbortController();
        const app = createApp(service, {
          hub: { maxQueue: 50, closeAfterMs: 300 },
          signal: ac.signal,
        });
        {
          await using server = serveApp(app, ac);
          // The stalled peer: a raw TCP connection that does the handshake and never reads again.
          const { conn } = await rawWebSocket(server.port, "/api/audio/stream");
          try {
            service.start();
            await moved(service, 'kvm_audio_frames_dropped_total{reason="listener_slow"}', 30_000);
            await moved(service, 'kvm_audio_connection_drops_total{transport="websocket"}', 30_000);
            // Block the main thread while the worker fills the 64-slot output ring.
            const key = 'kvm_audio_frames_dropped_total{reason="ring_full"}';
            for (let attempt = 0; attempt < 10 && !(valueOf(service, key) > 0); attempt++) {
              const end = performance.now() + 250;
              while (performance.now() < end) { /* busy: the pump cannot run */ }
              await sleep(300);
            }
            await moved(service, key, 1000);
          } finally {
            conn.close();
          }
        }
        await service.close();
        await recordExposed("unpaced capture", app);
      },
    );

    await t.step(
      "PulseAudio: a playback underrun, a lost record stream, worker restarts",
      async () => {
        await using pulse = await startPulse();
        using _cfg = pulse.use();
        await using service = new AudioService({
          capture: pulse.pcm.capture,
          playback: pulse.pcm.playback,
          // The wall clock paces both loops, so the capture loop reads without polling: a broken
          // record stream then shows in `snd_pcm_readi` as -EPIPE (an xrun), never in poll.
          pace: "clock",
          allowFaults: true,
          metricsIntervalMs: 50,
          supervisor: { stallMs: 5000 },
        });
        const app = createApp(service);
        service.subscribe(() => {}); // the output worker encodes only while someone listens
        service.start();
        await until(
          "both pipelines running",
          () =>
            valueOf(service, "kvm_audio_input_frames_played_total") > 20 &&
            valueOf(service, "kvm_audio_output_packets_encoded_total") > 5,
        );

        // Stop the server: the null sink catches up on resume and the playback stream underflows.
        const inXruns = "kvm_audio_input_xruns_total";
        for (let attempt = 0; attempt < 3 && !(valueOf(service, inXruns) > 0); attempt++) {
          Deno.kill(pulse.pid, "SIGSTOP");
          try {
            await sleep(400);
          } finally {
            Deno.kill(pulse.pid, "SIGCONT");
          }
          await until(inXruns, () => valueOf(service, inXruns) > 0, 3000).catch(() => {});
        }
        await moved(service, inXruns, 1000);

        // Kill the record stream: the next read reports an xrun, and the recovery opens a new one.
        const outXruns = "kvm_audio_output_xruns_total";
        for (let attempt = 0; attempt < 3 && !(valueOf(service, outXruns) > 0); attempt++) {
          await killStreams(pulse, "record");
          await until(outXruns, () => valueOf(service, outXruns) > 0, 3000).catch(() => {});
        }
        await moved(service, outXruns, 1000);

        // Crash both workers through the test-only fault switch; the supervisors restart them, and
        // a scrape of /metrics brings the restart counts into the registry.
        for (const kind of ["output", "input"] as const) {
          const before = service.supervisors[kind]!.status.restarts;
          Atomics.store(service.controlBlock(kind)!, CONTROL.fault, FAULT.throw);
          await until(
            `a ${kind} restart`,
            () => service.supervisors[kind]!.status.restarts > before,
          );
        }
        // The restarted output worker moved the RTP timestamp on by the time it was down.
        await moved(service, "kvm_audio_output_gap_frames_total", 5000);
        const text = await (await app.request("/metrics")).text();
        for (const kind of ["output", "input"]) {
          assert.match(
            text,
            new RegExp(`^kvm_audio_pipeline_restarts_total\\{pipeline="${kind}"\\} [1-9]`, "m"),
          );
          await moved(service, `kvm_audio_pipeline_restarts_total{pipeline="${kind}"}`, 1000);
        }
        await service.close();
        await recordExposed("PulseAudio, clock pace", app);
      },
    );

    await t.step("PulseAudio, device pace: streams killed mid-run, devices reopened", async () => {
      await using pulse = await startPulse();
      using _cfg = pulse.use();
      await using service = new AudioService({
        capture: pulse.pcm.capture,
        playback: pulse.pcm.playback,
        metricsIntervalMs: 50,
      });
      const app = createApp(service);
      service.subscribe(() => {}); // the output worker encodes only while someone listens
      service.start();
      await until(
        "both pipelines running",
        () =>
          valueOf(service, "kvm_audio_input_frames_played_total") > 20 &&
          valueOf(service, "kvm_audio_output_packets_encoded_total") > 5,
      );
      // A kill that lands in a transfer is an xrun, mended in place; one in poll is a lost device.
      // Kill until each pipeline has lost its device once.
      for (const [which, pipeline] of [["record", "output"], ["playback", "input"]] as const) {
        const key = `kvm_audio_device_lost_total{pipeline="${pipeline}"}`;
        for (let attempt = 0; attempt < 5 && !(valueOf(service, key) > 0); attempt++) {
          await killStreams(pulse, which);
          // A reopened PulseAudio stream takes ≈ 2 s to deliver again: wait for it before a
          // further kill (there must be a stream to kill).
          await until(key, () => valueOf(service, key) > 0, 4000).catch(() => {});
        }
        await moved(service, key, 1000);
      }
      await service.close();
      await recordExposed("PulseAudio, device pace", app);
    });

    await t.step("every exposed series is covered, and every covered one moved", () => {
      const families = new Set(
        [...Object.keys(COVERED), ...Object.keys(UNREACHABLE)].map((k) => splitKey(k)[0]),
      );
      const problems: string[] = [];
      for (const { where, families: f, series } of exposed) {
        for (const name of f.keys()) {
          if (!families.has(name)) {
            problems.push(`${where}: metric ${name} has no series in COVERED: drive it here`);
          }
        }
        for (const [key, value] of series) {
          if (key in UNREACHABLE) {
            if (value !== 0) {
              problems.push(`${where}: ${key} moved (${value}): move it to COVERED with a driver`);
            }
          } else if (!(key in COVERED)) {
            problems.push(`${where}: series ${key} is exposed but not covered: drive it here`);
          }
        }
      }
      const seen = new Set(exposed.flatMap((e) => [...e.series.keys()]));
      for (const key of Object.keys(COVERED)) {
        if (!proven.has(key)) problems.push(`${key} is listed as covered but was never moved`);
        if (!seen.has(key)) problems.push(`${key} is listed as covered but no service exposes it`);
      }
      for (const key of Object.keys(UNREACHABLE)) {
        if (!seen.has(key)) problems.push(`${key} is listed as unreachable but is not exposed`);
      }
      if (Deno.env.get("KVM_AUDIO_METRICS_COVERAGE") === "print") {
        for (const [key, how] of Object.entries(COVERED)) {
          console.log(`${key} = ${proven.get(key)} — ${how}`);
        }
      }
      assert.deepEqual(problems, []);
    });
  },
});
