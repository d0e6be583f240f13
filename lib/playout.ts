/**
 * Adaptive playout (jitter) buffer for the input pipeline: Opus packets from the network go in
 * with {@link PlayoutBuffer.push}; once per playback frame period the device loop asks
 * {@link PlayoutBuffer.next} what to decode — a packet, a forward-error-correction decode of the
 * following packet, packet-loss concealment, or silence.
 *
 * ## Packets and sequence numbers
 * - Every payload is copied into one preallocated pool (`capacity` slots of `maxPacketBytes`);
 *   nothing is allocated per packet. A packet is a slot indexed by its sequence number.
 * - 16-bit sequence numbers are extended to unbounded integers relative to the playout point
 *   (the next sequence number to decide), so wrap-around at 65535 → 0 is invisible. 32-bit RTP
 *   timestamps are extended the same way against the newest timestamp seen.
 * - `push` answers, in this order: `"malformed"` (empty, or longer than `maxPacketBytes`);
 *   `"duplicate"` (that sequence number is buffered, or its packet was already played or
 *   dropped); `"late"` (its turn has passed — it was concealed — or it is more than
 *   `max(capacity, 100)` behind); `"too-early"` (it is `capacity` or more ahead of the playout
 *   point and does not fit the window); otherwise `"accepted"`.
 *
 * ## Resynchronisation (sender restart, long outage)
 * - Buffering with an empty buffer (before the first packet, or after an underrun): a packet
 *   ahead of the window is accepted and the playout point jumps to it (the sequence numbers in
 *   between are counted in `skipped` when playback restarts). Nothing buffered is lost.
 * - A packet that follows on from the newest one (at most `capacity / 2` beyond it) but lies
 *   beyond the window is the stream going on while the playout point stood still (the device
 *   loop stalled, or the device was being reopened): the window slides forward over the oldest
 *   packets (`overflowDrops`, holes in `skipped`); nothing is flushed.
 * - Otherwise a packet outside the window is rejected (`"too-early"`, or `"late"` when behind),
 *   and remembered. If the next rejected packet follows it (1 to `capacity` − 1 sequence numbers
 *   later, mod 2^16) the sender is taken to have restarted: the buffer is flushed (`flushed`),
 *   the sequence, timestamp and jitter history are forgotten, `resyncs` is counted and that
 *   packet starts a new stream (RFC 3550 A.1 uses the same two-in-a-row probation). While
 *   buffering with an empty buffer, two consecutive `"late"` packets also resync, so a restart
 *   that jumps back by only a few sequence numbers is followed too.
 * - A packet its caller marks as the first of a new stream (`push(…, newStream)`: a new talker
 *   connection, a new RTP SSRC) resyncs at once, whatever its number. Without the mark a sender
 *   that starts again from the numbers it used a moment ago (a page that counts from 0 on every
 *   Talk) would have its packets taken for duplicates of the ones just played — up to a window's
 *   worth, over a second of speech — before the probation above caught on. The old stream's
 *   packets still buffered are flushed: the new sender replaces it.
 *
 * ## Start, depth and underruns
 * - `depth` is the number of frames from the playout point to the newest buffered packet,
 *   counting holes (they are concealed, so they take playback time). Playback starts (and
 *   restarts after an underrun) when `depth ≥ targetDepth`, at the oldest buffered packet.
 * - Each `next()` while playing consumes one sequence number: `play` when its packet is present;
 *   `fec` (decode the following packet with `decode_fec = 1`) when it is missing but the next
 *   one is present; otherwise `plc` (decode with a null packet). After `maxConcealFrames`
 *   consecutive concealed frames with still nothing to play, the buffer counts an underrun and
 *   returns to buffering: `next()` answers `idle` — output silence; libopus's PLC has already
 *   faded to silence by then — until the depth reaches the target again.
 * - With nothing buffered at all, the missing packet is more likely late than lost (a sender's
 *   pause with its sequence numbers continuous — DTX, a muted page — or a rise in network
 *   delay): the frame is concealed without consuming its sequence number (`plc` with
 *   `reason: "late"`), so it still plays when it comes. The waits are settled when the next
 *   packet comes: if it is the one waited for, they count as `lateWaits`; if it is a later one,
 *   the waited-for packets were lost, and as many of them as there were waits are passed over
 *   and counted as `plc` (the waits concealed them), so a loss adds no delay. A wait leaves the
 *   level (below) alone: the whole stream came late or paused, so its lead against the later
 *   playout point is unchanged, and the packets that come measure it anyway. (Counted as a rise
 *   of one frame per wait, a sender pausing two frames in fifty drove the level to 60 frames and
 *   drift drops discarded speech.)
 * - A hard cap keeps latency bounded: more than `maxDepth + 1` frames ahead (a burst after a
 *   stall) drops the oldest frames at once (`overflowDrops`, holes in `skipped`).
 *
 * ## Jitter and target depth
 * The jitter estimate is a windowed percentile, not the RFC 3550 interarrival jitter: the
 * transit time `arrivalMs − timestamp/48` of the last `jitterWindow` packets (long window) and
 * of the last 32 (short window) is kept sorted, and
 * `jitterMs = max(P_long, P_short) − min_long` with P the `jitterPercentile`: how much later than
 * the fastest packets most packets arrive — exactly the extra delay the buffer must hold to
 * catch them. The short window makes the estimate rise within a few packets of a jitter onset
 * (the long one needs 5 % of its length to move); the long one makes it fall slowly.
 * RFC 3550's J is a smoothed mean of consecutive transit differences: it needs a fudge factor
 * (≈3–4) to become a delay, and it barely moves for rare long delays (heavy tails), which are
 * what causes late packets. (J is still reported as `rfc3550JitterMs` for comparison.) Transit
 * samples more than 1 s away from the window's median are ignored, unless four come in a row
 * (a timestamp jump: the window restarts).
 *
 * `targetDepth = clamp(ceil(max(0, k·jitterMs/frameMs − 0.1)) + 1, minDepth, maxDepth)`, with
 * k = `jitterFactor`; the 0.1-frame dead zone lets a calm network reach `minDepth`. The target
 * rises at once when the estimate rises; it falls by one frame only after the estimate has
 * stayed at least 0.2 frame below the next lower step for `targetDecayMs`, and again only after
 * another `targetDecayMs` — fast up, slow down, no flapping.
 *
 * ## Clock drift
 * The buffer's fill is measured continuously: when a packet arrives, its lead (how long before
 * its predicted playout time it arrived) in frames + 0.5 is folded into an exponential average,
 * `smoothedDepth` (each sample clipped to ±2 frames of the average). It equals the integer
 * depth on average but sees the phase between sender and device, so drift shows before a frame
 * is lost. When `smoothedDepth > targetDepth + 1` for `driftHoldMs`, the oldest frame is dropped
 * (`driftDrops`; only when it and its successor are present, so a drop never makes a hole).
 * When `smoothedDepth < targetDepth − 0.3` and the buffer is not empty for `driftHoldMs` (a
 * quarter of it when a whole frame is missing), one concealment frame is inserted: a `plc`
 * decision with `reason: "drift"` that consumes no sequence number (`driftInserts`). Below that
 * level, when the frame due is missing and there is nothing to rebuild it from, the insert is
 * made at once (a stretch): concealment is due anyway, and the missing packet — most likely just
 * late — can still be played; such frames count towards `maxConcealFrames`. The 1.3-frame
 * band keeps a drop from triggering an insert and back; the lower edge keeps every packet ahead
 * of its playout time, so drift alone never runs the buffer dry. At 300 ppm this is one action
 * per 20 ms / 300e-6 ≈ 67 s. Drops and inserts are not steered to quiet moments (no energy
 * hint is taken); Opus PLC of one frame is hard to hear.
 *
 * ## Accounting (checked by the tests)
 * - `received = accepted + duplicate + late + tooEarly + malformed`.
 * - `accepted = played + driftDrops + overflowDrops + flushed + buffered`.
 * - Each sequence number the playout point passes is exactly one of `played`, `fec`, `plc`,
 *   `driftDrops`, `overflowDrops` or `skipped`; sequence numbers jumped over by a resync are
 *   not counted. `plc` counts losses only; drift inserts are `driftInserts`, late waits
 *   `lateWaits`.
 * Counters are cumulative: `reset()` empties the buffer (counted as `flushed`) but keeps them.
 *
 * ## Hot path
 * `push` and `next` allocate nothing: `next` returns one reused decision object per kind, valid
 * until the next call, whose `data` is a view into the pool, cached per slot and reused while the
 * packet length repeats (constant-bitrate streams never allocate; with VBR a new view object —
 * not a copy — is made when a slot's length changes). Times are milliseconds on one monotonic
 * clock (e.g. `performance.now()`), the same for `arrivalMs` and `nowMs`.
 *
 * @module
 */

