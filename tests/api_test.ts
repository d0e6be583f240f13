import assert from "node:assert/strict";
import { configure, type LogRecord, reset } from "@logtape/logtape";
import type { Hono } from "hono";
import { CONTROL, FAULT } from "../lib/pipeline/messages.ts";
import { MICROPHONE_PRESETS, OUTPUT_PRESETS, PRESET_NAMES } from "../lib/quality.ts";
import { AudioService, type ServiceOptions } from "../lib/service.ts";
import { createApp } from "../routes/app.ts";
import type { AppEnv } from "../routes/http.ts";
import { useAlsaConfig, writeAlsaConfig, writeRaw } from "./alsa_devices.ts";
import { tempDir, tone } from "./audio_util.ts";
import { until } from "./wait.ts";

type App = Hono<AppEnv>;

interface Call {
  body?: unknown;
  /** Raw body text, sent as is. */
  raw?: BodyInit;
  type?: string | null;
  token?: string;
  headers?: Record<string, string>;
}

async function call(app: App, method: string, path: string, c: Call = {}) {
  const headers = new Headers(c.headers);
  const body = c.raw ?? (c.body === undefined ? undefined : JSON.stringify(c.body));
  if (body !== undefined && c.type !== null) {
    headers.set("content-type", c.type ?? "application/json");
  }
  if (c.token !== undefined) headers.set("authorization", `Bearer ${c.token}`);
  const res = await app.request(path, {
    method,
    headers,
    ...(body !== undefined ? { body } : {}),
  });
  const text = await res.text();
  let json: Record<string, unknown> | null = null;
  if (res.headers.get("content-type")?.startsWith("application/json") && text !== "") {
    json = JSON.parse(text);
  }
  return { status: res.status, headers: res.headers, text, json };
}

/** A service on file PCMs (a tone to capture, a file to play into), not started. */
async function fileService(dir: string, extra: Partial<ServiceOptions> = {}, seconds = 3) {
  await writeRaw(
    `${dir}/in.raw`,
    tone({ freq: 1000, channels: 2, frames: 48000 * seconds, amplitude: 0.4 }),
  );
  const cfg = await writeAlsaConfig(dir, {
    kvm_api_capture: { type: "file", infile: `${dir}/in.raw` },
    kvm_api_playback: { type: "file", outfile: `${dir}/out.raw` },
  });
  const env = useAlsaConfig(cfg);
  const service = new AudioService({
    capture: "kvm_api_capture",
    playback: "kvm_api_playback",
    pace: "clock",
    maxCaptureSamples: 48000 * seconds,
    stateFile: `${dir}/state.json`,
    ...extra,
  });
  return {
    service,
    async [Symbol.asyncDispose]() {
      await service.close();
      env[Symbol.dispose]();
    },
  };
}

function disabledService(): AudioService {
  return new AudioService({ capture: null, playback: null });
}

// ---------------------------------------------------------------------------------------------

Deno.test("GET /api/audio and /api/microphone report each pipeline", async () => {
  await using dir = await tempDir();
  await using s = await fileService(dir.path);
  const app = createApp(s.service);
  const audio = await call(app, "GET", "/api/audio");
  assert.equal(audio.status, 200);
  assert.deepEqual(
    [
      audio.json!.enabled,
      audio.json!.running,
      audio.json!.state,
      audio.json!.device,
      audio.json!.preset,
      audio.json!.muted,
      audio.json!.listeners,
      audio.json!.restarts,
      audio.json!.rate,
    ],
    [true, false, "stopped", "kvm_api_capture", "high", false, 0, 0, null],
  );
  assert.deepEqual(audio.json!.breaker, { open: false, crashes: 0, lastError: null });
  const mic = await call(app, "GET", "/api/microphone");
  assert.equal(mic.status, 200);
  assert.equal(mic.json!.device, "kvm_api_playback");
  assert.equal(mic.json!.talker, null);

  // Start both through the API: they run, the obtained rate shows.
  assert.equal((await call(app, "POST", "/api/audio/start")).status, 200);
  assert.equal((await call(app, "POST", "/api/microphone/start")).status, 200);
  await until("both running with their devices open", async () => {
    const a = (await call(app, "GET", "/api/audio")).json!;
    const m = (await call(app, "GET", "/api/microphone")).json!;
    return a.state === "running" && a.rate === 48000 && m.state === "running" && m.rate === 48000;
  });
  const stopped = await call(app, "POST", "/api/audio/stop");
  assert.equal(stopped.status, 200);
  assert.equal(stopped.json!.state, "stopped");
  assert.equal(stopped.json!.running, false);
  const micStopped = await call(app, "POST", "/api/microphone/stop");
  assert.equal(micStopped.json!.state, "stopped");
  assert.equal(s.service.controlState.outputRunning, false);
  // HEAD is served wherever GET is.
  const head = await app.request("/api/audio", { method: "HEAD" });
  assert.equal(head.status, 200);
  assert.equal(await head.text(), "");
});

