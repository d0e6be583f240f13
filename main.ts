/**
 * kvm-audio: flags/env → {@link AudioService} → Hono app on `Deno.serve`.
 *
 * Run `deno task start --help` for the flags. The API binds to 127.0.0.1:8080 unless told
 * otherwise; any other address requires a token. A missing audio device leaves the API up: the
 * pipeline reports `waiting-for-device` and retries with backoff.
 *
 * @module
 */

import { dirname } from "node:path";
import { configureSync, getConsoleSink, getLogger } from "@logtape/logtape";
import { asksForHelp, ConfigError, helpText, hostPort, parseConfig } from "./lib/config.ts";
import { AudioService } from "./lib/service.ts";
import { runStartupCheck } from "./lib/startup_check.ts";
import { RtpReceiver, RtpSender } from "./lib/transport/rtp.ts";
import { createApp } from "./routes/app.ts";

/** Runs the service until SIGINT/SIGTERM. Returns the exit code. */
export async function main(args: readonly string[]): Promise<number> {
  if (asksForHelp(args)) {
    console.log(helpText());
    return 0;
  }
  let config;
  try {
    config = parseConfig(args);
  } catch (e) {
    if (e instanceof ConfigError) {
      console.error(`kvm-audio: ${e.message}`);
      return 2;
    }
    throw e;
  }
  if (config.help) {
    console.log(helpText());
    return 0;
  }
  configureSync({
    sinks: { console: getConsoleSink() },
    loggers: [
      { category: ["kvm-audio"], lowestLevel: config.logLevel, sinks: ["console"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["console"] },
    ],
  });
  const log = getLogger(["kvm-audio", "main"]);

  const check = runStartupCheck(config);
  if (config.check) {
    console.log(check.report);
    return check.ok ? 0 : 1;
  }
  for (const line of check.report.split("\n")) log.info(line);
  if (!check.ok) {
    log.error("Cannot start: {reason}", { reason: check.fatal });
    return 1;
  }

  if (config.stateFile) {
    try {
      Deno.mkdirSync(dirname(config.stateFile), { recursive: true });
    } catch (e) {
      // The service still runs; readControlState and every save report the file's problem.
      log.warn("Cannot create the state file's directory: {error}", {
        error: (e as Error).message,
      });
    }
  }
  const service = new AudioService({
    capture: config.capture,
    playback: config.playback,
    captureRate: config.captureRate,
    captureChannels: config.captureChannels,
    playbackRate: config.playbackRate,
    playbackChannels: config.playbackChannels,
    outputPreset: config.outputPreset,
    microphonePreset: config.microphonePreset,
    pace: config.pace,
    ...(config.stateFile ? { stateFile: config.stateFile } : {}),
  });
  service.start();

  // Opening a socket can fail (a port in use, an address not on this machine): one line saying
  // which, everything opened so far closed, exit status 1 — not a stack trace.
  let sender: RtpSender | null = null, receiver: RtpReceiver | null = null;
  const ac = new AbortController();
  let server: Deno.HttpServer;
  let step = "open the RTP output";
  try {
    if (config.rtpOut.length > 0) {
      sender = await RtpSender.open(service, {
        destinations: config.rtpOut,
        payloadType: config.rtpPayloadType,
      });
    }
    if (config.rtpIn !== null) {
      step = `listen for RTP on ${config.rtpInHost}:${config.rtpIn}`;
      receiver = await RtpReceiver.listen(service, {
        port: config.rtpIn,
        host: config.rtpInHost,
        payloadType: config.rtpInPayloadType,
      });
    }
    const app = createApp(service, {
      signal: ac.signal,
      ...(config.token ? { token: config.token } : {}),
      ...(sender ? { rtpOut: sender } : {}),
    });
    step = `listen on http://${hostPort(config.listen)}`;
    server = Deno.serve({
      hostname: config.listen.hostname,
      port: config.listen.port,
      signal: ac.signal,
      onListen: (addr) => log.info(`API listening on http://${hostPort(addr)}`),
    }, app.fetch);
  } catch (e) {
    log.error(`Cannot ${step}: {error}`, { error: (e as Error).message });
    await sender?.close();
    await receiver?.close();
    await service.close();
    return 1;
  }

  const stop = new Promise<void>((resolve) => {
    for (const sig of ["SIGINT", "SIGTERM"] as const) Deno.addSignalListener(sig, () => resolve());
  });
  await stop;
  log.info("Stopping");
  ac.abort();
  await server.finished;
  await sender?.close();
  await receiver?.close();
  await service.close();
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
