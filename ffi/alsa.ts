/**
 * libasound (ALSA) through Deno FFI: {@link Pcm}, a capture or playback PCM of interleaved
 * signed 16-bit samples.
 *
 * A PCM is opened non-blocking by default, so no call made here waits without a bound:
 * `readi`/`writei` return 0 instead of blocking, {@link Pcm.wait} blocks for at most its timeout
 * and {@link Pcm.drain} gives up (and drops) at its deadline. (Opening is as quick as the device:
 * a busy `hw` device fails at once with `-EBUSY`; a `pulse` PCM connects to its server first.)
 * Over- and underruns (`-EPIPE`) and suspends (`-ESTRPIPE`) are recovered in place and counted.
 *
 * `readi`/`writei` take caller-owned `Int16Array`s — they may be views onto a SharedArrayBuffer
 * ring slot, which libasound then reads or writes in place (no copies).
 *
 * Configuration: libasound reads its configuration (including `ALSA_CONFIG_PATH`) lazily inside
 * `snd_pcm_open`, not when the library loads, and re-reads it whenever the list of configuration
 * files or a file's inode or modification time (whole seconds) changed — so setting
 * `ALSA_CONFIG_PATH` any time before an open takes effect for that open; PCMs already open keep
 * theirs. See tests/alsa_devices.ts.
 *
 * @module
 */

import { cString, openLibrary, orphanPointer, orphanToken } from "./library.ts";
import { libc } from "./libc.ts";

// ---------------------------------------------------------------------------------------------
// C constants (alsa/pcm.h, errno.h). Named, never bare numbers.

/** `snd_pcm_stream_t`. */
const SND_PCM_STREAM_PLAYBACK = 0;
const SND_PCM_STREAM_CAPTURE = 1;
/** `snd_pcm_open` mode flag: non-blocking I/O. */
const SND_PCM_NONBLOCK = 0x00000001;
/** `snd_pcm_access_t`: `SND_PCM_ACCESS_RW_INTERLEAVED`. */
const SND_PCM_ACCESS_RW_INTERLEAVED = 3;
/** `snd_pcm_format_t`: `SND_PCM_FORMAT_S16_LE`. */
const SND_PCM_FORMAT_S16_LE = 2;
/** `snd_pcm_tstamp_t`: `SND_PCM_TSTAMP_ENABLE` (timestamp every hardware pointer update). */
const SND_PCM_TSTAMP_ENABLE = 1;
/** `snd_pcm_tstamp_type_t`: `SND_PCM_TSTAMP_TYPE_GETTIMEOFDAY` (wall clock, like `Date.now()`). */
const SND_PCM_TSTAMP_TYPE_GETTIMEOFDAY = 0;

/** `snd_pcm_state_t`, indexed by its C value. */
const PCM_STATES = [
  "open", //         SND_PCM_STATE_OPEN = 0
  "setup", //        SND_PCM_STATE_SETUP
  "prepared", //     SND_PCM_STATE_PREPARED
  "running", //      SND_PCM_STATE_RUNNING
  "xrun", //         SND_PCM_STATE_XRUN
  "draining", //     SND_PCM_STATE_DRAINING
  "paused", //       SND_PCM_STATE_PAUSED
  "suspended", //    SND_PCM_STATE_SUSPENDED
  "disconnected", // SND_PCM_STATE_DISCONNECTED = 8
] as const;

/** The state of a PCM (`snd_pcm_state_t`, lower case without the `SND_PCM_STATE_` prefix). */
export type PcmState = (typeof PCM_STATES)[number];

/** Linux errno values used here (identical on x86_64 and aarch64: asm-generic). */
const EINTR = 4;
const EAGAIN = 11;
const EPIPE = 32;
const EIO = 5;
const ENODEV = 19;
const EBADFD = 77;
const ESTRPIPE = 86;

/** Argument limits checked before any C call. */
const MAX_CHANNELS = 8;
const MIN_RATE = 8000;
const MAX_RATE = 384000;
const MIN_PERIOD_FRAMES = 16;
/** Longest wait/drain timeout accepted, in milliseconds. */
const MAX_TIMEOUT_MS = 60_000;
/** ALSA channel positions (`enum snd_pcm_chmap_position`, in its order). */
export const CHANNEL_POSITIONS = [
  "UNKNOWN",
  "NA",
  "MONO",
  "FL",
  "FR",
  "RL",
  "RR",
  "FC",
  "LFE",
  "SL",
  "SR",
  "RC",
  "FLC",
  "FRC",
  "RLC",
  "RRC",
  "FLW",
  "FRW",
  "FLH",
  "FCH",
  "FRH",
  "TC",
  "TFL",
  "TFR",
  "TFC",
  "TRL",
  "TRR",
  "TRC",
  "TFLC",
  "TFRC",
  "TSL",
  "TSR",
  "LLFE",
  "RLFE",
  "BC",
  "BLC",
  "BRC",
] as const;

/** One channel's position. */
export type ChannelPosition = (typeof CHANNEL_POSITIONS)[number];

/** Sleep between two attempts to resume a suspended PCM inside {@link Pcm.wait}, ms. */
const SUSPEND_POLL_MS = 20;

/** Longest sleep between two looks at the delay while draining, in milliseconds. */
const DRAIN_POLL_MS = 20;

// ---------------------------------------------------------------------------------------------
// Symbol table. `snd_pcm_uframes_t` is `unsigned long` and `snd_pcm_sframes_t` is `long`: both
// pointer-sized, hence `usize`/`isize` (64-bit on every platform Deno runs on, x86_64 and
// aarch64), and `BigUint64Array`/`BigInt64Array` for out-parameters of those types.
// The `hw_params` accessors bound by name resolve to the default (`ALSA_0.9.0rc4`) symbol version,
// the API in today's headers.

