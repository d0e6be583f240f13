/**
 * Opus over RTP (RFC 3550 framing, RFC 7587 payload format), both directions through C-library
 * sockets: sent by the output worker itself as it encodes, on sockets opened here (see
 * {@link RtpSender} and `rtp_out.ts`), received by the input worker itself on a socket bound here
 * (see {@link RtpReceiver}).
 *
 * - {@link RtpSender} sends every encoded output frame of the service to one or more UDP
 *   destinations (`--rtp-out HOST:PORT`, repeatable): one Opus packet per RTP packet, a random
 *   SSRC, a sequence number that starts at a random value and grows by one per packet sent, and a
 *   timestamp that is the frame's 48 kHz timestamp plus a random base (RFC 7587 §4.1: the clock is
 *   48 kHz whatever bandwidth is coded). The marker bit is set on the first packet, on the first
 *   after a gap (mute, skipped DTX packets) and on the first after an output worker restart. No
 *   RTCP is sent: receivers (ffmpeg, GStreamer, Janus) play RTP without sender reports.
 * - {@link RtpReceiver} listens on a UDP port (`--rtp-in PORT`, 127.0.0.1 unless another host is
 *   configured) and lends the socket to the input worker, which validates each datagram as RTP
 *   and checks the Opus payload as {@link AudioService.pushMicrophonePacket} would, then plays it.
 * - {@link writeRtp} / {@link readRtp} are the header codec.
 *
 * Decisions:
 * - **DTX packets are not sent** (RFC 7587 §3.1.3 lets a sender stop during DTX; a receiver
 *   conceals the gap). A frame the encoder coded in at most 2 bytes is skipped and counted in
 *   `kvm_audio_rtp_dtx_not_sent_total`; the packet after the gap carries the marker bit and its
 *   timestamp shows how long the gap was. `sendDtx: true` sends them anyway.
 * - **Multicast destinations are refused** unless `allowMulticast` is set; the limited broadcast
 *   address and the unspecified addresses are always refused, and the socket never gets
 *   `SO_BROADCAST`, so the kernel refuses subnet broadcasts too. Hosts are resolved once, when the
 *   sender opens. The service sends nothing anywhere unless a destination is configured.
 * - **Payload type**: the sender uses 111 unless told otherwise. The receiver accepts only its
 *   configured payload type; when none is configured it accepts any dynamic one (96–127), since
 *   senders differ (browsers and Janus use 111, ffmpeg 97). Static payload types are never Opus.
 * - **RTCP on the RTP port** (RFC 5761 multiplexing, second byte 192–223) is recognised, checked
 *   for a sane length and ignored (`kvm_audio_rtp_rtcp_ignored_total`), not counted as malformed.
 * - **One source at a time.** Another SSRC (another sender) takes over from the one playing when
 *   no source played yet, when the one playing has been quiet for 200 ms (a sender restarted with
 *   a new SSRC), or when it sends two packets in sequence with none of the playing one's between
 *   (its first is then dropped; so of two senders at once the first keeps playing). Until then
 *   its packets are dropped and counted (`otherSource`, `frames_dropped_total{reason=
 *   "rtp_other_source"}`): a straggler of the sender just replaced (which can come back only the
 *   second way) or a stray datagram costs nothing. The first packet of a source that takes over
 *   starts a new stream in the playout buffer (flushing what the old one still had buffered),
 *   whatever its sequence number — a sender numbered like the old one is not taken for
 *   duplicates; so does the first RTP packet after a WebSocket talker's, and the other way round.
 *   Takeovers are counted in the receiver's stats (`ssrcChanges`).
 * - Every datagram the receiving socket delivers ends up in exactly one place: the service's
 *   `received{transport="rtp"}` (valid RTP; the service may then still refuse the Opus payload and
 *   count it under its own `malformed` reasons), `malformed{reason="rtp"}` (invalid RTP), or the
 *   RTCP counter.
 *
 * @module
 */

