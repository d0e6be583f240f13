/**
 * The routes both pipelines have, written once: status, quality (get and set), start, stop and
 * the stream, under `/api/<resource>`. Each direction describes itself with a
 * {@link PipelineRoutes} (the service calls, its preset table, the words of its messages) and
 * adds its own routes (the output's mute).
 *
 * @module
 */

import type { Context, MiddlewareHandler } from "hono";
import type { PresetChange } from "../lib/service.ts";
import { type Direction, getPreset, PRESET_NAMES } from "../lib/quality.ts";
import {
  ApiError,
  type AppEnv,
  checkField,
  json,
  type JsonSchema,
  QUALITY_BODY,
  type QuerySpec,
  readJsonBody,
  requireEnabled,
  requireUpgrade,
  type RouteSpec,
} from "./http.ts";
import { SCHEMAS } from "./openapi.ts";

/** One direction's part of the shared routes. */
export interface PipelineRoutes {
  /** Path segment and OpenAPI tag: the routes live under `/api/<resource>`. */
  readonly resource: "audio" | "microphone";
  /** The pipeline (and its preset table): "the output pipeline" in messages. */
  readonly direction: Direction;
  /** The device the pipeline needs, for the 409 messages ("no capture device configured"). */
  readonly device: "capture" | "playback";
  /** Whether the pipeline is enabled (else start, stop and the stream answer 409). */
  readonly enabled: () => boolean;
  /** The status body (`GET /api/<resource>`, and the answer of start and stop). */
  readonly status: () => unknown;
  readonly statusSchema: JsonSchema;
  readonly quality: {
    /** The body of `GET …/quality`. */
    readonly body: () => unknown;
    readonly schema: JsonSchema;
    /** Summary and description of `GET …/quality`. */
    readonly summary: string;
    readonly description: string;
    /** Description of `PUT …/quality`. */
    readonly setDescription: string;
    /** Applies a preset (a valid name). */
    readonly set: (name: string) => PresetChange;
  };
  /** Summary of `POST …/start`. */
  readonly startSummary: string;
  readonly start: () => void;
  /** Description of `POST …/stop`. */
  readonly stopDescription: string;
  readonly stop: () => Promise<void>;
  /** Routes between the quality routes and start (the output's mute). */
  readonly extra?: readonly RouteSpec[];
  /** `GET …/stream`, the WebSocket. */
  readonly stream: {
    readonly operationId: string;
    /** What the client does: "listen" or "talk" (in the 409 message). */
    readonly verb: string;
    readonly summary: string;
    readonly description: string;
    readonly query: Readonly<Record<string, QuerySpec>>;
    /** What serves one upgraded connection of request `c`. */
    readonly connect: (c: Context<AppEnv>) => StreamPeer;
  };
}

/** What serves a stream connection (its socket is in `arraybuffer` mode). */
export interface StreamPeer {
  open(socket: WebSocket): void;
  message(socket: WebSocket, data: unknown): void;
  /** The socket closed, or failed (`"error"`, a connection drop). */
  closed(socket: WebSocket, why?: "error"): void;
}

const capitalized = (s: string) => s[0]!.toUpperCase() + s.slice(1);

/**
 * Upgrades the request (checked by `requireUpgrade`) to a WebSocket served by `connect`'s peer,
 * in `arraybuffer` mode. Deno's own upgrade, not Hono's helper: that one compares the `Upgrade`
 * header with "websocket" case-sensitively and refused `Upgrade: WebSocket` (RFC 6455: the value
 * is case-insensitive). A request Deno cannot upgrade (no `Sec-WebSocket-Key`, no `Connection:
 * Upgrade`), or with a malformed key, is a 400 saying why; a version other than 13 is a 426.
 */