Deno.test("quality: GET shows the preset, PUT says how it was applied", async () => {
  await using dir = await tempDir();
  await using s = await fileService(dir.path, {}, 10);
  const app = createApp(s.service);
  const q = await call(app, "GET", "/api/audio/quality");
  assert.equal(q.status, 200);
  assert.equal(q.json!.preset, "high");
  assert.deepEqual(q.json!.allowed, [...PRESET_NAMES]);
  assert.deepEqual(q.json!.settings, { ...OUTPUT_PRESETS.high });
  assert.equal(q.json!.encoding, null, "nothing encodes while stopped");

  let r = await call(app, "PUT", "/api/audio/quality", { body: { preset: "medium" } });
  assert.equal(r.status, 200);
  assert.deepEqual(r.json, { preset: "medium", applied: "stored" });
  r = await call(app, "PUT", "/api/audio/quality", { body: { preset: "medium" } });
  assert.deepEqual(r.json, { preset: "medium", applied: "unchanged" });

  await call(app, "POST", "/api/audio/start");
  await until("the encoder", async () => {
    return (await call(app, "GET", "/api/audio/quality")).json!.encoding === "medium";
  });
  r = await call(app, "PUT", "/api/audio/quality", { body: { preset: "high" } });
  assert.deepEqual(r.json, { preset: "high", applied: "live" });
  await until("the live change", async () => {
    return (await call(app, "GET", "/api/audio/quality")).json!.encoding === "high";
  });
  r = await call(app, "PUT", "/api/audio/quality", { body: { preset: "ultra" } });
  assert.deepEqual(r.json, { preset: "ultra", applied: "rebuilt" });
  await until("the rebuilt encoder", async () => {
    return (await call(app, "GET", "/api/audio/quality")).json!.encoding === "ultra";
  });
  const changes = (await call(app, "GET", "/api/audio/quality")).json!.changes as {
    live: number;
    rebuilt: number;
  };
  assert.ok(changes.live >= 1 && changes.rebuilt >= 1, JSON.stringify(changes));

  // Microphone: what to send, and a stored change.
  const mq = await call(app, "GET", "/api/microphone/quality");
  assert.equal(mq.status, 200);
  const send = mq.json!.send as Record<string, unknown>;
  const p = MICROPHONE_PRESETS.high;
  assert.deepEqual(
    [send.codec, send.sampleRate, send.channels, send.frameMs, send.frameSamples, send.bitrate],
    ["opus", 48000, p.channels, p.frameMs, 960, p.bitrate],
  );
  assert.equal(send.fec, true);
  assert.equal(send.application, "voip");
  r = await call(app, "PUT", "/api/microphone/quality", { body: { preset: "ultra" } });
  assert.deepEqual(r.json, { preset: "ultra", applied: "stored" });
  const mq2 = (await call(app, "GET", "/api/microphone/quality")).json!;
  assert.equal((mq2.send as Record<string, unknown>).frameMs, 10);

  // Presets: both tables.
  const presets = await call(app, "GET", "/api/presets");
  assert.equal(presets.status, 200);
  assert.deepEqual(presets.json, {
    names: [...PRESET_NAMES],
    output: JSON.parse(JSON.stringify(OUTPUT_PRESETS)),
    microphone: JSON.parse(JSON.stringify(MICROPHONE_PRESETS)),
  });
});

