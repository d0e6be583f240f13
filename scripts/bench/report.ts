/**
 * Shared shape of every benchmark figure: printed as a table for people and, with `--json`,
 * one JSON object per line so figures can be compared over time.
 *
 * @module
 */

/** One measured figure against a baseline measured in the same run. */
export interface BenchResult {
  /** What was measured, e.g. "opus encode fps (ultra)". */
  readonly name: string;
  /** The project's figure. */
  readonly value: number;
  /** Unit of `value` and `baseline`, e.g. "frames/s", "µs", "CPU-s/audio-min". */
  readonly unit: string;
  /** The baseline's figure in the same unit (native C loop, GStreamer, postMessage, …). */
  readonly baseline: number;
  /** `value ÷ baseline`. */
  readonly ratio: number;
  /** Optional goal and how to read it, e.g. "ratio >= 0.97". */
  readonly goal?: string;
}

/** Builds a result, computing the ratio. */
export function result(
  name: string,
  value: number,
  unit: string,
  baseline: number,
  goal?: string,
): BenchResult {
  const r = { name, value, unit, baseline, ratio: baseline === 0 ? NaN : value / baseline };
  return goal === undefined ? r : { ...r, goal };
}

function fmt(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  const a = Math.abs(n);
  return a >= 1000
    ? n.toFixed(0)
    : a >= 10
    ? n.toFixed(1)
    : a >= 0.01
    ? n.toFixed(3)
    : n.toExponential(2);
}

/** Prints results as a table, or as JSON lines when `json` is true. */
export function report(results: readonly BenchResult[], json: boolean): void {
  if (json) {
    for (const r of results) {
      console.log(JSON.stringify({
        name: r.name,
        value: r.value,
        unit: r.unit,
        baseline: r.baseline,
        ratio: r.ratio,
      }));
    }
    return;
  }
  const rows = results.map((
    r,
  ) => [r.name, fmt(r.value), fmt(r.baseline), r.unit, fmt(r.ratio), r.goal ?? ""]);
  const head = ["benchmark", "value", "baseline", "unit", "ratio", "goal"];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ");
  console.log(line(head));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const row of rows) console.log(line(row));
}
