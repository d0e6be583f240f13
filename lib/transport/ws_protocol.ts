/**
 * The WebSocket audio protocol, shared by the service and the operator's page. Plain TypeScript
 * with no imports and no Deno APIs, so a browser bundle can use it unchanged.
 *
 * ## Listen (`GET /api/audio/stream`, service → client)
 * The server first sends a JSON text message, {@link ListenHello}, describing the packets that
 * follow; it sends a new one whenever that description changes (channels or frame duration after
 * a preset change, the preset name, mute). Then one binary message per Opus packet: a
 * {@link HEADER_BYTES}-byte header followed by the packet.
 *
 * ## Talk (`GET /api/microphone/stream`, client → service)
 * The server sends a JSON {@link TalkHello} saying what to send (and again when the microphone
 * preset changes). The client sends binary messages with the same header + one Opus packet each;
 * only the low 16 bits of the sequence number are used. Text messages must be JSON
 * {@link ControlMessage}s; anything else is counted as malformed and dropped.
 *
 * ## Header (all integers big-endian)
 * | bytes | field |
 * |-------|-------|
 * | 0 | version ({@link PROTOCOL_VERSION}) |
 * | 1 | flags ({@link FrameFlag}: bit 0 silence/DTX, bit 1 discontinuity) |
 * | 2 | channels of the packet (1 or 2) |
 * | 3 | reserved, 0 (receivers ignore it) |
 * | 4–7 | sequence number (uint32; wraps) |
 * | 8–11 | timestamp in 48 kHz ticks (uint32; wraps) |
 *
 * Discontinuity is set on a listen packet that does not follow the previous one the service
 * produced (frames lost before the fan-out, a pipeline restart, a muted stretch): a decoder should
 * reset or conceal rather than bridge. Packets a slow listener lost in its own queue are not
 * flagged (the packet bytes are shared by all listeners); the listener sees the gap in the
 * sequence numbers.
 *
 * @module
 */

/** Version carried in byte 0 of every header. */
export const PROTOCOL_VERSION = 1;

/** Length of the binary header before the Opus packet. */
export const HEADER_BYTES = 12;

/** Bits of the header's flags byte. */
export const FrameFlag = {
  /** The packet is a DTX/silence packet. */
  silence: 1,
  /** The packet does not follow the previous one (see the module notes). */
  discontinuity: 2,
} as const;

/** Sample rate of Opus timestamps and of the decoded stream. */
export const SAMPLE_RATE = 48000;

/**
 * WebSocket close codes the service uses (4000–4999 are application codes), with their reasons.
 */
export const CloseCode = {
  /** The server is shutting down. */
  goingAway: 1001,
  /** A listener stayed too far behind for too long and was dropped. */
  tooSlow: 4408,
  /** Another client is talking (connect with `?takeover=1` to replace it). */
  busy: 4409,
  /** A later client took the microphone over. */
  takenOver: 4410,
} as const;

/** Close reasons sent with {@link CloseCode}s. */
export const CloseReason = {
  goingAway: "server shutting down",
  tooSlow: "listener too slow",
  busy: "microphone busy",
  takenOver: "taken over",
} as const satisfies Record<keyof typeof CloseCode, string>;

/** The fields of a binary header. */
export interface FrameHeader {
  /** {@link FrameFlag} bits. */
  readonly flags: number;
  /** Channels of the packet, 1 or 2. */
  readonly channels: number;
  /** Sequence number, uint32. */
  readonly seq: number;
  /** Timestamp in 48 kHz ticks, uint32. */
  readonly timestamp: number;
}

/** A decoded binary message. */
export interface Frame extends FrameHeader {
  /** Protocol version of the message. */
  readonly version: number;
  /** The Opus packet (a view onto the message). */
  readonly payload: Uint8Array;
}

/** Why a binary message could not be decoded. */
export type MalformedReason = "header" | "version" | "channels";

/** A binary message that is not a valid frame. */
export class MalformedFrameError extends Error {
  override name = "MalformedFrameError";
  /** Which check failed. */
  readonly reason: MalformedReason;

  constructor(reason: MalformedReason, message: string) {
    super(message);
    this.reason = reason;
  }
}

/**
 * Writes `header` into the first {@link HEADER_BYTES} bytes of `target`.
 *
 * @throws {RangeError} when `target` is too short or a field is out of range
 */
export function writeFrameHeader(target: Uint8Array, header: FrameHeader): void {
  if (target.length < HEADER_BYTES) {
    throw new RangeError(
      `Cannot write a frame header into ${target.length} bytes: expected at least ${HEADER_BYTES}`,
    );
  }
  const { flags, channels, seq, timestamp } = header;
  if (!Number.isInteger(flags) || flags < 0 || flags > 0xff) {
    throw new RangeError(`Cannot write flags ${flags}: expected an integer from 0 to 255`);
  }
  if (channels !== 1 && channels !== 2) {
    throw new RangeError(`Cannot write channels ${channels}: expected 1 or 2`);
  }
  for (const [name, v] of [["sequence", seq], ["timestamp", timestamp]] as const) {
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
      throw new RangeError(`Cannot write ${name} ${v}: expected an integer from 0 to 4294967295`);
    }
  }
  const view = new DataView(target.buffer, target.byteOffset, HEADER_BYTES);
  view.setUint8(0, PROTOCOL_VERSION);
  view.setUint8(1, flags);
  view.setUint8(2, channels);
  view.setUint8(3, 0);
  view.setUint32(4, seq);
  view.setUint32(8, timestamp);
}

