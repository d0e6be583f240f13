/**
 * PlayoutBuffer: deterministic simulations (seeded PRNG, virtual clocks) of a sender, a network
 * with jitter, reordering, loss and duplicates, and a playback device whose clock differs from
 * the sender's; plus small hand-driven cases.
 */
import assert from "node:assert/strict";
import {
  PlayoutBuffer,
  type PlayoutDecision,
  type PlayoutOptions,
  type PlayoutStats,
} from "../lib/playout.ts";
import { prng } from "./audio_util.ts";

const FRAME_MS = 20;
const FRAME_SAMPLES = 960;

/** One packet as sent: `id` is the sender's frame index (strictly increasing, never wraps). */
interface Sent {
  id: number;
  seq: number;
  ts: number;
  sendMs: number;
}

/**
 * A sender producing one packet per frame on its own clock, `ppm` faster than the device
 * (positive = faster). At each `restarts[].at` frame the sequence number and timestamp jump.
 */
function sender(
  { frames, ppm, seq0 = 1000, ts0 = 5000, restarts = [] }: {
    frames: number;
    ppm: number;
    seq0?: number;
    ts0?: number;
    restarts?: { at: number; seqJump: number; tsJump: number }[];
  },
): Sent[] {
  const out: Sent[] = [];
  let seqOff = seq0, tsOff = ts0;
  for (let id = 0; id < frames; id++) {
    for (const r of restarts) {
      if (r.at === id) {
        seqOff += r.seqJump;
        tsOff += r.tsJump;
      }
    }
    out.push({
      id,
      seq: ((seqOff + id) % 65536 + 65536) % 65536,
      ts: ((tsOff + id * FRAME_SAMPLES) % 2 ** 32 + 2 ** 32) % 2 ** 32,
      sendMs: id * FRAME_MS / (1 + ppm * 1e-6),
    });
  }
  return out;
}

interface Arrival extends Sent {
  atMs: number;
}

/** The network: base delay 10 ms + `jitter()`, independent loss, duplicates, outages. */
function network(
  sent: Sent[],
  { seed, jitter, loss = 0, dup = 0, outages = [] }: {
    seed: number;
    jitter: (rand: () => number, id: number) => number;
    loss?: number;
    dup?: number;
    outages?: [number, number][];
  },
): Arrival[] {
  const rand = prng(seed);
  const out: Arrival[] = [];
  for (const p of sent) {
    const lost = rand() < loss;
    const twice = rand() < dup;
    if (lost || outages.some(([a, b]) => p.sendMs >= a && p.sendMs < b)) continue;
    out.push({ ...p, atMs: p.sendMs + 10 + jitter(rand, p.id) });
    if (twice) out.push({ ...p, atMs: p.sendMs + 10 + jitter(rand, p.id) });
  }
  // Stable sort by arrival: packets with equal times keep sending order.
  return out.sort((a, b) => a.atMs - b.atMs);
}

function payloadOf(p: Sent): Uint8Array {
  const b = new Uint8Array(6 + (p.id * 7) % 90);
  new DataView(b.buffer).setUint32(0, p.id);
  new DataView(b.buffer).setUint16(4, p.seq);
  for (let i = 6; i < b.length; i++) b[i] = (p.id + i) & 0xff;
  return b;
}

function idOf(data: Uint8Array): number {
  return new DataView(data.buffer, data.byteOffset, data.byteLength).getUint32(0);
}

function seqOf(data: Uint8Array): number {
  return new DataView(data.buffer, data.byteOffset, data.byteLength).getUint16(4);
}

/** What the device saw, and what went wrong on the way (empty when all is well). */
interface Run {
  buf: PlayoutBuffer;
  /** Sender ids whose packet was accepted, with the tick at which it was. */
  acceptedAt: Map<number, number>;
  /** Sender ids played, rebuilt by FEC and concealed by PLC for loss, in order. */
  played: number[];
  fecIds: number[];
  plcIds: number[];
  problems: string[];
  /** stats snapshots every `sampleEvery` ticks: [tick, targetDepth, smoothedDepth, depth]. */
  samples: [number, number, number, number][];
  ticks: number;
}

/**
 * Drives `buf` with `arrivals` and calls `next()` once per device frame (the device clock is the
 * receiver's clock) until every packet has arrived and `tail` more frames have passed. Checks every
 * decision as it comes: payloads are intact, play/FEC/PLC positions strictly increase, FEC data is
 * the packet after the lost one, and PLC for loss is only chosen when that packet was not there.
 */
