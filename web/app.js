/**
 * The operator's page: listen to the target (WebSocket → WebCodecs `AudioDecoder` → adaptive
 * AudioWorklet playout), talk to it (microphone → 48 kHz AudioWorklet capture → WebCodecs
 * `AudioEncoder` → WebSocket), choose each direction's preset, mute, and watch the service's
 * metrics. Plain ES module, no build step, nothing fetched from anywhere but this service.
 *
 * A `?token=` in the page's own URL is passed on: as `Authorization: Bearer` to the JSON API and
 * as `?token=` to the WebSockets (browsers cannot set headers on those).
 *
 * Tests read what the page heard and sent through `window.kvmAudio` (see the end of the file).
 *
 * @module
 */

// ---------------------------------------------------------------------------------------------
// Protocol (lib/transport/ws_protocol.ts)

const PROTOCOL_VERSION = 1;
const HEADER_BYTES = 12;
const FLAG_SILENCE = 1;
const FLAG_DISCONTINUITY = 2;
const OPUS_RATE = 48000;
const CLOSE_TOO_SLOW = 4408;
const CLOSE_BUSY = 4409;
const CLOSE_TAKEN_OVER = 4410;

/** Decoded packets queued in the decoder beyond which new ones are dropped (it fell behind). */
const MAX_DECODE_QUEUE = 25;
/** How long an API request may take before the service counts as unreachable. */
const API_TIMEOUT_MS = 4000;
/** No packet for this long while the stream should run: the connection is stalled. */
const LISTEN_STALL_MS = 3000;
const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 10_000;
const POLL_MS = 1000;

// ---------------------------------------------------------------------------------------------
// Small helpers

const $ = (id) => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`Missing element #${id}`);
  return el;
};

/**
 * The token from `?token=…`, read from the raw query: `URLSearchParams` would turn a `+` (common in
 * base64 tokens) into a space, and the service would refuse it.
 */
function tokenFromQuery(search) {
  for (const part of search.replace(/^\?/, "").split("&")) {
    const eq = part.indexOf("=");
    if (eq < 0 || part.slice(0, eq) !== "token") continue;
    try {
      return decodeURIComponent(part.slice(eq + 1));
    } catch {
      return part.slice(eq + 1);
    }
  }
  return null;
}
const token = tokenFromQuery(location.search);

/** An API error with the service's own message. */
class ApiError extends Error {
  name = "ApiError";
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the JSON API; rejects with an {@link ApiError} carrying the service's `error` text. */
async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  // Bounded: a stalled network left a request pending for good, and the status poll (one at a
  // time) with it — the page said "service reachable" through a minute of stall.
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    signal: AbortSignal.timeout(API_TIMEOUT_MS),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: fall through with the text
  }
  if (!res.ok) {
    throw new ApiError(res.status, json?.error ?? `${method} ${path} answered ${res.status}`);
  }
  return json;
}

/** A WebSocket URL on this origin, with the token and `extra` query parameters. */
function wsUrl(path, extra = {}) {
  const u = new URL(path, location.href);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  if (token) u.searchParams.set("token", token);
  for (const [k, v] of Object.entries(extra)) u.searchParams.set(k, v);
  return u.href;
}

const dbfs = (linear) => (linear > 1e-6 ? 20 * Math.log10(linear) : -120);
/** A number with `digits` decimals, or a dash when there is none. */
function fmt(v, digits = 1) {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–";
}

// ---------------------------------------------------------------------------------------------
// Notices: one per key, replaced when the same key is raised again.

const notices = new Map();

/**
 * Shows a notice. `kind` is "error" or "warning"; `action` an optional `{label, run}` button.
 */
function notify(key, kind, text, action) {
  clearNotice(key);
  const el = document.createElement("div");
  el.className = `notice ${kind}`;
  el.dataset.key = key;
  const p = document.createElement("span");
  p.textContent = text;
  el.append(p);
  if (action) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = action.label;
    b.addEventListener("click", () => {
      clearNotice(key);
      action.run();
    });
    el.append(b);
  }
  $("notices").append(el);
  notices.set(key, el);
}

/** {@link notify}, unless the same notice is already shown (polls repeat it every second). */
function notifySteady(key, kind, text, action) {
  const shown = notices.get(key);
  if (shown?.firstChild?.textContent === text && shown.classList.contains(kind)) return;
  notify(key, kind, text, action);
}

function clearNotice(key) {
  notices.get(key)?.remove();
  notices.delete(key);
}

// ---------------------------------------------------------------------------------------------
// Audio analysis for the level meters and the test hook.

/** Keeps the last second of one channel and says its level and dominant frequency. */
class Analyser {
  constructor(rate = OPUS_RATE) {
    this.rate = rate;
    this.ring = new Float32Array(rate);
    this.pos = 0;
    this.total = 0;
  }

  /** Adds samples (the rate may change: then the history restarts). */
  push(x, rate) {
    if (rate !== this.rate) {
      this.rate = rate;
      this.ring = new Float32Array(rate);
      this.pos = 0;
      this.total = 0;
    }
    for (let i = 0; i < x.length; i++) {
      this.ring[this.pos] = x[i];
      this.pos = (this.pos + 1) % this.ring.length;
    }
    this.total += x.length;
  }

  /** The last second (or less) in time order. */
  last() {
    const n = Math.min(this.total, this.ring.length);
    const out = new Float64Array(n);
    const start = (this.pos - n + this.ring.length) % this.ring.length;
    for (let i = 0; i < n; i++) out[i] = this.ring[(start + i) % this.ring.length];
    return out;
  }

  /**
   * `{samples, rate, rmsDb, frequency}` of the last second (frequency `null` below 0.1 s of
   * sound, and without `analyse`: finding it costs tens of milliseconds of main-thread time).
   */
  summary(analyse = true) {
    const x = this.last();
    let sum = 0;
    for (const v of x) sum += v * v;
    const rms = x.length ? Math.sqrt(sum / x.length) : 0;
    return {
      samples: this.total,
      rate: this.rate,
      rmsDb: dbfs(rms),
      frequency: analyse && x.length >= this.rate / 10 && rms > 1e-4
        ? dominantFrequency(x, this.rate)
        : null,
    };
  }
}

