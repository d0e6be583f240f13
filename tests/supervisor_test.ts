import assert from "node:assert/strict";
import {
  CONTROL_WORD,
  FIRST_PIPELINE_WORD,
  STATE_CHANGE_EVENT,
  stateOf,
  stateWord,
  STOP_REQUESTED,
  Supervisor,
  type SupervisorOptions,
  type SupervisorState,
  SupervisorStateEvent,
  WORKER_STATE,
} from "../lib/supervisor.ts";
import { WorkerControl } from "../lib/pipeline/worker_common.ts";
import { FAULT, type StopStyle, type SupervisedInit, WORD } from "./fixtures/supervisor_worker.ts";
import { sleep } from "./wait.ts";

const WORKER_URL = new URL("./fixtures/supervisor_worker.ts", import.meta.url).href;

interface Received {
  readonly msg: { readonly type: string; readonly [k: string]: unknown };
  readonly incarnation: number;
  /** The supervisor's incarnation when the message was delivered. */
  readonly current: number | null;
}

/** Records a supervisor's state changes and its worker's messages; waits for conditions. */
class Recorder {
  readonly events: SupervisorStateEvent[] = [];
  readonly messages: Received[] = [];
  sup: Supervisor | null = null;
  readonly #waiters = new Set<() => void>();

  readonly onMessage = (msg: unknown, incarnation: number): void => {
    this.messages.push({
      msg: msg as Received["msg"],
      incarnation,
      current: this.sup?.status.incarnation ?? null,
    });
    this.#poke();
  };

  attach(sup: Supervisor): Supervisor {
    this.sup = sup;
    sup.addEventListener(STATE_CHANGE_EVENT, (e) => {
      assert.ok(e instanceof SupervisorStateEvent);
      this.events.push(e);
      this.#poke();
    });
    return sup;
  }

  /** Messages of one type. */
  of(type: string): Received[] {
    return this.messages.filter((m) => m.msg.type === type);
  }

  /** State changes into `to`. */
  into(to: SupervisorState): SupervisorStateEvent[] {
    return this.events.filter((e) => e.to === to);
  }

  /** Resolves once `check()` holds; fails after `timeoutMs` (a generous bound, not a timing test). */
  until(what: string, check: () => boolean, timeoutMs = 15_000): Promise<void> {
    if (check()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters.delete(poll);
        reject(new Error(`Timed out waiting for ${what}; states: ${this.#trail()}`));
      }, timeoutMs);
      const poll = () => {
        if (!check()) return;
        clearTimeout(timer);
        this.#waiters.delete(poll);
        resolve();
      };
      this.#waiters.add(poll);
    });
  }

  #trail(): string {
    return this.events.map((e) => `${e.to} (${e.reason})`).join(" → ");
  }

  #poke(): void {
    for (const w of [...this.#waiters]) w();
  }
}

interface FixtureOptions {
  readonly silent?: boolean;
  readonly stopStyle?: StopStyle;
}

/** A supervisor over the fixture worker with small test timings, and its recorder. */
function supervise(
  opts: Partial<SupervisorOptions> = {},
  fixture: FixtureOptions = {},
): { sup: Supervisor; rec: Recorder } {
  const rec = new Recorder();
  const sup = new Supervisor({
    name: "test",
    spawn: (control, incarnation) => {
      const w = new Worker(WORKER_URL, { type: "module" });
      const init: SupervisedInit = { control, incarnation, ...fixture };
      w.postMessage(init);
      return w;
    },
    onMessage: rec.onMessage,
    stallMs: 5000,
    graceMs: 5000,
    backoff: { initialMs: 10, maxMs: 1000, factor: 2 },
    ...opts,
  });
  rec.attach(sup);
  return { sup, rec };
}

