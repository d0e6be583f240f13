/**
 * Opus encode and decode speed through FFI ({@link OpusEncoder}, {@link OpusDecoder}) against a
 * native C loop over the same libopus with the same settings (`opus_native.c`, built into a temp
 * directory with `cc -O2 … -lopus`), for every output and microphone preset.
 *
 * Both sides do the same work on the same input, a deterministic 10 s test signal (a chord with a
 * slow swell and a little noise for output presets, a voice-like harmonic series for microphone
 * presets):
 * - a collection pass (also the warm-up) encodes the 10 s frame by frame, keeps the packets and
 *   decodes them. Both sides must produce byte-identical packets and sample-identical PCM (same
 *   library, same settings → same bitstream), else the comparison is void and
 *   {@link BitstreamMismatchError} is thrown;
 * - timed passes: a fresh encoder codes `frames` frames (the signal looped) from `Int16Array`
 *   views into one reused `Uint8Array`; a fresh decoder decodes `frames` kept packets (looped)
 *   into one reused `Int16Array`. Encoders, decoders and every view are made before any clock
 *   starts. Unless given, `frames` makes a pass last about `passMs`.
 *
 * Machines here are shared and their speed drifts from moment to moment (the same chunk of work
 * varies by ±25 % on the 2-core VMs this was written on), so the native program stays alive and
 * takes one command per chunk (about `chunkMs` of work) on stdin: native and FFI chunks of the
 * same frames alternate (who goes first swaps every chunk and round), and each side's time for a
 * pass is the sum over chunks of that chunk's best of `rounds`. Both sides read the same C
 * library clocks around the same loops; the default clock is the CPU time of the timing thread
 * (`CLOCK_THREAD_CPUTIME_ID`), which ignores time spent descheduled and, in Deno, the CPU of V8's
 * compiler and GC helper threads. `clock: "process"` (`CLOCK_PROCESS_CPUTIME_ID`) counts those
 * too; `clock: "wall"` uses `CLOCK_MONOTONIC`.
 *
 * Standalone: `deno run --allow-ffi --allow-read --allow-write --allow-env --allow-run --allow-sys
 * scripts/bench/opus_codec.ts [--json] [--clock thread|process|wall] [--frames N] [--rounds N]
 * [--pass-ms N] [--chunk-ms N] [--preset DIR/NAME]…`.
 *
 * @module
 */

import { openLibrary } from "../../ffi/library.ts";
import { LineReader } from "./lines.ts";
import {
  OPUS_MAX_PACKET,
  OpusApplication,
  OpusBandwidth,
  OpusDecoder,
  OpusEncoder,
  OpusSignal,
  opusVersion,
} from "../../ffi/opus.ts";
import {
  type Direction,
  DIRECTIONS,
  encoderSettings,
  frameSamples,
  getPreset,
  type Preset,
  PRESET_NAMES,
  type PresetName,
} from "../../lib/quality.ts";
import { tone, voiceLike } from "../../tests/audio_util.ts";
import { type BenchResult, report, result } from "./report.ts";

/** A preset as "direction/name", e.g. "output/ultra". */
export type PresetRef = `${Direction}/${PresetName}`;

/** Every preset, output first. */
export const ALL_PRESETS: readonly PresetRef[] = DIRECTIONS.flatMap((d) =>
  PRESET_NAMES.map((n): PresetRef => `${d}/${n}`)
);

/** Knobs of {@link benchOpusCodec}. */
export interface OpusCodecOptions {
  /** Frames per timed pass, encode and decode alike (default: about `passMs` of work each). */
  readonly frames?: number;
  /** Target duration of one timed pass of one side in ms when `frames` is not given (200). */
  readonly passMs?: number;
  /** Target duration of one timed chunk in ms (default 10). */
  readonly chunkMs?: number;
  /** Timed passes per side and operation; each chunk's best counts (default 5). */
  readonly rounds?: number;
  /** Presets to measure (default {@link ALL_PRESETS}). */
  readonly presets?: readonly PresetRef[];
  /**
   * The clock: CPU time of the timing thread (default), of the whole process (in Deno that adds
   * V8's compiler and GC helper threads), or monotonic wall time.
   */
  readonly clock?: BenchClock;
  /** C compiler (default `$CC`, else `cc`). */
  readonly cc?: string;
}

/** The native and FFI sides coded the same input into different bits. */
export class BitstreamMismatchError extends Error {
  override name = "BitstreamMismatchError";
}

