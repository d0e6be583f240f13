/**
 * `deno task bench [--json] [NAME…]`: runs the project's benchmarks. Every figure is a ratio
 * against a baseline measured in the same run; `--json` prints one JSON object per line
 * (`{"name","value","unit","baseline","ratio"}`) so figures can be compared over time.
 *
 * Names select benchmarks: opus, ring, engine, e2e, footprint (default: all). `KVM_AUDIO_BENCH_QUICK=1`
 * shortens the engine and footprint runs; `KVM_AUDIO_BENCH_ARM64=1` adds the footprint figures
 * under emulated aarch64 (after `deno task test:arm64` installed it).
 *
 * @module
 */

import { type BenchResult, report } from "./bench/report.ts";
import { benchOpusCodec } from "./bench/opus_codec.ts";
import { benchRingHop } from "./bench/ring_hop.ts";
import { benchEngine } from "./bench/engine.ts";
import { benchFootprint } from "./bench/footprint.ts";
import { benchE2e } from "./bench/e2e.ts";

const BENCHES: Record<string, () => Promise<BenchResult[]>> = {
  opus: () => benchOpusCodec(),
  ring: () => benchRingHop(),
  engine: () => benchEngine({ quick: Deno.env.get("KVM_AUDIO_BENCH_QUICK") === "1" }),
  e2e: () => benchE2e({ quick: Deno.env.get("KVM_AUDIO_BENCH_QUICK") === "1" }),
  footprint: () =>
    benchFootprint({
      quick: Deno.env.get("KVM_AUDIO_BENCH_QUICK") === "1",
      arm64: Deno.env.get("KVM_AUDIO_BENCH_ARM64") === "1",
    }),
};

const args = Deno.args.filter((a) => a !== "--json");
const json = Deno.args.includes("--json");
const unknown = args.filter((a) => !Object.hasOwn(BENCHES, a));
if (unknown.length > 0) {
  console.error(
    `Unknown benchmark ${JSON.stringify(unknown[0])}: expected one of ${
      Object.keys(BENCHES).join(", ")
    }`,
  );
  Deno.exit(2);
}
const names = args.length > 0 ? args : Object.keys(BENCHES);
const all: BenchResult[] = [];
for (const name of names) {
  if (!json) console.error(`running ${name}…`);
  all.push(...await BENCHES[name]!());
}
report(all, json);
