/**
 * libspeexdsp's resampler for interleaved 16-bit PCM: a thin, allocation-free binding of
 * `speex_resampler_process_interleaved_int` over caller-owned buffers.
 *
 * ```ts
 * using r = new Resampler({ channels: 2, inRate: 44100, outRate: 48000 });
 * const out = new Int16Array(r.outputFramesFor(441) * 2);
 * const { inFrames, outFrames } = r.process(input, out);
 * ```
 *
 * @module
 */

import { cString, NativeState, openLibrary, orphanPointer } from "./library.ts";

/** Lowest resampler quality (`SPEEX_RESAMPLER_QUALITY_MIN`). */
export const SPEEX_RESAMPLER_QUALITY_MIN = 0;
/** Highest resampler quality (`SPEEX_RESAMPLER_QUALITY_MAX`). */
export const SPEEX_RESAMPLER_QUALITY_MAX = 10;
/** Speex's recommended quality for VoIP (`SPEEX_RESAMPLER_QUALITY_VOIP`). */
export const SPEEX_RESAMPLER_QUALITY_VOIP = 3;
/** Speex's recommended quality for desktop audio (`SPEEX_RESAMPLER_QUALITY_DESKTOP`). */
export const SPEEX_RESAMPLER_QUALITY_DESKTOP = 5;

/** `RESAMPLER_ERR_SUCCESS` */
export const RESAMPLER_ERR_SUCCESS = 0;
/** `RESAMPLER_ERR_ALLOC_FAILED` */
export const RESAMPLER_ERR_ALLOC_FAILED = 1;
/** `RESAMPLER_ERR_BAD_STATE` */
export const RESAMPLER_ERR_BAD_STATE = 2;
/** `RESAMPLER_ERR_INVALID_ARG` */
export const RESAMPLER_ERR_INVALID_ARG = 3;
/** `RESAMPLER_ERR_PTR_OVERLAP` */
export const RESAMPLER_ERR_PTR_OVERLAP = 4;
/** `RESAMPLER_ERR_OVERFLOW` */
export const RESAMPLER_ERR_OVERFLOW = 5;

const ERROR_NAMES: Readonly<Record<number, string>> = {
  [RESAMPLER_ERR_SUCCESS]: "RESAMPLER_ERR_SUCCESS",
  [RESAMPLER_ERR_ALLOC_FAILED]: "RESAMPLER_ERR_ALLOC_FAILED",
  [RESAMPLER_ERR_BAD_STATE]: "RESAMPLER_ERR_BAD_STATE",
  [RESAMPLER_ERR_INVALID_ARG]: "RESAMPLER_ERR_INVALID_ARG",
  [RESAMPLER_ERR_PTR_OVERLAP]: "RESAMPLER_ERR_PTR_OVERLAP",
  [RESAMPLER_ERR_OVERFLOW]: "RESAMPLER_ERR_OVERFLOW",
};

/** Lowest sample rate accepted, in Hz. */
export const MIN_RATE = 8000;
/** Highest sample rate accepted, in Hz. */
export const MAX_RATE = 384000;
/** Most interleaved channels accepted. */
export const MAX_CHANNELS = 8;

