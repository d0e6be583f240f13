/**
 * Short waits of the main thread for something a worker does, by polling shared memory.
 *
 * @module
 */

/**
 * How long the main thread waits for a worker to finish a C-library call on a socket the main
 * thread lent it (an RTP send or read) before it gives up on the call: the calls are
 * non-blocking, so only a worker terminated or stalled inside one takes that long.
 */
export const WORKER_CALL_WAIT_MS = 2000;

/**
 * Checks `done` every millisecond until it holds or `timeoutMs` passed; resolves with its last
 * answer.
 */
export async function pollUntil(done: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = performance.now() + timeoutMs;
  while (!done() && performance.now() < end) {
    await new Promise((r) => setTimeout(r, 1));
  }
  return done();
}
