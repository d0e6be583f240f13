/**
 * RTP output in shared memory: the table of RTP senders ({@link RtpOutTable}) and the code that
 * sends a frame to every sender in it ({@link RtpOutput}).
 *
 * The output worker sends the service's RTP itself, right after it encodes a frame: no frame wakes
 * the main thread just to go out over UDP. The main thread's `RtpSender` only fills a table slot
 * (sockets it opened, addresses, SSRC, payload type, first sequence number) and reads the counts
 * back; the worker keeps the stream going. A frame source without a worker (a test feeding frames
 * by hand) gets a private table, sent from the main thread by the same {@link RtpOutput}.
 *
 * Layout: a header of {@link HEAD} words, then {@link RTP_OUT_LIMITS.senders} sender slots of
 * {@link SENDER_WORDS} 32-bit words (settings, then per destination its descriptor, address and
 * last error), then 64-bit counters per slot ({@link COUNTER_WORDS}). The main thread writes a
 * slot's settings before it marks it active and clears `active` before it closes the sockets; the
 * worker raises `busy` for as long as it sends, so {@link RtpOutTable.remove} can wait until no
 * send can still be using a closed descriptor (as with the RTP input socket, see
 * `AudioService.detachRtpInput`). The RTP sequence number lives in the slot, so a restarted worker
 * goes on numbering where the last one stopped; a restart marks its first packet, like any gap.
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import { ERRNO, errnoText, UdpSocket } from "../../ffi/udp.ts";
import type { Registry } from "../metrics.ts";
import { pollUntil, WORKER_CALL_WAIT_MS } from "../poll.ts";
import { transportMetrics } from "../pipeline/pipeline_metrics.ts";
import { RTP_HEADER_BYTES, RTP_VERSION, rtpMetrics } from "./rtp_header.ts";

const log = getLogger(["kvm-audio", "rtp"]);

/** How many senders one table holds, and destinations per sender. */
export const RTP_OUT_LIMITS = { senders: 4, destinations: 8 } as const;

/** Table header words (exported for tests, which raise `busy` by hand). */
export const HEAD = { active: 0, busy: 1, words: 4 } as const;
/** Words of a sender slot (settings; destinations follow at `dest`). `state`: 0 free, 1 active, 2 being removed. */
const S = {
  state: 0,
  epoch: 1,
  payloadType: 2,
  ssrc: 3,
  timestampBase: 4,
  sendDtx: 5,
  destinations: 6,
  sequence: 7,
  dest: 8,
} as const;
/** Words of a destination inside a sender slot: a `struct sockaddr` of up to 28 bytes. */
const D = { fd: 0, addrBytes: 1, lastErrno: 2, addr: 3, words: 10 } as const;
const SENDER_WORDS = S.dest + RTP_OUT_LIMITS.destinations * D.words;
/** 64-bit counters of a slot: packets built, DTX frames skipped, then per destination three. */
const C = { packets: 0, dtxNotSent: 1, dest: 2, sent: 0, bytes: 1, errors: 2, perDest: 3 } as const;
const COUNTER_WORDS = C.dest + RTP_OUT_LIMITS.destinations * C.perDest;
const INT_WORDS = HEAD.words + RTP_OUT_LIMITS.senders * SENDER_WORDS;
/** Bytes of a table's SharedArrayBuffer. */
const TABLE_BYTES = INT_WORDS * 4 + RTP_OUT_LIMITS.senders * COUNTER_WORDS * 8;

/** Largest Opus packet a sender is given (a ring slot: see `OUTPUT_RING`). */
const MAX_PAYLOAD = 1500;

/** What a sender sends with (see `RtpSenderOptions` for the meaning). */
export interface RtpOutSettings {
  readonly payloadType: number;
  readonly ssrc: number;
  /** Sequence number of the first packet. */
  readonly sequence: number;
  readonly timestampBase: number;
  readonly sendDtx: boolean;
  /** Open sockets and where each sends (`socketAddress`); the caller keeps them open. */
  readonly destinations: readonly {
    readonly fd: number;
    readonly to: Uint8Array;
    /** How logs name it, e.g. `192.0.2.10:5004`. */
    readonly label: string;
  }[];
}

/** Counts of one sender slot. */
export interface RtpOutCounts {
  readonly packets: number;
  readonly dtxNotSent: number;
  readonly destinations: readonly {
    readonly sent: number;
    readonly sentBytes: number;
    readonly errors: number;
    readonly lastError: string | null;
  }[];
}

