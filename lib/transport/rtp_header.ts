/**
 * The RTP header codec (RFC 3550) and the RTP-only metric series: pure code, shared by the main
 * thread's transports (rtp.ts) and the input worker, which reads RTP input itself.
 *
 * @module
 */

import type { Registry } from "../metrics.ts";

/** The RTP version this codec reads and writes. */
export const RTP_VERSION = 2;
/** Bytes of the fixed RTP header. */
export const RTP_HEADER_BYTES = 12;
/** Most CSRCs a header can list (4-bit count). */
export const RTP_MAX_CSRCS = 15;
/** RTP clock rate of Opus, always (RFC 7587 §4.1). */
export const OPUS_RTP_CLOCK_RATE = 48000;
/** Payload type the sender uses unless told otherwise (the one browsers use for Opus). */
export const DEFAULT_OPUS_PAYLOAD_TYPE = 111;
/** The dynamic payload type range (RFC 3551 §3); Opus has no static payload type. */
export const DYNAMIC_PAYLOAD_TYPES = Object.freeze({ min: 96, max: 127 });
/** Second-byte range of RTCP packets multiplexed on the RTP port (RFC 5761 §4). */
const RTCP_PACKET_TYPES = { min: 192, max: 223 } as const;
/** Largest UDP payload over IPv4. */
const MAX_DATAGRAM_BYTES = 65507;

const BIT_PADDING = 0x20;
const BIT_EXTENSION = 0x10;
const MASK_CSRC_COUNT = 0x0f;
const BIT_MARKER = 0x80;
const MASK_PAYLOAD_TYPE = 0x7f;

// ---------------------------------------------------------------------------------------------
// Header codec.

/** An RTP header extension (RFC 3550 §5.3.1): a 16-bit profile word and whole 32-bit words. */
export interface RtpExtension {
  /** Profile-defined 16 bits (0xBEDE for RFC 8285 one-byte elements). */
  readonly profile: number;
  /** Extension data; its length is a multiple of 4. */
  readonly data: Uint8Array;
}

/** What {@link writeRtp} puts in a header. */
export interface RtpHeader {
  /** 0–127. */
  readonly payloadType: number;
  /** 0–65535. */
  readonly sequence: number;
  /** 0–2³²−1. */
  readonly timestamp: number;
  /** 0–2³²−1. */
  readonly ssrc: number;
  readonly marker?: boolean;
  /** Up to 15 contributing sources, each 0–2³²−1. */
  readonly csrcs?: readonly number[];
  readonly extension?: RtpExtension | null;
  /** Padding bytes to append, the count byte included: 0 (none) to 255. */
  readonly padding?: number;
}

/** A parsed RTP packet. `payload` and `extension.data` are views onto the datagram. */
export interface RtpPacket {
  readonly marker: boolean;
  readonly payloadType: number;
  readonly sequence: number;
  readonly timestamp: number;
  readonly ssrc: number;
  readonly csrcs: readonly number[];
  readonly extension: RtpExtension | null;
  /** Padding bytes at the end (count byte included); 0 when the P bit is clear. */
  readonly padding: number;
  readonly payload: Uint8Array;
}

/** Why a datagram is not acceptable RTP. */
export type RtpMalformedReason =
  /** Fewer than 12 bytes. */
  | "short"
  /** Version is not 2. */
  | "version"
  /** The CSRC list runs past the end. */
  | "csrc"
  /** The header extension runs past the end. */
  | "extension"
  /** The padding count is 0 or runs into the header. */
  | "padding"
  /** No payload left. */
  | "empty"
  /** Not the configured payload type (or not a dynamic one). */
  | "payload_type"
  /** RTCP-looking (RFC 5761 range) but its length is wrong. */
  | "rtcp";

/** The outcome of {@link readRtp}. */
export type RtpReadResult =
  | { readonly kind: "rtp"; readonly packet: RtpPacket }
  | { readonly kind: "rtcp" }
  | { readonly kind: "malformed"; readonly reason: RtpMalformedReason; readonly message: string };

function checkUint(what: string, value: unknown, max: number): number {
  if (typeof value !== "number") {
    throw new TypeError(
      `Cannot write RTP ${what} ${JSON.stringify(value) ?? String(value)}: expected a number`,
    );
  }
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new RangeError(
      `Cannot write RTP ${what} "${value}": expected an integer from 0 to ${max}`,
    );
  }
  return value;
}

