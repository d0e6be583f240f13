/**
 * The OpenAPI 3.1 document (`GET /openapi.json`), written from the same {@link RouteSpec} table
 * the app registers its routes from — a route cannot exist without being documented — plus the
 * JSON Schemas of the bodies.
 *
 * @module
 */

import { PRESET_NAMES } from "../lib/quality.ts";
import { PROTOCOL_VERSION } from "../lib/transport/ws_protocol.ts";
import type { JsonSchema, ResponseSpec, RouteSpec } from "./http.ts";

const nullable = (s: JsonSchema): JsonSchema => ({ anyOf: [s, { type: "null" }] });
const object = (properties: Record<string, JsonSchema>, required = Object.keys(properties)) => ({
  type: "object",
  properties,
  required,
});
const str = { type: "string" } as const;
const int = { type: "integer" } as const;
const num = { type: "number" } as const;
const bool = { type: "boolean" } as const;
const presetName = { type: "string", enum: PRESET_NAMES } as const;

const preset = object({
  name: presetName,
  channels: { type: "integer", enum: [1, 2] },
  frameMs: { type: "integer", enum: [10, 20] },
  bitrate: int,
  complexity: int,
  vbr: bool,
  vbrConstraint: bool,
  signal: str,
  maxBandwidth: str,
  dtx: bool,
  inbandFec: bool,
  packetLossPerc: int,
  application: str,
});

const deviceInfo = nullable(object({
  name: str,
  rate: int,
  channels: int,
  periodFrames: int,
  bufferFrames: int,
}));

const breaker = object({ open: bool, crashes: int, lastError: nullable(str) });

const pipeline = {
  enabled: bool,
  running: bool,
  state: {
    type: "string",
    enum: [
      "disabled",
      "stopped",
      "starting",
      "running",
      "waiting-for-device",
      "stopping",
      "backoff",
      "broken",
    ],
  },
  device: nullable(str),
  rate: nullable(int),
  obtained: deviceInfo,
  lastDeviceError: nullable(str),
  preset: presetName,
  restarts: int,
  breaker,
  supervisor: nullable({ type: "object", description: "The supervisor's full status" }),
};

/** What both streams' `hello` messages begin with. */
const helloHead = {
  type: { const: "hello" },
  version: { const: PROTOCOL_VERSION },
  codec: { const: "opus" },
  sampleRate: { const: 48000 },
  channels: { type: "integer", enum: [1, 2] },
  frameMs: num,
};

const listenHello = object({
  ...helloHead,
  preset: presetName,
  muted: bool,
});

const talkHello = object({
  ...helloHead,
  frameSamples: int,
  preset: presetName,
  bitrate: int,
  application: str,
  complexity: int,
  vbr: bool,
  vbrConstraint: bool,
  signal: str,
  maxBandwidth: str,
  dtx: bool,
  fec: bool,
  packetLossPerc: int,
  running: bool,
});

const health = object({
  enabled: bool,
  wanted: bool,
  state: str,
  breakerOpen: bool,
  problem: nullable(str),
});

/** JSON Schemas of the API's bodies (also listed under `components.schemas`). */
export const SCHEMAS = {
  error: object({ error: str, field: str, allowed: { type: "array" } }, ["error"]),
  preset,
  presetChange: object({
    preset: presetName,
    applied: { type: "string", enum: ["unchanged", "live", "rebuilt", "stored"] },
  }),
  mute: object({ muted: bool }),
  outputStatus: object({
    ...pipeline,
    muted: bool,
    listeners: { ...int, description: "WebSocket listeners" },
    subscribers: {
      ...int,
      description: "Main-thread consumers of the encoded frames (the WebSocket hub, …)",
    },
    rtpSenders: {
      ...int,
      description: "RTP senders (--rtp-out) the output worker sends to itself",
    },
    streams: {
      type: "array",
      items: object({
        id: int,
        label: str,
        connectedAt: num,
        sent: int,
        sentBytes: int,
        dropped: int,
        queued: int,
        bufferedAmount: int,
      }),
    },
  }),
  microphoneStatus: object({
    ...pipeline,
    talker: nullable(object({
      id: int,
      label: str,
      connectedAt: num,
      received: int,
      malformed: int,
      badText: int,
    })),
  }),
  outputQuality: object({
    preset: presetName,
    allowed: { type: "array", items: presetName },
    settings: preset,
    encoding: nullable(presetName),
    changes: object({ live: int, rebuilt: int }),
  }),
  microphoneQuality: object({
    preset: presetName,
    allowed: { type: "array", items: presetName },
    settings: preset,
    send: talkHello,
  }),
  listenHello,
  talkHello,
  presets: object({
    names: { type: "array", items: presetName },
    output: { type: "object", additionalProperties: preset },
    microphone: { type: "object", additionalProperties: preset },
  }),
  metrics: object({
    counters: { type: "object" },
    gauges: { type: "object" },
    histograms: { type: "object" },
  }),
  health: object({
    status: { type: "string", enum: ["ok", "degraded"] },
    output: health,
    microphone: health,
    stateFile: object({ problem: nullable(str) }),
  }),
} as const satisfies Record<string, JsonSchema>;

