/**
 * Fan-out of encoded output frames to WebSocket listeners, with a bounded queue per listener.
 *
 * The hub subscribes once to the service (while it has at least one listener) and turns each
 * frame into one binary message — {@link HEADER_BYTES}-byte header + packet, built once and shared
 * by every listener. Then, per listener:
 *
 * - **Behind or not.** A listener is behind when its socket still holds more than
 *   `highWaterBytes` unsent bytes from earlier event-loop turns (`WebSocket.bufferedAmount`
 *   minus what the hub itself sent during the current turn: the runtime only writes between
 *   turns, so a burst of frames handed over in one turn must not look like a slow peer).
 * - **Queue.** A listener that is not behind gets the message at once. One that is behind has
 *   it queued; the queue holds at most `maxQueue` messages and drops the oldest when full. Drops
 *   are counted per listener and in `kvm_audio_frames_dropped_total{reason="listener_slow"}`.
 *   Queues are drained on every later frame while the socket is not behind.
 * - **Hopeless.** A listener that keeps dropping for `closeAfterMs` without its queue draining
 *   once is closed with {@link CloseCode}`.tooSlow` and counted in
 *   `kvm_audio_connection_drops_total{transport="websocket"}`.
 *
 * Nothing here waits: the service's frame loop and the other listeners never wait for a slow
 * one.
 *
 * The hub sends a JSON {@link ListenHello} on join and whenever its content changes: the shape
 * of the packets (channels, frame duration — taken from the frames themselves, so it changes at
 * the first packet of a new shape), the chosen preset or mute ({@link WebSocketHub.refresh} after
 * a control change). Queued packets carry the hello in force when they were produced, so a hello
 * always precedes the first packet it describes, even across drops.
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import { transportMetrics } from "../pipeline/pipeline_metrics.ts";
import type { AudioService, EncodedFrame } from "../service.ts";
import {
  CloseCode,
  CloseReason,
  FrameFlag,
  HEADER_BYTES,
  type ListenHello,
  PROTOCOL_VERSION,
  SAMPLE_RATE,
  writeFrameHeader,
} from "./ws_protocol.ts";

const log = getLogger(["kvm-audio", "hub"]);

/** `WebSocket.OPEN`. */
const OPEN = 1;

/** What the hub uses of the service. */
export type HubSource = Pick<
  AudioService,
  "subscribe" | "outputPreset" | "muted" | "metrics"
>;

/** What the hub uses of a socket; a Deno `WebSocket` fits. */
export interface HubSocket {
  readonly readyState: number;
  /** Bytes handed to `send` and not yet written to the connection. */
  readonly bufferedAmount: number;
  send(data: string | Uint8Array<ArrayBuffer>): void;
  close(code?: number, reason?: string): void;
}

/** Options of a {@link WebSocketHub}. */
export interface HubOptions {
  /** Messages queued per listener before the oldest is dropped (default 50 ≈ 1 s of 20 ms frames). */
  readonly maxQueue?: number;
  /** Unsent bytes from earlier turns above which a listener is behind (default 32 KiB). */
  readonly highWaterBytes?: number;
  /** A listener that keeps dropping this long without catching up is closed (default 10 000 ms). */
  readonly closeAfterMs?: number;
  /** Clock, ms (default `performance.now`). */
  readonly now?: () => number;
}

/** One listener as plain data. */
export interface ListenerStats {
  readonly id: number;
  /** What the caller said about it (e.g. the peer address); "" when nothing. */
  readonly label: string;
  /** When it joined, epoch ms. */
  readonly connectedAt: number;
  /** Packets sent to it. */
  readonly sent: number;
  /** Bytes sent to it (headers included). */
  readonly sentBytes: number;
  /** Packets dropped from its queue because it was too slow. */
  readonly dropped: number;
  /** Messages waiting in its queue. */
  readonly queued: number;
  /** What its socket still holds unsent, bytes. */
  readonly bufferedAmount: number;
}

/** A queued message: a packet (or nothing) and the hello in force when it was produced. */
interface Entry {
  readonly bytes: Uint8Array<ArrayBuffer> | null;
  readonly hello: string;
}

class Listener {
  readonly queue: (Entry | undefined)[];
  head = 0;
  count = 0;
  lastHello: string | null = null;
  sent = 0;
  sentBytes = 0;
  dropped = 0;
  /** When it started dropping without having caught up since; `null` when caught up. */
  droppingSince: number | null = null;
  /** Turn of {@link tickBytes}. */
  tick = -1;
  /** Bytes sent during turn {@link tick}. */
  tickBytes = 0;
  readonly connectedAt = Date.now();

  constructor(
    readonly id: number,
    readonly socket: HubSocket,
    readonly label: string,
    maxQueue: number,
  ) {
    this.queue = new Array(maxQueue);
  }

  /** Appends `e`; returns the entry dropped to make room, if any. */
  push(e: Entry): Entry | undefined {
    const cap = this.queue.length;
    let dropped: Entry | undefined;
    if (this.count === cap) dropped = this.shift();
    this.queue[(this.head + this.count) % cap] = e;
    this.count++;
    return dropped;
  }