Deno.test("Supervisor rejects invalid options", () => {
  const spawn = () => new Worker(WORKER_URL, { type: "module" });
  assert.throws(() => new Supervisor({ name: "", spawn }), {
    name: "TypeError",
    message: 'Invalid name "": expected a non-empty string',
  });
  assert.throws(
    () => new Supervisor({ name: "x", spawn: "w" as unknown as SupervisorOptions["spawn"] }),
    { name: "TypeError", message: 'Invalid spawn "w": expected a function' },
  );
  assert.throws(() => new Supervisor({ name: "x", spawn, stallMs: 0 }), {
    name: "RangeError",
    message: 'Invalid stallMs "0": expected a number from 1 to 86400000',
  });
  assert.throws(() => new Supervisor({ name: "x", spawn, graceMs: NaN }), RangeError);
  assert.throws(
    () => new Supervisor({ name: "x", spawn, stallMs: "5" as unknown as number }),
    TypeError,
  );
  assert.throws(() => new Supervisor({ name: "x", spawn, backoff: { factor: 0.5 } }), {
    name: "RangeError",
    message: 'Invalid backoff.factor "0.5": expected a number from 1 to 1000',
  });
  assert.throws(
    () => new Supervisor({ name: "x", spawn, backoff: { initialMs: 500, maxMs: 100 } }),
    {
      name: "RangeError",
      message: 'Invalid backoff.maxMs "100": expected at least backoff.initialMs (500)',
    },
  );
  assert.throws(() => new Supervisor({ name: "x", spawn, breaker: { maxCrashes: 2.5 } }), {
    name: "RangeError",
    message: 'Invalid breaker.maxCrashes "2.5": expected an integer from 1 to 1000000',
  });
  assert.throws(() => new Supervisor({ name: "x", spawn, controlWords: 4 }), {
    name: "RangeError",
    message: 'Invalid controlWords "4": expected an integer from 8 to 4096',
  });
  const sup = new Supervisor({ name: "x", spawn, controlWords: 64 });
  assert.equal(sup.control.length, 64);
  assert.equal(sup.control.buffer, sup.buffer);
  assert.ok(sup.buffer instanceof SharedArrayBuffer);
  assert.equal(sup.state, "stopped");
  assert.equal(sup.status.incarnation, null);
  assert.equal(sup.status.workerState, null);
});

Deno.test("Supervisor reports a beating worker running and stops it gracefully", async () => {
  const { sup, rec } = supervise();
  sup.control[WORD.memo] = 41;
  sup.start();
  assert.equal(sup.state, "starting");
  assert.equal(stateOf(Atomics.load(sup.control, CONTROL_WORD.state)), WORKER_STATE.starting);
  await rec.until("running", () => sup.state === "running");
  await rec.until("ticks", () => rec.of("tick").length >= 3);

  const st = sup.status;
  assert.equal(st.name, "test");
  assert.equal(st.incarnation, 0);
  assert.equal(st.restarts, 0);
  assert.equal(st.crashes, 0);
  assert.equal(st.breakerOpen, false);
  assert.equal(st.workerState, "running");
  assert.equal(st.lastError, null);
  assert.ok(st.heartbeatAgeMs !== null);
  assert.ok(st.uptimeMs >= 0);
  assert.deepEqual(rec.of("hello")[0]?.msg, { type: "hello", incarnation: 0, memo: 41, boots: 1 });
  assert.deepEqual(rec.events.map((e) => [e.from, e.to, e.reason]), [
    ["stopped", "starting", "start requested"],
    ["starting", "running", "heartbeat"],
  ]);
  sup.start(); // already running: no effect
  assert.equal(rec.events.length, 2);

  const stopping = sup.stop();
  assert.equal(sup.state, "stopping");
  assert.equal(Atomics.load(sup.control, CONTROL_WORD.stop), STOP_REQUESTED);
  assert.equal(sup.stop(), stopping, "concurrent stop() calls share one promise");
  sup.start(); // queued until the stop completes...
  assert.equal(sup.stop(), stopping); // ...and cancelled by a later stop
  await stopping;
  assert.equal(sup.state, "stopped");
  const last = rec.events.at(-1)!;
  assert.equal(last.reason, "worker stopped", "the worker honoured the stop word");
  assert.equal(rec.of("final").length, 1, "messages posted before 'stopped' are delivered");
  assert.equal(sup.status.lastExit, "stopped");
  assert.equal(sup.status.workerState, "stopped");
  assert.equal(sup.status.uptimeMs, 0);
  assert.equal(sup.status.heartbeatAgeMs, null);
  assert.equal(sup.status.lastError, null);
  assert.ok(rec.messages.every((m) => m.incarnation === m.current));
  await sup.stop(); // idempotent
});

Deno.test("Supervisor accepts a stop reported through the state word alone", async () => {
  const { sup, rec } = supervise({ graceMs: 20_000 }, { stopStyle: "state-word" });
  sup.start();
  await rec.until("running", () => sup.state === "running");
  await sup.stop();
  assert.equal(rec.events.at(-1)?.reason, "worker stopped");
  assert.equal(sup.status.lastExit, "stopped");
});