/** A frame to send: what the output worker knows when it encoded it. */
export interface RtpOutFrame {
  /** The Opus packet. */
  readonly data: Uint8Array;
  /** Frame counter of the output pipeline (consecutive frames differ by one). */
  readonly seq: number;
  /** 48 kHz timestamp of the frame (uint32). */
  readonly timestamp: number;
  /** Samples per channel at 48 kHz. */
  readonly samples: number;
  /** A DTX/silence packet of at most 2 bytes. */
  readonly silence: boolean;
}

/**
 * The shared table of RTP senders. The main thread creates it ({@link RtpOutTable.create}),
 * {@link add}s and {@link remove}s senders and reads their {@link counts}; the sending thread
 * {@link RtpOutTable.attach}es to the same buffer and sends through an {@link RtpOutput}.
 */
export class RtpOutTable {
  readonly buffer: SharedArrayBuffer;
  readonly words: Int32Array;
  readonly counters: BigInt64Array;
  /** How logs name each destination, by slot (main thread only). */
  readonly #labels: (readonly string[])[] = [];

  private constructor(buffer: SharedArrayBuffer) {
    this.buffer = buffer;
    this.words = new Int32Array(buffer, 0, INT_WORDS);
    this.counters = new BigInt64Array(buffer, INT_WORDS * 4);
  }

  static create(): RtpOutTable {
    return new RtpOutTable(new SharedArrayBuffer(TABLE_BYTES));
  }

  static attach(buffer: SharedArrayBuffer): RtpOutTable {
    if (!(buffer instanceof SharedArrayBuffer) || buffer.byteLength !== TABLE_BYTES) {
      throw new TypeError(
        `Cannot attach an RTP output table to ${
          String((buffer as { byteLength?: number })?.byteLength)
        } bytes: expected a SharedArrayBuffer of ${TABLE_BYTES}`,
      );
    }
    return new RtpOutTable(buffer);
  }

  /** Senders active now. */
  get active(): number {
    return Atomics.load(this.words, HEAD.active);
  }

  /**
   * Fills a free slot with `s` and activates it; returns the slot.
   *
   * @throws {RangeError} with no free slot or too many destinations
   */
  add(s: RtpOutSettings): number {
    const n = s.destinations.length;
    if (n < 1 || n > RTP_OUT_LIMITS.destinations) {
      throw new RangeError(
        `Cannot send RTP to ${n} destinations: expected 1 to ${RTP_OUT_LIMITS.destinations}`,
      );
    }
    const w = this.words;
    let slot = -1;
    for (let i = 0; i < RTP_OUT_LIMITS.senders && slot < 0; i++) {
      if (Atomics.load(w, HEAD.words + i * SENDER_WORDS + S.state) === 0) slot = i;
    }
    if (slot < 0) {
      throw new RangeError(
        `Cannot add another RTP sender: ${RTP_OUT_LIMITS.senders} are sending already`,
      );
    }
    const base = HEAD.words + slot * SENDER_WORDS;
    Atomics.store(w, base + S.payloadType, s.payloadType);
    Atomics.store(w, base + S.ssrc, s.ssrc | 0);
    Atomics.store(w, base + S.timestampBase, s.timestampBase | 0);
    Atomics.store(w, base + S.sendDtx, s.sendDtx ? 1 : 0);
    Atomics.store(w, base + S.destinations, n);
    Atomics.store(w, base + S.sequence, s.sequence & 0xffff);
    const bytes = new Uint8Array(this.buffer);
    s.destinations.forEach((d, i) => {
      const at = base + S.dest + i * D.words;
      if (d.to.length > (D.words - D.addr) * 4) {
        throw new RangeError(`Cannot send RTP to an address of ${d.to.length} bytes`);
      }
      Atomics.store(w, at + D.fd, d.fd);
      Atomics.store(w, at + D.addrBytes, d.to.length);
      Atomics.store(w, at + D.lastErrno, 0);
      bytes.set(d.to, (at + D.addr) * 4);
    });
    this.counters.fill(0n, slot * COUNTER_WORDS, (slot + 1) * COUNTER_WORDS);
    this.#labels[slot] = s.destinations.map((d) => d.label);
    Atomics.add(w, base + S.epoch, 1);
    // Last: from here on the sending thread may use the slot.
    Atomics.store(w, base + S.state, 1);
    Atomics.add(w, HEAD.active, 1);
    return slot;
  }

  /**
   * Deactivates `slot` and resolves, with the slot's final counts, once no send can still be
   * using its sockets: a sender mid-frame finishes first (microseconds). `idle` is false when
   * `busy` stayed raised for `WORKER_CALL_WAIT_MS` — a worker terminated mid-send, or one stalled
   * there: the caller must then not close the sockets (a descriptor number reused by a TCP
   * connection would receive the datagram). The slot is not free for another sender until this
   * resolves.
   */
  async remove(slot: number): Promise<{ counts: RtpOutCounts; idle: boolean }> {
    const w = this.words;
    const base = HEAD.words + slot * SENDER_WORDS;
    // Draining (2): not sent to any more, not yet free for add().
    if (Atomics.compareExchange(w, base + S.state, 1, 2) === 1) Atomics.sub(w, HEAD.active, 1);
    const idle = await pollUntil(() => Atomics.load(w, HEAD.busy) === 0, WORKER_CALL_WAIT_MS);
    const counts = this.counts(slot);
    Atomics.store(w, base + S.state, 0);
    return { counts, idle };
  }

