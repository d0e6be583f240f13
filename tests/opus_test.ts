import assert from "node:assert/strict";
import {
  ENCODER_SETTING_NAMES,
  inspectPacket,
  InvalidPacketError,
  OPUS_BAD_ARG,
  OPUS_MAX_PACKET,
  OpusDecoder,
  OpusEncoder,
  OpusError,
  OpusRequest,
  opusVersion,
} from "../ffi/opus.ts";
import { encoderSettings, frameSamples, PRESET_NAMES, PRESETS } from "../lib/quality.ts";
import { channel, dominantFrequency, rmsDb, tone, voiceLike } from "./audio_util.ts";

/** Encodes `pcm` frame by frame, returning the packets. */
function encodeAll(enc: OpusEncoder, pcm: Int16Array, frame: number): Uint8Array[] {
  const out = new Uint8Array(OPUS_MAX_PACKET);
  const packets: Uint8Array[] = [];
  for (let off = 0; off + frame * enc.channels <= pcm.length; off += frame * enc.channels) {
    const n = enc.encode(pcm.subarray(off, off + frame * enc.channels), frame, out);
    packets.push(out.slice(0, n));
  }
  return packets;
}

function decodeAll(dec: OpusDecoder, packets: Uint8Array[], frame: number): Int16Array {
  const pcm = new Int16Array(packets.length * frame * dec.channels);
  packets.forEach((p, i) => {
    const n = dec.decode(p, pcm.subarray(i * frame * dec.channels), frame);
    assert.equal(n, frame);
  });
  return pcm;
}

Deno.test("libopus loads and reports its version", () => {
  assert.match(opusVersion(), /^libopus \d+\.\d+/);
});

for (const direction of ["output", "microphone"] as const) {
  for (const name of PRESET_NAMES) {
    Deno.test(`a tone survives encode and decode at ${direction} preset ${name}`, () => {
      const p = PRESETS[direction][name];
      const frame = frameSamples(p);
      const freq = 997;
      using enc = OpusEncoder.create(
        { channels: p.channels, application: p.application },
        encoderSettings(p),
      );
      using dec = OpusDecoder.create({ channels: p.channels });
      const input = tone({ freq, channels: p.channels, frames: 48000 * 2, amplitude: 0.4 });
      const packets = encodeAll(enc, input, frame);
      assert.equal(packets.length, (48000 * 2) / frame);
      for (const pkt of packets) {
        const info = inspectPacket(pkt);
        assert.equal(info.samples, frame, "every packet holds one preset frame");
      }
      const output = decodeAll(dec, packets, frame);
      // Compare 1 s after the first 0.25 s (codec start-up), shifted by the look-ahead.
      const skip = 12000, keep = 48000, delay = enc.lookahead;
      for (let c = 0; c < p.channels; c++) {
        const a = channel(input, p.channels, c).subarray(skip, skip + keep);
        const b = channel(output, p.channels, c).subarray(skip + delay, skip + delay + keep);
        const fa = dominantFrequency(a, 48000), fb = dominantFrequency(b, 48000);
        assert.ok(Math.abs(fb - fa) / fa < 0.01, `frequency ${fb} Hz vs ${fa} Hz`);
        const la = rmsDb(a), lb = rmsDb(b);
        assert.ok(Math.abs(lb - la) < 1.5, `level ${lb.toFixed(2)} dB vs ${la.toFixed(2)} dB`);
      }
    });
  }
}

Deno.test("every encoder setting reads back what was set", () => {
  using enc = OpusEncoder.create({ channels: 2 });
  for (const direction of ["output", "microphone"] as const) {
    for (const name of PRESET_NAMES) {
      const want = encoderSettings(PRESETS[direction][name]);
      enc.configure(want);
      assert.deepEqual(enc.settings(), want, `${direction}/${name}`);
    }
  }
  // Each setting on its own, moved away from the previous value.
  const alt = {
    bitrate: 77000,
    complexity: 2,
    vbr: false,
    vbrConstraint: false,
    signal: "voice",
    maxBandwidth: "mediumband",
    dtx: true,
    inbandFec: true,
    packetLossPerc: 37,
  } as const;
  for (const key of ENCODER_SETTING_NAMES) {
    enc.configure({ [key]: alt[key] });
    assert.equal(enc.get(key), alt[key], key);
  }
  assert.equal(enc.lookahead, 312, "audio application at 48 kHz: 2.5 ms + 4 ms delay");
  using low = OpusEncoder.create({ channels: 2, application: "restrictedLowDelay" });
  assert.equal(low.lookahead, 120, "restricted low delay: 2.5 ms");
});

Deno.test("an invalid value that reaches libopus gives OpusError with its text", () => {
  using enc = OpusEncoder.create({ channels: 1 });
  assert.throws(
    () => enc.ctlSet(OpusRequest.SET_COMPLEXITY, 11),
    (e: unknown) => e instanceof OpusError && e.code === OPUS_BAD_ARG,
  );
  try {
    enc.ctlSet(OpusRequest.SET_SIGNAL, 1234);
    assert.fail("expected OpusError");
  } catch (e) {
    assert.ok(e instanceof OpusError);
    assert.equal(e.fn, "opus_encoder_ctl");
    assert.match(e.message, /invalid argument/);
  }
  // The encoder still works and kept its settings.
  assert.equal(enc.get("complexity"), 9);
});

