/**
 * `deno task compile [--target T…] [--outdir DIR]`: one executable per target
 * (`aarch64-unknown-linux-gnu`, `x86_64-unknown-linux-gnu`; both by default), with the workers and
 * the page embedded and the permissions baked in.
 *
 * `deno compile` builds on a `denort` base runtime it downloads from Deno's own host. Where that
 * host cannot be reached, set `DENORT_BIN_AARCH64` / `DENORT_BIN_X86_64` (or `DENORT_BIN` for a
 * single target) to a `denort` binary of the same Deno version (2.9.5) and that target.
 *
 * @module
 */

import { parseArgs } from "node:util";

/** The targets and the variable naming each one's `denort`. */
export const TARGETS = {
  "aarch64-unknown-linux-gnu": "DENORT_BIN_AARCH64",
  "x86_64-unknown-linux-gnu": "DENORT_BIN_X86_64",
} as const;
export type Target = keyof typeof TARGETS;

/**
 * V8 flags of the service (`deno task start`, the executable, the benchmarks' service children):
 * - `--max-semi-space-size=1`: a young generation capped at 1 MB semi-spaces. V8 otherwise grows
 *   it to 16 MB semi-spaces under a steady allocation rate — per isolate, and the service has
 *   three (main and two workers) — and keeps that memory: 30 MB more RSS after 10⁶ frames with
 *   nothing more live (heap used stays 7 MB). Capped, RSS stays within 8 % of its level after
 *   10⁴ frames, at no measurable CPU cost (`deno task bench engine`, README "Figures"). A KVM
 *   device's RAM is small.
 * - `--no-maglev`: hot functions go from the baseline tier straight to TurboFan. Code compiled by
 *   Maglev calls FFI symbols through V8's slow path — two trivial libc calls took 125 ns under
 *   Maglev (`--no-turbofan`) against 8 ns under TurboFan — and V8 leaves much of the workers'
 *   per-period code at that tier for good: `Pcm.wait`, `takeRtp`, `readRtp`, `inspectPacket` and
 *   the playout's `next` were still Maglev code after 150 s of paced streaming (`perf` with
 *   `--perf-basic-prof`). Steady state on the paced devices (both pipelines at ultra, RTP to
 *   itself, per-thread CPU over 60 s after a 120 s warm-up, two alternating pairs): output worker
 *   1.20 and 1.41 CPU-s per audio minute against 1.52 and 1.59, input worker 0.82 and 1.06
 *   against 1.13 and 1.16, whole process 3.02 and 3.63 against 3.82 and 3.97. The cost is more
 *   TurboFan compilation in the first minute.
 * - `--invocation-count-for-turbofan=1000`, `--invocation-count-for-osr=100`,
 *   `--minimum-invocations-after-ic-update=50` (V8's defaults 3000, 500, 500): hot code reaches
 *   TurboFan sooner. A function's tier-up budget is that count times its bytecode size, and a
 *   worker's loop turns once per audio period, not thousands of times a second. With the
 *   defaults, on the paced devices, V8 first optimised the output worker's capture loop 30 s
 *   after start and the input worker's playout loop 75 s after (`--trace-opt`). Each microphone
 *   start is a new worker, so a short microphone session ran in baseline code, whose FFI calls
 *   take V8's slow path. With these flags: 11 s and 26 s. Whole process, per-thread CPU from
 *   5 s to 45 s after start (both pipelines at ultra, RTP to itself), three alternating runs
 *   each: 3.86, 4.07, 3.87 CPU-s per audio minute against 4.62, 4.91, 4.19 with the defaults.
 *   A count of 300 saved a little more (3.63, 3.24, 3.96), but start-up went from 113–115 to
 *   129–163 ms and RSS rose 2.4–4.6 MiB (`bench footprint`): more of the main thread's code got
 *   optimised. At 1000: 125 ms, RSS within 0.5 MiB of the defaults'.
 */
export const V8_FLAGS = [
  "--max-semi-space-size=1",
  "--no-maglev",
  "--invocation-count-for-turbofan=1000",
  "--invocation-count-for-osr=100",
  "--minimum-invocations-after-ic-update=50",
];

/** Permissions and V8 flags baked into the executable: the same as `deno task start`. */
export const RUNTIME_FLAGS = [
  `--v8-flags=${V8_FLAGS.join(",")}`,
  "--allow-ffi",
  "--allow-read",
  "--allow-write",
  "--allow-env",
  "--allow-net",
  "--allow-sys=hostname,osRelease",
];

/** Modules loaded at run time that static analysis does not see: the pipeline workers. */
export const INCLUDES = ["lib/pipeline/output_worker.ts", "lib/pipeline/input_worker.ts"];

/** The `deno compile` arguments for one target. */
export function compileArgs(target: Target, outdir: string): string[] {
  return [
    "compile",
    "--target",
    target,
    ...INCLUDES.flatMap((f) => ["--include", f]),
    ...RUNTIME_FLAGS,
    "--output",
    `${outdir}/kvm-audio-${target}`,
    "main.ts",
  ];
}

function denortFor(target: Target, single: boolean): string | undefined {
  return Deno.env.get(TARGETS[target]) || (single ? Deno.env.get("DENORT_BIN") : undefined);
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: { target: { type: "string", multiple: true }, outdir: { type: "string" } },
  });
  const targets = (values.target ?? Object.keys(TARGETS)) as string[];
  for (const t of targets) {
    if (!Object.hasOwn(TARGETS, t)) {
      console.error(`Unknown --target "${t}": expected one of ${Object.keys(TARGETS).join(", ")}`);
      Deno.exit(2);
    }
  }
  const outdir = values.outdir ?? "dist";
  Deno.mkdirSync(outdir, { recursive: true });
  let failed = 0;
  for (const target of targets as Target[]) {
    const denort = denortFor(target, targets.length === 1);
    // The child's environment is this one without DENORT_BIN, plus the runtime for this target:
    // a DENORT_BIN inherited for several targets built every one from the same runtime (an
    // x86-64 file named for aarch64).
    const env = Deno.env.toObject();
    delete env.DENORT_BIN;
    if (denort) env.DENORT_BIN = denort;
    console.error(`compile: ${target}${denort ? ` with DENORT_BIN=${denort}` : ""}`);
    const out = await new Deno.Command(Deno.execPath(), {
      args: compileArgs(target, outdir),
      clearEnv: true,
      env,
      stdout: "inherit",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(out.stderr);
    await Deno.stderr.write(out.stderr);
    if (!out.success) {
      failed++;
      if (!denort && /denort|download|dl\.deno\.land|error sending request|dns/i.test(err)) {
        console.error(
          `compile: deno compile could not download its denort base runtime for ${target} ` +
            `(no access to Deno's download host). Set ${TARGETS[target]} (or DENORT_BIN when ` +
            `compiling one target) to the path of a denort 2.9.5 binary for ${target}, e.g. ` +
            `unzipped from denort-${target}.zip of the Deno 2.9.5 release.`,
        );
      }
    }
  }
  Deno.exit(failed ? 1 : 0);
}