const errorResponse = (description: string): ResponseSpec => ({
  description,
  schema: SCHEMAS.error,
});

function responseObject(r: ResponseSpec): Record<string, unknown> {
  if (r.contentType !== undefined) {
    return { description: r.description, content: { [r.contentType]: { schema: str } } };
  }
  if (r.schema === undefined) return { description: r.description };
  return { description: r.description, content: { "application/json": { schema: r.schema } } };
}

/** The OpenAPI 3.1 document of `routes`; `auth` says whether the app requires a token. */
export function openApiDocument(
  routes: readonly RouteSpec[],
  options: { auth: boolean },
): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const r of routes) {
    const responses: Record<string, ResponseSpec> = { ...r.responses };
    // Every route checks its query (an unknown parameter is refused) and the declared length
    // of a body (routes/app.ts), with or without a body of its own.
    responses[400] ??= errorResponse(
      r.body !== undefined || r.query !== undefined
        ? "Invalid body or parameter, or an unknown parameter (names the field)"
        : "Unknown query parameter or invalid Content-Length (names it)",
    );
    responses[413] ??= errorResponse("Body larger than the limit");
    if (r.body !== undefined) {
      responses[415] ??= errorResponse("Body is not application/json");
    }
    if (options.auth && r.auth !== "none") {
      responses[401] ??= errorResponse("Missing or invalid token");
    }
    const operation: Record<string, unknown> = {
      operationId: r.operationId,
      summary: r.summary,
      ...(r.description !== undefined ? { description: r.description } : {}),
      tags: [r.tag],
      responses: Object.fromEntries(
        Object.entries(responses).map(([status, spec]) => [status, responseObject(spec)]),
      ),
    };
    if (r.query !== undefined) {
      operation.parameters = Object.entries(r.query).map(([name, q]) => ({
        name,
        in: "query",
        required: false,
        description: q.description,
        schema: q.enum !== undefined ? { type: "string", enum: q.enum } : str,
      }));
    }
    if (r.body !== undefined) {
      operation.requestBody = {
        required: true,
        content: { "application/json": { schema: r.body } },
      };
    }
    if (options.auth) {
      operation.security = r.auth === "none"
        ? []
        : r.auth === "bearer"
        ? [{ bearer: [] }]
        : [{ bearer: [] }, { queryToken: [] }];
    }
    if (r.websocket) operation["x-websocket"] = true;
    (paths[r.path] ??= {})[r.method.toLowerCase()] = operation;
  }
  return {
    openapi: "3.1.0",
    info: {
      title: "kvm-audio",
      version: "0.1.0",
      description: "Two-way low-latency audio for KVM-over-IP: control API, metrics and the " +
        "WebSocket listen/talk streams. Every error is JSON `{error, field?, allowed?}`; unknown " +
        "routes answer 404, known paths with another method 405 with `Allow`.",
    },
    tags: [
      { name: "audio", description: "Output pipeline (target → operator)" },
      { name: "microphone", description: "Microphone pipeline (operator → target)" },
      { name: "presets", description: "Quality presets" },
      { name: "metrics", description: "Metrics" },
      { name: "health", description: "Health" },
      { name: "meta", description: "This document" },
    ],
    paths,
    components: {
      schemas: SCHEMAS,
      ...(options.auth
        ? {
          securitySchemes: {
            bearer: { type: "http", scheme: "bearer" },
            queryToken: {
              type: "apiKey",
              in: "query",
              name: "token",
              description: "Only on the two WebSocket stream routes",
            },
          },
        }
        : {}),
    },
  };
}

/** The document's own route; `routes` returns every route of the app (this one included). */
export function openApiRoutes(
  routes: () => readonly RouteSpec[],
  options: { auth: boolean },
): RouteSpec[] {
  let doc: Record<string, unknown> | null = null;
  return [{
    method: "GET",
    path: "/openapi.json",
    operationId: "getOpenApi",
    summary: "This OpenAPI 3.1 document",
    tag: "meta",
    auth: "none",
    responses: { 200: { description: "The document", schema: { type: "object" } } },
    handlers: [(c) => c.json(doc ??= openApiDocument(routes(), options))],
  }];
}
