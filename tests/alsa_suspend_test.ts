/**
 * A suspended PCM (system or USB-gadget suspend): `Pcm.wait` must not return "ready" at once
 * while the device cannot resume yet, or a worker's wait-and-read loop spins a CPU for as long as
 * the suspend lasts. No virtual device can be suspended, so a small stand-in library
 * (fixtures/alsa_suspend_shim.c, linked against the real libasound) reports the suspend.
 */
import assert from "node:assert/strict";
import { tempDir } from "./audio_util.ts";

const here = new URL(".", import.meta.url).pathname;

/** Builds the stand-in libasound into `dir`; returns its path. */
async function buildShim(dir: string): Promise<string> {
  const shim = `${dir}/libasound_suspend.so`;
  const cc = await new Deno.Command(Deno.env.get("CC") ?? "cc", {
    args: [
      "-shared",
      "-fPIC",
      "-O2",
      "-o",
      shim,
      `${here}fixtures/alsa_suspend_shim.c`,
      "-Wl,--no-as-needed",
      "-l:libasound.so.2",
      "-ldl",
    ],
    stderr: "piped",
  }).output();
  assert.ok(cc.success, new TextDecoder().decode(cc.stderr));
  return shim;
}

/** Runs `fixtures/<child>` on the shim; returns the JSON line it printed last. */
async function runSuspended<T>(child: string, args: string[] = []): Promise<T> {
  await using dir = await tempDir();
  const shim = await buildShim(dir.path);
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${here}fixtures/${child}`, ...args],
    env: { KVM_AUDIO_LIBASOUND: shim, KVM_TEST_SUSPEND_FLAG: `${dir.path}/suspended` },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.ok(out.success, text + new TextDecoder().decode(out.stderr));
  return JSON.parse(text.trim().split("\n").at(-1)!);
}

// Built with the host's C compiler against the host's libasound.
const ignore = Deno.env.get("KVM_AUDIO_TEST_EMULATED") === "1";

Deno.test({
  name: "a suspended capture PCM: wait sleeps in steps instead of spinning, and reading resumes",
  ignore,
  async fn() {
    const r = await runSuspended<
      { loops: number; readyWhileSuspended: number; framesAfter: number; suspends: number }
    >(
      "alsa_suspend_child.ts",
      ["1000"],
    );
    // One second suspended: each wait(100) sleeps its 100 ms in 20 ms steps and says "not
    // ready" — about ten loops. Before, wait returned true at once: ~190 000 loops a second.
    assert.ok(r.loops <= 20, `${r.loops} loops in 1 s of suspend`);
    assert.equal(r.readyWhileSuspended, 0);
    assert.ok(r.framesAfter > 0, "reading resumes once the device is back");
    assert.equal(r.suspends, 1, "one suspend, counted once however often it was reported");
  },
});

Deno.test({
  name:
    "a suspended capture device: the RTP timestamp moves on by the suspend, as after an overrun",
  ignore,
  async fn() {
    const r = await runSuspended<{
      suspendedMs: number;
      gaps: { capturedMs: number; timestampMs: number }[];
      gapFrames: number;
    }>("alsa_suspend_service_child.ts");
    assert.equal(r.gaps.length, 1, JSON.stringify(r));
    const gap = r.gaps[0]!;
    assert.ok(gap.capturedMs >= 900, JSON.stringify(r));
    // The timestamp jumps by the gap, to a whole frame (before: by one frame, 20 ms).
    assert.ok(Math.abs(gap.timestampMs - gap.capturedMs) <= 40, JSON.stringify(r));
    assert.ok(r.gapFrames >= 40, `gap_frames ${r.gapFrames}`);
  },
});