import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { getLogger } from "@logtape/logtape";
import type { AudioService } from "../service.ts";
import { sdpFor } from "./sdp.ts";
import { socketAddress, UdpSocket } from "../../ffi/udp.ts";
import { type RtpOutCounts, RtpOutput, RtpOutTable } from "./rtp_out.ts";

const log = getLogger(["kvm-audio", "rtp"]);

export * from "./rtp_header.ts";
import {
  DEFAULT_OPUS_PAYLOAD_TYPE,
  DYNAMIC_PAYLOAD_TYPES,
  RTP_MALFORMED_REASONS,
  RTP_STATS,
  type RtpMalformedReason,
} from "./rtp_header.ts";

// ---------------------------------------------------------------------------------------------
// Addresses.

/** A UDP endpoint as written on the command line: a host name or IP literal and a port. */
export interface HostPort {
  /** Host name or IP literal (IPv6 without brackets). */
  readonly host: string;
  readonly port: number;
}

function parsePortText(what: string, input: string, text: string): number {
  if (!/^[0-9]{1,5}$/.test(text) || Number(text) < 1 || Number(text) > 65535) {
    throw new RangeError(
      `Invalid ${what} ${JSON.stringify(input)}: expected a port from 1 to 65535, got "${text}"`,
    );
  }
  return Number(text);
}

/**
 * Parses `HOST:PORT` (`192.0.2.10:5004`, `gateway.lan:5004`, `[2001:db8::1]:5004`).
 *
 * @throws {TypeError} when `s` is not a string
 * @throws {RangeError} when it is not of that form
 */
export function parseHostPort(s: unknown, what = "RTP destination"): HostPort {
  if (typeof s !== "string") {
    throw new TypeError(
      `Invalid ${what} ${JSON.stringify(s) ?? String(s)}: expected a string HOST:PORT`,
    );
  }
  const expected = "expected HOST:PORT, e.g. 192.0.2.10:5004 or [2001:db8::1]:5004";
  const bracketed = /^\[([^\]]+)\]:([^:]*)$/.exec(s);
  let host: string, port: string;
  if (bracketed) {
    host = bracketed[1]!;
    port = bracketed[2]!;
    if (isIP(host) !== 6) {
      throw new RangeError(
        `Invalid ${what} ${JSON.stringify(s)}: "${host}" is not an IPv6 address`,
      );
    }
  } else {
    const colon = s.lastIndexOf(":");
    if (colon < 0) throw new RangeError(`Invalid ${what} ${JSON.stringify(s)}: ${expected}`);
    host = s.slice(0, colon);
    port = s.slice(colon + 1);
    if (host.includes(":")) {
      throw new RangeError(
        `Invalid ${what} ${JSON.stringify(s)}: write an IPv6 address in brackets, ${expected}`,
      );
    }
    if (!/^[A-Za-z0-9.-]+$/.test(host)) {
      throw new RangeError(
        `Invalid ${what} ${JSON.stringify(s)}: "${host}" is not a host name or IP address`,
      );
    }
  }
  return { host, port: parsePortText(what, s, port) };
}

/**
 * Parses the `--rtp-in` value: `PORT` (bound on 127.0.0.1) or `HOST:PORT` (an address of this
 * machine to bind, e.g. `0.0.0.0:5004` to accept RTP from the network).
 */
export function parseListenAddress(s: unknown): HostPort {
  if (typeof s === "string" && /^[0-9]+$/.test(s)) {
    return { host: "127.0.0.1", port: parsePortText("RTP listen address", s, s) };
  }
  return parseHostPort(s, "RTP listen address");
}

/** A resolved destination. */
export interface RtpDestination {
  /** As configured (host name or literal). */
  readonly host: string;
  /** The IP literal packets go to. */
  readonly address: string;
  readonly family: 4 | 6;
  readonly port: number;
}

/** What kind of address an IP literal is, as far as sending goes. */
export type AddressScope = "loopback" | "unicast" | "multicast" | "broadcast" | "unspecified";

