/**
 * libopus through Deno FFI: {@link OpusEncoder}, {@link OpusDecoder} and packet inspection.
 *
 * Encode reads from, and decode writes into, caller-owned typed arrays — they may be views onto a
 * SharedArrayBuffer ring slot, which libopus then reads or writes in place (no copies).
 *
 * `opus_encoder_ctl`/`opus_decoder_ctl` are variadic in C. They are declared here once per fixed
 * shape (`int` argument, `int*` argument, no argument) under alias names; on x86_64 and aarch64
 * Linux a variadic `int`/pointer argument is passed exactly like a fixed one.
 *
 * @module
 */

import { cString, NativeState, openLibrary, orphanPointer } from "./library.ts";

// ---------------------------------------------------------------------------------------------
// C constants (opus_defines.h). Named, never bare numbers.

/** Return codes of libopus. */
export const OPUS_OK = 0;
export const OPUS_BAD_ARG = -1;
export const OPUS_BUFFER_TOO_SMALL = -2;
export const OPUS_INTERNAL_ERROR = -3;
export const OPUS_INVALID_PACKET = -4;
export const OPUS_UNIMPLEMENTED = -5;
export const OPUS_INVALID_STATE = -6;
export const OPUS_ALLOC_FAIL = -7;

/** `OPUS_AUTO` and `OPUS_BITRATE_MAX`. */
export const OPUS_AUTO = -1000;
export const OPUS_BITRATE_MAX = -1;

/** Encoder/decoder control requests (`OPUS_SET_*_REQUEST` / `OPUS_GET_*_REQUEST`). */
export const OpusRequest = {
  SET_APPLICATION: 4000,
  GET_APPLICATION: 4001,
  SET_BITRATE: 4002,
  GET_BITRATE: 4003,
  SET_MAX_BANDWIDTH: 4004,
  GET_MAX_BANDWIDTH: 4005,
  SET_VBR: 4006,
  GET_VBR: 4007,
  SET_BANDWIDTH: 4008,
  GET_BANDWIDTH: 4009,
  SET_COMPLEXITY: 4010,
  GET_COMPLEXITY: 4011,
  SET_INBAND_FEC: 4012,
  GET_INBAND_FEC: 4013,
  SET_PACKET_LOSS_PERC: 4014,
  GET_PACKET_LOSS_PERC: 4015,
  SET_DTX: 4016,
  GET_DTX: 4017,
  SET_VBR_CONSTRAINT: 4020,
  GET_VBR_CONSTRAINT: 4021,
  SET_FORCE_CHANNELS: 4022,
  GET_FORCE_CHANNELS: 4023,
  SET_SIGNAL: 4024,
  GET_SIGNAL: 4025,
  GET_LOOKAHEAD: 4027,
  RESET_STATE: 4028,
  GET_SAMPLE_RATE: 4029,
  GET_FINAL_RANGE: 4031,
  SET_GAIN: 4034,
  GET_LAST_PACKET_DURATION: 4039,
  SET_PREDICTION_DISABLED: 4042,
  GET_PREDICTION_DISABLED: 4043,
  GET_GAIN: 4045,
  GET_IN_DTX: 4049,
} as const;

/** `OPUS_APPLICATION_*`. */
export const OpusApplication = {
  voip: 2048,
  audio: 2049,
  restrictedLowDelay: 2051,
} as const;
export type OpusApplicationName = keyof typeof OpusApplication;

/** `OPUS_SIGNAL_*` (with `OPUS_AUTO`). */
export const OpusSignal = { auto: OPUS_AUTO, voice: 3001, music: 3002 } as const;
export type OpusSignalName = keyof typeof OpusSignal;

/** `OPUS_BANDWIDTH_*`. */
export const OpusBandwidth = {
  narrowband: 1101,
  mediumband: 1102,
  wideband: 1103,
  superwideband: 1104,
  fullband: 1105,
} as const;
export type OpusBandwidthName = keyof typeof OpusBandwidth;

/** Sample rates libopus accepts. */
export const OPUS_RATES = [8000, 12000, 16000, 24000, 48000] as const;
/**
 * Frame durations (ms) an Opus encoder accepts for one `opus_encode` call (80–120 ms since
 * libopus 1.2: packets of several 20 ms frames).
 */