const SIGNAL_SECONDS = 10;
const RATE = 48000;
const GOAL = "ratio >= 0.97";

/** Which clock times a run. */
export type BenchClock = "thread" | "process" | "wall";

/** One timed chunk's figures, in nanoseconds of each clock. */
interface Run {
  readonly wallNs: number;
  readonly processNs: number;
  readonly threadNs: number;
  /** Packet bytes (encode) or samples per channel (decode) produced. */
  readonly count: number;
}

/** What the collection pass produced on one side. */
interface Collected {
  readonly packetBytes: number;
  readonly packetHash: number;
  readonly pcmHash: number;
}

// ---------------------------------------------------------------------------------------------
// Input signal.

/** Deterministic white noise in [-amplitude, amplitude) from a linear congruential generator. */
function noise(frames: number, amplitude: number, seed: number): Int16Array {
  const out = new Int16Array(frames);
  let state = seed;
  for (let i = 0; i < frames; i++) {
    state = (Math.imul(state, 1103515245) + 12345) & 0x7fffffff;
    out[i] = Math.round((state / 0x7fffffff - 0.5) * 2 * amplitude);
  }
  return out;
}

/** A chord (three tones) swelling at 0.25 Hz over noise: one music-like channel. */
function musicChannel(frames: number, freqs: readonly number[], seed: number): Float64Array {
  const parts = freqs.map((freq) => tone({ freq, frames, amplitude: 0.2 }));
  const hiss = noise(frames, 400, seed);
  const out = new Float64Array(frames);
  for (let i = 0; i < frames; i++) {
    const swell = 0.7 + 0.3 * Math.sin(2 * Math.PI * 0.25 * i / RATE);
    let v = hiss[i]!;
    for (const p of parts) v += p[i]! * swell;
    out[i] = v;
  }
  return out;
}