/** An IPv6 literal's normal spelling (zone id dropped): "0:0::0001" → "::1". */
function normalIPv6(address: string): string {
  return new URL(`http://[${address.replace(/%.*$/, "")}]/`).hostname.slice(1, -1);
}

/** The IPv4 address inside an IPv4-mapped IPv6 literal (`::ffff:1.2.3.4`), else null. */
export function mappedIPv4(address: string): string | null {
  if (isIP(address) !== 6) return null;
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(normalIPv6(address));
  if (!mapped) return null;
  const hi = parseInt(mapped[1]!, 16), lo = parseInt(mapped[2]!, 16);
  return [hi >> 8, hi & 0xff, lo >> 8, lo & 0xff].join(".");
}

/** Classifies an IP literal (IPv4-mapped IPv6 addresses as their IPv4 address). */
export function addressScope(address: string): AddressScope {
  const family = isIP(address);
  if (family === 0) {
    throw new RangeError(`Invalid IP address "${address}": expected an IPv4 or IPv6 literal`);
  }
  const v4 = family === 4 ? address : mappedIPv4(address);
  const v6 = family === 6 ? normalIPv6(address) : "";
  if (v4 !== null) {
    const octets = v4.split(".").map(Number);
    const a = octets[0]!;
    if (octets.every((o) => o === 0)) return "unspecified";
    if (octets.every((o) => o === 255)) return "broadcast";
    if (a === 127) return "loopback";
    if (a >= 224 && a <= 239) return "multicast";
    return "unicast";
  }
  if (v6 === "::") return "unspecified";
  if (v6 === "::1") return "loopback";
  if (v6.startsWith("ff")) return "multicast";
  return "unicast";
}

/**
 * Resolves a destination once (IP literals are kept as they are; a name takes the first address
 * the system resolver gives) and checks that it may be sent to.
 *
 * @throws {RangeError} for an unspecified or broadcast address, or a multicast one unless allowed
 * @throws {Error} when the name does not resolve (with the resolver's error as `cause`)
 */
export async function resolveDestination(
  hp: HostPort,
  { allowMulticast = false }: { allowMulticast?: boolean } = {},
): Promise<RtpDestination> {
  let address = hp.host;
  if (isIP(address) === 0) {
    try {
      address = (await lookup(hp.host)).address;
    } catch (e) {
      throw new Error(
        `Cannot resolve RTP destination "${hp.host}": ${(e as Error).message}`,
        { cause: e },
      );
    }
  }
  // An IPv4-mapped address is sent to as IPv4: from an IPv6 socket bound to ::1 (loopback) a
  // mapped destination is unreachable (ENETUNREACH on every packet).
  address = mappedIPv4(address) ?? address;
  const scope = addressScope(address);
  const shown = hp.host === address ? `"${address}"` : `"${hp.host}" (${address})`;
  if (scope === "unspecified" || scope === "broadcast") {
    throw new RangeError(
      `Cannot send RTP to ${shown}: it is a ${scope} address, expected a unicast or multicast one`,
    );
  }
  if (scope === "multicast" && !allowMulticast) {
    throw new RangeError(
      `Cannot send RTP to ${shown}: it is a multicast address; allow multicast explicitly to use it`,
    );
  }
  return { host: hp.host, address, family: isIP(address) === 6 ? 6 : 4, port: hp.port };
}

function randomUint32(): number {
  return crypto.getRandomValues(new Uint32Array(1))[0]!;
}