function drive(
  buf: PlayoutBuffer,
  arrivals: Arrival[],
  { tail = 0, sampleEvery = 50 }: { tail?: number; sampleEvery?: number } = {},
): Run {
  const run: Run = {
    buf,
    acceptedAt: new Map(),
    played: [],
    fecIds: [],
    plcIds: [],
    problems: [],
    samples: [],
    ticks: 0,
  };
  const bySeqAccepted = new Map<number, number>(); // seq → id of the newest accepted packet
  let pos = -1; // sender id of the last frame decided
  let lastSeq = -1;
  let waits = 0; // drift or late concealment frames since the last frame decided
  const lastArrival = arrivals.length > 0 ? arrivals[arrivals.length - 1]!.atMs : 0;
  let p = 0;
  for (let k = 0;; k++) {
    const now = k * FRAME_MS;
    for (; p < arrivals.length && arrivals[p]!.atMs <= now; p++) {
      const a = arrivals[p]!;
      const r = buf.push(a.seq, a.ts, a.atMs, payloadOf(a));
      if (r === "accepted") {
        if (run.acceptedAt.has(a.id)) run.problems.push(`id ${a.id} accepted twice`);
        run.acceptedAt.set(a.id, k);
        bySeqAccepted.set(a.seq, a.id);
      }
    }
    const d: PlayoutDecision = buf.next(now);
    const decided = d.kind === "play" || d.kind === "fec" ||
      (d.kind === "plc" && d.reason === "loss");
    if (decided && lastSeq >= 0) {
      // Sequence numbers passed over after waits (frames concealed with nothing buffered) were
      // lost: the waits concealed them, at most one each.
      const gap = ((d.seq - lastSeq) & 0xffff) - 1;
      if (gap > 0 && gap <= waits) {
        for (let i = 1; i <= gap; i++) run.plcIds.push(pos + i);
        pos += gap;
        lastSeq = (lastSeq + gap) & 0xffff;
      }
    }
    if (d.kind === "plc" && d.reason !== "loss") waits++;
    else if (d.kind !== "idle") waits = 0;
    if (d.kind === "play") {
      const id = idOf(d.data);
      if (seqOf(d.data) !== d.seq) run.problems.push(`tick ${k}: play seq ${d.seq} has other data`);
      const want = payloadOf({ id, seq: d.seq, ts: 0, sendMs: 0 });
      if (d.data.length !== want.length || d.data.some((v, i) => v !== want[i])) {
        run.problems.push(`tick ${k}: payload of id ${id} corrupted`);
      }
      if (id <= pos) run.problems.push(`tick ${k}: played id ${id} after ${pos}`);
      pos = id;
      lastSeq = d.seq;
      run.played.push(id);
    } else if (d.kind === "fec") {
      const nextId = idOf(d.data);
      if (seqOf(d.data) !== ((d.seq + 1) & 0xffff)) {
        run.problems.push(`tick ${k}: FEC for ${d.seq} carries seq ${seqOf(d.data)}`);
      }
      if (nextId - 1 <= pos) run.problems.push(`tick ${k}: FEC id ${nextId - 1} after ${pos}`);
      if (run.acceptedAt.has(nextId - 1)) {
        run.problems.push(`tick ${k}: FEC for id ${nextId - 1} that was accepted`);
      }
      pos = nextId - 1;
      lastSeq = d.seq;
      run.fecIds.push(pos);
    } else if (d.kind === "plc" && d.reason === "loss") {
      const step = (d.seq - lastSeq) & 0xffff;
      if (lastSeq >= 0 && (step < 1 || step >= buf.capacity)) {
        run.problems.push(`tick ${k}: PLC seq ${d.seq} after seq ${lastSeq}`);
      }
      const id = pos + step;
      // The next packet must not have been waiting: FEC would have been the better choice.
      const nextSeq = (d.seq + 1) & 0xffff;
      const waiting = bySeqAccepted.get(nextSeq);
      if (waiting !== undefined && waiting === id + 1) {
        run.problems.push(`tick ${k}: PLC for id ${id} while id ${id + 1} was buffered`);
      }
      if (run.acceptedAt.has(id)) run.problems.push(`tick ${k}: PLC for accepted id ${id}`);
      pos = id;
      lastSeq = d.seq;
      run.plcIds.push(id);
    }
    if (k % sampleEvery === 0) {
      const s = buf.stats;
      run.samples.push([k, s.targetDepth, s.smoothedDepth, s.depth]);
    }
    if (buf.stats.depth > buf.maxDepth && buf.stats.state === "playing") {
      run.problems.push(`tick ${k}: depth ${buf.stats.depth} above maxDepth`);
    }
    run.ticks = k + 1;
    if (now >= lastArrival + tail * FRAME_MS) break;
  }
  return run;
}

function assertPacketAccounting(s: PlayoutStats): void {
  assert.equal(s.received, s.accepted + s.duplicate + s.late + s.tooEarly + s.malformed);
  assert.equal(
    s.accepted,
    s.played + s.driftDrops + s.overflowDrops + s.flushed + s.buffered,
  );
}

/**
 * For one stream without resync: every sender id from the first played to the last decided is
 * played, rebuilt by FEC, concealed, dropped or skipped — and each never-accepted one is
 * concealed (FEC or PLC) or skipped.
 */
function assertSequenceAccounting(run: Run): void {
  const s = run.buf.stats;
  const first = run.played[0]!;
  const last = Math.max(run.played.at(-1)!, run.fecIds.at(-1) ?? -1, run.plcIds.at(-1) ?? -1);
  assert.equal(
    last - first + 1,
    s.played + s.fec + s.plc + s.driftDrops + s.overflowDrops + s.skipped,
    "every sequence number passed is accounted once",
  );
  const concealed = new Set([...run.fecIds, ...run.plcIds]);
  let neverAccepted = 0;
  for (let id = first; id <= last; id++) {
    if (!run.acceptedAt.has(id)) {
      neverAccepted++;
      if (s.skipped === 0) {
        assert.ok(concealed.has(id), `id ${id} was neither accepted nor concealed`);
      }
    }
  }
  assert.equal(neverAccepted, s.fec + s.plc + s.skipped);
}

const uniformJitter = (halfWidthMs: number) => (rand: () => number) =>
  halfWidthMs + (rand() * 2 - 1) * halfWidthMs;

function newBuffer(options: Partial<PlayoutOptions> = {}): PlayoutBuffer {
  return new PlayoutBuffer({ frameSamples: FRAME_SAMPLES, ...options });
}

const TEN_MINUTES_FRAMES = 10 * 60 * 1000 / FRAME_MS;
/** Frames gained or lost over ten minutes at 300 ppm: 300e-6 · 600 s / 20 ms = 9. */
const DRIFT_FRAMES = 300e-6 * 600_000 / FRAME_MS;

