/**
 * The metric series of both pipelines, defined once: the workers record into them, and the
 * service registers the same definitions before absorbing worker snapshots.
 *
 * Stage latency is one histogram, `kvm_audio_stage_latency_ms{stage}`, with stages:
 * - `capture_to_encoded` — last sample of a frame captured (device time) → Opus packet written;
 * - `encoded_to_handed` — packet written → taken off the ring by the main thread and handed to
 *   its listeners (WebSocket clients);
 * - `encoded_to_rtp_sent` — packet written → sent by the output worker to every RTP destination
 *   (once per frame, whatever the number of senders);
 * - `received_to_played` — packet received by the main thread → its audio reaches the DAC
 *   (written to the device plus what `snd_pcm_delay` says is queued ahead of it; the playout
 *   buffer's wait included).
 *
 * Two of those hold time the stage does not add: `capture_to_encoded` includes the samples the
 * device itself still held when they were read (PulseAudio hands capture over in bursts), and
 * `received_to_played` the playout buffer's deliberate depth and the device's queue. What the
 * code adds is measured on its own:
 * - `read_to_encoded` — the period completing a frame read from the device → packet written
 *   (channel mix, resampling, encode);
 * - `due_to_written` — the playout buffer says a frame is due → its samples written to the device
 *   (decode or concealment, mix, resampling, write).
 *
 * @module
 */

import type { MicrophoneMalformed } from "./microphone_packet.ts";
import type { Registry } from "../metrics.ts";

/** Output worker series. */
export function outputMetrics(r: Registry) {
  const stage = stageLatency(r);
  return {
    captured: r.counter(
      "kvm_audio_output_frames_captured_total",
      "Sample frames read from the capture device (device rate)",
    ),
    encoded: r.counter("kvm_audio_output_packets_encoded_total", "Opus packets encoded"),
    bytes: r.counter("kvm_audio_output_bytes_encoded_total", "Opus payload bytes encoded"),
    muted: r.counter(
      "kvm_audio_output_frames_muted_total",
      "Frames captured while muted (not encoded, not sent)",
    ),
    xruns: r.counter("kvm_audio_output_xruns_total", "Capture overruns recovered"),
    gapFrames: r.counter(
      "kvm_audio_output_gap_frames_total",
      "Frames of time capture missed (a reopened device, a restarted worker, an overrun): the " +
        "RTP timestamp moved on by them",
    ),
    captureToEncoded: stage.labels({ stage: "capture_to_encoded" }),
    readToEncoded: stage.labels({ stage: "read_to_encoded" }),
  };
}

/** Input worker series. */
export function inputMetrics(r: Registry) {
  const stage = stageLatency(r);
  return {
    played: r.counter(
      "kvm_audio_input_frames_played_total",
      "Frames written to the playback device",
    ),
    decoded: r.counter("kvm_audio_input_packets_decoded_total", "Packets decoded normally"),
    fec: r.counter("kvm_audio_input_frames_fec_total", "Lost frames recovered from in-band FEC"),
    concealed: r.counter(
      "kvm_audio_input_frames_concealed_total",
      "Frames concealed by PLC: reason loss (a lost packet), drift (inserted to follow a " +
        "slower sender or wait for a late packet), late (inserted while nothing was buffered, " +
        "waiting for the next packet)",
      ["reason"],
    ),
    silence: r.counter(
      "kvm_audio_input_frames_silence_total",
      "Silent frames written while idle or buffering",
    ),
    packets: r.counter(
      "kvm_audio_input_packets_total",
      "Packets taken by the playout buffer, by outcome",
      ["result"],
    ),
    decodeErrors: r.counter(
      "kvm_audio_input_decode_errors_total",
      "Packets libopus refused to decode (concealed instead)",
    ),
    driftDrops: r.counter(
      "kvm_audio_input_drift_drops_total",
      "Packets dropped to follow a sender faster than the device",
    ),
    overflowDrops: r.counter(
      "kvm_audio_input_overflow_drops_total",
      "Packets dropped because the playout buffer went past its maximum depth",
    ),
    flushed: r.counter(
      "kvm_audio_input_flushed_total",
      "Packets discarded by a resync to a restarted sender",
    ),
    buffered: r.gauge("kvm_audio_playout_buffered_packets", "Packets held by the playout buffer"),
    xruns: r.counter("kvm_audio_input_xruns_total", "Playback underruns recovered"),
    depth: r.gauge("kvm_audio_playout_depth_frames", "Frames buffered ahead of the playout point"),
    target: r.gauge("kvm_audio_playout_target_frames", "Target playout depth, frames"),
    jitter: r.gauge("kvm_audio_playout_jitter_ms", "Measured transit-time jitter, ms"),
    receivedToPlayed: stage.labels({ stage: "received_to_played" }),
    dueToWritten: stage.labels({ stage: "due_to_written" }),
  };
}

/**
 * Transport series: hand-over to main-thread listeners and microphone intake (main thread), RTP
 * output (the output worker, through `rtp_out.ts`, or the main thread for a frame source without
 * a worker).
 */
export function transportMetrics(r: Registry) {
  const stage = stageLatency(r);
  return {
    sent: r.counter("kvm_audio_output_packets_sent_total", "Packets handed to listeners", [
      "transport",
    ]),
    sentBytes: r.counter("kvm_audio_output_bytes_sent_total", "Bytes handed to listeners", [
      "transport",
    ]),
    dropped: r.counter("kvm_audio_frames_dropped_total", "Frames dropped, by reason", ["reason"]),
    connectionDrops: r.counter(
      "kvm_audio_connection_drops_total",
      "Listener or talker connections closed by error or by the service",
      ["transport"],
    ),
    received: r.counter("kvm_audio_input_packets_received_total", "Microphone packets received", [
      "transport",
    ]),
    receivedBytes: r.counter(
      "kvm_audio_input_bytes_received_total",
      "Microphone payload bytes received",
    ),
    malformed: r.counter(
      "kvm_audio_input_packets_malformed_total",
      "Received packets dropped as malformed before decode",
      ["reason"],
    ),
    restarts: r.counter("kvm_audio_pipeline_restarts_total", "Pipeline worker restarts", [
      "pipeline",
    ]),
    deviceLost: r.counter(
      "kvm_audio_device_lost_total",
      "Devices that failed mid-stream and were reopened by their worker (not a restart)",
      ["pipeline"],
    ),
    encodedToHanded: stage.labels({ stage: "encoded_to_handed" }),
    encodedToRtpSent: stage.labels({ stage: "encoded_to_rtp_sent" }),
  };
}

/**
 * The malformed-packet series of every reason `checkMicrophonePacket` gives, bound once: for the
 * main thread's intake and the input worker's RTP intake alike.
 */
export function microphoneMalformedSeries(t: ReturnType<typeof transportMetrics>) {
  const series = (reason: MicrophoneMalformed) => t.malformed.labels({ reason });
  return {
    sequence: series("sequence"),
    timestamp: series("timestamp"),
    size: series("size"),
    toc: series("toc"),
    duration: series("duration"),
  } satisfies Record<MicrophoneMalformed, unknown>;
}

function stageLatency(r: Registry) {
  return r.histogram("kvm_audio_stage_latency_ms", "Latency added by each pipeline stage, ms", {
    labelNames: ["stage"],
  });
}