/** Opus frame durations at 48 kHz, in samples per channel (2.5 ms … 120 ms). */
export const OPUS_FRAME_SAMPLES_48K: readonly number[] = [
  120,
  240,
  480,
  960,
  1920,
  2880,
  3840,
  4800,
  5760,
];

const TICKS_PER_MS = 48;
const SEQ_MASK = 0xffff;
const SEQ_HALF = 0x8000;
const TS_MAX = 0xffffffff;
/** Extended sequence numbers start here so that backward resyncs never go negative. */
const EXT_BIAS = 2 ** 30;
/** RFC 3550 A.1 MAX_MISORDER: how far behind a packet may be and still count as reordered. */
const MAX_MISORDER = 100;
/** Free slots left behind the first packet of a stream for packets reordered before it. */
const ANCHOR_SLACK_DIVISOR = 4;
const EMPTY = -1;

const HIGH_MARGIN = 1.0;
const LOW_MARGIN = 0.3;
const DEPTH_ALPHA = 1 / 64;
const DEPTH_CLIP = 2;
const JITTER_DEAD_ZONE = 0.1;
const TARGET_HYSTERESIS = 0.2;
const MIN_JITTER_SAMPLES = 8;
/** Packets in the short jitter window that lets the estimate rise within a few packets. */
const SHORT_WINDOW = 32;
const TRANSIT_OUTLIER_MS = 1000;
const TRANSIT_OUTLIERS_TO_RESET = 4;
const RFC3550_GAIN = 1 / 16;

/** Options of a {@link PlayoutBuffer}; depths are in frames. */
export interface PlayoutOptions {
  /** Samples per channel at 48 kHz of one frame (960 = 20 ms); one of {@link OPUS_FRAME_SAMPLES_48K}. */
  frameSamples: number;
  /** Smallest target depth, frames (default 1). */
  minDepth?: number;
  /** Largest target depth, frames (default 8) — at short frames see `maxDepthMs`. */
  maxDepth?: number;
  /**
   * The depth cap's floor in time, ms (default 80): with short frames the cap is
   * `ceil(maxDepthMs / frameMs)` frames when that is more than `maxDepth` (at most
   * `capacity − 2`). Eight 2.5 ms frames are 20 ms: a sender that sends a 20 ms burst of them
   * (ffmpeg does) overflowed the cap on every burst.
   */
  maxDepthMs?: number;
  /** Packet slots: the reorder window (default 32, at least `maxDepth + 2`). */
  capacity?: number;
  /** Largest accepted payload, bytes (default 1500). */
  maxPacketBytes?: number;
  /** Target depth before any jitter has been measured (default 2, clamped to min/max). */
  initialDepth?: number;
  /** Percentile of transit time used as the jitter estimate, in (0.5, 1] (default 0.95). */
  jitterPercentile?: number;
  /** Factor k applied to the jitter estimate (default 1). */
  jitterFactor?: number;
  /** Number of recent packets in the jitter window (default 250: 5 s of 20 ms frames). */
  jitterWindow?: number;
  /** Consecutive concealed frames before an underrun returns to buffering (default 5). */
  maxConcealFrames?: number;
  /** How long the depth must stay out of band before a drift drop or insert, ms (default 1000). */
  driftHoldMs?: number;
  /** How long the jitter must stay low before the target falls one frame, ms (default 5000). */
  targetDecayMs?: number;
}

