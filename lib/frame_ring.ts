/**
 * A single-producer/single-consumer ring of fixed-size frames in a `SharedArrayBuffer`, for
 * moving PCM and Opus frames between Web Workers and the main thread without copying.
 *
 * The producer writes a frame straight into a slot's bytes (`slot.data` / `slot.pcm` — libopus can
 * encode into it, ALSA can capture into it), sets the slot's metadata and publishes it. The
 * consumer claims the next frame and reads (or decodes) it in place; the claimed slot stays valid
 * until the consumer's next {@link FrameRing.claim}. The producer never waits for the consumer:
 * when the ring is full, the oldest unconsumed frame is dropped and counted.
 *
 * ## Protocol
 *
 * Shared words (an `Int32Array` header; all access through `Atomics`, which is sequentially
 * consistent):
 * - `writeSeq` W — frames published so far (written by the producer only); `readSeq` R — the next
 *   frame the consumer will claim (compare-and-swapped by both sides); `dropped`. Both sequence
 *   numbers wrap with `| 0` arithmetic; distances are `(a - b) | 0`.
 * - `map[k]`, `k = s & (slots - 1)` — which of the `slots + 2` physical slots holds frame `s`.
 *   `slots` is a power of two, so `s & (slots - 1)` stays continuous when `s` wraps past 2³².
 * - `spareA`, `spareB` — the two physical slots not in `map` (written by the producer only).
 * - `held` — the physical slot the consumer holds, or -1 (written by the consumer only).
 *
 * Producer, {@link FrameRing.reserve}: pick whichever of `spareA`, `spareB` is not `held` (the
 * consumer holds at most one slot, so one always qualifies) and write the frame into it. Nothing in
 * `map` points at that slot, so the consumer cannot see it while it is being written.
 * {@link FrameRing.publish} for frame `w = W`: while `(w - R) >= slots`, compare-and-swap
 * R: r → r+1 and count a drop when the swap succeeds; then `map[w & mask]` gets the new slot, the
 * slot it replaces (whose frame is now below R: consumed or dropped) becomes a spare, and
 * `Atomics.store(W, w + 1)` releases the frame; then the producer signals a waiting consumer (see
 * Waiting).
 *
 * Consumer, {@link FrameRing.claim}: read `r = R`; if `r == W` store `held = -1` and return
 * nothing. Otherwise read `p = map[r & mask]`, store `held = p`, then compare-and-swap R: r → r+1;
 * if the swap fails (the producer dropped frame r meanwhile), start again.
 *
 * Why the producer never writes a slot the consumer is reading: the consumer reads slot p only
 * after its swap R: r → r+1 succeeded, and it stored `held = p` before that swap. p can stop being
 * `map[r & mask]` only when the producer publishes frame r + slots, which requires reading
 * R > r — a value at or after that swap in R's modification order — so the producer's later read of
 * `held` (at its next reserve) sees p, or a newer value stored by a later `claim()`, which releases
 * p. A consumer that read `map` for a frame the producer then dropped fails its swap and never
 * reads the slot. A single slot is therefore never written and read at the same time, however long
 * the consumer holds it and however many frames the producer drops meanwhile.
 *
 * (The simpler scheme "slot = seq mod slots, keep `W - R <= slots - 1`" does not give this: with
 * 4 slots, a consumer holding frame 0 while the producer publishes 1, 2, 3, then drops 1 to make
 * room for 4, finds frame 4 written over the frame it is still reading. Hence the two spare slots.)
 *
 * Plain reads and writes of slot bytes and metadata are ordered by those atomics: the producer's
 * writes happen before its `Atomics.store(W)`; the consumer's reads happen after an
 * `Atomics.load(W)` that saw it.
 *
 * Capacity: up to `slots` unconsumed frames, plus the one the consumer holds and the one the
 * producer fills — `slots + 2` physical slots (`ReadSlot.index`/`WriteSlot.index` number them).
 *
 * ## Memory layout
 *
 * Int32 header (256 bytes: the producer's words, R, and `held` each on their own 64-byte cache
 * line), `map`, {@link FrameRing.control}, then one 64-byte metadata block per physical slot
 * (int32 `length`, `seq`, `flags`, `samples` at bytes 0–15, float64 `t[0..3]` at bytes 16–47),
 * then the slots' bytes, each starting on a 64-byte boundary. The header records the geometry, so
 * {@link FrameRing.attach} needs nothing but the buffer.
 *
 * ## Metadata
 *
 * Every slot carries its byte `length`, a user sequence number `seq` (RTP sequence, frame counter),
 * `flags` (see {@link FrameFlag}), `samples` (e.g. samples per channel) — all int32 — and four
 * `Float64` timestamps `t[0..3]` in epoch milliseconds ({@link epochMs}), comparable across
 * workers.
 *
 * ## Waiting
 *
 * Every change a consumer may wait for — a frame published, the ring ended,
 * {@link FrameRing.wake} — increments the `event` word after it is made, then `Atomics.notify`
 * wakes the consumer on that word. A consumer reads `event` *before* it looks at the ring and
 * sleeps only while `event` still holds that value, so a change made between its look and its
 * sleep is never missed (waiting on W, as the ring did first, an `end()` or `wake()` in that gap
 * went unseen until the wait's timeout).
 *
 * {@link FrameRing.waitForData} blocks in `Atomics.wait` (workers; Deno also allows it on the
 * main thread, where it stalls the event loop). Sleeping on a raw Linux futex through FFI
 * instead was tried and dropped: on this VM its hop was no faster (medians 13–24 µs against
 * 12–23 µs for `Atomics.wait`, eight alternating runs of 1500 frames 1 ms apart).
 * {@link FrameRing.waitForDataAsync} uses `Atomics.waitAsync`, which Deno 2.9.5 supports; Deno
 * does not count a pending `waitAsync` as pending work, so the method also holds a timer for the
 * length of the wait — without it a program whose only pending work is the wait would exit. Where
 * `Atomics.waitAsync` is missing it falls back to checking once a millisecond.
 *
 * @module
 */