const symbols = {
  // SpeexResamplerState *speex_resampler_init(spx_uint32_t nb_channels, spx_uint32_t in_rate,
  //                                           spx_uint32_t out_rate, int quality, int *err);
  speex_resampler_init: {
    parameters: [
      "u32", // spx_uint32_t nb_channels
      "u32", // spx_uint32_t in_rate
      "u32", // spx_uint32_t out_rate
      "i32", // int quality
      "buffer", // int *err
    ],
    result: "pointer", // SpeexResamplerState *
  },
  // void speex_resampler_destroy(SpeexResamplerState *st);
  speex_resampler_destroy: {
    parameters: ["pointer"], // SpeexResamplerState *st
    result: "void",
  },
  // int speex_resampler_process_interleaved_int(SpeexResamplerState *st, const spx_int16_t *in,
  //     spx_uint32_t *in_len, spx_int16_t *out, spx_uint32_t *out_len);
  speex_resampler_process_interleaved_int: {
    parameters: [
      "pointer", // SpeexResamplerState *st
      "buffer", // const spx_int16_t *in
      "buffer", // spx_uint32_t *in_len (frames in, frames consumed out)
      "buffer", // spx_int16_t *out
      "buffer", // spx_uint32_t *out_len (room in frames in, frames written out)
    ],
    result: "i32",
  },
  // int speex_resampler_set_rate(SpeexResamplerState *st, spx_uint32_t in_rate,
  //                              spx_uint32_t out_rate);
  speex_resampler_set_rate: {
    parameters: [
      "pointer", // SpeexResamplerState *st
      "u32", // spx_uint32_t in_rate
      "u32", // spx_uint32_t out_rate
    ],
    result: "i32",
  },
  // int speex_resampler_get_input_latency(SpeexResamplerState *st);
  speex_resampler_get_input_latency: {
    parameters: ["pointer"], // SpeexResamplerState *st
    result: "i32",
  },
  // int speex_resampler_get_output_latency(SpeexResamplerState *st);
  speex_resampler_get_output_latency: {
    parameters: ["pointer"], // SpeexResamplerState *st
    result: "i32",
  },
  // int speex_resampler_skip_zeros(SpeexResamplerState *st);
  speex_resampler_skip_zeros: {
    parameters: ["pointer"], // SpeexResamplerState *st
    result: "i32",
  },
  // int speex_resampler_reset_mem(SpeexResamplerState *st);
  speex_resampler_reset_mem: {
    parameters: ["pointer"], // SpeexResamplerState *st
    result: "i32",
  },
  // const char *speex_resampler_strerror(int err);
  speex_resampler_strerror: {
    parameters: ["i32"], // int err
    result: "pointer", // const char *
  },
} as const satisfies Deno.ForeignLibraryInterface;

type Speex = Deno.DynamicLibrary<typeof symbols>["symbols"];

let library: Deno.DynamicLibrary<typeof symbols> | undefined;

/** Opens libspeexdsp on first use; later calls reuse the same handle. */
function speex(): Speex {
  library ??= openLibrary({
    name: "libspeexdsp",
    envVar: "KVM_AUDIO_LIBSPEEXDSP",
    candidates: ["libspeexdsp.so.1", "libspeexdsp.so"],
  }, symbols);
  return library.symbols;
}

/** A libspeexdsp resampler call returned an error code. */
export class SpeexError extends Error {
  /** Always "SpeexError". */
  override name = "SpeexError";
  /** The `RESAMPLER_ERR_*` code returned by the C function. */
  readonly code: number;
  /** Name of the C function that failed, e.g. "speex_resampler_set_rate". */
  readonly fn: string;

  /** Builds the error for C function `fn` returning `code`, with optional `context`. */
  constructor(fn: string, code: number, context?: string) {
    // libspeexdsp 1.2.1's strerror predates RESAMPLER_ERR_OVERFLOW and calls it "Unknown
    // error", so the constant's name is given beside the library's text.
    const text = cString(speex().speex_resampler_strerror(code));
    const where = context === undefined ? "" : ` (${context})`;
    const id = ERROR_NAMES[code] === undefined ? "" : `${ERROR_NAMES[code]}, `;
    super(`${fn} failed${where}: ${text} (${id}code ${code})`);
    this.code = code;
    this.fn = fn;
  }
}

/** Options of {@link Resampler}. */
export interface ResamplerOptions {
  /** Interleaved channels, 1 to 8. */
  readonly channels: number;
  /** Input sample rate in Hz, an integer from 8000 to 384000. */
  readonly inRate: number;
  /** Output sample rate in Hz, an integer from 8000 to 384000. */
  readonly outRate: number;
  /** Quality from 0 (fastest) to 10 (best); 5 when omitted. */
  readonly quality?: number;
}

/** Frames consumed and produced by one {@link Resampler.process} call. */
export interface ProcessResult {
  /** Input frames consumed; fewer than supplied only when `output` ran out of room. */
  readonly inFrames: number;
  /** Output frames written to the start of `output`. */
  readonly outFrames: number;
}

function checkInteger(what: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number") {
    throw new TypeError(`Cannot use ${what} "${String(value)}": expected a number`);
  }
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(
      `Cannot use ${what} "${value}": expected an integer from ${min} to ${max}`,
    );
  }
  return value;
}

const checkRate = (what: string, value: unknown) => checkInteger(what, value, MIN_RATE, MAX_RATE);

const destroyState = (state: Deno.PointerObject) => speex().speex_resampler_destroy(state);

