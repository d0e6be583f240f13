/**
 * Worker side of `ring_hop.ts`: one role per worker, chosen by the first message
 * ({@link HopRequest}). Consumers record each frame's one-way latency (arrival minus the sender's
 * timestamp, both `performance.timeOrigin + performance.now()`) by frame number and post them
 * back when the stream ends; producers send frames paced or flat out.
 *
 * @module
 */
/// <reference lib="deno.worker" />

import { epochMs, FrameRing } from "../../lib/frame_ring.ts";

/** What the worker is asked to do. */
export type HopRequest =
  | { readonly role: "ring-consumer"; readonly buffer: SharedArrayBuffer; readonly frames: number }
  | { readonly role: "post-consumer"; readonly frames: number }
  | {
    readonly role: "ring-producer" | "post-producer";
    readonly buffer?: SharedArrayBuffer;
    readonly frames: number;
    readonly frameBytes: number;
    readonly intervalMs: number;
  };

/** A frame sent by `postMessage`: its number, send time (epoch ms) and a copied payload. */
export interface HopMessage {
  readonly seq: number;
  readonly t0: number;
  readonly bytes: Uint8Array;
}

const sleeper = new Int32Array(new SharedArrayBuffer(4));

/** Sleeps without the event loop, like a capture thread blocked on the device. */
function sleep(ms: number): void {
  if (ms > 0) Atomics.wait(sleeper, 0, 0, ms);
}

function consumeRing(buffer: SharedArrayBuffer, frames: number): void {
  const ring = FrameRing.attach(buffer);
  const latency = new Float64Array(frames).fill(NaN);
  self.postMessage({ type: "ready" });
  for (;;) {
    const slot = ring.claim();
    if (slot !== null) {
      const now = epochMs();
      const seq = slot.seq;
      if (seq >= 0 && seq < frames) latency[seq] = now - slot.t[0]!;
      continue;
    }
    if (ring.waitForData(30_000) !== "ok") break;
  }
  self.postMessage({ type: "latency", latency }, [latency.buffer]);
}

function consumePosts(frames: number): void {
  const latency = new Float64Array(frames).fill(NaN);
  self.onmessage = (e: MessageEvent<HopMessage | { type: "end" }>) => {
    const now = epochMs();
    const m = e.data;
    if ("seq" in m) {
      if (m.seq >= 0 && m.seq < frames) latency[m.seq] = now - m.t0;
      return;
    }
    self.postMessage({ type: "latency", latency }, [latency.buffer]);
  };
  self.postMessage({ type: "ready" });
}

function produce(request: Extract<HopRequest, { role: "ring-producer" | "post-producer" }>): void {
  const payload = new Uint8Array(request.frameBytes).map((_, i) => i * 31);
  const ring = request.buffer === undefined ? null : FrameRing.attach(request.buffer);
  self.onmessage = () => {
    for (let seq = 0; seq < request.frames; seq++) {
      payload[0] = seq;
      if (ring !== null) {
        const slot = ring.reserve();
        slot.data.set(payload);
        slot.seq = seq;
        slot.t[0] = epochMs();
        ring.publish(slot, payload.length);
      } else {
        self.postMessage({ seq, t0: epochMs(), bytes: payload } satisfies HopMessage);
      }
      sleep(request.intervalMs);
    }
    if (ring !== null) ring.end();
    else self.postMessage({ type: "end" });
  };
  self.postMessage({ type: "ready" });
}

self.onmessage = (e: MessageEvent<HopRequest>) => {
  const request = e.data;
  switch (request.role) {
    case "ring-consumer":
      consumeRing(request.buffer, request.frames);
      break;
    case "post-consumer":
      consumePosts(request.frames);
      break;
    case "ring-producer":
    case "post-producer":
      produce(request);
      break;
  }
};