function checkPayloadType(value: unknown): number {
  if (typeof value !== "number") {
    throw new TypeError(
      `Invalid RTP payload type ${JSON.stringify(value) ?? String(value)}: expected a number`,
    );
  }
  if (
    !Number.isInteger(value) || value < DYNAMIC_PAYLOAD_TYPES.min ||
    value > DYNAMIC_PAYLOAD_TYPES.max
  ) {
    throw new RangeError(
      `Invalid RTP payload type "${value}": expected a dynamic payload type from 96 to 127`,
    );
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Sender.

/**
 * What the sender needs of the service. A service offers its RTP output table (`rtpOutput`):
 * its output worker then sends the packets itself as it encodes them. A source without one (a
 * test handing frames over by hand) has them sent from the thread that hands them over.
 */
export type FrameSource =
  & Pick<AudioService, "subscribe" | "metrics">
  & Partial<Pick<AudioService, "rtpOutput">>;

/** Options of {@link RtpSender.open}. */
export interface RtpSenderOptions {
  /** Where to send: `HOST:PORT` strings or parsed pairs. At least one. */
  readonly destinations: readonly (string | HostPort)[];
  /** Payload type, 96–127; 111 when unset. */
  readonly payloadType?: number;
  /** Allow multicast destinations (refused otherwise). */
  readonly allowMulticast?: boolean;
  /** Also send DTX/silence packets of at most 2 bytes (skipped otherwise). */
  readonly sendDtx?: boolean;
  /** Fixed SSRC (tests); random when unset. */
  readonly ssrc?: number;
  /** First sequence number (tests); random when unset. */
  readonly firstSequence?: number;
  /** Added to every frame timestamp (tests); random when unset. */
  readonly timestampBase?: number;
}

/** Per-destination counts of an {@link RtpSender}. */
export interface RtpDestinationStats extends RtpDestination {
  readonly sent: number;
  readonly sentBytes: number;
  readonly errors: number;
  readonly lastError: string | null;
}

/** Counts of an {@link RtpSender}. */
export interface RtpSenderStats {
  readonly ssrc: number;
  readonly payloadType: number;
  /** RTP packets built (each goes to every destination). */
  readonly packets: number;
  readonly dtxNotSent: number;
  readonly destinations: readonly RtpDestinationStats[];
}

interface Target {
  readonly dest: RtpDestination;
  readonly socket: UdpSocket;
}

/**
 * Sockets a closed sender or receiver could not safely close (see {@link RtpSender.close},
 * {@link RtpReceiver.close}): kept referenced for good, so no finalizer closes them either.
 */
const STRANDED: UdpSocket[] = [];

/**
 * Sends the service's encoded output frames as Opus RTP to fixed destinations. Open with
 * {@link RtpSender.open}; {@link close} stops it.
 *
 * The sender opens one non-blocking C-library socket per destination ({@link UdpSocket}) and
 * hands them, with its SSRC, payload type and sequence numbering, to the service's RTP output
 * table (`rtp_out.ts`): the output worker sends each packet the moment it has encoded the frame,
 * so RTP costs the main thread nothing per frame and adds no hop between threads. The kernel's
 * socket buffer is the only queue; when it is full (`EAGAIN`/`ENOBUFS`) the packet is dropped and
 * counted as `frames_dropped_total{reason="rtp_backlog"}` — a fresh packet is worth more to a live
 * listener than a late one. Up to four senders share a service (`RTP_OUT_LIMITS`).
 *
 * Counts: {@link stats} reads the table at once; the `rtp` transport series of the service's
 * metrics are counted by the output worker and arrive with its next metrics snapshot.
 */
export class RtpSender implements AsyncDisposable {
  readonly #targets: Target[];
  readonly #payloadType: number;
  readonly #ssrc: number;
  readonly #table: RtpOutTable;
  readonly #slot: number;
  #unsubscribe: (() => void) | null = null;
  /** The counts when closed (the slot may serve another sender afterwards). */
  #final: RtpOutCounts | null = null;
  #closing: Promise<void> | null = null;

  private constructor(
    source: FrameSource,
    targets: Target[],
    options: RtpSenderOptions,
  ) {
    this.#targets = targets;
    this.#payloadType = options.payloadType ?? DEFAULT_OPUS_PAYLOAD_TYPE;
    this.#ssrc = options.ssrc ?? randomUint32();
    this.#table = source.rtpOutput ?? RtpOutTable.create();
    this.#slot = this.#table.add({
      payloadType: this.#payloadType,
      ssrc: this.#ssrc,
      sequence: options.firstSequence ?? randomUint32() & 0xffff,
      timestampBase: options.timestampBase ?? randomUint32(),
      sendDtx: options.sendDtx ?? false,
      destinations: targets.map((t) => ({
        fd: t.socket.fd,
        to: socketAddress(t.dest.address, t.dest.port),
        label: `${t.dest.family === 6 ? `[${t.dest.address}]` : t.dest.address}:${t.dest.port}`,
      })),
    });
    if (!source.rtpOutput) {
      const table = this.#table;
      const out = new RtpOutput(table, source.metrics, (slot, d, e) => table.logError(slot, d, e));
      this.#unsubscribe = source.subscribe((f) => out.send(f));
    }
  }

  /**
   * Validates the options, resolves every destination once, binds one socket per destination
   * (on the loopback address for a loopback destination, so nothing else is bound) and starts
   * sending the frames `source` publishes.
   *
   * @throws {TypeError} / {RangeError} for a bad option or destination
   */
  static async open(source: FrameSource, options: RtpSenderOptions): Promise<RtpSender> {
    if (!Array.isArray(options?.destinations) || options.destinations.length === 0) {
      throw new TypeError(
        `Invalid RTP destinations ${
          JSON.stringify(options?.destinations) ?? "undefined"
        }: expected at least one HOST:PORT`,
      );
    }
    if (options.payloadType !== undefined) checkPayloadType(options.payloadType);
    for (
      const [what, v, min, max] of [
        ["SSRC", options.ssrc, 0, 0xffffffff],
        ["first sequence number", options.firstSequence, 0, 0xffff],
        ["timestamp base", options.timestampBase, 0, 0xffffffff],
      ] as const
    ) {
      if (v !== undefined && (!Number.isInteger(v) || v < min || v > max)) {
        throw new RangeError(
          `Invalid RTP ${what} "${v}": expected an integer from ${min} to ${max}`,
        );
      }
    }
    const dests: RtpDestination[] = [];
    for (const d of options.destinations) {
      const hp = typeof d === "string"
        ? parseHostPort(d)
        : parseHostPort(`${isIP(d.host) === 6 ? `[${d.host}]` : d.host}:${d.port}`);
      dests.push(
        await resolveDestination(hp, { allowMulticast: options.allowMulticast ?? false }),
      );
    }
    const targets: Target[] = [];
    let sender: RtpSender;
    try {
      for (const dest of dests) {
        // Bound to the loopback address for a loopback destination, so nothing else is bound.
        const loopback = addressScope(dest.address) === "loopback";
        const bindTo = dest.family === 6
          ? (loopback ? "::1" : "::")
          : (loopback ? "127.0.0.1" : "0.0.0.0");
        let socket: UdpSocket;
        try {
          socket = UdpSocket.open(bindTo, 0);
        } catch (e) {
          throw new Error(
            `Cannot open an RTP socket for ${dest.address}:${dest.port}: ${(e as Error).message}`,
            { cause: e },
          );
        }
        targets.push({ dest, socket });
      }
      sender = new RtpSender(source, targets, options);
    } catch (e) {
      for (const t of targets) t.socket.close();
      throw e;
    }
    log.info("Sending Opus RTP (payload type {pt}, SSRC {ssrc}) to {to}", {
      pt: sender.#payloadType,
      ssrc: sender.#ssrc,
      to: dests.map((d) => `${d.address}:${d.port}`).join(", "),
    });
    return sender;
  }

  /** The SSRC of the stream. */
  get ssrc(): number {
    return this.#ssrc;
  }

  /** The payload type of the stream. */
  get payloadType(): number {
    return this.#payloadType;
  }

  /** The resolved destinations, in the order given. */
  get destinations(): readonly RtpDestination[] {
    return this.#targets.map((t) => t.dest);
  }

  /** Counts so far. */
  get stats(): RtpSenderStats {
    const c = this.#final ?? this.#table.counts(this.#slot);
    return {
      ssrc: this.#ssrc,
      payloadType: this.#payloadType,
      packets: c.packets,
      dtxNotSent: c.dtxNotSent,
      destinations: this.#targets.map((t, i) => ({ ...t.dest, ...c.destinations[i]! })),
    };
  }

  /**
   * The SDP a receiver at the first destination needs, for the stream shape `preset` gives
   * (pass the service's current `outputPreset`: channels and frame duration follow it).
   */
  sdp(preset: { channels: number; frameMs: number; inbandFec: boolean }): string {
    return sdpFor(this.#targets[0]!.dest, {
      payloadType: this.#payloadType,
      channels: preset.channels,
      frameMs: preset.frameMs,
      inbandFec: preset.inbandFec,
      sessionId: this.#ssrc,
    });
  }

  /**
   * Stops sending and closes the sockets once no send can still be using them (see
   * `RtpOutTable.remove`; sockets a stuck send might still use are left open). Idempotent: every
   * call resolves when the first one is done.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#unsubscribe?.();
      this.#unsubscribe = null;
      const { counts, idle } = await this.#table.remove(this.#slot);
      this.#final = counts;
      if (idle) {
        for (const t of this.#targets) t.socket.close();
      } else {
        for (const t of this.#targets) STRANDED.push(t.socket);
        log.warn("RTP sockets to {to} left open: the output worker did not finish a send", {
          to: this.#targets.map((t) => `${t.dest.address}:${t.dest.port}`).join(", "),
        });
      }
    })();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Receiver.

/** What the receiver needs of the service. */
export type MicrophoneSink = Pick<
  AudioService,
  "attachRtpInput" | "detachRtpInput" | "rtpInputStats"