/**
 * A streaming sample-rate converter for interleaved int16 audio (libspeexdsp).
 *
 * The state carries filter history between calls, so feed one continuous stream per instance.
 * Buffers are caller-owned and may live on a `SharedArrayBuffer`; nothing is copied.
 */
export class Resampler extends NativeState {
  readonly #channels: number;
  readonly #quality: number;
  #inRate: number;
  #outRate: number;
  // Per-instance out-parameters so that process() allocates nothing for the C call.
  readonly #inLen = new Uint32Array(1);
  readonly #outLen = new Uint32Array(1);

  /**
   * Creates a resampler.
   *
   * @throws {TypeError} when an option is not a number
   * @throws {RangeError} when an option is out of range
   * @throws {SpeexError} when libspeexdsp refuses to create the state
   */
  constructor(options: ResamplerOptions) {
    if (typeof options !== "object" || options === null) {
      throw new TypeError(
        `Cannot create a resampler from "${String(options)}": expected an options object`,
      );
    }
    const channels = checkInteger("channels", options.channels, 1, MAX_CHANNELS);
    const inRate = checkRate("input rate", options.inRate);
    const outRate = checkRate("output rate", options.outRate);
    const quality = checkInteger(
      "quality",
      options.quality ?? SPEEX_RESAMPLER_QUALITY_DESKTOP,
      SPEEX_RESAMPLER_QUALITY_MIN,
      SPEEX_RESAMPLER_QUALITY_MAX,
    );
    const err = new Int32Array(1);
    const state = speex().speex_resampler_init(channels, inRate, outRate, quality, err);
    if (state === null || err[0] !== RESAMPLER_ERR_SUCCESS) {
      if (state !== null) speex().speex_resampler_destroy(state);
      throw new SpeexError(
        "speex_resampler_init",
        state === null && err[0] === RESAMPLER_ERR_SUCCESS ? RESAMPLER_ERR_ALLOC_FAILED : err[0]!,
        `${channels} channels, ${inRate} Hz to ${outRate} Hz, quality ${quality}`,
      );
    }
    super(state, destroyState, "Resampler");
    this.#channels = channels;
    this.#quality = quality;
    this.#inRate = inRate;
    this.#outRate = outRate;
  }

  /** Same as `new Resampler(options)`. */
  static create(options: ResamplerOptions): Resampler {
    return new Resampler(options);
  }

  /** Interleaved channel count. */
  get channels(): number {
    return this.#channels;
  }

  /** Quality, 0 to 10. */
  get quality(): number {
    return this.#quality;
  }

  /** Current input rate in Hz. */
  get inRate(): number {
    return this.#inRate;
  }

  /** Current output rate in Hz. */
  get outRate(): number {
    return this.#outRate;
  }

  /**
   * Resamples interleaved frames from `input` into the start of `output`.
   *
   * All of `input` is consumed when `output` has room for {@link outputFramesFor}
   * `(input frames)`; otherwise the call stops when `output` is full and `inFrames` says how far
   * it got, and the caller passes the rest again.
   *
   * @throws {TypeError} when a buffer is not an Int16Array
   * @throws {RangeError} when a buffer's length is not a whole number of frames, or the two
   *   buffers overlap
   * @throws {SpeexError} when libspeexdsp reports an error
   */
  process(input: Int16Array, output: Int16Array): ProcessResult {
    const state = this.live("process audio");
    if (!(input instanceof Int16Array)) {
      throw new TypeError(`Cannot resample "${String(input)}": expected an Int16Array input`);
    }
    if (!(output instanceof Int16Array)) {
      throw new TypeError(`Cannot resample into "${String(output)}": expected an Int16Array`);
    }
    const ch = this.#channels;
    if (input.length % ch !== 0) {
      throw new RangeError(
        `Cannot resample "${input.length}" input samples: expected a multiple of ${ch} channels`,
      );
    }
    if (output.length % ch !== 0) {
      throw new RangeError(
        `Cannot resample into "${output.length}" output samples: expected a multiple of ${ch} channels`,
      );
    }
    if (
      input.buffer === output.buffer && input.length > 0 && output.length > 0 &&
      input.byteOffset < output.byteOffset + output.byteLength &&
      output.byteOffset < input.byteOffset + input.byteLength
    ) {
      throw new RangeError(
        `Cannot resample bytes ${input.byteOffset}..${
          input.byteOffset + input.byteLength
        } into overlapping bytes ${output.byteOffset}..${
          output.byteOffset + output.byteLength
        } of the same buffer: expected separate input and output`,
      );
    }
    const inLen = this.#inLen, outLen = this.#outLen;
    inLen[0] = input.length / ch;
    outLen[0] = output.length / ch;
    const rc = speex().speex_resampler_process_interleaved_int(state, input, inLen, output, outLen);
    if (rc !== RESAMPLER_ERR_SUCCESS) {
      throw new SpeexError("speex_resampler_process_interleaved_int", rc);
    }
    return { inFrames: inLen[0], outFrames: outLen[0] };
  }

