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
/** The largest |sample| of 16-bit `samples` from index `from` on, as a fraction of full scale. */
export function peakOf(samples: Int16Array, from = 0): number {
  let peak = 0;
  for (let i = from; i < samples.length; i++) peak = Math.max(peak, Math.abs(samples[i]!));
  return peak / 32768;
}

export function rmsDb(x: Float64Array): number {
  let sum = 0;
  for (const v of x) sum += v * v;
  return 10 * Math.log10(sum / Math.max(1, x.length) + 1e-20);
}

/** Squared DFT magnitude of `x` at frequency `f` (Goertzel). */
function power(x: Float64Array, f: number, rate: number): number {
  const coeff = 2 * Math.cos(2 * Math.PI * f / rate);
  let s1 = 0, s2 = 0;
  for (let i = 0; i < x.length; i++) {
    const s0 = x[i]! + coeff * s1 - s2;
    s2 = s1;
    s1 = s0;
  }
  return s1 * s1 + s2 * s2 - coeff * s1 * s2;
}

function hann(x: Float64Array): Float64Array {
  const n = x.length;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = x[i]! * (0.5 - 0.5 * Math.cos(2 * Math.PI * i / (n - 1)));
  return out;
}

/**
 * Dominant frequency of `x` (sampled at `rate`) between `lo` and `hi` Hz: a coarse scan over the
 * first 4096 samples finds the peak, a finer scan over all of `x` (half-bin steps) narrows it to
 * the main lobe, and a golden-section search on the Hann-windowed magnitude refines it — well
 * under 0.1 % for a steady tone of a second or more.
 */
export function dominantFrequency(x: Float64Array, rate: number, lo = 50, hi = 12000): number {
  const coarse = hann(x.subarray(0, Math.min(x.length, 4096)));
  const full = hann(x);
  const scan = (sig: Float64Array, from: number, to: number, step: number) => {
    let best = from, bestPower = -1;
    for (let f = from; f <= to; f += step) {
      const p = power(sig, f, rate);
      if (p > bestPower) [best, bestPower] = [f, p];
    }
    return best;
  };
  const cStep = rate / coarse.length;
  const c = scan(coarse, lo, hi, cStep);
  const fStep = rate / full.length / 2;
  const f = scan(full, Math.max(lo, c - 2 * cStep), c + 2 * cStep, fStep);
  let a = f - fStep, b = f + fStep;
  const g = (Math.sqrt(5) - 1) / 2;
  for (let i = 0; i < 30; i++) {
    const m1 = b - g * (b - a), m2 = a + g * (b - a);
    if (power(full, m1, rate) > power(full, m2, rate)) b = m2;
    else a = m1;
  }
  return (a + b) / 2;
}

/**
 * A voice-like test signal: a 140 Hz glottal-ish harmonic series with a slow syllable envelope and
 * a little noise. Opus's SILK layer treats it as active speech (a pure tone may be classed as
 * inactive, and then carries no in-band FEC).
 */
export function voiceLike(frames: number, rate = 48000, seed = 1): Int16Array {
  const out = new Int16Array(frames);
  let state = seed;
  const noise = () => {
    state = (state * 1103515245 + 12345) & 0x7fffffff;
    return state / 0x7fffffff - 0.5;
  };
  for (let i = 0; i < frames; i++) {
    let v = 0;
    for (let h = 1; h <= 12; h++) v += Math.sin(2 * Math.PI * 140 * h * i / rate) / h;
    const env = 0.6 + 0.4 * Math.sin(2 * Math.PI * 3 * i / rate);
    out[i] = Math.round(6000 * v * env + 300 * noise());
  }
  return out;
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

/** Mulberry32: a small seeded PRNG, uniform in [0, 1), so simulations repeat exactly. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