Deno.test("Supervisor waits for the last message of a worker whose state word already says stopped", async () => {
  // The state word reads `stopped` for 300 ms (several 100 ms watch ticks) before the worker's
  // final messages; they are still delivered, and the stop is the worker's, not the grace timer's.
  const { sup, rec } = supervise({ graceMs: 20_000 }, { stopStyle: "late-message" });
  sup.start();
  await rec.until("running", () => sup.state === "running");
  await sup.stop();
  assert.equal(rec.of("final").length, 1, "the final message was not lost");
  assert.equal(rec.events.at(-1)?.reason, "worker stopped");
});

Deno.test("Supervisor restarts a crashing worker with growing backoff and keeps the control block", async () => {
  const { sup, rec } = supervise({ breaker: { maxCrashes: 10 } });
  sup.control[WORD.memo] = 1;
  sup.control[WORD.fault] = FAULT.throw;
  sup.control[WORD.faultAfter] = 3;
  sup.control[sup.control.length - 1] = -7; // last pipeline word
  sup.addEventListener(STATE_CHANGE_EVENT, (e) => {
    const n = rec.into("backoff").length;
    if ((e as SupervisorStateEvent).to !== "backoff") return;
    // Written after incarnation 0 crashed, before incarnation 1 starts.
    if (n === 1) sup.control[WORD.memo] = 777;
    // After the third crash, disarm the fault before the next incarnation starts.
    if (n === 3) sup.control[WORD.fault] = FAULT.none;
  });
  sup.start();
  await rec.until(
    "three crashes then running",
    () => rec.into("backoff").length === 3 && sup.state === "running",
  );

  const backoffs = rec.into("backoff");
  assert.deepEqual(backoffs.map((e) => e.delayMs), [10, 20, 40]);
  for (const e of backoffs) {
    assert.match(e.reason, /Injected crash after 4 beats/);
    assert.equal(e.status.lastExit, "crash");
    assert.ok(e.status.nextRestartAt !== null);
  }
  const st = sup.status;
  assert.equal(st.incarnation, 3);
  assert.equal(st.restarts, 3);
  assert.equal(st.crashes, 3);
  assert.equal(st.breakerOpen, false);
  assert.match(st.lastError ?? "", /Injected crash/);
  assert.equal(st.nextRestartAt, null);

  // Words written by each incarnation, read by the test: what each one found at its start.
  assert.equal(sup.control[WORD.boots], 4);
  assert.deepEqual([...sup.control.subarray(WORD.seen, WORD.seen + 4)], [1, 777, 777, 777]);
  assert.deepEqual(rec.of("hello").at(-1)?.msg, {
    type: "hello",
    incarnation: 3,
    memo: 777,
    boots: 4,
  });
  assert.equal(
    sup.control[sup.control.length - 1],
    -7,
    "the supervisor never touches pipeline words",
  );
  assert.equal(Atomics.load(sup.control, CONTROL_WORD.incarnation), 3);
  assert.ok(rec.messages.every((m) => m.incarnation === m.current));
  await sup.stop();
});

Deno.test("Supervisor detects a stalled worker and restarts it", async (t) => {
  for (
    const [name, fault] of [["Atomics.wait", FAULT.stallWait], [
      "busy loop",
      FAULT.stallSpin,
    ]] as const
  ) {
    await t.step(`stalled in ${name}`, async () => {
      const stallMs = 300;
      const { sup, rec } = supervise({ stallMs });
      sup.addEventListener(STATE_CHANGE_EVENT, (e) => {
        if ((e as SupervisorStateEvent).to === "backoff") sup.control[WORD.fault] = FAULT.none;
      });
      sup.start();
      await rec.until("running", () => sup.state === "running");
      Atomics.store(sup.control, WORD.fault, fault); // armed only once the worker is seen beating
      await rec.until(
        "a stall and a healthy restart",
        () => sup.status.incarnation === 1 && sup.state === "running",
      );

      const [stall] = rec.into("backoff");
      assert.ok(stall);
      assert.equal(stall.from, "running");
      assert.equal(stall.status.lastExit, "stall");
      const m = /^No heartbeat for (\d+) ms \(limit 300 ms\)$/.exec(stall.reason);
      assert.ok(m, `unexpected reason "${stall.reason}"`);
      assert.ok(Number(m[1]) > stallMs);
      assert.equal(rec.of("faulting").length, 1);
      assert.equal(sup.status.crashes, 1);
      assert.equal(sup.status.restarts, 1);
      await sup.stop();
      assert.equal(rec.events.at(-1)?.reason, "worker stopped");
    });
  }
});