>;

/** Options of {@link RtpReceiver.listen}. */
export interface RtpReceiverOptions {
  /** UDP port; 0 picks a free one (see {@link RtpReceiver.port}). */
  readonly port: number;
  /** Address to bind; 127.0.0.1 when unset. */
  readonly host?: string;
  /** Payload type accepted; any dynamic one (96–127) when unset or `null`. */
  readonly payloadType?: number | null;
}

/** Counts of an {@link RtpReceiver}. */
export interface RtpReceiverStats {
  /** Datagrams read from the socket: `accepted` + `malformed` + `rtcp` + `stale`. */
  readonly datagrams: number;
  /** Valid RTP handed to the service. */
  readonly accepted: number;
  /** Invalid RTP, by reason. */
  readonly malformed: Readonly<Record<RtpMalformedReason, number>>;
  /** RTCP ignored. */
  readonly rtcp: number;
  /**
   * Datagrams that came while the microphone pipeline was stopped or restarting, dropped unread
   * (also counted as `frames_dropped_total{reason="microphone_stopped"}`).
   */
  readonly stale: number;
  /** Times another SSRC took over from the one playing. */
  readonly ssrcChanges: number;
  /** SSRC of the source playing (the latest to take over); null before the first. */
  readonly ssrc: number | null;
  /**
   * Valid packets (of those `accepted`) of another SSRC dropped while one played: a straggler of
   * a replaced sender, or a second sender that has not taken over (see the module notes; also
   * counted as `frames_dropped_total{reason="rtp_other_source"}`).
   */
  readonly otherSource: number;
}

