import assert from "node:assert/strict";
import {
  asksForHelp,
  ConfigError,
  FLAGS,
  helpText,
  parseConfig,
  parseListen,
} from "../lib/config.ts";
import { main } from "../main.ts";
import { runStartupCheck } from "../lib/startup_check.ts";
import { tempDir } from "./audio_util.ts";
import { until } from "./wait.ts";

const noEnv = () => undefined;

Deno.test("defaults bind to loopback and use the high presets", () => {
  const c = parseConfig([], (k) => (k === "HOME" ? "/home/op" : undefined));
  assert.deepEqual(c.listen, { hostname: "127.0.0.1", port: 8080 });
  assert.equal(c.outputPreset, "high");
  assert.equal(c.microphonePreset, "high");
  assert.equal(c.capture, "default");
  assert.equal(c.token, null);
  assert.equal(c.stateFile, "/home/op/.local/state/kvm-audio/state.json");
  assert.deepEqual(c.rtpOut, []);
});

Deno.test("every flag has an environment twin, and the flag wins over it", () => {
  for (const f of FLAGS) assert.match(f.env, /^KVM_AUDIO_[A-Z_]+$/);
  const env = (k: string) =>
    ({ KVM_AUDIO_CAPTURE: "hw:0,0", KVM_AUDIO_OUTPUT_PRESET: "low", KVM_AUDIO_NO_MIC: "1" })[k];
  const c = parseConfig(["--output-preset", "ultra"], env);
  assert.equal(c.capture, "hw:0,0");
  assert.equal(c.outputPreset, "ultra");
  assert.equal(c.playback, null);
  assert.deepEqual(
    parseConfig(
      [],
      (k) => (k === "KVM_AUDIO_RTP_OUT" ? "127.0.0.1:5004, 127.0.0.1:5006" : undefined),
    )
      .rtpOut,
    ["127.0.0.1:5004", "127.0.0.1:5006"],
  );
  assert.deepEqual(
    parseConfig(["--rtp-out", "127.0.0.1:5004", "--rtp-out", "[::1]:5006"], noEnv).rtpOut,
    ["127.0.0.1:5004", "[::1]:5006"],
  );
  assert.match(helpText(), /--capture VALUE[\s\S]*env KVM_AUDIO_CAPTURE/);
});

Deno.test("bad flags are errors naming the flag and the allowed values", () => {
  assert.throws(
    () => parseConfig(["--output-preset", "loud"], noEnv),
    /--output-preset.*"loud".*low, medium, high, ultra/,
  );
  assert.throws(
    () => parseConfig(["--listen", "nowhere"], noEnv),
    /Invalid --listen "nowhere": expected HOST:PORT/,
  );
  assert.throws(() => parseConfig(["--listen", "127.0.0.1:99999"], noEnv), /0 to 65535/);
  assert.throws(() => parseConfig(["--capture-rate", "44.1"], noEnv), /--capture-rate/);
  assert.throws(() => parseConfig(["--pace", "fast"], noEnv), /expected one of device, clock/);
  assert.throws(() => parseConfig(["--bogus"], noEnv), ConfigError);
  assert.throws(
    () => parseConfig([], (k) => (k === "KVM_AUDIO_NO_MIC" ? "yes" : undefined)),
    /KVM_AUDIO_NO_MIC/,
  );
  assert.throws(() => parseConfig(["--rtp-out", "host"], noEnv), /--rtp-out/);
  // Port 0 is no destination: a configuration error (exit 2), also from the environment.
  assert.throws(
    () => parseConfig(["--rtp-out", "127.0.0.1:0"], noEnv),
    /Invalid --rtp-out "127.0.0.1:0": expected a port from 1 to 65535/,
  );
  assert.throws(
    () =>
      parseConfig([], (k) => (k === "KVM_AUDIO_RTP_OUT" ? "127.0.0.1:5004,[::1]:0" : undefined)),
    ConfigError,
  );
  assert.throws(
    () => parseConfig(["--rtp-in", "5004", "--no-mic"], noEnv),
    /Refusing --rtp-in 5004 with --no-mic/,
  );
  // An empty flag value is refused (an unset shell variable): it turned saving off silently.
  // An empty variable is unset, as systemd environment files write it.
  assert.throws(
    () => parseConfig(["--state-file", ""], noEnv),
    /Invalid --state-file "": expected a value; .* "none" for no state file/,
  );
  assert.throws(() => parseConfig(["--capture", ""], noEnv), /Invalid --capture "": /);
  const home = (k: string) =>
    k === "HOME" ? "/home/op" : k === "KVM_AUDIO_STATE_FILE" ? "" : undefined;
  assert.equal(parseConfig([], home).stateFile, "/home/op/.local/state/kvm-audio/state.json");
});

