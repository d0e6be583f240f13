/**
 * Helpers shared by the tests that talk to a real service over 127.0.0.1: a server for a Hono app,
 * a recording WebSocket client, a raw WebSocket handshake for a peer that never reads, UDP sinks
 * and senders, plus the polling, metrics, memory and fuzzing utilities those tests have in common.
 *
 * @module
 */

import assert from "node:assert/strict";
import dgram from "node:dgram";
import v8 from "node:v8";
import vm from "node:vm";
import { OpusEncoder } from "../ffi/opus.ts";
import type { Registry } from "../lib/metrics.ts";
import { encoderSettings, frameSamples, MICROPHONE_PRESETS } from "../lib/quality.ts";
import { prng } from "./audio_util.ts";

// ---------------------------------------------------------------------------------------------
// Waiting.

export { sleep, until } from "./wait.ts";

// ---------------------------------------------------------------------------------------------
// Metrics and memory.

/** A registry's JSON snapshot. */
export type MetricsSnapshot = ReturnType<Registry["toJSON"]>;

/** Sum of a counter's series whose label set contains `label` (all series when omitted). */
export function counter(json: MetricsSnapshot, name: string, label?: string): number {
  const v = json.counters[name];
  if (v === undefined) return 0;
  if (typeof v === "number") return label === undefined ? v : 0;
  return Object.entries(v)
    .filter(([k]) => label === undefined || k.includes(label))
    .reduce((a, [, n]) => a + n, 0);
}

/**
 * A full garbage collection (V8's `gc`, exposed by setting `--expose-gc` at run time through
 * `node:v8`), or null where the runtime does not allow it.
 */
