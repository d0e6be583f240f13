import assert from "node:assert/strict";
import {
  DEFAULT_LATENCY_BUCKETS_MS,
  type MetricsJson,
  PROMETHEUS_CONTENT_TYPE,
  Registry,
  type RegistrySnapshot,
} from "../lib/metrics.ts";

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

interface Exposition {
  help: Map<string, string>;
  type: Map<string, string>;
  samples: Sample[];
}

/** A strict reader of text format 0.0.4, written from the spec, to check the writer against. */
function parseExposition(text: string): Exposition {
  assert.ok(text === "" || text.endsWith("\n"), "exposition must end with a line feed");
  const out: Exposition = { help: new Map(), type: new Map(), samples: [] };
  const unescape = (s: string, quotes: boolean) =>
    s.replace(quotes ? /\\([\\"n])/g : /\\([\\n])/g, (_, c: string) => c === "n" ? "\n" : c);
  for (const line of text.split("\n").slice(0, -1)) {
    let m = /^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line);
    if (m) {
      assert.ok(!out.help.has(m[1]!), `second HELP for ${m[1]}`);
      out.help.set(m[1]!, unescape(m[2]!, false));
      continue;
    }
    m = /^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$/.exec(line);
    if (m) {
      assert.ok(!out.type.has(m[1]!), `second TYPE for ${m[1]}`);
      out.type.set(m[1]!, m[2]!);
      continue;
    }
    m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$/.exec(line);
    assert.ok(m, `malformed line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    let rest = m[2] === undefined ? "" : m[2].slice(1, -1);
    while (rest !== "") {
      const l = /^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,?)/.exec(rest);
      assert.ok(l, `malformed labels in ${JSON.stringify(line)}`);
      labels[l[1]!] = unescape(l[2]!, true);
      rest = rest.slice(l[0].length);
      assert.ok(l[3] === "," || rest === "", `missing comma in ${JSON.stringify(line)}`);
    }
    const v = m[3]!;
    const value = v === "+Inf"
      ? Infinity
      : v === "-Inf"
      ? -Infinity
      : v === "NaN"
      ? NaN
      : Number(v);
    assert.ok(!Number.isNaN(value) || v === "NaN", `bad value ${v}`);
    const family = m[1]!.replace(/_(bucket|sum|count)$/, "");
    assert.ok(
      out.type.has(m[1]!) || out.type.get(family) === "histogram",
      `sample ${m[1]} before its TYPE line`,
    );
    out.samples.push({ name: m[1]!, labels, value });
  }
  return out;
}

function find(e: Exposition, name: string, labels: Record<string, string> = {}): number {
  const hits = e.samples.filter((s) =>
    s.name === name && JSON.stringify(Object.entries(s.labels).sort()) ===
      JSON.stringify(Object.entries(labels).sort())
  );
  assert.equal(hits.length, 1, `${name} ${JSON.stringify(labels)}: ${hits.length} samples`);
  return hits[0]!.value;
}

/** Checks every histogram series: cumulative buckets, +Inf = _count, bounds as declared. */
function checkHistograms(e: Exposition): void {
  for (const [name, type] of e.type) {
    if (type !== "histogram") continue;
    const groups = new Map<string, Sample[]>();
    for (const s of e.samples.filter((s) => s.name === `${name}_bucket`)) {
      const { le: _, ...rest } = s.labels;
      const key = JSON.stringify(Object.entries(rest).sort());
      groups.set(key, [...groups.get(key) ?? [], s]);
    }
    for (const [key, buckets] of groups) {
      const labels = Object.fromEntries(JSON.parse(key) as [string, string][]);
      let prevLe = -Infinity, prevCount = 0;
      for (const b of buckets) {
        const le = b.labels.le === "+Inf" ? Infinity : Number(b.labels.le);
        assert.ok(le > prevLe, `${name}: le ${b.labels.le} not increasing`);
        assert.ok(b.value >= prevCount, `${name}: bucket le=${b.labels.le} not cumulative`);
        prevLe = le;
        prevCount = b.value;
      }
      assert.equal(prevLe, Infinity, `${name}: last bucket is not +Inf`);
      assert.equal(prevCount, find(e, `${name}_count`, labels), `${name}: +Inf != _count`);
      find(e, `${name}_sum`, labels);
    }
  }
}

Deno.test("Registry writes counters, gauges and histograms in Prometheus text format", () => {
  const r = new Registry();
  const captured = r.counter("kvm_frames_captured_total", "Frames read from the device");
  const dropped = r.counter("kvm_frames_dropped_total", "Frames dropped", ["reason"]);
  const depth = r.gauge("kvm_playout_depth_frames", "Frames in the playout buffer");
  const latency = r.histogram("kvm_capture_to_encoded_ms", "Capture to encoded", {
    buckets: [1, 2, 5, 10],
  });
  for (let i = 0; i < 50; i++) captured.inc();
  captured.inc(2.5);
  dropped.inc(3, { reason: "ring_full" });
  dropped.labels({ reason: "late" }).inc();
  depth.set(4);
  depth.dec();
  const values = [0.5, 1, 1.5, 2, 3, 4, 7, 9.99, 10, 12, 30];
  for (const v of values) latency.observe(v);

  const text = r.toPrometheus();
  const e = parseExposition(text);
  assert.equal(e.type.get("kvm_frames_captured_total"), "counter");
  assert.equal(e.type.get("kvm_playout_depth_frames"), "gauge");
  assert.equal(e.type.get("kvm_capture_to_encoded_ms"), "histogram");
  assert.equal(e.help.get("kvm_frames_dropped_total"), "Frames dropped");
  assert.equal(find(e, "kvm_frames_captured_total"), 52.5);
  assert.equal(find(e, "kvm_frames_dropped_total", { reason: "ring_full" }), 3);
  assert.equal(find(e, "kvm_frames_dropped_total", { reason: "late" }), 1);
  assert.equal(find(e, "kvm_playout_depth_frames"), 3);
  checkHistograms(e);
  const le = (b: string) => find(e, "kvm_capture_to_encoded_ms_bucket", { le: b });
  assert.deepEqual([le("1"), le("2"), le("5"), le("10"), le("+Inf")], [2, 4, 6, 9, 11]);
  assert.equal(find(e, "kvm_capture_to_encoded_ms_count"), values.length);
  const sum = values.reduce((a, b) => a + b, 0);
  assert.ok(Math.abs(find(e, "kvm_capture_to_encoded_ms_sum") - sum) < 1e-9);
  assert.match(PROMETHEUS_CONTENT_TYPE, /^text\/plain; version=0\.0\.4/);
});

Deno.test("Registry escapes label values and help text", () => {
  const r = new Registry();
  const nasty = 'back\\slash "quoted"\nnext line';
  const c = r.counter("kvm_weird_total", "Help with \\ and\na second line", ["v"]);
  c.inc(1, { v: nasty });
  c.inc(1, { v: "plain" });
  const h = r.histogram("kvm_weird_ms", "h", { buckets: [1], labelNames: ["v"] });
  h.observe(0.5, { v: nasty });
  const text = r.toPrometheus();
  assert.ok(text.includes('kvm_weird_total{v="back\\\\slash \\"quoted\\"\\nnext line"} 1\n'));
  assert.ok(text.includes("# HELP kvm_weird_total Help with \\\\ and\\na second line\n"));
  assert.ok(
    text.includes('kvm_weird_ms_bucket{v="back\\\\slash \\"quoted\\"\\nnext line",le="1"}'),
  );
  const e = parseExposition(text);
  assert.equal(e.help.get("kvm_weird_total"), "Help with \\ and\na second line");
  assert.equal(find(e, "kvm_weird_total", { v: nasty }), 1);
  assert.equal(find(e, "kvm_weird_ms_count", { v: nasty }), 1);
  checkHistograms(e);
  const json = r.toJSON();
  assert.deepEqual(json.counters.kvm_weird_total, {
    'v="back\\\\slash \\"quoted\\"\\nnext line"': 1,
    'v="plain"': 1,
  });
});

Deno.test("Registry validates metric and label names", () => {
  const r = new Registry();
  for (const good of ["a", "_a", ":a", "kvm:rtp_packets_total", "A1_b:c"]) {
    assert.equal(r.counter(good, "ok").name, good);
  }
  for (const bad of ["", "1a", "a-b", "a b", "ünïcode", "a.b", "a{b}"]) {
    assert.throws(() => r.counter(bad, "bad"), RangeError, JSON.stringify(bad));
    assert.throws(() => r.gauge(bad, "bad"), RangeError, JSON.stringify(bad));
  }
  assert.throws(() => r.counter(42 as unknown as string, "bad"), TypeError);
  assert.throws(() => r.counter("kvm_x", 42 as unknown as string), TypeError);
  for (const bad of ["__reserved", "1a", "a-b", "a:b", ""]) {
    assert.throws(() => r.counter("kvm_labelled", "x", [bad]), RangeError, JSON.stringify(bad));
  }
  assert.throws(() => r.counter("kvm_labelled", "x", ["a", "a"]), RangeError);
  assert.throws(() => r.histogram("kvm_h", "x", { labelNames: ["le"] }), RangeError);
  assert.throws(
    () => r.counter("kvm_bad-name", "x"),
    {
      name: "RangeError",
      message:
        'Cannot use metric name "kvm_bad-name": expected letters, digits, "_" and ":", not starting with a digit',
    },
  );
  assert.throws(() => r.histogram("kvm_h", "x", { buckets: [1, 1] }), RangeError);
  assert.throws(() => r.histogram("kvm_h", "x", { buckets: [2, 1] }), RangeError);
  assert.throws(() => r.histogram("kvm_h", "x", { buckets: [1, NaN] }), RangeError);
  assert.throws(
    () => r.histogram("kvm_h", "x", { buckets: ["1"] as unknown as number[] }),
    TypeError,
  );
  assert.deepEqual(r.histogram("kvm_h", "x", { buckets: [1, 2, Infinity] }).buckets, [1, 2]);
});

Deno.test("Counter rejects negative, NaN and infinite increments and keeps its value", () => {
  const r = new Registry();
  const c = r.counter("kvm_bytes_total", "Bytes");
  const l = r.counter("kvm_drops_total", "Drops", ["reason"]);
  c.inc(10);
  for (const bad of [-1, -0.001, NaN, Infinity, -Infinity]) {
    assert.throws(() => c.inc(bad), RangeError, String(bad));
    assert.throws(() => l.inc(bad, { reason: "x" }), RangeError, String(bad));
  }
  assert.throws(() => c.inc("1" as unknown as number), TypeError);
  assert.equal(c.value(), 10);
  assert.equal(l.value({ reason: "x" }), 0);
  c.inc(0);
  assert.equal(c.value(), 10);

  const g = r.gauge("kvm_depth", "Depth");
  g.set(-2.5);
  assert.equal(g.value(), -2.5);
  assert.throws(() => g.set(NaN), RangeError);
  assert.throws(() => g.inc(Infinity), RangeError);
  assert.throws(() => g.dec("x" as unknown as number), TypeError);
  assert.equal(g.value(), -2.5);

  const h = r.histogram("kvm_lat_ms", "Latency");
  assert.throws(() => h.observe(NaN), RangeError);
  assert.throws(() => h.observe(Infinity), RangeError);
  assert.throws(() => h.observe(undefined as unknown as number), TypeError);
  assert.equal(h.count(), 0);
});

Deno.test("Registry returns the existing metric for the same definition and throws on a different one", () => {
  const r = new Registry();
  const a = r.counter("kvm_sent_total", "Sent", ["sink"]);
  assert.equal(r.counter("kvm_sent_total", "Other help is fine", ["sink"]), a);
  assert.throws(() => r.counter("kvm_sent_total", "Sent"), TypeError);
  assert.throws(() => r.counter("kvm_sent_total", "Sent", ["dest"]), TypeError);
  assert.throws(() => r.gauge("kvm_sent_total", "Sent", ["sink"]), TypeError);
  const h = r.histogram("kvm_stage_ms", "Stage", { buckets: [1, 2] });
  assert.equal(r.histogram("kvm_stage_ms", "Stage", { buckets: [1, 2] }), h);
  assert.throws(() => r.histogram("kvm_stage_ms", "Stage", { buckets: [1, 3] }), TypeError);
  assert.throws(() => r.histogram("kvm_stage_ms", "Stage"), TypeError);
  // A histogram's samples are <name>_bucket, _sum and _count: those names are taken.
  assert.throws(() => r.counter("kvm_stage_ms_count", "x"), TypeError);
  r.counter("kvm_other_sum", "x");
  assert.throws(() => r.histogram("kvm_other", "x"), TypeError);
  const d = r.histogram("kvm_default_ms", "Default buckets");
  assert.deepEqual(d.buckets, DEFAULT_LATENCY_BUCKETS_MS);
  assert.deepEqual(
    DEFAULT_LATENCY_BUCKETS_MS,
    [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640],
  );
});

Deno.test("Labelled series are validated and cached per label set", () => {
  const r = new Registry();
  const c = r.counter("kvm_packets_total", "Packets", ["kind", "path"]);
  const s = c.labels({ kind: "late", path: "rtp" });
  assert.equal(c.labels({ path: "rtp", kind: "late" }), s);
  assert.notEqual(c.labels({ kind: "lost", path: "rtp" }), s);
  s.inc();
  c.inc(2, { kind: "late", path: "rtp" });
  assert.equal(s.value, 3);
  assert.throws(() => c.inc(), TypeError);
  assert.throws(() => c.inc(1, { kind: "late" } as never), TypeError);
  assert.throws(() => c.inc(1, { kind: "late", path: "rtp", extra: "x" } as never), TypeError);
  assert.throws(() => c.inc(1, { kind: "late", path: 1 } as never), TypeError);
  assert.throws(() => c.labels(null as never), TypeError);
  const u = r.counter("kvm_restarts_total", "Restarts");
  assert.throws(() => u.inc(1, { x: "y" } as never), TypeError);
  u.inc(1, {});
  assert.equal(u.value(), 1);
});

Deno.test("Histogram quantiles follow a known distribution", () => {
  const r = new Registry();
  // Uniform on [0, 100): linear interpolation inside 10-wide buckets is exact.
  const u = r.histogram("kvm_uniform", "u", { buckets: [10, 20, 30, 40, 50, 60, 70, 80, 90] });
  const n = 100_000;
  for (let i = 0; i < n; i++) u.observe((i + 0.5) * 100 / n);
  for (const q of [0.01, 0.25, 0.5, 0.9, 0.99]) {
    assert.ok(Math.abs(u.quantile(q) - 100 * q) < 0.01, `uniform p${q * 100}: ${u.quantile(q)}`);
  }
  assert.equal(u.quantile(0), u.min());
  assert.equal(u.quantile(1), u.max());
  assert.ok(Math.abs(u.sum() - n * 50) < 1e-3);

  // Exponential with a 10 ms mean. On 1 ms buckets the estimate is within 2 %; on the coarse
  // default buckets (each about twice the last) it stays inside the bucket that holds the true
  // quantile — linear interpolation over a steep tail is off by up to the bucket's width.
  const fine = r.histogram("kvm_exp_fine_ms", "e", {
    buckets: Array.from({ length: 100 }, (_, i) => i + 1),
  });
  const e = r.histogram("kvm_exp_ms", "e");
  for (let i = 0; i < n; i++) {
    const v = -10 * Math.log(1 - (i + 0.5) / n);
    fine.observe(v);
    e.observe(v);
  }
  for (const q of [0.5, 0.9, 0.99]) {
    const truth = -10 * Math.log(1 - q);
    const f = fine.quantile(q);
    assert.ok(Math.abs(f - truth) / truth < 0.02, `fine p${q * 100}: ${f} vs ${truth}`);
    const est = e.quantile(q);
    const hi = DEFAULT_LATENCY_BUCKETS_MS.find((b) => b >= truth)!;
    const lo = DEFAULT_LATENCY_BUCKETS_MS[DEFAULT_LATENCY_BUCKETS_MS.indexOf(hi) - 1]!;
    assert.ok(est > lo && est <= hi, `exp p${q * 100}: ${est} outside (${lo}, ${hi}]`);
  }
  assert.equal(e.count(), n);

  // One repeated value: the estimate is clamped to what was observed.
  const c = r.histogram("kvm_const_ms", "c", { buckets: [1, 10] });
  for (let i = 0; i < 10; i++) c.observe(3);
  assert.equal(c.quantile(0.5), 3);
  assert.equal(c.quantile(0.99), 3);
  // Above the last bound the +Inf bucket ends at the largest observation.
  const big = r.histogram("kvm_big_ms", "b", { buckets: [1] });
  big.observe(500);
  big.observe(1000);
  assert.ok(big.quantile(0.99) <= 1000 && big.quantile(0.99) >= 500);

  const empty = r.histogram("kvm_empty_ms", "e");
  assert.ok(Number.isNaN(empty.quantile(0.5)));
  assert.ok(Number.isNaN(empty.min()));
  assert.throws(() => u.quantile(1.5), RangeError);
  assert.throws(() => u.quantile(-0.1), RangeError);
  assert.throws(() => u.quantile(NaN), RangeError);
});

Deno.test("Registry toJSON has counters, gauges and histograms with quantiles and buckets", () => {
  const r = new Registry();
  r.counter("kvm_frames_encoded_total", "Encoded").inc(7);
  r.counter("kvm_frames_dropped_total", "Dropped", ["reason"]).inc(2, { reason: "ring_full" });
  r.counter("kvm_never_total", "Never", ["reason"]);
  r.gauge("kvm_playout_target_frames", "Target").set(3);
  const h = r.histogram("kvm_received_to_played_ms", "Played", { buckets: [10, 20, 40] });
  for (const v of [5, 15, 15, 30]) h.observe(v);
  r.histogram("kvm_idle_ms", "Idle", { buckets: [1] });
  const json: MetricsJson = r.toJSON();
  assert.deepEqual(json, {
    counters: {
      kvm_frames_encoded_total: 7,
      kvm_frames_dropped_total: { 'reason="ring_full"': 2 },
      kvm_never_total: {},
    },
    gauges: { kvm_playout_target_frames: 3 },
    histograms: {
      kvm_received_to_played_ms: {
        count: 4,
        sum: 65,
        min: 5,
        max: 30,
        p50: h.quantile(0.5),
        p90: h.quantile(0.9),
        p99: h.quantile(0.99),
        buckets: [[10, 1], [20, 3], [40, 4], ["+Inf", 4]],
      },
      kvm_idle_ms: {
        count: 0,
        sum: 0,
        min: null,
        max: null,
        p50: null,
        p90: null,
        p99: null,
        buckets: [[1, 0], ["+Inf", 0]],
      },
    },
  });
  // p50 of [5, 15, 15, 30]: rank 2 falls in (10, 20] holding two values → 10 + 10·(1/2).
  assert.equal(json.histograms.kvm_received_to_played_ms!.p50 as number, 15);
  assert.deepEqual(JSON.parse(JSON.stringify(r)), json);
});

function workerRegistry(frames: number, lat: number[], depth: number, drop: string): Registry {
  const w = new Registry();
  w.counter("kvm_frames_total", "Frames").inc(frames);
  w.counter("kvm_dropped_total", "Dropped", ["reason"]).inc(1, { reason: drop });
  w.gauge("kvm_depth_frames", "Depth").set(depth);
  const h = w.histogram("kvm_stage_ms", "Stage", { buckets: [1, 5, 10] });
  for (const v of lat) h.observe(v);
  return w;
}

Deno.test("Registry merges worker snapshots: counters and buckets summed, gauges last", () => {
  const main = new Registry();
  main.counter("kvm_frames_total", "Frames").inc(1);
  const a = workerRegistry(10, [0.5, 2, 7], 4, "ring_full");
  const b = workerRegistry(5, [3, 20], 6, "late");
  // Snapshots survive structured cloning (postMessage) unchanged.
  const sa = structuredClone(a.snapshot());
  const sb: RegistrySnapshot = JSON.parse(JSON.stringify(b.snapshot()));
  assert.deepEqual(sa, a.snapshot());
  main.absorb("output", sa);
  main.absorb("input", sb);
  assert.deepEqual(main.sources, ["output", "input"]);
  const json = main.toJSON();
  assert.equal(json.counters.kvm_frames_total, 16);
  assert.deepEqual(json.counters.kvm_dropped_total, {
    'reason="ring_full"': 1,
    'reason="late"': 1,
  });
  assert.equal(json.gauges.kvm_depth_frames, 6);
  const hist = json.histograms.kvm_stage_ms as { count: number; sum: number; min: number };
  assert.deepEqual(json.histograms.kvm_stage_ms, {
    ...hist,
    count: 5,
    sum: 32.5,
    min: 0.5,
    max: 20,
    buckets: [[1, 1], [5, 3], [10, 4], ["+Inf", 5]],
  });
  const e = parseExposition(main.toPrometheus());
  checkHistograms(e);
  assert.equal(find(e, "kvm_frames_total"), 16);
  assert.equal(find(e, "kvm_stage_ms_bucket", { le: "5" }), 3);
  assert.equal(find(e, "kvm_stage_ms_count"), 5);
  assert.equal(find(e, "kvm_stage_ms_sum"), 32.5);
  // A newer snapshot from the same source replaces the old one (no double counting) and its
  // gauge becomes the latest.
  a.counter("kvm_frames_total", "Frames").inc(100);
  main.absorb("output", a.snapshot());
  const again = main.toJSON();
  assert.equal(again.counters.kvm_frames_total, 116);
  assert.equal(again.gauges.kvm_depth_frames, 4);
  assert.equal((again.histograms.kvm_stage_ms as { count: number }).count, 5);
  // The main registry's snapshot is its own metrics only.
  assert.deepEqual(main.snapshot().metrics.map((m) => m.name), ["kvm_frames_total"]);
});

Deno.test("Registry keeps a restarted or retired worker's totals", () => {
  const main = new Registry();
  main.absorb("output", workerRegistry(10, [1, 2], 4, "ring_full").snapshot());
  // The worker restarts with a fresh registry: its counters start again from zero.
  main.absorb("output", workerRegistry(3, [8], 5, "ring_full").snapshot());
  let json = main.toJSON();
  assert.equal(json.counters.kvm_frames_total, 13);
  assert.deepEqual(json.counters.kvm_dropped_total, { 'reason="ring_full"': 2 });
  assert.equal((json.histograms.kvm_stage_ms as { count: number }).count, 3);
  assert.equal(json.gauges.kvm_depth_frames, 5);
  assert.equal(main.retire("output"), true);
  assert.equal(main.retire("output"), false);
  assert.deepEqual(main.sources, []);
  json = main.toJSON();
  assert.equal(json.counters.kvm_frames_total, 13);
  assert.equal((json.histograms.kvm_stage_ms as { max: number }).max, 8);
  assert.equal(json.gauges.kvm_depth_frames, undefined, "a retired gauge means nothing");
});

Deno.test("Registry absorb rejects malformed or conflicting snapshots without changing anything", () => {
  const main = new Registry();
  main.gauge("kvm_frames_total", "Frames as a gauge");
  const w = workerRegistry(1, [1], 1, "x");
  assert.throws(() => main.absorb("output", w.snapshot()), TypeError);
  assert.deepEqual(main.sources, []);
  assert.equal(main.toJSON().counters.kvm_dropped_total, undefined);

  const ok = new Registry();
  ok.counter("kvm_a_total", "a").inc();
  const good = ok.snapshot();
  // deno-lint-ignore no-explicit-any -- deliberately malformed data
  const bad = (patch: (s: any) => void) => {
    const s = structuredClone(good);
    patch(s);
    return s as RegistrySnapshot;
  };
  const cases = [
    bad((s) => (s.version = 2)),
    bad((s) => (s.metrics = {})),
    bad((s) => (s.metrics[0].type = "summary")),
    bad((s) => (s.metrics[0].series[0].value = -1)),
    bad((s) => (s.metrics[0].series[0].labels = ["x"])),
    bad((s) => s.metrics.push(s.metrics[0])),
    null as unknown as RegistrySnapshot,
  ];
  for (const c of cases) assert.throws(() => main.absorb("w", c), TypeError);
  const h = new Registry();
  h.histogram("kvm_h_ms", "h", { buckets: [1] }).observe(0.5);
  const hs = h.snapshot();
  // deno-lint-ignore no-explicit-any -- deliberately malformed data
  const badCounts = structuredClone(hs) as any;
  badCounts.metrics[0].series[0].counts = [1, 1];
  assert.throws(() => main.absorb("w", badCounts), TypeError);
  assert.throws(() => main.absorb("", good), TypeError);
  assert.throws(() => main.absorb("self", main.snapshot()), RangeError);
  assert.deepEqual(main.sources, []);
  main.absorb("w", good);
  main.absorb("h", hs);
  assert.equal(main.toJSON().counters.kvm_a_total, 1);
  // Once absorbed, a definition also binds local registrations.
  assert.throws(() => main.histogram("kvm_h_ms", "h", { buckets: [2] }), TypeError);
  main.histogram("kvm_h_ms", "h", { buckets: [1] }).observe(3);
  assert.equal((main.toJSON().histograms.kvm_h_ms as { count: number }).count, 2);
});

Deno.test("Registry absorbs a snapshot posted from a Web Worker", async () => {
  const url = new URL("../lib/metrics.ts", import.meta.url).href;
  const code = `
    import { Registry } from ${JSON.stringify(url)};
    const r = new Registry();
    const frames = r.counter("kvm_frames_captured_total", "Captured");
    const lat = r.histogram("kvm_capture_to_encoded_ms", "Capture to encoded");
    for (let i = 0; i < 1000; i++) { frames.inc(); lat.observe((i % 10) + 0.5); }
    self.postMessage(r.snapshot());
  `;
  const blob = URL.createObjectURL(new Blob([code], { type: "application/javascript" }));
  const worker = new Worker(blob, { type: "module" });
  try {
    const snap = await new Promise<RegistrySnapshot>((resolve, reject) => {
      worker.onmessage = (e) => resolve(e.data);
      worker.onerror = (e) => reject(e);
    });
    const main = new Registry();
    main.absorb("output", snap);
    const e = parseExposition(main.toPrometheus());
    checkHistograms(e);
    assert.equal(find(e, "kvm_frames_captured_total"), 1000);
    assert.equal(find(e, "kvm_capture_to_encoded_ms_count"), 1000);
    assert.equal(find(e, "kvm_capture_to_encoded_ms_bucket", { le: "5" }), 500);
    assert.equal(find(e, "kvm_capture_to_encoded_ms_sum"), 5000);
  } finally {
    worker.terminate();
    URL.revokeObjectURL(blob);
  }
});