for (const ppm of [300, -300]) {
  Deno.test(
    `PlayoutBuffer follows a sender ${
      ppm > 0 ? "+" : ""
    }${ppm} ppm through jitter, reordering, loss and duplicates`,
    () => {
      const buf = newBuffer();
      const sent = sender({ frames: TEN_MINUTES_FRAMES, ppm });
      const arrivals = network(sent, {
        seed: ppm > 0 ? 11 : 12,
        jitter: uniformJitter(15),
        loss: 0.05,
        dup: 0.02,
      });
      // ±15 ms on 20 ms frames reorders packets: check the simulation really does.
      let reordered = 0;
      for (let i = 1; i < arrivals.length; i++) {
        if (arrivals[i]!.id < arrivals[i - 1]!.id) reordered++;
      }
      assert.ok(reordered > 500, `only ${reordered} reordered arrivals`);

      const run = drive(buf, arrivals);
      const s = buf.stats;
      assert.deepEqual(run.problems, []);
      assertPacketAccounting(s);
      assertSequenceAccounting(run);

      assert.ok(s.duplicate > 0.015 * sent.length, `duplicates ${s.duplicate}`);
      assert.ok(s.fec > 0.03 * sent.length, `FEC chosen ${s.fec} times`);
      assert.ok(s.fec > 5 * s.plc, `FEC ${s.fec} should dominate PLC ${s.plc} at 5 % random loss`);
      assert.equal(s.underruns, 0);
      assert.equal(s.resyncs, 0);
      assert.equal(s.tooEarly, 0);
      assert.equal(s.overflowDrops, 0);
      assert.ok(s.late < 0.005 * sent.length, `late ${s.late}`);

      // Drift: net frames removed ≈ the sender's surplus, spread over the run.
      const net = s.driftDrops - s.driftInserts;
      const expected = Math.sign(ppm) * DRIFT_FRAMES;
      assert.ok(Math.abs(net - expected) <= 3, `net drift ${net}, expected ≈ ${expected}`);
      const [wrong, right] = ppm > 0
        ? [s.driftInserts, s.driftDrops]
        : [s.driftDrops, s.driftInserts];
      assert.ok(wrong <= 2, `${wrong} drift actions against the drift (start-up only)`);
      assert.ok(right >= DRIFT_FRAMES - 3, `${right} drift actions`);

      // After start-up (10 s): target and depth stay in bounds and near each other.
      for (const [k, target, smoothed] of run.samples) {
        if (k < 500) continue;
        assert.ok(target >= buf.minDepth && target <= buf.maxDepth, `tick ${k}: target ${target}`);
        assert.equal(target, 3, `tick ${k}: ±15 ms jitter on 20 ms frames needs 3 frames`);
        assert.ok(
          smoothed >= target - 0.5 && smoothed <= target + 1.25,
          `tick ${k}: smoothed depth ${smoothed} vs target ${target}`,
        );
      }
    },
  );

  Deno.test(
    `PlayoutBuffer never runs dry from ${ppm > 0 ? "+" : ""}${ppm} ppm drift alone`,
    () => {
      const buf = newBuffer();
      const arrivals = network(sender({ frames: TEN_MINUTES_FRAMES, ppm }), {
        seed: 21,
        jitter: () => 0,
      });
      const run = drive(buf, arrivals);
      const s = buf.stats;
      assert.deepEqual(run.problems, []);
      assertPacketAccounting(s);
      assertSequenceAccounting(run);
      assert.equal(s.plc, 0, "no frame concealed for loss");
      assert.equal(s.fec, 0);
      assert.equal(s.late, 0);
      assert.equal(s.underruns, 0);
      assert.equal(s.targetDepth, buf.minDepth, "a calm network needs only minDepth");
      const [wrong, right] = ppm > 0
        ? [s.driftInserts, s.driftDrops]
        : [s.driftDrops, s.driftInserts];
      assert.equal(wrong, 0);
      assert.ok(Math.abs(right - DRIFT_FRAMES) <= 2, `${right} drift actions, expected ≈ 9`);
      assert.equal(s.played, TEN_MINUTES_FRAMES - s.driftDrops - s.buffered);
    },
  );
}

Deno.test("PlayoutBuffer keeps its invariants under heavy-tailed (Pareto) jitter", () => {
  const buf = newBuffer();
  const arrivals = network(sender({ frames: 3000, ppm: 300 }), {
    seed: 31,
    // Pareto, shape 1.5: mostly a few ms, now and then hundreds.
    jitter: (rand) => Math.min(400, 4 * ((1 / (1 - rand())) ** (1 / 1.5) - 1)),
    loss: 0.05,
    dup: 0.02,
  });
  const run = drive(buf, arrivals);
  const s = buf.stats;
  assert.deepEqual(run.problems, []);
  assertPacketAccounting(s);
  assertSequenceAccounting(run);
  assert.equal(s.underruns, 0);
  assert.ok(s.late > 0, "a heavy tail must produce some late packets");
  assert.ok(s.late < 0.03 * 3000, `late ${s.late}`);
  for (const [k, target] of run.samples) {
    assert.ok(target >= buf.minDepth && target <= buf.maxDepth, `tick ${k}: target ${target}`);
  }
});

Deno.test("PlayoutBuffer target depth rises fast with jitter and decays slowly after", () => {
  const buf = newBuffer();
  // 30 s calm (≤1 ms), 30 s jittery (0–80 ms), 90 s calm again.
  const jitteryFrom = 1500, jitteryTo = 3000;
  const arrivals = network(sender({ frames: 7500, ppm: 0 }), {
    seed: 41,
    jitter: (rand, id) => id >= jitteryFrom && id < jitteryTo ? rand() * 80 : rand(),
  });
  const run = drive(buf, arrivals, { sampleEvery: 1 });
  assert.deepEqual(run.problems, []);
  assertPacketAccounting(buf.stats);
  const target = (tick: number) => run.samples[tick]![1];

  assert.equal(target(jitteryFrom - 1), buf.minDepth, "calm: target at minDepth");
  // The short window reacts within a dozen packets, before the long one's percentile moves.
  assert.ok(target(jitteryFrom + 12) >= 3, `target ${target(jitteryFrom + 12)} after 12 frames`);
  assert.equal(buf.stats.underruns, 0, "the onset of jitter did not run the buffer dry");
  // Rises within 2 s of the jitter's onset, to ≥ ceil(≈76 ms / 20 ms) + 1 = 5.
  assert.ok(target(jitteryFrom + 100) >= 4, `target ${target(jitteryFrom + 100)} after 2 s`);
  assert.ok(target(jitteryTo - 1) >= 5, `target ${target(jitteryTo - 1)} in the jitter`);
  // Decays slowly: still up 5 s after the network calms, back to minDepth within 60 s,
  // one frame at a time.
  assert.ok(target(jitteryTo + 250) >= 4, `target ${target(jitteryTo + 250)} 5 s after`);
  assert.equal(target(jitteryTo + 3000), buf.minDepth);
  for (let k = jitteryTo + 1; k < jitteryTo + 3000; k++) {
    const step = target(k) - target(k - 1);
    assert.ok(step === 0 || step === -1, `tick ${k}: target stepped ${step} while calm`);
  }
  // The buffer followed the target: frames were inserted going up and dropped coming down.
  // (At the onset, with nothing buffered, some of them are late waits.)
  const inserted = buf.stats.driftInserts + buf.stats.lateWaits;
  assert.ok(inserted >= 3, `inserts ${buf.stats.driftInserts} + late waits ${buf.stats.lateWaits}`);
  assert.ok(buf.stats.driftDrops >= 3, `drops ${buf.stats.driftDrops}`);
  // And there was no flapping in the calm first half: at most the start-up adjustments.
  const changes = run.samples.slice(250, jitteryFrom).filter((v, i, a) =>
    i > 0 && v[1] !== a[i - 1]![1]
  );
  assert.ok(changes.length <= 1, `target changed ${changes.length} times while calm`);
});