/**
 * Receives Opus RTP on a UDP port for the microphone pipeline. Start with
 * {@link RtpReceiver.listen}; {@link close} stops it.
 *
 * The socket is bound here, on the main thread — so a bad address or a port in use fails the
 * start-up with a message — and lent to the input worker (`AudioService.attachRtpInput`), which
 * reads it whenever it wakes for the device and checks each datagram itself. No RTP packet wakes
 * the main thread: a Deno event-loop turn per packet cost ≈ 0.5–0.6 CPU-s per audio minute at
 * 100 packets/s on the CI-class VM (with `Deno.listenDatagram`; `node:dgram` cost ≈ 100 µs per
 * packet more). The worker takes each datagram with the kernel's arrival time (`SIOCGSTAMPNS`),
 * so the playout buffer measures jitter as the packets came. Its receive buffer is the kernel's
 * default (`net.core.rmem_default`, ≈ 200 KiB here: seconds of a 100-packet/s stream), which also
 * holds what comes while the microphone pipeline is stopped or restarting.
 */
export class RtpReceiver implements AsyncDisposable {
  readonly #socket: UdpSocket;
  readonly #sink: MicrophoneSink;
  readonly #stats: Int32Array;
  readonly #port: number;
  readonly #address: string;
  #closing: Promise<void> | null = null;