/** {@link SIGNAL_SECONDS} of interleaved test signal for a preset of `direction`. */
function testSignal(direction: Direction, channels: 1 | 2): Int16Array {
  const frames = SIGNAL_SECONDS * RATE;
  if (direction === "microphone") {
    const voice = voiceLike(frames);
    if (channels === 1) return voice;
    const out = new Int16Array(frames * 2);
    for (let i = 0; i < frames; i++) out[2 * i] = out[2 * i + 1] = voice[i]!;
    return out;
  }
  const left = musicChannel(frames, [220, 277.18, 329.63], 1);
  const right = musicChannel(frames, [246.94, 311.13, 369.99], 2);
  const out = new Int16Array(frames * channels);
  for (let i = 0; i < frames; i++) {
    if (channels === 1) out[i] = Math.round((left[i]! + right[i]!) / 2);
    else [out[2 * i], out[2 * i + 1]] = [Math.round(left[i]!), Math.round(right[i]!)];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Hashes (the same FNV-1a as opus_native.c).

const FNV_OFFSET = 2166136261;
const FNV_PRIME = 16777619;

function fnvPacket(h: number, p: Uint8Array): number {
  h = Math.imul(h ^ (p.length & 0xff), FNV_PRIME);
  h = Math.imul(h ^ ((p.length >>> 8) & 0xff), FNV_PRIME);
  for (let i = 0; i < p.length; i++) h = Math.imul(h ^ p[i]!, FNV_PRIME);
  return h;
}

function fnvPcm(h: number, pcm: Int16Array, n: number): number {
  for (let i = 0; i < n; i++) h = Math.imul(h ^ (pcm[i]! & 0xffff), FNV_PRIME);
  return h;
}

// ---------------------------------------------------------------------------------------------
// Clocks: the C library's, read the same way on both sides.

/** `clockid_t` values (Linux `<time.h>`). */
const CLOCK_MONOTONIC = 1;
const CLOCK_PROCESS_CPUTIME_ID = 2;
const CLOCK_THREAD_CPUTIME_ID = 3;

const libcSymbols = {
  // int clock_gettime(clockid_t clockid, struct timespec *tp);
  clock_gettime: { parameters: ["i32", "buffer"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

let libc: Deno.DynamicLibrary<typeof libcSymbols> | undefined;
/** A `struct timespec` (64-bit `tv_sec`, 64-bit `tv_nsec` on 64-bit Linux) as 32-bit words. */
const timespec = new Uint32Array(4);

function readClock(id: number): number {
  libc ??= openLibrary(
    { name: "libc", envVar: "KVM_AUDIO_LIBC", candidates: ["libc.so.6"] },
    libcSymbols,
  );
  if (libc.symbols.clock_gettime(id, timespec) !== 0) {
    throw new Error(`clock_gettime failed for clock ${id}: expected 0`);
  }
  return (timespec[0]! + timespec[1]! * 2 ** 32) * 1e9 + timespec[2]!;
}

type Stamp = { wall: number; process: number; thread: number };

function clocks(): Stamp {
  const wall = readClock(CLOCK_MONOTONIC);
  const process = readClock(CLOCK_PROCESS_CPUTIME_ID);
  return { wall, process, thread: readClock(CLOCK_THREAD_CPUTIME_ID) };
}

function since(start: Stamp, count: number): Run {
  const threadNs = readClock(CLOCK_THREAD_CPUTIME_ID) - start.thread;
  const processNs = readClock(CLOCK_PROCESS_CPUTIME_ID) - start.process;
  return { wallNs: readClock(CLOCK_MONOTONIC) - start.wall, processNs, threadNs, count };
}

// ---------------------------------------------------------------------------------------------
// FFI side.

/** Everything the FFI runs of one preset use, made before any clock starts. */
class FfiSide implements Disposable {
  readonly #p: Preset;
  readonly #frameSize: number;
  /** One view per frame of the input signal. */
  readonly #inputs: Int16Array[] = [];
  /** One view per kept packet (one per input frame). */
  readonly #packets: Uint8Array[] = [];
  readonly #packetOut = new Uint8Array(OPUS_MAX_PACKET);
  readonly #pcmOut: Int16Array;
  #enc: OpusEncoder | undefined;
  #dec: OpusDecoder | undefined;
  #encNext = -1;
  #decNext = -1;

  constructor(p: Preset, signal: Int16Array) {
    this.#p = p;
    this.#frameSize = frameSamples(p);
    const perFrame = this.#frameSize * p.channels;
    for (let off = 0; off + perFrame <= signal.length; off += perFrame) {
      this.#inputs.push(signal.subarray(off, off + perFrame));
    }
    this.#pcmOut = new Int16Array(perFrame);
  }

  /** Frames in one loop of the input (and packets kept). */
  get frames(): number {
    return this.#inputs.length;
  }

  #encoder(): OpusEncoder {
    const p = this.#p;
    return OpusEncoder.create(
      { channels: p.channels, application: p.application },
      encoderSettings(p),
    );
  }

  #decoder(): OpusDecoder {
    return OpusDecoder.create({ channels: this.#p.channels });
  }

  /**
   * Encodes one loop of the input, keeps the packets, decodes them; hashes both. Also returns
   * rough wall-clock costs per frame, which size the timed passes and chunks.
   */
  collect(): Collected & { encodeMs: number; decodeMs: number } {
    const kept: Uint8Array[] = [];
    let packetHash = FNV_OFFSET, packetBytes = 0;
    const t0 = performance.now();
    {
      using enc = this.#encoder();
      for (const input of this.#inputs) {
        const n = enc.encode(input, this.#frameSize, this.#packetOut);
        const packet = this.#packetOut.slice(0, n);
        kept.push(packet);
        packetHash = fnvPacket(packetHash, packet);
        packetBytes += n;
      }
    }
    const t1 = performance.now();
    const store = new Uint8Array(packetBytes);
    let off = 0;
    this.#packets.length = 0;
    for (const packet of kept) {
      store.set(packet, off);
      this.#packets.push(store.subarray(off, off + packet.length));
      off += packet.length;
    }
    let pcmHash = FNV_OFFSET;
    const t2 = performance.now();
    {
      using dec = this.#decoder();
      for (const packet of this.#packets) {
        const n = dec.decode(packet, this.#pcmOut, this.#frameSize);
        pcmHash = fnvPcm(pcmHash, this.#pcmOut, n * this.#p.channels);
      }
    }
    const t3 = performance.now();
    return {
      packetBytes,
      packetHash: packetHash >>> 0,
      pcmHash: pcmHash >>> 0,
      encodeMs: (t1 - t0) / this.frames,
      decodeMs: (t3 - t2) / this.frames,
    };
  }

  /**
   * Times encoding frames `from` to `from + count - 1` (frame i is input frame i modulo the
   * loop); `from` 0 starts a fresh encoder, any other must continue the previous chunk.
   */
  encode(from: number, count: number): Run {
    if (from === 0) {
      this.#enc?.close();
      this.#enc = this.#encoder();
    } else if (from !== this.#encNext || this.#enc === undefined) {
      throw new RangeError(`Invalid encode chunk at ${from}: expected ${this.#encNext} or 0`);
    }
    this.#encNext = from + count;
    const enc = this.#enc, inputs = this.#inputs, k = inputs.length;
    const size = this.#frameSize, out = this.#packetOut, end = from + count;
    const start = clocks();
    let bytes = 0;
    for (let i = from; i < end; i++) bytes += enc.encode(inputs[i % k]!, size, out);
    return since(start, bytes);
  }

  /**
   * Times decoding packets `from` to `from + count - 1` (packet i is kept packet i modulo the
   * loop); `from` 0 starts a fresh decoder, any other must continue the previous chunk.
   */
  decode(from: number, count: number): Run {
    if (from === 0) {
      this.#dec?.close();
      this.#dec = this.#decoder();
    } else if (from !== this.#decNext || this.#dec === undefined) {
      throw new RangeError(`Invalid decode chunk at ${from}: expected ${this.#decNext} or 0`);
    }
    this.#decNext = from + count;
    const dec = this.#dec, packets = this.#packets, k = packets.length;
    const size = this.#frameSize, out = this.#pcmOut, end = from + count;
    const start = clocks();
    let samples = 0;
    for (let i = from; i < end; i++) samples += dec.decode(packets[i % k]!, out, size);
    return since(start, samples);
  }

  [Symbol.dispose](): void {
    this.#enc?.close();
    this.#dec?.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Native side.

/** A running `opus_native` for one preset, driven chunk by chunk over its stdin. */
class NativeSide implements AsyncDisposable {
  readonly #child: Deno.ChildProcess;
  readonly #lines: LineReader;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #stderr: Promise<string>;
  readonly #what: string;
  readonly #encoder = new TextEncoder();

  constructor(binary: string, p: Preset, frames: number, input: string, what: string) {
    const args = [
      p.bitrate,
      p.channels,
      frameSamples(p),
      p.complexity,
      p.vbr ? 1 : 0,
      p.vbrConstraint ? 1 : 0,
      OpusSignal[p.signal],
      OpusBandwidth[p.maxBandwidth],
      p.dtx ? 1 : 0,
      p.inbandFec ? 1 : 0,
      p.packetLossPerc,
      OpusApplication[p.application],
      frames,
    ].map(String);
    this.#child = new Deno.Command(binary, {
      args: [...args, input],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#lines = new LineReader(this.#child.stdout);
    this.#writer = this.#child.stdin.getWriter();
    this.#stderr = new Response(this.#child.stderr).text();
    this.#what = what;
  }

  async #line(): Promise<Record<string, unknown>> {
    const line = await this.#lines.next();
    if (line === undefined) {
      const status = await this.#child.status;
      throw new Error(
        `Native Opus loop for ${this.#what} ended with code ${status.code}: ${
          (await this.#stderr).trim()
        }`,
      );
    }
    return JSON.parse(line) as Record<string, unknown>;
  }

  /** The collection pass's report (the program prints it unasked). */
  async collected(): Promise<Collected & { version: string }> {
    const r = await this.#line();
    return {
      version: String(r.version),
      packetBytes: Number(r.packetBytes),
      packetHash: Number(r.packetHash),
      pcmHash: Number(r.pcmHash),
    };
  }

  /** Times one chunk, as {@link FfiSide.encode} / {@link FfiSide.decode} do. */
  async run(op: Op, from: number, count: number): Promise<Run> {
    await this.#writer.write(this.#encoder.encode(`${op} ${from} ${count}\n`));
    const r = await this.#line();
    return {
      wallNs: Number(r.wallNs),
      processNs: Number(r.processNs),
      threadNs: Number(r.threadNs),
      count: Number(r.count),
    };
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.#writer.close().catch(() => {});
    await this.#lines.cancel();
    await this.#child.status;
    await this.#stderr.catch(() => "");
  }
}

/**
 * Compiles one C file of this directory into `binary` with `cc -O2`, linked against `libs`
 * (e.g. `["-lopus"]`); throws with the compiler's message when it cannot.
 */
export async function compileC(
  cc: string,
  file: string,
  binary: string,
  libs: readonly string[],
): Promise<string> {
  const source = decodeURIComponent(new URL(`./${file}`, import.meta.url).pathname);
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command(cc, {
      args: ["-O2", "-std=c11", "-Wall", "-o", binary, source, ...libs],
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (e) {
    throw new Error(`Cannot run C compiler "${cc}": expected gcc or clang (set CC)`, { cause: e });
  }
  if (!out.success) {
    throw new Error(
      `Cannot build ${source} with "${cc}" (code ${out.code}): ${
        new TextDecoder().decode(out.stderr).trim()
      }`,
    );
  }
  return binary;
}

// ---------------------------------------------------------------------------------------------
// Driver.

type Op = "encode" | "decode";
type Side = "native" | "ffi";
const OPS = ["encode", "decode"] as const;
const SIDES = ["native", "ffi"] as const;
const MAX_FRAMES = 10_000_000;
const CLOCKS = ["thread", "process", "wall"] as const satisfies readonly BenchClock[];

function checkCount(what: string, v: unknown, lo: number, hi: number): number {
  if (typeof v !== "number" || !Number.isInteger(v)) {
    throw new TypeError(`Invalid ${what} ${JSON.stringify(v)}: expected an integer`);
  }
  if (v < lo || v > hi) throw new RangeError(`Invalid ${what} ${v}: expected ${lo} to ${hi}`);
  return v;
}

function parsePresetRef(ref: unknown): Preset {
  if (typeof ref !== "string" || !(ALL_PRESETS as readonly string[]).includes(ref)) {
    throw new RangeError(
      `Invalid preset ${JSON.stringify(ref)}: expected one of ${ALL_PRESETS.join(", ")}`,
    );
  }
  const [direction, name] = ref.split("/") as [Direction, PresetName];
  return getPreset(direction, name);
}

function checkSame(what: string, native: Collected, ffi: Collected): void {
  const differs = (["packetBytes", "packetHash", "pcmHash"] as const).filter((k) =>
    native[k] !== ffi[k]
  );
  if (differs.length > 0) {
    const show = (c: Collected) =>
      `${c.packetBytes} bytes, packet hash ${c.packetHash}, PCM hash ${c.pcmHash}`;
    throw new BitstreamMismatchError(
      `Native and FFI Opus output differ for ${what} (${differs.join(", ")}): native ${
        show(native)
      }, FFI ${show(ffi)}; expected identical output, so the comparison is void`,
    );
  }
}

/** Chunk boundaries `[from, count]` covering `frames` frames. */
function chunksOf(frames: number, size: number): [number, number][] {
  const out: [number, number][] = [];
  for (let from = 0; from < frames; from += size) out.push([from, Math.min(size, frames - from)]);
  return out;
}

/** Times one operation of one preset on both sides; returns [FFI, native] frames per second. */
async function measure(
  what: string,
  op: Op,
  ffi: FfiSide,
  native: NativeSide,
  frames: number,
  chunkFrames: number,
  rounds: number,
  clock: BenchClock,
): Promise<[number, number]> {
  const chunks = chunksOf(frames, chunkFrames);
  // Let the JIT compile the timed FFI loop before any clock counts.
  for (const [from, count] of chunks.slice(0, 5)) ffi[op](from, count);
  const best: Record<Side, number[]> = {
    native: chunks.map(() => Infinity),
    ffi: chunks.map(() => Infinity),
  };
  let produced: number | undefined;
  for (let r = 0; r < rounds; r++) {
    const total: Record<Side, number> = { native: 0, ffi: 0 };
    const record = (side: Side, c: number, run: Run) => {
      best[side][c] = Math.min(best[side][c]!, run[`${clock}Ns`]);
      total[side] += run.count;
    };
    for (const [c, [from, count]] of chunks.entries()) {
      if ((c + r) % 2 === 0) {
        record("native", c, await native.run(op, from, count));
        record("ffi", c, ffi[op](from, count));
      } else {
        record("ffi", c, ffi[op](from, count));
        record("native", c, await native.run(op, from, count));
      }
    }
    produced ??= total.native;
    for (const side of SIDES) {
      if (total[side] !== produced) {
        throw new BitstreamMismatchError(
          `The ${side} ${op} pass ${r + 1} for ${what} produced ${total[side]} ${
            op === "encode" ? "bytes" : "samples"
          }: expected ${produced}, as the native side's first pass`,
        );
      }
    }
  }
  const fps = (side: Side) => frames / (best[side].reduce((a, b) => a + b, 0) / 1e9);
  return [fps("ffi"), fps("native")];
}

/**
 * Measures encode and decode frames per second through FFI against the native C loop, for each
 * preset: two results per preset, `opus encode (output/ultra)` and `opus decode (output/ultra)`,
 * value the FFI figure, baseline the native one, in frames per CPU second (or per second with
 * `clock: "wall"`). Throws {@link BitstreamMismatchError} when the two sides' packets or decoded
 * PCM differ.
 */
export async function benchOpusCodec(opts: OpusCodecOptions = {}): Promise<BenchResult[]> {
  const fixedFrames = opts.frames === undefined
    ? undefined
    : checkCount("frame count", opts.frames, 1, MAX_FRAMES);
  const passMs = checkCount("pass duration", opts.passMs ?? 200, 1, 600_000);
  const chunkMs = checkCount("chunk duration", opts.chunkMs ?? 10, 1, 600_000);
  const rounds = checkCount("round count", opts.rounds ?? 5, 1, 1000);
  const presets = (opts.presets ?? ALL_PRESETS).map((r) => [r, parsePresetRef(r)] as const);
  const clock = opts.clock ?? "thread";
  if (!(CLOCKS as readonly string[]).includes(clock)) {
    throw new RangeError(
      `Invalid clock ${JSON.stringify(clock)}: expected one of ${CLOCKS.join(", ")}`,
    );
  }
  const unit = clock === "wall" ? "frames/s" : "frames/CPU-s";

  const dir = await Deno.makeTempDir({ prefix: "kvm-audio-bench-opus-" });
  try {
    const binary = await compileC(
      opts.cc ?? Deno.env.get("CC") ?? "cc",
      "opus_native.c",
      `${dir}/opus_native`,
      ["-lopus"],
    );
    const out: BenchResult[] = [];
    const inputs = new Map<string, { path: string; signal: Int16Array }>();
    for (const [ref, p] of presets) {
      const direction = ref.split("/")[0] as Direction;
      const key = `${direction}-${p.channels === 2 ? "stereo" : "mono"}`;
      let input = inputs.get(key);
      if (input === undefined) {
        input = { path: `${dir}/${key}.raw`, signal: testSignal(direction, p.channels) };
        await Deno.writeFile(input.path, new Uint8Array(input.signal.buffer));
        inputs.set(key, input);
      }
      using ffi = new FfiSide(p, input.signal);
      await using native = new NativeSide(binary, p, ffi.frames, input.path, ref);

      const { version, ...nativeBits } = await native.collected();
      if (version !== opusVersion()) {
        throw new Error(
          `Native loop uses "${version}" but FFI loaded "${opusVersion()}": expected the same libopus`,
        );
      }
      const ffiBits = ffi.collect();
      checkSame(ref, nativeBits, ffiBits);

      for (const op of OPS) {
        const perFrameMs = op === "encode" ? ffiBits.encodeMs : ffiBits.decodeMs;
        const frames = fixedFrames ??
          Math.min(MAX_FRAMES, Math.max(100, Math.round(passMs / perFrameMs)));
        const chunkFrames = Math.min(frames, Math.max(1, Math.round(chunkMs / perFrameMs)));
        const [value, baseline] = await measure(
          ref,
          op,
          ffi,
          native,
          frames,
          chunkFrames,
          rounds,
          clock,
        );
        out.push(result(`opus ${op} (${ref})`, value, unit, baseline, GOAL));
      }
    }
    return out;
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

function flag(name: string): number | undefined {
  const i = Deno.args.indexOf(name);
  if (i < 0) return undefined;
  const v = Number(Deno.args[i + 1]);
  if (!Number.isInteger(v) || v < 1) {
    throw new RangeError(
      `Cannot use ${name} "${Deno.args[i + 1]}": expected an integer of 1 or more`,
    );
  }
  return v;
}

if (import.meta.main) {
  const options: { -readonly [K in keyof OpusCodecOptions]: OpusCodecOptions[K] } = {};
  const frames = flag("--frames"), rounds = flag("--rounds");
  const passMs = flag("--pass-ms"), chunkMs = flag("--chunk-ms");
  if (frames !== undefined) options.frames = frames;
  if (rounds !== undefined) options.rounds = rounds;
  if (passMs !== undefined) options.passMs = passMs;
  if (chunkMs !== undefined) options.chunkMs = chunkMs;
  const clock = Deno.args[Deno.args.indexOf("--clock") + 1];
  if (Deno.args.includes("--clock")) options.clock = (clock ?? "") as BenchClock;
  const presets = Deno.args.flatMap((a, i) =>
    Deno.args[i - 1] === "--preset" ? [a as PresetRef] : []
  );
  if (presets.length > 0) options.presets = presets;
  report(await benchOpusCodec(options), Deno.args.includes("--json"));
}
