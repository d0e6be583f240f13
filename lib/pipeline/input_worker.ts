/**
 * Input pipeline worker: received Opus packets (input ring) → adaptive playout buffer → Opus
 * decode (normal, FEC from the next packet, or PLC) → ALSA playback. Started by the supervisor
 * with an {@link InputInit} message.
 *
 * Each playback period the worker drains the input ring into the playout buffer (one copy of at
 * most 1500 bytes per packet: reordering needs storage of its own, and the ring's slots must be
 * released in order), asks the buffer what to play, decodes straight from the buffer's pool into
 * the PCM buffer and writes it to the device. The device's clock paces the loop; with an unpaced
 * virtual device ("clock" pacing) the wall clock does.
 *
 * The frame duration follows the packets (their TOC, read by the main thread, comes in the slot's
 * `samples`): a sender may switch between 10 and 20 ms frames and the buffer follows.
 *
 * **RTP input** does not pass through the main thread: the worker reads the UDP socket the main
 * thread lent it (`AudioService.attachRtpInput`) each time it wakes for the device, taking every
 * waiting datagram with the kernel's arrival time (so jitter is measured as the packets came),
 * and checks and counts each as the main thread's intake would. Datagrams that came before the
 * worker started (the microphone was stopped, or the worker restarting) are dropped unread and
 * counted as `frames_dropped_total{reason="microphone_stopped"}`, as the main thread counts
 * packets pushed while the microphone is stopped. Flat pacing reads the ring only.
 *
 * **Flat pacing** (`pace: "flat"`, benchmarks and offline decoding to an unpaced device): there is
 * no clock but the packets. Each loop turn takes one packet from the ring (waiting for it when
 * the ring is empty — never concealing for want of time), hands it to the playout buffer as
 * arriving on a virtual clock that advances one frame per played frame, and plays one frame. A
 * steady stream thus plays packet for packet at the buffer's minimum depth; a lost packet is
 * concealed and adds a frame of depth, which the drift control takes back. The received→played
 * stage still measures real time, from the packet's push to its playing.
 *
 * @module
 */

import type { Pcm } from "../../ffi/alsa.ts";
import { OpusDecoder, OpusError } from "../../ffi/opus.ts";
import { Resampler } from "../../ffi/speexdsp.ts";
import { realtimeMs, UdpSocket } from "../../ffi/udp.ts";
import { FrameRing, type ReadSlot } from "../frame_ring.ts";
import { Registry } from "../metrics.ts";
import { PlayoutBuffer } from "../playout.ts";
import { frameSamples, MICROPHONE_PRESETS, PRESET_NAMES } from "../quality.ts";
import { CONTROL, epochMs, INPUT_FLAG, type InputInit } from "./messages.ts";
import { inputMetrics, microphoneMalformedSeries, transportMetrics } from "./pipeline_metrics.ts";
import { checkMicrophonePacket } from "./microphone_packet.ts";
import { readRtp, RTP_MALFORMED_REASONS, RTP_STATS, rtpMetrics } from "../transport/rtp_header.ts";
import {
  ClockPacer,
  lastWords,
  MetricsPoster,
  runDevice,
  runPipeline,
  WorkerControl,
} from "./worker_common.ts";

const MAX_FRAME = 5760; // 120 ms at 48 kHz: the longest packet (microphone_packet.ts)

/**
 * How long the RTP source playing must have been quiet before another SSRC takes over at its
 * first packet (a sender restarted with a new SSRC). Longer than a network's jitter, so that a
 * straggler does not; shorter than a restart usually takes. A DTX sender is quiet for up to
 * 400 ms, so a foreign packet then takes over — and the sender's next two packets take it back.
 */
const RTP_SOURCE_QUIET_MS = 200;

/** Brings a counter up to a total the playout buffer keeps. */
function syncCounter(c: { value(): number; inc(n: number): void }, total: number): void {
  const have = c.value();
  if (total > have) c.inc(total - have);
}

/** {@link syncCounter} for one labelled series. */
function syncSeries(c: { readonly value: number; inc(n: number): void }, total: number): void {
  if (total > c.value) c.inc(total - c.value);
}