Deno.test("PlayoutBuffer plays across sequence wrap-around and timestamp wrap-around", () => {
  const buf = newBuffer();
  const sent = sender({ frames: 3000, ppm: 0, seq0: 65536 - 700, ts0: 2 ** 32 - 1000 * 960 });
  const arrivals = network(sent, { seed: 51, jitter: uniformJitter(15), loss: 0.05 });
  const run = drive(buf, arrivals, { sampleEvery: 1 });
  const s = buf.stats;
  assert.deepEqual(run.problems, []);
  assertPacketAccounting(s);
  assertSequenceAccounting(run);
  assert.ok(run.played.includes(700 - 1) || run.fecIds.includes(699) || run.plcIds.includes(699));
  assert.ok(run.played.some((id) => id > 700), "played past seq 65535 → 0");
  assert.equal(s.resyncs, 0);
  assert.equal(s.tooEarly, 0);
  assert.equal(s.late, 0);
  assert.equal(s.underruns, 0);
  // The timestamp wrap (at frame 1000) did not look like a jitter spike.
  for (const [k, target] of run.samples) {
    if (k > 250) assert.equal(target, 3, `tick ${k}: target ${target}`);
  }
  assert.ok(s.jitterMs < 31, `jitter ${s.jitterMs} ms`);
  assert.equal(s.timestampJumps, 0);
});

Deno.test("PlayoutBuffer ignores a timestamp jump without a sequence jump", () => {
  const buf = newBuffer();
  const sent = sender({ frames: 1500, ppm: 0, restarts: [{ at: 600, seqJump: 0, tsJump: 1e8 }] });
  const arrivals = network(sent, { seed: 55, jitter: uniformJitter(5), loss: 0.05 });
  const run = drive(buf, arrivals, { sampleEvery: 1 });
  const s = buf.stats;
  assert.deepEqual(run.problems, []);
  assertPacketAccounting(s);
  assertSequenceAccounting(run);
  assert.equal(s.timestampJumps, 1);
  assert.equal(s.resyncs, 0);
  for (const [k, target] of run.samples) {
    if (k > 100) assert.ok(target <= 2, `tick ${k}: target ${target}`);
  }
});

for (
  const [name, seqJump, tsJump] of [
    ["jumps far ahead", 20000, 123456789],
    ["jumps back a long way", -30000, -98765],
    ["jumps back 50", -50, 555555],
  ] as const
) {
  Deno.test(`PlayoutBuffer resyncs when a restarted sender ${name}`, () => {
    const buf = newBuffer();
    // The restart happens at frame 600; seqJump is relative to the sender's running offset.
    const sent = sender({ frames: 1500, ppm: 0, restarts: [{ at: 600, seqJump, tsJump }] });
    const arrivals = network(sent, { seed: 61, jitter: uniformJitter(5) });
    const run = drive(buf, arrivals);
    const s = buf.stats;
    assert.deepEqual(run.problems, []);
    assertPacketAccounting(s);
    assert.equal(s.resyncs, 1);
    const rejected = s.tooEarly + s.late + s.duplicate;
    assert.ok(rejected <= 60, `${rejected} packets rejected`);
    // The new stream plays within 20 frames of the restart, then without a gap.
    const resumed = run.played.findIndex((id) => id >= 600);
    assert.ok(resumed >= 0);
    assert.ok(run.played[resumed]! < 620, `resumed at id ${run.played[resumed]}`);
    const after = run.played.slice(resumed);
    assert.equal(after.at(-1)! - after[0]! + 1, after.length, "no gap after the resync");
    assert.ok(s.jitterMs < 11, `jitter ${s.jitterMs} ms: the timestamp jump must not count`);
    assert.ok(s.targetDepth <= 2, `target ${s.targetDepth}`);
  });
}

Deno.test("PlayoutBuffer re-buffers after a long outage and counts the gap", () => {
  const buf = newBuffer();
  // The network drops everything sent between 10 s and 13 s: 150 frames.
  const sent = sender({ frames: 1000, ppm: 0 });
  const arrivals = network(sent, { seed: 71, jitter: uniformJitter(5), outages: [[10000, 13000]] });
  const run = drive(buf, arrivals);
  const s = buf.stats;
  assert.deepEqual(run.problems, []);
  assertPacketAccounting(s);
  assertSequenceAccounting(run);
  assert.equal(s.underruns, 1);
  assert.equal(s.resyncs, 0);
  // Nothing buffered: five frames concealed waiting for the next packet, then silence; none of
  // the missing sequence numbers was consumed before the restart passed over them all.
  assert.equal(s.lateWaits, 5, "five frames concealed, then silence");
  assert.equal(s.plc, 0);
  assert.equal(s.skipped, 150);
  assert.equal(s.tooEarly, 0);
  assert.ok(run.played.includes(650), "the first packet after the outage is played");
  assert.ok(run.played.at(-1)! >= 995, `last played ${run.played.at(-1)}`);
});

// ---- Hand-driven cases -------------------------------------------------------------------

