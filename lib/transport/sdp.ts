/**
 * SDP (RFC 8866) for the service's RTP output, as a receiver of it needs it: what to listen on
 * and how to decode what arrives (Opus per RFC 7587).
 *
 * The description is written from the receiver's side: `c=` and `m=` name the address and port
 * the packets are sent to (so `ffmpeg -protocol_whitelist file,udp,rtp -i stream.sdp` or a
 * gateway's RTP mountpoint binds there), and `a=recvonly` says the receiver only receives.
 * `a=rtpmap` always says `opus/48000/2` (RFC 7587 §7: the media subtype is always registered with
 * 48000 Hz and two channels, whatever the encoder actually codes); `stereo`/`sprop-stereo` say
 * whether the stream is stereo.
 *
 * @module
 */

import { isIP } from "node:net";

/** HTTP `Content-Type` of an SDP description. */
export const SDP_CONTENT_TYPE = "application/sdp";

/** Where the described stream is sent: an IP literal (v4 or v6) and a UDP port. */
export interface SdpDestination {
  /** IPv4 or IPv6 address literal. */
  readonly address: string;
  readonly port: number;
}

/** What {@link sdpFor} says about the stream. */
export interface SdpOptions {
  /** RTP payload type of the Opus stream, 96–127 (dynamic). */
  readonly payloadType: number;
  /** Channels the encoder codes: 1 or 2. */
  readonly channels: number;
  /** Packet duration in milliseconds (`a=ptime`); 20 when unset. */
  readonly frameMs?: number;
  /** Whether the stream carries Opus in-band FEC (`useinbandfec`); false when unset. */
  readonly inbandFec?: boolean;
  /** `o=` session id (a number that identifies this session, e.g. the SSRC); 0 when unset. */
  readonly sessionId?: number;
  /** `o=` session version; bump it when the description changes. 0 when unset. */
  readonly sessionVersion?: number;
  /** `o=` originator address; the destination family's loopback address when unset. */
  readonly origin?: string;
}

function checkInteger(what: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number") {
    throw new TypeError(
      `Cannot describe ${what} ${JSON.stringify(value) ?? String(value)}: expected a number`,
    );
  }
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(
      `Cannot describe ${what} "${value}": expected an integer from ${min} to ${max}`,
    );
  }
  return value;
}

function addressType(what: string, address: unknown): "IP4" | "IP6" {
  if (typeof address !== "string") {
    throw new TypeError(
      `Cannot describe ${what} ${JSON.stringify(address) ?? String(address)}: expected a string`,
    );
  }
  const family = isIP(address);
  if (family === 0) {
    throw new RangeError(
      `Cannot describe ${what} "${address}": expected an IPv4 or IPv6 address literal`,
    );
  }
  return family === 4 ? "IP4" : "IP6";
}

/**
 * The SDP text (CRLF line endings) describing the Opus RTP stream sent to `destination`.
 *
 * @throws {TypeError} when a value has the wrong type
 * @throws {RangeError} when the address is not an IP literal or a number is out of range
 */
export function sdpFor(destination: SdpDestination, options: SdpOptions): string {
  const type = addressType("destination address", destination?.address);
  const port = checkInteger("destination port", destination.port, 1, 65535);
  const pt = checkInteger("payload type", options.payloadType, 96, 127);
  const channels = checkInteger("channel count", options.channels, 1, 2);
  const frameMs = options.frameMs ?? 20;
  if (typeof frameMs !== "number" || ![2.5, 5, 10, 20, 40, 60].includes(frameMs)) {
    throw new RangeError(
      `Cannot describe packet duration "${
        String(frameMs)
      }": expected one of 2.5, 5, 10, 20, 40, 60 ms`,
    );
  }
  const sessionId = checkInteger("session id", options.sessionId ?? 0, 0, Number.MAX_SAFE_INTEGER);
  const sessionVersion = checkInteger(
    "session version",
    options.sessionVersion ?? 0,
    0,
    Number.MAX_SAFE_INTEGER,
  );
  const origin = options.origin ?? (type === "IP4" ? "127.0.0.1" : "::1");
  const originType = addressType("origin address", origin);
  const stereo = channels === 2 ? 1 : 0;
  const fec = options.inbandFec ? 1 : 0;
  const lines = [
    "v=0",
    `o=- ${sessionId} ${sessionVersion} IN ${originType} ${origin}`,
    "s=kvm-audio",
    // A zone ("%eth0") is this machine's name for a link; SDP has no place for it (RFC 8866).
    `c=IN ${type} ${destination.address.replace(/%.*$/, "")}`,
    "t=0 0",
    `m=audio ${port} RTP/AVP ${pt}`,
    `a=rtpmap:${pt} opus/48000/2`,
    `a=fmtp:${pt} stereo=${stereo};sprop-stereo=${stereo};useinbandfec=${fec}`,
    `a=ptime:${frameMs}`,
    "a=recvonly",
  ];
  return lines.join("\r\n") + "\r\n";
}
