/**
 * Counters, gauges and histograms for the service, readable as JSON and as Prometheus text
 * exposition format 0.0.4.
 *
 * Recording is cheap enough for once per audio frame: an unlabelled metric or a labelled series
 * bound once with `labels()` updates a few numbers and allocates nothing.
 *
 * ## Workers
 * Each worker keeps its own {@link Registry} and periodically posts `registry.snapshot()` (a plain,
 * structured-clone-friendly object) to the main thread, which calls
 * `registry.absorb(source, snapshot)`. The main registry keeps the latest snapshot per source and
 * merges at read time: counters and histogram buckets are summed, a gauge takes the value of the
 * most recently absorbed source that has it (a gauge should be set by one thread; give it a label
 * when several threads own one each). Snapshots carry the worker registry's id, so when a
 * restarted worker reports with a fresh registry the previous incarnation's counters and
 * histograms are kept as retired totals and the sums never go backwards; `retire(source)` does the
 * same for a worker that is gone for good.
 *
 * Shared memory was the alternative. It would need a fixed layout decided before any label value
 * is seen, atomic float additions that `Atomics` does not offer, and cross-thread reads on every
 * scrape; snapshots keep the hot path thread-local and cost one small message a second.
 *
 * @module
 */

/** Latency bucket upper bounds in milliseconds, suited to audio stages (+Inf is implicit). */
export const DEFAULT_LATENCY_BUCKETS_MS: readonly number[] = Object.freeze([
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2,
  5,
  10,
  20,
  40,
  80,
  160,
  320,
  640,
]);

/** HTTP `Content-Type` of {@link Registry.toPrometheus}'s output. */
export const PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

/** Kind of metric. */
export type MetricType = "counter" | "gauge" | "histogram";

/** Label values of one series, keyed by label name. */
export type Labels<L extends string> = Readonly<Record<L, string>>;

/** One counter or gauge series in a {@link RegistrySnapshot}. */
export interface ScalarSeriesSnapshot {
  /** Label values in the order of the metric's `labelNames`. */
  readonly labels: readonly string[];
  /** Current value. */
  readonly value: number;
}

/** One histogram series in a {@link RegistrySnapshot}. */
export interface HistogramSeriesSnapshot {
  /** Label values in the order of the metric's `labelNames`. */
  readonly labels: readonly string[];
  /** Per-bucket (not cumulative) counts; the last entry is the +Inf bucket. */
  readonly counts: readonly number[];
  /** Number of observations. */
  readonly count: number;
  /** Sum of observations. */
  readonly sum: number;
  /** Smallest observation, `null` while `count` is 0. */
  readonly min: number | null;
  /** Largest observation, `null` while `count` is 0. */
  readonly max: number | null;
}

/** One metric in a {@link RegistrySnapshot}. */
export type MetricSnapshot =
  | {
    readonly type: "counter" | "gauge";
    readonly name: string;
    readonly help: string;
    readonly labelNames: readonly string[];
    readonly series: readonly ScalarSeriesSnapshot[];
  }
  | {
    readonly type: "histogram";
    readonly name: string;
    readonly help: string;
    readonly labelNames: readonly string[];
    /** Finite bucket upper bounds, strictly increasing. */
    readonly buckets: readonly number[];
    readonly series: readonly HistogramSeriesSnapshot[];
  };

/** A registry's own metrics as plain data, for `postMessage` to the aggregating thread. */
export interface RegistrySnapshot {
  /** Format version of the snapshot. */
  readonly version: 1;
  /** Id of the registry that took it; a new id from the same source means a restart. */
  readonly id: string;
  /** Every metric the registry defines, with all its series. */
  readonly metrics: readonly MetricSnapshot[];
}

/** A histogram series in {@link MetricsJson}. */
export interface HistogramJson {
  /** Number of observations. */
  readonly count: number;
  /** Sum of observations. */
  readonly sum: number;
  /** Smallest observation, `null` when empty. */
  readonly min: number | null;
  /** Largest observation, `null` when empty. */
  readonly max: number | null;
  /** Estimated median, `null` when empty. */
  readonly p50: number | null;
  /** Estimated 90th percentile, `null` when empty. */
  readonly p90: number | null;
  /** Estimated 99th percentile, `null` when empty. */
  readonly p99: number | null;
  /** `[upper bound, cumulative count]` pairs, ending with `["+Inf", count]`. */
  readonly buckets: readonly (readonly [number | "+Inf", number])[];
}

/**
 * Everything a registry knows, merged over its sources. An unlabelled metric maps to its value;
 * a labelled one to an object keyed by the label set as written in the exposition format
 * (`reason="ring_full"`).
 */