/** Squared DFT magnitude of `x` at `f` Hz (Goertzel). */
function goertzel(x, f, rate) {
  const k = 2 * Math.cos((2 * Math.PI * f) / rate);
  let s1 = 0, s2 = 0;
  for (let i = 0; i < x.length; i++) {
    const s0 = x[i] + k * s1 - s2;
    s2 = s1;
    s1 = s0;
  }
  return s1 * s1 + s2 * s2 - k * s1 * s2;
}

function hann(x) {
  const n = x.length;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = x[i] * (0.5 - 0.5 * Math.cos((2 * Math.PI * i) / (n - 1)));
  return out;
}

/**
 * Dominant frequency of `x` between 50 Hz and 12 kHz: a coarse scan of the first 4096 samples,
 * a half-bin scan of all of them around the coarse peak, then a golden-section search.
 */
function dominantFrequency(x, rate) {
  const lo = 50, hi = Math.min(12000, rate / 2 - 1);
  const coarse = hann(x.subarray(0, Math.min(x.length, 4096)));
  const full = hann(x);
  const scan = (sig, from, to, step) => {
    let best = from, bestPower = -1;
    for (let f = from; f <= to; f += step) {
      const p = goertzel(sig, f, rate);
      if (p > bestPower) [best, bestPower] = [f, p];
    }
    return best;
  };
  const cStep = rate / coarse.length;
  const c = scan(coarse, lo, hi, cStep);
  const fStep = rate / full.length / 2;
  const f = scan(full, Math.max(lo, c - 2 * cStep), c + 2 * cStep, fStep);
  let a = f - fStep, b = f + fStep;
  const g = (Math.sqrt(5) - 1) / 2;
  for (let i = 0; i < 30; i++) {
    const m1 = b - g * (b - a), m2 = a + g * (b - a);
    if (goertzel(full, m1, rate) > goertzel(full, m2, rate)) b = m2;
    else a = m1;
  }
  return (a + b) / 2;
}

/** A level meter with a peak that falls at 20 dB/s. */
class Meter {
  constructor(meterId, textId) {
    this.meter = $(meterId);
    this.text = $(textId);
    this.level = -120;
    this.at = performance.now();
  }

  /** Feeds a block's peak (linear). */
  feed(peak) {
    const now = performance.now();
    const fallen = this.level - ((now - this.at) / 1000) * 20;
    this.level = Math.max(fallen, dbfs(peak));
    this.at = now;
  }

  render(active) {
    const now = performance.now();
    const level = active ? this.level - ((now - this.at) / 1000) * 20 : -120;
    this.meter.value = Math.max(-60, Math.min(0, level));
    this.text.textContent = active ? (level <= -60 ? "< −60 dBFS" : `${fmt(level)} dBFS`) : "–";
    this.meter.setAttribute("aria-valuetext", this.text.textContent);
  }
}

/** Copies every channel of `data` out as `Float32Array`s (any sample format the decoder gives). */
function planesOf(data) {
  const n = data.numberOfFrames, ch = data.numberOfChannels;
  const planes = [];
  try {
    for (let c = 0; c < ch; c++) {
      const p = new Float32Array(n);
      data.copyTo(p, { planeIndex: c, format: "f32-planar" });
      planes.push(p);
    }
    return planes;
  } catch {
    // Older engines cannot convert in copyTo: read the native format.
  }
  planes.length = 0;
  const fmtName = data.format;
  const planar = fmtName.endsWith("-planar");
  const scale = fmtName.startsWith("s16")
    ? 1 / 32768
    : fmtName.startsWith("s32")
    ? 1 / 2147483648
    : 1;
  const Ctor = fmtName.startsWith("s16")
    ? Int16Array
    : fmtName.startsWith("s32")
    ? Int32Array
    : fmtName.startsWith("u8")
    ? Uint8Array
    : Float32Array;
  const read = (plane, len) => {
    const buf = new Ctor(len);
    data.copyTo(buf, { planeIndex: plane });
    return buf;
  };
  const conv = (v) => (Ctor === Uint8Array ? (v - 128) / 128 : v * scale);
  if (planar) {
    for (let c = 0; c < ch; c++) planes.push(Float32Array.from(read(c, n), conv));
  } else {
    const all = read(0, n * ch);
    for (let c = 0; c < ch; c++) {
      const p = new Float32Array(n);
      for (let i = 0; i < n; i++) p[i] = conv(all[i * ch + c]);
      planes.push(p);
    }
  }
  return planes;
}

// ---------------------------------------------------------------------------------------------
// Capabilities

const caps = {
  secure: globalThis.isSecureContext,
  decoder: typeof globalThis.AudioDecoder === "function",
  encoder: typeof globalThis.AudioEncoder === "function",
  worklet: typeof globalThis.AudioWorkletNode === "function",
  microphone: typeof navigator.mediaDevices?.getUserMedia === "function",
};

const WEBCODECS_HELP = "Use a current Chrome, Edge or Firefox (WebCodecs with Opus).";

function checkCapabilities() {
  if (!caps.secure) {
    notify(
      "insecure",
      "error",
      `This page was opened over plain HTTP from ${location.host}, which browsers do not treat as ` +
        "secure: audio decoding, AudioWorklet and the microphone are only available over HTTPS " +
        "or on localhost. Put the service behind HTTPS, or reach it through an SSH tunnel " +
        "(ssh -L 8080:127.0.0.1:8080 …) and open http://localhost:8080/.",
    );
  }
  const missing = [];
  if (!caps.decoder) missing.push("AudioDecoder");
  if (!caps.encoder) missing.push("AudioEncoder");
  if (missing.length > 0 && caps.secure) {
    const what = !caps.decoder && !caps.encoder
      ? "listen or talk"
      : !caps.decoder
      ? "listen (talking may still work)"
      : "talk (listening may still work)";
    notify(
      "webcodecs",
      "error",
      `This browser lacks WebCodecs ${
        missing.join(" and ")
      }, so it cannot ${what}. ${WEBCODECS_HELP}`,
    );
  }
  if (!caps.worklet && caps.secure) {
    notify("worklet", "error", "This browser lacks AudioWorklet: it cannot play or capture audio.");
  }
  if (!caps.microphone && caps.secure) {
    notify("no-mic-api", "warning", "This browser offers no microphone access (getUserMedia).");
  }
  caps.canListen = caps.secure && caps.decoder && caps.worklet;
  caps.canTalk = caps.secure && caps.encoder && caps.worklet && caps.microphone;
  // The codec itself: a WebCodecs without Opus is as good as none here.
  if (caps.decoder && caps.secure) {
    AudioDecoder.isConfigSupported({ codec: "opus", sampleRate: OPUS_RATE, numberOfChannels: 2 })
      .then((r) => {
        if (!r.supported) {
          notify(
            "opus-dec",
            "error",
            `This browser's AudioDecoder cannot decode Opus. ${WEBCODECS_HELP}`,
          );
          caps.canListen = false;
          render();
        }
      }, () => {});
  }
}

