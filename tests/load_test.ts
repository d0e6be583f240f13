/**
 * Load and abuse of the two WebSocket streams through a real server on 127.0.0.1:
 *
 * - 200 listeners of the ultra preset (100 packets/s each) for 30 s of clock-paced capture, plus
 *   one stalled peer: every healthy listener gets every packet in order and never falls further
 *   behind than the hub's queue bound; the stalled one is dropped-oldest and closed, and the drop
 *   counter holds its drops and nobody else's. The 200 clients run in a Web Worker: on the
 *   server's thread their 20 000 message events a second would compete with the hub they are
 *   meant to measure; in a worker they have a thread of their own and still publish their
 *   progress through shared memory, so the test samples every listener's lag at one instant
 *   without a message round trip (a child process could not share that memory).
 * - 10⁵ random and mutated messages at the talk stream: the service stays up, every message is
 *   accounted for in the metrics, the live heap stays flat.
 *
 * @module
 */

import assert from "node:assert/strict";
import { OPUS_MAX_PACKET } from "../ffi/opus.ts";
import { INPUT_RING } from "../lib/pipeline/messages.ts";
import { transportMetrics } from "../lib/pipeline/pipeline_metrics.ts";
import { AudioService, refreshSupervisorMetrics } from "../lib/service.ts";
import type { HubOptions, ListenerStats } from "../lib/transport/hub.ts";
import { CloseCode, encodeFrame, HEADER_BYTES } from "../lib/transport/ws_protocol.ts";
import { createApp } from "../routes/app.ts";
import { useAlsaConfig, writeAlsaConfig, writeRaw } from "./alsa_devices.ts";
import { tempDir, tone } from "./audio_util.ts";
import {
  concat,
  counter,
  fuzzRandom,
  garbageCollector,
  micPackets,
  rawWebSocket,
  serveApp,
  sleep,
  until,
} from "./net_util.ts";