/** Pushes seq (timestamp seq·960, on time for 20 ms frames) with a 3-byte payload tagged seq. */
function pushAt(buf: PlayoutBuffer, seq: number, atMs = seq * FRAME_MS) {
  return buf.push(seq & 0xffff, (seq * FRAME_SAMPLES) % 2 ** 32, atMs, tag(seq));
}

function tag(seq: number): Uint8Array {
  return new Uint8Array([seq >> 8 & 0xff, seq & 0xff, 0x5a]);
}

function describe(d: PlayoutDecision): string {
  switch (d.kind) {
    case "play":
      return `play ${d.seq}:${d.data[1]}`;
    case "fec":
      return `fec ${d.seq}:${d.data[1]}`;
    case "plc":
      return `plc ${d.seq} ${d.reason}`;
    case "idle":
      return "idle";
  }
}

Deno.test("PlayoutBuffer prebuffers to the target, then chooses FEC when the next packet is there and PLC when not", () => {
  const buf = newBuffer({ initialDepth: 2, driftHoldMs: 1e6 });
  assert.equal(describe(buf.next(0)), "idle", "nothing yet");
  assert.equal(pushAt(buf, 10), "accepted");
  assert.equal(describe(buf.next(201)), "idle", "depth 1 < target 2");
  assert.equal(pushAt(buf, 11), "accepted");
  assert.equal(pushAt(buf, 13), "accepted"); // 12 lost
  assert.equal(pushAt(buf, 16), "accepted"); // 14, 15 lost
  const seen = [];
  for (let i = 0; i < 7; i++) seen.push(describe(buf.next(320 + i * 20)));
  assert.deepEqual(seen, [
    "play 10:10",
    "play 11:11",
    "fec 12:13",
    "play 13:13",
    "plc 14 loss",
    "fec 15:16",
    "play 16:16",
  ]);
  const s = buf.stats;
  assert.equal(s.played, 4);
  assert.equal(s.fec, 2);
  assert.equal(s.plc, 1);
  assert.equal(s.depth, 0);
  assertPacketAccounting(s);
});

/**
 * A talk session as the page sends it: packets numbered from `firstSeq`, timestamps from 0, one
 * per frame on time from `fromMs`, with `next()` called once per frame; the first packet marked
 * as a new stream when `mark`. Returns what was decided, by frame.
 */
function talkSession(
  buf: PlayoutBuffer,
  o: { firstSeq: number; frames: number; fromMs: number; mark: boolean; tagBase: number },
): string[] {
  const seen: string[] = [];
  for (let i = 0; i < o.frames; i++) {
    const at = o.fromMs + i * FRAME_MS;
    const payload = new Uint8Array([0, (o.tagBase + i) & 0xff, 0x5a]);
    buf.push((o.firstSeq + i) & 0xffff, i * FRAME_SAMPLES, at, payload, o.mark && i === 0);
    seen.push(describe(buf.next(at + 1)));
  }
  return seen;
}

Deno.test("PlayoutBuffer: a new stream marked as such plays from its first packet, whatever its numbers", () => {
  const buf = newBuffer({ initialDepth: 2, driftHoldMs: 1e6 });
  // A page talks for a second (seq 0–49), stops, and talks again after half a second, counting
  // from 0 again: the second session's numbers are ones the buffer has just played.
  talkSession(buf, { firstSeq: 0, frames: 50, fromMs: 0, mark: true, tagBase: 0 });
  for (let i = 0; i < 25; i++) buf.next(1000 + i * FRAME_MS + 1);
  const before = buf.stats.played;
  const seen = talkSession(buf, {
    firstSeq: 0,
    frames: 50,
    fromMs: 1500,
    mark: true,
    tagBase: 100,
  });
  const s = buf.stats;
  assert.equal(s.duplicate, 0, "no packet of the new session taken for an old one");
  assert.equal(s.late, 0);
  assert.equal(s.resyncs, 1);
  // One frame waiting for the start-up depth, then every packet of the session in order.
  assert.equal(seen[0], "idle");
  assert.deepEqual(seen.slice(1), Array.from({ length: 49 }, (_, k) => `play ${k}:${100 + k}`));
  assert.equal(s.played - before, 49);
  assert.equal(s.buffered, 1, "the last one is still buffered");
  assertPacketAccounting(s);
});

Deno.test("PlayoutBuffer: a new stream replaces what the old one still had buffered", () => {
  const buf = newBuffer({ initialDepth: 2, driftHoldMs: 1e6 });
  // An old sender's five packets arrive in a burst; a new sender (numbered far away) takes over
  // before they have played.
  for (let k = 0; k < 5; k++) pushAt(buf, 1000 + k, 0);
  assert.equal(describe(buf.next(1)), "play 1000:232");
  assert.equal(buf.push(7, 0, 25, tag(7), true), "accepted");
  const s = buf.stats;
  assert.equal(s.flushed, 4, "the old sender's four unplayed packets");
  assert.equal(s.resyncs, 1);
  assert.equal(describe(buf.next(21)), "idle", "buffering the new stream to its target depth");
  assert.equal(pushAt(buf, 8, 45), "accepted");
  assert.equal(describe(buf.next(41)), "play 7:7");
  assert.equal(describe(buf.next(61)), "play 8:8");
  assertPacketAccounting(s);
});

Deno.test("PlayoutBuffer classifies duplicate, late, too-early and malformed packets", () => {
  const buf = newBuffer({ capacity: 16, maxPacketBytes: 100, driftHoldMs: 1e6 });
  assert.equal(pushAt(buf, 100), "accepted");
  assert.equal(pushAt(buf, 100), "duplicate", "already buffered");
  assert.equal(pushAt(buf, 101), "accepted");
  assert.equal(pushAt(buf, 103), "accepted");
  assert.equal(describe(buf.next(0)), "play 100:100");
  assert.equal(pushAt(buf, 100), "duplicate", "already played");
  assert.equal(describe(buf.next(20)), "play 101:101");
  assert.equal(describe(buf.next(40)), "fec 102:103");
  assert.equal(pushAt(buf, 102), "late", "concealed already");
  assert.equal(pushAt(buf, 103 + 15), "accepted", "inside the 16-slot window from 103");
  assert.equal(pushAt(buf, 103 + 16 + 9), "too-early", "beyond the window, not following on");
  assert.equal(buf.push(104, 0, 0, new Uint8Array(0)), "malformed");
  assert.equal(buf.push(104, 0, 0, new Uint8Array(101)), "malformed");
  assert.equal(buf.push(104, 0, 0, new Uint8Array(100)), "accepted", "exactly maxPacketBytes");
  const s = buf.stats;
  assert.equal(s.duplicate, 2);
  assert.equal(s.late, 1);
  assert.equal(s.tooEarly, 1);
  assert.equal(s.malformed, 2);
  assert.equal(s.accepted, 5);
  assertPacketAccounting(s);
});