const symbols = {
  // const char *snd_asoundlib_version(void);
  snd_asoundlib_version: { parameters: [], result: "pointer" },
  // const char *snd_strerror(int errnum);
  snd_strerror: { parameters: ["i32"], result: "pointer" },
  // int snd_pcm_open(snd_pcm_t **pcm, const char *name, snd_pcm_stream_t stream, int mode);
  snd_pcm_open: { parameters: ["buffer", "buffer", "i32", "i32"], result: "i32" },
  // int snd_pcm_close(snd_pcm_t *pcm);
  snd_pcm_close: { parameters: ["pointer"], result: "i32" },

  // int snd_pcm_hw_params_malloc(snd_pcm_hw_params_t **ptr);
  snd_pcm_hw_params_malloc: { parameters: ["buffer"], result: "i32" },
  // void snd_pcm_hw_params_free(snd_pcm_hw_params_t *obj);
  snd_pcm_hw_params_free: { parameters: ["pointer"], result: "void" },
  // int snd_pcm_hw_params_any(snd_pcm_t *pcm, snd_pcm_hw_params_t *params);
  snd_pcm_hw_params_any: { parameters: ["pointer", "pointer"], result: "i32" },
  // int snd_pcm_hw_params_set_access(snd_pcm_t *pcm, snd_pcm_hw_params_t *params,
  //                                  snd_pcm_access_t access);
  snd_pcm_hw_params_set_access: { parameters: ["pointer", "pointer", "i32"], result: "i32" },
  // int snd_pcm_hw_params_set_format(snd_pcm_t *pcm, snd_pcm_hw_params_t *params,
  //                                  snd_pcm_format_t val);
  snd_pcm_hw_params_set_format: { parameters: ["pointer", "pointer", "i32"], result: "i32" },
  // int snd_pcm_hw_params_set_channels(snd_pcm_t *pcm, snd_pcm_hw_params_t *params,
  //                                    unsigned int val);
  snd_pcm_hw_params_set_channels: { parameters: ["pointer", "pointer", "u32"], result: "i32" },
  // int snd_pcm_hw_params_set_rate_near(snd_pcm_t *pcm, snd_pcm_hw_params_t *params,
  //                                     unsigned int *val, int *dir);
  snd_pcm_hw_params_set_rate_near: {
    parameters: ["pointer", "pointer", "buffer", "buffer"],
    result: "i32",
  },
  // int snd_pcm_hw_params_set_period_size_near(snd_pcm_t *pcm, snd_pcm_hw_params_t *params,
  //                                            snd_pcm_uframes_t *val, int *dir);
  snd_pcm_hw_params_set_period_size_near: {
    parameters: ["pointer", "pointer", "buffer", "buffer"],
    result: "i32",
  },
  // int snd_pcm_hw_params_set_buffer_size_near(snd_pcm_t *pcm, snd_pcm_hw_params_t *params,
  //                                            snd_pcm_uframes_t *val);
  snd_pcm_hw_params_set_buffer_size_near: {
    parameters: ["pointer", "pointer", "buffer"],
    result: "i32",
  },
  // int snd_pcm_hw_params(snd_pcm_t *pcm, snd_pcm_hw_params_t *params);
  snd_pcm_hw_params: { parameters: ["pointer", "pointer"], result: "i32" },
  // int snd_pcm_hw_params_get_channels(const snd_pcm_hw_params_t *params, unsigned int *val);
  snd_pcm_hw_params_get_channels: { parameters: ["pointer", "buffer"], result: "i32" },
  // int snd_pcm_hw_params_get_rate(const snd_pcm_hw_params_t *params, unsigned int *val,
  //                                int *dir);
  snd_pcm_hw_params_get_rate: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // int snd_pcm_hw_params_get_period_size(const snd_pcm_hw_params_t *params,
  //                                       snd_pcm_uframes_t *frames, int *dir);
  snd_pcm_hw_params_get_period_size: {
    parameters: ["pointer", "buffer", "buffer"],
    result: "i32",
  },
  // int snd_pcm_hw_params_get_buffer_size(const snd_pcm_hw_params_t *params,
  //                                       snd_pcm_uframes_t *val);
  snd_pcm_hw_params_get_buffer_size: { parameters: ["pointer", "buffer"], result: "i32" },

  // int snd_pcm_sw_params_malloc(snd_pcm_sw_params_t **ptr);
  snd_pcm_sw_params_malloc: { parameters: ["buffer"], result: "i32" },
  // void snd_pcm_sw_params_free(snd_pcm_sw_params_t *obj);
  snd_pcm_sw_params_free: { parameters: ["pointer"], result: "void" },
  // int snd_pcm_sw_params_current(snd_pcm_t *pcm, snd_pcm_sw_params_t *params);
  snd_pcm_sw_params_current: { parameters: ["pointer", "pointer"], result: "i32" },
  // int snd_pcm_sw_params_set_start_threshold(snd_pcm_t *pcm, snd_pcm_sw_params_t *params,
  //                                           snd_pcm_uframes_t val);
  snd_pcm_sw_params_set_start_threshold: {
    parameters: ["pointer", "pointer", "usize"],
    result: "i32",
  },
  // int snd_pcm_sw_params_set_avail_min(snd_pcm_t *pcm, snd_pcm_sw_params_t *params,
  //                                     snd_pcm_uframes_t val);
  snd_pcm_sw_params_set_avail_min: {
    parameters: ["pointer", "pointer", "usize"],
    result: "i32",
  },
  // int snd_pcm_sw_params_set_tstamp_mode(snd_pcm_t *pcm, snd_pcm_sw_params_t *params,
  //                                       snd_pcm_tstamp_t val);
  snd_pcm_sw_params_set_tstamp_mode: { parameters: ["pointer", "pointer", "i32"], result: "i32" },
  // int snd_pcm_sw_params_set_tstamp_type(snd_pcm_t *pcm, snd_pcm_sw_params_t *params,
  //                                       snd_pcm_tstamp_type_t val);   (alsa-lib 1.0.29)
  snd_pcm_sw_params_set_tstamp_type: {
    parameters: ["pointer", "pointer", "i32"],
    result: "i32",
    optional: true,
  },
  // int snd_pcm_sw_params(snd_pcm_t *pcm, snd_pcm_sw_params_t *params);
  snd_pcm_sw_params: { parameters: ["pointer", "pointer"], result: "i32" },

  // int snd_pcm_prepare(snd_pcm_t *pcm);
  snd_pcm_prepare: { parameters: ["pointer"], result: "i32" },
  // int snd_pcm_start(snd_pcm_t *pcm);
  snd_pcm_start: { parameters: ["pointer"], result: "i32" },
  // int snd_pcm_drop(snd_pcm_t *pcm);
  snd_pcm_drop: { parameters: ["pointer"], result: "i32" },
  // int snd_pcm_resume(snd_pcm_t *pcm);
  snd_pcm_resume: { parameters: ["pointer"], result: "i32" },
  // int snd_pcm_recover(snd_pcm_t *pcm, int err, int silent);
  snd_pcm_recover: { parameters: ["pointer", "i32", "i32"], result: "i32" },
  // snd_pcm_state_t snd_pcm_state(snd_pcm_t *pcm);
  snd_pcm_state: { parameters: ["pointer"], result: "i32" },
  // int snd_pcm_poll_descriptors_count(snd_pcm_t *pcm);
  snd_pcm_poll_descriptors_count: { parameters: ["pointer"], result: "i32" },
  // int snd_pcm_poll_descriptors(snd_pcm_t *pcm, struct pollfd *pfds, unsigned int space);
  snd_pcm_poll_descriptors: { parameters: ["pointer", "buffer", "u32"], result: "i32" },
  // int snd_pcm_poll_descriptors_revents(snd_pcm_t *pcm, struct pollfd *pfds, unsigned int nfds,
  //                                      unsigned short *revents);
  snd_pcm_poll_descriptors_revents: {
    parameters: ["pointer", "buffer", "u32", "buffer"],
    result: "i32",
  },
  // snd_pcm_sframes_t (a long) results are declared "i32": Deno returns 64-bit results as a
  // BigInt (an allocation per call, three calls per frame), and the low 32 bits of the return
  // register are exact for a frame count or a negative errno on x86_64 and aarch64 (eax/w0).
  // snd_pcm_sframes_t snd_pcm_avail_update(snd_pcm_t *pcm);
  snd_pcm_avail_update: { parameters: ["pointer"], result: "i32" },
  // snd_pcm_chmap_t *snd_pcm_get_chmap(snd_pcm_t *pcm);   malloc'd {unsigned channels; pos[]}
  snd_pcm_get_chmap: { parameters: ["pointer"], result: "pointer" },
  // int snd_pcm_delay(snd_pcm_t *pcm, snd_pcm_sframes_t *delayp);
  snd_pcm_delay: { parameters: ["pointer", "buffer"], result: "i32" },
  // int snd_pcm_htimestamp(snd_pcm_t *pcm, snd_pcm_uframes_t *avail, snd_htimestamp_t *tstamp);
  //   snd_htimestamp_t is struct timespec { time_t tv_sec; long tv_nsec; } — two 64-bit fields.
  snd_pcm_htimestamp: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // snd_pcm_sframes_t snd_pcm_readi(snd_pcm_t *pcm, void *buffer, snd_pcm_uframes_t size);
  snd_pcm_readi: { parameters: ["pointer", "buffer", "usize"], result: "i32" },
  // snd_pcm_sframes_t snd_pcm_writei(snd_pcm_t *pcm, const void *buffer, snd_pcm_uframes_t size);
  snd_pcm_writei: { parameters: ["pointer", "buffer", "usize"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

type Symbols = Deno.DynamicLibrary<typeof symbols>["symbols"];

let lib: Deno.DynamicLibrary<typeof symbols> | undefined;

function alsa(): Symbols {
  lib ??= openLibrary(
    {
      name: "libasound",
      envVar: "KVM_AUDIO_LIBASOUND",
      candidates: ["libasound.so.2", "libasound.so"],
    },
    symbols,
  );
  return lib.symbols;
}

/*
 * Waits use `poll(2)` from the C library (ffi/libc.ts). `snd_pcm_wait` is not used: it restarts
 * its full timeout after every wake-up that leaves the PCM not yet ready, so its timeout bounds
 * only the gap between wake-ups (measured: `snd_pcm_wait(pcm, 50)` on a PulseAudio PCM returned
 * after 264 ms). {@link Pcm.wait} polls against a deadline instead.
 */

/** `struct pollfd` is { int fd; short events; short revents; }: 8 bytes. */
const POLLFD_SIZE = 8;
/** `poll(2)` event bits (Linux, all architectures). */
const POLLIN = 0x001;
const POLLOUT = 0x004;
const POLLERR = 0x008;
const POLLNVAL = 0x020;

/** The libasound version string, e.g. "1.2.8". */
export function alsaVersion(): string {
  return cString(alsa().snd_asoundlib_version());
}

// ---------------------------------------------------------------------------------------------
// Errors and argument checks.

/** A libasound call returned a negative error code. */
export class AlsaError extends Error {
  override name = "AlsaError";
  /** The negative errno value returned by libasound, e.g. -2 (`-ENOENT`). */
  readonly code: number;
  /** The C function that failed, e.g. "snd_pcm_open". */
  readonly fn: string;
  /** The PCM name the call was made on, e.g. "hw:9,0". */
  readonly device: string;

  /** `text` replaces the `snd_strerror` text when given. */
  constructor(fn: string, code: number, device: string, text?: string) {
    const reason = text ?? cString(alsa().snd_strerror(code));
    super(`${fn} failed on ${JSON.stringify(device)}: ${reason} (${code})`);
    this.code = code;
    this.fn = fn;
    this.device = device;
  }
}

function quote(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "bigint") return `${value}n`;
  if (typeof value === "object" && value !== null) {
    return value.constructor?.name ?? "object";
  }
  return String(value);
}

function checkInteger(what: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number") {
    throw new TypeError(`Invalid ${what} ${quote(value)}: expected an integer number`);
  }
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(
      `Invalid ${what} ${quote(value)}: expected an integer from ${min} to ${max}`,
    );
  }
  return value;
}

