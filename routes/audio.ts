/**
 * `/api/audio`: the output pipeline (target → operator) — status, quality, mute, start/stop, and
 * the listen stream (`GET /api/audio/stream`, a WebSocket; protocol in
 * `lib/transport/ws_protocol.ts`, fan-out in `lib/transport/hub.ts`).
 *
 * @module
 */

import { upgradeWebSocket } from "hono/deno";
import type { AudioService } from "../lib/service.ts";
import { getPreset, PRESET_NAMES } from "../lib/quality.ts";
import type { WebSocketHub } from "../lib/transport/hub.ts";
import {
  answerControl,
  checkField,
  json,
  type ObjectSchema,
  pipelineStatusBody,
  QUALITY_BODY,
  readJsonBody,
  requireEnabled,
  requireUpgrade,
  type RouteDeps,
  type RouteSpec,
  TOKEN_QUERY,
  upgradeRefused,
} from "./http.ts";
import { SCHEMAS } from "./openapi.ts";

const MUTE_BODY: ObjectSchema = {
  type: "object",
  properties: { muted: { type: "boolean" } },
  required: ["muted"],
  additionalProperties: false,
};

/** Status of the output pipeline as the API shows it. */
export function outputStatus(service: AudioService, hub: WebSocketHub) {
  const s = service.outputStatus();
  return {
    ...pipelineStatusBody(s),
    muted: s.muted,
    listeners: hub.size,
    subscribers: s.listeners,
    streams: hub.listeners(),
  };
}