Deno.test("mute: PUT sets it, GET reads it, the state file keeps it", async () => {
  await using dir = await tempDir();
  await using s = await fileService(dir.path);
  const app = createApp(s.service);
  const r = await call(app, "PUT", "/api/audio/mute", { body: { muted: true } });
  assert.equal(r.status, 200);
  assert.deepEqual(r.json, { muted: true });
  assert.deepEqual((await call(app, "GET", "/api/audio/mute")).json, { muted: true });
  assert.equal((await call(app, "GET", "/api/audio")).json!.muted, true);
  const saved = JSON.parse(await Deno.readTextFile(`${dir.path}/state.json`));
  assert.equal(JSON.stringify(saved).includes('"muted":true'), true);
});

Deno.test("bad input: 400 naming the field and the allowed values", async () => {
  await using dir = await tempDir();
  await using s = await fileService(dir.path);
  const app = createApp(s.service);
  const names = [...PRESET_NAMES];

  let r = await call(app, "PUT", "/api/audio/quality", { body: { preset: "loud" } });
  assert.equal(r.status, 400);
  assert.equal(r.json!.field, "preset");
  assert.deepEqual(r.json!.allowed, names);
  assert.match(r.json!.error as string, /"loud".*expected one of low, medium, high, ultra/);

  r = await call(app, "PUT", "/api/microphone/quality", { body: { preset: 3 } });
  assert.equal(r.status, 400);
  assert.equal(r.json!.field, "preset");
  assert.deepEqual(r.json!.allowed, names);
  assert.match(r.json!.error as string, /expected a string/);

  r = await call(app, "PUT", "/api/audio/quality", { body: {} });
  assert.equal(r.status, 400);
  assert.equal(r.json!.field, "preset");
  assert.deepEqual(r.json!.allowed, names);
  assert.match(r.json!.error as string, /Missing field "preset"/);

  r = await call(app, "PUT", "/api/audio/quality", { body: { preset: "low", bitrate: 1 } });
  assert.equal(r.status, 400);
  assert.equal(r.json!.field, "bitrate");
  assert.deepEqual(r.json!.allowed, ["preset"]);

  // Names that every object inherits are unknown fields too.
  for (const key of ["constructor", "toString", "__proto__"]) {
    r = await call(app, "PUT", "/api/audio/quality", { raw: `{"preset":"low","${key}":1}` });
    assert.equal(r.status, 400, key);
    assert.equal(r.json!.field, key);
  }
  r = await call(app, "PUT", "/api/audio/quality", { raw: '{"__proto__":{"preset":"low"}}' });
  assert.equal(r.status, 400, "an inherited preset is not a preset");

  r = await call(app, "PUT", "/api/audio/quality", { body: ["low"] });
  assert.equal(r.status, 400);
  assert.equal(r.json!.field, "body");

  r = await call(app, "PUT", "/api/audio/mute", { body: { muted: "yes" } });
  assert.equal(r.status, 400);
  assert.equal(r.json!.field, "muted");
  assert.deepEqual(r.json!.allowed, [true, false]);
  assert.match(r.json!.error as string, /"yes".*expected true or false/);
  assert.equal(s.service.muted, false, "nothing changed");

  // Not JSON at all, with a JSON content type: 400.
  r = await call(app, "PUT", "/api/audio/mute", { raw: "{muted: true" });
  assert.equal(r.status, 400);
  assert.match(r.json!.error as string, /Cannot parse the body as JSON/);
  r = await call(app, "PUT", "/api/audio/mute", { raw: new Uint8Array([0x7b, 0xff, 0x7d]) });
  assert.equal(r.status, 400);

  // Another content type, or none: 415.
  r = await call(app, "PUT", "/api/audio/mute", { raw: "muted=true", type: "text/plain" });
  assert.equal(r.status, 415);
  assert.equal(r.json!.field, "Content-Type");
  assert.deepEqual(r.json!.allowed, ["application/json"]);
  r = await call(app, "PUT", "/api/audio/mute", { raw: '{"muted":true}', type: null });
  assert.equal(r.status, 415);
  r = await call(app, "PUT", "/api/audio/mute", {
    raw: '{"muted":true}',
    type: "application/merge-patch+json",
  });
  assert.equal(r.status, 200, "a +json type is JSON");

  // Unknown and bad query parameters.
  r = await call(app, "GET", "/api/audio?verbose=1");
  assert.equal(r.status, 400);
  assert.equal(r.json!.field, "verbose");
  r = await call(app, "GET", "/api/microphone/stream?takeover=yes");
  assert.equal(r.status, 400);
  assert.equal(r.json!.field, "takeover");
  assert.deepEqual(r.json!.allowed, ["0", "1"]);
});

