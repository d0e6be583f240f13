/**
 * Channel mixing of captured audio to the preset's stereo or mono, by the device's channel
 * positions.
 *
 * Decisions:
 * - **Positions** come from the device's ALSA channel map (`Pcm.channelMap`: HDMI and USB audio
 *   report theirs). A device without one (file PCMs, plugins) is read in ALSA's standard orders
 *   ({@link defaultChannelMap}: 4 channels FL FR RL RR, 6 FL FR RL RR FC LFE, 8 + SL SR, …).
 * - **Stereo** is the usual downmix without normalisation: L = FL + 0.707·(FC + RL + SL) (and the
 *   like for R); LFE is dropped; a rear centre goes to both at −6 dB. A stereo programme on a
 *   multichannel device keeps its level; full-scale surround content may clip, and is clamped.
 *   (Taking channels 0 and 1 only, as before, lost the centre channel — a 5.1 film's dialogue.)
 * - **Mono** is (L + R) / 2 of that stereo downmix: the same level as the stereo presets, so that a
 *   change between them does not change loudness (averaging all channels put a stereo programme
 *   on a 6-channel device 9.5 dB lower at the mono preset).
 * - A channel of unknown position counts as front left or right when it is channel 0 or 1 of
 *   several (as a device without a map is read), as both when it is the only one; any other is
 *   left out, as LFE is.
 *
 * @module
 */

import type { ChannelPosition } from "../../ffi/alsa.ts";

/** ALSA's standard channel orders by channel count (its `surround*` PCMs, HDMI's defaults). */
export function defaultChannelMap(channels: number): ChannelPosition[] {
  const orders: Record<number, ChannelPosition[]> = {
    1: ["MONO"],
    2: ["FL", "FR"],
    3: ["FL", "FR", "LFE"],
    4: ["FL", "FR", "RL", "RR"],
    5: ["FL", "FR", "RL", "RR", "FC"],
    6: ["FL", "FR", "RL", "RR", "FC", "LFE"],
    7: ["FL", "FR", "RL", "RR", "FC", "LFE", "RC"],
    8: ["FL", "FR", "RL", "RR", "FC", "LFE", "SL", "SR"],
  };
  const known = orders[channels];
  if (known) return [...known];
  return Array.from({ length: channels }, (_, i) => i === 0 ? "FL" : i === 1 ? "FR" : "UNKNOWN");
}

const HALF_POWER = Math.SQRT1_2;

/** [to left, to right] of one position in the stereo downmix. */
function stereoWeights(p: ChannelPosition): readonly [number, number] {
  switch (p) {
    case "MONO":
      return [1, 1];
    case "FL":
    case "FLC":
    case "FLW":
    case "FLH":
    case "TFL":
    case "TFLC":
      return [1, 0];
    case "FR":
    case "FRC":
    case "FRW":
    case "FRH":
    case "TFR":
    case "TFRC":
      return [0, 1];
    case "FC":
    case "FCH":
    case "TFC":
    case "TC":
      return [HALF_POWER, HALF_POWER];
    case "RL":
    case "SL":
    case "RLC":
    case "TRL":
    case "TSL":
    case "BLC":
      return [HALF_POWER, 0];
    case "RR":
    case "SR":
    case "RRC":
    case "TRR":
    case "TSR":
    case "BRC":
      return [0, HALF_POWER];
    case "RC":
    case "TRC":
    case "BC":
      return [0.5, 0.5];
    default: // LFE, LLFE, RLFE, NA, UNKNOWN
      return [0, 0];
  }
}

/**
 * The mixing matrix from `map`'s channels to `outChannels` (1 or 2): `outChannels × map.length`
 * weights, row-major (output channel by output channel).
 */
export function downmixMatrix(
  map: readonly ChannelPosition[],
  outChannels: 1 | 2,
): Float32Array {
  const n = map.length;
  const m = new Float32Array(outChannels * n);
  map.forEach((p, c) => {
    let [l, r] = stereoWeights(p);
    if ((p === "UNKNOWN" || p === "NA") && c < 2 && n > 1) [l, r] = c === 0 ? [1, 0] : [0, 1];
    if (p === "UNKNOWN" && n === 1) [l, r] = [1, 1];
    if (outChannels === 2) {
      m[c] = l;
      m[n + c] = r;
    } else {
      m[c] = (l + r) / 2;
    }
  });
  return m;
}

/**
 * Mixes `frames` frames of `src` (`matrix.length / outChannels` interleaved channels) into `dst`
 * (`outChannels` interleaved), clamped to int16.
 */
export function mixFrames(
  src: Int16Array,
  dst: Int16Array,
  frames: number,
  matrix: Float32Array,
  outChannels: 1 | 2,
): void {
  const inCh = matrix.length / outChannels;
  for (let i = 0; i < frames; i++) {
    const base = i * inCh;
    for (let o = 0; o < outChannels; o++) {
      const row = o * inCh;
      let v = 0;
      for (let c = 0; c < inCh; c++) v += matrix[row + c]! * src[base + c]!;
      v = Math.round(v);
      dst[i * outChannels + o] = v > 32767 ? 32767 : v < -32768 ? -32768 : v;
    }
  }
}