function run(init: InputInit): void {
  const ctl = new WorkerControl(init);
  // A predecessor terminated mid-read left the RTP busy flag raised; this worker is the reader now.
  Atomics.store(ctl.words, CONTROL.rtpBusy, 0);
  const ring = FrameRing.attach(init.ring);
  const registry = new Registry();
  const m = inputMetrics(registry);
  const poster = new MetricsPoster(registry, init.metricsIntervalMs ?? 500);
  const preset = MICROPHONE_PRESETS[PRESET_NAMES[ctl.get(CONTROL.preset)] ?? "high"];
  ctl.set(CONTROL.appliedPreset, PRESET_NAMES.indexOf(preset.name));
  let frame = frameSamples(preset);
  const playout = new PlayoutBuffer({
    frameSamples: frame,
    minDepth: init.minDepth ?? 1,
    maxDepth: init.maxDepth ?? 8,
  });
  const decCh = init.deviceChannels === 1 ? 1 : 2;
  const decoder = OpusDecoder.create({ channels: decCh });
  ctl.hold("codec", decoder);
  // Arrival time of each buffered sequence number, for the received→played stage.
  const arrival = new Float64Array(65536);
  const results = {
    accepted: m.packets.labels({ result: "accepted" }),
    duplicate: m.packets.labels({ result: "duplicate" }),
    late: m.packets.labels({ result: "late" }),
    "too-early": m.packets.labels({ result: "too-early" }),
    malformed: m.packets.labels({ result: "malformed" }),
  };
  const plcLoss = m.concealed.labels({ reason: "loss" });
  const plcDrift = m.concealed.labels({ reason: "drift" });
  const plcLate = m.concealed.labels({ reason: "late" });
  // RTP input read here (see drainRtp), counted in the series the main thread's intake uses.
  const rtpStats = new Int32Array(init.rtpStats);
  /** Datagrams that arrived before this worker started are dropped as stale. */
  const liveSince = epochMs();
  const datagram = new Uint8Array(65_535); // the largest UDP payload: nothing is cut
  let rtpSocket: UdpSocket | null = null;
  /**
   * The RTP source playing now (see `takeRtp`): its SSRC (null: none yet), when its last packet
   * came, the SSRC it replaced, and another source's last packet (a takeover candidate).
   */
  let rtpSource: number | null = null;
  let rtpSourceAt = -Infinity;
  let rtpReplaced: number | null = null;
  let rtpCandidate: number | null = null;
  let rtpCandidateSeq = -1;
  /** Where the last packet taken came from: the ring (WebSocket, local) or RTP (null: none). */
  let lastFrom: "ring" | "rtp" | null = null;
  const rtpSeries = (() => {
    const t = transportMetrics(registry);
    return {
      received: t.received.labels({ transport: "rtp" }),
      bytes: t.receivedBytes,
      invalid: t.malformed.labels({ reason: "rtp" }),
      stale: t.dropped.labels({ reason: "microphone_stopped" }),
      otherSource: t.dropped.labels({ reason: "rtp_other_source" }),
      rtcp: rtpMetrics(registry).rtcpIgnored,
      malformed: microphoneMalformedSeries(t),
    };
  })();

  let end: "ended" | "stopped" | null = null;
  try {
    const opts = () => {
      const period = Math.round((init.deviceRate * frame) / 48000);
      return {
        stream: "playback" as const,
        channels: init.deviceChannels,
        rate: init.deviceRate,
        periodFrames: period,
        bufferFrames: period * 3,
      };
    };
    end = runDevice(ctl, init.device, opts, play) ? "ended" : "stopped";
  } finally {
    ctl.release("codec", decoder);
    lastWords(end, registry, poster);
    ctl.state = "stopped";
  }

  /**
   * Hands a claimed packet to the playout buffer as arriving at `arrivalMs`. A new stream when
   * its sender marked it so (a new talker connection) or when RTP played last: the two
   * transports' numbers have nothing to do with each other.
   */
  function accept(slot: ReadSlot, arrivalMs: number): void {
    const newStream = (slot.flags & INPUT_FLAG.newStream) !== 0 || lastFrom === "rtp";
    lastFrom = "ring";
    take(slot.data, slot.seq, slot.t[1]! >>> 0, slot.samples, arrivalMs, slot.t[0]!, newStream);
  }

  /**
   * Hands a packet to the playout buffer (which copies it) as arriving at `arrivalMs`; it was
   * received at `receivedAt` (the start of its received→played stage). `newStream`: the first
   * packet of a new sender (see `PlayoutBuffer.push`).
   */
  function take(
    data: Uint8Array,
    seq16: number,
    timestamp: number,
    samples: number,
    arrivalMs: number,
    receivedAt: number,
    newStream: boolean,
  ): void {
    const seq = seq16 & 0xffff;
    const resyncs = playout.stats.resyncs;
    const r = playout.push(seq, timestamp, arrivalMs, data, newStream);
    results[r].inc();
    // A new stream (marked, or a sender restart the buffer found): the decoder's memory is of the
    // last one. Kept, it turned a new encoder's first packets into a full-scale burst (30–40 ms,
    // peak 32768, from encoders of the "audio" application: ffmpeg's and GStreamer's default).
    if (playout.stats.resyncs !== resyncs) decoder.reset();
    if (r !== "accepted") return;
    arrival[seq] = receivedAt;
    // Only a packet the buffer took may change the frame duration (and so reopen the device): a
    // stray of another length rejected as late or duplicate reopened it twice, and the stall
    // overflowed the input ring.
    if (samples !== frame && samples > 0 && samples <= MAX_FRAME) {
      frame = samples;
      playout.setFrameSamples(samples);
    }
  }

  /** Takes every queued packet and datagram; true once the ring ended and is empty. */
  function drain(): boolean {
    for (let slot = ring.claim(); slot !== null; slot = ring.claim()) accept(slot, slot.t[0]!);
    drainRtp();
    return ring.ended && ring.available === 0;
  }

  /**
   * Reads every datagram waiting on the RTP input socket the main thread lent
   * (`AudioService.attachRtpInput`), each as arriving when the kernel received it. Marks itself
   * busy first and only then looks at the descriptor: the main thread clears the descriptor and
   * waits for "not busy" before it closes the socket.
   */
  function drainRtp(): void {
    Atomics.store(ctl.words, CONTROL.rtpBusy, 1);
    try {
      const fd = Atomics.load(ctl.words, CONTROL.rtpFd);
      if (fd < 0) return;
      if (rtpSocket?.fd !== fd) rtpSocket = UdpSocket.borrow(fd);
      const pt = Atomics.load(ctl.words, CONTROL.rtpPayloadType);
      let offset = NaN;
      for (;;) {
        const n = rtpSocket.receive(datagram);
        if (n < 0) break; // -EAGAIN: nothing (more) waiting
        // The kernel's clock is CLOCK_REALTIME; ours is timeOrigin + performance.now().
        if (Number.isNaN(offset)) offset = epochMs() - realtimeMs();
        const arrivalMs = rtpSocket.arrivalMs() + offset || epochMs();
        if (arrivalMs < liveSince) {
          // It came while no worker was reading (microphone stopped, or a restart): stale.
          Atomics.add(rtpStats, RTP_STATS.datagrams, 1);
          Atomics.add(rtpStats, RTP_STATS.stale, 1);
          rtpSeries.stale.inc();
          continue;
        }
        takeRtp(datagram.subarray(0, n), pt < 0 ? null : pt, arrivalMs);
      }
    } finally {
      Atomics.store(ctl.words, CONTROL.rtpBusy, 0);
    }
  }

  /** Counts one RTP datagram as `RtpReceiver` accounts for it and plays its Opus payload. */
  function takeRtp(bytes: Uint8Array, payloadType: number | null, arrivalMs: number): void {
    Atomics.add(rtpStats, RTP_STATS.datagrams, 1);
    const r = readRtp(bytes, { payloadType });
    if (r.kind === "malformed") {
      Atomics.add(rtpStats, RTP_STATS.malformed + RTP_MALFORMED_REASONS.indexOf(r.reason), 1);
      rtpSeries.invalid.inc();
      return;
    }
    if (r.kind === "rtcp") {
      Atomics.add(rtpStats, RTP_STATS.rtcp, 1);
      rtpSeries.rtcp.inc();
      return;
    }
    const p = r.packet;
    Atomics.add(rtpStats, RTP_STATS.accepted, 1);
    rtpSeries.received.inc();
    rtpSeries.bytes.inc(p.payload.length);
    const samples = checkMicrophonePacket(p.payload, p.sequence, p.timestamp);
    if (typeof samples === "string") {
      rtpSeries.malformed[samples].inc();
      return;
    }
    const ssrc = p.ssrc | 0;
    let newSource = false;
    if (ssrc === rtpSource) {
      // A packet of the source playing between two of another's: those are not in a row.
      rtpCandidate = null;
    } else {
      // Another SSRC is another sender. It takes over — its first packet starting a new stream
      // in the playout buffer, whatever its numbers — when no source played yet, when the
      // current one has been quiet for RTP_SOURCE_QUIET_MS (a restarted sender), or when it
      // sends two packets in sequence with none of the current one's between (its first is then
      // dropped): two senders at once do not take turns — each takeover flushed the other's
      // packets, and neither was heard — the first keeps playing. A single stray packet (a
      // straggler of the sender just replaced, which may only come back the second way, or
      // another's) is dropped: taken as a new stream it flushed the current sender's buffer,
      // and the current sender's next packet flushed it again.
      const quiet = arrivalMs - rtpSourceAt >= RTP_SOURCE_QUIET_MS && ssrc !== rtpReplaced;
      const follows = ssrc === rtpCandidate && p.sequence === ((rtpCandidateSeq + 1) & 0xffff);
      if (rtpSource !== null && !quiet && !follows) {
        rtpCandidate = ssrc;
        rtpCandidateSeq = p.sequence;
        Atomics.add(rtpStats, RTP_STATS.otherSource, 1);
        rtpSeries.otherSource.inc();
        return;
      }
      if (Atomics.load(rtpStats, RTP_STATS.hasSsrc) === 0) {
        Atomics.store(rtpStats, RTP_STATS.hasSsrc, 1);
      } else if (Atomics.load(rtpStats, RTP_STATS.ssrc) !== ssrc) {
        Atomics.add(rtpStats, RTP_STATS.ssrcChanges, 1);
      }
      Atomics.store(rtpStats, RTP_STATS.ssrc, ssrc);
      rtpReplaced = rtpSource;
      rtpSource = ssrc;
      rtpCandidate = null;
      newSource = true;
    }
    rtpSourceAt = arrivalMs;
    const newStream = newSource || lastFrom !== "rtp";
    lastFrom = "rtp";
    take(p.payload, p.sequence, p.timestamp, samples, arrivalMs, arrivalMs, newStream);
  }

  /**
   * Flat pacing: takes the next packet (waiting up to 100 ms for one) as arriving at `now`.
   * "ended" once the ring ended and is empty; "waiting" when none came in time.
   */
  function takeOne(now: number): "ok" | "ended" | "waiting" {
    let slot = ring.claim();
    if (slot === null) {
      if (ring.waitForData(100) !== "ok") return ring.ended ? "ended" : "waiting";
      slot = ring.claim();
      if (slot === null) return "waiting";
    }
    accept(slot, now);
    return "ok";
  }

  /** Plays until stopped (false) or the input ring ended and the buffer ran out (true). */
  function play(pcm: Pcm): boolean {
    const devCh = pcm.channels;
    const dec = new Int16Array(MAX_FRAME * decCh);
    const resampler = pcm.rate === 48000 ? null : Resampler.create({
      channels: decCh,
      inRate: 48000,
      outRate: pcm.rate,
      quality: 5,
    });
    using _resampler = ctl.holding("resampler", resampler);
    const resFrames = resampler ? resampler.outputFramesFor(MAX_FRAME) : MAX_FRAME;
    const resBuf = new Int16Array((resampler ? resFrames : 1) * decCh);
    // Spread to the device's channels after resampling (the resampler works in the decoder's).
    const mixed = new Int16Array(Math.max(MAX_FRAME, resFrames) * Math.max(devCh, decCh));
    const pacer = init.pace === "clock" ? new ClockPacer() : null;
    const flat = init.pace === "flat";
    // The frame duration this device was opened for (period = one frame, buffer = three).
    const openedFor = frame;
    // Flat pacing's virtual clock (ms): one frame per played frame.
    let virtualNow = 0;
    let xruns = pcm.xruns;
    let endedIdle = 0;

    while (!ctl.stopRequested) {
      ctl.beat();
      ctl.checkFault();
      // Retired while blocked (a fault, a hung call): the ring is the successor's.
      if (ctl.retired) break;
      poster.tick(performance.now());
      let inputEnded: boolean;
      let now: number;
      if (flat) {
        // Keep the buffer at its target depth, each packet arriving half a frame before it is
        // due (as a steady stream does on average). No packet for 100 ms: play what is buffered.
        const frameMs = (frame / 48000) * 1000;
        let took: "ok" | "ended" | "waiting" = "ok";
        while (took === "ok" && playout.stats.depth < playout.stats.targetDepth) {
          took = takeOne(virtualNow - frameMs / 2);
        }
        inputEnded = took === "ended";
        if (took === "waiting" && playout.stats.buffered === 0) continue;
        now = virtualNow;
      } else {
        // Wait until the device has room for a frame (or the clock says one is due), then take
        // what came meanwhile: one drain per period, just before the frame is chosen.
        const need = Math.round((pcm.rate * frame) / 48000);
        if (pacer) pacer.wait(ctl, (frame / 48000) * 1000);
        else if (pcm.avail() < need) pcm.wait(100);
        // Retired while in a C call (a hung device): the ring and socket are the successor's.
        if (ctl.retired) break;
        inputEnded = drain();
        // The packets' frame duration changed (a microphone preset of another frame size, or a
        // sender's choice): reopen the device sized for it. Kept as it was, a longer frame than
        // the period never finds room (a 40 ms frame in a 30 ms buffer) or spins on a device
        // that wakes a period at a time; a shorter one plays behind a longer buffer than it
        // needs. The playout buffer and its packets stay. (Clock and flat pacing write to file
        // PCMs, which take any write at once: no reopen there.)
        if (!pacer && frame !== openedFor) return false;
        if (!pacer && pcm.avail() < need) continue;
        now = epochMs();
      }

      const dueAt = flat ? epochMs() : now;
      const d = playout.next(now);
      if (flat) {
        // No time passes without packets: buffering writes nothing.
        if (d.kind === "idle" && !inputEnded) continue;
        virtualNow += (frame / 48000) * 1000;
      }
      let n = frame;
      switch (d.kind) {
        case "play":
          try {
            n = decoder.decode(d.data, dec, MAX_FRAME);
            m.decoded.inc();
          } catch (e) {
            if (!(e instanceof OpusError)) throw e;
            m.decodeErrors.inc();
            n = decoder.conceal(dec, frame);
          }
          break;
        case "fec":
          try {
            n = decoder.decodeFec(d.data, dec, frame);
            m.fec.inc();
          } catch (e) {
            if (!(e instanceof OpusError)) throw e;
            m.decodeErrors.inc();
            n = decoder.conceal(dec, frame);
          }
          break;
        case "plc":
          n = decoder.conceal(dec, frame);
          break;
        case "idle":
          dec.fill(0, 0, frame * decCh);
          m.silence.inc();
          break;
      }
      if (d.kind === "idle" && inputEnded) {
        if (++endedIdle > 2) return true;
      }

      // Rate, in the decoder's channels (the resampler was made for them: fed a 4- or 6-channel
      // device's spread samples, it miscounted frames and the write threw on every frame), then
      // the device's channels.
      let src = dec, frames = n;
      if (resampler) {
        const r = resampler.process(dec.subarray(0, n * decCh), resBuf);
        src = resBuf;
        frames = r.outFrames;
      }
      let out = src, outCh = decCh;
      if (devCh !== decCh) {
        for (let i = 0; i < frames; i++) {
          for (let c = 0; c < devCh; c++) {
            mixed[i * devCh + c] = decCh === 1 ? src[i]! : src[i * 2 + Math.min(c, 1)]!;
          }
        }
        out = mixed;
        outCh = devCh;
      }
      let written = 0;
      while (written < frames && !ctl.stopRequested) {
        const w = pcm.writei(written === 0 ? out : out.subarray(written * outCh), frames - written);
        written += w;
        if (w === 0) {
          ctl.beat();
          pcm.wait(100);
        }
      }
      if (pcm.xruns !== xruns) {
        m.xruns.inc(pcm.xruns - xruns);
        xruns = pcm.xruns;
      }
      m.played.inc();
      if (d.kind !== "idle") m.dueToWritten.observe(epochMs() - dueAt);
      if (d.kind === "play") {
        const queued = Math.max(0, pcm.delay()) - frames;
        const audibleAt = epochMs() + (Math.max(0, queued) / pcm.rate) * 1000;
        m.receivedToPlayed.observe(audibleAt - arrival[d.seq & 0xffff]!);
      }
      const s = playout.stats;
      m.depth.set(s.depth);
      m.target.set(s.targetDepth);
      m.jitter.set(s.jitterMs);
      m.buffered.set(s.buffered);
      // Concealment by reason from the buffer's own counts: a late wait is settled (as a wait, or
      // as the concealment of a packet found lost) only when the next packet comes.
      syncSeries(plcLoss, s.plc);
      syncSeries(plcDrift, s.driftInserts);
      syncSeries(plcLate, s.lateWaits);
      syncCounter(m.driftDrops, s.driftDrops);
      syncCounter(m.overflowDrops, s.overflowDrops);
      syncCounter(m.flushed, s.flushed);
    }
    return false;
  }
}

runPipeline(run);
