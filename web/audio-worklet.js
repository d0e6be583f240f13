/**
 * AudioWorklet processors of the operator's page (loaded with `audioWorklet.addModule`).
 *
 * - `kvm-playout`: plays decoded audio posted from the main thread through a small adaptive
 *   buffer. It starts at a target depth (40 ms by default), waits until that much is buffered,
 *   then plays. An underrun (less than one render quantum left) raises the target by one step
 *   and buffers again; a buffer that stayed deeper than the target plus a margin for a whole
 *   window is trimmed back to the target with a short crossfade (a sender whose clock runs fast,
 *   or a burst after a network stall), and one that fell below the target minus the margin (or
 *   half the target, whichever is more) in a window is stretched towards it, at most 10 ms a window, by replaying a few milliseconds with
 *   a crossfade (a sender whose clock runs slow: without it the buffer ran dry every minute or
 *   so at −300 ppm); a long stretch without underruns lowers the target again. A pause of the
 *   stream on purpose is no underrun: after `{type: "pause"}` (the output was muted) the buffer
 *   plays out and waits without raising its target, and `{type: "gap"}` (a packet after a gap
 *   the sender meant: DTX, a restart) takes back an underrun counted since the last audio.
 * - `kvm-capture`: cuts the microphone input (mixed down to mono by the node) into frames of
 *   `frameSamples` samples and posts each with its peak and RMS level.
 *
 * Both post `{type: "stats", …}` / `{type: "frame", …}` messages on their ports.
 *
 * @module
 */

/* global sampleRate, currentTime, registerProcessor, AudioWorkletProcessor */

/** Milliseconds to frames at the context's rate. */
function msToFrames(ms) {
  return Math.round((ms * sampleRate) / 1000);
}

class PlayoutProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options?.processorOptions ?? {};
    this.minFrames = msToFrames(o.minMs ?? 20);
    this.maxFrames = msToFrames(o.maxMs ?? 300);
    this.stepFrames = msToFrames(o.stepMs ?? 20);
    this.marginFrames = msToFrames(o.trimMarginMs ?? 15);
    this.decayFrames = msToFrames(o.decayMs ?? 5);
    this.target = Math.min(this.maxFrames, Math.max(this.minFrames, msToFrames(o.targetMs ?? 40)));
    this.capacity = Math.max(sampleRate, 2 * this.maxFrames);
    this.ring = [new Float32Array(this.capacity), new Float32Array(this.capacity)];
    // Absolute frame counts; depth = written - read.
    this.written = 0;
    this.read = 0;
    this.playing = false;
    this.underruns = 0;
    this.trims = 0;
    this.trimmedFrames = 0;
    this.stretches = 0;
    this.stretchedFrames = 0;
    this.maxStretchFrames = msToFrames(10);
    this.pendingStretch = 0;
    this.pausing = false; // the stream pauses on purpose: running dry is no underrun
    this.gaps = 0; // dry-outs that were the sender's pauses
    this.undo = null; // the target before the last underrun, while no audio came since
    this.overflowFrames = 0;
    this.windowFrames = sampleRate; // judge depth over 1 s windows
    this.windowElapsed = 0;
    this.windowMin = Infinity;
    this.windowUnderrun = false;
    this.calmFrames = 0; // frames played since the last underrun (or target decrease)
    this.calmNeeded = 10 * sampleRate;
    this.pendingTrim = 0;
    this.sinceReport = 0;
    this.reportEvery = msToFrames(100);
    this.peak = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === "audio") this.push(msg.planes);
    else if (msg.type === "reset") {
      this.read = this.written;
      this.playing = false;
      this.pendingTrim = 0;
      this.pendingStretch = 0;
    } else if (msg.type === "pause") {
      this.pausing = true;
    } else if (msg.type === "gap" && this.undo !== null) {
      // The dry-out before this packet was the sender's pause, not the network's fault.
      this.target = this.undo;
      this.underruns--;
      this.gaps++;
      this.undo = null;
    }
  }

  push(planes) {
    const n = planes[0]?.length ?? 0;
    if (n === 0) return;
    this.undo = null;
    this.pausing = false;
    const depth = this.written - this.read;
    if (depth + n > this.capacity) {
      // Never happens while playing normally (the trim keeps the depth near the target);
      // a stalled output would get here. Keep the newest.
      const excess = depth + n - this.capacity;
      this.read += excess;
      this.overflowFrames += excess;
    }
    for (let c = 0; c < 2; c++) {
      const src = planes[Math.min(c, planes.length - 1)];
      const dst = this.ring[c];
      const at = this.written % this.capacity;
      const first = Math.min(n, this.capacity - at);
      dst.set(src.subarray(0, first), at);
      if (first < n) dst.set(src.subarray(first), 0);
    }
    this.written += n;
  }

  /** Copies `n` frames starting at absolute frame `from` into `out` at `offset`, channel `c`. */
  copy(c, from, out, offset, n) {
    const ring = this.ring[c];
    for (let i = 0; i < n; i++) out[offset + i] = ring[(from + i) % this.capacity];
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const n = out[0].length;
    let depth = this.written - this.read;

    if (!this.playing && depth >= this.target) {
      this.playing = true;
      this.windowMin = Infinity;
      this.windowElapsed = 0;
      this.windowUnderrun = false;
    }
    if (!this.playing) {
      for (const ch of out) ch.fill(0);
    } else if (depth < n) {
      // Underrun: play what is left, then silence; buffer more from now on.
      for (let c = 0; c < out.length; c++) {
        this.copy(Math.min(c, 1), this.read, out[c], 0, depth);
        out[c].fill(0, depth);
      }
      this.read += depth;
      this.playing = false;
      this.pendingStretch = 0;
      if (this.pausing) {
        // Muted: the stream stopped on purpose. Wait for it without raising the target.
        this.pausing = false;
        this.gaps++;
      } else {
        this.underruns++;
        this.windowUnderrun = true;
        this.undo = this.target;
        this.target = Math.min(this.maxFrames, this.target + this.stepFrames);
        this.calmFrames = 0;
      }
    } else {
      this.windowMin = Math.min(this.windowMin, depth);
      const trim = Math.min(this.pendingTrim, depth - n);
      // Frames already played that can be played again (still in the ring).
      const stretch = Math.min(this.pendingStretch, this.capacity - depth - n);
      if (stretch > 0 && trim <= 0) {
        // Replay `stretch` frames: crossfade from the current position to `stretch` frames
        // back over the quantum, and go on from there.
        for (let c = 0; c < out.length; c++) {
          const o = out[c];
          const ring = this.ring[Math.min(c, 1)];
          const cap = this.capacity;
          for (let i = 0; i < n; i++) {
            const a = ring[(this.read + i) % cap];
            const b = ring[(this.read - stretch + i + cap) % cap];
            const t = (i + 1) / n;
            o[i] = a * (1 - t) + b * t;
          }
        }
        this.read += n - stretch;
        this.stretches++;
        this.stretchedFrames += stretch;
        this.pendingStretch = 0;
      } else if (trim > 0) {
        // Skip `trim` frames, crossfading from the old position to the new one over the quantum.
        for (let c = 0; c < out.length; c++) {
          const o = out[c];
          const ring = this.ring[Math.min(c, 1)];
          for (let i = 0; i < n; i++) {
            const a = ring[(this.read + i) % this.capacity];
            const b = ring[(this.read + trim + i) % this.capacity];
            const t = (i + 1) / n;
            o[i] = a * (1 - t) + b * t;
          }
        }
        this.read += trim + n;
        this.trims++;
        this.trimmedFrames += trim;
        this.pendingTrim = 0;
      } else {
        for (let c = 0; c < out.length; c++) this.copy(Math.min(c, 1), this.read, out[c], 0, n);
        this.read += n;
      }
      this.calmFrames += n;
      this.windowElapsed += n;
      if (this.windowElapsed >= this.windowFrames) {
        if (!this.windowUnderrun && this.windowMin > this.target + this.marginFrames) {
          // The buffer never came near the target in a whole window: those frames are only delay.
          this.pendingTrim = this.windowMin - this.target;
        } else if (
          !this.windowUnderrun &&
          this.windowMin < Math.max(this.target - this.marginFrames, this.target / 2)
        ) {
          // It fell well below the target (the sender's clock is slower than this one, or the
          // network slowed): make some of it up before it runs dry.
          this.pendingStretch = Math.min(this.maxStretchFrames, this.target - this.windowMin);
        }
        this.windowElapsed = 0;
        this.windowMin = Infinity;
        this.windowUnderrun = false;
      }
      if (this.calmFrames >= this.calmNeeded && this.target > this.minFrames) {
        this.target = Math.max(this.minFrames, this.target - this.decayFrames);
        this.calmFrames = 0;
      }
    }

    for (let i = 0; i < n; i++) this.peak = Math.max(this.peak, Math.abs(out[0][i]));
    this.sinceReport += n;
    if (this.sinceReport >= this.reportEvery) {
      depth = this.written - this.read;
      this.port.postMessage({
        type: "stats",
        depthMs: (depth * 1000) / sampleRate,
        targetMs: (this.target * 1000) / sampleRate,
        playing: this.playing,
        underruns: this.underruns,
        trims: this.trims,
        trimmedMs: (this.trimmedFrames * 1000) / sampleRate,
        stretches: this.stretches,
        stretchedMs: (this.stretchedFrames * 1000) / sampleRate,
        gaps: this.gaps,
        overflowMs: (this.overflowFrames * 1000) / sampleRate,
        peak: this.peak,
      });
      this.sinceReport = 0;
      this.peak = 0;
    }
    return true;
  }
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frameSamples = options?.processorOptions?.frameSamples ?? msToFrames(20);
    this.frame = new Float32Array(this.frameSamples);
    this.filled = 0;
    this.nextFrameSamples = 0;
    this.port.onmessage = (e) => {
      if (e.data.type !== "frameSamples") return;
      // A new size applies from the next frame on: now, when no frame is under way.
      if (this.filled === 0) {
        this.frameSamples = e.data.frameSamples;
        this.frame = new Float32Array(this.frameSamples);
      } else this.nextFrameSamples = e.data.frameSamples;
    };
  }

  process(inputs) {
    const input = inputs[0];
    const x = input?.[0];
    if (!x) return true; // no active source this quantum
    let i = 0;
    while (i < x.length) {
      const take = Math.min(x.length - i, this.frameSamples - this.filled);
      this.frame.set(x.subarray(i, i + take), this.filled);
      this.filled += take;
      i += take;
      if (this.filled === this.frameSamples) {
        let peak = 0, sum = 0;
        for (const v of this.frame) {
          peak = Math.max(peak, Math.abs(v));
          sum += v * v;
        }
        const samples = this.frame;
        this.port.postMessage(
          { type: "frame", samples, peak, rms: Math.sqrt(sum / samples.length), time: currentTime },
          [samples.buffer],
        );
        if (this.nextFrameSamples) {
          this.frameSamples = this.nextFrameSamples;
          this.nextFrameSamples = 0;
        }
        this.frame = new Float32Array(this.frameSamples);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("kvm-playout", PlayoutProcessor);
registerProcessor("kvm-capture", CaptureProcessor);