Deno.test("Supervisor counts a worker that never beats as stalled after startTimeoutMs", async () => {
  const { sup, rec } = supervise(
    { startTimeoutMs: 200, breaker: { maxCrashes: 1 } },
    { silent: true },
  );
  sup.start();
  await rec.until("broken", () => sup.state === "broken");
  assert.deepEqual(rec.events.map((e) => e.to), ["starting", "broken"]);
  assert.match(
    rec.events[1]!.reason,
    /^No heartbeat since the start for \d+ ms \(limit 200 ms\); 1 crashes within 300000 ms, not restarting$/,
  );
  assert.equal(sup.control[WORD.boots], 1, "the worker did start");
  assert.equal(sup.status.lastExit, "stall");
  await sup.stop();
  assert.equal(sup.state, "stopped");
});

Deno.test("Supervisor opens the breaker after maxCrashes and restarts only on resetBreaker", async () => {
  const { sup, rec } = supervise({ breaker: { maxCrashes: 5, windowMs: 60_000 } });
  sup.control[WORD.fault] = FAULT.throw;
  sup.control[WORD.faultAfter] = 1;
  sup.start();
  await rec.until("broken", () => sup.state === "broken");
  assert.deepEqual(rec.into("backoff").map((e) => e.delayMs), [10, 20, 40, 80]);
  let st = sup.status;
  assert.equal(st.breakerOpen, true);
  assert.equal(st.crashes, 5);
  assert.equal(st.incarnation, 4);
  assert.equal(st.restarts, 4);
  assert.equal(st.nextRestartAt, null);
  assert.equal(st.workerState, "stopped");
  assert.match(rec.events.at(-1)!.reason, /5 crashes within 60000 ms, not restarting$/);

  // Longer than any backoff delay: still broken, nothing spawned.
  await sleep(300);
  assert.equal(sup.state, "broken");
  assert.equal(sup.status.incarnation, 4);
  assert.equal(sup.control[WORD.boots], 5);
  sup.start(); // start() does not bypass an open breaker
  assert.equal(sup.state, "broken");

  sup.control[WORD.fault] = FAULT.none;
  sup.resetBreaker();
  assert.equal(sup.state, "starting");
  assert.equal(rec.events.at(-1)?.reason, "breaker reset");
  await rec.until("running", () => sup.state === "running");
  st = sup.status;
  assert.equal(st.breakerOpen, false);
  assert.equal(st.crashes, 0);
  assert.equal(st.incarnation, 5);
  await sup.stop();
});

Deno.test("Supervisor forgets crashes outside the window and resets backoff after a long run", async () => {
  // A fake clock that only moves when the test says so.
  let clock = 0;
  const { sup, rec } = supervise({
    now: () => clock,
    stallMs: 60_000,
    backoff: { initialMs: 10, maxMs: 1000, factor: 2, resetAfterMs: 1000 },
    breaker: { maxCrashes: 3, windowMs: 1500 },
  });
  // Advanced as each incarnation starts (after its start time was taken): each run lasts 1000 ms.
  sup.addEventListener(STATE_CHANGE_EVENT, (e) => {
    if ((e as SupervisorStateEvent).to === "starting") clock += 1000;
  });
  sup.control[WORD.fault] = FAULT.throw;
  sup.control[WORD.faultAfter] = 1;
  sup.start();
  await rec.until("six crashes", () => rec.into("backoff").length >= 6);
  await sup.stop();
  assert.equal(rec.into("broken").length, 0, "never more than 2 crashes within 1500 ms");
  assert.deepEqual(rec.into("backoff").slice(0, 6).map((e) => e.delayMs), [10, 10, 10, 10, 10, 10]);
  assert.deepEqual(rec.into("backoff").slice(1, 6).map((e) => e.status.crashes), [2, 2, 2, 2, 2]);
});