/** Bits of a slot's `flags` word. Pipelines may define more from bit 8 upwards. */
export const FrameFlag = {
  /** The frame carries, or was recovered from, in-band forward error correction. */
  fec: 1 << 0,
  /** The frame is silence or a DTX (discontinuous transmission) frame. */
  silence: 1 << 1,
  /** A gap or reset precedes this frame (device restart, encoder change, lost frames). */
  discontinuity: 1 << 2,
} as const;

/** Current time in epoch milliseconds with sub-millisecond precision, comparable across workers. */
export function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

/** The slot being filled by the producer, between {@link FrameRing.reserve} and `publish`. */
export interface WriteSlot {
  /** Physical slot number, `0 <= index < slots + 2`. */
  readonly index: number;
  /** The whole slot, `slotBytes` long; write the frame here. A valid FFI `buffer` argument. */
  readonly data: Uint8Array;
  /** The same bytes as int16 samples, `slotBytes / 2` long (8-byte aligned). */
  readonly pcm: Int16Array;
  /** User sequence number (int32), e.g. RTP sequence or frame counter. */
  seq: number;
  /** Bit set of {@link FrameFlag} values (int32). */
  flags: number;
  /** Samples (e.g. per channel) in the frame (int32). */
  samples: number;
  /** Four timestamps in epoch milliseconds; their meaning is the pipeline's. */
  readonly t: Float64Array;
}

/** A frame claimed by the consumer; valid until the consumer's next {@link FrameRing.claim}. */
export interface ReadSlot {
  /** Physical slot number, `0 <= index < slots + 2`. */
  readonly index: number;
  /** Bytes used by the frame. */
  readonly length: number;
  /** The frame's bytes (a view of `length` bytes onto the slot). A valid FFI `buffer` argument. */
  readonly data: Uint8Array;
  /** The frame as int16 samples, `floor(length / 2)` long. */
  readonly pcm: Int16Array;
  /** User sequence number set by the producer. */
  readonly seq: number;
  /** Flags set by the producer. */
  readonly flags: number;
  /** Samples set by the producer. */
  readonly samples: number;
  /** Four timestamps in epoch milliseconds set by the producer (a view onto the slot). */
  readonly t: Float64Array;
}

