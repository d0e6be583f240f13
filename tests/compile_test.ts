import assert from "node:assert/strict";
import { compileArgs, INCLUDES, RUNTIME_FLAGS, TARGETS } from "../scripts/compile.ts";

const repo = new URL("..", import.meta.url).pathname;

Deno.test("compile embeds the workers and bakes in the permissions for both targets", () => {
  assert.deepEqual(Object.keys(TARGETS), ["aarch64-unknown-linux-gnu", "x86_64-unknown-linux-gnu"]);
  for (const target of Object.keys(TARGETS) as (keyof typeof TARGETS)[]) {
    const args = compileArgs(target, "dist");
    assert.deepEqual(args.slice(0, 3), ["compile", "--target", target]);
    for (const inc of INCLUDES) assert.ok(args.includes(inc), inc);
    for (const flag of RUNTIME_FLAGS) assert.ok(args.includes(flag), flag);
    assert.ok(args.includes("--allow-ffi"), "FFI unrestricted");
    assert.equal(args.at(-1), "main.ts");
    assert.ok(args.includes(`dist/kvm-audio-${target}`));
  }
  // The executable runs as `deno task start` does: same permissions, same V8 flags.
  const tasks = JSON.parse(Deno.readTextFileSync(`${repo}/deno.json`)).tasks as Record<
    string,
    string
  >;
  for (const flag of RUNTIME_FLAGS) assert.ok(tasks.start!.split(" ").includes(flag), flag);
  // The workers it embeds are the ones the service starts.
  for (const inc of INCLUDES) assert.ok(Deno.statSync(`${repo}/${inc}`).isFile);
});

/** Runs scripts/compile.ts with `args` and `env`: its exit code and standard error. */
async function compile(args: string[], env: Record<string, string>) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      "--allow-run",
      "scripts/compile.ts",
      ...args,
      "--outdir",
      await Deno.makeTempDir(),
    ],
    cwd: repo,
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, err: new TextDecoder().decode(out.stderr) };
}

Deno.test("compile says what to set when denort cannot be had", async () => {
  const { code, err } = await compile(["--target", "aarch64-unknown-linux-gnu"], {
    DENORT_BIN: "/nonexistent/denort",
  });
  assert.equal(code, 1);
  assert.match(err, /DENORT_BIN=\/nonexistent\/denort/);
});

Deno.test("compile for both targets does not hand one DENORT_BIN to both", async () => {
  // One runtime is for one target: inherited by both compiles, it built both from it (an
  // x86-64 file named for aarch64).
  const { code, err } = await compile([], { DENORT_BIN: "/nonexistent/denort-aarch64" });
  assert.equal(code, 1);
  assert.doesNotMatch(err, /nonexistent\/denort-aarch64/);
  for (const target of Object.keys(TARGETS)) assert.match(err, new RegExp(`compile: ${target}\n`));
});