Deno.test("--help is answered whatever the environment holds", async () => {
  assert.equal(asksForHelp(["--help"]), true);
  assert.equal(asksForHelp(["--capture", "hw:0,0"]), false);
  assert.equal(asksForHelp(["--bogus", "--help"]), false, "parseConfig names the unknown flag");
  // A value main refuses (exit 2) in the environment: --help still prints the help (exit 0).
  Deno.env.set("KVM_AUDIO_LISTEN", "0.0.0.0:8080");
  const printed: string[] = [];
  const log = console.log;
  console.log = (...a: unknown[]) => printed.push(a.join(" "));
  try {
    assert.equal(await main(["--help"]), 0);
  } finally {
    console.log = log;
    Deno.env.delete("KVM_AUDIO_LISTEN");
  }
  assert.equal(printed.join("\n"), helpText());
});

Deno.test("listening off loopback requires a token", () => {
  assert.throws(() => parseConfig(["--listen", "0.0.0.0:8080"], noEnv), /without a token/);
  const c = parseConfig(["--listen", "0.0.0.0:8080", "--token", "s3cret"], noEnv);
  assert.equal(c.token, "s3cret");
  assert.deepEqual(parseListen("[::1]:80"), { hostname: "::1", port: 80 });
  parseConfig(["--listen", "localhost:1"], noEnv);
  parseConfig(["--listen", "127.0.0.2:1"], noEnv);
  parseConfig(["--listen", "[::1]:1"], noEnv);
  // An IPv6 RTP destination may carry its zone (a link-local address needs it).
  assert.deepEqual(parseConfig(["--rtp-out", "[fe80::1%lo]:5004"], noEnv).rtpOut, [
    "[fe80::1%lo]:5004",
  ]);
  // An IPv6 address is named as it is written: in brackets.
  assert.throws(
    () => parseConfig(["--listen", "[::]:8080"], noEnv),
    /--listen \[::\]:8080 without/,
  );
  // Only address literals count: a name that starts with "127." may resolve anywhere.
  for (const host of ["127.evil.example.com", "127.0.0.300", "127.0.0.1.example.com"]) {
    assert.throws(
      () => parseConfig(["--listen", `${host}:8080`], noEnv),
      /without a token/,
      host,
    );
  }
});

Deno.test("RTP flags: input host and payload type, and the pipelines they need", () => {
  // RTP input binds on the --listen host: localhost is 127.0.0.1, another name is refused.
  const c = parseConfig(["--listen", "localhost:8080", "--rtp-in", "5004"], noEnv);
  assert.equal(c.rtpInHost, "127.0.0.1");
  assert.throws(
    () => parseConfig(["--listen", "kvm.lan:8080", "--token", "t", "--rtp-in", "5004"], noEnv),
    /Refusing --rtp-in 5004 with --listen kvm.lan: .*must then be an IP address/,
  );
  assert.equal(parseConfig(["--listen", "[::1]:8080", "--rtp-in", "5004"], noEnv).rtpInHost, "::1");
  // Input accepts any dynamic payload type unless one is named (ffmpeg sends 97); output sends
  // 111 unless one is named.
  assert.equal(c.rtpInPayloadType, null);
  assert.equal(c.rtpPayloadType, 111);
  const named = parseConfig(["--rtp-in", "5004", "--rtp-pt", "100"], noEnv);
  assert.equal(named.rtpInPayloadType, 100);
  assert.equal(named.rtpPayloadType, 100);
  const env = parseConfig([], (k) => k === "KVM_AUDIO_RTP_PT" ? "111" : undefined);
  assert.equal(env.rtpInPayloadType, 111);
  // RTP output sends the output pipeline's audio: refused without it, as input without the mic.
  assert.throws(
    () => parseConfig(["--rtp-out", "127.0.0.1:5004", "--no-output"], noEnv),
    /Refusing --rtp-out 127.0.0.1:5004 with --no-output/,
  );
});

Deno.test("a token an Authorization header cannot carry is refused at start", () => {
  for (const token of ["correct horse", "tab\there", "naïve"]) {
    assert.throws(
      () => parseConfig(["--token", token], noEnv),
      /Invalid --token: expected visible ASCII characters only \(no spaces\)/,
      token,
    );
    assert.throws(
      () => parseConfig([], (k) => k === "KVM_AUDIO_TOKEN" ? token : undefined),
      /Invalid --token/,
    );
  }
  assert.equal(parseConfig(["--token", "a-Z_0.9~+/=!#$"], noEnv).token, "a-Z_0.9~+/=!#$");
});