  peek(): Entry | undefined {
    return this.count === 0 ? undefined : this.queue[this.head];
  }

  shift(): Entry | undefined {
    if (this.count === 0) return undefined;
    const e = this.queue[this.head];
    this.queue[this.head] = undefined;
    this.head = (this.head + 1) % this.queue.length;
    this.count--;
    return e;
  }
}

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
  const v = value ?? fallback;
  if (!Number.isInteger(v) || v < 1) {
    throw new RangeError(`Invalid ${name} ${JSON.stringify(v)}: expected a positive integer`);
  }
  return v;
}

/** Fan-out of output frames to WebSocket listeners (see the module documentation). */
export class WebSocketHub {
  readonly #source: HubSource;
  readonly #maxQueue: number;
  readonly #highWater: number;
  readonly #closeAfterMs: number;
  readonly #now: () => number;
  readonly #listeners = new Map<HubSocket, Listener>();
  readonly #m;
  #unsubscribe: (() => void) | null = null;
  #nextId = 1;
  #closed = false;
  // Hello in force: its fields and its text.
  #channels: 1 | 2 | null = null;
  #frameMs: number | null = null;
  #preset = "";
  #muted = false;
  #hello = "";
  // Continuity of the frames received.
  #expectSeq: number | null = null;
  #expectTimestamp = 0;
  // Event-loop turns (see the module notes).
  #tick = 0;
  #tickOpen = false;