Deno.test("limits and routing: 413, 404, 405 with Allow, 426", async () => {
  await using dir = await tempDir();
  await using s = await fileService(dir.path);
  const app = createApp(s.service);
  const big = JSON.stringify({ preset: "low", pad: "x".repeat(17 * 1024) });
  let r = await call(app, "PUT", "/api/audio/quality", { raw: big });
  assert.equal(r.status, 413);
  assert.match(r.json!.error as string, /expected at most 16384/);
  // Without a Content-Length (a stream): still cut at the limit.
  const stream = new ReadableStream<Uint8Array>({
    start(c) {
      for (let i = 0; i < 20; i++) c.enqueue(new TextEncoder().encode("x".repeat(1024)));
      c.close();
    },
  });
  r = await call(app, "PUT", "/api/audio/quality", { raw: stream });
  assert.equal(r.status, 413);
  // A smaller limit is honoured.
  const small = createApp(s.service, { maxBodyBytes: 10 });
  r = await call(small, "PUT", "/api/audio/mute", { body: { muted: true } });
  assert.equal(r.status, 413);
  assert.throws(() => createApp(s.service, { maxBodyBytes: 0 }), RangeError);

  r = await call(app, "GET", "/api/nothing");
  assert.equal(r.status, 404);
  assert.match(r.json!.error as string, /"\/api\/nothing"/);
  r = await call(app, "GET", "/no-such-page.html");
  assert.equal(r.status, 404);

  r = await call(app, "DELETE", "/api/audio/quality");
  assert.equal(r.status, 405);
  assert.equal(r.headers.get("allow"), "GET, HEAD, PUT");
  assert.deepEqual(r.json!.allowed, ["GET", "HEAD", "PUT"]);
  r = await call(app, "GET", "/api/audio/start");
  assert.equal(r.status, 405);
  assert.equal(r.headers.get("allow"), "POST");
  r = await call(app, "POST", "/metrics");
  assert.equal(r.status, 405);
  assert.equal(r.headers.get("allow"), "GET, HEAD");

  r = await call(app, "GET", "/api/audio/stream");
  assert.equal(r.status, 426);
  assert.equal(r.headers.get("upgrade"), "websocket");
});

Deno.test("a disabled pipeline answers 409; status and presets still work", async () => {
  await using service = disabledService();
  const app = createApp(service);
  for (
    const [method, path] of [
      ["POST", "/api/audio/start"],
      ["POST", "/api/audio/stop"],
      ["POST", "/api/microphone/start"],
      ["POST", "/api/microphone/stop"],
      ["GET", "/api/audio/stream"],
      ["GET", "/api/microphone/stream"],
    ]
  ) {
    const r = await call(app, method!, path!);
    assert.equal(r.status, 409, `${method} ${path}`);
    assert.match(r.json!.error as string, /disabled/);
  }
  const audio = await call(app, "GET", "/api/audio");
  assert.equal(audio.status, 200);
  assert.equal(audio.json!.enabled, false);
  assert.equal(audio.json!.state, "disabled");
  const r = await call(app, "PUT", "/api/audio/quality", { body: { preset: "low" } });
  assert.deepEqual(r.json, { preset: "low", applied: "stored" });
  const health = await call(app, "GET", "/healthz");
  assert.equal(health.status, 200);
  assert.equal(health.json!.status, "ok");
});

