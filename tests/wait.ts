/**
 * Waiting helpers with no imports, shared by the tests ({@link ./net_util.ts} re-exports them) and
 * the benchmarks' child processes, which must not load the tests' heavier helpers into the
 * process they measure.
 *
 * @module
 */

/** Resolves after `ms` milliseconds. */
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * Polls `cond` every `intervalMs` until it holds; throws `Timed out waiting for <what>` once
 * `timeoutMs` has passed without it.
 */
export async function until(
  what: string,
  cond: () => boolean | Promise<boolean>,
  timeoutMs = 20_000,
  intervalMs = 20,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await sleep(intervalMs);
  }
}