  constructor(source: HubSource, options: HubOptions = {}) {
    this.#source = source;
    this.#maxQueue = positiveInteger("maxQueue", options.maxQueue, 50);
    this.#highWater = positiveInteger("highWaterBytes", options.highWaterBytes, 32 * 1024);
    this.#closeAfterMs = positiveInteger("closeAfterMs", options.closeAfterMs, 10_000);
    this.#now = options.now ?? (() => performance.now());
    const t = transportMetrics(source.metrics);
    this.#m = {
      sent: t.sent.labels({ transport: "websocket" }),
      sentBytes: t.sentBytes.labels({ transport: "websocket" }),
      slow: t.dropped.labels({ reason: "listener_slow" }),
      drops: t.connectionDrops.labels({ transport: "websocket" }),
    };
  }

  /** Listeners connected. */
  get size(): number {
    return this.#listeners.size;
  }

  /**
   * Adds an open socket as a listener and sends it the hello. Returns the listener's id. A closed
   * hub closes the socket at once (going away) and returns 0.
   */
  add(socket: HubSocket, label = ""): number {
    if (this.#closed) {
      closeQuietly(socket, CloseCode.goingAway, CloseReason.goingAway);
      return 0;
    }
    if (this.#listeners.has(socket)) return this.#listeners.get(socket)!.id;
    const l = new Listener(this.#nextId++, socket, label, this.#maxQueue);
    this.#listeners.set(socket, l);
    if (this.#unsubscribe === null) {
      // Forget what an earlier subscription saw: the shape may have changed meanwhile.
      this.#channels = null;
      this.#frameMs = null;
      this.#hello = "";
      this.#expectSeq = null;
      this.#unsubscribe = this.#source.subscribe(this.#onFrame);
    }
    this.#openTick();
    this.#updateHello(this.#channels, this.#frameMs);
    this.#enqueue(l, { bytes: null, hello: this.#hello }, this.#now());
    log.info("Listener {id} joined ({label}); {count} listening", {
      id: l.id,
      label,
      count: this.#listeners.size,
    });
    return l.id;
  }

  /**
   * Forgets a listener (after its socket closed; with `"error"` after a socket error, counted as a
   * connection drop). Returns whether it was one.
   */
  remove(socket: HubSocket, why?: "error"): boolean {
    const l = this.#listeners.get(socket);
    if (l === undefined) return false;
    this.#listeners.delete(socket);
    if (why === "error") this.#m.drops.inc();
    if (this.#listeners.size === 0 && this.#unsubscribe !== null) {
      this.#unsubscribe();
      this.#unsubscribe = null;
    }
    log.info("Listener {id} left after {sent} packets, {dropped} dropped", {
      id: l.id,
      sent: l.sent,
      dropped: l.dropped,
    });
    return true;
  }

  /** Sends a new hello to every listener if the preset or mute changed. Call after a change. */
  refresh(): void {
    const before = this.#hello;
    this.#updateHello(this.#channels, this.#frameMs);
    if (this.#hello === before) return;
    this.#openTick();
    const now = this.#now();
    for (const l of this.#listeners.values()) {
      this.#enqueue(l, { bytes: null, hello: this.#hello }, now);
    }
  }

  /** Every listener as plain data. */
  listeners(): ListenerStats[] {
    return [...this.#listeners.values()].map((l) => ({
      id: l.id,
      label: l.label,
      connectedAt: l.connectedAt,
      sent: l.sent,
      sentBytes: l.sentBytes,
      dropped: l.dropped,
      queued: l.count,
      bufferedAmount: l.socket.bufferedAmount,
    }));
  }

  /** Closes every listener (going away) and stops listening to the service. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const l of [...this.#listeners.values()]) {
      this.remove(l.socket);
      closeQuietly(l.socket, CloseCode.goingAway, CloseReason.goingAway);
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }

  // -------------------------------------------------------------------------------------------

  readonly #onFrame = (f: EncodedFrame): void => {
    this.#openTick();
    this.#updateHello(f.channels === 1 ? 1 : 2, (f.samples * 1000) / SAMPLE_RATE);
    let flags = f.silence ? FrameFlag.silence : 0;
    if (
      this.#expectSeq !== null &&
      (f.seq !== this.#expectSeq || f.timestamp !== this.#expectTimestamp)
    ) {
      flags |= FrameFlag.discontinuity;
    }
    this.#expectSeq = (f.seq + 1) >>> 0;
    this.#expectTimestamp = (f.timestamp + f.samples) >>> 0;
    const bytes = new Uint8Array(HEADER_BYTES + f.data.length);
    writeFrameHeader(bytes, { flags, channels: f.channels, seq: f.seq, timestamp: f.timestamp });
    bytes.set(f.data, HEADER_BYTES);
    const entry: Entry = { bytes, hello: this.#hello };
    const now = this.#now();
    for (const l of this.#listeners.values()) this.#enqueue(l, entry, now);
  };

  #enqueue(l: Listener, e: Entry, now: number): void {
    if (l.count > 0) this.#flush(l); // make room before dropping anything
    const lost = l.push(e);
    if (lost?.bytes) {
      l.dropped++;
      this.#m.slow.inc();
      l.droppingSince ??= now;
    }
    this.#flush(l);
    if (l.count === 0) {
      l.droppingSince = null;
    } else if (l.droppingSince !== null && now - l.droppingSince >= this.#closeAfterMs) {
      this.#dropListener(l);
    }
  }

  #flush(l: Listener): void {
    for (let e = l.peek(); e !== undefined; e = l.peek()) {
      if (l.socket.readyState !== OPEN) return; // its close event will remove it
      const earlier = l.tick === this.#tick ? l.tickBytes : 0;
      if (l.socket.bufferedAmount - earlier > this.#highWater) return;
      l.shift();
      if (e.hello !== l.lastHello) {
        if (!this.#send(l, e.hello)) return;
        l.lastHello = e.hello;
      }
      if (e.bytes !== null) {
        if (!this.#send(l, e.bytes)) return;
        l.sent++;
        l.sentBytes += e.bytes.length;
        this.#m.sent.inc();
        this.#m.sentBytes.inc(e.bytes.length);
      }
    }
  }

  #send(l: Listener, data: string | Uint8Array<ArrayBuffer>): boolean {
    try {
      l.socket.send(data);
    } catch (e) {
      log.warn("Listener {id} failed, dropping it: {error}", {
        id: l.id,
        error: (e as Error).message,
      });
      this.remove(l.socket);
      this.#m.drops.inc();
      closeQuietly(l.socket, 1011, "send failed");
      return false;
    }
    if (l.tick !== this.#tick) {
      l.tick = this.#tick;
      l.tickBytes = 0;
    }
    l.tickBytes += data.length;
    return true;
  }

  #dropListener(l: Listener): void {
    log.warn("Listener {id} stayed behind for {ms} ms ({dropped} dropped): closing it", {
      id: l.id,
      ms: this.#closeAfterMs,
      dropped: l.dropped,
    });
    this.remove(l.socket);
    this.#m.drops.inc();
    closeQuietly(l.socket, CloseCode.tooSlow, CloseReason.tooSlow);
  }

  /** Recomputes the hello text from the frame shape and the service's control state. */
  #updateHello(channels: 1 | 2 | null, frameMs: number | null): void {
    const preset = this.#source.outputPreset;
    const muted = this.#source.muted;
    if (
      this.#hello !== "" && channels === this.#channels && frameMs === this.#frameMs &&
      preset.name === this.#preset && muted === this.#muted
    ) return;
    this.#channels = channels;
    this.#frameMs = frameMs;
    this.#preset = preset.name;
    this.#muted = muted;
    const hello: ListenHello = {
      type: "hello",
      version: PROTOCOL_VERSION,
      codec: "opus",
      sampleRate: SAMPLE_RATE,
      channels: channels ?? preset.channels,
      frameMs: frameMs ?? preset.frameMs,
      preset: preset.name,
      muted,
    };
    this.#hello = JSON.stringify(hello);
  }

  #openTick(): void {
    if (this.#tickOpen) return;
    this.#tickOpen = true;
    this.#tick++;
    queueMicrotask(() => {
      this.#tickOpen = false;
    });
  }
}

function closeQuietly(socket: HubSocket, code: number, reason: string): void {
  try {
    socket.close(code, reason);
  } catch {
    // Already closing or closed.
  }
}
