/**
 * `/api/microphone`: the microphone pipeline (operator → target) — status, quality, start/stop,
 * and the talk stream (`GET /api/microphone/stream`, a WebSocket; protocol in
 * `lib/transport/ws_protocol.ts`).
 *
 * ## One talker at a time
 * The target has one speaker, and two voices interleaved packet by packet would be noise. So the
 * talk stream has one talker: a second connection is upgraded and then closed at once with code
 * 4409 and reason "microphone busy" (a browser cannot read the HTTP status of a refused upgrade,
 * but it can read a close code). A client that connects with `?takeover=1` replaces the current
 * talker instead, which is closed with 4410 "taken over" — the operator's page offers that after
 * a 4409. A refusal and a takeover are not connection drops (they are logged, not counted).
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import type { AudioService } from "../lib/service.ts";
import { transportMetrics } from "../lib/pipeline/pipeline_metrics.ts";
import { frameSamples, PRESET_NAMES } from "../lib/quality.ts";
import {
  CloseCode,
  CloseReason,
  decodeFrame,
  MalformedFrameError,
  PROTOCOL_VERSION,
  SAMPLE_RATE,
  type TalkHello,
} from "../lib/transport/ws_protocol.ts";
import {
  answerControl,
  pipelineStatusBody,
  type RouteDeps,
  type RouteSpec,
  TOKEN_QUERY,
} from "./http.ts";
import { SCHEMAS } from "./openapi.ts";
import { pipelineRoutes } from "./pipeline_routes.ts";

const log = getLogger(["kvm-audio", "talk"]);

/** What a talk client should send, from the service's microphone preset. */
export function talkHello(service: AudioService): TalkHello {
  const p = service.microphonePreset;
  return {
    type: "hello",
    version: PROTOCOL_VERSION,
    codec: "opus",
    sampleRate: SAMPLE_RATE,
    channels: p.channels,
    frameMs: p.frameMs,
    frameSamples: frameSamples(p),
    preset: p.name,
    bitrate: p.bitrate,
    application: p.application,
    complexity: p.complexity,
    vbr: p.vbr,
    vbrConstraint: p.vbrConstraint,
    signal: p.signal,
    maxBandwidth: p.maxBandwidth,
    dtx: p.dtx,
    fec: p.inbandFec,
    packetLossPerc: p.packetLossPerc,
    running: service.microphoneStatus().enabled && service.controlState.microphoneRunning,
  };
}

/** What the talk channel uses of a socket; a Deno `WebSocket` fits. */
export interface TalkSocket {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** The current talker as plain data. */
export interface TalkerStats {
  readonly id: number;
  readonly label: string;
  /** When it connected, epoch ms. */
  readonly connectedAt: number;
  /** Binary messages received from it. */
  readonly received: number;
  /** Of those, how many were dropped as malformed (header or packet). */
  readonly malformed: number;
  /** Text messages that were not control messages. */
  readonly badText: number;
}

interface Talker {
  readonly id: number;
  readonly socket: TalkSocket;
  readonly label: string;
  readonly connectedAt: number;
  received: number;
  malformed: number;
  badText: number;
  hello: string;
  /** No packet of this connection queued yet: the next one starts a new stream. */
  fresh: boolean;
}

/** The talk stream's state: at most one talker (see the module notes). */
export class TalkChannel {
  readonly #service: AudioService;
  readonly #m;
  #current: Talker | null = null;
  #nextId = 1;
  #closed = false;

  constructor(service: AudioService) {
    this.#service = service;
    const t = transportMetrics(service.metrics);
    this.#m = {
      received: t.received.labels({ transport: "websocket" }),
      malformed: t.malformed,
      drops: t.connectionDrops.labels({ transport: "websocket" }),
    };
  }

  /** The current talker, `null` when nobody talks. */
  stats(): TalkerStats | null {
    const t = this.#current;
    if (t === null) return null;
    return {
      id: t.id,
      label: t.label,
      connectedAt: t.connectedAt,
      received: t.received,
      malformed: t.malformed,
      badText: t.badText,
    };
  }