Deno.test("auth: bearer token on /api and /metrics, ?token= only on the streams, /healthz open", async () => {
  await using service = disabledService();
  const token = "s3cret-token";
  const app = createApp(service, { token });
  let r = await call(app, "GET", "/api/audio");
  assert.equal(r.status, 401);
  assert.equal(r.json!.field, "Authorization");
  assert.match(r.headers.get("www-authenticate") ?? "", /^Bearer/);
  r = await call(app, "GET", "/api/audio", { token: "wrong" });
  assert.equal(r.status, 401);
  r = await call(app, "GET", "/api/audio", { token: token + "x" });
  assert.equal(r.status, 401);
  r = await call(app, "GET", "/api/audio", { headers: { authorization: `Basic ${token}` } });
  assert.equal(r.status, 401);
  r = await call(app, "GET", "/api/audio", { token });
  assert.equal(r.status, 200);
  r = await call(app, "GET", "/api/audio", { headers: { authorization: `bearer ${token}` } });
  assert.equal(r.status, 200, "the scheme is case-insensitive");
  // The query token is for the streams only.
  r = await call(app, "GET", `/api/audio?token=${token}`);
  assert.equal(r.status, 401);
  r = await call(app, "GET", `/api/audio/stream?token=${token}`);
  assert.equal(r.status, 409, "past authentication (then refused: output disabled)");
  r = await call(app, "GET", "/api/audio/stream?token=nope");
  assert.equal(r.status, 401);
  r = await call(app, "GET", `/api/microphone/stream?token=${token}`);
  assert.equal(r.status, 409);
  // Every protected route, unknown API paths included.
  for (const path of ["/metrics", "/api/metrics", "/api/presets", "/api/nothing"]) {
    assert.equal((await call(app, "GET", path)).status, 401, path);
  }
  assert.equal((await call(app, "PUT", "/api/audio/mute", { body: { muted: true } })).status, 401);
  assert.equal(service.muted, false);
  r = await call(app, "GET", "/metrics", { token });
  assert.equal(r.status, 200);
  // Open routes.
  assert.equal((await call(app, "GET", "/healthz")).status, 200);
  assert.equal((await call(app, "GET", "/openapi.json")).status, 200);
  assert.throws(() => createApp(service, { token: "" }), TypeError);
});

Deno.test("logs carry the request id and never the token", async () => {
  const records: LogRecord[] = [];
  await configure({
    sinks: { memory: (r: LogRecord) => records.push(r) },
    loggers: [
      { category: ["kvm-audio"], lowestLevel: "debug", sinks: ["memory"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: [] },
    ],
    reset: true,
  });
  try {
    await using service = disabledService();
    const token = "very-secret-value-42";
    const app = createApp(service, { token });
    const r = await call(app, "GET", "/api/audio", {
      token,
      headers: { "x-request-id": "req-abc.1" },
    });
    assert.equal(r.headers.get("x-request-id"), "req-abc.1");
    await call(app, "GET", `/api/audio/stream?token=${token}`);
    await call(app, "GET", "/api/audio", { token: "wrong-" + token });
    const bad = await call(app, "GET", "/healthz", { headers: { "x-request-id": "bad id\u00e9" } });
    const generated = bad.headers.get("x-request-id")!;
    assert.match(generated, /^[0-9a-f-]{36}$/, "an unusable id is replaced");
    const all = records.map((rec) => JSON.stringify([rec.message, rec.properties])).join("\n");
    assert.ok(all.includes("req-abc.1"), "the request id is logged");
    assert.ok(all.includes(generated));
    assert.ok(!all.includes(token), "the token never appears in a log record");
    assert.ok(!all.includes("Bearer "), "no Authorization header value");
  } finally {
    await reset();
  }
});

Deno.test("metrics: Prometheus text with its content type, and JSON", async () => {
  await using dir = await tempDir();
  await using s = await fileService(dir.path);
  const app = createApp(s.service);
  s.service.subscribe(() => {}); // the output worker encodes only while someone listens
  await call(app, "POST", "/api/audio/start");
  await until("encoded packets", () => {
    const v = s.service.metrics.toJSON().counters["kvm_audio_output_packets_encoded_total"];
    return typeof v === "number" && v > 0;
  });
  const r = await call(app, "GET", "/metrics");
  assert.equal(r.status, 200);
  assert.match(r.headers.get("content-type")!, /^text\/plain; version=0\.0\.4(; charset=utf-8)?$/);
  // Parse the exposition format: every line is a HELP, a TYPE or a sample of a declared family.
  const types = new Map<string, string>();
  const samples = new Map<string, number>();
  const sample =
    /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf)$/;
  for (const line of r.text.trimEnd().split("\n")) {
    let m;
    if ((m = /^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .*$/.exec(line))) continue;
    if ((m = /^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram)$/.exec(line))) {
      types.set(m[1]!, m[2]!);
      continue;
    }
    m = sample.exec(line);
    assert.ok(m, `unparseable line ${JSON.stringify(line)}`);
    const family = m[1]!.replace(/_(bucket|sum|count)$/, "");
    assert.ok(types.has(m[1]!) || types.get(family) === "histogram", `undeclared ${m[1]}`);
    samples.set(m[1]! + (m[2] ?? ""), Number(m[4]));
  }
  assert.equal(types.get("kvm_audio_output_packets_encoded_total"), "counter");
  assert.ok(samples.get("kvm_audio_output_packets_encoded_total")! > 0);
  assert.equal(types.get("kvm_audio_pipeline_restarts_total"), "counter");
  const json = await call(app, "GET", "/api/metrics");
  assert.equal(json.status, 200);
  const counters = json.json!.counters as Record<string, unknown>;
  assert.ok((counters["kvm_audio_output_packets_encoded_total"] as number) > 0);
  assert.ok("histograms" in json.json! && "gauges" in json.json!);
});