/** Options of {@link FrameRing.create}. */
export interface FrameRingOptions {
  /** Frames the ring holds before dropping the oldest: a power of two from 1 to 65536. */
  readonly slots: number;
  /** Bytes per slot: an even integer from 2 to 1048576. */
  readonly slotBytes: number;
  /** Int32 words in {@link FrameRing.control}, from 0 to 4096 (default 4). */
  readonly controlWords?: number;
  /**
   * Value of the frame counters at start (default 0; any int32 or uint32). Frame counters wrap
   * past 2³¹ and 2³²; tests start near the edge to prove it.
   */
  readonly startSeq?: number;
}

/** What a wait ended with: a frame is available, the producer ended the ring, or time ran out. */
export type WaitResult = "ok" | "ended" | "timed-out";

const MAGIC = 0x474e4952; // "RING" in little-endian ASCII
const VERSION = 2;

// Header word indices. Words written by the producer, R (swapped by both) and `held` (written by
// the consumer) sit on separate 64-byte cache lines so that one side's writes do not keep
// invalidating the line the other side reads.
const H_MAGIC = 0;
const H_VERSION = 1;
const H_SLOTS = 2;
const H_SLOT_BYTES = 3;
const H_CONTROL_WORDS = 4;
const H_START_SEQ = 5;
const H_WRITE_SEQ = 16;
const H_DROPPED = 17;
const H_SPARE_A = 18;
const H_SPARE_B = 19;
const H_ENDED = 20;
/** Incremented after every publish, end() and wake(): the word consumers sleep on. */
const H_EVENT = 21;
const H_READ_SEQ = 32;
const H_HELD = 48;
const HEADER_WORDS = 64;

// Int32 metadata words per physical slot.
const M_LENGTH = 0;
const M_SEQ = 1;
const M_FLAGS = 2;
const M_SAMPLES = 3;
const TIMESTAMPS = 4;
/** Int32 words per slot's metadata block: 4 int32, then 4 float64 from word 4, padded to 64 B. */
const META_WORDS = 16;
const META_TIME_WORD = 4;
/** Int32 words per cache line. */
const LINE_WORDS = 16;

const NONE = -1;
const MAX_SLOTS = 65536;
const MAX_SLOT_BYTES = 1 << 20;
const MAX_CONTROL_WORDS = 4096;
const MAX_TOTAL_BYTES = 1 << 30;
const MAX_TIMER_MS = 2 ** 31 - 1;

const align = (n: number, to: number) => Math.ceil(n / to) * to;

interface Layout {
  readonly slots: number;
  readonly slotBytes: number;
  readonly controlWords: number;
  readonly mapWord: number;
  readonly controlWord: number;
  readonly metaWord: number;
  readonly dataByte: number;
  readonly stride: number;
  readonly totalBytes: number;
}

function layoutOf(slots: number, slotBytes: number, controlWords: number): Layout {
  const physical = slots + 2;
  const mapWord = HEADER_WORDS;
  const controlWord = align(mapWord + slots, LINE_WORDS);
  const metaWord = align(controlWord + controlWords, LINE_WORDS);
  const dataByte = (metaWord + physical * META_WORDS) * 4;
  const stride = align(slotBytes, 64);
  return {
    slots,
    slotBytes,
    controlWords,
    mapWord,
    controlWord,
    metaWord,
    dataByte,
    stride,
    totalBytes: dataByte + physical * stride,
  };
}