Deno.test("Supervisor grows backoff up to maxMs for short runs", async () => {
  const { sup, rec } = supervise({
    backoff: { initialMs: 5, maxMs: 25, factor: 3 },
    breaker: { maxCrashes: 6 },
  });
  sup.control[WORD.fault] = FAULT.throw;
  sup.start();
  await rec.until("broken", () => sup.state === "broken");
  assert.deepEqual(rec.into("backoff").map((e) => e.delayMs), [5, 15, 25, 25, 25]);
  await sup.stop();
});

Deno.test("Supervisor terminates a stuck worker after graceMs on stop", async (t) => {
  for (
    const [name, fault] of [["Atomics.wait", FAULT.stallWait], [
      "busy loop",
      FAULT.stallSpin,
    ]] as const
  ) {
    await t.step(`stuck in ${name}`, async () => {
      const { sup, rec } = supervise({ graceMs: 100, stallMs: 60_000 });
      sup.start();
      await rec.until("running", () => sup.state === "running");
      Atomics.store(sup.control, WORD.fault, fault);
      await rec.until("stuck", () => rec.of("faulting").length === 1);
      await sup.stop();
      assert.equal(sup.state, "stopped");
      assert.equal(rec.events.at(-1)?.reason, "terminated after the 100 ms grace period");
      assert.equal(sup.status.lastExit, "stopped");
      assert.equal(sup.status.crashes, 0);
      assert.equal(rec.of("stopped").length, 0);
    });
  }
});

Deno.test("Supervisor treats an ended worker as finished, not crashed", async () => {
  const { sup, rec } = supervise();
  sup.control[WORD.fault] = FAULT.end;
  sup.control[WORD.faultAfter] = 3;
  sup.start();
  await rec.until("stopped", () => rec.into("stopped").length === 1);
  // "running" appears only if a watch tick saw a beat before the worker ended.
  assert.deepEqual(rec.events.map((e) => e.to).filter((s) => s !== "running"), [
    "starting",
    "stopped",
  ]);
  assert.equal(rec.events.at(-1)?.reason, "worker ended");
  assert.equal(rec.of("ended").length, 1);
  const st = sup.status;
  assert.equal(st.lastExit, "ended");
  assert.equal(st.crashes, 0);
  assert.equal(st.restarts, 0);
  assert.equal(st.lastError, null);
  assert.ok(st.lastExitAt !== null);
  // It may be started again.
  sup.control[WORD.fault] = FAULT.none;
  sup.start();
  await rec.until("running again", () => sup.state === "running");
  assert.equal(sup.status.incarnation, 1);
  await sup.stop();
});

Deno.test("Supervisor restarts after a fatal message and drops the old incarnation's messages", async () => {
  const { sup, rec } = supervise({ breaker: { maxCrashes: 10 } });
  sup.control[WORD.fault] = FAULT.fatal; // the worker disarms it itself
  sup.control[WORD.faultAfter] = 2;
  sup.start();
  await rec.until(
    "restarted and running",
    () => sup.status.incarnation === 1 && sup.state === "running",
  );
  const [crash] = rec.into("backoff");
  assert.equal(crash?.reason, "Device vanished");
  assert.equal(crash?.status.lastExit, "crash");
  const types = rec.messages.filter((m) => m.incarnation === 0).map((m) => m.msg.type);
  assert.equal(types.at(-1), "fatal", "nothing of incarnation 0 after its fatal message");
  await sleep(100);
  assert.equal(rec.messages.filter((m) => m.incarnation === 0).length, types.length);
  assert.ok(rec.messages.every((m) => m.incarnation === m.current));
  await sup.stop();
});

Deno.test("Supervisor counts a throwing spawn as a crash", async () => {
  let calls = 0;
  const rec = new Recorder();
  const sup = rec.attach(
    new Supervisor({
      name: "nospawn",
      spawn: () => {
        calls++;
        throw new Error("No such module");
      },
      backoff: { initialMs: 5 },
      breaker: { maxCrashes: 3 },
    }),
  );
  sup.start();
  await rec.until("broken", () => sup.state === "broken");
  assert.equal(calls, 3);
  assert.match(sup.status.lastError ?? "", /^Cannot start worker "nospawn": No such module$/);
  await sup.stop();
  assert.equal(sup.state, "stopped");
});