/** Outcome of {@link PlayoutBuffer.push}. */
export type PushResult = "accepted" | "duplicate" | "late" | "too-early" | "malformed";

/** Decode `data` normally; `seq` is its sequence number. */
export interface PlayDecision {
  readonly kind: "play";
  readonly seq: number;
  /** View into the buffer's pool, valid until the next `next()`/`push()`/`reset()`. */
  readonly data: Uint8Array;
}

/** `seq` was lost; `data` is packet `seq + 1`: decode it with `decode_fec = 1` to rebuild `seq`. */
export interface FecDecision {
  readonly kind: "fec";
  readonly seq: number;
  /** View into the buffer's pool (the following packet), valid until the next call. */
  readonly data: Uint8Array;
}

/**
 * Conceal one frame (decode a null packet). `reason: "loss"`: `seq` was lost. `reason: "drift"`:
 * a frame inserted to refill the buffer (or to wait for a late `seq`); `reason: "late"`: a frame
 * inserted while nothing at all is buffered, waiting for `seq`. For the last two nothing is
 * consumed and `seq` is the next to play.
 */
export interface PlcDecision {
  readonly kind: "plc";
  readonly seq: number;
  readonly reason: "loss" | "drift" | "late";
}

/** Not started, or re-buffering after an underrun: output silence. */
export interface IdleDecision {
  readonly kind: "idle";
}

/** What to decode for one playback frame period. */
export type PlayoutDecision = PlayDecision | FecDecision | PlcDecision | IdleDecision;

/** Live counters and estimates of a {@link PlayoutBuffer} (one object, updated in place). */
export interface PlayoutStats {
  /** `"buffering"` before start and after an underrun, else `"playing"`. */
  readonly state: "buffering" | "playing";
  /** Frames from the playout point (or the oldest packet, while buffering) to the newest packet. */
  readonly depth: number;
  /** Packets held. */
  readonly buffered: number;
  /** Continuous depth estimate used for drift control, frames (0 while buffering). */
  readonly smoothedDepth: number;
  /** Target depth, frames. */
  readonly targetDepth: number;
  /** Windowed transit-time spread, percentile − min, ms. */
  readonly jitterMs: number;
  /** RFC 3550 interarrival jitter, ms (for comparison only). */
  readonly rfc3550JitterMs: number;
  readonly received: number;
  readonly accepted: number;
  readonly duplicate: number;
  readonly late: number;
  readonly tooEarly: number;
  readonly malformed: number;
  /** Packets decoded normally. */
  readonly played: number;
  /** Lost frames rebuilt from the next packet's FEC. */
  readonly fec: number;
  /** Lost frames concealed by PLC (drift inserts not included). */
  readonly plc: number;
  /** `idle` answers. */
  readonly idle: number;
  /** Packets dropped to follow a sender faster than the device. */
  readonly driftDrops: number;
  /** Concealment frames inserted to follow a sender slower than the device. */
  readonly driftInserts: number;
  /**
   * Concealment frames inserted while nothing was buffered, waiting for the missing packet (a
   * sender's pause with continuous sequence numbers, a rise in network delay), once settled: when
   * the packet came (or at an underrun or reset); those that turned out to conceal lost packets
   * are counted in `plc` instead. They consume no sequence number and count towards
   * `maxConcealFrames`.
   */
  readonly lateWaits: number;
  /** Packets dropped because the depth exceeded `maxDepth + 1`. */
  readonly overflowDrops: number;
  /** Packets discarded by a resync or `reset()`. */
  readonly flushed: number;
  /** Sequence numbers passed without a packet or a concealment (restart gaps, overflow holes). */
  readonly skipped: number;
  /** Returns to buffering after `maxConcealFrames` concealed frames. */
  readonly underruns: number;
  /** Sender restarts followed. */
  readonly resyncs: number;
  /** Jitter windows restarted because transit times jumped (a timestamp discontinuity). */
  readonly timestampJumps: number;
}

type Mutable<T> = { -readonly [K in keyof T]: T[K] };

function integerOption(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number") {
    throw new TypeError(`Invalid ${name} "${String(value)}": expected a number`);
  }
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`Invalid ${name} "${value}": expected an integer from ${min} to ${max}`);
  }
  return value;
}

function numberOption(
  name: string,
  value: unknown,
  min: number,
  max: number,
  minExclusive = false,
): number {
  if (typeof value !== "number") {
    throw new TypeError(`Invalid ${name} "${String(value)}": expected a number`);
  }
  if (!(minExclusive ? value > min : value >= min) || !(value <= max)) {
    const from = minExclusive ? `greater than ${min}` : `from ${min}`;
    throw new RangeError(`Invalid ${name} "${value}": expected a number ${from} up to ${max}`);
  }
  return value;
}

function frameSamplesOption(value: unknown): number {
  if (typeof value !== "number") {
    throw new TypeError(`Invalid frameSamples "${String(value)}": expected a number`);
  }
  if (!OPUS_FRAME_SAMPLES_48K.includes(value)) {
    throw new RangeError(
      `Invalid frameSamples "${value}": expected one of ${OPUS_FRAME_SAMPLES_48K.join(", ")}`,
    );
  }
  return value;
}