Deno.test("health: 200 and ok, then degraded when a wanted pipeline's breaker opens; start recovers", async () => {
  await using dir = await tempDir();
  await using s = await fileService(dir.path, {
    allowFaults: true,
    supervisor: { breaker: { maxCrashes: 2 }, backoff: { initialMs: 20 } },
  }, 20);
  const app = createApp(s.service);
  let h = await call(app, "GET", "/healthz");
  assert.equal(h.status, 200);
  assert.equal(h.json!.status, "ok", "stopped by the operator is not a problem");
  await call(app, "POST", "/api/audio/start");
  await until(
    "running",
    async () => (await call(app, "GET", "/api/audio")).json!.state === "running",
  );
  h = await call(app, "GET", "/healthz");
  assert.equal(h.json!.status, "ok");
  const control = s.service.controlBlock("output")!;
  const crashUntilBroken = async () => {
    for (let crash = 1; crash <= 2; crash++) {
      await until("a running worker", () => s.service.outputStatus().state === "running");
      Atomics.store(control, CONTROL.fault, FAULT.throw);
      await until(
        `crash ${crash}`,
        () => (s.service.outputStatus().supervisor?.crashes ?? 0) >= crash,
      );
    }
    await until("the breaker", () => s.service.outputStatus().state === "broken");
  };
  await crashUntilBroken();
  // Nothing encodes while the breaker is open: no preset is in use, and a change is stored for
  // the next worker (the dead one's last preset used to pass for the encoder's: "rebuilt").
  const q0 = (await call(app, "GET", "/api/audio/quality")).json!;
  assert.equal(q0.encoding, null);
  const wanted = q0.preset === "low" ? "ultra" : "low";
  assert.deepEqual(
    (await call(app, "PUT", "/api/audio/quality", { body: { preset: wanted } })).json,
    { preset: wanted, applied: "stored" },
  );
  h = await call(app, "GET", "/healthz");
  assert.equal(h.status, 200, "liveness: the API is up");
  assert.equal(h.json!.status, "degraded");
  const out = h.json!.output as Record<string, unknown>;
  assert.equal(out.breakerOpen, true);
  assert.match(out.problem as string, /breaker open/);
  const audio = (await call(app, "GET", "/api/audio")).json!;
  assert.equal((audio.breaker as Record<string, unknown>).open, true);
  assert.match(String((audio.breaker as Record<string, unknown>).lastError), /Injected fault/);
  // POST start closes the breaker and runs again — with the stored preset, and none is in use
  // until the new worker has made its encoder (the control word read 0, "low", before).
  const r = await call(app, "POST", "/api/audio/start");
  assert.equal(r.status, 200);
  assert.equal((await call(app, "GET", "/api/audio/quality")).json!.encoding, null);
  await until("running again", () => s.service.outputStatus().state === "running");
  await until("the stored preset in use", () => s.service.appliedOutputPreset === wanted);
  assert.equal((await call(app, "GET", "/healthz")).json!.status, "ok");
  const restarts = (await call(app, "GET", "/api/audio")).json!.restarts as number;
  assert.ok(restarts >= 2, `restarts ${restarts}`);
  const prom = (await call(app, "GET", "/metrics")).text;
  assert.match(prom, /kvm_audio_pipeline_restarts_total\{pipeline="output"\} [1-9]/);

  // A stop and then a start forget the crashes as well: one more crash is restarted from, it
  // does not reopen the breaker at once.
  await crashUntilBroken();
  assert.equal((await call(app, "POST", "/api/audio/stop")).status, 200);
  assert.equal(s.service.outputStatus().state, "stopped");
  assert.equal((await call(app, "POST", "/api/audio/start")).status, 200);
  await until("running after stop and start", () => s.service.outputStatus().state === "running");
  assert.equal(s.service.outputStatus().supervisor?.crashes, 0);
  const before = s.service.outputStatus().supervisor!.restarts;
  Atomics.store(control, CONTROL.fault, FAULT.throw);
  await until("restarted after one crash", () => {
    const st = s.service.outputStatus();
    return st.supervisor!.restarts > before && st.state === "running";
  });
  assert.equal(s.service.outputStatus().supervisor?.breakerOpen, false);
});