  private constructor(socket: UdpSocket, sink: MicrophoneSink, address: string) {
    this.#socket = socket;
    this.#sink = sink;
    this.#stats = new Int32Array(sink.rtpInputStats);
    this.#port = socket.port;
    this.#address = address;
  }

  /**
   * Binds the port and lends the socket to `sink`'s microphone pipeline.
   *
   * @throws {TypeError} / {RangeError} for a bad option
   * @throws {Error} when the port cannot be bound (the socket error as `cause`)
   * @throws {ServiceUnavailableError} when the service has no microphone pipeline
   */
  // Async with nothing to await: kept so that every failure (a bad option, a port in use) is a
  // rejection, as callers and tests expect.
  // deno-lint-ignore require-await
  static async listen(sink: MicrophoneSink, options: RtpReceiverOptions): Promise<RtpReceiver> {
    const port = options?.port;
    if (typeof port !== "number" || !Number.isInteger(port) || port < 0 || port > 65535) {
      throw new RangeError(
        `Invalid RTP input port ${
          JSON.stringify(port) ?? String(port)
        }: expected an integer from 0 to 65535`,
      );
    }
    const host = options.host ?? "127.0.0.1";
    const family = isIP(host);
    if (family === 0) {
      throw new RangeError(`Invalid RTP input address "${host}": expected an IP address literal`);
    }
    const payloadType = options.payloadType == null ? null : checkPayloadType(options.payloadType);
    const where = `${family === 6 ? `[${host}]` : host}:${port}`;
    let socket: UdpSocket;
    try {
      socket = UdpSocket.open(host, port);
    } catch (e) {
      throw new Error(`Cannot listen for RTP on ${where}: ${(e as Error).message}`, { cause: e });
    }
    try {
      sink.attachRtpInput(socket.fd, payloadType);
    } catch (e) {
      socket.close();
      throw e;
    }
    const receiver = new RtpReceiver(socket, sink, host);
    log.info("Receiving Opus RTP on {address}:{port} (payload type {pt})", {
      address: host,
      port: receiver.#port,
      pt: payloadType ?? "96-127",
    });
    return receiver;
  }

  /** The bound port. */
  get port(): number {
    return this.#port;
  }

  /** The bound address. */
  get address(): string {
    return this.#address;
  }

  /** Counts so far (kept by the input worker as it reads). */
  get stats(): RtpReceiverStats {
    const w = this.#stats;
    const at = (i: number) => Atomics.load(w, i);
    const malformed = {} as Record<RtpMalformedReason, number>;
    RTP_MALFORMED_REASONS.forEach((r, i) => malformed[r] = at(RTP_STATS.malformed + i));
    return {
      datagrams: at(RTP_STATS.datagrams),
      accepted: at(RTP_STATS.accepted),
      malformed,
      rtcp: at(RTP_STATS.rtcp),
      stale: at(RTP_STATS.stale),
      ssrcChanges: at(RTP_STATS.ssrcChanges),
      ssrc: at(RTP_STATS.hasSsrc) === 0 ? null : at(RTP_STATS.ssrc) >>> 0,
      otherSource: at(RTP_STATS.otherSource),
    };
  }

  /**
   * Takes the socket back from the worker and closes it — unless the worker may still be reading
   * it (see `AudioService.detachRtpInput`): then it is left open and bound. Idempotent: every
   * call resolves when the first one is done.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (await this.#sink.detachRtpInput()) {
        this.#socket.close();
      } else {
        STRANDED.push(this.#socket);
        log.warn(
          "RTP input socket {address}:{port} left open: the input worker did not finish a read",
          {
            address: this.#address,
            port: this.#port,
          },
        );
      }
    })();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
