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