export const OPUS_FRAME_MS = [2.5, 5, 10, 20, 40, 60, 80, 100, 120] as const;
/** Largest Opus packet (RFC 6716 §3.4 R2: 1275 bytes per frame, up to 120 ms). */
export const OPUS_MAX_PACKET = 1275 * 3 + 7;
/** Largest frame, 120 ms, in samples per channel at 48 kHz. */
export const OPUS_MAX_FRAME_SAMPLES_48K = 5760;

// ---------------------------------------------------------------------------------------------
// Symbol table.

const symbols = {
  // const char *opus_get_version_string(void);
  opus_get_version_string: { parameters: [], result: "pointer" },
  // const char *opus_strerror(int error);
  opus_strerror: { parameters: ["i32"], result: "pointer" },
  // OpusEncoder *opus_encoder_create(opus_int32 Fs, int channels, int application, int *error);
  opus_encoder_create: { parameters: ["i32", "i32", "i32", "buffer"], result: "pointer" },
  // void opus_encoder_destroy(OpusEncoder *st);
  opus_encoder_destroy: { parameters: ["pointer"], result: "void" },
  // opus_int32 opus_encode(OpusEncoder *st, const opus_int16 *pcm, int frame_size,
  //                        unsigned char *data, opus_int32 max_data_bytes);
  opus_encode: { parameters: ["pointer", "buffer", "i32", "buffer", "i32"], result: "i32" },
  // int opus_encoder_ctl(OpusEncoder *st, int request, opus_int32 value);   (SET requests)
  opus_encoder_ctl_set: {
    name: "opus_encoder_ctl",
    parameters: ["pointer", "i32", "i32"],
    result: "i32",
  },
  // int opus_encoder_ctl(OpusEncoder *st, int request, opus_int32 *value);  (GET requests)
  opus_encoder_ctl_get: {
    name: "opus_encoder_ctl",
    parameters: ["pointer", "i32", "buffer"],
    result: "i32",
  },
  // int opus_encoder_ctl(OpusEncoder *st, int request);                     (OPUS_RESET_STATE)
  opus_encoder_ctl_none: {
    name: "opus_encoder_ctl",
    parameters: ["pointer", "i32"],
    result: "i32",
  },
  // OpusDecoder *opus_decoder_create(opus_int32 Fs, int channels, int *error);
  opus_decoder_create: { parameters: ["i32", "i32", "buffer"], result: "pointer" },
  // void opus_decoder_destroy(OpusDecoder *st);
  opus_decoder_destroy: { parameters: ["pointer"], result: "void" },
  // int opus_decode(OpusDecoder *st, const unsigned char *data, opus_int32 len,
  //                 opus_int16 *pcm, int frame_size, int decode_fec);
  opus_decode: {
    parameters: ["pointer", "buffer", "i32", "buffer", "i32", "i32"],
    result: "i32",
  },
  // int opus_decoder_ctl(OpusDecoder *st, int request, opus_int32 value);
  opus_decoder_ctl_set: {
    name: "opus_decoder_ctl",
    parameters: ["pointer", "i32", "i32"],
    result: "i32",
  },
  // int opus_decoder_ctl(OpusDecoder *st, int request, opus_int32 *value);
  opus_decoder_ctl_get: {
    name: "opus_decoder_ctl",
    parameters: ["pointer", "i32", "buffer"],
    result: "i32",
  },
  // int opus_decoder_ctl(OpusDecoder *st, int request);
  opus_decoder_ctl_none: {
    name: "opus_decoder_ctl",
    parameters: ["pointer", "i32"],
    result: "i32",
  },
  // int opus_packet_get_nb_frames(const unsigned char packet[], opus_int32 len);
  opus_packet_get_nb_frames: { parameters: ["buffer", "i32"], result: "i32" },
  // int opus_packet_get_samples_per_frame(const unsigned char *data, opus_int32 Fs);
  opus_packet_get_samples_per_frame: { parameters: ["buffer", "i32"], result: "i32" },
  // int opus_packet_get_bandwidth(const unsigned char *data);
  opus_packet_get_bandwidth: { parameters: ["buffer"], result: "i32" },
  // int opus_packet_get_nb_channels(const unsigned char *data);
  opus_packet_get_nb_channels: { parameters: ["buffer"], result: "i32" },
  // int opus_packet_get_nb_samples(const unsigned char packet[], opus_int32 len, opus_int32 Fs);
  opus_packet_get_nb_samples: { parameters: ["buffer", "i32", "i32"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

let lib: Deno.DynamicLibrary<typeof symbols> | undefined;

function opus(): Deno.DynamicLibrary<typeof symbols>["symbols"] {
  lib ??= openLibrary(
    {
      name: "libopus",
      envVar: "KVM_AUDIO_LIBOPUS",
      candidates: ["libopus.so.0", "libopus.so"],
    },
    symbols,
  );
  return lib.symbols;
}

/** The libopus version string, e.g. "libopus 1.3.1". */
export function opusVersion(): string {
  return cString(opus().opus_get_version_string());
}

// ---------------------------------------------------------------------------------------------
// Errors and argument checks.

/** A libopus call returned an error code. */
export class OpusError extends Error {
  override name = "OpusError";
  /** The negative `OPUS_*` error code. */
  readonly code: number;
  /** The C function that failed. */
  readonly fn: string;

  constructor(fn: string, code: number, detail?: string) {
    const text = cString(opus().opus_strerror(code));
    super(`${fn} failed${detail ? ` (${detail})` : ""}: ${text} (${code})`);
    this.code = code;
    this.fn = fn;
  }
}

function checkInt(what: string, v: unknown, lo: number, hi: number): number {
  if (typeof v !== "number" || !Number.isInteger(v)) {
    throw new TypeError(`Invalid ${what} ${JSON.stringify(v)}: expected an integer`);
  }
  if (v < lo || v > hi) throw new RangeError(`Invalid ${what} ${v}: expected ${lo} to ${hi}`);
  return v;
}

function checkBool(what: string, v: unknown): boolean {
  if (typeof v !== "boolean") {
    throw new TypeError(`Invalid ${what} ${JSON.stringify(v)}: expected true or false`);
  }
  return v;
}

function checkName<T extends Record<string, number>>(what: string, table: T, v: unknown): keyof T {
  if (typeof v !== "string" || !Object.hasOwn(table, v)) {
    throw new RangeError(
      `Invalid ${what} ${JSON.stringify(v)}: expected one of ${Object.keys(table).join(", ")}`,
    );
  }
  return v as keyof T;
}

function nameOf<T extends Record<string, number>>(table: T, code: number): keyof T {
  for (const k in table) if (table[k] === code) return k as keyof T;
  throw new RangeError(`Unknown libopus value ${code}: expected one of ${Object.values(table)}`);
}

function checkRate(v: unknown): number {
  if (typeof v !== "number" || !(OPUS_RATES as readonly number[]).includes(v)) {
    throw new RangeError(
      `Invalid sample rate ${JSON.stringify(v)}: expected one of ${OPUS_RATES.join(", ")}`,
    );
  }
  return v;
}

function checkChannels(v: unknown): 1 | 2 {
  return checkInt("channel count", v, 1, 2) as 1 | 2;
}

function checkInt16Array(what: string, v: unknown): Int16Array {
  if (!(v instanceof Int16Array)) throw new TypeError(`Invalid ${what}: expected an Int16Array`);
  return v;
}

function checkBytes(what: string, v: unknown): Uint8Array {
  if (!(v instanceof Uint8Array)) throw new TypeError(`Invalid ${what}: expected a Uint8Array`);
  return v;
}

/** Frame sizes (samples per channel) an encoder at `rate` accepts. */
export function validFrameSizes(rate: number): number[] {
  return OPUS_FRAME_MS.map((ms) => (rate * ms) / 1000);
}

// ---------------------------------------------------------------------------------------------
// Encoder.

/** Every encoder setting a quality preset uses; each is set, and can be read back, through the encoder. */
export interface EncoderSettings {
  /** Bits per second, 500 to 512000. */
  bitrate: number;
  /** 0 (fastest) to 10 (best). */
  complexity: number;
  /** Variable bitrate. */
  vbr: boolean;
  /** Constrained VBR: bounds the per-packet size swing (only meaningful with `vbr`). */
  vbrConstraint: boolean;
  /** Signal type hint. */
  signal: OpusSignalName;
  /** Upper bound on the coded audio bandwidth. */
  maxBandwidth: OpusBandwidthName;
  /** Discontinuous transmission: near-empty packets during silence. */
  dtx: boolean;
  /** In-band forward error correction (LBRR data of the previous frame in each packet). */
  inbandFec: boolean;
  /** Expected packet loss, 0 to 100 %: tunes how much the FEC data carries. */
  packetLossPerc: number;
}

type SettingSpec = {
  set: number;
  get: number;
  toC: (v: never) => number;
  fromC: (v: number) => EncoderSettings[keyof EncoderSettings];
};

const boolSpec = (set: number, get: number, what: string): SettingSpec => ({
  set,
  get,
  toC: (v: never) => (checkBool(what, v) ? 1 : 0),
  fromC: (v) => v !== 0,
});

/** How each setting maps to its request codes and C value: one table, no switch blocks. */
const SETTINGS: { readonly [K in keyof EncoderSettings]: SettingSpec } = {
  bitrate: {
    set: OpusRequest.SET_BITRATE,
    get: OpusRequest.GET_BITRATE,
    toC: (v: never) => checkInt("bitrate", v, 500, 512000),
    fromC: (v) => v,
  },
  complexity: {
    set: OpusRequest.SET_COMPLEXITY,
    get: OpusRequest.GET_COMPLEXITY,
    toC: (v: never) => checkInt("complexity", v, 0, 10),
    fromC: (v) => v,
  },
  vbr: boolSpec(OpusRequest.SET_VBR, OpusRequest.GET_VBR, "vbr"),
  vbrConstraint: boolSpec(
    OpusRequest.SET_VBR_CONSTRAINT,
    OpusRequest.GET_VBR_CONSTRAINT,
    "vbrConstraint",
  ),
  signal: {
    set: OpusRequest.SET_SIGNAL,
    get: OpusRequest.GET_SIGNAL,
    toC: (v: never) => OpusSignal[checkName("signal", OpusSignal, v)],
    fromC: (v) => nameOf(OpusSignal, v),
  },
  maxBandwidth: {
    set: OpusRequest.SET_MAX_BANDWIDTH,
    get: OpusRequest.GET_MAX_BANDWIDTH,
    toC: (v: never) => OpusBandwidth[checkName("maxBandwidth", OpusBandwidth, v)],
    fromC: (v) => nameOf(OpusBandwidth, v),
  },
  dtx: boolSpec(OpusRequest.SET_DTX, OpusRequest.GET_DTX, "dtx"),
  inbandFec: boolSpec(OpusRequest.SET_INBAND_FEC, OpusRequest.GET_INBAND_FEC, "inbandFec"),
  packetLossPerc: {
    set: OpusRequest.SET_PACKET_LOSS_PERC,
    get: OpusRequest.GET_PACKET_LOSS_PERC,
    toC: (v: never) => checkInt("packetLossPerc", v, 0, 100),
    fromC: (v) => v,
  },
};

/** The setting names, in the order they are applied. */
export const ENCODER_SETTING_NAMES = Object.keys(SETTINGS) as (keyof EncoderSettings)[];

const SET_REQUESTS = new Set<number>(Object.values(SETTINGS).map((s) => s.set));
const GET_REQUESTS = new Set<number>([
  ...Object.values(SETTINGS).map((s) => s.get),
  OpusRequest.GET_LOOKAHEAD,
  OpusRequest.GET_SAMPLE_RATE,
  OpusRequest.GET_FINAL_RANGE,
  OpusRequest.GET_APPLICATION,
  OpusRequest.GET_BANDWIDTH,
  OpusRequest.GET_IN_DTX,
  OpusRequest.GET_PREDICTION_DISABLED,
]);

const destroyEncoder = (p: Deno.PointerObject) => opus().opus_encoder_destroy(p);
const destroyDecoder = (p: Deno.PointerObject) => opus().opus_decoder_destroy(p);

/** Options for {@link OpusEncoder.create}. */
export interface EncoderOptions {
  /** 8000, 12000, 16000, 24000 or 48000 (default 48000). */
  sampleRate?: number;
  /** 1 or 2. */
  channels: number;
  /** Coding mode (default "audio"); "restrictedLowDelay" cuts look-ahead to 2.5 ms. */
  application?: OpusApplicationName;
}

/** An Opus encoder. Dispose it (or call {@link close}) to free the native state. */
export class OpusEncoder extends NativeState {
  #out = new Int32Array(1);
  readonly sampleRate: number;
  readonly channels: 1 | 2;
  readonly application: OpusApplicationName;
  readonly #frameSizes: number[];

  private constructor(
    ptr: Deno.PointerObject,
    sampleRate: number,
    channels: 1 | 2,
    app: OpusApplicationName,
  ) {
    super(ptr, destroyEncoder, "OpusEncoder");
    this.sampleRate = sampleRate;
    this.channels = channels;
    this.application = app;
    this.#frameSizes = validFrameSizes(sampleRate);
  }

  /** Creates an encoder, optionally applying `settings` (see {@link OpusEncoder.configure}). */
  static create(opts: EncoderOptions, settings?: Partial<EncoderSettings>): OpusEncoder {
    if (typeof opts !== "object" || opts === null) {
      throw new TypeError("Invalid encoder options: expected an object");
    }
    const rate = checkRate(opts.sampleRate ?? 48000);
    const channels = checkChannels(opts.channels);
    const app = checkName("application", OpusApplication, opts.application ?? "audio");
    const err = new Int32Array(1);
    const ptr = opus().opus_encoder_create(rate, channels, OpusApplication[app], err);
    if (ptr === null || err[0] !== OPUS_OK) {
      if (ptr !== null) opus().opus_encoder_destroy(ptr);
      throw new OpusError("opus_encoder_create", err[0] ?? OPUS_INTERNAL_ERROR);
    }
    const enc = new OpusEncoder(ptr, rate, channels, app);
    if (settings !== undefined) {
      try {
        enc.configure(settings);
      } catch (e) {
        enc.close();
        throw e;
      }
    }
    return enc;
  }

  #handle(): Deno.PointerObject {
    return this.live("work");
  }

  /** Samples per channel in one frame of `ms` milliseconds at this encoder's rate. */
  frameSize(ms: number): number {
    const n = (this.sampleRate * ms) / 1000;
    if (!this.#frameSizes.includes(n)) {
      throw new RangeError(
        `Invalid frame duration ${JSON.stringify(ms)} ms: expected one of ${
          OPUS_FRAME_MS.join(", ")
        }`,
      );
    }
    return n;
  }

  /**
   * Encodes one frame of `frameSize` samples per channel from interleaved `pcm` into `out`.
   * Returns the packet length in bytes (1 or 2 bytes in DTX silence).
   */
  encode(pcm: Int16Array, frameSize: number, out: Uint8Array): number {
    const h = this.#handle();
    checkInt16Array("PCM buffer", pcm);
    checkBytes("packet buffer", out);
    if (!this.#frameSizes.includes(frameSize)) {
      throw new RangeError(
        `Invalid frame size ${JSON.stringify(frameSize)}: expected one of ${
          this.#frameSizes.join(", ")
        } samples per channel at ${this.sampleRate} Hz`,
      );
    }
    if (pcm.length < frameSize * this.channels) {
      throw new RangeError(
        `PCM buffer holds ${pcm.length} samples: expected at least ${
          frameSize * this.channels
        } (${frameSize} × ${this.channels} channels)`,
      );
    }
    if (out.length < 2) {
      throw new RangeError(`Packet buffer of ${out.length} bytes is too small: expected >= 2`);
    }
    const n = opus().opus_encode(h, pcm, frameSize, out, Math.min(out.length, OPUS_MAX_PACKET));
    if (n < 0) throw new OpusError("opus_encode", n);
    return n;
  }

  /**
   * Applies each given setting through `opus_encoder_ctl`, every value validated before any
   * reaches C. Nothing is read back here: {@link OpusEncoder.get} and `settings()` do that (the
   * tests check every preset reads back as set).
   */
  configure(settings: Partial<EncoderSettings>): void {
    if (typeof settings !== "object" || settings === null) {
      throw new TypeError("Invalid encoder settings: expected an object");
    }
    for (const key of Object.keys(settings)) {
      if (!Object.hasOwn(SETTINGS, key)) {
        throw new RangeError(
          `Unknown encoder setting ${JSON.stringify(key)}: expected one of ${
            ENCODER_SETTING_NAMES.join(", ")
          }`,
        );
      }
    }
    // Validate every value before any reaches C, so a bad setting changes nothing.
    const plan: [keyof EncoderSettings, number][] = [];
    for (const key of ENCODER_SETTING_NAMES) {
      const v = settings[key];
      if (v !== undefined) plan.push([key, SETTINGS[key].toC(v as never)]);
    }
    const h = this.#handle();
    for (const [key, c] of plan) {
      const rc = opus().opus_encoder_ctl_set(h, SETTINGS[key].set, c);
      if (rc !== OPUS_OK) throw new OpusError("opus_encoder_ctl", rc, `set ${key} to ${c}`);
    }
  }

  /** Reads one setting back from the encoder. */
  get<K extends keyof EncoderSettings>(key: K): EncoderSettings[K] {
    if (!Object.hasOwn(SETTINGS, key)) {
      throw new RangeError(
        `Unknown encoder setting ${JSON.stringify(key)}: expected one of ${
          ENCODER_SETTING_NAMES.join(", ")
        }`,
      );
    }
    return SETTINGS[key].fromC(this.ctlGet(SETTINGS[key].get)) as EncoderSettings[K];
  }

  /** Reads every setting back from the encoder. */
  settings(): EncoderSettings {
    const out: Partial<Record<keyof EncoderSettings, unknown>> = {};
    for (const key of ENCODER_SETTING_NAMES) out[key] = this.get(key);
    return out as EncoderSettings;
  }

  /**
   * Raw `opus_encoder_ctl` SET request with an integer value; libopus itself judges the value,
   * and a rejection is an {@link OpusError}. Prefer {@link configure}, which validates first.
   */
  ctlSet(request: number, value: number): void {
    if (!SET_REQUESTS.has(request)) {
      throw new RangeError(
        `Unsupported encoder request ${JSON.stringify(request)}: expected one of ${
          [
            ...SET_REQUESTS,
          ].join(", ")
        }`,
      );
    }
    checkInt("request value", value, -(2 ** 31), 2 ** 31 - 1);
    const rc = opus().opus_encoder_ctl_set(this.#handle(), request, value);
    if (rc !== OPUS_OK) throw new OpusError("opus_encoder_ctl", rc, `request ${request}=${value}`);
  }

  /** Raw `opus_encoder_ctl` GET request returning the integer libopus wrote. */
  ctlGet(request: number): number {
    if (!GET_REQUESTS.has(request)) {
      throw new RangeError(
        `Unsupported encoder request ${JSON.stringify(request)}: expected one of ${
          [
            ...GET_REQUESTS,
          ].join(", ")
        }`,
      );
    }
    const rc = opus().opus_encoder_ctl_get(this.#handle(), request, this.#out);
    if (rc !== OPUS_OK) throw new OpusError("opus_encoder_ctl", rc, `request ${request}`);
    return this.#out[0]!;
  }

  /** Samples per channel of look-ahead the encoder adds (at its rate). */
  get lookahead(): number {
    return this.ctlGet(OpusRequest.GET_LOOKAHEAD);
  }

  /** Final state of the range coder after the last packet (for bit-exactness checks). */
  get finalRange(): number {
    return this.ctlGet(OpusRequest.GET_FINAL_RANGE) >>> 0;
  }

  /** Whether the last frame was coded as DTX silence. */
  get inDtx(): boolean {
    return this.ctlGet(OpusRequest.GET_IN_DTX) !== 0;
  }

  /**
   * Whether inter-frame prediction is off (`OPUS_SET_PREDICTION_DISABLED`): each frame is coded
   * (almost) on its own, at some cost in quality. For the first frame after a discontinuity a
   * running decoder did not see — a new or reset encoder — so that the decoder's memory of the
   * audio before cannot turn it into a burst.
   */
  get predictionDisabled(): boolean {
    return this.ctlGet(OpusRequest.GET_PREDICTION_DISABLED) !== 0;
  }

  set predictionDisabled(on: boolean) {
    const rc = opus().opus_encoder_ctl_set(
      this.#handle(),
      OpusRequest.SET_PREDICTION_DISABLED,
      on ? 1 : 0,
    );
    if (rc !== OPUS_OK) throw new OpusError("opus_encoder_ctl", rc, "prediction disabled");
  }

  /** Resets the codec state as if freshly created; settings are kept. */
  reset(): void {
    const rc = opus().opus_encoder_ctl_none(this.#handle(), OpusRequest.RESET_STATE);
    if (rc !== OPUS_OK) throw new OpusError("opus_encoder_ctl", rc, "reset state");
  }

  /**
   * Frees the native state of an encoder whose thread was terminated, given its
   * {@link OpusEncoder.orphanToken}. Only once that thread is gone and the token was not cleared.
   */
  static destroyOrphan(token: bigint): void {
    const ptr = orphanPointer(token);
    if (ptr !== null) destroyEncoder(ptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Decoder.

/** Options for {@link OpusDecoder.create}. */
export interface DecoderOptions {
  /** 8000, 12000, 16000, 24000 or 48000 (default 48000). */
  sampleRate?: number;
  /** 1 or 2: what the decoder outputs, whatever the packets carry. */
  channels: number;
}

/** An Opus decoder with packet-loss concealment and FEC recovery. */
export class OpusDecoder extends NativeState {
  #out = new Int32Array(1);
  readonly sampleRate: number;
  readonly channels: 1 | 2;
  readonly #maxFrame: number;

  private constructor(ptr: Deno.PointerObject, sampleRate: number, channels: 1 | 2) {
    super(ptr, destroyDecoder, "OpusDecoder");
    this.sampleRate = sampleRate;
    this.channels = channels;
    this.#maxFrame = (sampleRate * 120) / 1000;
  }

  /** Creates a decoder. */
  static create(opts: DecoderOptions): OpusDecoder {
    if (typeof opts !== "object" || opts === null) {
      throw new TypeError("Invalid decoder options: expected an object");
    }
    const rate = checkRate(opts.sampleRate ?? 48000);
    const channels = checkChannels(opts.channels);
    const err = new Int32Array(1);
    const ptr = opus().opus_decoder_create(rate, channels, err);
    if (ptr === null || err[0] !== OPUS_OK) {
      if (ptr !== null) opus().opus_decoder_destroy(ptr);
      throw new OpusError("opus_decoder_create", err[0] ?? OPUS_INTERNAL_ERROR);
    }
    return new OpusDecoder(ptr, rate, channels);
  }

  #handle(): Deno.PointerObject {
    return this.live("work");
  }

  #checkOut(out: Int16Array, frameSize: number): void {
    checkInt16Array("PCM buffer", out);
    checkInt("frame size", frameSize, 1, this.#maxFrame);
    if (out.length < frameSize * this.channels) {
      throw new RangeError(
        `PCM buffer holds ${out.length} samples: expected at least ${
          frameSize * this.channels
        } (${frameSize} × ${this.channels} channels)`,
      );
    }
  }

  /**
   * Decodes `packet` into interleaved `out`, which has room for `frameSize` samples per channel.
   * Returns the samples per channel decoded. A corrupt packet is an {@link OpusError}
   * (`OPUS_INVALID_PACKET`) and leaves the decoder usable.
   */
  decode(packet: Uint8Array, out: Int16Array, frameSize: number): number {
    checkBytes("packet", packet);
    if (packet.length === 0) {
      throw new RangeError("Invalid packet of 0 bytes: use conceal() for a lost packet");
    }
    this.#checkOut(out, frameSize);
    const n = opus().opus_decode(this.#handle(), packet, packet.length, out, frameSize, 0);
    if (n < 0) throw new OpusError("opus_decode", n);
    return n;
  }

  /**
   * Packet-loss concealment: fills `frameSize` samples per channel (the lost packet's duration,
   * a multiple of 2.5 ms) with audio extrapolated from what came before.
   */
  conceal(out: Int16Array, frameSize: number): number {
    this.#checkOut(out, frameSize);
    this.#checkConcealSize(frameSize);
    const n = opus().opus_decode(this.#handle(), null, 0, out, frameSize, 0);
    if (n < 0) throw new OpusError("opus_decode", n, "concealment");
    return n;
  }

  /**
   * Recovers a lost packet from the in-band FEC data carried by the *next* packet,
   * `nextPacket`, writing `frameSize` samples per channel (the lost packet's duration).
   * When `nextPacket` carries no FEC data, libopus conceals instead. Decode `nextPacket`
   * normally afterwards.
   */
  decodeFec(nextPacket: Uint8Array, out: Int16Array, frameSize: number): number {
    checkBytes("packet", nextPacket);
    if (nextPacket.length === 0) throw new RangeError("Invalid packet of 0 bytes for FEC");
    this.#checkOut(out, frameSize);
    this.#checkConcealSize(frameSize);
    const n = opus().opus_decode(
      this.#handle(),
      nextPacket,
      nextPacket.length,
      out,
      frameSize,
      1,
    );
    if (n < 0) throw new OpusError("opus_decode", n, "FEC");
    return n;
  }

  #checkConcealSize(frameSize: number): void {
    const quantum = this.sampleRate / 400; // 2.5 ms
    if (frameSize % quantum !== 0) {
      throw new RangeError(
        `Invalid concealment size ${frameSize}: expected a multiple of ${quantum} samples (2.5 ms)`,
      );
    }
  }

  /** Samples per channel of the last decoded or concealed packet. */
  get lastPacketDuration(): number {
    return this.#get(OpusRequest.GET_LAST_PACKET_DURATION);
  }

  /** Final range coder state of the last decoded packet (equals the encoder's when intact). */
  get finalRange(): number {
    return this.#get(OpusRequest.GET_FINAL_RANGE) >>> 0;
  }

  /** Output gain in Q8 dB (-32768 to 32767). */
  get gain(): number {
    return this.#get(OpusRequest.GET_GAIN);
  }

  set gain(q8dB: number) {
    checkInt("gain", q8dB, -32768, 32767);
    const rc = opus().opus_decoder_ctl_set(this.#handle(), OpusRequest.SET_GAIN, q8dB);
    if (rc !== OPUS_OK) throw new OpusError("opus_decoder_ctl", rc, "set gain");
  }

  #get(request: number): number {
    const rc = opus().opus_decoder_ctl_get(this.#handle(), request, this.#out);
    if (rc !== OPUS_OK) throw new OpusError("opus_decoder_ctl", rc, `request ${request}`);
    return this.#out[0]!;
  }

  /** Resets the decoder as if freshly created (e.g. on a new stream). */
  reset(): void {
    const rc = opus().opus_decoder_ctl_none(this.#handle(), OpusRequest.RESET_STATE);
    if (rc !== OPUS_OK) throw new OpusError("opus_decoder_ctl", rc, "reset state");
  }

  /**
   * Frees the native state of a decoder whose thread was terminated, given its
   * {@link OpusDecoder.orphanToken}. Only once that thread is gone and the token was not cleared.
   */
  static destroyOrphan(token: bigint): void {
    const ptr = orphanPointer(token);
    if (ptr !== null) destroyDecoder(ptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Packet inspection.

/** What a packet's TOC byte (and frame count) says, read without decoding. */
export interface PacketInfo {
  /** Frames in the packet (1 to 48). */
  frames: number;
  /** Samples per channel in each frame at 48 kHz. */
  samplesPerFrame: number;
  /** Samples per channel in the whole packet at 48 kHz. */
  samples: number;
  /** Channels coded (1 or 2). */
  channels: 1 | 2;
  /** Coded audio bandwidth. */
  bandwidth: OpusBandwidthName;
}

/** Why {@link inspectPacket} refused a packet. */
export class InvalidPacketError extends RangeError {
  override name = "InvalidPacketError";
}

/**
 * Reads a packet's TOC and frame count through libopus, validating it before any decode:
 * empty, oversized, unparseable or longer than 120 ms packets are an {@link InvalidPacketError}.
 */
export function inspectPacket(packet: Uint8Array): PacketInfo {
  checkBytes("packet", packet);
  if (packet.length === 0) throw new InvalidPacketError("Invalid packet: it is empty");
  if (packet.length > OPUS_MAX_PACKET) {
    throw new InvalidPacketError(
      `Invalid packet of ${packet.length} bytes: expected at most ${OPUS_MAX_PACKET}`,
    );
  }
  const o = opus();
  const frames = o.opus_packet_get_nb_frames(packet, packet.length);
  if (frames < 0) {
    throw new InvalidPacketError(
      `Invalid packet: ${cString(o.opus_strerror(frames))} (frame count)`,
    );
  }
  const samples = o.opus_packet_get_nb_samples(packet, packet.length, 48000);
  if (samples < 0) {
    throw new InvalidPacketError(
      `Invalid packet: ${cString(o.opus_strerror(samples))} (sample count)`,
    );
  }
  if (samples > OPUS_MAX_FRAME_SAMPLES_48K) {
    throw new InvalidPacketError(`Invalid packet of ${samples} samples: more than 120 ms`);
  }
  return {
    frames,
    samplesPerFrame: o.opus_packet_get_samples_per_frame(packet, 48000),
    samples,
    channels: o.opus_packet_get_nb_channels(packet) === 2 ? 2 : 1,
    bandwidth: nameOf(OpusBandwidth, o.opus_packet_get_bandwidth(packet)),
  };
}