Deno.test("the start-up check reports libraries and a missing device without failing", () => {
  const r = runStartupCheck({
    capture: "hw:97,0",
    playback: null,
    captureRate: 48000,
    captureChannels: 2,
    playbackRate: 48000,
    playbackChannels: 2,
  });
  assert.equal(r.ok, true);
  assert.match(r.report, /libopus: libopus 1\./);
  assert.match(r.report, /libasound: alsa-lib 1\./);
  assert.match(r.report, /capture: "hw:97,0" unavailable/);
  assert.match(r.report, /playback: disabled/);
});

Deno.test("the start-up check says why it cannot start when libopus is missing", async () => {
  const cmd = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-ffi",
      "--allow-read",
      "--allow-env",
      "--allow-sys",
      "main.ts",
      "--check",
      "--no-output",
      "--no-mic",
    ],
    env: { KVM_AUDIO_LIBOPUS: "/nonexistent/libopus.so.0" },
    cwd: new URL("..", import.meta.url).pathname,
    stdout: "piped",
    stderr: "piped",
  });
  const out = await cmd.output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 1);
  assert.match(text, /libopus: NOT LOADED.*\/nonexistent\/libopus\.so\.0.*KVM_AUDIO_LIBOPUS/);
});

/** Runs main.ts with `args` from `cwd`; resolves to the process and its output so far. */
function runMain(args: string[], cwd: string) {
  return new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-ffi",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      "--allow-net=127.0.0.1",
      "--allow-sys",
      new URL("../main.ts", import.meta.url).pathname,
      ...args,
    ],
    cwd,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

Deno.test("main: a relative state file, and a saved running pipeline that a flag disables", async () => {
  await using dir = await tempDir();
  // Saved by an earlier run with both pipelines running; now both are disabled.
  await Deno.writeTextFile(
    `${dir.path}/state.json`,
    JSON.stringify({
      outputPreset: "low",
      microphonePreset: "high",
      muted: false,
      outputRunning: true,
      microphoneRunning: true,
    }),
  );
  // Port 0: the service binds a free port and logs it (no window for another to take it).
  const child = runMain(
    ["--no-output", "--no-mic", "--state-file", "state.json", "--listen", "127.0.0.1:0"],
    dir.path,
  );
  let log = "";
  const collect = async (stream: ReadableStream<Uint8Array>) => {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) log += text;
  };
  const output = Promise.all([collect(child.stdout), collect(child.stderr)]);
  let port = 0;
  try {
    await until("the API's port in the log", () => {
      const m = /API listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(log);
      if (m) port = Number(m[1]);
      return port > 0;
    }, 20_000);
    await until("the API", async () => {
      try {
        const r = await fetch(`http://127.0.0.1:${port}/healthz`);
        return r.ok && (await r.json()).status === "ok";
      } catch {
        return false;
      }
    }, 20_000);
    assert.ok((await Deno.stat(`${dir.path}/state.json`)).isFile, "still a file");
    // The port is taken now: a second instance says so in one line and exits with 1.
    const second = runMain(["--no-output", "--no-mic", "--listen", `127.0.0.1:${port}`], dir.path);
    const [out2, err2] = await Promise.all([
      new Response(second.stdout).text(),
      new Response(second.stderr).text(),
    ]);
    assert.equal((await second.status).code, 1);
    assert.match(
      out2 + err2,
      new RegExp(`Cannot listen on http://127\\.0\\.0\\.1:${port}: .*in use`),
    );
    assert.doesNotMatch(out2 + err2, /Uncaught/);
  } finally {
    child.kill("SIGTERM");
  }
  await output;
  assert.equal((await child.status).code, 0, log);
  assert.match(log, /output disabled, preset low; microphone disabled/);
});

Deno.test("the deployment environment file documents every setting", async () => {
  const text = await Deno.readTextFile(new URL("../deploy/kvm-audio.env", import.meta.url));
  for (const f of FLAGS) {
    if (f.flag === "help" || f.flag === "check") continue;
    assert.match(text, new RegExp(`^#?${f.env}=`, "m"), `${f.env} is in deploy/kvm-audio.env`);
  }
  const unit = await Deno.readTextFile(new URL("../deploy/kvm-audio.service", import.meta.url));
  assert.match(unit, /EnvironmentFile=\/etc\/kvm-audio\/kvm-audio\.env/);
  assert.match(unit, /Restart=always/);
  assert.match(unit, /StateDirectory=kvm-audio/);
  // The start limit belongs to [Unit] (systemd ignores its interval in [Service]); a
  // configuration error (exit 2) is not restarted.
  const section = (name: string) => unit.split(/^\[/m).find((x) => x.startsWith(`${name}]`)) ?? "";
  assert.match(section("Unit"), /^StartLimitIntervalSec=60$/m);
  assert.match(section("Unit"), /^StartLimitBurst=10$/m);
  assert.doesNotMatch(section("Service"), /StartLimit/);
  assert.match(section("Service"), /^RestartPreventExitStatus=2$/m);
});