/**
 * Resumes an AudioContext. A browser that wants a user gesture first (the page was driven by
 * script, or the click's activation ran out) keeps it suspended: then say so, offer a button,
 * and go on — audio starts with that click.
 */
async function resumeAudio(ctx, key, onRunning) {
  const resumed = ctx.resume();
  const settled = await Promise.race([
    resumed.then(() => true, () => true),
    new Promise((r) => setTimeout(() => r(false), 1000)),
  ]);
  if (settled && ctx.state === "running") return;
  notify(key, "warning", "The browser holds audio until you click on the page.", {
    label: "Start audio",
    run: () => ctx.resume(),
  });
  ctx.addEventListener("statechange", () => {
    if (ctx.state === "running") {
      clearNotice(key);
      onRunning?.();
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Listen

/** Frames (48 kHz) a new decoder's output is faded in over, and of them silenced first. */
const FADE_IN_FRAMES = 1920;
const FADE_SILENT_FRAMES = 480;

class Listener {
  constructor() {
    this.active = false;
    this.generation = 0;
    this.analyser = new Analyser();
    this.meter = new Meter("listen-meter", "listen-level");
    this.reset();
  }

  reset() {
    this.hello = null;
    this.packets = 0;
    this.bytes = 0;
    this.lost = 0;
    this.late = 0;
    this.silence = 0;
    this.discontinuities = 0;
    this.decodeErrors = 0;
    this.decodeDrops = 0;
    this.decodedFrames = 0;
    this.decodedPeak = 0;
    this.fadeAt = FADE_IN_FRAMES;
    this.lastSeq = null;
    this.lastTs = null;
    this.extTs = 0;
    this.playout = null;
  }

  async start() {
    if (this.active) return;
    this.active = true;
    // Each start is a generation: a stop, or a newer start, while this one waits (for the
    // worklet module, for the audio to resume) leaves it to close only what it made itself.
    const gen = ++this.generation;
    this.reset();
    this.retryMs = RECONNECT_MIN_MS;
    render();
    // Created inside the click that started it: autoplay rules allow it to run.
    const ctx = new AudioContext({ sampleRate: OPUS_RATE, latencyHint: "interactive" });
    this.ctx = ctx;
    const superseded = async () => {
      if (gen === this.generation) return false;
      if (ctx.state !== "closed") await ctx.close().catch(() => {});
      return true;
    };
    try {
      await ctx.audioWorklet.addModule("audio-worklet.js");
      if (await superseded()) return;
      const node = new AudioWorkletNode(ctx, "kvm-playout", {
        numberOfInputs: 0,
        numberOfOutputs: 1,
        outputChannelCount: [2],
        processorOptions: { targetMs: 40, minMs: 20, maxMs: 300 },
      });
      node.port.onmessage = (e) => {
        if (e.data.type === "stats" && this.node === node) this.playout = e.data;
      };
      node.connect(ctx.destination);
      this.node = node;
      // Held by the browser until a click: what was decoded meanwhile is old by then (a second
      // of it played before the buffer trimmed it).
      await resumeAudio(ctx, "listen-audio", () => this.node?.port.postMessage({ type: "reset" }));
      if (await superseded()) return;
      this.connect();
    } catch (e) {
      if (await superseded()) return;
      notify("listen", "error", `Cannot start listening: ${e.message}`);
      await this.stop();
    }
  }

  connect() {
    const ws = new WebSocket(wsUrl("/api/audio/stream"));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.lastPacketAt = performance.now();
    ws.onopen = () => {
      this.retryMs = RECONNECT_MIN_MS;
      this.lastPacketAt = performance.now();
      clearNotice("listen");
    };
    ws.onmessage = (e) => {
      if (typeof e.data === "string") this.onText(e.data);
      else this.onPacket(e.data);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.closeDecoder();
      if (!this.active) return;
      const why = e.code === CLOSE_TOO_SLOW
        ? "this connection was too slow to keep up"
        : this.stalled
        ? `no audio arrived for ${LISTEN_STALL_MS / 1000} s`
        : e.reason || `connection closed (${e.code})`;
      this.stalled = false;
      notify("listen", "warning", `Listening interrupted: ${why}. Reconnecting…`);
      this.lastSeq = null;
      this.node?.port.postMessage({ type: "reset" });
      this.retry = setTimeout(() => this.active && this.connect(), this.retryMs);
      this.retryMs = Math.min(RECONNECT_MAX_MS, this.retryMs * 2);
    };
  }

  onText(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg.type !== "hello") return;
    if (msg.codec !== "opus") {
      notify(
        "listen",
        "error",
        `The service sends codec "${msg.codec}": this page plays only Opus`,
      );
      return;
    }
    // Muted: the service sends nothing until unmuted. The playout buffer is told, so that running
    // dry is no underrun (which would add delay to the rest of the session).
    if (msg.muted && !this.hello?.muted) this.node?.port.postMessage({ type: "pause" });
    this.hello = msg;
    syncSelect($("output-preset"), msg.preset);
    syncCheck($("mute-output"), msg.muted);
    render();
  }

  configureDecoder(channels) {
    if (!this.decoder || this.decoder.state === "closed") {
      this.decoder = new AudioDecoder({
        output: (d) => this.onDecoded(d),
        error: (e) => {
          this.decodeErrors++;
          notify(
            "decode",
            "warning",
            `Audio decoding failed (${e.message}); restarting the decoder`,
          );
          this.decoder = null;
        },
      });
    } else if (this.decoder.state === "configured") {
      this.decoder.reset();
    }
    this.decoder.configure({ codec: "opus", sampleRate: OPUS_RATE, numberOfChannels: channels });
    this.decoderChannels = channels;
    // A decoder that starts mid-stream has none of the encoder's state: its first 20–30 ms can
    // come out at up to 2.5 times the signal. Faded in (see fade()).
    this.fadeAt = 0;
  }

  /** Silences the first 10 ms a new decoder outputs and ramps the next 30 ms in. */
  fade(planes) {
    const n = planes[0].length;
    for (let i = 0; i < n && this.fadeAt < FADE_IN_FRAMES; i++, this.fadeAt++) {
      const g = Math.max(
        0,
        (this.fadeAt - FADE_SILENT_FRAMES) / (FADE_IN_FRAMES - FADE_SILENT_FRAMES),
      );
      for (const p of planes) p[i] *= g;
    }
  }

  closeDecoder() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = null;
  }

  /**
   * Called every second: a connection over which nothing arrives while the service says its
   * pipeline runs unmuted is stalled (a network that drops everything leaves the socket open for
   * minutes). It is closed and opened again: the new one starts with current audio, where the old
   * one would deliver the stall's backlog late.
   */
  watch() {
    const ws = this.ws;
    if (!this.active || !ws || ws.readyState !== WebSocket.OPEN) return;
    const quiet = this.hello?.muted === true || outputStatus?.running === false;
    if (quiet) this.lastPacketAt = performance.now();
    else if (performance.now() - this.lastPacketAt > LISTEN_STALL_MS) {
      this.stalled = true;
      ws.close(4000, "stalled");
      ws.onclose({ code: 4000, reason: "stalled" });
    }
  }

  onPacket(buf) {
    this.lastPacketAt = performance.now();
    if (buf.byteLength < HEADER_BYTES) return;
    const v = new DataView(buf);
    if (v.getUint8(0) !== PROTOCOL_VERSION) return;
    const flags = v.getUint8(1);
    const channels = v.getUint8(2);
    const seq = v.getUint32(4);
    const ts = v.getUint32(8);
    if (channels !== 1 && channels !== 2) return;
    const restart = (flags & FLAG_DISCONTINUITY) !== 0;
    if (this.lastSeq !== null) {
      const d = (seq - this.lastSeq) >>> 0;
      if (d === 0 || d >= 0x80000000) {
        this.late++;
        return;
      }
      // Across a discontinuity (mute, DTX, a restart of the pipeline) the numbers the service
      // skipped were never sent: not losses.
      if (!restart) this.lost += d - 1;
    }
    this.lastSeq = seq;
    this.packets++;
    this.bytes += buf.byteLength - HEADER_BYTES;
    if (flags & FLAG_SILENCE) this.silence++;
    // Unwrap the 32-bit timestamp into a running count of 48 kHz ticks.
    if (this.lastTs !== null) {
      const d = (ts - this.lastTs) >>> 0;
      this.extTs += d < 0x80000000 ? d : d - 0x100000000;
    }
    this.lastTs = ts;
    if (restart) {
      this.discontinuities++;
      // The gap before this packet was the sender's: a dry-out in it was no network trouble.
      this.node?.port.postMessage({ type: "gap" });
    }
    // The decoder goes on across a discontinuity: after a mute the service's encoder goes on
    // from the last frame it sent, which this decoder has (a new decoder made a burst of it).
    if (!this.decoder || this.decoder.state !== "configured" || this.decoderChannels !== channels) {
      this.configureDecoder(channels);
    }
    if (this.decoder.decodeQueueSize > MAX_DECODE_QUEUE) {
      // Behind (a burst after a stall): what is queued and buffered is old. Start over from this
      // packet — a new decoder, an empty playout buffer — rather than drop the newest and play
      // the old (0.6 s of it after a 15 s stall).
      this.decodeDrops += this.decoder.decodeQueueSize;
      this.configureDecoder(channels);
      this.node?.port.postMessage({ type: "reset" });
    }
    this.decoder.decode(
      new EncodedAudioChunk({
        type: "key",
        timestamp: Math.round((this.extTs * 1e6) / OPUS_RATE),
        data: new Uint8Array(buf, HEADER_BYTES),
      }),
    );
  }

  onDecoded(data) {
    const rate = data.sampleRate;
    let planes;
    try {
      planes = planesOf(data);
    } finally {
      data.close();
    }
    if (!this.active || planes.length === 0) return;
    if (this.fadeAt < FADE_IN_FRAMES) this.fade(planes);
    this.decodedFrames += planes[0].length;
    this.analyser.push(planes[0], rate);
    let peak = 0;
    for (const p of planes) for (const v of p) peak = Math.max(peak, Math.abs(v));
    this.decodedPeak = Math.max(this.decodedPeak, peak);
    this.meter.feed(peak);
    this.node?.port.postMessage({ type: "audio", planes }, planes.map((p) => p.buffer));
  }

  async stop() {
    this.active = false;
    this.generation++;
    clearTimeout(this.retry);
    const ws = this.ws;
    this.ws = null;
    ws?.close(1000, "stopped");
    this.closeDecoder();
    this.node?.disconnect();
    this.node = null;
    const ctx = this.ctx;
    this.ctx = null;
    if (ctx && ctx.state !== "closed") await ctx.close().catch(() => {});
    clearNotice("listen");
    clearNotice("listen-audio");
    clearNotice("listen-pipeline");
    render();
  }

  stats(analyse) {
    return {
      active: this.active,
      connected: this.ws?.readyState === WebSocket.OPEN,
      hello: this.hello,
      packetsReceived: this.packets,
      bytesReceived: this.bytes,
      packetsLost: this.lost,
      packetsLate: this.late,
      silencePackets: this.silence,
      discontinuities: this.discontinuities,
      decodeErrors: this.decodeErrors,
      decodeDrops: this.decodeDrops,
      decodedFrames: this.decodedFrames,
      decodedPeak: this.decodedPeak,
      contextRate: this.ctx?.sampleRate ?? null,
      playout: this.playout,
      decoded: this.analyser.summary(analyse),
    };
  }
}

// ---------------------------------------------------------------------------------------------
// Talk

const APPLICATIONS = { voip: "voip", audio: "audio", restrictedLowDelay: "lowdelay" };

class Talker {
  constructor() {
    this.active = false;
    this.generation = 0;
    this.muted = false;
    this.analyser = new Analyser();
    this.meter = new Meter("talk-meter", "talk-level");
    this.reset();
  }

  reset() {
    this.hello = null;
    this.sent = 0;
    this.sentBytes = 0;
    this.encodeErrors = 0;
    this.seq = 0;
    this.capturedSamples = 0;
    this.discontinuity = true;
    this.trackRate = null;
    this.encoderConfig = null;
  }

  /** Starts talking; `takeover` replaces whoever talks now. */
  async start({ takeover = false } = {}) {
    if (this.active) return;
    this.active = true;
    // Each start is a generation: a stop, or a newer start, while this one waits (for the
    // permission prompt, the worklet module, the audio to resume) leaves it to release only what
    // it made itself — before, it went on with the newer start's context and stopped it.
    const gen = ++this.generation;
    this.reset();
    clearNotice("mic");
    render();
    // Created inside the click that started it (autoplay rules), before the permission prompt.
    let ctx = new AudioContext({ sampleRate: OPUS_RATE, latencyHint: "interactive" });
    this.ctx = ctx;
    let stream = null;
    const superseded = async () => {
      if (gen === this.generation) return false;
      for (const t of stream?.getTracks() ?? []) t.stop();
      if (ctx.state !== "closed") await ctx.close().catch(() => {});
      return true;
    };
    const vp = $("voice-processing").checked;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: vp, noiseSuppression: vp, autoGainControl: vp },
      });
    } catch (e) {
      if (await superseded()) return;
      notify("mic", "error", microphoneError(e));
      await this.stop({ keepNotice: true });
      return;
    }
    if (await superseded()) return;
    this.stream = stream;
    try {
      const track = stream.getAudioTracks()[0];
      this.trackRate = track?.getSettings().sampleRate ?? null;
      let source;
      try {
        // The context resamples the microphone (Chromium's fake one runs at 44.1 kHz) to 48 kHz.
        source = ctx.createMediaStreamSource(stream);
      } catch (e) {
        if (e.name !== "NotSupportedError") throw e;
        // Engines that cannot resample a microphone: capture at its own rate and let the
        // encoder resample (Opus codes at 48 kHz internally whatever it is fed).
        await ctx.close();
        ctx = new AudioContext({ latencyHint: "interactive" });
        this.ctx = ctx;
        source = ctx.createMediaStreamSource(stream);
      }
      await ctx.audioWorklet.addModule("audio-worklet.js");
      if (await superseded()) return;
      const node = new AudioWorkletNode(ctx, "kvm-capture", {
        numberOfInputs: 1,
        numberOfOutputs: 0,
        channelCount: 1,
        channelCountMode: "explicit",
        channelInterpretation: "speakers",
        processorOptions: { frameSamples: Math.round(ctx.sampleRate * 0.02) },
      });
      node.port.onmessage = (e) => {
        if (e.data.type === "frame" && this.node === node) this.onFrame(e.data);
      };
      source.connect(node);
      this.node = node;
      this.source = source;
      await resumeAudio(ctx, "talk-audio");
      if (await superseded()) return;
      this.connect(takeover);
    } catch (e) {
      if (await superseded()) return;
      notify("mic", "error", `Cannot start talking: ${e.message}`);
      await this.stop({ keepNotice: true });
    }
  }

  connect(takeover) {
    const ws = new WebSocket(wsUrl("/api/microphone/stream", takeover ? { takeover: "1" } : {}));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onmessage = (e) => {
      if (typeof e.data === "string") this.onText(e.data);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (!this.active) return;
      if (e.code === CLOSE_BUSY) {
        notify("mic", "warning", "Someone else is talking to the target (microphone busy).", {
          label: "Take over",
          run: () => this.start({ takeover: true }),
        });
      } else if (e.code === CLOSE_TAKEN_OVER) {
        notify("mic", "warning", "Another operator took the microphone over.", {
          label: "Take it back",
          run: () => this.start({ takeover: true }),
        });
      } else {
        notify("mic", "error", `Talking stopped: ${e.reason || `connection closed (${e.code})`}`, {
          label: "Talk again",
          run: () => this.start(),
        });
      }
      this.stop({ keepNotice: true });
    };
  }

  onText(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg.type !== "hello") return;
    this.hello = msg;
    syncSelect($("mic-preset"), msg.preset);
    if (msg.running === false) {
      notify(
        "mic-stopped",
        "warning",
        "The service's microphone pipeline is stopped: the target hears nothing until it starts.",
      );
    } else clearNotice("mic-stopped");
    this.configureEncoder(msg);
    render();
  }

  async configureEncoder(hello) {
    const rate = this.ctx.sampleRate;
    const config = {
      codec: "opus",
      sampleRate: rate,
      numberOfChannels: 1,
      bitrate: hello.bitrate,
      bitrateMode: hello.vbr === false ? "constant" : "variable",
      opus: {
        frameDuration: hello.frameMs * 1000,
        complexity: hello.complexity,
        usedtx: !!hello.dtx,
        useinbandfec: !!hello.fec,
        packetlossperc: hello.packetLossPerc ?? 0,
        signal: hello.signal ?? "voice",
        application: APPLICATIONS[hello.application] ?? "voip",
      },
    };
    let support = await AudioEncoder.isConfigSupported(config);
    if (!support.supported) {
      // Engines that do not know the signal/application hints: go without them.
      delete config.opus.signal;
      delete config.opus.application;
      support = await AudioEncoder.isConfigSupported(config);
    }
    if (!support.supported) {
      notify("mic", "error", `This browser cannot encode Opus at ${rate} Hz. ${WEBCODECS_HELP}`);
      return this.stop({ keepNotice: true });
    }
    if (!this.active || this.hello !== hello) return; // stopped or superseded meanwhile
    if (!this.encoder || this.encoder.state === "closed") {
      this.encoder = new AudioEncoder({
        output: (chunk) => this.onChunk(chunk),
        error: (e) => {
          this.encodeErrors++;
          notify("mic", "error", `Audio encoding failed: ${e.message}`);
          this.encoder = null;
        },
      });
    }
    this.encoder.configure(config);
    this.encoderConfig = config;
    this.node?.port.postMessage({
      type: "frameSamples",
      frameSamples: Math.round((rate * hello.frameMs) / 1000),
    });
  }

  onFrame({ samples, peak }) {
    const rate = this.ctx?.sampleRate ?? OPUS_RATE;
    this.meter.feed(this.muted ? 0 : peak);
    const timestamp = Math.round((this.capturedSamples * 1e6) / rate);
    this.capturedSamples += samples.length;
    if (this.muted) {
      this.discontinuity = true;
      return;
    }
    this.analyser.push(samples, rate);
    if (!this.encoder || this.encoder.state !== "configured") return;
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    this.encoder.encode(
      new AudioData({
        format: "f32-planar",
        sampleRate: rate,
        numberOfFrames: samples.length,
        numberOfChannels: 1,
        timestamp,
        data: samples,
      }),
    );
  }

  onChunk(chunk) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    const msg = new Uint8Array(HEADER_BYTES + chunk.byteLength);
    const v = new DataView(msg.buffer);
    v.setUint8(0, PROTOCOL_VERSION);
    v.setUint8(1, this.discontinuity ? FLAG_DISCONTINUITY : 0);
    v.setUint8(2, 1);
    v.setUint8(3, 0);
    v.setUint32(4, this.seq);
    v.setUint32(8, Math.round((chunk.timestamp * OPUS_RATE) / 1e6) >>> 0);
    chunk.copyTo(msg.subarray(HEADER_BYTES));
    ws.send(msg);
    this.discontinuity = false;
    this.seq = (this.seq + 1) >>> 0;
    this.sent++;
    this.sentBytes += chunk.byteLength;
  }

  async stop({ keepNotice = false } = {}) {
    this.active = false;
    this.generation++;
    const ws = this.ws;
    this.ws = null;
    ws?.close(1000, "stopped");
    if (this.encoder && this.encoder.state !== "closed") this.encoder.close();
    this.encoder = null;
    this.source?.disconnect();
    this.source = null;
    this.node = null;
    for (const t of this.stream?.getTracks() ?? []) t.stop();
    this.stream = null;
    const ctx = this.ctx;
    this.ctx = null;
    if (ctx && ctx.state !== "closed") await ctx.close().catch(() => {});
    if (!keepNotice) clearNotice("mic");
    clearNotice("talk-audio");
    clearNotice("mic-stopped");
    render();
  }

  stats(analyse) {
    return {
      active: this.active,
      connected: this.ws?.readyState === WebSocket.OPEN,
      muted: this.muted,
      hello: this.hello,
      packetsSent: this.sent,
      bytesSent: this.sentBytes,
      encodeErrors: this.encodeErrors,
      microphoneRate: this.trackRate,
      captureRate: this.ctx?.sampleRate ?? null,
      encoder: this.encoderConfig,
      captured: this.analyser.summary(analyse),
    };
  }
}

