/**
 * What makes a received microphone packet acceptable, checked the same way wherever it comes in:
 * on the main thread (`AudioService.pushMicrophonePacket`: WebSocket talkers, local pushes) and in
 * the input worker (RTP input, read there).
 *
 * @module
 */

import { inspectPacket, InvalidPacketError, OPUS_MAX_PACKET } from "../../ffi/opus.ts";
import { INPUT_RING } from "./messages.ts";
import { OPUS_FRAME_SAMPLES_48K } from "../playout.ts";

/**
 * Samples per channel a microphone packet may carry: one encoder call's worth at 48 kHz — 2.5, 5,
 * 10, 20, 40, 60, 80, 100 or 120 ms (RFC 7587's longest; libopus and ffmpeg make them all).
 */
export const PACKET_SAMPLES: ReadonlySet<number> = new Set(OPUS_FRAME_SAMPLES_48K);

/** The longest microphone packet: what Opus allows and an input ring slot holds. */
export const MAX_MICROPHONE_PACKET = Math.min(OPUS_MAX_PACKET, INPUT_RING.slotBytes);

/** Why a microphone packet is refused (the `reason` label of the malformed counter). */
export type MicrophoneMalformed = "sequence" | "timestamp" | "size" | "toc" | "duration";

/**
 * The samples per channel of a valid microphone packet, or why it is malformed: a sequence
 * number outside 0–65535, a timestamp outside 0–2³²−1, an empty or oversized packet, an
 * unparseable TOC, or a duration an encoder does not produce in one call (one playout frame per
 * packet: 2.5 to 120 ms).
 */
export function checkMicrophonePacket(
  packet: Uint8Array,
  seq: number,
  timestamp: number,
): number | MicrophoneMalformed {
  if (!Number.isInteger(seq) || seq < 0 || seq > 0xffff) return "sequence";
  if (!Number.isInteger(timestamp) || timestamp < 0 || timestamp > 0xffffffff) {
    return "timestamp";
  }
  if (packet.length === 0 || packet.length > MAX_MICROPHONE_PACKET) return "size";
  let samples: number;
  try {
    samples = inspectPacket(packet).samples;
  } catch (e) {
    if (e instanceof InvalidPacketError) return "toc";
    throw e;
  }
  return PACKET_SAMPLES.has(samples) ? samples : "duration";
}