Deno.test("PlayoutBuffer conceals a loss burst five frames, then goes idle and re-prebuffers", () => {
  const buf = newBuffer({ initialDepth: 2, driftHoldMs: 1e6 });
  // Arrived well ahead of their playout: the depth is above target, so no frame is stretched.
  pushAt(buf, 0, -40);
  pushAt(buf, 1, -20);
  const seen = [];
  for (let i = 0; i < 9; i++) seen.push(describe(buf.next(20 + i * 20)));
  // Nothing buffered: each frame is concealed waiting for seq 2, which is not consumed (it may
  // only be late), up to five; then silence.
  assert.deepEqual(seen, [
    "play 0:0",
    "play 1:1",
    "plc 2 late",
    "plc 2 late",
    "plc 2 late",
    "plc 2 late",
    "plc 2 late",
    "idle",
    "idle",
  ]);
  assert.equal(buf.stats.underruns, 1);
  assert.equal(buf.stats.lateWaits, 5);
  assert.equal(buf.stats.plc, 0);
  assert.equal(buf.stats.state, "buffering");
  assert.equal(pushAt(buf, 9), "accepted");
  assert.equal(describe(buf.next(200)), "idle", "one frame is below the target");
  assert.equal(pushAt(buf, 8), "accepted", "reordered before the restart point");
  assert.equal(describe(buf.next(220)), "play 8:8");
  assert.equal(describe(buf.next(240)), "play 9:9");
  assert.equal(buf.stats.skipped, 8 - 2, "seqs 2–7 were jumped over at the restart");
});

Deno.test("PlayoutBuffer drops the oldest frames at once when a stall leaves it above maxDepth", () => {
  const buf = newBuffer({ initialDepth: 2, maxDepth: 8, driftHoldMs: 1e6 });
  pushAt(buf, 0);
  pushAt(buf, 1);
  assert.equal(describe(buf.next(20)), "play 0:0");
  // The device loop stalls for 360 ms while packets keep arriving; seq 5 is lost.
  for (let seq = 2; seq <= 19; seq++) if (seq !== 5) pushAt(buf, seq);
  assert.equal(buf.stats.depth, 19);
  // Depth 19 > maxDepth + 1: 1–4 and 6–10 are dropped, the hole at 5 is skipped.
  assert.equal(describe(buf.next(380)), "play 11:11");
  const s = buf.stats;
  assert.equal(s.overflowDrops, 9);
  assert.equal(s.skipped, 1);
  assert.equal(s.depth, 8);
  assertPacketAccounting(s);
});

Deno.test("PlayoutBuffer caps its depth in time for short frames: 2.5 ms frames sent in 20 ms bursts all play", () => {
  // ffmpeg sends 2.5 ms packets eight at a time every 20 ms (it encodes what one read gave it).
  // A cap of 8 frames (20 ms) dropped most of every burst's tail: 50 overflow drops in 4 s.
  const buf = new PlayoutBuffer({ frameSamples: 120 });
  assert.equal(buf.maxDepth, 30, "80 ms, within the reorder window (capacity 32 − 2)");
  let next = 0;
  for (let burst = 0; burst < 200; burst++) {
    const at = burst * 20 + 1;
    for (let k = 0; k < 8; k++) {
      const seq = burst * 8 + k;
      assert.equal(buf.push(seq, seq * 120, at, tag(seq)), "accepted");
    }
    // The device takes one frame every 2.5 ms.
    for (; next * 2.5 < (burst + 1) * 20; next++) buf.next(next * 2.5 + 5);
  }
  const s = buf.stats;
  assert.equal(s.overflowDrops, 0);
  assert.equal(s.played, 1600 - s.buffered);
  assertPacketAccounting(s);
  // The cap follows the frame size: 16 frames of 5 ms, 8 of 10, 20 or 60 ms (the frames' cap).
  for (const [samples, cap] of [[240, 16], [480, 8], [960, 8], [2880, 8]]) {
    buf.setFrameSamples(samples!);
    assert.equal(buf.maxDepth, cap, `${samples} samples`);
  }
  assert.equal(new PlayoutBuffer({ frameSamples: 120, maxDepthMs: 0 }).maxDepth, 8);
});

Deno.test("PlayoutBuffer: a target raised with short frames keeps its time, within the cap, when frames get longer", () => {
  const buf = new PlayoutBuffer({ frameSamples: 120 });
  const payload = new Uint8Array([1, 2, 3]);
  // 4 s of 2.5 ms frames in bursts of 24 every 60 ms (a jittery link), played every 2.5 ms.
  let seq = 0, ts = 0, now = 0;
  for (let burst = 0; burst < 66; burst++) {
    const at = burst * 60 + 1;
    for (; now < at; now += 2.5) buf.next(now);
    for (let k = 0; k < 24; k++, seq++, ts += 120) buf.push(seq, ts, at, payload);
  }
  const high = buf.stats.targetDepth;
  assert.ok(high > 8, `target ${high} frames of 2.5 ms`);
  // The sender goes on with 20 ms frames on a perfect network.
  buf.setFrameSamples(960);
  assert.equal(buf.stats.targetDepth, Math.min(8, Math.ceil((high * 2.5) / 20)));
  const before = buf.stats;
  for (let i = 0; i < 500; i++, seq++, ts += 960) {
    buf.push(seq, ts, now + i * 20, payload);
    buf.next(now + i * 20 + 1);
  }
  // Kept at 23 under a cap of 8, drift inserts and the cap's drops took turns: 53 drops in 10 s.
  const after = buf.stats;
  assert.ok(after.overflowDrops - before.overflowDrops <= 2, `${after.overflowDrops} drops`);
  assert.ok(after.driftInserts - before.driftInserts <= 3, `${after.driftInserts} inserts`);
});