function microphoneError(e) {
  switch (e?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "The microphone was refused: allow this page to use the microphone (the icon in the " +
        "address bar, or the browser's site settings), then press Talk again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found: connect one, then press Talk again.";
    case "NotReadableError":
    case "AbortError":
      return "The microphone could not be opened: another application may be using it.";
    default:
      return `Cannot open the microphone: ${e?.message ?? e}`;
  }
}

// ---------------------------------------------------------------------------------------------
// Controls and the status poll

const listener = new Listener();
const talker = new Talker();
let presets = null;
let lastMetrics = null;
let lastMetricsAt = 0;
let outputStatus = null;
let micStatus = null;
let serviceReachable = null;

/**
 * Sets a select's value unless the user is busy with it — or after its request failed
 * (`dataset.resync`): then the service's value is what it must show, focused or not.
 */
function syncSelect(select, value) {
  if (typeof value !== "string" || select.dataset.pending) return;
  if (document.activeElement === select && !select.dataset.resync) return;
  delete select.dataset.resync;
  if ([...select.options].some((o) => o.value === value)) select.value = value;
}

function syncCheck(box, value) {
  if (typeof value !== "boolean" || box.dataset.pending) return;
  delete box.dataset.resync;
  box.checked = value;
}

function presetLabel(name, p) {
  if (!p) return name;
  const ch = p.channels === 2 ? "stereo" : "mono";
  return `${name} — ${Math.round(p.bitrate / 1000)} kb/s ${ch}, ${p.frameMs} ms`;
}