Deno.test("bad settings are rejected before any reaches libopus", () => {
  using enc = OpusEncoder.create({ channels: 1 });
  const before = enc.settings();
  assert.throws(() => enc.configure({ bitrate: 64000, complexity: 11 }), RangeError);
  assert.throws(() => enc.configure({ complexity: 2.5 }), TypeError);
  assert.throws(() => enc.configure({ vbr: 1 as unknown as boolean }), TypeError);
  assert.throws(
    () => enc.configure({ signal: "speech" as "voice" }),
    /Invalid signal "speech": expected one of auto, voice, music/,
  );
  assert.throws(() => enc.configure({ maxBandwidth: "huge" as "fullband" }), RangeError);
  assert.throws(() => enc.configure({ loud: true } as never), /Unknown encoder setting "loud"/);
  assert.throws(() => enc.configure({ bitrate: 100 }), RangeError);
  assert.throws(() => enc.configure({ packetLossPerc: 101 }), RangeError);
  assert.throws(() => enc.configure(null as never), TypeError);
  assert.deepEqual(enc.settings(), before, "a rejected configure changes nothing");
  assert.throws(() => enc.ctlSet(9999, 1), RangeError);
  assert.throws(() => enc.ctlGet(OpusRequest.SET_BITRATE), RangeError);
});

Deno.test("bad arguments to constructors and codec calls are rejected before C", () => {
  assert.throws(() => OpusEncoder.create({ channels: 3 }), RangeError);
  assert.throws(() => OpusEncoder.create({ channels: 1, sampleRate: 44100 }), /44100/);
  assert.throws(
    () => OpusEncoder.create({ channels: 1, application: "game" as "voip" }),
    /Invalid application "game"/,
  );
  assert.throws(() => OpusEncoder.create(undefined as never), TypeError);
  assert.throws(() => OpusDecoder.create({ channels: 0 }), RangeError);
  assert.throws(() => OpusDecoder.create({ channels: 1, sampleRate: 22050 }), RangeError);

  using enc = OpusEncoder.create({ channels: 2 });
  const out = new Uint8Array(4000);
  assert.throws(() => enc.encode(new Int16Array(1919), 960, out), /expected at least 1920/);
  assert.throws(() => enc.encode(new Int16Array(960), 960, out), RangeError);
  assert.throws(() => enc.encode(new Int16Array(2000), 1000, out), /Invalid frame size 1000/);
  assert.throws(() => enc.encode(new Float32Array(1920) as never, 960, out), TypeError);
  assert.throws(() => enc.encode(new Int16Array(1920), 960, new Uint8Array(1)), RangeError);
  assert.throws(() => enc.encode(new Int16Array(1920), 960, [] as never), TypeError);
  assert.throws(() => enc.frameSize(15), /Invalid frame duration 15 ms/);
  assert.equal(enc.frameSize(2.5), 120);

  using dec = OpusDecoder.create({ channels: 2 });
  const pcm = new Int16Array(1920);
  assert.throws(() => dec.decode(new Uint8Array(0), pcm, 960), /conceal/);
  assert.throws(() => dec.decode(new Uint8Array([0xfc]), new Int16Array(10), 960), RangeError);
  assert.throws(() => dec.decode(new Uint8Array([0xfc]), pcm, 0), RangeError);
  assert.throws(() => dec.decode(new Uint8Array([0xfc]), pcm, 6000), RangeError);
  assert.throws(() => dec.conceal(pcm, 100), /multiple of 120/);
  assert.throws(() => dec.decodeFec(new Uint8Array(0), pcm, 960), RangeError);
  assert.throws(() => (dec.gain = 40000), RangeError);
  assert.throws(() => inspectPacket("abc" as never), TypeError);
});

Deno.test("closing is idempotent and a closed codec refuses work", () => {
  const enc = OpusEncoder.create({ channels: 1 });
  enc.close();
  enc.close();
  assert.ok(enc.closed);
  assert.throws(() => enc.encode(new Int16Array(960), 960, new Uint8Array(100)), /closed/);
  const dec = OpusDecoder.create({ channels: 1 });
  dec[Symbol.dispose]();
  dec.close();
  assert.throws(() => dec.conceal(new Int16Array(960), 960), /closed/);
});

Deno.test("a lost packet is concealed with a frame of the right length", () => {
  using enc = OpusEncoder.create({ channels: 1 }, { bitrate: 32000 });
  using dec = OpusDecoder.create({ channels: 1 });
  const pcm = tone({ freq: 440, frames: 960 * 20, amplitude: 0.4 });
  const packets = encodeAll(enc, pcm, 960);
  const out = new Int16Array(960);
  for (let i = 0; i < 10; i++) dec.decode(packets[i]!, out, 960);
  const n = dec.conceal(out, 960);
  assert.equal(n, 960);
  assert.equal(dec.lastPacketDuration, 960);
  // Concealment continues the tone rather than emitting silence.
  const lvl = rmsDb(channel(out, 1));
  assert.ok(lvl > -20, `concealed frame level ${lvl.toFixed(1)} dB`);
  // A 10 ms concealment is allowed too.
  assert.equal(dec.conceal(out, 480), 480);
});

