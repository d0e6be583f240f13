/**
 * Test helpers that judge audio by content — frequency and level — not by bytes.
 *
 * @module
 */

/** Interleaved int16 sine tone: `frames` sample frames of `channels` channels at `rate` Hz. */
export function tone(
  { freq, rate = 48000, channels = 1, frames, amplitude = 0.5, phase = 0 }: {
    freq: number;
    rate?: number;
    channels?: number;
    frames: number;
    amplitude?: number;
    phase?: number;
  },
): Int16Array {
  const out = new Int16Array(frames * channels);
  for (let i = 0; i < frames; i++) {
    const v = Math.round(Math.sin(2 * Math.PI * freq * (i + phase) / rate) * amplitude * 32767);
    for (let c = 0; c < channels; c++) out[i * channels + c] = v;
  }
  return out;
}

/** One channel of interleaved int16 samples as floats in [-1, 1). */
export function channel(samples: Int16Array, channels: number, index = 0): Float64Array {
  const n = Math.floor(samples.length / channels);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = samples[i * channels + index]! / 32768;
  return out;
}

/** RMS level in dBFS of float samples (a full-scale sine is -3.01 dBFS). */
export function rmsDb(x: Float64Array): number {
  let sum = 0;
  for (const v of x) sum += v * v;
  return 10 * Math.log10(sum / Math.max(1, x.length) + 1e-20);
}

/**
 * Dominant frequency of `x` (sampled at `rate`), found by a coarse DFT scan from `lo` to `hi` Hz
 * and refined by a golden-section search on the magnitude — accurate to well under 0.1 %.
 */
export function dominantFrequency(x: Float64Array, rate: number, lo = 50, hi = 12000): number {
  const mag = (f: number) => {
    let re = 0, im = 0;
    const w = 2 * Math.PI * f / rate;
    for (let i = 0; i < x.length; i++) {
      const win = 0.5 - 0.5 * Math.cos(2 * Math.PI * i / (x.length - 1)); // Hann
      re += x[i]! * win * Math.cos(w * i);
      im -= x[i]! * win * Math.sin(w * i);
    }
    return re * re + im * im;
  };
  const step = Math.max(1, rate / x.length);
  let best = lo, bestMag = -1;
  for (let f = lo; f <= hi; f += step) {
    const m = mag(f);
    if (m > bestMag) [best, bestMag] = [f, m];
  }
  let a = best - step, b = best + step;
  const g = (Math.sqrt(5) - 1) / 2;
  for (let i = 0; i < 40; i++) {
    const c = b - g * (b - a), d = a + g * (b - a);
    if (mag(c) > mag(d)) b = d;
    else a = c;
  }
  return (a + b) / 2;
}

/** Skips `skip` leading frames and keeps `keep` frames (for trimming codec start-up). */
export function window(x: Float64Array, skip: number, keep: number): Float64Array {
  return x.subarray(skip, Math.min(x.length, skip + keep));
}

/** Creates a temporary directory removed by the returned disposer. */
export async function tempDir(
  prefix = "kvm-audio-test-",
): Promise<AsyncDisposable & { path: string }> {
  const path = await Deno.makeTempDir({ prefix });
  return {
    path,
    async [Symbol.asyncDispose]() {
      await Deno.remove(path, { recursive: true }).catch(() => {});
    },
  };
}