  /**
   * A socket opened: makes it the talker and sends it the hello, or refuses it (4409) when
   * someone talks and `takeover` is false. Returns whether it became the talker.
   */
  open(socket: TalkSocket, options: { takeover: boolean; label: string }): boolean {
    if (this.#closed) {
      closeQuietly(socket, CloseCode.goingAway, CloseReason.goingAway);
      return false;
    }
    const previous = this.#current;
    if (previous !== null && previous.socket.readyState <= 1) {
      if (!options.takeover) {
        log.info("Refused talker ({label}): talker {id} is connected", {
          label: options.label,
          id: previous.id,
        });
        closeQuietly(socket, CloseCode.busy, CloseReason.busy);
        return false;
      }
      log.info("Talker {id} taken over ({label})", { id: previous.id, label: options.label });
      closeQuietly(previous.socket, CloseCode.takenOver, CloseReason.takenOver);
    }
    const hello = JSON.stringify(talkHello(this.#service));
    this.#current = {
      id: this.#nextId++,
      socket,
      label: options.label,
      connectedAt: Date.now(),
      received: 0,
      malformed: 0,
      badText: 0,
      hello,
      fresh: true,
    };
    socket.send(hello);
    log.info("Talker {id} connected ({label})", { id: this.#current.id, label: options.label });
    return true;
  }

  /**
   * A message from `socket`. Binary: header + Opus packet, handed to the service (sequence
   * truncated to 16 bits). Text: a control message (ping), anything else is counted as malformed.
   * Messages of a socket that is not the talker are ignored.
   */
  message(socket: TalkSocket, data: unknown): void {
    const t = this.#current;
    if (t === null || t.socket !== socket) return;
    if (typeof data === "string") {
      const pong = answerControl(data);
      if (pong !== null) {
        if (socket.readyState === 1) socket.send(pong);
        return;
      }
      t.badText++;
      this.#m.malformed.inc(1, { reason: "text" });
      return;
    }
    let bytes: Uint8Array;
    if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
    else if (ArrayBuffer.isView(data)) {
      bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    } else {
      t.malformed++;
      this.#m.received.inc();
      this.#m.malformed.inc(1, { reason: "type" });
      return;
    }
    t.received++;
    let frame;
    try {
      frame = decodeFrame(bytes);
    } catch (e) {
      if (!(e instanceof MalformedFrameError)) throw e;
      t.malformed++;
      this.#m.received.inc();
      this.#m.malformed.inc(1, { reason: e.reason });
      return;
    }
    // Each connection is a new stream: a page counts from 0 on every Talk, and a quick second
    // Talk would otherwise send numbers the playout buffer has just played (taken for
    // duplicates, a second of speech lost).
    const r = this.#service.pushMicrophonePacket(
      frame.payload,
      frame.seq & 0xffff,
      frame.timestamp,
      "websocket",
      t.fresh,
    );
    if (r === "queued") t.fresh = false;
    if (r === "malformed") t.malformed++;
  }

  /** A socket closed (or failed, with `"error"`: counted as a connection drop). */
  closed(socket: TalkSocket, why?: "error"): void {
    const t = this.#current;
    if (t === null || t.socket !== socket) return;
    this.#current = null;
    if (why === "error") this.#m.drops.inc();
    log.info("Talker {id} left after {received} packets", { id: t.id, received: t.received });
  }

  /** Sends the talker a new hello when what it should send changed. Call after a change. */
  refresh(): void {
    const t = this.#current;
    if (t === null) return;
    const hello = JSON.stringify(talkHello(this.#service));
    if (hello === t.hello) return;
    t.hello = hello;
    if (t.socket.readyState === 1) t.socket.send(hello);
  }

  /** Closes the talker (going away) and refuses later ones. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const t = this.#current;
    this.#current = null;
    if (t !== null) closeQuietly(t.socket, CloseCode.goingAway, CloseReason.goingAway);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function closeQuietly(socket: TalkSocket, code: number, reason: string): void {
  try {
    socket.close(code, reason);
  } catch {
    // Already closing or closed.
  }
}

/** Status of the microphone pipeline as the API shows it. */
export function microphoneStatus(service: AudioService, talk: TalkChannel) {
  return { ...pipelineStatusBody(service.microphoneStatus()), talker: talk.stats() };
}

/** The routes of `/api/microphone`. */
export function microphoneRoutes({ service, talk }: RouteDeps): RouteSpec[] {
  return pipelineRoutes({
    resource: "microphone",
    direction: "microphone",
    device: "playback",
    enabled: () => service.microphoneStatus().enabled,
    status: () => microphoneStatus(service, talk),
    statusSchema: SCHEMAS.microphoneStatus,
    quality: {
      body: () => ({
        preset: service.microphonePreset.name,
        allowed: PRESET_NAMES,
        settings: service.microphonePreset,
        send: talkHello(service),
      }),
      schema: SCHEMAS.microphoneQuality,
      summary: "Microphone preset and what a client should send",
      description: "`send` is what the talk stream's `hello` says: codec, channels, frame " +
        "duration, bitrate, FEC, DTX, complexity and Opus application to encode with.",
      setDescription: "The decoder follows whatever the packets carry, so this only changes " +
        "what clients are told to send (`applied` is `stored` or `unchanged`); the current " +
        "talker gets a new `hello`.",
      set: (name) => service.setMicrophonePreset(name),
    },
    startSummary: "Start the microphone pipeline",
    start: () => service.startMicrophone(),
    stopDescription: "A connected talker stays connected; its packets are dropped until a start.",
    stop: () => service.stopMicrophone(),
    stream: {
      operationId: "talkMicrophone",
      verb: "talk",
      summary: "Talk: a WebSocket taking Opus packets",
      description: "Upgrade to a WebSocket. The server sends a JSON `hello` saying what to send " +
        "(as `send` in GET /api/microphone/quality) and again when that changes. The client " +
        "sends binary messages: the 12-byte header of the listen stream (low 16 bits of the " +
        "sequence used) and one Opus packet. Malformed messages are counted and dropped. One " +
        "talker at a time: a second connection is closed with code 4409 (microphone busy) " +
        "unless it connects with `?takeover=1`, which closes the current talker with 4410 " +
        "(taken over). Browsers may pass the token as `?token=`.",
      query: {
        ...TOKEN_QUERY,
        takeover: {
          description: "1 to replace the current talker instead of being refused",
          enum: ["0", "1"],
        },
      },
      connect: (c) => {
        const takeover = c.req.query("takeover") === "1";
        const label = `request ${c.get("requestId")}`;
        return {
          open: (socket) => talk.open(socket, { takeover, label }),
          message: (socket, data) => talk.message(socket, data),
          closed: (socket, why) => talk.closed(socket, why),
        };
      },
    },
  });
}