function checkName(name: unknown): string {
  if (typeof name !== "string") {
    throw new TypeError(`Invalid PCM name ${quote(name)}: expected a string`);
  }
  if (name.length === 0 || name.includes("\0")) {
    throw new RangeError(
      `Invalid PCM name ${quote(name)}: expected a non-empty string without NUL characters`,
    );
  }
  return name;
}

/** Where `Pcm` handles left unclosed are closed when they are collected (a safety net only). */
const leaked = new FinalizationRegistry<Deno.PointerObject>((pcm) => {
  try {
    alsa().snd_pcm_close(pcm);
  } catch {
    // Nothing can be reported from a finalizer.
  }
});

// ---------------------------------------------------------------------------------------------
// Pcm.

/** Options of {@link Pcm.open}. */
export interface PcmOptions {
  /** Direction: "capture" reads from the device, "playback" writes to it. */
  stream: "capture" | "playback";
  /** Interleaved channels, 1 to 8. */
  channels: number;
  /** Requested sample rate in Hz, 8000 to 384000; {@link Pcm.rate} is the one obtained. */
  rate: number;
  /** Requested period (frames between wake-ups); default 10 ms worth. */
  periodFrames?: number;
  /** Requested ring buffer in frames; default four periods, at least two periods. */
  bufferFrames?: number;
  /** Open with `SND_PCM_NONBLOCK` (default true): transfers return 0 instead of blocking. */
  nonBlocking?: boolean;
}