/**
 * Adaptive playout buffer: reorders Opus packets by sequence number, sizes itself from measured
 * jitter, conceals losses (FEC, PLC) and follows sender/device clock drift. Single-threaded; see
 * the module documentation for the exact rules.
 */
export class PlayoutBuffer {
  /** Smallest target depth, frames. */
  readonly minDepth: number;
  /** Largest target depth for the current frame size, frames (see `maxDepthMs`). */
  get maxDepth(): number {
    return this.#maxDepth;
  }
  #maxDepth: number;
  readonly #maxDepthFrames: number;
  readonly #maxDepthMs: number;
  /** Packet slots. */
  readonly capacity: number;
  /** Largest accepted payload, bytes. */
  readonly maxPacketBytes: number;

  readonly #initialDepth: number;
  readonly #percentile: number;
  readonly #jitterFactor: number;
  readonly #maxConceal: number;
  readonly #driftHoldMs: number;
  readonly #targetDecayMs: number;
  readonly #anchorSlack: number;
  readonly #farBehind: number;

  #frameSamples: number;
  #frameMs: number;

  readonly #pool: Uint8Array;
  readonly #slotSeq: Float64Array;
  readonly #slotLen: Int32Array;
  readonly #slotArrival: Float64Array;
  readonly #views: Uint8Array[];
  /** Extended sequence numbers whose packets were played or dropped, by slot. */
  readonly #history: Float64Array;

  #anchored = false;
  #playing = false;
  #head = 0;
  #highest = EMPTY;
  #buffered = 0;
  #lastDecided = NaN;
  #lastNextMs = NaN;
  #concealRun = 0;
  /**
   * Late waits since packets last came, not yet settled: counted as `lateWaits` (the packet came)
   * or as `plc` (it was lost) when the next packet comes, as `lateWaits` at an underrun or reset.
   */
  #pendingWaits = 0;
  #probeSeq = EMPTY;
  #lateProbeSeq = EMPTY;

  #tsValid = false;
  #tsRef = 0;
  #tsRef32 = 0;
  #prevTransit = NaN;

  readonly #longWindow: SortedWindow;
  readonly #shortWindow: SortedWindow;
  #outlierRun = 0;

  #target: number;
  #decaySince = NaN;
  #dropSince = NaN;
  #insertSince = NaN;

  readonly #stats: Mutable<PlayoutStats>;
  readonly #play: Mutable<PlayDecision>;
  readonly #fec: Mutable<FecDecision>;
  readonly #plc: Mutable<PlcDecision>;
  readonly #idle: IdleDecision = { kind: "idle" };