Deno.test("health: a change that cannot be saved to the state file is in effect, and health says it would not survive a restart", async () => {
  await using dir = await tempDir();
  // The state file's directory is a regular file: every save fails (ENOTDIR).
  await Deno.writeTextFile(`${dir.path}/blocked`, "");
  await using service = new AudioService({
    capture: null,
    playback: null,
    stateFile: `${dir.path}/blocked/state.json`,
  });
  const app = createApp(service);
  let h = (await call(app, "GET", "/healthz")).json!;
  assert.equal(h.status, "ok");
  assert.deepEqual(h.stateFile, { problem: null });
  const r = await call(app, "PUT", "/api/audio/mute", { body: { muted: true } });
  assert.equal(r.status, 200);
  assert.equal(service.muted, true, "the change is in effect");
  h = (await call(app, "GET", "/healthz")).json!;
  assert.equal(h.status, "degraded");
  assert.match(
    (h.stateFile as { problem: string }).problem,
    /cannot save .*blocked\/state\.json: /,
  );
  // Once the directory is there the next change is saved, and health is ok again.
  await Deno.remove(`${dir.path}/blocked`);
  await Deno.mkdir(`${dir.path}/blocked`);
  await call(app, "PUT", "/api/audio/mute", { body: { muted: false } });
  h = (await call(app, "GET", "/healthz")).json!;
  assert.equal(h.status, "ok");
  assert.deepEqual(h.stateFile, { problem: null });
  assert.equal(JSON.parse(await Deno.readTextFile(`${dir.path}/blocked/state.json`)).muted, false);
  assert.deepEqual([...Deno.readDirSync(`${dir.path}/blocked`)].map((e) => e.name), [
    "state.json",
  ]);
});

Deno.test("health: a missing device makes it degraded", async () => {
  await using service = new AudioService({
    capture: "kvm_api_no_such_pcm",
    playback: null,
    pace: "clock",
  });
  const app = createApp(service);
  service.start();
  await until("the device error", async () => {
    return (await call(app, "GET", "/healthz")).json!.status === "degraded";
  });
  const h = await call(app, "GET", "/healthz");
  assert.equal(h.status, 200);
  assert.match((h.json!.output as Record<string, unknown>).problem as string, /device unavailable/);
  assert.equal((h.json!.microphone as Record<string, unknown>).problem, null);
});