  /** Counts of `slot` so far. */
  counts(slot: number): RtpOutCounts {
    const c = this.counters, w = this.words;
    const at = (i: number) => Number(Atomics.load(c, slot * COUNTER_WORDS + i));
    const base = HEAD.words + slot * SENDER_WORDS;
    const n = Atomics.load(w, base + S.destinations);
    const destinations = [];
    for (let i = 0; i < n; i++) {
      const d = C.dest + i * C.perDest;
      const e = Atomics.load(w, base + S.dest + i * D.words + D.lastErrno);
      destinations.push({
        sent: at(d + C.sent),
        sentBytes: at(d + C.bytes),
        errors: at(d + C.errors),
        lastError: e === 0 ? null : errnoText(e),
      });
    }
    return { packets: at(C.packets), dtxNotSent: at(C.dtxNotSent), destinations };
  }

  /** Logs a send error the sending thread reported (main thread). */
  logError(slot: number, destination: number, errno: number): void {
    log.warn("RTP to {to} failed: {error}", {
      to: this.#labels[slot]?.[destination] ?? `destination ${destination} of sender ${slot}`,
      error: errnoText(errno),
    });
  }
}

/** A sender slot as the sending thread caches it, valid while the slot's epoch holds. */
interface Stream {
  epoch: number;
  readonly slot: number;
  readonly base: number;
  readonly counters: number;
  readonly payloadType: number;
  readonly ssrc: number;
  readonly timestampBase: number;
  readonly sendDtx: boolean;
  readonly sockets: readonly UdpSocket[];
  readonly to: readonly Uint8Array[];
  first: boolean;
  gap: boolean;
  expectTimestamp: number;
  expectSeq: number;
}

/**
 * Sends frames to every active sender of a table: one RTP packet (RFC 7587) per frame and sender,
 * to each of its destinations, at once on the non-blocking sockets. The kernel's socket buffer is
 * the only queue; when it is full (`EAGAIN`/`ENOBUFS`) the packet is dropped and counted as
 * `frames_dropped_total{reason="rtp_backlog"}` — a fresh packet is worth more to a live listener
 * than a late one. The marker bit goes on a sender's first packet (a new sender, or a restarted
 * worker) and on the first after a gap (frames not sent: muted, or skipped DTX; frames a
 * main-thread source dropped before handing them over) — a gap shows as a frame counter or
 * timestamp that does not follow on.
 */