  /** Creates a buffer; throws `TypeError`/`RangeError` for a bad option. */
  constructor(options: PlayoutOptions) {
    if (typeof options !== "object" || options === null) {
      throw new TypeError(`Invalid options "${String(options)}": expected an object`);
    }
    this.#frameSamples = frameSamplesOption(options.frameSamples);
    this.#frameMs = this.#frameSamples / TICKS_PER_MS;
    this.minDepth = integerOption("minDepth", options.minDepth ?? 1, 1, 1024);
    this.#maxDepthFrames = integerOption("maxDepth", options.maxDepth ?? 8, this.minDepth, 1024);
    this.#maxDepthMs = numberOption("maxDepthMs", options.maxDepthMs ?? 80, 0, 60000, false);
    this.capacity = integerOption(
      "capacity",
      options.capacity ?? 32,
      this.#maxDepthFrames + 2,
      SEQ_HALF,
    );
    this.#maxDepth = this.#maxDepthFor(this.#frameMs);
    this.maxPacketBytes = integerOption("maxPacketBytes", options.maxPacketBytes ?? 1500, 1, 65536);
    this.#initialDepth = Math.min(
      this.maxDepth,
      Math.max(this.minDepth, integerOption("initialDepth", options.initialDepth ?? 2, 1, 1024)),
    );
    this.#percentile = numberOption(
      "jitterPercentile",
      options.jitterPercentile ?? 0.95,
      0.5,
      1,
      true,
    );
    this.#jitterFactor = numberOption("jitterFactor", options.jitterFactor ?? 1, 0, 100, true);
    const windowSize = integerOption("jitterWindow", options.jitterWindow ?? 250, 16, 100000);
    this.#maxConceal = integerOption("maxConcealFrames", options.maxConcealFrames ?? 5, 1, 1000);
    this.#driftHoldMs = numberOption("driftHoldMs", options.driftHoldMs ?? 1000, 0, 3600000);
    this.#targetDecayMs = numberOption("targetDecayMs", options.targetDecayMs ?? 5000, 0, 3600000);
    this.#anchorSlack = Math.floor(this.capacity / ANCHOR_SLACK_DIVISOR);
    this.#farBehind = Math.max(this.capacity, MAX_MISORDER);

    this.#pool = new Uint8Array(this.capacity * this.maxPacketBytes);
    this.#slotSeq = new Float64Array(this.capacity).fill(EMPTY);
    this.#slotLen = new Int32Array(this.capacity);
    this.#slotArrival = new Float64Array(this.capacity);
    this.#history = new Float64Array(this.capacity).fill(EMPTY);
    this.#views = [];
    for (let i = 0; i < this.capacity; i++) {
      const off = i * this.maxPacketBytes;
      this.#views.push(this.#pool.subarray(off, off + this.maxPacketBytes));
    }
    this.#longWindow = new SortedWindow(windowSize);
    this.#shortWindow = new SortedWindow(Math.min(SHORT_WINDOW, windowSize));
    this.#target = this.#initialDepth;

    this.#stats = {
      state: "buffering",
      depth: 0,
      buffered: 0,
      smoothedDepth: 0,
      targetDepth: this.#target,
      jitterMs: 0,
      rfc3550JitterMs: 0,
      received: 0,
      accepted: 0,
      duplicate: 0,
      late: 0,
      tooEarly: 0,
      malformed: 0,
      played: 0,
      fec: 0,
      plc: 0,
      idle: 0,
      driftDrops: 0,
      driftInserts: 0,
      lateWaits: 0,
      overflowDrops: 0,
      flushed: 0,
      skipped: 0,
      underruns: 0,
      resyncs: 0,
      timestampJumps: 0,
    };
    const empty = this.#pool.subarray(0, 0);
    this.#play = { kind: "play", seq: 0, data: empty };
    this.#fec = { kind: "fec", seq: 0, data: empty };
    this.#plc = { kind: "plc", seq: 0, reason: "loss" };
  }

  /** Live counters and estimates (the same object every time, updated in place). */
  get stats(): PlayoutStats {
    return this.#stats;
  }

  #maxDepthFor(frameMs: number): number {
    const floor = Math.min(this.capacity - 2, Math.ceil(this.#maxDepthMs / frameMs - 1e-9));
    return Math.max(this.#maxDepthFrames, floor);
  }

  /** Current frame size, samples per channel at 48 kHz. */
  get frameSamples(): number {
    return this.#frameSamples;
  }

  /**
   * Changes the frame size (the sender changed its frame duration). Depths stay counted in
   * frames: the cap follows `maxDepthMs`, the target keeps its time when frames get longer and
   * stays within the cap, the smoothed depth is rescaled to the new frame length, and pending drift
   * decisions restart. Throws `RangeError` unless `n` is an Opus frame size.
   */
  setFrameSamples(n: number): void {
    const samples = frameSamplesOption(n);
    if (samples === this.#frameSamples) return;
    const oldMs = this.#frameMs;
    this.#frameSamples = samples;
    this.#frameMs = samples / TICKS_PER_MS;
    this.#maxDepth = this.#maxDepthFor(this.#frameMs);
    // Longer frames: the same time in fewer of them (a rise to shorter ones is measured again at
    // once, fast up). And never above the new cap: a target of 23 raised with 2.5 ms frames,
    // kept at 20 ms with a cap of 8, had drift inserts and the cap's drops fight for a minute.
    if (this.#frameMs > oldMs) this.#target = Math.ceil((this.#target * oldMs) / this.#frameMs);
    this.#target = Math.min(this.#maxDepth, Math.max(this.minDepth, this.#target));
    this.#stats.targetDepth = this.#target;
    if (this.#playing) {
      this.#stats.smoothedDepth = (this.#stats.smoothedDepth - 0.5) * oldMs / this.#frameMs + 0.5;
    }
    this.#dropSince = NaN;
    this.#insertSince = NaN;
    this.#decaySince = NaN;
  }

  /**
   * Empties the buffer (packets counted as `flushed`) and forgets the stream: sequence and
   * timestamp history, jitter window and target. Counters are kept.
   */
  reset(): void {
    this.#flush();
    this.#history.fill(EMPTY);
    this.#anchored = false;
    this.#playing = false;
    this.#lastDecided = NaN;
    this.#lastNextMs = NaN;
    this.#concealRun = 0;
    this.#settleWaitsAsLate();
    this.#probeSeq = EMPTY;
    this.#lateProbeSeq = EMPTY;
    this.#forgetTiming();
    this.#target = this.#initialDepth;
    this.#decaySince = NaN;
    this.#dropSince = NaN;
    this.#insertSince = NaN;
    const s = this.#stats;
    s.state = "buffering";
    s.smoothedDepth = 0;
    s.targetDepth = this.#target;
    this.#updateDepth();
  }

  /**
   * Offers one received packet: `seq` 16-bit sequence number, `timestamp` 32-bit RTP timestamp
   * in 48 kHz ticks, `arrivalMs` its arrival time; `payload` is copied. `newStream` says that the
   * packet is the first of a new sender's stream (a new talker connection, a new RTP SSRC): its
   * numbering has nothing to do with the last stream's, so the buffer resynchronises on it at
   * once (see the module notes) instead of judging it against the old stream's numbers. Throws
   * `TypeError` or `RangeError` for arguments of the wrong type or range (a programming error,
   * unlike a malformed payload).
   */
  push(
    seq: number,
    timestamp: number,
    arrivalMs: number,
    payload: Uint8Array,
    newStream = false,
  ): PushResult {
    if (!(payload instanceof Uint8Array)) {
      throw new TypeError(`Invalid payload "${String(payload)}": expected a Uint8Array`);
    }
    if (!Number.isInteger(seq) || seq < 0 || seq > SEQ_MASK) {
      throw new RangeError(`Invalid seq "${seq}": expected an integer from 0 to ${SEQ_MASK}`);
    }
    if (!Number.isInteger(timestamp) || timestamp < 0 || timestamp > TS_MAX) {
      throw new RangeError(
        `Invalid timestamp "${timestamp}": expected an integer from 0 to ${TS_MAX}`,
      );
    }
    if (typeof arrivalMs !== "number" || !Number.isFinite(arrivalMs)) {
      throw new RangeError(`Invalid arrivalMs "${arrivalMs}": expected a finite number`);
    }
    const s = this.#stats;
    s.received++;
    const length = payload.length;
    if (length === 0 || length > this.maxPacketBytes) {
      s.malformed++;
      return "malformed";
    }

    if (!this.#anchored) {
      this.#anchored = true;
      this.#head = EXT_BIAS + seq - this.#anchorSlack;
    } else if (newStream) {
      this.#resync(seq);
    }
    let ext = this.#extend(seq);
    const idleEmpty = !this.#playing && this.#buffered === 0;
    if (
      ext >= this.#head + this.capacity && this.#buffered > 0 && ext > this.#highest &&
      ext - this.#highest <= this.capacity / 2
    ) {
      // The stream went on while the playout point stood still (the device loop stalled, the
      // device was being reopened): not a restart. Slide the window forward over the oldest.
      if (!this.#playing) {
        // Buffering, the playout point is not at the oldest packet yet: count the gap before it
        // as a start would (nothing before a stream's first packet), and slide from there.
        const lowest = this.#lowest();
        if (!Number.isNaN(this.#lastDecided) && lowest > this.#lastDecided + 1) {
          s.skipped += lowest - this.#lastDecided - 1;
        }
        this.#head = lowest;
        this.#lastDecided = lowest - 1;
      }
      this.#dropTo(ext - this.capacity + 1);
    }
    if (ext >= this.#head + this.capacity || ext < this.#head - this.#farBehind) {
      if (idleEmpty && ext >= this.#head) {
        // Nothing to lose: jump forward to the new packets (a long outage, or a restart).
        this.#head = ext - this.#anchorSlack;
        this.#forgetTiming();
      } else if (this.#followsProbe(this.#probeSeq, seq)) {
        ext = this.#resync(seq);
      } else {
        this.#probeSeq = seq;
        if (ext >= this.#head) {
          s.tooEarly++;
          return "too-early";
        }
        s.late++;
        return "late";
      }
    }

    if (ext < this.#head) {
      if (this.#history[this.#slotOf(ext)] === ext) {
        s.duplicate++;
        return "duplicate";
      }
      if (idleEmpty) {
        if (this.#followsProbe(this.#lateProbeSeq, seq)) {
          ext = this.#resync(seq);
        } else {
          this.#lateProbeSeq = seq;
        }
      }
      if (ext < this.#head) {
        this.#sampleTiming(timestamp, arrivalMs, ext);
        s.late++;
        return "late";
      }
    }

    const slot = this.#slotOf(ext);
    if (this.#slotSeq[slot] === ext) {
      s.duplicate++;
      return "duplicate";
    }
    this.#pool.set(payload, slot * this.maxPacketBytes);
    this.#slotSeq[slot] = ext;
    this.#slotLen[slot] = length;
    this.#slotArrival[slot] = arrivalMs;
    this.#buffered++;
    if (ext > this.#highest) this.#highest = ext;
    this.#lateProbeSeq = EMPTY;
    s.accepted++;
    this.#sampleTiming(timestamp, arrivalMs, ext);
    this.#updateDepth();
    return "accepted";
  }

  /**
   * Decides what to output for the playback frame period starting at `nowMs`; call exactly once
   * per period. The returned object is reused: read it before the next call.
   */
  next(nowMs: number): PlayoutDecision {
    if (typeof nowMs !== "number" || !Number.isFinite(nowMs)) {
      throw new RangeError(`Invalid nowMs "${nowMs}": expected a finite number`);
    }
    const s = this.#stats;
    this.#updateTarget(nowMs);
    this.#lastNextMs = nowMs;

    if (!this.#playing) {
      if (!this.#tryStart(nowMs)) {
        s.idle++;
        return this.#idle;
      }
    }

    // Hard latency cap.
    if (this.#highest - this.#head + 1 > this.maxDepth + 1) {
      this.#dropTo(this.#highest - this.maxDepth);
    }

    // Packets came again after late waits: settle them. If the one waited for is still missing,
    // it was lost, not late: the waits already concealed as many missing ones, which are passed
    // over and counted as `plc`, so a loss costs no more delay than a concealment would have.
    // The rest were waits (`lateWaits`): the packet plays now, as late as it came.
    if (this.#pendingWaits > 0 && this.#buffered > 0) {
      let n = 0;
      while (n < this.#pendingWaits && !this.#present(this.#head)) {
        this.#lastDecided = this.#head;
        this.#head++;
        n++;
      }
      s.plc += n;
      s.lateWaits += this.#pendingWaits - n;
      this.#pendingWaits = 0;
    }

    // Drift control.
    const level = s.smoothedDepth;
    if (level > this.#target + HIGH_MARGIN) {
      if (Number.isNaN(this.#dropSince)) this.#dropSince = nowMs;
      if (
        nowMs - this.#dropSince >= this.#driftHoldMs && this.#present(this.#head) &&
        this.#present(this.#head + 1)
      ) {
        this.#discardHead();
        s.driftDrops++;
        s.smoothedDepth -= 1;
        this.#dropSince = NaN;
      }
    } else {
      this.#dropSince = NaN;
    }
    const low = level < this.#target - LOW_MARGIN;
    let due = false;
    if (low) {
      if (Number.isNaN(this.#insertSince)) this.#insertSince = nowMs;
      const hold = this.#target - level >= 1 ? this.#driftHoldMs / 4 : this.#driftHoldMs;
      due = this.#buffered > 0 && nowMs - this.#insertSince >= hold;
    } else {
      this.#insertSince = NaN;
    }
    // Nothing buffered at all, whatever the level says (it moves only when packets arrive, so
    // it is stale in a pause): the packet due is more likely late than lost — a sender that
    // paused with its sequence numbers continuous (DTX, a muted page), a rise in network delay —
    // so conceal without consuming its number and let it still come; consuming it made it and
    // every packet after it "late" until an underrun. Level-neutral: the whole stream came late
    // (or paused), so its lead against the later playout point is what it was; the packets that
    // come measure it anyway.
    if (this.#buffered === 0 && this.#concealRun < this.#maxConceal) {
      this.#concealRun++;
      this.#pendingWaits++;
      return this.#concealInPlace("late");
    }
    // With nothing to play or rebuild now, concealment is due anyway: below the drift band,
    // stretching (not consuming the missing sequence number) costs nothing more and lets it
    // still arrive.
    const stretch = low && !this.#present(this.#head) && !this.#present(this.#head + 1) &&
      this.#concealRun < this.#maxConceal;
    if (due || stretch) {
      this.#insertSince = NaN;
      if (stretch) this.#concealRun++;
      s.driftInserts++;
      s.smoothedDepth += 1;
      return this.#concealInPlace("drift");
    }

    const head = this.#head;
    let decision: PlayoutDecision;
    if (this.#present(head)) {
      const slot = this.#slotOf(head);
      this.#play.seq = head & SEQ_MASK;
      this.#play.data = this.#view(slot);
      this.#discardHead();
      this.#concealRun = 0;
      s.played++;
      decision = this.#play;
    } else if (this.#present(head + 1)) {
      this.#fec.seq = head & SEQ_MASK;
      this.#fec.data = this.#view(this.#slotOf(head + 1));
      this.#advanceOverHole();
      s.fec++;
      decision = this.#fec;
    } else if (this.#concealRun >= this.#maxConceal) {
      this.#playing = false;
      this.#settleWaitsAsLate();
      s.state = "buffering";
      s.underruns++;
      s.idle++;
      s.smoothedDepth = 0;
      this.#updateDepth();
      return this.#idle;
    } else {
      this.#plc.seq = head & SEQ_MASK;
      this.#plc.reason = "loss";
      this.#advanceOverHole();
      s.plc++;
      decision = this.#plc;
    }
    this.#updateDepth();
    return decision;
  }

  #slotOf(ext: number): number {
    const c = this.capacity;
    return ((ext % c) + c) % c;
  }

  #present(ext: number): boolean {
    return this.#slotSeq[this.#slotOf(ext)] === ext;
  }

  #view(slot: number): Uint8Array {
    const length = this.#slotLen[slot]!;
    let view = this.#views[slot]!;
    if (view.length !== length) {
      const off = slot * this.maxPacketBytes;
      view = this.#pool.subarray(off, off + length);
      this.#views[slot] = view;
    }
    return view;
  }

  /** Extends a 16-bit sequence number to the integer nearest the playout point. */
  #extend(seq: number): number {
    let delta = (seq - (this.#head & SEQ_MASK)) & SEQ_MASK;
    if (delta >= SEQ_HALF) delta -= SEQ_MASK + 1;
    return this.#head + delta;
  }

  #followsProbe(probe: number, seq: number): boolean {
    if (probe === EMPTY) return false;
    const d = (seq - probe) & SEQ_MASK;
    return d >= 1 && d < this.capacity;
  }

  /** Starts a new stream at `seq`; returns its extended sequence number. */
  #resync(seq: number): number {
    this.#flush();
    this.#stats.resyncs++;
    this.#playing = false;
    this.#stats.state = "buffering";
    this.#stats.smoothedDepth = 0;
    this.#history.fill(EMPTY);
    this.#lastDecided = NaN;
    this.#concealRun = 0;
    this.#settleWaitsAsLate();
    this.#probeSeq = EMPTY;
    this.#lateProbeSeq = EMPTY;
    this.#forgetTiming();
    const ext = this.#extend(seq);
    this.#head = ext - this.#anchorSlack;
    return ext;
  }

  #flush(): void {
    if (this.#buffered > 0) {
      this.#stats.flushed += this.#buffered;
      this.#slotSeq.fill(EMPTY);
      this.#buffered = 0;
    }
    this.#highest = EMPTY;
  }

  #forgetTiming(): void {
    this.#tsValid = false;
    this.#prevTransit = NaN;
    this.#longWindow.clear();
    this.#shortWindow.clear();
    this.#outlierRun = 0;
  }

  /** Removes the (present) head packet and advances the playout point. */
  #discardHead(): void {
    const head = this.#head;
    const slot = this.#slotOf(head);
    this.#slotSeq[slot] = EMPTY;
    this.#history[slot] = head;
    this.#buffered--;
    if (this.#buffered === 0) this.#highest = EMPTY;
    this.#lastDecided = head;
    this.#head = head + 1;
  }

  /** A concealment frame that consumes no sequence number: `seq` is still the next to play. */
  #concealInPlace(reason: "drift" | "late"): PlcDecision {
    this.#plc.seq = this.#head & SEQ_MASK;
    this.#plc.reason = reason;
    this.#updateDepth();
    return this.#plc;
  }

  /** Counts the late waits not yet settled as waits (at an underrun, a resync or a reset). */
  #settleWaitsAsLate(): void {
    this.#stats.lateWaits += this.#pendingWaits;
    this.#pendingWaits = 0;
  }

  /**
   * Moves the playout point forward to `to`, dropping the packets buffered before it (counted as
   * `overflowDrops`) and passing over holes (`skipped`). `to` must not pass the newest packet.
   */
  #dropTo(to: number): void {
    const s = this.#stats;
    while (this.#head < to) {
      if (this.#present(this.#head)) {
        this.#discardHead();
        s.overflowDrops++;
      } else {
        s.skipped++;
        this.#lastDecided = this.#head;
        this.#head++;
      }
    }
  }

  #advanceOverHole(): void {
    this.#lastDecided = this.#head;
    this.#head++;
    this.#concealRun++;
  }

  #lowest(): number {
    for (let e = this.#head; e <= this.#highest; e++) {
      if (this.#present(e)) return e;
    }
    return EMPTY;
  }

  #tryStart(nowMs: number): boolean {
    if (this.#buffered === 0) return false;
    const lowest = this.#lowest();
    if (this.#highest - lowest + 1 < this.#target) return false;
    const s = this.#stats;
    if (!Number.isNaN(this.#lastDecided) && lowest > this.#lastDecided + 1) {
      s.skipped += lowest - this.#lastDecided - 1;
    }
    this.#head = lowest;
    this.#playing = true;
    this.#concealRun = 0;
    this.#dropSince = NaN;
    this.#insertSince = NaN;
    s.state = "playing";
    // Depth each buffered packet would have seen on arrival had playback started then. Its wait
    // counts up to one frame more than a steady stream's would have been (highest − e): a packet
    // that sat alone while buffering (a comfort-noise update seconds before speech, a stall)
    // says nothing of the stream's lead, and counted in full it set the level far above the
    // target and drift drops followed on a perfect network.
    let sum = 0;
    for (let e = lowest; e <= this.#highest; e++) {
      const slot = this.#slotOf(e);
      if (this.#slotSeq[slot] !== e) continue;
      const waited = Math.min(
        (nowMs - this.#slotArrival[slot]!) / this.#frameMs,
        this.#highest - e + 1,
      );
      sum += waited + (e - lowest) + 0.5;
    }
    s.smoothedDepth = sum / this.#buffered;
    return true;
  }

  /** Folds one packet's arrival into the jitter window and (when playing) the smoothed depth. */
  #sampleTiming(timestamp: number, arrivalMs: number, ext: number): void {
    if (!this.#tsValid) {
      this.#tsValid = true;
      this.#tsRef = timestamp;
      this.#tsRef32 = timestamp;
    }
    const d = (timestamp - this.#tsRef32) | 0;
    const extTs = this.#tsRef + d;
    if (d > 0) {
      this.#tsRef = extTs;
      this.#tsRef32 = timestamp;
    }
    const transit = arrivalMs - extTs / TICKS_PER_MS;
    const s = this.#stats;
    if (!Number.isNaN(this.#prevTransit)) {
      s.rfc3550JitterMs += (Math.abs(transit - this.#prevTransit) - s.rfc3550JitterMs) *
        RFC3550_GAIN;
    }
    this.#prevTransit = transit;
    this.#addTransit(transit);

    if (this.#playing) {
      const f = this.#frameMs;
      // Predicted playout of `ext`: the next period starts at lastNextMs + f and plays head.
      let depth = (this.#lastNextMs - arrivalMs) / f + (ext - this.#head) + 1.5;
      const avg = s.smoothedDepth;
      if (depth > avg + DEPTH_CLIP) depth = avg + DEPTH_CLIP;
      else if (depth < avg - DEPTH_CLIP) depth = avg - DEPTH_CLIP;
      s.smoothedDepth = avg + (depth - avg) * DEPTH_ALPHA;
    }
  }

  #addTransit(transit: number): void {
    const long = this.#longWindow;
    const short = this.#shortWindow;
    if (long.count >= MIN_JITTER_SAMPLES) {
      if (Math.abs(transit - long.median()) > TRANSIT_OUTLIER_MS) {
        if (++this.#outlierRun < TRANSIT_OUTLIERS_TO_RESET) return;
        this.#stats.timestampJumps++;
        long.clear();
        short.clear();
      }
    }
    this.#outlierRun = 0;
    long.add(transit);
    short.add(transit);
    const q = this.#percentile;
    this.#stats.jitterMs = Math.max(long.percentile(q), short.percentile(q)) - long.min();
  }

  #updateTarget(nowMs: number): void {
    if (this.#longWindow.count < MIN_JITTER_SAMPLES) return;
    const frames = Math.max(
      0,
      this.#jitterFactor * this.#stats.jitterMs / this.#frameMs - JITTER_DEAD_ZONE,
    );
    const wanted = Math.min(this.maxDepth, Math.max(this.minDepth, Math.ceil(frames) + 1));
    const t = this.#target;
    if (wanted > t) {
      this.#target = wanted;
      this.#decaySince = NaN;
    } else if (t > this.minDepth && frames <= Math.max(0, t - 2 - TARGET_HYSTERESIS)) {
      if (Number.isNaN(this.#decaySince)) {
        this.#decaySince = nowMs;
      } else if (nowMs - this.#decaySince >= this.#targetDecayMs) {
        this.#target = t - 1;
        this.#decaySince = nowMs;
      }
    } else {
      this.#decaySince = NaN;
    }
    this.#stats.targetDepth = this.#target;
  }

  #updateDepth(): void {
    const s = this.#stats;
    s.buffered = this.#buffered;
    if (this.#buffered === 0) {
      s.depth = 0;
    } else {
      const from = this.#playing ? this.#head : this.#lowest();
      s.depth = this.#highest - from + 1;
    }
  }
}

/** First index in `a[0..n)` (ascending) whose value is ≥ `v`. */
function lowerBound(a: Float64Array, n: number, v: number): number {
  let lo = 0, hi = n;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (a[mid]! < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The last `size` values in arrival order, also kept sorted: O(size) per value, no allocation. */
class SortedWindow {
  readonly #ring: Float64Array;
  readonly #sorted: Float64Array;
  #pos = 0;
  count = 0;

  constructor(size: number) {
    this.#ring = new Float64Array(size);
    this.#sorted = new Float64Array(size);
  }

  clear(): void {
    this.count = 0;
    this.#pos = 0;
  }

  add(v: number): void {
    const ring = this.#ring;
    const sorted = this.#sorted;
    let n = this.count;
    if (n === ring.length) {
      // Remove the oldest value from the sorted copy (copyWithin: one memmove).
      const old = lowerBound(sorted, n, ring[this.#pos]!);
      sorted.copyWithin(old, old + 1, n);
      n--;
    }
    const at = lowerBound(sorted, n, v);
    sorted.copyWithin(at + 1, at, n);
    sorted[at] = v;
    this.count = n + 1;
    ring[this.#pos] = v;
    this.#pos = (this.#pos + 1) % ring.length;
  }

  /** Value at quantile `q` (nearest rank below); NaN when empty. */
  percentile(q: number): number {
    return this.count === 0 ? NaN : this.#sorted[Math.floor(q * (this.count - 1))]!;
  }

  min(): number {
    return this.count === 0 ? NaN : this.#sorted[0]!;
  }

  median(): number {
    return this.count === 0 ? NaN : this.#sorted[this.count >> 1]!;
  }
}