for (const name of ["medium", "high", "ultra"] as const) {
  Deno.test(`FEC in the next packet recovers a lost one at microphone preset ${name}`, () => {
    const p = PRESETS.microphone[name];
    assert.ok(p.inbandFec);
    const frame = frameSamples(p);
    using enc = OpusEncoder.create({ channels: 1, application: p.application }, encoderSettings(p));
    const packets = encodeAll(enc, voiceLike(frame * 100), frame);
    // Reference: each lost frame as a clean decode produces it; compare FEC and PLC against it.
    let fecUsed = 0, trials = 0, fecErr = 0, plcErr = 0;
    for (let lost = 12; lost < 98; lost += 5) {
      const decodeWith = (mode: "fec" | "plc" | "clean") => {
        using dec = OpusDecoder.create({ channels: 1 });
        const out = new Int16Array(frame);
        for (let i = 0; i < lost; i++) dec.decode(packets[i]!, out, frame);
        const n = mode === "fec"
          ? dec.decodeFec(packets[lost + 1]!, out, frame)
          : mode === "plc"
          ? dec.conceal(out, frame)
          : dec.decode(packets[lost]!, out, frame);
        assert.equal(n, frame);
        return channel(out, 1);
      };
      const clean = decodeWith("clean");
      const err = (x: Float64Array) => x.reduce((e, v, i) => e + (v - clean[i]!) ** 2, 0);
      const [fec, plc] = [err(decodeWith("fec")), err(decodeWith("plc"))];
      trials++;
      if (fec !== plc) fecUsed++;
      fecErr += fec;
      plcErr += plc;
    }
    // SILK codes LBRR data only for frames its VAD calls active, so not every packet has it; where
    // it does, recovery beats concealment, enough to show over all the losses.
    assert.ok(fecUsed * 3 >= trials, `FEC data was used for ${fecUsed} of ${trials} losses`);
    assert.ok(fecErr < plcErr, `FEC error ${fecErr.toFixed(3)} vs PLC error ${plcErr.toFixed(3)}`);
  });
}

Deno.test("decoding a corrupt packet is an OpusError and the decoder stays usable", () => {
  using dec = OpusDecoder.create({ channels: 1 });
  const out = new Int16Array(960);
  // TOC code 3 (arbitrary frame count) with a zero frame count: invalid.
  assert.throws(() => dec.decode(new Uint8Array([0x03, 0x00]), out, 960), OpusError);
  using enc = OpusEncoder.create({ channels: 1 });
  const pkt = new Uint8Array(1500);
  const n = enc.encode(tone({ freq: 440, frames: 960 }), 960, pkt);
  assert.equal(dec.decode(pkt.subarray(0, n), out, 960), 960);
  assert.equal(dec.finalRange, enc.finalRange, "range coder states agree on an intact packet");
});

Deno.test("packet inspection reads the TOC and rejects malformed packets", () => {
  using enc = OpusEncoder.create({ channels: 2 }, { maxBandwidth: "wideband" });
  const pkt = new Uint8Array(1500);
  const n = enc.encode(tone({ freq: 440, frames: 480, channels: 2 }), 480, pkt);
  const info = inspectPacket(pkt.subarray(0, n));
  assert.equal(info.frames, 1);
  assert.equal(info.samples, 480);
  assert.equal(info.samplesPerFrame, 480);
  assert.ok(info.channels === 2 || info.channels === 1);
  assert.ok(["narrowband", "mediumband", "wideband"].includes(info.bandwidth));
  assert.throws(() => inspectPacket(new Uint8Array(0)), InvalidPacketError);
  assert.throws(() => inspectPacket(new Uint8Array(OPUS_MAX_PACKET + 1)), InvalidPacketError);
  assert.throws(() => inspectPacket(new Uint8Array([0x03])), InvalidPacketError);
  // Code 3 with 63 frames of 20 ms = 1260 ms: parseable but longer than 120 ms.
  assert.throws(
    () => inspectPacket(new Uint8Array([0xfb, 0x3f, ...new Uint8Array(70)])),
    InvalidPacketError,
  );
});

Deno.test("encode and decode work in place on SharedArrayBuffer views", () => {
  const sab = new SharedArrayBuffer(960 * 2 + 1500);
  const pcm = new Int16Array(sab, 0, 960);
  const slot = new Uint8Array(sab, 1920, 1500);
  pcm.set(tone({ freq: 1000, frames: 960 }));
  using enc = OpusEncoder.create({ channels: 1 });
  using dec = OpusDecoder.create({ channels: 1 });
  const n = enc.encode(pcm, 960, slot);
  assert.ok(n > 2);
  pcm.fill(0);
  assert.equal(dec.decode(slot.subarray(0, n), pcm, 960), 960);
  assert.ok(pcm.some((v) => v !== 0), "decoder wrote into the shared slot");
});