function acceptWebSocket(connect: (c: Context<AppEnv>) => StreamPeer): MiddlewareHandler<AppEnv> {
  return function upgradeToWebSocket(c) {
    // What Deno does not check (RFC 6455 §4.2.1–4.2.2): the protocol version — 13, the only one
    // there is; another is a 426 naming it — and a key of 16 bytes in base64.
    const version = c.req.header("sec-websocket-version");
    if (version?.trim() !== "13") {
      throw new ApiError(
        426,
        `Cannot upgrade to a WebSocket of version ${
          JSON.stringify(version ?? null)
        }: expected Sec-WebSocket-Version: 13`,
        {
          field: "Sec-WebSocket-Version",
          allowed: ["13"],
          headers: { "Sec-WebSocket-Version": "13", Upgrade: "websocket" },
        },
      );
    }
    const key = c.req.header("sec-websocket-key")?.trim();
    if (key !== undefined && !/^[A-Za-z0-9+/]{21}[AQgw]==$/.test(key)) {
      throw new ApiError(
        400,
        `Cannot upgrade to a WebSocket with Sec-WebSocket-Key ${
          JSON.stringify(key)
        }: expected 16 bytes in base64`,
        { field: "Sec-WebSocket-Key" },
      );
    }
    let upgraded: { response: Response; socket: WebSocket };
    try {
      upgraded = Deno.upgradeWebSocket(c.req.raw);
    } catch (e) {
      throw new ApiError(400, `Cannot upgrade to a WebSocket: ${(e as Error).message}`);
    }
    const { response, socket } = upgraded;
    const peer = connect(c);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => peer.open(socket);
    socket.onmessage = (e) => peer.message(socket, e.data);
    socket.onclose = () => peer.closed(socket);
    socket.onerror = () => peer.closed(socket, "error");
    return Promise.resolve(response);
  };
}

/** The routes of one pipeline, from its description. */
export function pipelineRoutes(p: PipelineRoutes): RouteSpec[] {
  const base = `/api/${p.resource}`;
  const name = capitalized(p.resource);
  const pipeline = `${p.direction} pipeline`;
  const missing = `no ${p.device} device configured`;
  const enabled = requireEnabled(
    p.enabled,
    `Cannot control the ${pipeline}: it is disabled (${missing})`,
  );
  const disabled = json(SCHEMAS.error, `The ${pipeline} is disabled`);
  const common = { tag: p.resource, auth: "bearer" } as const;
  return [
    {
      method: "GET",
      path: base,
      operationId: `get${name}`,
      summary: `Status of the ${pipeline}`,
      ...common,
      responses: { 200: json(p.statusSchema, `${capitalized(pipeline)} status`) },
      handlers: [(c) => c.json(p.status())],
    },
    {
      method: "GET",
      path: `${base}/quality`,
      operationId: `get${name}Quality`,
      summary: p.quality.summary,
      description: p.quality.description,
      ...common,
      responses: { 200: json(p.quality.schema, `${capitalized(p.direction)} quality`) },
      handlers: [(c) => c.json(p.quality.body())],
    },
    {
      method: "PUT",
      path: `${base}/quality`,
      operationId: `set${name}Quality`,
      summary: `Choose the ${p.direction} preset`,
      description: p.quality.setDescription,
      ...common,
      body: QUALITY_BODY,
      responses: { 200: json(SCHEMAS.presetChange, "The preset and how it was applied") },
      handlers: [async (c) => {
        const body = await readJsonBody(c, QUALITY_BODY);
        const preset = checkField(
          "preset",
          PRESET_NAMES,
          () => getPreset(p.direction, body.preset),
        );
        const applied = p.quality.set(preset.name);
        return c.json({ preset: preset.name, applied });
      }],
    },
    ...(p.extra ?? []),
    {
      method: "POST",
      path: `${base}/start`,
      operationId: `start${name}`,
      summary: p.startSummary,
      description: "Past crashes are forgotten: an open crash-loop breaker closes and the " +
        "pipeline starts again. 409 when the pipeline is disabled.",
      ...common,
      responses: { 200: json(p.statusSchema, "Status after the start"), 409: disabled },
      handlers: [enabled, (c) => {
        p.start();
        return c.json(p.status());
      }],
    },
    {
      method: "POST",
      path: `${base}/stop`,
      operationId: `stop${name}`,
      summary: `Stop the ${pipeline}`,
      description: p.stopDescription,
      ...common,
      responses: { 200: json(p.statusSchema, "Status after the stop"), 409: disabled },
      handlers: [enabled, async (c) => {
        await p.stop();
        return c.json(p.status());
      }],
    },
    {
      method: "GET",
      path: `${base}/stream`,
      operationId: p.stream.operationId,
      summary: p.stream.summary,
      description: p.stream.description,
      tag: p.resource,
      auth: "bearer-or-query",
      websocket: true,
      query: p.stream.query,
      responses: {
        101: { description: "Switching to the WebSocket protocol" },
        409: disabled,
        426: json(SCHEMAS.error, "Not a WebSocket upgrade request"),
      },
      handlers: [
        requireEnabled(
          p.enabled,
          `Cannot ${p.stream.verb}: the ${pipeline} is disabled (${missing})`,
        ),
        requireUpgrade(),
        acceptWebSocket(p.stream.connect),
      ],
    },
  ];
}