function fillPresets(select, table, names) {
  select.replaceChildren();
  for (const name of names) {
    const o = document.createElement("option");
    o.value = name;
    o.textContent = presetLabel(name, table?.[name]);
    select.append(o);
  }
}

async function loadPresets() {
  try {
    presets = await api("GET", "/api/presets");
  } catch (e) {
    presets = null;
    if (e instanceof ApiError && e.status === 401) return tokenNeeded();
  }
  const names = presets?.names ?? ["low", "medium", "high", "ultra"];
  fillPresets($("output-preset"), presets?.output, names);
  fillPresets($("mic-preset"), presets?.microphone, names);
  $("output-preset").value = outputStatus?.preset ?? "high";
  $("mic-preset").value = micStatus?.preset ?? "high";
}

function tokenNeeded() {
  notify(
    "token",
    "error",
    token === null
      ? "The service needs an API token: open this page as …/?token=<your token>."
      : "The service refused the API token in this page's address: check it (…/?token=<your token>).",
  );
}

/** Runs a control request with the element marked busy; reverts and explains on failure. */
async function control(el, revert, fn) {
  // Busy, not disabled: disabling the focused control sent focus to the page, and the next arrow
  // key on a quality list was lost. So a second change can start while the first runs: only the
  // newest request speaks for the control. An older one's failure is overtaken by it; when the
  // newest fails, the control shows what the service has (the next poll sets it, focused or
  // not) — reverted to the value before it, a list showed "high" while the service had taken an
  // earlier "medium".
  const mine = (el.controlSeq = (el.controlSeq ?? 0) + 1);
  el.dataset.pending = "1";
  el.setAttribute("aria-busy", "true");
  try {
    await fn();
    if (mine === el.controlSeq) clearNotice("control");
  } catch (e) {
    if (mine === el.controlSeq) {
      revert();
      el.dataset.resync = "1";
      notify("control", "error", e.message);
    }
  } finally {
    if (mine === el.controlSeq) {
      delete el.dataset.pending;
      el.removeAttribute("aria-busy");
    }
  }
  poll();
}

