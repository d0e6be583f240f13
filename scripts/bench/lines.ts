/** Reads newline-terminated lines from a child process's byte stream (benchmarks drive children). */
export class LineReader {
  readonly #reader: ReadableStreamDefaultReader<string>;
  #buffer = "";

  constructor(stream: ReadableStream<Uint8Array>) {
    this.#reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  }

  /** The next line without its newline, or undefined at the end of the stream. */
  async next(): Promise<string | undefined> {
    for (;;) {
      const nl = this.#buffer.indexOf("\n");
      if (nl >= 0) {
        const line = this.#buffer.slice(0, nl);
        this.#buffer = this.#buffer.slice(nl + 1);
        return line;
      }
      const { value, done } = await this.#reader.read();
      if (done) return undefined;
      this.#buffer += value;
    }
  }

  async cancel(): Promise<void> {
    await this.#reader.cancel().catch(() => {});
  }
}

/** Lines from this process's stdin until it closes (a child driven by its parent). */
export async function* stdinLines(): AsyncGenerator<string> {
  const lines = new LineReader(Deno.stdin.readable);
  try {
    for (let l = await lines.next(); l !== undefined; l = await lines.next()) yield l;
  } finally {
    await lines.cancel();
  }
}

/** What {@link endChild} needs of a child process driven over its stdin. */
export interface DrivenChild {
  readonly process: Deno.ChildProcess;
  readonly stdin: WritableStreamDefaultWriter<Uint8Array>;
  readonly lines: LineReader;
  readonly stderr: Promise<string>;
}

/**
 * Ends a child driven over its stdin: closes the stdin (its cue to finish), waits for it to exit
 * — SIGKILL after `killAfterMs` — and lets go of its output.
 */
export async function endChild(child: DrivenChild, killAfterMs: number): Promise<void> {
  await child.stdin.close().catch(() => {});
  const timer = setTimeout(() => {
    try {
      child.process.kill("SIGKILL");
    } catch {
      // Gone already.
    }
  }, killAfterMs);
  await child.process.status;
  clearTimeout(timer);
  await child.lines.cancel();
  await child.stderr.catch(() => "");
}
