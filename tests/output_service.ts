/**
 * The output-only service the output pipeline tests build on a tone file, kept apart from
 * alsa_devices.ts so that the device helpers (which the benchmarks import too) do not pull in
 * the service.
 *
 * @module
 */

import { AudioService, type ServiceOptions } from "../lib/service.ts";
import { useCaptureFile } from "./alsa_devices.ts";
import { tone } from "./audio_util.ts";

/**
 * An output-only {@link AudioService} on `kvm_test_capture` (see {@link useCaptureFile}) holding
 * `seconds` of a stereo `freq` Hz tone at `amplitude` (default 0.4): clock-paced, ending with the
 * tone, unless `options` says otherwise. Disposing it closes the service, then restores the ALSA
 * configuration.
 */
export async function toneOutputService(
  dir: string,
  signal: { readonly freq: number; readonly seconds: number; readonly amplitude?: number },
  options: Partial<ServiceOptions> = {},
): Promise<{ readonly service: AudioService } & AsyncDisposable> {
  const samples = tone({
    freq: signal.freq,
    channels: 2,
    frames: 48000 * signal.seconds,
    amplitude: signal.amplitude ?? 0.4,
  });
  const config = await useCaptureFile(dir, samples);
  let service: AudioService;
  try {
    service = new AudioService({
      capture: "kvm_test_capture",
      playback: null,
      pace: "clock",
      maxCaptureSamples: 48000 * signal.seconds,
      ...options,
    });
  } catch (e) {
    config[Symbol.dispose]();
    throw e;
  }
  return {
    service,
    async [Symbol.asyncDispose]() {
      try {
        await service.close();
      } finally {
        config[Symbol.dispose]();
      }
    },
  };
}
