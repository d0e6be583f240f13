/**
 * Output pipeline worker: ALSA capture → (resample to 48 kHz) → Opus encode straight into an
 * output ring slot → publish. Started by the supervisor with an {@link OutputInit} message.
 *
 * The loop never blocks without a bound: the PCM is non-blocking and waited on with a 100 ms
 * timeout, so the supervisor can always stop or terminate it. It never waits for the main thread:
 * a full ring drops its oldest frame — except under flat pacing (no clock: an unpaced device read
 * flat out), where it waits for room instead, so a benchmark or an offline encode loses nothing.
 *
 * Capture timestamp (`t[0]`): the moment the frame's *last* sample was captured, i.e. the time of
 * the read minus what `snd_pcm_delay` says is still queued behind it, minus the samples that
 * remain in the accumulator after this frame. Frame accumulation itself (the frame duration) is
 * physics and not counted in the capture→encoded stage.
 *
 * RTP senders (`RtpSender`, through the service's RTP output table) are served here: each frame
 * goes out over UDP the moment it is encoded, before it is published, and only frames for
 * main-thread listeners ({@link CONTROL.listeners}: WebSocket clients) are published to the ring.
 *
 * Nobody listening (no main-thread listener, no RTP sender): the worker keeps reading the device
 * (so it does not overrun) and advancing sequence numbers and RTP timestamps as for muted frames,
 * but encodes nothing — a KVM box streams audio most of the day to no one, and each published
 * frame costs the main thread a wake-up. The next frame encoded after muted or unheard ones
 * starts from a reset encoder, like a new stream.
 *
 * Preset changes (control word {@link CONTROL.generation}) are applied between frames: through
 * `opus_encoder_ctl` on the running encoder when only codec settings differ, by a new encoder
 * when channels, frame duration or application differ. The accumulator carries the samples over,
 * so no audio is lost by a change.
 *
 * @module
 */

import type { Pcm } from "../../ffi/alsa.ts";
import { OpusEncoder } from "../../ffi/opus.ts";
import { Resampler } from "../../ffi/speexdsp.ts";
import { FrameRing } from "../frame_ring.ts";
import { Registry } from "../metrics.ts";
import {
  encoderSettings,
  frameSamples,
  needsNewEncoder,
  OUTPUT_PRESETS,
  type Preset,
  PRESET_NAMES,
} from "../quality.ts";
import {
  CONTROL,
  epochMs,
  FrameFlag,
  lastFrameAtCell,
  OUTPUT_RING,
  type OutputInit,
} from "./messages.ts";
import {
  ClockPacer,
  lastWords,
  MetricsPoster,
  post,
  runDevice,
  runPipeline,
  WorkerControl,
} from "./worker_common.ts";
import { outputMetrics, transportMetrics } from "./pipeline_metrics.ts";
import { RtpOutput, RtpOutTable } from "../transport/rtp_out.ts";
import { defaultChannelMap, downmixMatrix, mixFrames } from "./downmix.ts";

/** The most a live change lowers the bitrate in one frame (see `bitrateNow`). */
const BITRATE_STEP_DOWN = 0.75;
/** Frames a rebuilt encoder is fed before its first (see `applyPreset`): enough in the probe. */
const PRIME_FRAMES = 3;
/** Frames (48 kHz) of history the capture loop keeps: PRIME_FRAMES of the longest preset's (20 ms). */
const HISTORY = PRIME_FRAMES * 960;

function presetFromControl(ctl: WorkerControl): Preset {
  const name = PRESET_NAMES[ctl.get(CONTROL.preset)] ?? "high";
  return OUTPUT_PRESETS[name];
}