function checkInteger(
  what: string,
  value: unknown,
  ok: (n: number) => boolean,
  expected: string,
): number {
  if (typeof value !== "number") {
    throw new TypeError(
      `Cannot create a frame ring with ${what} "${String(value)}": expected ${expected}`,
    );
  }
  if (!Number.isInteger(value) || !ok(value)) {
    throw new RangeError(
      `Cannot create a frame ring with ${what} "${value}": expected ${expected}`,
    );
  }
  return value;
}

function checkTimeout(timeoutMs: number): void {
  if (typeof timeoutMs !== "number") {
    throw new TypeError(`Cannot wait for "${String(timeoutMs)}" ms: expected a number`);
  }
  if (!(timeoutMs >= 0)) {
    throw new RangeError(`Cannot wait for "${timeoutMs}" ms: expected 0 or more, or Infinity`);
  }
}

class RingWriteSlot implements WriteSlot {
  readonly index: number;
  readonly data: Uint8Array;
  readonly pcm: Int16Array;
  readonly t: Float64Array;
  readonly #meta: Int32Array;
  readonly #base: number;

  constructor(index: number, data: Uint8Array, t: Float64Array, meta: Int32Array, base: number) {
    this.index = index;
    this.data = data;
    this.pcm = new Int16Array(data.buffer, data.byteOffset, data.byteLength >> 1);
    this.t = t;
    this.#meta = meta;
    this.#base = base;
  }

  get seq(): number {
    return this.#meta[this.#base + M_SEQ]!;
  }
  set seq(v: number) {
    this.#meta[this.#base + M_SEQ] = v;
  }
  get flags(): number {
    return this.#meta[this.#base + M_FLAGS]!;
  }
  set flags(v: number) {
    this.#meta[this.#base + M_FLAGS] = v;
  }
  get samples(): number {
    return this.#meta[this.#base + M_SAMPLES]!;
  }
  set samples(v: number) {
    this.#meta[this.#base + M_SAMPLES] = v;
  }

  /** Clears the metadata before the producer fills the slot. */
  reset(): void {
    const m = this.#meta, b = this.#base;
    m[b + M_LENGTH] = 0;
    m[b + M_SEQ] = 0;
    m[b + M_FLAGS] = 0;
    m[b + M_SAMPLES] = 0;
    this.t.fill(0);
  }

  setLength(length: number): void {
    this.#meta[this.#base + M_LENGTH] = length;
  }
}

class RingReadSlot implements ReadSlot {
  readonly index: number;
  readonly t: Float64Array;
  readonly #full: Uint8Array;
  readonly #fullPcm: Int16Array;
  readonly #meta: Int32Array;
  readonly #base: number;
  #length = 0;
  #data: Uint8Array;
  #pcm: Int16Array;

  constructor(index: number, data: Uint8Array, t: Float64Array, meta: Int32Array, base: number) {
    this.index = index;
    this.#full = data;
    this.#fullPcm = new Int16Array(data.buffer, data.byteOffset, data.byteLength >> 1);
    this.t = t;
    this.#meta = meta;
    this.#base = base;
    this.#data = data.subarray(0, 0);
    this.#pcm = this.#fullPcm.subarray(0, 0);
  }

  /** Reads the length of the frame just claimed; views are re-cut only when it changes. */
  load(): void {
    this.#length = this.#meta[this.#base + M_LENGTH]!;
  }