/**
 * Builds one RTP packet: header, `payload`, and padding if asked for. Returns a new buffer.
 *
 * @throws {TypeError} when a field has the wrong type
 * @throws {RangeError} when a field is out of range or the packet would exceed a UDP datagram
 */
export function writeRtp(header: RtpHeader, payload: Uint8Array): Uint8Array {
  if (!(payload instanceof Uint8Array)) {
    throw new TypeError(`Cannot write RTP payload "${String(payload)}": expected a Uint8Array`);
  }
  const pt = checkUint("payload type", header.payloadType, 127);
  const seq = checkUint("sequence number", header.sequence, 0xffff);
  const ts = checkUint("timestamp", header.timestamp, 0xffffffff);
  const ssrc = checkUint("SSRC", header.ssrc, 0xffffffff);
  const csrcs = header.csrcs ?? [];
  if (!Array.isArray(csrcs) || csrcs.length > RTP_MAX_CSRCS) {
    throw new RangeError(
      `Cannot write ${csrcs.length} RTP CSRCs: expected an array of at most ${RTP_MAX_CSRCS}`,
    );
  }
  for (const c of csrcs) checkUint("CSRC", c, 0xffffffff);
  const ext = header.extension ?? null;
  let extBytes = 0;
  if (ext !== null) {
    checkUint("extension profile", ext.profile, 0xffff);
    if (!(ext.data instanceof Uint8Array) || ext.data.length % 4 !== 0) {
      throw new RangeError(
        `Cannot write an RTP extension of ${
          String(ext.data?.length)
        } bytes: expected a Uint8Array whose length is a multiple of 4`,
      );
    }
    if (ext.data.length / 4 > 0xffff) {
      throw new RangeError(
        `Cannot write an RTP extension of ${ext.data.length} bytes: expected at most ${0xffff * 4}`,
      );
    }
    extBytes = 4 + ext.data.length;
  }
  const padding = checkUint("padding", header.padding ?? 0, 255);
  const headerBytes = RTP_HEADER_BYTES + 4 * csrcs.length + extBytes;
  const total = headerBytes + payload.length + padding;
  if (total > MAX_DATAGRAM_BYTES) {
    throw new RangeError(
      `Cannot write an RTP packet of ${total} bytes: expected at most ${MAX_DATAGRAM_BYTES}`,
    );
  }
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  out[0] = (RTP_VERSION << 6) | (padding > 0 ? BIT_PADDING : 0) |
    (ext !== null ? BIT_EXTENSION : 0) | csrcs.length;
  out[1] = (header.marker ? BIT_MARKER : 0) | pt;
  view.setUint16(2, seq);
  view.setUint32(4, ts);
  view.setUint32(8, ssrc);
  let at = RTP_HEADER_BYTES;
  for (const c of csrcs) {
    view.setUint32(at, c);
    at += 4;
  }
  if (ext !== null) {
    view.setUint16(at, ext.profile);
    view.setUint16(at + 2, ext.data.length / 4);
    out.set(ext.data, at + 4);
    at += extBytes;
  }
  out.set(payload, at);
  if (padding > 0) out[total - 1] = padding;
  return out;
}

function malformed(reason: RtpMalformedReason, message: string): RtpReadResult {
  return { kind: "malformed", reason, message };
}

/**
 * Validates and parses one datagram. Never throws on bad input: a malformed datagram is a result
 * with a reason. `payloadType` is the one accepted; when `null` or unset any dynamic payload
 * type (96–127) is. Datagrams in the RTCP range (RFC 5761) come back as `{ kind: "rtcp" }`.
 */