function run(init: OutputInit): void {
  const ctl = new WorkerControl(init);
  const ring = FrameRing.attach(init.ring);
  const registry = new Registry();
  const m = outputMetrics(registry);
  const poster = new MetricsPoster(registry, init.metricsIntervalMs ?? 500);
  // RTP senders are served here, as each frame is encoded (see rtp_out.ts).
  const rtpOut = new RtpOutput(
    RtpOutTable.attach(init.rtpOut),
    registry,
    (slot, destination, errno) => post({ type: "rtp-error", slot, destination, errno }),
  );
  const rtpSent = transportMetrics(registry).encodedToRtpSent;
  const unpublished = new Uint8Array(OUTPUT_RING.slotBytes);
  const rtpFrame = {
    data: unpublished as Uint8Array,
    seq: 0,
    timestamp: 0,
    samples: 0,
    silence: false,
  };
  let seq = init.firstSeq | 0;
  let rtp = init.firstTimestamp >>> 0;
  const lastFrameAt = lastFrameAtCell(init.control);
  let captured48 = 0;
  const maxSamples = init.maxSamples ?? Infinity;

  let preset = presetFromControl(ctl);
  let generation = ctl.get(CONTROL.generation);
  let encoder = OpusEncoder.create(
    { channels: preset.channels, application: preset.application },
    encoderSettings(preset),
  );
  ctl.hold("codec", encoder);
  ctl.set(CONTROL.appliedPreset, PRESET_NAMES.indexOf(preset.name));

  // The next frame is the first a running decoder gets from this encoder's state: a new worker's
  // (receivers decoded the last one's), a rebuilt encoder's, or a reset one's after frames that
  // were not sent. It is coded without inter-frame prediction (`predictionDisabled`), so that the
  // decoder's memory of other audio cannot turn it into a burst: with prediction, a new encoder's
  // first 20–30 ms came out of ffmpeg's, GStreamer's and libopus's decoders at up to 2.4 times
  // the signal's peak (full scale for a −8 dBFS tone).
  let intraNext = true;
  // The bitrate the encoder has, and the preset's. A live change lowers it at most a quarter per
  // frame: halved in one step (high → medium, 128 → 64 kb/s), constrained VBR starved the next
  // frame to 3 bytes, and a decoder made a dropout and a burst of it (peak 0.65–0.9 for a tone at
  // 0.4, at 40 of 100 change points); in steps of a quarter, none of 100.
  let bitrateNow = preset.bitrate;
  let bitrateWanted = preset.bitrate;

  /**
   * Applies the preset the control words ask for. A new encoder is first fed the frames just
   * encoded by the old one (`prime`, from the capture loop's history; their packets are thrown
   * away), so that it starts from the state the receivers' decoders have.
   */
  const applyPreset = (prime?: (fresh: OpusEncoder, p: Preset) => void) => {
    generation = ctl.get(CONTROL.generation);
    const next = presetFromControl(ctl);
    if (next === preset) return;
    if (needsNewEncoder(preset, next)) {
      const fresh = OpusEncoder.create(
        { channels: next.channels, application: next.application },
        encoderSettings(next),
      );
      ctl.release("codec", encoder);
      encoder = fresh;
      ctl.hold("codec", encoder);
      prime?.(encoder, next);
      intraNext = true;
      bitrateNow = bitrateWanted = next.bitrate;
      ctl.add(CONTROL.rebuilds, 1);
      post({ type: "preset", preset: next.name, how: "rebuilt" });
    } else {
      bitrateWanted = next.bitrate;
      bitrateNow = Math.max(bitrateWanted, Math.round(bitrateNow * BITRATE_STEP_DOWN));
      encoder.configure({ ...encoderSettings(next), bitrate: bitrateNow });
      ctl.add(CONTROL.liveChanges, 1);
      post({ type: "preset", preset: next.name, how: "live" });
    }
    preset = next;
    ctl.set(CONTROL.appliedPreset, PRESET_NAMES.indexOf(preset.name));
  };

  let end: "ended" | "stopped" | null = null;
  try {
    const opts = () => ({
      stream: "capture" as const,
      channels: init.deviceChannels,
      rate: init.deviceRate,
      periodFrames: Math.round(init.deviceRate / 100),
      bufferFrames: Math.round(init.deviceRate / 100) * 8,
    });
    end = runDevice(ctl, init.device, opts, capture) ? "ended" : "stopped";
    if (end === "ended") ring.end();
  } finally {
    ctl.release("codec", encoder);
    lastWords(end, registry, poster);
    ctl.state = "stopped";
  }

  /** Runs until stopped (false) or the finite input ended (true). */
  function capture(pcm: Pcm): boolean {
    const devCh = pcm.channels;
    const period = pcm.periodFrames;
    // To the preset's channels by the device's channel positions (see downmix.ts).
    const positions = pcm.channelMap() ?? defaultChannelMap(devCh);
    const toMono = downmixMatrix(positions, 1);
    const toStereo = downmixMatrix(positions, 2);
    const capBuf = new Int16Array(period * devCh);
    const resampler = pcm.rate === 48000 ? null : Resampler.create({
      channels: devCh,
      inRate: pcm.rate,
      outRate: 48000,
      quality: 5,
    });
    using _resampler = ctl.holding("resampler", resampler);
    const resBuf = new Int16Array(
      (resampler ? resampler.outputFramesFor(period) : period) * devCh,
    );
    // Accumulates 48 kHz device-channel samples until a whole frame is there (max 60 ms + slack).
    const acc = new Int16Array((2880 + resBuf.length / devCh + period) * devCh);
    let accFrames = 0;
    let frameView = acc.subarray(0, 0);
    const enc = new Int16Array(2880 * 2);
    // The last HISTORY frames (48 kHz, device channels) this encoder sent — what the decoders
    // that went on have heard; never muted or unheard frames — a ring: a rebuilt encoder is primed
    // with them (see applyPreset). A ring, not a longer
    // accumulator, so that each frame is copied once (shifting 60 ms on every read cost 1–2 % of
    // the unpaced CPU figure).
    const hist = new Int16Array(HISTORY * devCh);
    let histAt = 0;
    let histHeld = 0;
    /** Adds acc's frames [from, from + n) to the history. */
    const remember = (from: number, n: number) => {
      // One or two block copies (a loop of single samples cost 1 % of the unpaced CPU figure).
      for (let src = from * devCh, left = n * devCh; left > 0;) {
        const k = Math.min(left, hist.length - histAt);
        hist.set(acc.subarray(src, src + k), histAt);
        histAt = (histAt + k) % hist.length;
        src += k;
        left -= k;
      }
      histHeld = Math.min(HISTORY, histHeld + n);
    };
    const primeIn = new Int16Array(HISTORY * devCh);
    const primeOut = new Uint8Array(OUTPUT_RING.slotBytes);
    /** Feeds `fresh` the last (up to) PRIME_FRAMES frames of `p`'s size from the history. */
    const prime = (fresh: OpusEncoder, p: Preset) => {
      const fs = frameSamples(p);
      const n = Math.min(PRIME_FRAMES, Math.floor(histHeld / fs)) * fs * devCh;
      let src = (histAt - n + hist.length) % hist.length;
      for (let i = 0; i < n; i++) {
        primeIn[i] = hist[src++]!;
        if (src === hist.length) src = 0;
      }
      for (let at = 0; at < n; at += fs * devCh) {
        let pcmIn = primeIn.subarray(at, at + fs * devCh);
        if (devCh !== p.channels) {
          mixFrames(pcmIn, enc, fs, p.channels === 1 ? toMono : toStereo, p.channels);
          pcmIn = enc;
        }
        fresh.encode(pcmIn, fs, primeOut);
      }
    };
    const pacer = init.pace === "clock" ? new ClockPacer() : null;
    const flat = init.pace === "flat";
    const periodMs = (period / pcm.rate) * 1000;
    let xruns = pcm.xruns;
    let suspends = pcm.suspends;
    // Frames were muted or unheard since the encoder last ran; and unheard by any decoder.
    let skipped = false;
    let unheard = false;
    // Capture (re)starts here, maybe after a gap: a reopened device, a restarted worker. Then, and
    // after an overrun or a suspend, the RTP timestamp follows the wall clock over the gap (RFC 3550: it
    // counts sampling instants), so that a receiver sees a jump (the RTP marker, the WebSocket
    // discontinuity flag) rather than audio that runs late by the gap. Not with flat pacing: it
    // has no clock.
    let resumed = !flat;
    pcm.start();

    while (!ctl.stopRequested) {
      ctl.beat();
      ctl.checkFault();
      // Retired while blocked (a fault, a hung call): nothing more of this loop is its to do.
      if (ctl.retired) break;
      if (ctl.get(CONTROL.generation) !== generation) applyPreset(prime);
      poster.tick(performance.now());

      if (flat && ring.available >= ring.slots - 4) {
        // No clock to keep: wait for the consumer rather than drop (see messages.ts, Pace).
        ctl.sleep(1);
        continue;
      }
      if (pacer) pacer.wait(ctl, periodMs);
      else if (!pcm.wait(100)) continue;
      const n = pcm.readi(capBuf, period);
      // Retired while in a C call (a hung device): the ring is the successor's now.
      if (ctl.retired) break;
      if (pcm.xruns !== xruns) {
        m.xruns.inc(pcm.xruns - xruns);
        xruns = pcm.xruns;
        resumed = !flat;
      }
      if (pcm.suspends !== suspends) {
        // A system or USB suspend: capture stood still for as long (not an xrun: not counted).
        suspends = pcm.suspends;
        resumed = !flat;
      }
      if (n === 0) continue;
      const readAt = epochMs();
      const queued = pcm.delay();
      m.captured.inc(n);

      // To 48 kHz, into the accumulator.
      let src = capBuf, frames = n;
      if (resampler) {
        const r = resampler.process(capBuf.subarray(0, n * devCh), resBuf);
        src = resBuf;
        frames = r.outFrames;
      }
      if (captured48 + frames > maxSamples) frames = Math.max(0, maxSamples - captured48);
      captured48 += frames;
      acc.set(
        frames * devCh === src.length ? src : src.subarray(0, frames * devCh),
        accFrames * devCh,
      );
      accFrames += frames;
      // When the last accumulated sample was captured.
      const lastAt = readAt - (Math.max(0, queued) / pcm.rate) * 1000;

      let fs = frameSamples(preset);
      let start = 0;
      while (accFrames - start >= fs) {
        const remaining = accFrames - start - fs;
        const frameAt = lastAt - (remaining / 48000) * 1000;
        if (resumed) {
          resumed = false;
          const last = lastFrameAt[0]!;
          // Frames the gap held, beyond the one due next (half a frame of timing noise allowed).
          const missed = last > 0 ? Math.round(((frameAt - last) * 48) / fs) - 1 : 0;
          if (missed > 0) {
            rtp = (rtp + missed * fs) >>> 0;
            m.gapFrames.inc(missed);
          }
        }
        lastFrameAt[0] = frameAt;
        const listeners = ctl.get(CONTROL.listeners);
        const rtpActive = rtpOut.active;
        if (ctl.get(CONTROL.muted) !== 0) {
          m.muted.inc();
          skipped = true;
          if (listeners === 0 && !rtpActive) unheard = true;
        } else if (listeners === 0 && !rtpActive) {
          skipped = true; // nobody listens (see CONTROL.listeners)
          unheard = true;
        } else {
          // After a gap. Every decoder that heard the frames before it has the encoder's state,
          // as of the last frame sent: after a mute the encoder goes on from there (reset, it
          // came out of a decoder that went on — an RTP receiver, a page — as a burst). When
          // nobody was listening there is no such decoder: it starts afresh, as for a new stream.
          if (skipped) {
            if (unheard) {
              encoder.reset();
              histHeld = 0; // and no decoder heard the history
            }
            intraNext = true;
          }
          skipped = false;
          unheard = false;
          const ch = preset.channels;
          if (frameView.length !== fs * devCh) frameView = acc.subarray(0, fs * devCh);
          let pcmIn = enc;
          if (devCh === ch) {
            pcmIn = start === 0 ? frameView : acc.subarray(start * devCh, (start + fs) * devCh);
          } else {
            const matrix = ch === 1 ? toMono : toStereo;
            mixFrames(acc.subarray(start * devCh), enc, fs, matrix, ch === 1 ? 1 : 2);
          }
          // Into a ring slot when the main thread has listeners, else into the worker's own buffer.
          const slot = listeners > 0 ? ring.reserve() : null;
          const out = slot ? slot.data : unpublished;
          if (intraNext) encoder.predictionDisabled = true;
          const bytes = encoder.encode(pcmIn, fs, out);
          if (intraNext) {
            encoder.predictionDisabled = false;
            intraNext = false;
          }
          if (bitrateNow !== bitrateWanted) {
            bitrateNow = Math.max(bitrateWanted, Math.round(bitrateNow * BITRATE_STEP_DOWN));
            encoder.configure({ bitrate: bitrateNow });
          }
          // Only sent frames: a muted one primed into a new encoder would carry its last 2.5 ms
          // into the first frame sent.
          remember(start, fs);
          const done = epochMs();
          const silence = bytes <= 2;
          if (rtpActive) {
            rtpFrame.data = out.subarray(0, bytes);
            rtpFrame.seq = seq >>> 0;
            rtpFrame.timestamp = rtp;
            rtpFrame.samples = fs;
            rtpFrame.silence = silence;
            if (rtpOut.send(rtpFrame) > 0) rtpSent.observe(epochMs() - done);
          }
          if (slot) {
            slot.seq = seq;
            slot.samples = fs;
            slot.flags = silence ? FrameFlag.silence : 0;
            slot.t[0] = frameAt;
            slot.t[1] = done;
            slot.t[2] = rtp;
            slot.t[3] = ch;
            ring.publish(slot, bytes);
          }
          m.encoded.inc();
          m.bytes.inc(bytes);
          m.captureToEncoded.observe(done - frameAt);
          m.readToEncoded.observe(done - readAt);
        }
        seq = (seq + 1) | 0;
        rtp = (rtp + fs) >>> 0;
        ctl.set(CONTROL.nextSeq, seq);
        ctl.set(CONTROL.nextTimestamp, rtp | 0);
        start += fs;
        // A preset change takes effect at this frame boundary.
        if (ctl.get(CONTROL.generation) !== generation) {
          applyPreset(prime);
          fs = frameSamples(preset);
        }
      }
      if (start > 0) {
        acc.copyWithin(0, start * devCh, accFrames * devCh);
        accFrames -= start;
      }
      if (captured48 >= maxSamples) return true;
    }
    return false;
  }
}

runPipeline(run);