function wireControls() {
  $("listen").addEventListener(
    "click",
    () => (listener.active ? listener.stop() : listener.start()),
  );
  $("talk").addEventListener("click", () => (talker.active ? talker.stop() : talker.start()));

  const outSel = $("output-preset");
  outSel.addEventListener("change", () => {
    const before = outputStatus?.preset;
    control(
      outSel,
      () => before && (outSel.value = before),
      () => api("PUT", "/api/audio/quality", { preset: outSel.value }),
    );
  });
  const micSel = $("mic-preset");
  micSel.addEventListener("change", () => {
    const before = micStatus?.preset;
    control(
      micSel,
      () => before && (micSel.value = before),
      () => api("PUT", "/api/microphone/quality", { preset: micSel.value }),
    );
  });
  const mute = $("mute-output");
  mute.addEventListener("change", () => {
    const want = mute.checked;
    control(
      mute,
      () => (mute.checked = !want),
      () => api("PUT", "/api/audio/mute", { muted: want }),
    );
  });
  $("mute-mic").addEventListener("change", (e) => {
    talker.muted = e.target.checked;
    render();
  });
  for (
    const [id, path] of [
      ["output-start", "/api/audio/start"],
      ["output-stop", "/api/audio/stop"],
      ["mic-start", "/api/microphone/start"],
      ["mic-stop", "/api/microphone/stop"],
    ]
  ) {
    const b = $(id);
    b.addEventListener("click", () => control(b, () => {}, () => api("POST", path)));
  }
}