/** The routes of `/api/audio`. */
export function audioRoutes({ service, hub }: RouteDeps): RouteSpec[] {
  const disabled =
    "Cannot control the output pipeline: it is disabled (no capture device configured)";
  const enabled = requireEnabled(() => service.outputStatus().enabled, disabled);
  const quality = () => {
    const preset = service.outputPreset;
    return {
      preset: preset.name,
      allowed: PRESET_NAMES,
      settings: preset,
      encoding: service.appliedOutputPreset,
      changes: service.outputPresetChanges,
    };
  };
  return [
    {
      method: "GET",
      path: "/api/audio",
      operationId: "getAudio",
      summary: "Status of the output pipeline",
      tag: "audio",
      auth: "bearer",
      responses: { 200: json(SCHEMAS.outputStatus, "Output pipeline status") },
      handlers: [(c) => c.json(outputStatus(service, hub))],
    },
    {
      method: "GET",
      path: "/api/audio/quality",
      operationId: "getAudioQuality",
      summary: "Output preset and its encoder settings",
      description: "`encoding` is the preset the running encoder applied (null when stopped).",
      tag: "audio",
      auth: "bearer",
      responses: { 200: json(SCHEMAS.outputQuality, "Output quality") },
      handlers: [(c) => c.json(quality())],
    },
    {
      method: "PUT",
      path: "/api/audio/quality",
      operationId: "setAudioQuality",
      summary: "Choose the output preset",
      description:
        "`applied` says how: `live` (opus_encoder_ctl on the running encoder), `rebuilt` (new " +
        "encoder at a frame boundary: channels, frame duration or application changed), `stored` " +
        "(the pipeline is not running) or `unchanged`. Works while the pipeline is disabled too " +
        "(the choice is kept).",
      tag: "audio",
      auth: "bearer",
      body: QUALITY_BODY,
      responses: { 200: json(SCHEMAS.presetChange, "The preset and how it was applied") },
      handlers: [async (c) => {
        const body = await readJsonBody(c, QUALITY_BODY);
        const preset = checkField("preset", PRESET_NAMES, () => getPreset("output", body.preset));
        const applied = service.setOutputPreset(preset.name);
        return c.json({ preset: preset.name, applied });
      }],
    },
    {
      method: "GET",
      path: "/api/audio/mute",
      operationId: "getAudioMute",
      summary: "Whether the output is muted",
      tag: "audio",
      auth: "bearer",
      responses: { 200: json(SCHEMAS.mute, "Mute state") },
      handlers: [(c) => c.json({ muted: service.muted })],
    },
    {
      method: "PUT",
      path: "/api/audio/mute",
      operationId: "setAudioMute",
      summary: "Mute or unmute the output",
      description: "A muted output sends no packets at all (capture keeps running).",
      tag: "audio",
      auth: "bearer",
      body: MUTE_BODY,
      responses: { 200: json(SCHEMAS.mute, "The new mute state") },
      handlers: [async (c) => {
        const body = await readJsonBody(c, MUTE_BODY);
        checkField("muted", [true, false], () => service.setMuted(body.muted));
        return c.json({ muted: service.muted });
      }],
    },
    {
      method: "POST",
      path: "/api/audio/start",
      operationId: "startAudio",
      summary: "Start (or resume) the output pipeline",
      description: "When the crash-loop breaker is open, the pipeline is stopped first (which " +
        "closes the breaker) and started again. 409 when the pipeline is disabled.",
      tag: "audio",
      auth: "bearer",
      responses: {
        200: json(SCHEMAS.outputStatus, "Status after the start"),
        409: json(SCHEMAS.error, "The output pipeline is disabled"),
      },
      handlers: [enabled, (c) => {
        // A supervisor ignores a start while its breaker is open; a stop closes the breaker.
        service.startOutput();
        return c.json(outputStatus(service, hub));
      }],
    },
    {
      method: "POST",
      path: "/api/audio/stop",
      operationId: "stopAudio",
      summary: "Stop the output pipeline",
      description: "Listeners stay connected and receive nothing until a start.",
      tag: "audio",
      auth: "bearer",
      responses: {
        200: json(SCHEMAS.outputStatus, "Status after the stop"),
        409: json(SCHEMAS.error, "The output pipeline is disabled"),
      },
      handlers: [enabled, async (c) => {
        await service.stopOutput();
        return c.json(outputStatus(service, hub));
      }],
    },
    {
      method: "GET",
      path: "/api/audio/stream",
      operationId: "listenAudio",
      summary: "Listen: a WebSocket of Opus packets",
      description: "Upgrade to a WebSocket. The server sends a JSON `hello` " +
        "(`{type, version, codec, sampleRate, channels, frameMs, preset, muted}`), then one " +
        "binary message per Opus packet: a 12-byte header (version 1; flags: bit 0 silence/DTX, " +
        "bit 1 discontinuity; channels; reserved; sequence uint32 BE; timestamp in 48 kHz ticks " +
        "uint32 BE) and the packet. A new `hello` precedes any change of channels, frame " +
        'duration, preset or mute. The client may send `{"type":"ping"}` (answered with a ' +
        "`pong`). A listener too slow to keep up loses the oldest packets; one that stays " +
        "behind is closed with code 4408. Browsers may pass the token as `?token=`.",
      tag: "audio",
      auth: "bearer-or-query",
      websocket: true,
      query: TOKEN_QUERY,
      responses: {
        101: { description: "Switching to the WebSocket protocol" },
        409: json(SCHEMAS.error, "The output pipeline is disabled"),
        426: json(SCHEMAS.error, "Not a WebSocket upgrade request"),
      },
      handlers: [
        requireEnabled(
          () => service.outputStatus().enabled,
          "Cannot listen: the output pipeline is disabled (no capture device configured)",
        ),
        requireUpgrade(),
        upgradeWebSocket((c) => {
          const label = `request ${c.get("requestId")}`;
          return {
            onOpen(_evt, ws) {
              const socket = ws.raw!;
              socket.binaryType = "arraybuffer";
              hub.add(socket, label);
            },
            onMessage(evt, ws) {
              if (typeof evt.data !== "string") return;
              const pong = answerControl(evt.data);
              if (pong !== null && ws.readyState === 1) ws.send(pong);
            },
            onClose(_evt, ws) {
              hub.remove(ws.raw!);
            },
            onError(_evt, ws) {
              hub.remove(ws.raw!, "error");
            },
          };
        }),
        upgradeRefused(),
      ],
    },
  ];
}