Deno.test("Supervisor.restart replaces the worker gracefully", async () => {
  const { sup, rec } = supervise();
  sup.start();
  await rec.until("running", () => sup.state === "running");
  await sup.restart();
  assert.equal(sup.state, "starting");
  assert.equal(rec.of("final").length, 1, "the old incarnation stopped gracefully");
  await rec.until("running again", () => sup.state === "running" && sup.status.incarnation === 1);
  assert.equal(sup.status.restarts, 1);
  assert.equal(sup.status.crashes, 0);
  assert.equal(Atomics.load(sup.control, CONTROL_WORD.stop), 0, "the stop word is cleared");
  await sup.stop();
});

Deno.test("Supervisor.stop cancels a pending restart", async () => {
  const { sup, rec } = supervise({ backoff: { initialMs: 60_000, maxMs: 60_000 } });
  sup.control[WORD.fault] = FAULT.throw;
  sup.start();
  await rec.until("backoff", () => sup.state === "backoff");
  assert.ok(sup.status.nextRestartAt !== null);
  await sup.stop();
  assert.equal(sup.state, "stopped");
  assert.equal(sup.status.nextRestartAt, null);
  assert.equal(sup.control[WORD.boots], 1);
  // Leaving the 60 s timer behind would fail this test under Deno's timer sanitizer.
});

Deno.test("Supervisor control word layout leaves words 8 and up to the caller", () => {
  const words = Object.values(CONTROL_WORD);
  assert.equal(new Set(words).size, words.length);
  assert.ok(words.every((w) => w >= 0 && w < FIRST_PIPELINE_WORD));
  assert.equal(FIRST_PIPELINE_WORD, 8);
  const states = Object.values(WORKER_STATE);
  assert.equal(new Set(states).size, states.length);
  assert.ok(!states.includes(0 as never), "0 means no state written yet");
});

Deno.test("A retired worker's late state write does not land over its successor's", () => {
  // The interleaving no timing can force: incarnation 0 saw that it was current, then lost the CPU
  // while the supervisor retired it and wrote `starting` for incarnation 1 (the incarnation word
  // is not looked at again). A plain store put `stopped` over the successor's word, and the
  // supervisor took the successor for finished: no restart.
  const control = new SharedArrayBuffer(32 * 4);
  const words = new Int32Array(control);
  Atomics.store(words, CONTROL_WORD.state, stateWord(0, WORKER_STATE.starting));
  const old = new WorkerControl({ control, incarnation: 0 });
  old.state = "running";
  assert.equal(words[CONTROL_WORD.state], stateWord(0, WORKER_STATE.running));
  Atomics.store(words, CONTROL_WORD.state, stateWord(1, WORKER_STATE.starting));
  old.state = "stopped";
  assert.equal(words[CONTROL_WORD.state], stateWord(1, WORKER_STATE.starting));
  Atomics.store(words, CONTROL_WORD.incarnation, 1);
  const successor = new WorkerControl({ control, incarnation: 1 });
  successor.state = "running";
  assert.equal(stateOf(words[CONTROL_WORD.state]!), WORKER_STATE.running);
});

Deno.test("A retired incarnation's state word is one no worker can write", async () => {
  const { sup, rec } = supervise({ backoff: { initialMs: 60_000, maxMs: 60_000, factor: 2 } });
  sup.start();
  await rec.until("running", () => sup.state === "running");
  sup.control[WORD.fault] = FAULT.throw;
  await rec.until("backoff", () => sup.state === "backoff");
  assert.equal(sup.status.workerState, "stopped");
  // The crashed incarnation 0 (it may still run: terminate() does not stop a busy worker).
  const old = new WorkerControl({ control: sup.buffer, incarnation: 0 });
  old.state = "running";
  assert.equal(sup.status.workerState, "stopped");
  await sup.stop();
});

Deno.test("Supervisor.start during a stop starts a new worker once the stop completes", async () => {
  const { sup, rec } = supervise();
  sup.start();
  await rec.until("running", () => sup.state === "running");
  const stopping = sup.stop();
  sup.start();
  assert.equal(sup.state, "stopping");
  await stopping;
  assert.deepEqual(rec.events.slice(-2).map((e) => [e.to, e.reason]), [
    ["stopped", "worker stopped"],
    ["starting", "start requested"],
  ]);
  await rec.until("running again", () => sup.state === "running" && sup.status.incarnation === 1);
  assert.equal(rec.of("final").length, 1);
  await sup.stop();
});