let polling = false;

async function poll() {
  if (polling) return;
  polling = true;
  try {
    const [audio, mic, metrics] = await Promise.allSettled([
      api("GET", "/api/audio"),
      api("GET", "/api/microphone"),
      api("GET", "/api/metrics"),
    ]);
    const failed = [audio, mic, metrics].find((r) => r.status === "rejected");
    if (failed?.reason instanceof ApiError && failed.reason.status === 401) tokenNeeded();
    // A refused token is an answer: the service is up.
    const answered = (r) =>
      r.status === "fulfilled" || (r.reason instanceof ApiError && r.reason.status === 401);
    serviceReachable = answered(audio) || answered(metrics);
    if (audio.status === "fulfilled") {
      outputStatus = audio.value;
      syncSelect($("output-preset"), outputStatus?.preset);
      syncCheck($("mute-output"), outputStatus?.muted);
    }
    if (mic.status === "fulfilled") {
      micStatus = mic.value;
      syncSelect($("mic-preset"), micStatus?.preset);
    }
    if (metrics.status === "fulfilled") {
      lastMetrics = metrics.value;
      lastMetricsAt = Date.now();
    }
  } finally {
    polling = false;
  }
  pipelineNotices();
  renderMetrics();
  render();
}

// ---------------------------------------------------------------------------------------------
// Rendering

/**
 * Why a pipeline whose status is `s` carries no audio now, in words for the operator — with what
 * to do about it — or null while it runs (or is about to).
 */
function pipelineProblem(s, what) {
  if (!s || s.running || s.state === "starting") return null;
  const sup = s.supervisor;
  const err = sup?.lastError ? ` (${sup.lastError})` : "";
  switch (s.state) {
    case "disabled":
      return `The service has no ${what} device configured.`;
    case "broken":
      return `The service's ${what} pipeline crashed repeatedly and was left stopped${err}. ` +
        `"Start pipeline" tries again.`;
    case "backoff": {
      const at = sup?.nextRestartAt ? new Date(sup.nextRestartAt).toLocaleTimeString() : null;
      return `The service's ${what} pipeline crashed${err}; it restarts${at ? ` at ${at}` : ""}.`;
    }
    case "waiting-for-device":
      return `The service's ${what} device ${s.device ?? ""} cannot be opened` +
        `${s.lastDeviceError ? `: ${s.lastDeviceError}` : ""}; it is tried again.`;
    case "stopped":
    case "stopping":
      return `The service's ${what} pipeline is stopped: "Start pipeline" starts it.`;
    default:
      return `The service's ${what} pipeline is ${s.state}.`;
  }
}

/** Pipeline notices while listening or talking (see pipelineProblem). */
function pipelineNotices() {
  const out = listener.active ? pipelineProblem(outputStatus, "capture") : null;
  if (out) notifySteady("listen-pipeline", "warning", `Nothing to hear: ${out}`);
  else clearNotice("listen-pipeline");
  const mic = talker.active ? pipelineProblem(micStatus, "playback") : null;
  if (mic) notifySteady("mic-stopped", "warning", `The target hears nothing: ${mic}`);
  else if (talker.active && micStatus) clearNotice("mic-stopped");
}

function pipelineText(s) {
  if (!s) return "–";
  if (s.enabled === false) return "disabled (no device configured)";
  const parts = [s.state ?? (s.running ? "running" : "stopped")];
  if (s.device) parts.push(s.device);
  if (s.rate) parts.push(`${s.rate / 1000} kHz`);
  if (s.lastDeviceError) parts.push(`device error: ${s.lastDeviceError}`);
  return parts.join(" · ");
}