export class RtpOutput {
  readonly #table: RtpOutTable;
  readonly #streams: (Stream | null)[] = new Array(RTP_OUT_LIMITS.senders).fill(null);
  readonly #packet = new Uint8Array(RTP_HEADER_BYTES + MAX_PAYLOAD);
  readonly #header = new DataView(this.#packet.buffer, 0, RTP_HEADER_BYTES);
  readonly #onError: (slot: number, destination: number, errno: number) => void;
  readonly #m: {
    sent: { inc(n?: number): void };
    sentBytes: { inc(n?: number): void };
    backlog: { inc(n?: number): void };
    sendErrors: { inc(n?: number): void };
    dtxNotSent: { inc(n?: number): void };
  };

  /**
   * @param registry where the `rtp` transport series are counted
   * @param onError called when a destination's error changes (the main thread logs it)
   */
  constructor(
    table: RtpOutTable,
    registry: Registry,
    onError: (slot: number, destination: number, errno: number) => void,
  ) {
    this.#table = table;
    this.#onError = onError;
    // A worker terminated mid-send left `busy` raised; its successor is the only sender.
    Atomics.store(table.words, HEAD.busy, 0);
    const t = transportMetrics(registry), r = rtpMetrics(registry);
    this.#m = {
      sent: t.sent.labels({ transport: "rtp" }),
      sentBytes: t.sentBytes.labels({ transport: "rtp" }),
      backlog: t.dropped.labels({ reason: "rtp_backlog" }),
      sendErrors: r.sendErrors,
      dtxNotSent: r.dtxNotSent,
    };
  }

  /** Whether any sender is active (one load: cheap enough to ask per frame). */
  get active(): boolean {
    return Atomics.load(this.#table.words, HEAD.active) > 0;
  }

  /** Sends `f` to every active sender; returns how many packets it built. */
  send(f: RtpOutFrame): number {
    const w = this.#table.words;
    // Raised before the slots are read: remove() clears a slot, then waits for this to fall.
    Atomics.store(w, HEAD.busy, 1);
    let built = 0;
    try {
      for (let slot = 0; slot < RTP_OUT_LIMITS.senders; slot++) {
        const base = HEAD.words + slot * SENDER_WORDS;
        if (Atomics.load(w, base + S.state) !== 1) continue;
        let s = this.#streams[slot];
        const epoch = Atomics.load(w, base + S.epoch);
        if (!s || s.epoch !== epoch) s = this.#streams[slot] = this.#load(slot, epoch);
        if (this.#sendTo(s, f)) built++;
      }
    } finally {
      Atomics.store(w, HEAD.busy, 0);
    }
    return built;
  }

  #load(slot: number, epoch: number): Stream {
    const w = this.#table.words, bytes = new Uint8Array(this.#table.buffer);
    const base = HEAD.words + slot * SENDER_WORDS;
    const n = Atomics.load(w, base + S.destinations);
    const sockets: UdpSocket[] = [], to: Uint8Array[] = [];
    for (let i = 0; i < n; i++) {
      const at = base + S.dest + i * D.words;
      sockets.push(UdpSocket.borrow(Atomics.load(w, at + D.fd)));
      const len = Atomics.load(w, at + D.addrBytes);
      to.push(bytes.slice((at + D.addr) * 4, (at + D.addr) * 4 + len));
    }
    return {
      epoch,
      slot,
      base,
      counters: slot * COUNTER_WORDS,
      payloadType: Atomics.load(w, base + S.payloadType),
      ssrc: Atomics.load(w, base + S.ssrc) >>> 0,
      timestampBase: Atomics.load(w, base + S.timestampBase) >>> 0,
      sendDtx: Atomics.load(w, base + S.sendDtx) !== 0,
      sockets,
      to,
      first: true,
      gap: false,
      expectTimestamp: 0,
      expectSeq: 0,
    };
  }

  /** Packetizes `f` for `s` and sends it to each destination; false when skipped (DTX). */
  #sendTo(s: Stream, f: RtpOutFrame): boolean {
    const c = this.#table.counters, w = this.#table.words;
    const continuous = f.timestamp === s.expectTimestamp && f.seq === s.expectSeq;
    s.expectTimestamp = (f.timestamp + f.samples) >>> 0;
    s.expectSeq = (f.seq + 1) >>> 0;
    if (f.silence && !s.sendDtx) {
      Atomics.add(c, s.counters + C.dtxNotSent, 1n);
      this.#m.dtxNotSent.inc();
      s.gap = true;
      return false;
    }
    if (f.data.length > MAX_PAYLOAD) {
      throw new RangeError(
        `Cannot send an Opus packet of ${f.data.length} bytes over RTP: expected at most ${MAX_PAYLOAD}`,
      );
    }
    const marker = s.first || s.gap || !continuous;
    const sequence = Atomics.load(w, s.base + S.sequence) & 0xffff;
    const h = this.#header;
    h.setUint8(0, RTP_VERSION << 6);
    h.setUint8(1, (marker ? 0x80 : 0) | s.payloadType);
    h.setUint16(2, sequence);
    h.setUint32(4, (f.timestamp + s.timestampBase) >>> 0);
    h.setUint32(8, s.ssrc);
    this.#packet.set(f.data, RTP_HEADER_BYTES);
    const packet = this.#packet.subarray(0, RTP_HEADER_BYTES + f.data.length);
    Atomics.store(w, s.base + S.sequence, (sequence + 1) & 0xffff);
    s.first = false;
    s.gap = false;
    Atomics.add(c, s.counters + C.packets, 1n);
    for (let i = 0; i < s.sockets.length; i++) {
      const n = s.sockets[i]!.sendTo(packet, s.to[i]!);
      const d = s.counters + C.dest + i * C.perDest;
      if (n >= 0) {
        Atomics.add(c, d + C.sent, 1n);
        Atomics.add(c, d + C.bytes, BigInt(packet.length));
        this.#m.sent.inc();
        this.#m.sentBytes.inc(packet.length);
      } else if (n === -ERRNO.EAGAIN || n === -ERRNO.ENOBUFS) {
        this.#m.backlog.inc();
      } else {
        Atomics.add(c, d + C.errors, 1n);
        this.#m.sendErrors.inc();
        const errnoWord = s.base + S.dest + i * D.words + D.lastErrno;
        if (Atomics.exchange(w, errnoWord, -n) !== -n) this.#onError(s.slot, i, -n);
      }
    }
    return true;
  }
}