/** One binary message: header + `payload`, in a new buffer. */
export function encodeFrame(header: FrameHeader, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_BYTES + payload.length);
  writeFrameHeader(out, header);
  out.set(payload, HEADER_BYTES);
  return out;
}

/**
 * Decodes a binary message. The payload is a view onto `message` and may be empty (the receiver
 * validates the packet itself).
 *
 * @throws {MalformedFrameError} when the message is shorter than a header, has another version or
 *   a channel count other than 1 or 2
 */
export function decodeFrame(message: Uint8Array): Frame {
  if (message.length < HEADER_BYTES) {
    throw new MalformedFrameError(
      "header",
      `Cannot decode a ${message.length}-byte message: expected at least ${HEADER_BYTES} header bytes`,
    );
  }
  const view = new DataView(message.buffer, message.byteOffset, HEADER_BYTES);
  const version = view.getUint8(0);
  if (version !== PROTOCOL_VERSION) {
    throw new MalformedFrameError(
      "version",
      `Cannot decode protocol version ${version}: expected ${PROTOCOL_VERSION}`,
    );
  }
  const channels = view.getUint8(2);
  if (channels !== 1 && channels !== 2) {
    throw new MalformedFrameError(
      "channels",
      `Cannot decode channels ${channels}: expected 1 or 2`,
    );
  }
  return {
    version,
    flags: view.getUint8(1),
    channels,
    seq: view.getUint32(4),
    timestamp: view.getUint32(8),
    payload: message.subarray(HEADER_BYTES),
  };
}

/** First message on the listen stream: what the following packets are. */
export interface ListenHello {
  readonly type: "hello";
  /** Binary header version. */
  readonly version: typeof PROTOCOL_VERSION;
  readonly codec: "opus";
  readonly sampleRate: typeof SAMPLE_RATE;
  /** Channels of the packets that follow. */
  readonly channels: 1 | 2;
  /** Frame duration of the packets that follow, ms. */
  readonly frameMs: number;
  /** Output preset the encoder uses. */
  readonly preset: string;
  /** Whether the output is muted (a muted output sends no packets). */
  readonly muted: boolean;
}

/** First message on the talk stream: what the client should send. */
export interface TalkHello {
  readonly type: "hello";
  /** Binary header version. */
  readonly version: typeof PROTOCOL_VERSION;
  readonly codec: "opus";
  readonly sampleRate: typeof SAMPLE_RATE;
  /** Channels to encode. */
  readonly channels: 1 | 2;
  /** Frame duration to encode, ms. */
  readonly frameMs: number;
  /** Samples per channel in one frame at 48 kHz. */
  readonly frameSamples: number;
  /** Microphone preset. */
  readonly preset: string;
  /** Target bitrate, bits per second. */
  readonly bitrate: number;
  /** Opus application to create the encoder with ("voip", "audio", "restrictedLowDelay"). */
  readonly application: string;
  readonly complexity: number;
  readonly vbr: boolean;
  /** Constrained VBR (`OPUS_SET_VBR_CONSTRAINT`). */
  readonly vbrConstraint: boolean;
  /** Signal type to tune the encoder for (`OPUS_SET_SIGNAL`). */
  readonly signal: "auto" | "voice" | "music";
  /**
   * Widest audio bandwidth to code (`OPUS_SET_MAX_BANDWIDTH`): "narrowband", "mediumband",
   * "wideband", "superwideband" or "fullband". WebCodecs has no such setting (a browser codes what
   * its bitrate allows); native clients should set it.
   */
  readonly maxBandwidth: string;
  readonly dtx: boolean;
  /** Send in-band forward error correction. */
  readonly fec: boolean;
  /** Expected packet loss, percent (tunes FEC). */
  readonly packetLossPerc: number;
  /** Whether the service is playing what it receives (packets sent while stopped are dropped). */
  readonly running: boolean;
}

/** Text messages a client may send on either stream. */
export type ControlMessage = { readonly type: "ping"; readonly id?: string | number };

/** The server's answer to a ping. */
export interface PongMessage {
  readonly type: "pong";
  readonly id?: string | number;
  /** Server time, epoch ms. */
  readonly time: number;
}

/** Parses a client text message; `null` when it is not a valid {@link ControlMessage}. */
export function parseControlMessage(text: string): ControlMessage | null {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) return null;
  const { type, id } = value as Record<string, unknown>;
  if (type !== "ping") return null;
  if (id === undefined) return { type };
  if (typeof id === "string" || (typeof id === "number" && Number.isFinite(id))) {
    return { type, id };
  }
  return null;
}