Deno.test("PlayoutBuffer waits for a late packet when nothing is buffered: a pause or a delay step loses nothing", () => {
  // A steady stream, then the network delay rises by 60 ms at once (or the sender pauses for
  // 60 ms with its sequence numbers continuous, as DTX and a muted page do); no packet is lost.
  const buf = newBuffer({ initialDepth: 2 });
  const step = 60;
  const arrival = (seq: number) => seq * FRAME_MS + (seq >= 100 ? step : 0);
  const decided: string[] = [];
  let seq = 0;
  for (let t = 0; t <= 400 * FRAME_MS; t += FRAME_MS) {
    for (; seq < 400 && arrival(seq) <= t; seq++) pushAt(buf, seq, arrival(seq));
    decided.push(describe(buf.next(t)));
  }
  const s = buf.stats;
  assert.equal(s.late, 0, "nothing came too late to play");
  assert.equal(s.plc, 0, "nothing was concealed as lost");
  assert.ok(s.lateWaits + s.driftInserts >= 1, "frames were concealed waiting");
  for (const k of [99, 100, 101, 102, 103]) {
    assert.ok(decided.includes(`play ${k}:${k & 0xff}`), `seq ${k} played`);
  }
  assertPacketAccounting(s);
  // Before, the frames due in the gap consumed seq 100–102: they and every packet after them
  // came "late" until an underrun, and the buffer resynchronised.
  assert.equal(s.underruns, 0);
  assert.equal(s.resyncs, 0);
});

Deno.test("PlayoutBuffer: a sender's pauses with continuous sequence numbers leave its level alone", () => {
  // A ±10 ms-jitter stream whose sender pauses two frames in every fifty (DTX, a muted page):
  // sequence numbers continuous, timestamps jump; the real delay never changes.
  const buf = newBuffer();
  const rand = prng(3);
  const arrivals: { seq: number; ts: number; at: number }[] = [];
  let seq = 500;
  for (let k = 0; k < 6000; k++) {
    if (k > 0 && k % 50 < 2) continue; // paused
    arrivals.push({
      seq: seq++ & 0xffff,
      ts: (k * FRAME_SAMPLES) >>> 0,
      at: k * 20 + 5 + rand() * 20,
    });
  }
  arrivals.sort((a, b) => a.at - b.at);
  let p = 0, maxLevel = 0;
  for (let k = 0; k < 6000; k++) {
    const now = k * FRAME_MS;
    for (; p < arrivals.length && arrivals[p]!.at <= now; p++) {
      const a = arrivals[p]!;
      buf.push(a.seq, a.ts, a.at, tag(a.seq));
    }
    buf.next(now);
    if (k > 500) maxLevel = Math.max(maxLevel, buf.stats.smoothedDepth);
  }
  const s = buf.stats;
  assert.equal(s.late, 0);
  assert.ok(s.lateWaits > 100, `late waits ${s.lateWaits}`);
  // Counted as a rise of one frame per wait, the level climbed to 60 frames and drift drops
  // threw away 114 packets of speech in two minutes.
  assert.ok(maxLevel <= s.targetDepth + 1.5, `level up to ${maxLevel}`);
  assert.equal(s.driftDrops, 0);
  assertPacketAccounting(s);
});

Deno.test("PlayoutBuffer slides over packets queued before its first start and counts each once", () => {
  // The device is slow to open: 40 packets are queued before the first next() (capacity 32).
  const buf = newBuffer();
  for (let i = 0; i < 40; i++) assert.equal(pushAt(buf, 1000 + i), "accepted");
  const d = buf.next(800);
  assert.equal(d.kind, "play");
  const first = (d as { seq: number }).seq;
  const s = buf.stats;
  // Every sequence number from the stream's first packet to the one played is counted once;
  // none before the first packet (they never existed).
  assert.equal(s.overflowDrops + s.skipped, first - 1000);
  assert.equal(s.skipped, 0);
  assertPacketAccounting(s);
});

Deno.test("PlayoutBuffer sets late waits against lost packets: a loss adds no delay", () => {
  const buf = newBuffer({ initialDepth: 1, driftHoldMs: 1e6 });
  pushAt(buf, 0);
  assert.equal(describe(buf.next(0)), "play 0:0");
  // Seq 1 and 2 are lost; with nothing buffered the buffer waits for seq 1 (it may be late).
  assert.equal(describe(buf.next(20)), "plc 1 late");
  assert.equal(describe(buf.next(40)), "plc 1 late");
  assert.equal(buf.stats.lateWaits, 0, "not settled until a packet comes");
  // Seq 3 comes on time: 1 and 2 were lost, and the two waits already filled their time, so
  // seq 3 plays when it always would have.
  pushAt(buf, 3);
  assert.equal(describe(buf.next(60)), "play 3:3");
  const s = buf.stats;
  // The waits are counted as what they turned out to be: concealment of two lost frames.
  assert.equal(s.lateWaits + s.driftInserts, 0);
  assert.equal(s.plc, 2, "seq 1 and 2 were concealed");
  assert.equal(s.skipped, 0);
  pushAt(buf, 4);
  assert.equal(describe(buf.next(80)), "play 4:4");
  assert.ok(s.smoothedDepth < 2, `level ${s.smoothedDepth}: no frame of delay was added`);
});

Deno.test("PlayoutBuffer slides its window over a stall longer than its capacity: no resync", () => {
  const buf = newBuffer({ initialDepth: 2, maxDepth: 8, driftHoldMs: 1e6 });
  pushAt(buf, 0);
  pushAt(buf, 1);
  assert.equal(describe(buf.next(20)), "play 0:0");
  // The device loop stalls for 2 s (100 frames, capacity 32) while the stream goes on.
  for (let seq = 2; seq <= 101; seq++) assert.equal(pushAt(buf, seq), "accepted", `seq ${seq}`);
  const s = buf.stats;
  assert.equal(s.resyncs, 0, "a stall is not a sender restart");
  assert.equal(s.flushed, 0);
  assert.equal(describe(buf.next(2040)), `play ${101 - 8}:${101 - 8}`);
  assert.equal(s.depth, 8);
  assertPacketAccounting(s);
  // A packet far ahead of the newest is still out of the window (a restart, or garbage).
  assert.equal(pushAt(buf, 101 + 40), "too-early");
});