/** A real server on 127.0.0.1 over `service`; disposing it closes streams and the server. */
function serve(service: AudioService, hub: HubOptions = {}) {
  return serveApp((signal) => createApp(service, { hub, signal }));
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket framing for a peer written by hand (RFC 6455 §5.2).

const WS_OPCODE = { text: 0x1, binary: 0x2, close: 0x8 } as const;

/** A client frame: FIN, `opcode`, masked (with a zero key, which leaves the payload as is). */
function clientFrame(opcode: number, payload: Uint8Array): Uint8Array {
  const n = payload.length;
  const lenBytes = n < 126 ? 0 : n < 65536 ? 2 : 8;
  const out = new Uint8Array(2 + lenBytes + 4 + n);
  out[0] = 0x80 | opcode;
  const view = new DataView(out.buffer);
  if (lenBytes === 0) out[1] = 0x80 | n;
  else if (lenBytes === 2) {
    out[1] = 0x80 | 126;
    view.setUint16(2, n);
  } else {
    out[1] = 0x80 | 127;
    view.setBigUint64(2, BigInt(n));
  }
  out.set(payload, 2 + lenBytes + 4);
  return out;
}

interface ServerFrame {
  readonly opcode: number;
  readonly payload: Uint8Array;
}

/** Splits unmasked server frames off the front of `buf`; returns them and the bytes used. */
function parseServerFrames(buf: Uint8Array): { frames: ServerFrame[]; used: number } {
  const frames: ServerFrame[] = [];
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let off = 0;
  for (;;) {
    if (buf.length - off < 2) break;
    assert.equal(buf[off]! & 0x80, 0x80, "the server sends unfragmented frames");
    assert.equal(buf[off + 1]! & 0x80, 0, "the server does not mask");
    let len = buf[off + 1]! & 0x7f;
    let head = 2;
    if (len === 126) {
      if (buf.length - off < 4) break;
      len = view.getUint16(off + 2);
      head = 4;
    } else if (len === 127) {
      if (buf.length - off < 10) break;
      len = Number(view.getBigUint64(off + 2));
      head = 10;
    }
    if (buf.length - off < head + len) break;
    frames.push({
      opcode: buf[off]! & 0x0f,
      payload: buf.slice(off + head, off + head + len),
    });
    off += head + len;
  }
  return { frames, used: off };
}

/**
 * A listener that does the WebSocket handshake and then reads nothing until asked: what a
 * frozen browser tab or a peer behind a dead link looks like to the server.
 */
class StalledPeer {
  readonly #conn: Deno.TcpConn;
  #pending: Uint8Array;

  private constructor(conn: Deno.TcpConn, rest: Uint8Array) {
    this.#conn = conn;
    this.#pending = rest;
  }

  static async connect(port: number, path: string): Promise<StalledPeer> {
    const { conn, rest } = await rawWebSocket(port, path);
    return new StalledPeer(conn, rest);
  }

  /** Sends a ping whose id is `bytes` long (its pong is as long), and does not read the pong. */
  async ping(bytes: number): Promise<void> {
    const text = JSON.stringify({ type: "ping", id: "x".repeat(bytes) });
    await this.#conn.write(clientFrame(WS_OPCODE.text, new TextEncoder().encode(text)));
  }

  /** Reads everything the server sent, up to and including its close frame. */
  async readToClose(timeoutMs: number): Promise<ServerFrame[]> {
    const frames: ServerFrame[] = [];
    const chunk = new Uint8Array(1 << 20);
    const timer = setTimeout(() => this.#conn.close(), timeoutMs);
    try {
      for (;;) {
        const parsed = parseServerFrames(this.#pending);
        this.#pending = this.#pending.slice(parsed.used);
        frames.push(...parsed.frames);
        if (frames.some((f) => f.opcode === WS_OPCODE.close)) return frames;
        const n = await this.#conn.read(chunk);
        if (n === null) return frames;
        this.#pending = concat(this.#pending, chunk.subarray(0, n));
      }
    } catch (e) {
      if (e instanceof Deno.errors.BadResource) {
        throw new Error(`Timed out after ${timeoutMs} ms reading the stalled peer's stream`);
      }
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  close(): void {
    try {
      this.#conn.close();
    } catch {
      // Closed already (by the read timeout).
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Listener clients in a Web Worker.

/** What one client in the worker saw. */
interface ClientReport {
  /** Binary messages. */
  readonly packets: number;
  /** Sequence number of the first and of the last packet; -1 before any. */
  readonly first: number;
  readonly last: number;
  /** Packets whose sequence number was not the previous one's + 1. */
  readonly breaks: number;
  /** Text messages (hellos). */
  readonly texts: number;
  /** Close code if the socket closed, else null. */
  readonly closeCode: number | null;
}

type ToClients =
  | {
    readonly type: "start";
    readonly url: string;
    readonly count: number;
    readonly progress: SharedArrayBuffer;
  }
  | { readonly type: "report" };

type FromClients =
  | { readonly type: "ready" }
  | { readonly type: "failed"; readonly message: string }
  | { readonly type: "report"; readonly clients: ClientReport[] };

/**
 * The body of the client worker (stringified: it must not use anything from outside itself).
 * Opens `count` listeners, records per listener what arrives, and publishes each one's newest
 * sequence number into a shared Int32Array so the test samples progress without a message.
 */
function listenerClients(): void {
  const scope = globalThis as unknown as {
    postMessage(message: FromClients): void;
    addEventListener(type: "message", l: (e: MessageEvent<ToClients>) => void): void;
  };
  const clients: {
    ws: WebSocket;
    packets: number;
    first: number;
    last: number;
    breaks: number;
    texts: number;
    closeCode: number | null;
  }[] = [];
  scope.addEventListener("message", (e) => {
    const msg = e.data;
    if (msg.type === "report") {
      scope.postMessage({
        type: "report",
        clients: clients.map(({ ws: _ws, ...r }) => r),
      });
      return;
    }
    const progress = new Int32Array(msg.progress);
    let ready = 0;
    for (let i = 0; i < msg.count; i++) {
      const ws = new WebSocket(msg.url);
      ws.binaryType = "arraybuffer";
      const c = {
        ws,
        packets: 0,
        first: -1,
        last: -1,
        breaks: 0,
        texts: 0,
        closeCode: null as number | null,
      };
      clients.push(c);
      ws.onmessage = (ev: MessageEvent) => {
        if (typeof ev.data === "string") {
          // The hello comes first, right after the open.
          if (++c.texts === 1 && ++ready === msg.count) scope.postMessage({ type: "ready" });
          return;
        }
        const seq = new DataView(ev.data as ArrayBuffer).getUint32(4);
        if (c.packets === 0) c.first = seq;
        else if (seq !== ((c.last + 1) >>> 0)) c.breaks++;
        c.last = seq;
        c.packets++;
        Atomics.store(progress, i, seq);
      };
      ws.onerror = () => scope.postMessage({ type: "failed", message: `listener ${i} failed` });
      ws.onclose = (ev: CloseEvent) => {
        c.closeCode = ev.code;
      };
    }
  });
}

/** The client worker: the listeners' WebSockets, off the server's thread. */
class ListenerWorker {
  readonly #worker: Worker;
  readonly progress: Int32Array<SharedArrayBuffer>;
  readonly #waiters = new Map<string, (m: FromClients) => void>();
  failure: string | null = null;

  constructor(count: number) {
    const source = `(${listenerClients.toString()})();`;
    this.#worker = new Worker(
      `data:text/javascript;base64,${btoa(source)}`,
      { type: "module", name: "kvm-audio-load-listeners" },
    );
    // "Nothing received yet": the sequence before the first one (the service starts at 0).
    this.progress = new Int32Array(new SharedArrayBuffer(4 * count)).fill(-1);
    this.#worker.onmessage = (e: MessageEvent<FromClients>) => {
      const m = e.data;
      if (m.type === "failed") this.failure ??= m.message;
      const w = this.#waiters.get(m.type);
      if (w !== undefined) {
        this.#waiters.delete(m.type);
        w(m);
      }
    };
  }

  #next<T extends FromClients["type"]>(type: T): Promise<Extract<FromClients, { type: T }>> {
    return new Promise((resolve) => {
      this.#waiters.set(type, (m) => resolve(m as Extract<FromClients, { type: T }>));
    });
  }

  /** Opens the listeners; resolves when every one has its hello. */
  async start(url: string, timeoutMs = 30_000): Promise<void> {
    const ready = this.#next("ready");
    const failed = this.#next("failed").then((m) => {
      throw new Error(`Cannot open the listeners: ${m.message}`);
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`Timed out after ${timeoutMs} ms opening the listeners`)),
        timeoutMs,
      );
    });
    this.#worker.postMessage(
      {
        type: "start",
        url,
        count: this.progress.length,
        progress: this.progress.buffer,
      } satisfies ToClients,
    );
    try {
      await Promise.race([ready, failed, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  async report(): Promise<ClientReport[]> {
    const r = this.#next("report");
    this.#worker.postMessage({ type: "report" } satisfies ToClients);
    return (await r).clients;
  }

  [Symbol.dispose](): void {
    this.#worker.terminate();
  }
}

// ---------------------------------------------------------------------------------------------

Deno.test("listen stream: 200 ultra listeners for 30 s get every packet in order while a stalled peer is dropped-oldest and closed", async () => {
  const LISTENERS = 200;
  const SECONDS = 30;
  const MAX_QUEUE = 50; // the hub's bound: 0.5 s of 10 ms packets
  const CLOSE_AFTER_MS = 2000;
  const FRAMES = (SECONDS * 1000) / 10;

  await using dir = await tempDir();
  await writeRaw(
    `${dir.path}/in.raw`,
    tone({ freq: 1000, channels: 2, frames: 48000 * SECONDS, amplitude: 0.4 }),
  );
  const cfg = await writeAlsaConfig(dir.path, {
    kvm_load_capture: { type: "file", infile: `${dir.path}/in.raw` },
  });
  using _cfg = useAlsaConfig(cfg);
  await using service = new AudioService({
    capture: "kvm_load_capture",
    playback: null,
    outputPreset: "ultra",
    pace: "clock",
    maxCaptureSamples: 48000 * SECONDS,
  });
  await using server = serve(service, { maxQueue: MAX_QUEUE, closeAfterMs: CLOSE_AFTER_MS });
  const streams = async (): Promise<ListenerStats[]> =>
    (await (await server.app.request("/api/audio")).json()).streams;

  // The stalled peer joins first (listener id 1), then the 200 from the worker.
  const stalled = await StalledPeer.connect(server.port, "/api/audio/stream");
  try {
    await until("the stalled listener", async () => (await streams()).length === 1);
    const stalledId = (await streams())[0]!.id;
    using clients = new ListenerWorker(LISTENERS);
    await clients.start(server.url("/api/audio/stream"));
    await until("every listener", async () => (await streams()).length === LISTENERS + 1);

    // What the service produced, in order; and the frame during which the stalled peer was
    // closed (this subscription comes after the hub's, so it sees the hub's work on each frame).
    const t = transportMetrics(service.metrics);
    const closedByHub = t.connectionDrops.labels({ transport: "websocket" });
    const handed: number[] = [];
    let produced = -1;
    let closeSeq = -1;
    let pings = 0;
    const unsubscribe = service.subscribe((f) => {
      handed.push(f.seq);
      produced = f.seq;
      if (closeSeq < 0 && closedByHub.value > 0) closeSeq = f.seq;
    });

    // Lag of each listener behind the service, sampled on the main thread from the shared
    // progress words (no message round trip to distort it).
    const worstLag = new Int32Array(LISTENERS);
    let samples = 0;
    const sampler = setInterval(() => {
      if (produced < 0) return;
      samples++;
      for (let i = 0; i < LISTENERS; i++) {
        const lag = produced - Atomics.load(clients.progress, i);
        if (lag > worstLag[i]!) worstLag[i] = lag;
      }
    }, 20);
    // The hub's own view, less often: the healthy listeners' queues and the stalled one's drops.
    let worstQueued = 0;
    let stalledDroppedSeen = 0;
    let watching = true;
    const watcher = (async () => {
      while (watching) {
        for (const s of await streams()) {
          if (s.id === stalledId) stalledDroppedSeen = s.dropped;
          else worstQueued = Math.max(worstQueued, s.queued);
        }
        await sleep(250);
      }
    })();

    try {
      service.start();
      // Let the stream settle; then the stalled peer fills its own pipe with big pongs it never
      // reads (the kernel holds several MB on loopback: the ultra stream alone, ≈25 kB/s, would
      // take minutes). A ping only while nothing to it is unsent: Deno 2.9.5 loses the framing
      // of a client's incoming messages ("Invalid UTF-8", "Reserved bits are not zero") when it
      // reads one while a write to that client is blocked, and errors the socket. From then on
      // its socket stays behind; the hub queues, drops and closes it.
      await until("3 s of packets", () => produced >= 300);
      for (;;) {
        const s = (await streams()).find((l) => l.id === stalledId);
        assert.ok(s !== undefined, "the stalled listener is still there");
        // Stuck: more than a few packets in flight (they are ≈250 bytes).
        if (s.bufferedAmount > 16 * 1024) break;
        if (s.bufferedAmount === 0) {
          assert.ok(pings < 20, `${pings} pings of 2 MB did not fill the pipe`);
          await stalled.ping(2 << 20);
          pings++;
        }
        await sleep(300);
      }
      await until("the stalled listener to be closed", () => closedByHub.value === 1).catch(
        async (e) => {
          const s = (await streams()).find((l) => l.id === stalledId);
          throw new Error(`${e.message} after ${pings} pings: ${JSON.stringify(s)}`);
        },
      );
      await until(
        "the capture to end",
        () => service.outputStatus().supervisor?.lastExit === "ended",
        SECONDS * 1000 + 30_000,
      );
      await until(
        "every listener to get the last packet",
        () => clients.progress.every((s) => s === produced),
      );
    } finally {
      clearInterval(sampler);
      watching = false;
      await watcher;
      unsubscribe();
    }
    const hubEnd = await streams();
    const reports = await clients.report();
    const json = service.metrics.toJSON();

    // The service produced every frame once, in order, and the main thread kept up.
    assert.equal(handed.length, FRAMES);
    assert.deepEqual(handed, [...Array(FRAMES).keys()]);
    assert.equal(counter(json, "kvm_audio_frames_dropped_total", 'reason="ring_full"'), 0);
    assert.ok(samples > (SECONDS * 1000) / 20 / 4, `${samples} lag samples`);

    // Every healthy listener: every packet, in order, never further behind than the bound.
    assert.equal(clients.failure, null);
    assert.equal(reports.length, LISTENERS);
    for (const [i, r] of reports.entries()) {
      assert.deepEqual(
        r,
        { packets: FRAMES, first: 0, last: FRAMES - 1, breaks: 0, texts: 1, closeCode: null },
        `listener ${i}`,
      );
      assert.ok(
        worstLag[i]! <= MAX_QUEUE,
        `listener ${i} fell ${worstLag[i]} packets behind (bound ${MAX_QUEUE})`,
      );
    }
    assert.equal(hubEnd.length, LISTENERS, "only the stalled listener left");
    assert.ok(hubEnd.every((s) => s.dropped === 0 && s.queued === 0 && s.id !== stalledId));
    assert.ok(worstQueued <= MAX_QUEUE);

    // The stalled peer: everything the server sent it, up to the close frame.
    const frames = await stalled.readToClose(20_000);
    const close = frames.at(-1)!;
    assert.equal(close.opcode, WS_OPCODE.close);
    const closeCode = new DataView(close.payload.buffer).getUint16(0);
    assert.equal(closeCode, CloseCode.tooSlow);
    assert.equal(new TextDecoder().decode(close.payload.subarray(2)), "listener too slow");
    const got = frames.filter((f) => f.opcode === WS_OPCODE.binary).map((f) =>
      new DataView(f.payload.buffer).getUint32(4)
    );
    const pongs = frames.filter((f) =>
      f.opcode === WS_OPCODE.text &&
      new TextDecoder().decode(f.payload).startsWith('{"type":"pong"')
    );
    assert.equal(pongs.length, pings, "every pong reached it before the close");
    assert.deepEqual(got, [...Array(got.length).keys()], "what it got came in order, from 0");
    assert.ok(got.length < closeSeq + 1, "it fell behind");

    // Its drops and nobody else's: of the frames 0..closeSeq it was handed, it got `got`, its
    // queue held MAX_QUEUE when it was closed (a stalled socket never drains), the rest were
    // dropped oldest-first and counted.
    const slow = counter(json, "kvm_audio_frames_dropped_total", 'reason="listener_slow"');
    assert.ok(closeSeq > 0);
    assert.equal(slow, closeSeq + 1 - got.length - MAX_QUEUE);
    assert.ok(slow >= stalledDroppedSeen, `${slow} < ${stalledDroppedSeen} seen by the hub`);
    assert.equal(
      counter(json, "kvm_audio_output_packets_sent_total", 'transport="websocket"'),
      LISTENERS * FRAMES + got.length,
    );
    assert.equal(counter(json, "kvm_audio_connection_drops_total", 'transport="websocket"'), 1);

    const sorted = [...worstLag].sort((a, b) => a - b);
    console.log(
      `load: ${LISTENERS} listeners × ${FRAMES} packets; worst lag ${sorted.at(-1)} packets ` +
        `(median listener's worst ${sorted[LISTENERS >> 1]}), ${samples} samples; hub queue ` +
        `max ${worstQueued}; stalled peer (${pings} pings of 2 MB) got ${got.length}, dropped ${slow}, ` +
        `closed at ${closeSeq}`,
    );
  } finally {
    stalled.close();
  }
});

// ---------------------------------------------------------------------------------------------

Deno.test("talk stream survives 10⁵ random and mutated messages and accounts for every one", async () => {
  await using dir = await tempDir();
  const cfg = await writeAlsaConfig(dir.path, {
    kvm_load_playback: { type: "file", outfile: `${dir.path}/out.raw` },
  });
  using _cfg = useAlsaConfig(cfg);
  await using service = new AudioService({
    capture: null,
    playback: "kvm_load_playback",
    pace: "clock",
    metricsIntervalMs: 200,
  });
  service.start();
  await using server = serve(service);
  const t = transportMetrics(service.metrics);
  const receivedWs = t.received.labels({ transport: "websocket" });
  const badText = t.malformed.labels({ reason: "text" });

  const ws = new WebSocket(server.url("/api/microphone/stream"));
  ws.binaryType = "arraybuffer";
  let hellos = 0, pongs = 0, otherReplies = 0;
  ws.onmessage = (e: MessageEvent) => {
    const m = typeof e.data === "string" ? JSON.parse(e.data) : null;
    if (m?.type === "hello") hellos++;
    else if (m?.type === "pong") pongs++;
    else otherReplies++;
  };
  let closeCode: number | null = null;
  ws.onclose = (e) => {
    closeCode = e.code;
  };
  await new Promise<void>((resolve, reject) => {
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new Error("Cannot open the talk stream"));
  });
  await until("the hello", () => hellos === 1);

  // Valid packets to mutate: what the microphone preset asks for, encoding a tone.
  const opus = micPackets("high", tone({ freq: 440, frames: 48000, amplitude: 0.3 }));

  const { rnd, int, randomBytes } = fuzzRandom(4321);
  let seq = 0, ts = 0;
  const valid = () => {
    seq = (seq + 1) >>> 0;
    ts = (ts + 960) >>> 0;
    return encodeFrame({ flags: 0, channels: 1, seq, timestamp: ts }, opus[int(opus.length)]!);
  };
  const maxPacket = Math.min(OPUS_MAX_PACKET, INPUT_RING.slotBytes);

  // The test's own classification of what it sent, from the protocol (not from the service's
  // code): header-level faults and payload sizes are decided here; whether an in-range payload is
  // a usable Opus packet is left to the service (reasons "toc", "duration", or accepted).
  const tally = {
    binary: 0,
    header: 0,
    version: 0,
    channels: 0,
    size: 0,
    opus: 0,
    validControls: 0,
    pings: 0,
    badText: 0,
    /** Payload bytes of the messages whose header passed. */
    payloadBytes: 0,
  };
  const classify = (b: Uint8Array) => {
    tally.binary++;
    if (b.length < HEADER_BYTES) tally.header++;
    else if (b[0] !== 1) tally.version++;
    else if (b[2] !== 1 && b[2] !== 2) tally.channels++;
    else {
      const payload = b.length - HEADER_BYTES;
      tally.payloadBytes += payload;
      if (payload === 0 || payload > maxPacket) tally.size++;
      else tally.opus++;
    }
  };

  /** One fuzz message. */
  const next = (): Uint8Array | string => {
    const kind = int(16);
    switch (kind) {
      case 0:
      case 1: // control: a valid framed packet
        tally.validControls++;
        return valid();
      case 2: // random garbage of any length up to a large packet
        return randomBytes(int(1600));
      case 3: { // bit flips in the header
        const b = valid();
        for (let i = int(3) + 1; i > 0; i--) b[int(HEADER_BYTES)]! ^= 1 << int(8);
        return b;
      }
      case 4:
      case 5: { // bit flips in the payload
        const b = valid();
        for (let i = int(8) + 1; i > 0; i--) {
          b[HEADER_BYTES + int(b.length - HEADER_BYTES)]! ^= 1 << int(8);
        }
        return b;
      }
      case 6: // truncation, header included
        return valid().slice(0, int(40));
      case 7:
      case 8: { // random TOC byte (and frame-count byte) on a valid header
        const b = valid();
        b[HEADER_BYTES] = int(256);
        if (b.length > HEADER_BYTES + 1) b[HEADER_BYTES + 1] = int(256);
        return b;
      }
      case 9: { // a bad version
        const b = valid();
        b[0] = 2 + int(254);
        return b;
      }
      case 10: { // bad channels, flags and reserved byte at random
        const b = valid();
        b[1] = int(256);
        b[2] = rnd() < 0.2 ? 1 + int(2) : int(256);
        b[3] = int(256);
        return b;
      }
      case 11: { // zero-length or oversized payload (rarely huge)
        const b = valid();
        const r = int(8);
        if (r < 4) return b.slice(0, HEADER_BYTES);
        const len = r < 7 ? maxPacket + 1 + int(600) : 16_384 + int(49_152);
        const big = new Uint8Array(HEADER_BYTES + len);
        big.set(b.subarray(0, HEADER_BYTES));
        big.set(randomBytes(Math.min(len, 64)), HEADER_BYTES);
        return big;
      }
      case 12: { // random payload bytes behind a valid header
        const b = valid().slice(0, HEADER_BYTES);
        return concat(b, randomBytes(1 + int(400)));
      }
      case 13: { // text: a valid ping
        tally.pings++;
        return JSON.stringify({ type: "ping", id: int(1e9) });
      }
      case 14: { // text: JSON that is not a control message
        tally.badText++;
        const r = int(4);
        if (r === 0) return JSON.stringify({ type: "shout", id: int(9) });
        if (r === 1) return JSON.stringify({ type: "ping", id: { nested: true } });
        if (r === 2) return JSON.stringify([1, 2, 3]);
        return "null";
      }
      default: { // text: random characters (not JSON)
        tally.badText++;
        let s = "~";
        for (let i = int(200); i > 0; i--) s += String.fromCharCode(32 + int(0x2fff));
        return s;
      }
    }
  };

  const total = 100_000;
  const batch = 128;
  const window = 1024;
  let sentBinary = 0, sentText = 0;
  /** Sends `count` messages in batches, each taken by the server before the next. */
  const run = async (count: number) => {
    for (let i = 0; i < count; i += batch) {
      const n = Math.min(batch, count - i);
      for (let j = 0; j < n; j++) {
        const m = next();
        if (typeof m === "string") {
          sentText++;
          ws.send(m);
        } else {
          classify(m);
          sentBinary++;
          ws.send(m);
        }
      }
      // Pace: at most `window` messages in flight (binary ones are all counted as received;
      // text ones end as a pong or as malformed "text"), all taken at the end of a run.
      const inFlight = () => sentBinary + sentText - receivedWs.value - badText.value - pongs;
      const deadline = Date.now() + 10_000;
      while (inFlight() > (i + n < count ? window : 0)) {
        if (Date.now() > deadline) {
          throw new Error(`Timed out with ${inFlight()} messages in flight`);
        }
        await sleep(1);
      }
    }
  };
  const gc = garbageCollector();
  const memory = async () => {
    await sleep(300);
    gc?.();
    return Deno.memoryUsage().heapUsed;
  };
  await run(5000); // warm-up: JIT, rings, playout state
  const before = await memory();
  await run(total - 5000);
  const after = await memory();

  // Every packet the service accepted reaches the input worker's playout buffer (or is counted as
  // a ring drop): wait until its metrics snapshot says so.
  const reasons = ["header", "version", "channels", "size", "toc", "duration"] as const;
  const accepted = () => {
    const json = service.metrics.toJSON();
    const malformedBinary = reasons.reduce(
      (a, r) => a + counter(json, "kvm_audio_input_packets_malformed_total", `reason="${r}"`),
      0,
    );
    return {
      byService: counter(json, "kvm_audio_input_packets_received_total", 'transport="websocket"') -
        malformedBinary,
      byWorker: counter(json, "kvm_audio_input_packets_total") +
        counter(json, "kvm_audio_frames_dropped_total", 'reason="input_ring_full"'),
    };
  };
  await until("the input worker to take every accepted packet", () => {
    const a = accepted();
    return a.byService === a.byWorker;
  }, 10_000);
  const talker = (await (await server.app.request("/api/microphone")).json()).talker;
  const status = service.microphoneStatus();
  refreshSupervisorMetrics(service);
  const json = service.metrics.toJSON();
  const wsOpen = ws.readyState === WebSocket.OPEN;
  ws.close();
  await until("the client to close", () => closeCode !== null);

  const malformed = (reason: string) =>
    counter(json, "kvm_audio_input_packets_malformed_total", `reason="${reason}"`);
  assert.equal(sentBinary + sentText, total);
  assert.ok(wsOpen, "the server never closed the talker");
  assert.equal(otherReplies, 0);
  assert.equal(hellos, 1);
  // Every binary message is received once; header-level faults are told apart exactly.
  assert.equal(
    counter(json, "kvm_audio_input_packets_received_total", 'transport="websocket"'),
    tally.binary,
  );
  assert.equal(malformed("header"), tally.header);
  assert.equal(malformed("version"), tally.version);
  assert.equal(malformed("channels"), tally.channels);
  assert.equal(malformed("size"), tally.size);
  assert.equal(malformed("sequence") + malformed("timestamp") + malformed("type"), 0);
  // In-range payloads: refused by the Opus checks or accepted — nothing else.
  const { byService } = accepted();
  assert.equal(malformed("toc") + malformed("duration") + byService, tally.opus);
  assert.ok(malformed("toc") > 0 && malformed("duration") > 0, "the fuzz hit the Opus checks");
  assert.ok(byService >= tally.validControls, `${byService} ≥ ${tally.validControls} controls`);
  assert.equal(counter(json, "kvm_audio_input_bytes_received_total"), tally.payloadBytes);
  // Text: every ping answered, everything else counted as malformed "text".
  assert.equal(pongs, tally.pings);
  assert.equal(malformed("text"), tally.badText);
  assert.equal(sentText, tally.pings + tally.badText);
  // The talker's own tally agrees.
  assert.equal(talker.received, tally.binary);
  assert.equal(
    talker.malformed,
    tally.header + tally.version + tally.channels + tally.size + malformed("toc") +
      malformed("duration"),
  );
  assert.equal(talker.badText, tally.badText);
  // The service stayed up: the input worker ran throughout and never restarted.
  assert.equal(status.running, true, status.state);
  assert.equal(status.supervisor?.restarts ?? -1, 0);
  assert.equal(counter(json, "kvm_audio_pipeline_restarts_total"), 0);
  assert.ok(counter(json, "kvm_audio_input_frames_played_total") > 0);
  // Memory stays flat: the live heap after a forced collection.
  const heapMb = (after - before) / 2 ** 20;
  if (gc) {
    assert.ok(heapMb < 4, `live heap grew by ${heapMb.toFixed(2)} MB over ${total} messages`);
  }
  console.log(
    `fuzz: ${tally.binary} binary (${tally.header} header, ${tally.version} version, ` +
      `${tally.channels} channels, ${tally.size} size, ${malformed("toc")} toc, ` +
      `${malformed("duration")} duration, ${byService} accepted), ${sentText} text ` +
      `(${tally.pings} pings); live heap ${heapMb >= 0 ? "+" : ""}${heapMb.toFixed(2)} MB` +
      (gc ? "" : " (no forced GC)"),
  );
});