/** A point in time from {@link Pcm.htimestamp}. */
export interface PcmTimestamp {
  /** Frames available (to read for capture, to write for playback) at `epochMs`. */
  avail: number;
  /** When the PCM's hardware pointer was last updated, in ms since the Unix epoch. */
  epochMs: number;
}

/**
 * One open ALSA PCM of interleaved S16_LE samples (`snd_pcm_t`), capture or playback.
 *
 * Transfers never block when opened non-blocking (the default). Over-/underruns and suspends are
 * recovered and counted in {@link Pcm.xruns} and {@link Pcm.suspends}. Close it with
 * {@link Pcm.close} or `using`.
 */
export class Pcm implements Disposable {
  #pcm: Deno.PointerObject | null;
  #xruns = 0;
  #spuriousWakeups = 0;
  #polls = 0;
  #suspends = 0;
  /** In a suspend already counted, not yet seen to end (see {@link Pcm.suspends}). */
  #inSuspend = false;
  readonly #delayOut = new BigInt64Array(1);
  readonly #delayWords = new Int32Array(this.#delayOut.buffer);
  #pfds = new Uint8Array(0);
  readonly #revents = new Uint16Array(1);
  #pfdCount = 0n;
  #lastN = 0;
  #lastBig = 0n;
  /** The PCM name it was opened with, e.g. "default" or "hw:0,0". */
  readonly name: string;
  /** The direction. */
  readonly stream: "capture" | "playback";
  /** Interleaved channels. */
  readonly channels: number;
  /** The sample rate obtained (may differ from the one requested). */
  readonly rate: number;
  /** The period size obtained, in frames. */
  readonly periodFrames: number;
  /** The ring buffer size obtained, in frames. */
  readonly bufferFrames: number;
  /** Whether transfers are non-blocking. */
  readonly nonBlocking: boolean;

  private constructor(
    pcm: Deno.PointerObject,
    name: string,
    stream: "capture" | "playback",
    obtained: { channels: number; rate: number; periodFrames: number; bufferFrames: number },
    nonBlocking: boolean,
  ) {
    this.#pcm = pcm;
    this.name = name;
    this.stream = stream;
    this.channels = obtained.channels;
    this.rate = obtained.rate;
    this.periodFrames = obtained.periodFrames;
    this.bufferFrames = obtained.bufferFrames;
    this.nonBlocking = nonBlocking;
    leaked.register(this, pcm, this);
  }