function render() {
  const conn = $("connection");
  conn.textContent = serviceReachable === null
    ? "connecting…"
    : serviceReachable
    ? "service reachable"
    : "service unreachable";
  conn.className = `pill ${serviceReachable === null ? "" : serviceReachable ? "ok" : "bad"}`;

  const lb = $("listen");
  lb.disabled = !listener.active && (!caps.canListen || outputStatus?.enabled === false);
  lb.title = outputStatus?.enabled === false ? "The service has no capture device" : "";
  lb.textContent = listener.active ? "Stop listening" : "Listen";
  lb.classList.toggle("active", listener.active);
  const tb = $("talk");
  tb.disabled = !talker.active && (!caps.canTalk || micStatus?.enabled === false);
  tb.title = micStatus?.enabled === false ? "The service has no playback device" : "";
  tb.textContent = talker.active ? "Stop talking" : "Talk";
  tb.classList.toggle("active", talker.active);

  const h = listener.hello;
  $("listen-stream").textContent = !listener.active
    ? "not listening"
    : !h
    ? "connecting…"
    : h.muted
    ? `${h.preset} · muted by the service (nothing is sent)`
    : `${h.preset} · ${h.channels === 2 ? "stereo" : "mono"} · ${h.frameMs} ms · Opus 48 kHz`;
  $("listen-packets").textContent = listener.active || listener.packets
    ? `${listener.packets} received · ${listener.lost} lost · ${listener.late} late` +
      (listener.decodeDrops ? ` · ${listener.decodeDrops} skipped (behind)` : "")
    : "–";
  const po = listener.playout;
  const ctx = listener.ctx;
  const device = ctx ? fmt((ctx.outputLatency || ctx.baseLatency) * 1000, 0) : "–";
  $("listen-buffer").textContent = listener.active && po
    ? `${fmt(po.depthMs, 0)} ms (target ${fmt(po.targetMs, 0)}) + output ${device} ms · ` +
      `${po.underruns} underruns · ${po.trims} trims`
    : "–";
  $("output-state").textContent = pipelineText(outputStatus);

  const th = talker.hello;
  const resample = talker.trackRate && talker.ctx && talker.trackRate !== talker.ctx.sampleRate
    ? ` · mic ${talker.trackRate / 1000} kHz → ${talker.ctx.sampleRate / 1000} kHz`
    : "";
  $("talk-stream").textContent = !talker.active
    ? "not talking"
    : !th
    ? "connecting…"
    : `${th.preset} · mono · ${th.frameMs} ms · ${Math.round(th.bitrate / 1000)} kb/s${resample}` +
      (talker.muted ? " · muted" : "");
  $("talk-packets").textContent = talker.active || talker.sent ? `${talker.sent} sent` : "–";
  // Read when Talk starts (the browser's capture is opened with it): not changeable mid-talk,
  // where unchecking it changed nothing the target heard.
  const vp = $("voice-processing");
  vp.disabled = talker.active;
  vp.parentElement.title = talker.active
    ? "Applies from the next Talk"
    : "Echo cancellation, noise suppression and automatic gain";
  $("mic-state").textContent = pipelineText(micStatus);
}

function renderMeters() {
  listener.meter.render(listener.active);
  talker.meter.render(talker.active);
}

const STAGE_NAMES = {
  capture_to_encoded: "Capture → encoded",
  encoded_to_handed: "Encoded → handed to WebSocket",
  encoded_to_rtp_sent: "Encoded → sent as RTP",
  received_to_played: "Received → played (mic)",
};

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.append(td);
}

function renderMetrics() {
  const age = $("metrics-age");
  if (!lastMetrics) {
    age.textContent = serviceReachable === false ? "service unreachable" : "–";
    return;
  }
  age.textContent = `updated ${new Date(lastMetricsAt).toLocaleTimeString()}`;
  const h = lastMetrics.histograms?.kvm_audio_stage_latency_ms ?? {};
  const rows = [];
  for (const [key, v] of Object.entries(h)) {
    const stage = /stage="([^"]*)"/.exec(key)?.[1] ?? key;
    const tr = document.createElement("tr");
    cell(tr, STAGE_NAMES[stage] ?? stage);
    cell(tr, fmt(v.p50));
    cell(tr, fmt(v.p90));
    cell(tr, fmt(v.p99));
    cell(tr, String(v.count ?? 0));
    rows.push(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = 5;
    td.textContent = "no frames yet";
    tr.append(td);
    rows.push(tr);
  }
  $("stages").replaceChildren(...rows);

  const g = lastMetrics.gauges ?? {};
  const frameMs = micStatus?.preset && presets?.microphone?.[micStatus.preset]?.frameMs;
  const frames = (v) =>
    typeof v === "number" ? `${v} frames${frameMs ? ` (${v * frameMs} ms)` : ""}` : "–";
  $("playout-depth").textContent = frames(g.kvm_audio_playout_depth_frames);
  $("playout-target").textContent = frames(g.kvm_audio_playout_target_frames);
  const j = g.kvm_audio_playout_jitter_ms;
  $("playout-jitter").textContent = typeof j === "number" ? `${fmt(j)} ms` : "–";

  const d = lastMetrics.counters?.kvm_audio_frames_dropped_total;
  const drops = [];
  const entries = typeof d === "number" ? [["total", d]] : Object.entries(d ?? {});
  for (const [key, n] of entries) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = (/reason="([^"]*)"/.exec(key)?.[1] ?? key).replaceAll("_", " ");
    tr.append(th);
    cell(tr, String(n));
    drops.push(tr);
  }
  if (drops.length === 0) {
    const tr = document.createElement("tr");
    cell(tr, "none");
    drops.push(tr);
  }
  $("drops").replaceChildren(...drops);
}

// ---------------------------------------------------------------------------------------------
// Start-up and the test hook

/**
 * What the page heard and sent, for tests and for curious operators (`kvmAudio.stats()` in the
 * console): packet counts, the playout buffer's state, and the RMS level and dominant frequency
 * of the last second decoded (`listen.decoded`) and captured (`talk.captured`) — the frequency
 * only with `{analyse: true}` (the default), which costs tens of milliseconds.
 */
globalThis.kvmAudio = {
  stats: ({ analyse = true } = {}) => ({
    listen: listener.stats(analyse),
    talk: talker.stats(analyse),
    capabilities: { ...caps },
  }),
  listen: () => listener.start(),
  stopListening: () => listener.stop(),
  talk: (options) => talker.start(options),
  stopTalking: () => talker.stop(),
  metrics: () => lastMetrics,
};

wireControls();
checkCapabilities();
render();
await poll();
await loadPresets();
setInterval(poll, POLL_MS);
setInterval(() => listener.watch(), 1000);
setInterval(renderMeters, 100);
setInterval(render, 500);
globalThis.kvmAudio.ready = true;