export interface MetricsJson {
  /** Counters by name. */
  readonly counters: Record<string, number | Record<string, number>>;
  /** Gauges by name. */
  readonly gauges: Record<string, number | Record<string, number>>;
  /** Histograms by name. */
  readonly histograms: Record<string, HistogramJson | Record<string, HistogramJson>>;
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

function checkName(name: unknown): string {
  if (typeof name !== "string") {
    throw new TypeError(`Cannot use metric name "${String(name)}": expected a string`);
  }
  if (!METRIC_NAME.test(name)) {
    throw new RangeError(
      `Cannot use metric name "${name}": expected letters, digits, "_" and ":", not starting with a digit`,
    );
  }
  return name;
}

function checkLabelNames(metric: string, labelNames: unknown, type: MetricType): string[] {
  if (!Array.isArray(labelNames)) {
    throw new TypeError(
      `Cannot use label names "${String(labelNames)}" for "${metric}": expected an array`,
    );
  }
  const seen = new Set<string>();
  for (const l of labelNames) {
    if (typeof l !== "string") {
      throw new TypeError(
        `Cannot use label name "${String(l)}" for "${metric}": expected a string`,
      );
    }
    if (!LABEL_NAME.test(l) || l.startsWith("__")) {
      throw new RangeError(
        `Cannot use label name "${l}" for "${metric}": expected letters, digits and "_", not starting with a digit or "__"`,
      );
    }
    if (type === "histogram" && l === "le") {
      throw new RangeError(`Cannot use label name "le" for histogram "${metric}": it is reserved`);
    }
    if (seen.has(l)) {
      throw new RangeError(`Cannot use label name "${l}" twice for "${metric}"`);
    }
    seen.add(l);
  }
  return [...labelNames] as string[];
}

function checkBuckets(metric: string, buckets: unknown): number[] {
  if (!Array.isArray(buckets)) {
    throw new TypeError(
      `Cannot use buckets "${String(buckets)}" for "${metric}": expected an array of numbers`,
    );
  }
  const out: number[] = [];
  for (const b of buckets) {
    if (typeof b !== "number") {
      throw new TypeError(`Cannot use bucket "${String(b)}" for "${metric}": expected a number`);
    }
    if (b === Infinity && out.length === buckets.length - 1) break; // +Inf is implicit
    const prev = out[out.length - 1];
    if (!Number.isFinite(b) || (prev !== undefined && b <= prev)) {
      throw new RangeError(
        `Cannot use bucket "${b}" for "${metric}": expected finite, strictly increasing bounds`,
      );
    }
    out.push(b);
  }
  return out;
}

function checkFinite(what: string, metric: string, v: unknown): number {
  if (typeof v !== "number") {
    throw new TypeError(`Cannot ${what} "${metric}" by "${String(v)}": expected a number`);
  }
  if (!Number.isFinite(v)) {
    throw new RangeError(`Cannot ${what} "${metric}" by "${v}": expected a finite number`);
  }
  return v;
}

const NEEDS_ESCAPE = /[\\"\n]/;

/** Escapes a label value for the exposition format: `\`, `"` and line feed. */
export function escapeLabelValue(v: string): string {
  return NEEDS_ESCAPE.test(v) ? v.replace(/[\\"\n]/g, (c) => c === "\n" ? "\\n" : `\\${c}`) : v;
}

function escapeHelp(v: string): string {
  return v.replace(/[\\\n]/g, (c) => c === "\n" ? "\\n" : "\\\\");
}

function labelKey(names: readonly string[], values: readonly string[]): string {
  let key = "";
  for (let i = 0; i < names.length; i++) {
    key += `${i === 0 ? "" : ","}${names[i]}="${escapeLabelValue(values[i]!)}"`;
  }
  return key;
}

function formatValue(v: number): string {
  if (v === Infinity) return "+Inf";
  if (v === -Infinity) return "-Inf";
  return Number.isNaN(v) ? "NaN" : String(v);
}

/**
 * Estimates quantile `q` from bucket counts by linear interpolation inside the bucket where the
 * rank falls; the first bucket starts at the smallest observation and the +Inf bucket ends at the
 * largest, and the estimate never leaves [min, max]. `NaN` when there are no observations.
 */
function estimateQuantile(
  bounds: ArrayLike<number>,
  counts: ArrayLike<number>,
  count: number,
  min: number,
  max: number,
  q: number,
): number {
  if (count === 0) return NaN;
  if (q <= 0) return min;
  if (q >= 1) return max;
  const rank = q * count;
  let cum = 0;
  for (let i = 0; i < counts.length; i++) {
    const c = counts[i]!;
    if (c > 0 && cum + c >= rank) {
      const lo = Math.max(min, i === 0 ? min : bounds[i - 1]!);
      const hi = Math.min(max, i < bounds.length ? bounds[i]! : max);
      return lo + (hi - lo) * ((rank - cum) / c);
    }
    cum += c;
  }
  return max;
}

function checkQuantile(q: unknown): number {
  if (typeof q !== "number") {
    throw new TypeError(`Cannot estimate quantile "${String(q)}": expected a number`);
  }
  if (!(q >= 0 && q <= 1)) {
    throw new RangeError(`Cannot estimate quantile "${q}": expected a number from 0 to 1`);
  }
  return q;
}

/** One counter series: a monotonically increasing total. */
export class CounterSeries {
  readonly #metric: string;
  #value = 0;

  /** @internal Created by {@link Counter}. */
  constructor(metric: string) {
    this.#metric = metric;
  }

  /**
   * Adds `n` (default 1).
   *
   * @throws {TypeError} when `n` is not a number
   * @throws {RangeError} when `n` is negative, NaN or infinite
   */
  inc(n = 1): void {
    if (typeof n !== "number" || !(n >= 0 && n !== Infinity)) {
      if (typeof n !== "number") {
        throw new TypeError(
          `Cannot increment "${this.#metric}" by "${String(n)}": expected a number`,
        );
      }
      throw new RangeError(
        `Cannot increment "${this.#metric}" by "${n}": expected a finite number >= 0`,
      );
    }
    this.#value += n;
  }

  /** Current total. */
  get value(): number {
    return this.#value;
  }
}

/** One gauge series: a value that goes up and down. */
export class GaugeSeries {
  readonly #metric: string;
  #value = 0;

  /** @internal Created by {@link Gauge}. */
  constructor(metric: string) {
    this.#metric = metric;
  }

  /** Sets the value. @throws {RangeError} when `v` is NaN or infinite */
  set(v: number): void {
    this.#value = checkFinite("set", this.#metric, v);
  }

  /** Adds `n` (default 1). @throws {RangeError} when `n` is NaN or infinite */
  inc(n = 1): void {
    this.#value += checkFinite("increment", this.#metric, n);
  }

  /** Subtracts `n` (default 1). @throws {RangeError} when `n` is NaN or infinite */
  dec(n = 1): void {
    this.#value -= checkFinite("decrement", this.#metric, n);
  }

  /** Current value. */
  get value(): number {
    return this.#value;
  }
}

/** One histogram series: observation counts per bucket, with sum, min and max. */
export class HistogramSeries {
  readonly #metric: string;
  readonly #bounds: Float64Array;
  readonly #counts: Float64Array;
  #count = 0;
  #sum = 0;
  #min = Infinity;
  #max = -Infinity;

  /** @internal Created by {@link Histogram}. */
  constructor(metric: string, bounds: Float64Array) {
    this.#metric = metric;
    this.#bounds = bounds;
    this.#counts = new Float64Array(bounds.length + 1);
  }

  /**
   * Records one observation.
   *
   * @throws {TypeError} when `v` is not a number
   * @throws {RangeError} when `v` is NaN or infinite
   */
  observe(v: number): void {
    if (!Number.isFinite(v)) {
      if (typeof v !== "number") {
        throw new TypeError(
          `Cannot observe "${String(v)}" in "${this.#metric}": expected a number`,
        );
      }
      throw new RangeError(`Cannot observe "${v}" in "${this.#metric}": expected a finite number`);
    }
    // First bucket whose upper bound is >= v (binary search; the +Inf bucket when none is).
    const b = this.#bounds;
    let lo = 0, hi = b.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (b[mid]! < v) lo = mid + 1;
      else hi = mid;
    }
    this.#counts[lo]!++;
    this.#count++;
    this.#sum += v;
    if (v < this.#min) this.#min = v;
    if (v > this.#max) this.#max = v;
  }

  /**
   * Estimated quantile `q` (0 to 1) by linear interpolation within buckets; `NaN` when empty.
   *
   * @throws {RangeError} when `q` is outside 0..1
   */
  quantile(q: number): number {
    return estimateQuantile(
      this.#bounds,
      this.#counts,
      this.#count,
      this.#min,
      this.#max,
      checkQuantile(q),
    );
  }

  /** Number of observations. */
  get count(): number {
    return this.#count;
  }

  /** Sum of observations. */
  get sum(): number {
    return this.#sum;
  }

  /** Smallest observation; `NaN` when empty. */
  get min(): number {
    return this.#count === 0 ? NaN : this.#min;
  }

  /** Largest observation; `NaN` when empty. */
  get max(): number {
    return this.#count === 0 ? NaN : this.#max;
  }

  /** This series as plain data, labelled with `labels`. */
  snapshot(labels: readonly string[]): HistogramSeriesSnapshot {
    const empty = this.#count === 0;
    return {
      labels,
      counts: Array.from(this.#counts),
      count: this.#count,
      sum: this.#sum,
      min: empty ? null : this.#min,
      max: empty ? null : this.#max,
    };
  }
}

interface Definition {
  readonly type: MetricType;
  readonly name: string;
  readonly help: string;
  readonly labelNames: readonly string[];
  readonly buckets: readonly number[];
}

function sameDefinition(a: Definition, b: Definition): boolean {
  return a.type === b.type &&
    a.labelNames.length === b.labelNames.length &&
    a.labelNames.every((l, i) => l === b.labelNames[i]) &&
    a.buckets.length === b.buckets.length &&
    a.buckets.every((x, i) => x === b.buckets[i]);
}

function describe(d: Definition): string {
  const labels = `labels [${d.labelNames.join(", ")}]`;
  return d.type === "histogram"
    ? `a histogram with ${labels} and buckets [${d.buckets.join(", ")}]`
    : `a ${d.type} with ${labels}`;
}

/** Common part of the three metric kinds: the definition and the cache of labelled series. */
export abstract class MetricFamily<S, L extends string> {
  /** Metric name. */
  readonly name: string;
  /** Help text. */
  readonly help: string;
  /** Label names, in exposition order. */
  readonly labelNames: readonly L[];
  readonly #create: () => S;
  readonly #children = new Map<string, { values: readonly string[]; series: S }>();
  /** The series of an unlabelled metric; `undefined` when the metric has labels. */
  readonly #unlabelled: S | undefined;

  /** Creates the metric; `create` makes one series. */
  constructor(name: string, help: string, labelNames: readonly L[], create: () => S) {
    this.name = name;
    this.help = help;
    this.labelNames = labelNames;
    this.#create = create;
    if (labelNames.length === 0) {
      this.#unlabelled = create();
      this.#children.set("", { values: [], series: this.#unlabelled });
    }
  }

  /**
   * The series for one label set, created on first use and cached: bind it once and keep it for
   * hot paths. Label values should come from a small fixed set.
   *
   * @throws {TypeError} when `labels` does not name exactly this metric's labels with strings
   */
  labels(labels: Labels<L>): S {
    if (typeof labels !== "object" || labels === null) {
      throw new TypeError(
        `Cannot use labels "${String(labels)}" for "${this.name}": expected an object`,
      );
    }
    const names = this.labelNames;
    let key = "";
    for (let i = 0; i < names.length; i++) {
      const v: unknown = labels[names[i]!];
      if (typeof v !== "string") {
        throw new TypeError(
          `Cannot use label ${names[i]}="${String(v)}" for "${this.name}": expected a string`,
        );
      }
      key += `${i === 0 ? "" : ","}${names[i]}="${escapeLabelValue(v)}"`;
    }
    let given = 0;
    for (const _ in labels) given++;
    if (given !== names.length) {
      throw new TypeError(
        `Cannot use labels {${Object.keys(labels).join(", ")}} for "${this.name}": expected {${
          names.join(", ")
        }}`,
      );
    }
    const hit = this.#children.get(key);
    if (hit !== undefined) return hit.series;
    const series = this.#create();
    this.#children.set(key, { values: names.map((n) => labels[n]), series });
    return series;
  }

  /** The series for `labels`, or the unlabelled series when `labels` is omitted. */
  protected series(labels: Labels<L> | undefined): S {
    if (labels === undefined) {
      if (this.#unlabelled === undefined) {
        throw new TypeError(
          `Cannot record "${this.name}" without labels: expected {${this.labelNames.join(", ")}}`,
        );
      }
      return this.#unlabelled;
    }
    return this.labels(labels);
  }

  /** Every series with its label values (in `labelNames` order). */
  protected entries(): IterableIterator<
    { readonly values: readonly string[]; readonly series: S }
  > {
    return this.#children.values();
  }

  /** This metric's current state as plain data. */
  abstract snapshot(): MetricSnapshot;
}

/** A counter: totals that only go up (frames, bytes, drops by reason, restarts…). */
export class Counter<L extends string = never> extends MetricFamily<CounterSeries, L> {
  /** Use {@link Registry.counter}. */
  constructor(name: string, help: string, labelNames: readonly L[]) {
    super(name, help, labelNames, () => new CounterSeries(name));
  }

  /**
   * Adds `n` (default 1) to the unlabelled series, or to the series of `labels`.
   *
   * @throws {RangeError} when `n` is negative, NaN or infinite
   */
  inc(n = 1, labels?: Labels<L>): void {
    this.series(labels).inc(n);
  }

  /** Total of the unlabelled series, or of the series of `labels`. */
  value(labels?: Labels<L>): number {
    return this.series(labels).value;
  }

  /** This metric's state as plain data. */
  snapshot(): MetricSnapshot {
    const series: ScalarSeriesSnapshot[] = [];
    for (const e of this.entries()) series.push({ labels: e.values, value: e.series.value });
    return {
      type: "counter",
      name: this.name,
      help: this.help,
      labelNames: this.labelNames,
      series,
    };
  }
}

/** A gauge: a current level (playout depth, target depth…). */
export class Gauge<L extends string = never> extends MetricFamily<GaugeSeries, L> {
  /** Use {@link Registry.gauge}. */
  constructor(name: string, help: string, labelNames: readonly L[]) {
    super(name, help, labelNames, () => new GaugeSeries(name));
  }

  /** Sets the unlabelled series, or the series of `labels`. */
  set(v: number, labels?: Labels<L>): void {
    this.series(labels).set(v);
  }

  /** Adds `n` (default 1). */
  inc(n = 1, labels?: Labels<L>): void {
    this.series(labels).inc(n);
  }

  /** Subtracts `n` (default 1). */
  dec(n = 1, labels?: Labels<L>): void {
    this.series(labels).dec(n);
  }

  /** Value of the unlabelled series, or of the series of `labels`. */
  value(labels?: Labels<L>): number {
    return this.series(labels).value;
  }

  /** This metric's state as plain data. */
  snapshot(): MetricSnapshot {
    const series: ScalarSeriesSnapshot[] = [];
    for (const e of this.entries()) series.push({ labels: e.values, value: e.series.value });
    return { type: "gauge", name: this.name, help: this.help, labelNames: this.labelNames, series };
  }
}

/** A histogram: the distribution of a measured value, e.g. one pipeline stage's latency. */
export class Histogram<L extends string = never> extends MetricFamily<HistogramSeries, L> {
  /** Finite bucket upper bounds; +Inf is implicit. */
  readonly buckets: readonly number[];

  /** Use {@link Registry.histogram}. */
  constructor(name: string, help: string, labelNames: readonly L[], buckets: readonly number[]) {
    const bounds = new Float64Array(buckets);
    super(name, help, labelNames, () => new HistogramSeries(name, bounds));
    this.buckets = buckets;
  }

  /**
   * Records one observation in the unlabelled series, or in the series of `labels`.
   *
   * @throws {RangeError} when `v` is NaN or infinite
   */
  observe(v: number, labels?: Labels<L>): void {
    this.series(labels).observe(v);
  }

  /** Estimated quantile `q` (0 to 1); `NaN` when empty. */
  quantile(q: number, labels?: Labels<L>): number {
    return this.series(labels).quantile(q);
  }

  /** Number of observations. */
  count(labels?: Labels<L>): number {
    return this.series(labels).count;
  }

  /** Sum of observations. */
  sum(labels?: Labels<L>): number {
    return this.series(labels).sum;
  }

  /** Smallest observation; `NaN` when empty. */
  min(labels?: Labels<L>): number {
    return this.series(labels).min;
  }

  /** Largest observation; `NaN` when empty. */
  max(labels?: Labels<L>): number {
    return this.series(labels).max;
  }

  /** This metric's state as plain data. */
  snapshot(): MetricSnapshot {
    const series: HistogramSeriesSnapshot[] = [];
    for (const e of this.entries()) series.push(e.series.snapshot(e.values));
    return {
      type: "histogram",
      name: this.name,
      help: this.help,
      labelNames: this.labelNames,
      buckets: this.buckets,
      series,
    };
  }
}

type Metric = Counter<string> | Gauge<string> | Histogram<string>;

/** Names a definition's samples appear under in the exposition. */
function exposedNames(d: Definition): string[] {
  return d.type === "histogram"
    ? [d.name, `${d.name}_bucket`, `${d.name}_sum`, `${d.name}_count`]
    : [d.name];
}

/** Known definitions by name, and which metric owns each exposed sample name. */
class Schema {
  readonly definitions: Map<string, Definition>;
  readonly #exposed: Map<string, string>;

  constructor(from?: Schema) {
    this.definitions = new Map(from === undefined ? [] : from.definitions);
    this.#exposed = new Map(from === undefined ? [] : from.#exposed);
  }

  /** Adds `d`, or checks it against the definition already known by that name. */
  define(d: Definition): void {
    const prev = this.definitions.get(d.name);
    if (prev !== undefined) {
      if (!sameDefinition(prev, d)) {
        throw new TypeError(
          `Cannot define "${d.name}" as ${describe(d)}: it is already ${describe(prev)}`,
        );
      }
      return;
    }
    const names = exposedNames(d);
    for (const n of names) {
      const owner = this.#exposed.get(n);
      if (owner !== undefined) {
        throw new TypeError(
          `Cannot define "${d.name}" as ${describe(d)}: its samples "${n}" clash with "${owner}"`,
        );
      }
    }
    this.definitions.set(d.name, d);
    for (const n of names) this.#exposed.set(n, d.name);
  }
}

interface ScalarAcc {
  readonly labels: readonly string[];
  value: number;
}

interface HistogramAcc {
  readonly labels: readonly string[];
  readonly counts: number[];
  count: number;
  sum: number;
  min: number;
  max: number;
}

interface MergedFamily {
  readonly def: Definition;
  readonly scalars: Map<string, ScalarAcc>;
  readonly histograms: Map<string, HistogramAcc>;
}

/** Metrics from several snapshots folded together: counters and buckets summed, gauges last. */
class Merge {
  readonly families = new Map<string, MergedFamily>();

  #family(d: Definition): MergedFamily {
    let f = this.families.get(d.name);
    if (f === undefined) {
      f = { def: d, scalars: new Map(), histograms: new Map() };
      this.families.set(d.name, f);
    }
    return f;
  }

  /** Makes `d` appear (in this position) even before it has series. */
  define(d: Definition): void {
    this.#family(d);
  }

  add(m: MetricSnapshot, withGauges = true): void {
    if (m.type === "gauge" && !withGauges) return;
    const f = this.#family(definitionOf(m));
    const names = f.def.labelNames;
    if (m.type === "histogram") {
      for (const s of m.series) {
        const key = labelKey(names, s.labels);
        let acc = f.histograms.get(key);
        if (acc === undefined) {
          acc = {
            labels: s.labels,
            counts: new Array<number>(m.buckets.length + 1).fill(0),
            count: 0,
            sum: 0,
            min: Infinity,
            max: -Infinity,
          };
          f.histograms.set(key, acc);
        }
        for (let i = 0; i < acc.counts.length; i++) acc.counts[i]! += s.counts[i]!;
        acc.count += s.count;
        acc.sum += s.sum;
        if (s.min !== null && s.min < acc.min) acc.min = s.min;
        if (s.max !== null && s.max > acc.max) acc.max = s.max;
      }
      return;
    }
    for (const s of m.series) {
      const key = labelKey(names, s.labels);
      const acc = f.scalars.get(key);
      if (acc === undefined) f.scalars.set(key, { labels: s.labels, value: s.value });
      else if (m.type === "counter") acc.value += s.value;
      else acc.value = s.value;
    }
  }

  /** The merged state as snapshot metrics (used to keep retired totals). */
  metrics(): MetricSnapshot[] {
    const out: MetricSnapshot[] = [];
    for (const { def, scalars, histograms } of this.families.values()) {
      const base = { name: def.name, help: def.help, labelNames: def.labelNames };
      if (def.type === "histogram") {
        const series = [...histograms.values()].map((h) => ({
          labels: h.labels,
          counts: [...h.counts],
          count: h.count,
          sum: h.sum,
          min: h.count === 0 ? null : h.min,
          max: h.count === 0 ? null : h.max,
        }));
        out.push({ ...base, type: "histogram", buckets: def.buckets, series });
      } else {
        const series = [...scalars.values()].map((s) => ({ labels: s.labels, value: s.value }));
        out.push({ ...base, type: def.type, series });
      }
    }
    return out;
  }
}

function definitionOf(m: MetricSnapshot): Definition {
  return {
    type: m.type,
    name: m.name,
    help: m.help,
    labelNames: m.labelNames,
    buckets: m.type === "histogram" ? m.buckets : [],
  };
}

function histogramJson(def: Definition, h: HistogramAcc): HistogramJson {
  const q = (p: number) =>
    h.count === 0 ? null : estimateQuantile(def.buckets, h.counts, h.count, h.min, h.max, p);
  const buckets: [number | "+Inf", number][] = [];
  let cum = 0;
  for (let i = 0; i < def.buckets.length; i++) {
    cum += h.counts[i]!;
    buckets.push([def.buckets[i]!, cum]);
  }
  buckets.push(["+Inf", h.count]);
  return {
    count: h.count,
    sum: h.sum,
    min: h.count === 0 ? null : h.min,
    max: h.count === 0 ? null : h.max,
    p50: q(0.5),
    p90: q(0.9),
    p99: q(0.99),
    buckets,
  };
}

function isFiniteNumber(v: unknown): v is number {
  return typeof v === "number" && Number.isFinite(v);
}

/** Checks that `snap` has the shape {@link Registry.snapshot} produces; throws a TypeError. */
function checkSnapshot(source: string, snap: unknown): asserts snap is RegistrySnapshot {
  const fail = (what: string): never => {
    throw new TypeError(`Cannot absorb the snapshot from "${source}": ${what}`);
  };
  if (typeof snap !== "object" || snap === null) return fail("expected an object");
  const s = snap as Partial<Record<keyof RegistrySnapshot, unknown>>;
  if (s.version !== 1) fail(`expected version 1, got "${String(s.version)}"`);
  if (typeof s.id !== "string") fail("expected a string id");
  if (!Array.isArray(s.metrics)) return fail("expected a metrics array");
  const seen = new Set<string>();
  for (const m of s.metrics as unknown[]) {
    if (typeof m !== "object" || m === null) return fail("expected metric objects");
    const { type, name, help, labelNames, series } = m as Record<string, unknown>;
    if (type !== "counter" && type !== "gauge" && type !== "histogram") {
      return fail(`metric type "${String(type)}" is not counter, gauge or histogram`);
    }
    const n = checkName(name);
    if (seen.has(n)) fail(`metric "${n}" appears twice`);
    seen.add(n);
    if (typeof help !== "string") fail(`metric "${n}" has no help string`);
    const labels = checkLabelNames(n, labelNames, type);
    const buckets = type === "histogram"
      ? checkBuckets(n, (m as Record<string, unknown>).buckets)
      : [];
    if (!Array.isArray(series)) return fail(`metric "${n}" has no series array`);
    for (const x of series as unknown[]) {
      if (typeof x !== "object" || x === null) return fail(`metric "${n}" has a bad series`);
      const r = x as Record<string, unknown>;
      if (
        !Array.isArray(r.labels) || r.labels.length !== labels.length ||
        !r.labels.every((v) => typeof v === "string")
      ) {
        fail(`a series of "${n}" does not have ${labels.length} string label values`);
      }
      if (type !== "histogram") {
        if (!isFiniteNumber(r.value) || (type === "counter" && r.value < 0)) {
          fail(`a series of "${n}" has the bad value "${String(r.value)}"`);
        }
        continue;
      }
      const counts = r.counts;
      if (
        !Array.isArray(counts) || counts.length !== buckets.length + 1 ||
        !counts.every((c) => isFiniteNumber(c) && c >= 0)
      ) {
        return fail(`a series of "${n}" does not have ${buckets.length + 1} bucket counts`);
      }
      const total = (counts as number[]).reduce((a, b) => a + b, 0);
      if (r.count !== total) fail(`a series of "${n}" has count "${String(r.count)}" != ${total}`);
      if (!isFiniteNumber(r.sum)) fail(`a series of "${n}" has the bad sum "${String(r.sum)}"`);
      const empty = total === 0;
      if (
        empty ? r.min !== null || r.max !== null : !isFiniteNumber(r.min) || !isFiniteNumber(r.max)
      ) {
        fail(`a series of "${n}" has a bad min or max`);
      }
    }
  }
}

/**
 * A set of named metrics, plus the latest snapshots absorbed from other threads; reads merge
 * both (see the module documentation).
 */
export class Registry {
  /** Random id carried by this registry's snapshots. */
  readonly id: string = crypto.randomUUID();
  readonly #metrics = new Map<string, Metric>();
  #schema = new Schema();
  /** Latest snapshot per source, least recently absorbed first. */
  readonly #sources = new Map<string, RegistrySnapshot>();
  /** Counters and histograms of sources that restarted or were retired. */
  readonly #retired = new Merge();

  #register<M extends Metric>(
    type: MetricType,
    name: string,
    help: string,
    labelNames: readonly string[],
    buckets: readonly number[],
    make: (d: Definition) => M,
  ): M {
    checkName(name);
    if (typeof help !== "string") {
      throw new TypeError(`Cannot use help "${String(help)}" for "${name}": expected a string`);
    }
    const def: Definition = {
      type,
      name,
      help,
      labelNames: Object.freeze(checkLabelNames(name, labelNames, type)),
      buckets: Object.freeze(type === "histogram" ? checkBuckets(name, buckets) : []),
    };
    this.#schema.define(def);
    const existing = this.#metrics.get(name);
    if (existing !== undefined) return existing as M;
    const metric = make(this.#schema.definitions.get(name)!);
    this.#metrics.set(name, metric);
    return metric;
  }

  /**
   * Registers a counter, or returns the one already registered with the same definition.
   *
   * @throws {RangeError} when the name or a label name is malformed
   * @throws {TypeError} when the name is taken by a different definition
   */
  counter<const L extends string = never>(
    name: string,
    help: string,
    labelNames: readonly L[] = [],
  ): Counter<L> {
    return this.#register(
      "counter",
      name,
      help,
      labelNames,
      [],
      (d) => new Counter(d.name, d.help, d.labelNames as readonly L[]),
    );
  }

  /**
   * Registers a gauge, or returns the one already registered with the same definition.
   *
   * @throws {RangeError} when the name or a label name is malformed
   * @throws {TypeError} when the name is taken by a different definition
   */
  gauge<const L extends string = never>(
    name: string,
    help: string,
    labelNames: readonly L[] = [],
  ): Gauge<L> {
    return this.#register(
      "gauge",
      name,
      help,
      labelNames,
      [],
      (d) => new Gauge(d.name, d.help, d.labelNames as readonly L[]),
    );
  }

  /**
   * Registers a histogram, or returns the one already registered with the same definition.
   * `buckets` are finite, strictly increasing upper bounds (+Inf is implicit); the default is
   * {@link DEFAULT_LATENCY_BUCKETS_MS}.
   *
   * @throws {RangeError} when the name, a label name or a bucket is malformed
   * @throws {TypeError} when the name is taken by a different definition
   */
  histogram<const L extends string = never>(
    name: string,
    help: string,
    options: { readonly buckets?: readonly number[]; readonly labelNames?: readonly L[] } = {},
  ): Histogram<L> {
    return this.#register(
      "histogram",
      name,
      help,
      options.labelNames ?? [],
      options.buckets ?? DEFAULT_LATENCY_BUCKETS_MS,
      (d) => new Histogram(d.name, d.help, d.labelNames as readonly L[], d.buckets),
    );
  }

  /** This registry's own metrics (not what it absorbed) as plain, structured-clone-safe data. */
  snapshot(): RegistrySnapshot {
    const metrics: MetricSnapshot[] = [];
    for (const m of this.#metrics.values()) metrics.push(m.snapshot());
    return { version: 1, id: this.id, metrics };
  }

  /**
   * Keeps `snapshot` as the latest state of `source` (e.g. "output-worker"), replacing the
   * previous one. When its id differs from the previous snapshot's (the source restarted), the
   * previous counters and histograms are kept as retired totals.
   *
   * @throws {TypeError} when the snapshot is malformed or a metric in it conflicts with a known
   *   definition; nothing is changed then
   * @throws {RangeError} when the snapshot is this registry's own
   */
  absorb(source: string, snapshot: RegistrySnapshot): void {
    if (typeof source !== "string" || source === "") {
      throw new TypeError(`Cannot absorb from source "${String(source)}": expected a name`);
    }
    checkSnapshot(source, snapshot);
    if (snapshot.id === this.id) {
      throw new RangeError(`Cannot absorb this registry's own snapshot as "${source}"`);
    }
    // Copy the schema only when the snapshot brings a definition it does not know yet.
    let schema = this.#schema;
    for (const m of snapshot.metrics) {
      const known = schema.definitions.get(m.name);
      const d = definitionOf(m);
      if (known !== undefined && sameDefinition(known, d)) continue;
      if (schema === this.#schema) schema = new Schema(this.#schema);
      schema.define(d);
    }
    this.#schema = schema;
    const prev = this.#sources.get(source);
    if (prev !== undefined && prev.id !== snapshot.id) this.#retire(prev);
    this.#sources.delete(source);
    this.#sources.set(source, snapshot);
  }

  /**
   * Forgets `source` (a worker that has stopped for good), keeping its counters and histograms
   * in the totals and dropping its gauges. Returns whether the source was known.
   */
  retire(source: string): boolean {
    const prev = this.#sources.get(source);
    if (prev === undefined) return false;
    this.#retire(prev);
    this.#sources.delete(source);
    return true;
  }

  #retire(snapshot: RegistrySnapshot): void {
    for (const m of snapshot.metrics) this.#retired.add(m, false);
  }

  /** Names of the sources whose snapshots are held. */
  get sources(): string[] {
    return [...this.#sources.keys()];
  }

  #merged(): Merge {
    const merge = new Merge();
    for (const d of this.#schema.definitions.values()) merge.define(d);
    for (const m of this.#metrics.values()) merge.add(m.snapshot());
    for (const m of this.#retired.metrics()) merge.add(m);
    for (const s of this.#sources.values()) for (const m of s.metrics) merge.add(m);
    return merge;
  }

  /** Everything, merged over sources, as a JSON-ready object. */
  toJSON(): MetricsJson {
    const counters: Record<string, number | Record<string, number>> = {};
    const gauges: Record<string, number | Record<string, number>> = {};
    const histograms: Record<string, HistogramJson | Record<string, HistogramJson>> = {};
    for (const { def, scalars, histograms: hs } of this.#merged().families.values()) {
      const unlabelled = def.labelNames.length === 0;
      if (def.type === "histogram") {
        if (unlabelled) {
          const h = hs.get("");
          if (h !== undefined) histograms[def.name] = histogramJson(def, h);
        } else {
          const byLabels: Record<string, HistogramJson> = {};
          for (const [key, h] of hs) byLabels[key] = histogramJson(def, h);
          histograms[def.name] = byLabels;
        }
        continue;
      }
      const target = def.type === "counter" ? counters : gauges;
      if (unlabelled) {
        const s = scalars.get("");
        if (s !== undefined) target[def.name] = s.value;
      } else {
        const byLabels: Record<string, number> = {};
        for (const [key, s] of scalars) byLabels[key] = s.value;
        target[def.name] = byLabels;
      }
    }
    return { counters, gauges, histograms };
  }

  /** Everything, merged over sources, in Prometheus text exposition format 0.0.4. */
  toPrometheus(): string {
    const lines: string[] = [];
    for (const { def, scalars, histograms } of this.#merged().families.values()) {
      const n = def.name;
      lines.push(`# HELP ${n} ${escapeHelp(def.help)}`, `# TYPE ${n} ${def.type}`);
      if (def.type !== "histogram") {
        for (const [key, s] of scalars) {
          lines.push(`${n}${key === "" ? "" : `{${key}}`} ${formatValue(s.value)}`);
        }
        continue;
      }
      for (const [key, h] of histograms) {
        const pre = key === "" ? "" : `${key},`;
        const braces = key === "" ? "" : `{${key}}`;
        let cum = 0;
        for (let i = 0; i < def.buckets.length; i++) {
          cum += h.counts[i]!;
          lines.push(`${n}_bucket{${pre}le="${formatValue(def.buckets[i]!)}"} ${formatValue(cum)}`);
        }
        lines.push(`${n}_bucket{${pre}le="+Inf"} ${formatValue(h.count)}`);
        lines.push(`${n}_sum${braces} ${formatValue(h.sum)}`);
        lines.push(`${n}_count${braces} ${formatValue(h.count)}`);
      }
    }
    return lines.length === 0 ? "" : `${lines.join("\n")}\n`;
  }
}