  /**
   * Opens PCM `name` and configures it: RW interleaved access, S16_LE, `channels`, the rate,
   * period and buffer nearest to those asked for; playback starts once one period is written,
   * and a wait wakes when one period can be transferred. The PCM is left prepared.
   *
   * @throws {TypeError | RangeError} for a bad argument, before any C call.
   * @throws {AlsaError} when libasound refuses; a half-open handle is closed first.
   */
  static open(name: string, opts: PcmOptions): Pcm {
    checkName(name);
    if (typeof opts !== "object" || opts === null) {
      throw new TypeError(`Invalid PCM options ${quote(opts)}: expected an object`);
    }
    const stream = opts.stream;
    if (stream !== "capture" && stream !== "playback") {
      throw new TypeError(`Invalid PCM stream ${quote(stream)}: expected "capture" or "playback"`);
    }
    const channels = checkInteger("channel count", opts.channels, 1, MAX_CHANNELS);
    const rate = checkInteger("sample rate", opts.rate, MIN_RATE, MAX_RATE);
    const periodFrames = opts.periodFrames === undefined
      ? Math.round(rate / 100)
      : checkInteger("period size", opts.periodFrames, MIN_PERIOD_FRAMES, rate);
    const bufferFrames = opts.bufferFrames === undefined
      ? periodFrames * 4
      : checkInteger("buffer size", opts.bufferFrames, periodFrames * 2, rate * 10);
    const nonBlocking = opts.nonBlocking ?? true;
    if (typeof nonBlocking !== "boolean") {
      throw new TypeError(`Invalid nonBlocking ${quote(nonBlocking)}: expected a boolean`);
    }

    const c = alsa();
    const out = new BigUint64Array(1);
    const rc = c.snd_pcm_open(
      out,
      new TextEncoder().encode(name + "\0"),
      stream === "capture" ? SND_PCM_STREAM_CAPTURE : SND_PCM_STREAM_PLAYBACK,
      nonBlocking ? SND_PCM_NONBLOCK : 0,
    );
    if (rc < 0) throw new AlsaError("snd_pcm_open", rc, name);
    const pcm = Deno.UnsafePointer.create(out[0]!);
    if (pcm === null) throw new AlsaError("snd_pcm_open", -EBADFD, name, "returned no handle");
    try {
      const obtained = configureHw(c, pcm, name, { channels, rate, periodFrames, bufferFrames });
      configureSw(c, pcm, name, stream, obtained.periodFrames);
      check(c.snd_pcm_prepare(pcm), "snd_pcm_prepare", name);
      return new Pcm(pcm, name, stream, obtained, nonBlocking);
    } catch (e) {
      c.snd_pcm_close(pcm);
      throw e;
    }
  }

  /** Over- or underruns recovered so far (`-EPIPE`). */
  get xruns(): number {
    return this.#xruns;
  }

  /**
   * Suspends met so far (`-ESTRPIPE`), each counted when first reported — while the device is
   * still suspended — so that a caller can tell capture stood still (and for how long, by the
   * clock) from the first transfer after it.
   */
  get suspends(): number {
    return this.#suspends;
  }

  /** Whether {@link Pcm.close} has been called. */
  get closed(): boolean {
    return this.#pcm === null;
  }

