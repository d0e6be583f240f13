/**
 * `/api/audio`: the output pipeline (target → operator) — status, quality, mute, start/stop, and
 * the listen stream (`GET /api/audio/stream`, a WebSocket; protocol in
 * `lib/transport/ws_protocol.ts`, fan-out in `lib/transport/hub.ts`).
 *
 * @module
 */

import type { AudioService } from "../lib/service.ts";
import { PRESET_NAMES } from "../lib/quality.ts";
import type { WebSocketHub } from "../lib/transport/hub.ts";
import {
  answerControl,
  checkField,
  json,
  type ObjectSchema,
  pipelineStatusBody,
  readJsonBody,
  type RouteDeps,
  type RouteSpec,
  TOKEN_QUERY,
} from "./http.ts";
import { SCHEMAS } from "./openapi.ts";
import { pipelineRoutes } from "./pipeline_routes.ts";

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
    rtpSenders: s.rtpSenders,
    streams: hub.listeners(),
  };
}

/** The routes of `/api/audio`. */
export function audioRoutes({ service, hub }: RouteDeps): RouteSpec[] {
  const mute: RouteSpec[] = [
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
  ];
  return pipelineRoutes({
    resource: "audio",
    direction: "output",
    device: "capture",
    enabled: () => service.outputStatus().enabled,
    status: () => outputStatus(service, hub),
    statusSchema: SCHEMAS.outputStatus,
    quality: {
      body: () => {
        const preset = service.outputPreset;
        return {
          preset: preset.name,
          allowed: PRESET_NAMES,
          settings: preset,
          encoding: service.appliedOutputPreset,
          changes: service.outputPresetChanges,
        };
      },
      schema: SCHEMAS.outputQuality,
      summary: "Output preset and its encoder settings",
      description: "`encoding` is the preset the running encoder applied (null while no worker " +
        "has an encoder: stopped, starting, restarting after a crash, breaker open).",
      setDescription:
        "`applied` says how: `live` (opus_encoder_ctl on the running encoder), `rebuilt` (new " +
        "encoder at a frame boundary: channels, frame duration or application changed), `stored` " +
        "(no encoder runs now; the next one starts with it) or `unchanged`. Works while the pipeline is disabled too " +
        "(the choice is kept).",
      set: (name) => service.setOutputPreset(name),
    },
    extra: mute,
    startSummary: "Start (or resume) the output pipeline",
    start: () => service.startOutput(),
    stopDescription: "Listeners stay connected and receive nothing until a start.",
    stop: () => service.stopOutput(),
    stream: {
      operationId: "listenAudio",
      verb: "listen",
      summary: "Listen: a WebSocket of Opus packets",
      description: "Upgrade to a WebSocket. The server sends a JSON `hello` " +
        "(`{type, version, codec, sampleRate, channels, frameMs, preset, muted}`), then one " +
        "binary message per Opus packet: a 12-byte header (version 1; flags: bit 0 silence/DTX, " +
        "bit 1 discontinuity; channels; reserved; sequence uint32 BE; timestamp in 48 kHz ticks " +
        "uint32 BE) and the packet. A new `hello` precedes any change of channels, frame " +
        'duration, preset or mute. The client may send `{"type":"ping"}` (answered with a ' +
        "`pong`). A listener too slow to keep up loses the oldest packets; one that stays " +
        "behind is closed with code 4408. Browsers may pass the token as `?token=`.",
      query: TOKEN_QUERY,
      connect: (c) => {
        const label = `request ${c.get("requestId")}`;
        return {
          open: (socket) => hub.add(socket, label),
          message(socket, data) {
            if (typeof data !== "string") return;
            const pong = answerControl(data);
            if (pong !== null && socket.readyState === 1) socket.send(pong);
          },
          closed: (socket, why) => hub.remove(socket, why),
        };
      },
    },
  });
}