Deno.test("OpenAPI 3.1 document lists every route the app serves", async () => {
  await using service = disabledService();
  for (const token of [undefined, "t"]) {
    const app = createApp(service, token === undefined ? {} : { token });
    const r = await call(app, "GET", "/openapi.json");
    assert.equal(r.status, 200);
    const doc = r.json as {
      openapi: string;
      paths: Record<string, Record<string, Record<string, unknown>>>;
      components: Record<string, unknown>;
    };
    assert.equal(doc.openapi, "3.1.0");
    const registered = new Set(
      app.routes
        // The page's static assets (routes/web.ts) are not part of the API contract.
        .filter((x) =>
          x.method !== "ALL" && /^\/(api\/|metrics$|healthz$|openapi\.json$)/.test(x.path)
        )
        .map((x) => `${x.method} ${x.path}`),
    );
    const documented = new Set(
      Object.entries(doc.paths).flatMap(([path, ops]) =>
        Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`)
      ),
    );
    assert.deepEqual([...registered].sort(), [...documented].sort());
    for (
      const want of [
        "GET /api/audio",
        "GET /api/audio/quality",
        "PUT /api/audio/quality",
        "PUT /api/audio/mute",
        "POST /api/audio/start",
        "POST /api/audio/stop",
        "GET /api/audio/stream",
        "GET /api/microphone",
        "GET /api/microphone/quality",
        "PUT /api/microphone/quality",
        "POST /api/microphone/start",
        "POST /api/microphone/stop",
        "GET /api/microphone/stream",
        "GET /api/presets",
        "GET /api/metrics",
        "GET /metrics",
        "GET /healthz",
        "GET /openapi.json",
      ]
    ) assert.ok(documented.has(want), want);
    for (const [path, ops] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(ops)) {
        const responses = op.responses as object;
        assert.ok("400" in responses && "413" in responses, `${method} ${path}: 400 and 413`);
      }
    }
    const put = doc.paths["/api/audio/quality"]!.put!;
    assert.ok("requestBody" in put);
    assert.ok("400" in (put.responses as object) && "413" in (put.responses as object));
    const stream = doc.paths["/api/microphone/stream"]!.get!;
    assert.deepEqual(
      (stream.parameters as { name: string }[]).map((p) => p.name).sort(),
      ["takeover", "token"],
    );
    if (token !== undefined) {
      assert.ok("securitySchemes" in doc.components);
      assert.deepEqual(doc.paths["/healthz"]!.get!.security, []);
      assert.ok("401" in (doc.paths["/api/audio"]!.get!.responses as object));
    }
  }
});

Deno.test("OpenAPI: what a route without a body or parameters refuses, and a missing SDP, are documented", async () => {
  await using service = disabledService();
  const app = createApp(service);
  const doc = (await call(app, "GET", "/openapi.json")).json as {
    paths: Record<string, Record<string, { responses: Record<string, unknown> }>>;
  };
  for (
    const [path, status] of [
      ["/api/audio?verbose=1", 400],
      ["/healthz?x=1", 400],
      ["/api/audio/sdp", 404],
    ] as const
  ) {
    const r = await call(app, "GET", path);
    assert.equal(r.status, status, path);
    assert.equal(typeof r.json!.error, "string");
    assert.ok(String(status) in doc.paths[path.split("?")[0]!]!.get!.responses, path);
  }
});

Deno.test("OpenAPI: the talk hello's schema names exactly what the service tells talkers", async () => {
  await using service = disabledService();
  const app = createApp(service);
  const doc = (await call(app, "GET", "/openapi.json")).json as {
    components: { schemas: Record<string, { required: string[] }> };
  };
  const r = await call(app, "GET", "/api/microphone/quality");
  assert.equal(r.status, 200);
  const send = (r.json as { send: Record<string, unknown> }).send;
  assert.deepEqual(
    Object.keys(send).sort(),
    [...doc.components.schemas.talkHello!.required].sort(),
  );
  // Everything a native client needs to set its encoder as the preset is.
  const p = MICROPHONE_PRESETS.high;
  assert.deepEqual(
    [send.bitrate, send.complexity, send.signal, send.maxBandwidth, send.vbrConstraint],
    [p.bitrate, p.complexity, p.signal, p.maxBandwidth, p.vbrConstraint],
  );
});

Deno.test("GET /api/audio/sdp: the session version goes up with every change it describes", async () => {
  await using service = new AudioService({ capture: null, playback: null, outputPreset: "high" });
  const app = createApp(service, {
    rtpOut: { destinations: [{ address: "127.0.0.1", port: 5004 }], payloadType: 111, ssrc: 7 },
  });
  const version = async () => {
    const r = await call(app, "GET", "/api/audio/sdp");
    assert.equal(r.status, 200);
    const o = /^o=- 7 (\d+) IN IP4 /m.exec(r.text);
    assert.ok(o, r.text);
    return Number(o[1]);
  };
  const v1 = await version();
  assert.equal(await version(), v1, "unchanged while nothing changes");
  // high (stereo, 20 ms) → ultra (stereo, 10 ms) → low (mono) → high: each a new, higher version
  // (derived from the preset, it went from 220 down to 210 and 120).
  let last = v1;
  for (const preset of ["ultra", "low", "high"]) {
    service.setOutputPreset(preset);
    const v = await version();
    assert.ok(v > last, `${preset}: version ${v} after ${last}`);
    last = v;
  }
});