export function readRtp(
  data: Uint8Array,
  { payloadType = null }: { payloadType?: number | null } = {},
): RtpReadResult {
  const n = data.length;
  const b0 = data[0] ?? 0, b1 = data[1] ?? 0;
  const version = b0 >>> 6;
  if (
    n >= 4 && version === RTP_VERSION && b1 >= RTCP_PACKET_TYPES.min && b1 <= RTCP_PACKET_TYPES.max
  ) {
    // RTCP: a compound packet is whole 32-bit words and its first packet fits (RFC 3550 A.2).
    const first = (((data[2]! << 8) | data[3]!) + 1) * 4;
    if (n % 4 !== 0 || first > n) {
      return malformed(
        "rtcp",
        `Invalid RTCP packet of ${n} bytes: its first packet says ${first} bytes, expected whole words within the datagram`,
      );
    }
    return { kind: "rtcp" };
  }
  if (n < RTP_HEADER_BYTES) {
    return malformed("short", `Invalid RTP packet of ${n} bytes: expected at least 12`);
  }
  if (version !== RTP_VERSION) {
    return malformed("version", `Invalid RTP version ${version}: expected 2`);
  }
  const view = new DataView(data.buffer, data.byteOffset, n);
  const csrcCount = b0 & MASK_CSRC_COUNT;
  let at = RTP_HEADER_BYTES + 4 * csrcCount;
  if (at > n) {
    return malformed(
      "csrc",
      `Invalid RTP packet of ${n} bytes: ${csrcCount} CSRCs need a ${at}-byte header`,
    );
  }
  let extension: RtpExtension | null = null;
  if (b0 & BIT_EXTENSION) {
    if (at + 4 > n) {
      return malformed(
        "extension",
        `Invalid RTP packet of ${n} bytes: no room for the extension header at byte ${at}`,
      );
    }
    const words = view.getUint16(at + 2);
    const end = at + 4 + words * 4;
    if (end > n) {
      return malformed(
        "extension",
        `Invalid RTP packet of ${n} bytes: a ${words}-word extension ends at byte ${end}`,
      );
    }
    extension = { profile: view.getUint16(at), data: data.subarray(at + 4, end) };
    at = end;
  }
  let padding = 0;
  if (b0 & BIT_PADDING) {
    padding = data[n - 1]!;
    if (padding === 0 || at + padding > n) {
      return malformed(
        "padding",
        `Invalid RTP padding of ${padding} bytes: expected 1 to ${
          n - at
        } after a ${at}-byte header`,
      );
    }
  }
  if (at + padding === n) {
    return malformed("empty", `Invalid RTP packet of ${n} bytes: the payload is empty`);
  }
  const pt = b1 & MASK_PAYLOAD_TYPE;
  if (
    payloadType === null
      ? pt < DYNAMIC_PAYLOAD_TYPES.min || pt > DYNAMIC_PAYLOAD_TYPES.max
      : pt !== payloadType
  ) {
    return malformed(
      "payload_type",
      `Unexpected RTP payload type ${pt}: expected ${
        payloadType === null ? "a dynamic one (96-127)" : payloadType
      }`,
    );
  }
  const csrcs: number[] = [];
  for (let i = 0; i < csrcCount; i++) csrcs.push(view.getUint32(RTP_HEADER_BYTES + 4 * i));
  return {
    kind: "rtp",
    packet: {
      marker: (b1 & BIT_MARKER) !== 0,
      payloadType: pt,
      sequence: view.getUint16(2),
      timestamp: view.getUint32(4),
      ssrc: view.getUint32(8),
      csrcs,
      extension,
      padding,
      payload: data.subarray(at, n - padding),
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Receive counts in shared memory.

/** Every {@link RtpMalformedReason}, in the order of their words in {@link RTP_STATS}. */
export const RTP_MALFORMED_REASONS: readonly RtpMalformedReason[] = [
  "short",
  "version",
  "csrc",
  "extension",
  "padding",
  "empty",
  "payload_type",
  "rtcp",
];

/**
 * Int32 words of the block in which the thread reading RTP input counts it, for `RtpReceiver.stats`
 * on another thread: datagrams read, valid RTP, RTCP ignored, stale datagrams dropped unread, SSRC
 * changes, the SSRC playing (as int32) and whether there is one, packets of another SSRC dropped
 * while one played, then one word per
 * {@link RTP_MALFORMED_REASONS} entry.
 */
export const RTP_STATS = {
  datagrams: 0,
  accepted: 1,
  rtcp: 2,
  stale: 3,
  ssrcChanges: 4,
  ssrc: 5,
  hasSsrc: 6,
  otherSource: 7,
  malformed: 8,
} as const;

/** Bytes of an {@link RTP_STATS} block. */
export const RTP_STATS_BYTES = (RTP_STATS.malformed + RTP_MALFORMED_REASONS.length) * 4;

// ---------------------------------------------------------------------------------------------
// Metrics.

/** RTP-only series (the shared ones are in `transportMetrics`). */
export function rtpMetrics(r: Registry) {
  return {
    sendErrors: r.counter("kvm_audio_rtp_send_errors_total", "RTP datagrams the socket refused"),
    dtxNotSent: r.counter(
      "kvm_audio_rtp_dtx_not_sent_total",
      "DTX/silence frames (at most 2 bytes) not sent over RTP",
    ),
    rtcpIgnored: r.counter(
      "kvm_audio_rtp_rtcp_ignored_total",
      "RTCP packets received on the RTP input port and ignored",
    ),
  };
}
