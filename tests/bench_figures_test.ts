/**
 * The arithmetic behind the published benchmark figures (scripts/bench/): how a run is set
 * against the codec floor timed beside it, how stage quantiles come out of two histogram
 * readings, how a thread's CPU time is read from `/proc`, and how a ratio is formed. The benches
 * themselves are not run in CI (shared machines make timings noisy); these are.
 */

import assert from "node:assert/strict";
import {
  type FloorPass,
  intervalQuantiles,
  pairRuns,
  parseStat,
} from "../scripts/bench/engine_common.ts";
import { result } from "../scripts/bench/report.ts";
import { type HistogramJson, Registry } from "../lib/metrics.ts";

interface Run {
  readonly cpu: number;
  /** Frames encoded before the window opened (taken out of the floor, as the bench does). */
  readonly early: number;
}

Deno.test("pairRuns sets each run against the mean of the floor passes on either side", () => {
  const runs: Run[] = [{ cpu: 1.2, early: 0 }, { cpu: 1.0, early: 0 }, { cpu: 1.5, early: 300 }];
  const passes: FloorPass[] = [
    { encode: 0.5, decode: 0.1 },
    { encode: 0.7, decode: 0.1 },
    { encode: 0.9, decode: 0.3 },
    { encode: 0.5, decode: 0.1 },
  ];
  const frames = 6000;
  const { paired, median } = pairRuns(
    runs,
    passes,
    (r) => r.cpu,
    (f, r) => (f.encode * (frames - r.early)) / frames + f.decode,
  );
  // Floors: (0.6 + 0.1), (0.8 + 0.2), (0.7 · 0.95 + 0.2).
  assert.deepEqual(paired.map((p) => p.run), runs, "pairs keep run order");
  const floors = paired.map((p) => p.floor);
  for (const [got, want] of floors.map((f, i) => [f, [0.7, 1.0, 0.865][i]!])) {
    assert.ok(Math.abs(got! - want!) < 1e-12, `floor ${got} ≠ ${want}`);
  }
  // Ratios 1.714…, 1.0, 1.734…: the median is the first run's.
  assert.equal(median.run, runs[0]);
  assert.ok(Math.abs(median.ratio - 1.2 / 0.7) < 1e-12);
});

Deno.test("pairRuns picks the median ratio, not the median CPU or the median floor", () => {
  // CPU 1.0, 2.0, 3.0 against floors 2.0, 1.0, 2.5 → ratios 0.5, 2.0, 1.2: the median ratio is
  // the third run, whose CPU is the largest.
  const runs = [1.0, 2.0, 3.0];
  const passes: FloorPass[] = [
    { encode: 2, decode: 0 },
    { encode: 2, decode: 0 },
    { encode: 0, decode: 0 },
    { encode: 5, decode: 0 },
  ];
  const { median, paired } = pairRuns(runs, passes, (r) => r, (f) => f.encode);
  assert.deepEqual(paired.map((p) => p.floor), [2, 1, 2.5]);
  assert.equal(median.run, 3.0);
  assert.equal(median.ratio, 1.2);
  // An even count takes the upper of the middle two.
  const two = pairRuns([1, 3], passes.slice(0, 3), (r) => r, () => 1);
  assert.equal(two.median.run, 3);
});

Deno.test("pairRuns refuses runs without a floor pass on each side", () => {
  const pass = { encode: 1, decode: 0 };
  assert.throws(() => pairRuns([], [pass], (r: number) => r, () => 1), /No runs/);
  assert.throws(
    () => pairRuns([1, 2], [pass, pass], (r) => r, () => 1),
    /2 runs need 3 floor passes around them, got 2/,
  );
});

/** A latency histogram with bounds 1, 2, 5 ms (and +Inf), read as the bench reads the service's. */
function latency(): { observe(...ms: number[]): void; read(): HistogramJson } {
  const registry = new Registry();
  const h = registry.histogram("x_ms", "test", { buckets: [1, 2, 5] });
  return {
    observe: (...ms) => ms.forEach((v) => h.observe(v)),
    read: () => registry.toJSON().histograms["x_ms"] as HistogramJson,
  };
}

Deno.test("intervalQuantiles interpolates inside the bucket, over the interval only", () => {
  const h = latency();
  h.observe(...Array(10).fill(0.9));
  const before = h.read();
  h.observe(...Array(9).fill(3), 4.8);
  const after = h.read();
  const q = intervalQuantiles(before, after);
  assert.ok(q !== null);
  assert.equal(q.count, 10);
  // Rank 5 of the interval's 10, all in (2, 5]: 2 + 3 · 5/10.
  assert.ok(Math.abs(q.p50 - 3.5) < 1e-12, `p50 ${q.p50}`);
  assert.ok(Math.abs(q.p99 - (2 + 3 * 0.99)) < 1e-12, `p99 ${q.p99}`);
  assert.equal(q.maxEver, 4.8);
  // Without the earlier reading the first ten (≤ 1 ms) count: rank 10 of 20 ends bucket (0, 1].
  const whole = intervalQuantiles(undefined, after);
  assert.ok(whole !== null && whole.count === 20);
  assert.ok(Math.abs(whole.p50 - 1) < 1e-12, `p50 ${whole.p50}`);
});

Deno.test("intervalQuantiles ends the +Inf bucket at the largest observation", () => {
  const h = latency();
  h.observe(...Array(98).fill(0.5), 7, 25);
  const after = h.read();
  const q = intervalQuantiles(undefined, after);
  assert.ok(q !== null);
  // Rank 99 is the first of two in (5, 25]: 5 + 20 · (99 − 98)/2.
  assert.ok(Math.abs(q.p99 - 15) < 1e-12, `p99 ${q.p99}`);
  assert.equal(intervalQuantiles(after, after), null, "nothing observed in between");
});

Deno.test("parseStat reads utime + stime of a thread whose name holds spaces and brackets", () => {
  // Fields from 3 on: state, ppid, pgrp, session, tty, tpgid, flags, minflt, cminflt, majflt,
  // cmajflt, utime (14), stime (15), …
  const line = "4242 (V8 Worker) (x)) S 1 2 3 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 1 0";
  assert.deepEqual(parseStat(line, 100), { id: 4242, name: "V8 Worker) (x)", cpu: 3 });
  assert.equal(parseStat("not a stat line", 100), null);
  assert.equal(parseStat("7 (x) S 1 2", 100), null, "too few fields");
});

Deno.test("result forms value ÷ baseline, and NaN against a zero baseline", () => {
  const r = result("x", 1.5, "CPU-s", 1.2, "ratio <= 1.15");
  assert.equal(r.ratio, 1.25);
  assert.equal(r.goal, "ratio <= 1.15");
  assert.ok(Number.isNaN(result("y", 1, "µs", 0).ratio));
  assert.equal("goal" in result("z", 1, "µs", 2), false);
});