Deno.test("PlayoutBuffer starts its level from the stream, not from how long a lone packet waited", () => {
  const buf = newBuffer({ initialDepth: 2 });
  // A lone packet (a comfort-noise update), then speech 400 ms later: a perfect network.
  assert.equal(buf.push(0, 0, 0, tag(0)), "accepted");
  for (let t = 0; t < 400; t += FRAME_MS) assert.equal(buf.next(t).kind, "idle");
  const levels: number[] = [];
  for (let k = 1; k <= 50; k++) {
    const at = 400 + (k - 1) * FRAME_MS;
    assert.equal(buf.push(k, (k + 20) * FRAME_SAMPLES, at, tag(k)), "accepted");
    buf.next(at + 1);
    levels.push(buf.stats.smoothedDepth);
  }
  // Counted in full, the lone packet's 20 frames of waiting started the level near 11 frames
  // against a target of 2, and drift drops discarded speech on a perfect network.
  assert.ok(levels[0]! <= buf.stats.targetDepth + 0.5, `level ${levels[0]} at the start`);
  assert.ok(Math.max(...levels) <= 3, `level up to ${Math.max(...levels)}`);
  assert.equal(buf.stats.driftDrops, 0);
});

Deno.test("PlayoutBuffer copies payloads into one pool and reuses its decision objects", () => {
  const buf = newBuffer({ initialDepth: 1, driftHoldMs: 1e6 });
  const original = tag(1);
  assert.equal(buf.push(1, 960, 20, original), "accepted");
  original.fill(0);
  const first = buf.next(20);
  assert.equal(first.kind, "play");
  assert.deepEqual([...(first as { data: Uint8Array }).data], [0, 1, 0x5a], "a copy");
  const view = (first as { data: Uint8Array }).data;
  for (let seq = 2; seq <= 1 + buf.capacity; seq++) {
    pushAt(buf, seq);
    const d = buf.next(seq * FRAME_MS);
    assert.equal(d, first, "the same decision object every time");
    assert.equal(describe(d), `play ${seq}:${seq & 0xff}`);
    assert.equal((d as { data: Uint8Array }).data.buffer, view.buffer, "one pool");
  }
  // Seq 1 + capacity lands in seq 1's slot with the same length: the cached view is reused.
  assert.equal((first as { data: Uint8Array }).data, view);
});

Deno.test("PlayoutBuffer.setFrameSamples rescales the target to the new frame length", () => {
  const buf = newBuffer();
  const arrivals = network(sender({ frames: 500, ppm: 0 }), {
    seed: 81,
    jitter: uniformJitter(15),
  });
  drive(buf, arrivals);
  assert.equal(buf.stats.targetDepth, 3);
  buf.setFrameSamples(480); // 10 ms: the same ≈28 ms of jitter now needs ceil(2.8) + 1 frames
  buf.next(1e6);
  assert.equal(buf.stats.targetDepth, 4);
  assert.equal(buf.frameSamples, 480);
  assert.throws(() => buf.setFrameSamples(1000), RangeError);
  assert.throws(() => buf.setFrameSamples("960" as unknown as number), TypeError);
});

Deno.test("PlayoutBuffer.reset flushes the buffer and starts a new stream, keeping counters", () => {
  const buf = newBuffer({ initialDepth: 2 });
  pushAt(buf, 5);
  pushAt(buf, 6);
  pushAt(buf, 7);
  assert.equal(describe(buf.next(0)), "play 5:5");
  buf.reset();
  assert.equal(buf.stats.flushed, 2);
  assert.equal(buf.stats.state, "buffering");
  assert.equal(describe(buf.next(20)), "idle");
  // Seq 3 would be "late" for the old stream; after reset it starts a new one.
  assert.equal(pushAt(buf, 3), "accepted");
  assert.equal(pushAt(buf, 4), "accepted");
  assert.equal(describe(buf.next(40)), "play 3:3");
  assert.equal(buf.stats.played, 2);
  assertPacketAccounting(buf.stats);
});

Deno.test("PlayoutBuffer rejects bad options and arguments before touching state", () => {
  assert.throws(() => new PlayoutBuffer({ frameSamples: 1000 }), {
    name: "RangeError",
    message: /Invalid frameSamples "1000": expected one of 120, 240, 480, 960/,
  });
  assert.throws(() => newBuffer({ minDepth: 0 }), RangeError);
  assert.throws(() => newBuffer({ minDepth: 4, maxDepth: 3 }), RangeError);
  assert.throws(() => newBuffer({ maxDepth: 8, capacity: 9 }), {
    name: "RangeError",
    message: 'Invalid capacity "9": expected an integer from 10 to 32768',
  });
  assert.throws(() => newBuffer({ maxPacketBytes: 1.5 }), RangeError);
  assert.throws(() => newBuffer({ jitterPercentile: 0.4 }), RangeError);
  assert.throws(() => newBuffer({ maxDepth: "8" as unknown as number }), TypeError);
  assert.throws(() => new PlayoutBuffer(null as unknown as PlayoutOptions), TypeError);

  const buf = newBuffer();
  assert.throws(() => buf.push(65536, 0, 0, tag(1)), RangeError);
  assert.throws(() => buf.push(-1, 0, 0, tag(1)), RangeError);
  assert.throws(() => buf.push(1, 2 ** 32, 0, tag(1)), RangeError);
  assert.throws(() => buf.push(1, 0, NaN, tag(1)), RangeError);
  assert.throws(() => buf.push(1, 0, 0, [1, 2] as unknown as Uint8Array), TypeError);
  assert.throws(() => buf.next(Infinity), RangeError);
  assert.equal(buf.stats.received, 0, "rejected calls are not counted");
});