  get length(): number {
    return this.#length;
  }
  get data(): Uint8Array {
    if (this.#data.length !== this.#length) this.#data = this.#full.subarray(0, this.#length);
    return this.#data;
  }
  get pcm(): Int16Array {
    const n = this.#length >> 1;
    if (this.#pcm.length !== n) this.#pcm = this.#fullPcm.subarray(0, n);
    return this.#pcm;
  }
  get seq(): number {
    return this.#meta[this.#base + M_SEQ]!;
  }
  get flags(): number {
    return this.#meta[this.#base + M_FLAGS]!;
  }
  get samples(): number {
    return this.#meta[this.#base + M_SAMPLES]!;
  }
}

/**
 * Single-producer/single-consumer ring of fixed-size frames in a `SharedArrayBuffer`.
 *
 * One thread produces (`reserve`, `publish`, `end`), one consumes (`claim`, `waitForData*`); each
 * side may be a different `FrameRing` object made by {@link FrameRing.attach} on the same buffer.
 * See the module documentation for the protocol.
 */
export class FrameRing {
  /** The shared memory; post it to a worker and {@link FrameRing.attach} there. */
  readonly buffer: SharedArrayBuffer;
  /** Frames the ring holds before dropping the oldest. */
  readonly slots: number;
  /** Bytes per slot. */
  readonly slotBytes: number;
  /**
   * Spare shared int32 words for the pipelines (control requests, heartbeats); use `Atomics` on
   * them. The ring itself never touches them.
   */
  readonly control: Int32Array;

  readonly #h: Int32Array;
  #wakeUps = 0;
  readonly #times: Float64Array;
  readonly #bytes: Uint8Array;
  readonly #layout: Layout;
  readonly #mask: number;
  readonly #writeSlots: (RingWriteSlot | undefined)[];
  readonly #readSlots: (RingReadSlot | undefined)[];
  #reserved: RingWriteSlot | null = null;

  private constructor(buffer: SharedArrayBuffer, layout: Layout) {
    this.buffer = buffer;
    this.slots = layout.slots;
    this.slotBytes = layout.slotBytes;
    this.#layout = layout;
    this.#mask = layout.slots - 1;
    this.#h = new Int32Array(buffer, 0, layout.metaWord + (layout.slots + 2) * META_WORDS);
    this.#times = new Float64Array(buffer, 0, layout.dataByte / 8);
    this.#bytes = new Uint8Array(buffer, layout.dataByte, (layout.slots + 2) * layout.stride);
    this.control = new Int32Array(buffer, layout.controlWord * 4, layout.controlWords);
    this.#writeSlots = new Array(layout.slots + 2).fill(undefined);
    this.#readSlots = new Array(layout.slots + 2).fill(undefined);
  }

  /** Allocates a new ring. Throws `TypeError`/`RangeError` for invalid options. */
  static create(options: FrameRingOptions): FrameRing {
    if (typeof options !== "object" || options === null) {
      throw new TypeError(
        `Cannot create a frame ring from "${
          String(options)
        }": expected an object with slots and slotBytes`,
      );
    }
    const slots = checkInteger(
      "slots",
      options.slots,
      (n) => n >= 1 && n <= MAX_SLOTS && (n & (n - 1)) === 0,
      `a power of two from 1 to ${MAX_SLOTS}`,
    );
    const slotBytes = checkInteger(
      "slotBytes",
      options.slotBytes,
      (n) => n >= 2 && n <= MAX_SLOT_BYTES && n % 2 === 0,
      `an even integer from 2 to ${MAX_SLOT_BYTES}`,
    );
    const controlWords = checkInteger(
      "controlWords",
      options.controlWords ?? 4,
      (n) => n >= 0 && n <= MAX_CONTROL_WORDS,
      `an integer from 0 to ${MAX_CONTROL_WORDS}`,
    );
    const startSeq = checkInteger(
      "startSeq",
      options.startSeq ?? 0,
      (n) => n >= -(2 ** 31) && n < 2 ** 32,
      "an int32 or uint32",
    ) | 0;
    const layout = layoutOf(slots, slotBytes, controlWords);
    if (layout.totalBytes > MAX_TOTAL_BYTES) {
      throw new RangeError(
        `Cannot create a frame ring of ${slots} slots of ${slotBytes} bytes: it needs "${layout.totalBytes}" bytes, expected at most ${MAX_TOTAL_BYTES}`,
      );
    }
    const buffer = new SharedArrayBuffer(layout.totalBytes);
    const h = new Int32Array(buffer, 0, HEADER_WORDS + slots);
    h[H_MAGIC] = MAGIC;
    h[H_VERSION] = VERSION;
    h[H_SLOTS] = slots;
    h[H_SLOT_BYTES] = slotBytes;
    h[H_CONTROL_WORDS] = controlWords;
    h[H_START_SEQ] = startSeq;
    h[H_WRITE_SEQ] = startSeq;
    h[H_READ_SEQ] = startSeq;
    h[H_HELD] = NONE;
    h[H_SPARE_A] = slots;
    h[H_SPARE_B] = slots + 1;
    for (let k = 0; k < slots; k++) h[layout.mapWord + k] = k;
    return new FrameRing(buffer, layout);
  }

  /** Opens a ring made by {@link FrameRing.create} (e.g. in another worker); reads the layout. */
  static attach(buffer: SharedArrayBuffer): FrameRing {
    if (!(buffer instanceof SharedArrayBuffer)) {
      throw new TypeError(
        `Cannot attach a frame ring to "${
          Object.prototype.toString.call(buffer)
        }": expected a SharedArrayBuffer`,
      );
    }
    const bad = (why: string) =>
      new TypeError(
        `Cannot attach a frame ring to a SharedArrayBuffer of ${buffer.byteLength} bytes: ${why}`,
      );
    if (buffer.byteLength < HEADER_WORDS * 4) throw bad("expected one made by FrameRing.create");
    const h = new Int32Array(buffer, 0, HEADER_WORDS);
    if (Atomics.load(h, H_MAGIC) !== MAGIC) throw bad("expected one made by FrameRing.create");
    const version = Atomics.load(h, H_VERSION);
    if (version !== VERSION) throw bad(`layout version "${version}", expected "${VERSION}"`);
    const slots = h[H_SLOTS]!;
    if (slots < 1 || (slots & (slots - 1)) !== 0) throw bad(`its header says "${slots}" slots`);
    const layout = layoutOf(slots, h[H_SLOT_BYTES]!, h[H_CONTROL_WORDS]!);
    if (layout.totalBytes !== buffer.byteLength) {
      throw bad(`its header describes ${layout.totalBytes} bytes`);
    }
    return new FrameRing(buffer, layout);
  }

  /** Frames published and not yet claimed or dropped. */
  get available(): number {
    return (Atomics.load(this.#h, H_WRITE_SEQ) - Atomics.load(this.#h, H_READ_SEQ)) | 0;
  }

  /** Frames dropped because the ring was full (mod 2³²). */
  get dropped(): number {
    return Atomics.load(this.#h, H_DROPPED) >>> 0;
  }

  /** Frames published since the ring was created (mod 2³²). */
  get published(): number {
    return (Atomics.load(this.#h, H_WRITE_SEQ) - this.#h[H_START_SEQ]!) >>> 0;
  }

  /** Whether the producer called {@link FrameRing.end}. */
  get ended(): boolean {
    return Atomics.load(this.#h, H_ENDED) !== 0;
  }

  // ---- producer side ----

  /**
   * Returns the slot to fill with the next frame, its metadata cleared. The slot is invisible to
   * the consumer until {@link FrameRing.publish}; calling `reserve()` again first returns the
   * same slot. Never waits; allocates nothing after the first use of each slot.
   */
  reserve(): WriteSlot {
    let slot = this.#reserved;
    if (slot === null) {
      const h = this.#h;
      const a = Atomics.load(h, H_SPARE_A);
      const index = a !== Atomics.load(h, H_HELD) ? a : Atomics.load(h, H_SPARE_B);
      slot = this.#writeSlot(index);
      this.#reserved = slot;
    }
    slot.reset();
    return slot;
  }

  /**
   * Publishes the reserved slot holding `length` bytes; when the ring is full the oldest
   * unconsumed frame is dropped (and counted) first. Wakes a waiting consumer.
   */
  publish(slot: WriteSlot, length: number): void {
    const own = this.#reserved;
    if (own === null || slot !== own) {
      throw new TypeError(
        `Cannot publish slot "${slot?.index}": expected the slot returned by reserve()`,
      );
    }
    if (!Number.isInteger(length) || length < 0 || length > this.slotBytes) {
      throw new RangeError(
        `Cannot publish a frame of length "${length}": expected an integer from 0 to ${this.slotBytes}`,
      );
    }
    own.setLength(length);
    const h = this.#h;
    const w = Atomics.load(h, H_WRITE_SEQ);
    for (;;) {
      const r = Atomics.load(h, H_READ_SEQ);
      if (((w - r) | 0) < this.slots) break;
      if (Atomics.compareExchange(h, H_READ_SEQ, r, (r + 1) | 0) === r) {
        Atomics.add(h, H_DROPPED, 1);
      }
    }
    const entry = this.#layout.mapWord + (w & this.#mask);
    const old = Atomics.load(h, entry);
    const a = Atomics.load(h, H_SPARE_A);
    Atomics.store(h, H_SPARE_A, a === own.index ? Atomics.load(h, H_SPARE_B) : a);
    Atomics.store(h, H_SPARE_B, old);
    Atomics.store(h, entry, own.index);
    this.#reserved = null;
    Atomics.store(h, H_WRITE_SEQ, (w + 1) | 0);
    this.#signal();
  }

  /** Marks the stream finished: waits return `"ended"` once the remaining frames are claimed. */
  end(): void {
    Atomics.store(this.#h, H_ENDED, 1);
    this.#signal();
  }

  /** Tells a waiting consumer that something changed (see the module notes on waiting). */
  #signal(): void {
    const h = this.#h;
    Atomics.add(h, H_EVENT, 1);
    Atomics.notify(h, H_EVENT);
  }

  // ---- consumer side ----

  /**
   * Claims the next frame, or returns `null` when there is none. Releases the previously claimed
   * slot either way. Never waits; allocates nothing after the first use of each slot (unless the
   * frame length differs from that slot's previous frame, which re-cuts the `data` view).
   */
  claim(): ReadSlot | null {
    const h = this.#h;
    const map = this.#layout.mapWord;
    for (;;) {
      const r = Atomics.load(h, H_READ_SEQ);
      if (r === Atomics.load(h, H_WRITE_SEQ)) {
        Atomics.store(h, H_HELD, NONE);
        return null;
      }
      const p = Atomics.load(h, map + (r & this.#mask));
      Atomics.store(h, H_HELD, p);
      if (Atomics.compareExchange(h, H_READ_SEQ, r, (r + 1) | 0) === r) {
        const slot = this.#readSlot(p);
        slot.load();
        return slot;
      }
    }
  }

  /**
   * Blocks in `Atomics.wait` until a frame is available, the ring ended, or `timeoutMs` passed.
   * Returns at once when a frame is already available.
   */
  waitForData(timeoutMs = Infinity): WaitResult {
    checkTimeout(timeoutMs);
    const h = this.#h;
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const e = Atomics.load(h, H_EVENT);
      if (Atomics.load(h, H_WRITE_SEQ) !== Atomics.load(h, H_READ_SEQ)) return "ok";
      if (Atomics.load(h, H_ENDED) !== 0) return "ended";
      const left = deadline - performance.now();
      if (left <= 0) return "timed-out";
      if (Atomics.wait(h, H_EVENT, e, left) === "ok") this.#wakeUps++;
    }
  }

  /**
   * Sleeps of {@link FrameRing.waitForData} on this object that the producer's signal ended (not
   * a timeout): says that the wake-up reached the sleeper (tests, diagnostics).
   */
  get wakeUps(): number {
    return this.#wakeUps;
  }

  /**
   * Like {@link FrameRing.waitForData} without blocking the thread (`Atomics.waitAsync`), for the
   * main thread. Holds a timer while waiting so the event loop stays alive — unless
   * `holdEventLoop` is false, for a caller that keeps the loop alive itself (one long-lived timer
   * instead of one per wait: the service's frame pump waits a hundred times a second).
   */
  async waitForDataAsync(timeoutMs = Infinity, holdEventLoop = true): Promise<WaitResult> {
    checkTimeout(timeoutMs);
    const h = this.#h;
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const e = Atomics.load(h, H_EVENT);
      if (Atomics.load(h, H_WRITE_SEQ) !== Atomics.load(h, H_READ_SEQ)) return "ok";
      if (Atomics.load(h, H_ENDED) !== 0) return "ended";
      const left = deadline - performance.now();
      if (left <= 0) return "timed-out";
      if (typeof Atomics.waitAsync !== "function") {
        // Runtimes without waitAsync: poll once a millisecond.
        await withTimer(new Promise(() => {}), Math.min(left, 1));
        continue;
      }
      const waiting = Atomics.waitAsync(h, H_EVENT, e, left);
      if (!waiting.async) continue;
      if (holdEventLoop) await withTimer(waiting.value, left);
      else await waiting.value;
    }
  }

  /**
   * Resolves once there is a frame to claim, the ring has ended, or {@link FrameRing.wake} was
   * called — at once when one of the first two holds already. For a main-thread consumer that
   * waits many times a second (the service's frame pump): no timeout and no timer. A timeout
   * costs the waiting thread ≈ 45 µs of CPU more per wake-up in Deno 2.9.5 (main-thread CPU per
   * wake-up over 2000 frames 10 ms apart, on the CI-class VM: 135–140 µs with a 200 ms timeout,
   * 90–95 µs without). A pending `Atomics.waitAsync` does not keep Deno's event loop alive, so the
   * caller holds something that does, and calls `wake()` when it stops waiting.
   */
  async nextAsync(): Promise<void> {
    const h = this.#h;
    const e = Atomics.load(h, H_EVENT);
    if (
      Atomics.load(h, H_WRITE_SEQ) !== Atomics.load(h, H_READ_SEQ) ||
      Atomics.load(h, H_ENDED) !== 0
    ) return;
    if (typeof Atomics.waitAsync !== "function") {
      // Runtimes without waitAsync: check again after a millisecond.
      await new Promise((resolve) => setTimeout(resolve, 1));
      return;
    }
    const waiting = Atomics.waitAsync(h, H_EVENT, e);
    if (waiting.async) await waiting.value;
  }

  /**
   * Wakes the consumer without publishing: {@link FrameRing.nextAsync} returns; `waitForData`
   * and `waitForDataAsync` look again and go on waiting.
   */
  wake(): void {
    this.#signal();
  }

  #writeSlot(index: number): RingWriteSlot {
    let slot = this.#writeSlots[index];
    if (slot === undefined) {
      slot = new RingWriteSlot(
        index,
        this.#slotBytes(index),
        this.#slotTimes(index),
        this.#h,
        this.#metaBase(index),
      );
      this.#writeSlots[index] = slot;
    }
    return slot;
  }

  #readSlot(index: number): RingReadSlot {
    let slot = this.#readSlots[index];
    if (slot === undefined) {
      slot = new RingReadSlot(
        index,
        this.#slotBytes(index),
        this.#slotTimes(index),
        this.#h,
        this.#metaBase(index),
      );
      this.#readSlots[index] = slot;
    }
    return slot;
  }

  #slotBytes(index: number): Uint8Array {
    const at = index * this.#layout.stride;
    return this.#bytes.subarray(at, at + this.slotBytes);
  }

  #slotTimes(index: number): Float64Array {
    const at = (this.#metaBase(index) + META_TIME_WORD) / 2;
    return this.#times.subarray(at, at + TIMESTAMPS);
  }

  #metaBase(index: number): number {
    return this.#layout.metaWord + index * META_WORDS;
  }
}

/** Resolves when `settled` does or after `ms`, holding a timer (event-loop work) meanwhile. */
function withTimer(settled: Promise<unknown>, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, Math.min(Math.ceil(ms), MAX_TIMER_MS));
    settled.then(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}