export function garbageCollector(): (() => void) | null {
  try {
    v8.setFlagsFromString("--expose-gc");
    const gc: unknown = vm.runInNewContext("gc");
    return typeof gc === "function" ? gc as () => void : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Packets and fuzzing.

/** Real Opus packets of the microphone preset `name` encoding `pcm` (mono, 48 kHz). */
export function micPackets(name: "high" | "low", pcm: Int16Array): Uint8Array[] {
  const p = MICROPHONE_PRESETS[name];
  const frame = frameSamples(p);
  using enc = OpusEncoder.create({ channels: 1, application: p.application }, encoderSettings(p));
  const buf = new Uint8Array(1500);
  const out: Uint8Array[] = [];
  for (let i = 0; i + frame <= pcm.length; i += frame) {
    out.push(buf.slice(0, enc.encode(pcm.subarray(i, i + frame), frame, buf)));
  }
  return out;
}

/** A seeded random source for fuzzing: numbers in [0, 1), integers below `n`, random bytes. */
export function fuzzRandom(seed: number): {
  rnd: () => number;
  int: (n: number) => number;
  randomBytes: (n: number) => Uint8Array;
} {
  const rnd = prng(seed);
  const int = (n: number) => Math.floor(rnd() * n);
  const randomBytes = (n: number) => {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = int(256);
    return b;
  };
  return { rnd, int, randomBytes };
}

/** `a` followed by `b`, in a new array. */
export function concat(a: Uint8Array, b: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

// ---------------------------------------------------------------------------------------------
// HTTP and WebSocket.

/** A server on 127.0.0.1 (see {@link serveApp}); disposing it closes its streams and itself. */
export interface TestServer<A> extends AsyncDisposable {
  readonly app: A;
  readonly port: number;
  /** `ws://127.0.0.1:<port><path>` */
  url(path: string): string;
  /** `http://127.0.0.1:<port><path>` */
  http(path: string): string;
}

/**
 * Serves a Hono app on 127.0.0.1 at a free port. `app` is either the app itself, built on
 * `ac.signal`, or a function that builds it on the server's signal (so `createApp` closes its
 * streams when the server is disposed). Disposing aborts `ac` and waits for the server to finish.
 */
export function serveApp<A extends { fetch: Deno.ServeHandler }>(
  app: A | ((signal: AbortSignal) => A),
  ac: AbortController = new AbortController(),
): TestServer<A> {
  const built = typeof app === "function" ? app(ac.signal) : app;
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: ac.signal, onListen() {} },
    built.fetch,
  );
  const port = server.addr.port;
  return {
    app: built,
    port,
    url: (path) => `ws://127.0.0.1:${port}${path}`,
    http: (path) => `http://127.0.0.1:${port}${path}`,
    async [Symbol.asyncDispose]() {
      ac.abort();
      await server.finished;
    },
  };
}

/**
 * A WebSocket client that records everything it receives: text messages parsed as JSON (the
 * service sends no other text), binary ones as bytes, in order, and its close event.
 */
export class WsClient {
  readonly ws: WebSocket;
  /** Text messages, parsed. */
  readonly texts: unknown[] = [];
  /** Every message in order: parsed JSON or the binary bytes. */
  readonly messages: (Record<string, unknown> | Uint8Array)[] = [];
  /** Binary messages received. */
  binary = 0;
  /** Resolves when open; rejects if the socket fails before that. */
  readonly opened: Promise<void>;
  readonly closed: Promise<CloseEvent>;

  constructor(url: string) {
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.opened = new Promise((resolve, reject) => {
      this.ws.addEventListener("open", () => resolve(), { once: true });
      this.ws.addEventListener("error", () => reject(new Error(`Cannot open ${url}`)), {
        once: true,
      });
    });
    this.opened.catch(() => {});
    this.closed = new Promise((resolve) => {
      this.ws.addEventListener("close", (e) => resolve(e), { once: true });
    });
    this.ws.addEventListener("message", (e) => {
      if (typeof e.data === "string") {
        const v = JSON.parse(e.data);
        this.texts.push(v);
        this.messages.push(v);
      } else {
        this.binary++;
        this.messages.push(new Uint8Array(e.data as ArrayBuffer));
      }
    });
  }

  /** The binary messages, in order. */
  get packets(): Uint8Array[] {
    return this.messages.filter((m): m is Uint8Array => m instanceof Uint8Array);
  }

  /** Closes the socket unless it is closed already; resolves with the close event. */
  async close(): Promise<CloseEvent> {
    if (this.ws.readyState <= WebSocket.OPEN) this.ws.close();
    return await this.closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/**
 * Opens a TCP connection to 127.0.0.1:`port` and does the WebSocket upgrade for `path` by hand,
 * asserting a 101 answer; returns the connection and whatever arrived after the response head.
 * Nothing reads from it afterwards unless the caller does: a frozen browser tab or a peer behind
 * a dead link, as the server sees it.
 */
export async function rawWebSocket(
  port: number,
  path: string,
  upgrade = "websocket",
): Promise<{ conn: Deno.TcpConn; rest: Uint8Array }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(new TextEncoder().encode(
      `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: ${upgrade}\r\n` +
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
        "Sec-WebSocket-Version: 13\r\n\r\n",
    ));
    let got = new Uint8Array(0);
    const chunk = new Uint8Array(4096);
    for (;;) {
      const n = await conn.read(chunk);
      assert.ok(n !== null, "the server answered the upgrade");
      got = concat(got, chunk.subarray(0, n));
      const text = new TextDecoder().decode(got);
      const end = text.indexOf("\r\n\r\n");
      if (end < 0) continue;
      assert.match(text, /^HTTP\/1\.1 101 /);
      // The head is ASCII: its character count is its byte count.
      return { conn, rest: got.slice(end + 4) };
    }
  } catch (e) {
    conn.close();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// UDP.

/** A UDP socket bound on 127.0.0.1 that receives datagrams (see {@link udpSink}). */
export interface UdpSink {
  readonly port: number;
  /** Datagrams received. */
  readonly count: number;
  /** The datagrams received, in order (empty with `keep: false`). */
  readonly datagrams: Uint8Array[];
  close(): Promise<void>;
}

/**
 * A UDP socket on 127.0.0.1 (a free port) that counts every datagram it receives and, unless
 * `keep` is false (for floods), keeps a copy of each.
 */
export async function udpSink({ keep = true }: { keep?: boolean } = {}): Promise<UdpSink> {
  const socket = dgram.createSocket("udp4");
  const datagrams: Uint8Array[] = [];
  let count = 0;
  socket.on("message", (m: Uint8Array) => {
    count++;
    if (keep) datagrams.push(new Uint8Array(m));
  });
  await new Promise<void>((r) => socket.bind(0, "127.0.0.1", () => r()));
  const port = socket.address().port;
  return {
    port,
    get count() {
      return count;
    },
    datagrams,
    close: () => new Promise<void>((r) => socket.close(() => r())),
  };
}

/** A UDP socket bound on 127.0.0.1 for sending datagrams to ports on 127.0.0.1. */
export interface UdpSender {
  /** Sends `data` to 127.0.0.1:`port`; rejects if the send fails. */
  send(data: Uint8Array, port: number): Promise<void>;
  close(): Promise<void>;
}

/** A UDP socket on 127.0.0.1 (a free port) to send datagrams from. */
export async function udpSender(): Promise<UdpSender> {
  const socket = dgram.createSocket("udp4");
  await new Promise<void>((r) => socket.bind(0, "127.0.0.1", () => r()));
  return {
    send: (data, port) =>
      new Promise<void>((resolve, reject) =>
        socket.send(data, port, "127.0.0.1", (e) => (e ? reject(e) : resolve()))
      ),
    close: () => new Promise<void>((r) => socket.close(() => r())),
  };
}