  /**
   * Output frames that are always enough for `inFrames` input frames in one {@link process}
   * call (an upper bound, including input held back after a rate change; not an exact count).
   *
   * @throws {RangeError} when `inFrames` is not a non-negative integer
   */
  outputFramesFor(inFrames: number): number {
    checkInteger("input frame count", inFrames, 0, 0xffff_ffff);
    // A window of n input frames holds at most ceil(n·out/in) + 1 output instants; after a rate
    // change speex may also replay up to one input latency of retained samples first.
    const n = inFrames + this.inputLatency;
    return Math.ceil(n * this.#outRate / this.#inRate) + 1;
  }

  /** Filter delay in input frames. */
  get inputLatency(): number {
    return speex().speex_resampler_get_input_latency(this.live("read the latency"));
  }

  /** Filter delay in output frames. */
  get outputLatency(): number {
    return speex().speex_resampler_get_output_latency(this.live("read the latency"));
  }

  /** Clears the filter history, as if the stream started again. */
  reset(): void {
    const rc = speex().speex_resampler_reset_mem(this.live("reset"));
    if (rc !== RESAMPLER_ERR_SUCCESS) throw new SpeexError("speex_resampler_reset_mem", rc);
  }

  /**
   * Drops the filter's leading delay so the first output sample lines up with the first input
   * sample. Call right after construction or {@link reset}, before any audio.
   */
  skipZeros(): void {
    const rc = speex().speex_resampler_skip_zeros(this.live("skip zeros"));
    if (rc !== RESAMPLER_ERR_SUCCESS) throw new SpeexError("speex_resampler_skip_zeros", rc);
  }

  /**
   * Changes the rates on the fly, keeping the filter history (for clock-drift correction).
   *
   * libspeexdsp can refuse a change whose fractional position would overflow 32 bits
   * (`RESAMPLER_ERR_OVERFLOW`, possible only when both reduced ratio denominators are large). It
   * leaves its state half-updated in that case, so this method then clears the history, goes
   * back to the previous rates and throws: the resampler stays usable at the old rates.
   *
   * @throws {TypeError} when a rate is not a number
   * @throws {RangeError} when a rate is not an integer from 8000 to 384000
   * @throws {SpeexError} when libspeexdsp refuses the change
   */
  setRate(inRate: number, outRate: number): void {
    const state = this.live("set the rate");
    checkRate("input rate", inRate);
    checkRate("output rate", outRate);
    const s = speex();
    const rc = s.speex_resampler_set_rate(state, inRate, outRate);
    if (rc === RESAMPLER_ERR_SUCCESS) {
      this.#inRate = inRate;
      this.#outRate = outRate;
      return;
    }
    // With the fractional positions zeroed the conversion back cannot overflow, and since the
    // state now records the new rates, set_rate rebuilds the filter for the old ones.
    s.speex_resampler_reset_mem(state);
    const back = s.speex_resampler_set_rate(state, this.#inRate, this.#outRate);
    if (back !== RESAMPLER_ERR_SUCCESS) {
      // Cannot happen by the reasoning above; never leave an inconsistent state reachable.
      this.close();
    }
    throw new SpeexError(
      "speex_resampler_set_rate",
      rc,
      `${this.#inRate} Hz to ${this.#outRate} Hz changed to ${inRate} Hz to ${outRate} Hz`,
    );
  }

  /**
   * Frees the native state of a resampler whose thread was terminated, given its
   * {@link Resampler.orphanToken}. Only once that thread is gone and the token was not cleared.
   */
  static destroyOrphan(token: bigint): void {
    const state = orphanPointer(token);
    if (state !== null) destroyState(state);
  }
}