  /**
   * Reads up to `frames` frames (default: as many as fit in `buf`) into `buf` in place.
   * Returns the frames read; 0 when none are available yet or after recovering an overrun.
   */
  readi(buf: Int16Array, frames?: number): number {
    if (this.stream !== "capture") {
      throw new TypeError(`Cannot read from PCM ${quote(this.name)}: it was opened for playback`);
    }
    const n = this.#checkTransfer(buf, frames);
    const pcm = this.#handle("snd_pcm_readi");
    if (n === 0) return 0;
    const rc = Number(alsa().snd_pcm_readi(pcm, buf, this.#big(n)));
    if (rc > 0) this.#inSuspend = false;
    return rc >= 0 ? rc : this.#recoverOrThrow("snd_pcm_readi", rc);
  }

  /**
   * Writes up to `frames` frames (default: all of `buf`) from `buf`. Returns the frames written;
   * 0 when there is no room yet or after recovering an underrun.
   */
  writei(buf: Int16Array, frames?: number): number {
    if (this.stream !== "playback") {
      throw new TypeError(`Cannot write to PCM ${quote(this.name)}: it was opened for capture`);
    }
    const n = this.#checkTransfer(buf, frames);
    const pcm = this.#handle("snd_pcm_writei");
    if (n === 0) return 0;
    const rc = Number(alsa().snd_pcm_writei(pcm, buf, this.#big(n)));
    if (rc > 0) this.#inSuspend = false;
    return rc >= 0 ? rc : this.#recoverOrThrow("snd_pcm_writei", rc);
  }

  /**
   * Waits at most `timeoutMs` until a period can be transferred. True when ready (also after an
   * xrun was recovered: transfer now), false on timeout. A prepared capture PCM is started first,
   * since it would otherwise never become ready.
   */
  wait(timeoutMs: number): boolean {
    checkInteger("timeout (ms)", timeoutMs, 0, MAX_TIMEOUT_MS);
    const pcm = this.#handle("snd_pcm_wait");
    const c = alsa();
    const deadline = performance.now() + timeoutMs;
    if (this.stream === "capture" && this.state() === "prepared") {
      const started = c.snd_pcm_start(pcm);
      if (started < 0) return this.#recoverOrThrow("snd_pcm_start", started) >= 0;
    }
    const count = c.snd_pcm_poll_descriptors_count(pcm);
    if (count <= 0) {
      throw new AlsaError("snd_pcm_poll_descriptors_count", count < 0 ? count : -EIO, this.name);
    }
    if (this.#pfds.length !== count * POLLFD_SIZE) {
      this.#pfds = new Uint8Array(count * POLLFD_SIZE);
      this.#pfdCount = BigInt(count);
    }
    const pfds = this.#pfds;
    const revents = this.#revents;
    for (;;) {
      // Ready already, or stopped by an xrun/suspend (recovered: the caller transfers next)?
      switch (this.state()) {
        case "xrun":
          this.#recoverOrThrow("snd_pcm_wait", -EPIPE);
          return true;
        case "suspended": {
          this.#recoverOrThrow("snd_pcm_wait", -ESTRPIPE);
          if (this.state() !== "suspended") return true;
          // Not back yet (resume said -EAGAIN): look again in short steps until the deadline
          // instead of returning at once, which had the caller's loop spin a CPU for as long as
          // the device stayed suspended.
          const left = deadline - performance.now();
          if (left <= 0) return false;
          sleepMs(Math.min(left, SUSPEND_POLL_MS));
          continue;
        }
        case "disconnected":
          throw new AlsaError("snd_pcm_wait", -ENODEV, this.name);
      }
      const avail = Number(c.snd_pcm_avail_update(pcm));
      if (avail < 0) {
        this.#recoverOrThrow("snd_pcm_avail_update", avail);
        return true;
      }
      if (avail >= this.periodFrames) return true;
      const left = Math.ceil(deadline - performance.now());
      if (left <= 0) return false;
      const n = c.snd_pcm_poll_descriptors(pcm, pfds, count);
      if (n < 0) throw new AlsaError("snd_pcm_poll_descriptors", n, this.name);
      this.#polls++;
      const polled = libc().poll(pfds, n === count ? this.#pfdCount : BigInt(n), left);
      if (polled <= 0) continue; // timeout (the deadline check returns false) or EINTR
      const rc = c.snd_pcm_poll_descriptors_revents(pcm, pfds, n, revents);
      if (rc < 0) throw new AlsaError("snd_pcm_poll_descriptors_revents", rc, this.name);
      const ev = revents[0]!;
      if (ev & (POLLERR | POLLNVAL)) {
        const state = this.state();
        if (state === "xrun" || state === "suspended" || state === "disconnected") continue;
        throw new AlsaError("snd_pcm_wait", -EIO, this.name, "poll reported an error");
      }
      if (ev & (POLLIN | POLLOUT)) return true;
      // Woken, yet not ready: PulseAudio's plugin keeps its descriptor readable while less than
      // a period is there, so polling again at once would spin (measured: a poll every 0.5 ms
      // for most of each 10 ms period). Sleep the time the missing frames take, then look again.
      this.#spuriousWakeups++;
      const missing = this.periodFrames - avail;
      sleepMs(Math.max(1, Math.min(deadline - performance.now(), (missing * 1000) / this.rate)));
    }
  }

  /**
   * Times {@link Pcm.wait} was woken by the device's descriptor while the device was not ready
   * (and slept the missing frames' time instead of polling again at once).
   */
  get spuriousWakeups(): number {
    return this.#spuriousWakeups;
  }

  /** Times {@link Pcm.wait} called `poll(2)` on the device's descriptors. */
  get polls(): number {
    return this.#polls;
  }

  /** Frames that can be transferred now (`snd_pcm_avail_update`); 0 after recovering an xrun. */
  avail(): number {
    const rc = Number(alsa().snd_pcm_avail_update(this.#handle("snd_pcm_avail_update")));
    return rc >= 0 ? rc : this.#recoverOrThrow("snd_pcm_avail_update", rc);
  }

  /**
   * The device's channel positions (`snd_pcm_get_chmap`), one per channel; null when the device
   * reports none (file PCMs, most plugins) or a map of another channel count.
   */
  channelMap(): ChannelPosition[] | null {
    const map = alsa().snd_pcm_get_chmap(this.#handle("snd_pcm_get_chmap"));
    if (map === null) return null;
    try {
      const view = new Deno.UnsafePointerView(map);
      const n = view.getUint32(0);
      if (n !== this.channels) return null;
      return Array.from({ length: n }, (_, i) => {
        // The low 16 bits are the position; above them, flags (phase inverse, driver specific).
        const p = view.getUint32(4 + 4 * i) & 0xffff;
        return CHANNEL_POSITIONS[p] ?? "UNKNOWN";
      });
    } finally {
      libc().free(map);
    }
  }

  /**
   * Frames between the application and the device (`snd_pcm_delay`): for playback, how long until
   * a frame written now is heard; for capture, how long ago the next frame to read was captured.
   * 0 after recovering an xrun.
   */
  delay(): number {
    const rc = alsa().snd_pcm_delay(this.#handle("snd_pcm_delay"), this.#delayOut);
    if (rc < 0) return this.#recoverOrThrow("snd_pcm_delay", rc);
    // Little-endian int64 from two int32 halves: no BigInt per call.
    return this.#delayWords[1]! * 4294967296 + (this.#delayWords[0]! >>> 0);
  }

  /**
   * Frames available and the wall-clock time of the last hardware pointer update
   * (`snd_pcm_htimestamp`). For capture, the oldest available frame was captured about
   * `avail / rate` seconds before `epochMs`.
   */
  htimestamp(): PcmTimestamp {
    const avail = new BigUint64Array(1);
    const ts = new BigInt64Array(2);
    check(
      alsa().snd_pcm_htimestamp(this.#handle("snd_pcm_htimestamp"), avail, ts),
      "snd_pcm_htimestamp",
      this.name,
    );
    return { avail: Number(avail[0]!), epochMs: Number(ts[0]!) * 1000 + Number(ts[1]!) / 1e6 };
  }

  /** Prepares the PCM for use again (after `drop`, `drain` or an error). */
  prepare(): void {
    check(alsa().snd_pcm_prepare(this.#handle("snd_pcm_prepare")), "snd_pcm_prepare", this.name);
  }

  /** Starts the PCM explicitly (capture otherwise starts on the first read or wait). */
  start(): void {
    check(alsa().snd_pcm_start(this.#handle("snd_pcm_start")), "snd_pcm_start", this.name);
  }

  /** Stops at once, discarding pending frames; call {@link Pcm.prepare} to use it again. */
  drop(): void {
    check(alsa().snd_pcm_drop(this.#handle("snd_pcm_drop")), "snd_pcm_drop", this.name);
  }

  /**
   * Lets pending playback frames play out, waiting at most `timeoutMs` (default: the time the
   * whole buffer takes plus one second). Returns true when everything played; false when the
   * deadline passed, in which case the rest was dropped. Capture is simply stopped. Afterwards the
   * PCM is stopped (state "setup"); call {@link Pcm.prepare} to use it again.
   *
   * `snd_pcm_drain` is not used: the PulseAudio plugin's drain blocks until the server has played
   * everything, even on a non-blocking PCM (2 s measured). Instead this watches `snd_pcm_delay`
   * fall to zero (or the final underrun), sleeping this thread in short steps, then drops.
   */
  drain(timeoutMs?: number): boolean {
    const timeout = timeoutMs === undefined
      ? Math.min(MAX_TIMEOUT_MS, Math.ceil(this.bufferFrames * 1000 / this.rate) + 1000)
      : checkInteger("timeout (ms)", timeoutMs, 0, MAX_TIMEOUT_MS);
    const pcm = this.#handle("snd_pcm_drain");
    const c = alsa();
    const deadline = performance.now() + timeout;
    let complete = true;
    if (this.stream === "playback") {
      if (this.state() === "prepared" && this.avail() < this.bufferFrames) {
        // Less than the start threshold was written: start, or it would never play.
        check(c.snd_pcm_start(pcm), "snd_pcm_start", this.name);
      }
      const out = new BigInt64Array(1);
      for (;;) {
        const state = this.state();
        if (state !== "running" && state !== "draining") break; // stopped, or the final underrun
        if (c.snd_pcm_delay(pcm, out) < 0 || out[0]! <= 0n) break; // -EPIPE: ran dry
        const left = deadline - performance.now();
        if (left <= 0) {
          complete = false;
          break;
        }
        sleepMs(Math.max(1, Math.min(left, Number(out[0]!) * 1000 / this.rate, DRAIN_POLL_MS)));
      }
    }
    check(c.snd_pcm_drop(pcm), "snd_pcm_drop", this.name);
    return complete;
  }

  /** The PCM's state, e.g. "prepared", "running", "xrun". */
  state(): PcmState {
    const s = alsa().snd_pcm_state(this.#handle("snd_pcm_state"));
    const name = PCM_STATES[s];
    if (name === undefined) {
      throw new AlsaError("snd_pcm_state", -EBADFD, this.name, `unknown state ${s}`);
    }
    return name;
  }

  /**
   * An opaque token for this open PCM, for {@link Pcm.closeOrphan}: a worker that may be
   * retired while holding the PCM publishes the token in shared memory, so that another thread can
   * take the device over and release it.
   */
  get orphanToken(): bigint {
    return orphanToken(this.#pcm);
  }

  /**
   * Closes a PCM left open by a retired worker, given its {@link orphanToken}. Only call it once
   * the thread that opened the PCM no longer uses it and the token was not cleared by a `close()`.
   */
  static closeOrphan(token: bigint): void {
    const pcm = orphanPointer(token);
    if (pcm === null) return;
    const rc = alsa().snd_pcm_close(pcm);
    if (rc < 0) throw new AlsaError("snd_pcm_close", rc, "(orphan)");
  }

  /** Closes the PCM (pending playback is dropped; see {@link Pcm.drain}). Idempotent. */
  close(): void {
    const pcm = this.#pcm;
    if (pcm === null) return;
    this.#pcm = null;
    leaked.unregister(this);
    const rc = alsa().snd_pcm_close(pcm);
    if (rc < 0) throw new AlsaError("snd_pcm_close", rc, this.name);
  }

  /** Same as {@link Pcm.close}. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** `BigInt(n)`, cached for the last `n` (frame counts repeat): no BigInt per transfer. */
  #big(n: number): bigint {
    if (n !== this.#lastN) {
      this.#lastN = n;
      this.#lastBig = BigInt(n);
    }
    return this.#lastBig;
  }

  #handle(fn: string): Deno.PointerObject {
    if (this.#pcm === null) throw new AlsaError(fn, -EBADFD, this.name, "the PCM is closed");
    return this.#pcm;
  }

  #checkTransfer(buf: Int16Array, frames: number | undefined): number {
    if (!(buf instanceof Int16Array)) {
      throw new TypeError(`Invalid sample buffer ${quote(buf)}: expected an Int16Array`);
    }
    const fit = Math.floor(buf.length / this.channels);
    if (frames === undefined) return fit;
    if (typeof frames !== "number") {
      throw new TypeError(`Invalid frame count ${quote(frames)}: expected an integer number`);
    }
    if (!Number.isInteger(frames) || frames < 0) {
      throw new RangeError(
        `Invalid frame count ${quote(frames)}: expected a non-negative integer`,
      );
    }
    if (frames > fit) {
      throw new RangeError(
        `Invalid frame count ${frames}: the buffer of ${buf.length} samples holds ${fit} frames ` +
          `of ${this.channels} channels`,
      );
    }
    return frames;
  }

  /**
   * Handles a negative return: -EAGAIN/-EINTR give 0 (try again), -EPIPE/-ESTRPIPE are recovered
   * and counted (0), anything else throws.
   */
  #recoverOrThrow(fn: string, rc: number): number {
    const pcm = this.#handle(fn);
    const c = alsa();
    if (rc === -EAGAIN || rc === -EINTR) return 0;
    if (rc === -EPIPE) {
      check(c.snd_pcm_recover(pcm, rc, 1), "snd_pcm_recover", this.name);
      this.#xruns++;
      return 0;
    }
    if (rc === -ESTRPIPE) {
      // snd_pcm_recover would sleep until the device resumes, without a bound: resume once and,
      // if the device is still suspended, report "nothing transferred" so the caller retries.
      if (!this.#inSuspend) {
        this.#inSuspend = true;
        this.#suspends++;
      }
      const resumed = c.snd_pcm_resume(pcm);
      if (resumed === -EAGAIN) return 0;
      if (resumed < 0) check(c.snd_pcm_prepare(pcm), "snd_pcm_prepare", this.name);
      this.#inSuspend = false;
      return 0;
    }
    throw new AlsaError(fn, rc, this.name);
  }
}

function check(rc: number, fn: string, device: string): void {
  if (rc < 0) throw new AlsaError(fn, rc, device);
}

function configureHw(
  c: Symbols,
  pcm: Deno.PointerObject,
  name: string,
  want: { channels: number; rate: number; periodFrames: number; bufferFrames: number },
): { channels: number; rate: number; periodFrames: number; bufferFrames: number } {
  const out = new BigUint64Array(1);
  check(c.snd_pcm_hw_params_malloc(out), "snd_pcm_hw_params_malloc", name);
  const params = Deno.UnsafePointer.create(out[0]!);
  if (params === null) throw new AlsaError("snd_pcm_hw_params_malloc", -EBADFD, name, "no memory");
  try {
    check(c.snd_pcm_hw_params_any(pcm, params), "snd_pcm_hw_params_any", name);
    check(
      c.snd_pcm_hw_params_set_access(pcm, params, SND_PCM_ACCESS_RW_INTERLEAVED),
      "snd_pcm_hw_params_set_access",
      name,
    );
    check(
      c.snd_pcm_hw_params_set_format(pcm, params, SND_PCM_FORMAT_S16_LE),
      "snd_pcm_hw_params_set_format",
      name,
    );
    check(
      c.snd_pcm_hw_params_set_channels(pcm, params, want.channels),
      "snd_pcm_hw_params_set_channels",
      name,
    );
    const u32 = new Uint32Array([want.rate]);
    const dir = new Int32Array(1);
    check(
      c.snd_pcm_hw_params_set_rate_near(pcm, params, u32, dir),
      "snd_pcm_hw_params_set_rate_near",
      name,
    );
    // Buffer before period: a device whose buffer is bounded keeps at least two periods in it.
    const frames = new BigUint64Array([BigInt(want.bufferFrames)]);
    check(
      c.snd_pcm_hw_params_set_buffer_size_near(pcm, params, frames),
      "snd_pcm_hw_params_set_buffer_size_near",
      name,
    );
    frames[0] = BigInt(want.periodFrames);
    dir[0] = 0;
    check(
      c.snd_pcm_hw_params_set_period_size_near(pcm, params, frames, dir),
      "snd_pcm_hw_params_set_period_size_near",
      name,
    );
    check(c.snd_pcm_hw_params(pcm, params), "snd_pcm_hw_params", name);

    check(c.snd_pcm_hw_params_get_channels(params, u32), "snd_pcm_hw_params_get_channels", name);
    const channels = u32[0]!;
    check(c.snd_pcm_hw_params_get_rate(params, u32, dir), "snd_pcm_hw_params_get_rate", name);
    const rate = u32[0]!;
    check(
      c.snd_pcm_hw_params_get_period_size(params, frames, dir),
      "snd_pcm_hw_params_get_period_size",
      name,
    );
    const periodFrames = Number(frames[0]!);
    check(
      c.snd_pcm_hw_params_get_buffer_size(params, frames),
      "snd_pcm_hw_params_get_buffer_size",
      name,
    );
    const bufferFrames = Number(frames[0]!);
    return { channels, rate, periodFrames, bufferFrames };
  } finally {
    c.snd_pcm_hw_params_free(params);
  }
}

function configureSw(
  c: Symbols,
  pcm: Deno.PointerObject,
  name: string,
  stream: "capture" | "playback",
  periodFrames: number,
): void {
  const out = new BigUint64Array(1);
  check(c.snd_pcm_sw_params_malloc(out), "snd_pcm_sw_params_malloc", name);
  const params = Deno.UnsafePointer.create(out[0]!);
  if (params === null) throw new AlsaError("snd_pcm_sw_params_malloc", -EBADFD, name, "no memory");
  try {
    check(c.snd_pcm_sw_params_current(pcm, params), "snd_pcm_sw_params_current", name);
    // Playback starts once one period is queued; capture starts on the first read.
    check(
      c.snd_pcm_sw_params_set_start_threshold(
        pcm,
        params,
        BigInt(stream === "playback" ? periodFrames : 1),
      ),
      "snd_pcm_sw_params_set_start_threshold",
      name,
    );
    check(
      c.snd_pcm_sw_params_set_avail_min(pcm, params, BigInt(periodFrames)),
      "snd_pcm_sw_params_set_avail_min",
      name,
    );
    check(
      c.snd_pcm_sw_params_set_tstamp_mode(pcm, params, SND_PCM_TSTAMP_ENABLE),
      "snd_pcm_sw_params_set_tstamp_mode",
      name,
    );
    // Timestamps on the wall clock, so they compare with Date.now() (the default may be
    // CLOCK_MONOTONIC, whose origin JavaScript cannot see).
    if (c.snd_pcm_sw_params_set_tstamp_type !== null) {
      check(
        c.snd_pcm_sw_params_set_tstamp_type(pcm, params, SND_PCM_TSTAMP_TYPE_GETTIMEOFDAY),
        "snd_pcm_sw_params_set_tstamp_type",
        name,
      );
    }
    check(c.snd_pcm_sw_params(pcm, params), "snd_pcm_sw_params", name);
  } finally {
    c.snd_pcm_sw_params_free(params);
  }
}

/** Bounded sleep of the calling thread (drain only; allowed on the main thread in Deno). */
const sleepCell = new Int32Array(new SharedArrayBuffer(4));
function sleepMs(ms: number): void {
  Atomics.wait(sleepCell, 0, 0, ms);
}
