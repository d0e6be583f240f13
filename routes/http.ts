/**
 * What every route module shares: the app's environment, route specifications (one table that
 * registers the routes and writes the OpenAPI document), request validation, the error
 * vocabulary and the middleware factories.
 *
 * ## Errors
 * Every error response is JSON, `{ error, field?, allowed? }`: `error` is a sentence saying what
 * was wrong and what was expected, `field` names the body field, query parameter or header at
 * fault, `allowed` lists the values it accepts when there is such a list. Routes throw; one
 * `onError` ({@link errorHandler}) maps every error to an `HTTPException` ({@link toHttpException})
 * and renders it:
 * - {@link ApiError} (an `HTTPException`): request-level problems found here (400, 401, 404, 405,
 *   413, 415, 426) — rendered as they are;
 * - {@link InvalidFieldError}: a value the service refused (its own `RangeError`/`TypeError`,
 *   wrapped by {@link checkField}) — 400 with the field and its allowed values;
 * - `ServiceUnavailableError`: the pipeline is disabled in this configuration — 409;
 * - any other `HTTPException` — its status; anything else — 500 without details (logged).
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import type { Context, ErrorHandler, Handler, MiddlewareHandler, NotFoundHandler } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import type { WebSocketHub } from "../lib/transport/hub.ts";
import { type AudioService, type PipelineStatus, ServiceUnavailableError } from "../lib/service.ts";
import { PRESET_NAMES } from "../lib/quality.ts";
import { parseControlMessage, type PongMessage } from "../lib/transport/ws_protocol.ts";
import type { TalkChannel } from "./microphone.ts";

const log = getLogger(["kvm-audio", "http"]);

/** Per-request values set by the middleware. */
export interface AppVariables {
  /** The request id (`X-Request-Id`, received or generated). */
  requestId: string;
  /** Largest request body accepted, bytes. */
  maxBodyBytes: number;
}

/** The Hono environment of the app. */
export type AppEnv = { Variables: AppVariables };

/** What route modules are built from. */
export interface RouteDeps {
  readonly service: AudioService;
  readonly hub: WebSocketHub;
  readonly talk: TalkChannel;
}

/** A JSON Schema (2020-12, as OpenAPI 3.1 uses it). */
export type JsonSchema = Readonly<Record<string, unknown>>;

/** The schema of a JSON request body: an object with known properties. */
export interface ObjectSchema {
  readonly type: "object";
  readonly properties: Readonly<Record<string, JsonSchema>>;
  readonly required: readonly string[];
  readonly additionalProperties: false;
}

/** One query parameter of a route. */
export interface QuerySpec {
  readonly description: string;
  /** The values accepted; any string when absent. */
  readonly enum?: readonly string[];
}

/** One response of a route, for the OpenAPI document. */
export interface ResponseSpec {
  readonly description: string;
  /** Schema of the JSON body. */
  readonly schema?: JsonSchema;
  /** Content type when not JSON (e.g. Prometheus text). */
  readonly contentType?: string;
}

/** HTTP methods the API uses. */
export type Method = "GET" | "PUT" | "POST";

/** How a route is protected when the app has a token. */
export type AuthMode = "none" | "bearer" | "bearer-or-query";

/**
 * One route: registered by the app from this, and documented in the OpenAPI document from the
 * same object, so the two cannot disagree.
 */
export interface RouteSpec {
  readonly method: Method;
  /** Hono path (no parameters are used). */
  readonly path: string;
  readonly operationId: string;
  readonly summary: string;
  readonly description?: string;
  readonly tag: string;
  readonly auth: AuthMode;
  /** Query parameters accepted; any other is a 400. */
  readonly query?: Readonly<Record<string, QuerySpec>>;
  /** JSON body, when the route takes one. */
  readonly body?: ObjectSchema;
  /** Responses by status code (error responses are added by the document writer). */
  readonly responses: Readonly<Record<string, ResponseSpec>>;
  /** Whether the route upgrades to a WebSocket. */
  readonly websocket?: boolean;
  /** Middleware and handler, in order. */
  readonly handlers: readonly (MiddlewareHandler<AppEnv> | Handler<AppEnv>)[];
}

/** Body of every error response. */
export interface ErrorBody {
  readonly error: string;
  readonly field?: string;
  readonly allowed?: readonly unknown[];
}

/** Details of an {@link ApiError}. */
export interface ApiErrorDetails {
  /** Body field, query parameter or header at fault. */
  readonly field?: string | undefined;
  /** Values it accepts. */
  readonly allowed?: readonly unknown[] | undefined;
  /** Extra response headers (`Allow`, `WWW-Authenticate`). */
  readonly headers?: Readonly<Record<string, string>>;
  readonly cause?: unknown;
}

/** A request-level error with its status and JSON details. */
export class ApiError extends HTTPException {
  override name = "ApiError";
  readonly field: string | undefined;
  readonly allowed: readonly unknown[] | undefined;
  readonly headers: Readonly<Record<string, string>>;

  constructor(status: ContentfulStatusCode, message: string, details: ApiErrorDetails = {}) {
    super(status, { message, cause: details.cause });
    this.field = details.field;
    this.allowed = details.allowed;
    this.headers = details.headers ?? {};
  }

  /** The JSON body of the response. */
  body(): ErrorBody {
    return {
      error: this.message,
      ...(this.field !== undefined ? { field: this.field } : {}),
      ...(this.allowed !== undefined ? { allowed: this.allowed } : {}),
    };
  }
}

/** A value the service refused for a field (its message is the service's own). */
export class InvalidFieldError extends Error {
  override name = "InvalidFieldError";
  readonly field: string;
  readonly allowed: readonly unknown[] | undefined;

  constructor(
    field: string,
    allowed: readonly unknown[] | undefined,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.field = field;
    this.allowed = allowed;
  }
}

/**
 * Runs `validate`, turning the `RangeError`/`TypeError` the service throws for a bad value into
 * an {@link InvalidFieldError} naming `field` and its `allowed` values. Other errors pass through.
 */
export function checkField<T>(
  field: string,
  allowed: readonly unknown[] | undefined,
  validate: () => T,
): T {
  try {
    return validate();
  } catch (e) {
    if (e instanceof RangeError || e instanceof TypeError) {
      throw new InvalidFieldError(field, allowed, e.message, { cause: e });
    }
    throw e;
  }
}

/** The one mapping from errors to HTTP (see the module notes). */
export function toHttpException(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof InvalidFieldError) {
    return new ApiError(400, err.message, { field: err.field, allowed: err.allowed, cause: err });
  }
  if (err instanceof ServiceUnavailableError) return new ApiError(409, err.message, { cause: err });
  if (err instanceof HTTPException) {
    return new ApiError(err.status, err.message || "Request failed", { cause: err });
  }
  return new ApiError(500, "Internal server error", { cause: err });
}

/** `onError` of the app: maps with {@link toHttpException} and renders JSON. */
export function errorHandler(): ErrorHandler<AppEnv> {
  return function handleError(err, c) {
    const http = toHttpException(err);
    const requestId = c.get("requestId");
    if (http.status >= 500) {
      log.error("Request {requestId} failed: {error}", {
        requestId,
        error: err instanceof Error ? (err.stack ?? err.message) : String(err),
      });
    } else {
      log.debug("Request {requestId} refused ({status}): {error}", {
        requestId,
        status: http.status,
        error: http.message,
      });
    }
    return c.json(http.body(), http.status, { ...http.headers });
  };
}

/** `notFound` of the app: a JSON 404. */
export function notFoundHandler(): NotFoundHandler<AppEnv> {
  return function notFound(c) {
    const e = new ApiError(404, `Cannot find ${JSON.stringify(c.req.path)}: no such route`);
    return c.json(e.body(), 404);
  };
}

/** Handler of a known path with a method it does not serve: 405 with `Allow`. */
export function methodNotAllowed(allowed: readonly string[]): MiddlewareHandler<AppEnv> {
  const allow = allowed.join(", ");
  return function rejectMethod(c) {
    throw new ApiError(
      405,
      `Cannot ${c.req.method} ${JSON.stringify(c.req.path)}: expected one of ${allow}`,
      { field: "method", allowed, headers: { Allow: allow } },
    );
  };
}

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/**
 * Request context and access log: takes `X-Request-Id` when it is a sane token (else makes one),
 * echoes it on the response, sets the body limit, and logs method, path (never the query, which
 * may hold a token; never the Authorization header), status and duration.
 */
export function requestContext(options: { maxBodyBytes: number }): MiddlewareHandler<AppEnv> {
  return async function withRequestContext(c, next) {
    const started = performance.now();
    const given = c.req.header("x-request-id");
    const requestId = given !== undefined && REQUEST_ID.test(given) ? given : crypto.randomUUID();
    c.set("requestId", requestId);
    c.set("maxBodyBytes", options.maxBodyBytes);
    await next();
    if (c.res.status !== 101) c.res.headers.set("X-Request-Id", requestId);
    log.info("{method} {path} {status} {ms} ms", {
      requestId,
      method: c.req.method,
      path: c.req.path,
      status: c.res.status,
      ms: Math.round((performance.now() - started) * 10) / 10,
    });
  };
}

/** Refuses a request whose declared `Content-Length` exceeds the limit (413). */
export function bodyLimit(): MiddlewareHandler<AppEnv> {
  return async function limitBody(c, next) {
    const declared = c.req.header("content-length");
    if (declared !== undefined) {
      const n = Number(declared);
      const max = c.get("maxBodyBytes");
      if (!/^\d+$/.test(declared.trim())) {
        throw new ApiError(400, `Invalid Content-Length ${JSON.stringify(declared)}`, {
          field: "Content-Length",
        });
      }
      if (n > max) throw tooLarge(n, max);
    }
    await next();
  };
}

function tooLarge(n: number | null, max: number): ApiError {
  return new ApiError(
    413,
    `Cannot accept a body of ${n === null ? "more than " + max : n} bytes: expected at most ${max}`,
    { field: "body" },
  );
}

/**
 * Bearer-token authentication: `Authorization: Bearer <token>`, and on the `queryPaths` (the
 * WebSocket streams, which browsers open without headers) also `?token=<token>`. Tokens are
 * compared in constant time (SHA-256 digests compared without early exit). 401 with
 * `WWW-Authenticate` otherwise.
 */
export function bearerAuth(
  options: { token: string; queryPaths: ReadonlySet<string> },
): MiddlewareHandler<AppEnv> {
  if (typeof options.token !== "string" || options.token.length === 0) {
    throw new TypeError("Cannot require an empty token: expected a non-empty string");
  }
  const expected = digest(options.token);
  const challenge = { "WWW-Authenticate": 'Bearer realm="kvm-audio"' };
  return async function requireToken(c, next) {
    const header = c.req.header("authorization");
    let given: string | undefined;
    if (header !== undefined) {
      const m = /^Bearer[ ]+(\S+)\s*$/i.exec(header);
      if (m === null) {
        throw new ApiError(401, "Cannot read the Authorization header: expected Bearer <token>", {
          field: "Authorization",
          headers: challenge,
        });
      }
      given = m[1];
    } else if (options.queryPaths.has(c.req.path)) {
      given = c.req.query("token");
    }
    if (given === undefined) {
      throw new ApiError(401, "Missing credentials: expected an Authorization: Bearer token", {
        field: "Authorization",
        headers: challenge,
      });
    }
    if (!sameBytes(await digest(given), await expected)) {
      throw new ApiError(401, "Invalid token", { field: "Authorization", headers: challenge });
    }
    await next();
  };
}

async function digest(s: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(s)));
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  let diff = a.length ^ b.length;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ (b[i] ?? 0);
  return diff === 0;
}

/** Validates the query string against `spec`: unknown, repeated or out-of-list values are 400. */
export function queryValidator(
  spec: Readonly<Record<string, QuerySpec>>,
): MiddlewareHandler<AppEnv> {
  const names = Object.keys(spec);
  return async function validateQuery(c, next) {
    const params = new URL(c.req.url).searchParams;
    const seen = new Set<string>();
    for (const [name, value] of params) {
      const q = spec[name];
      if (q === undefined) {
        throw new ApiError(
          400,
          `Unknown query parameter ${JSON.stringify(name)}: expected ${
            names.length === 0 ? "none" : "one of " + names.join(", ")
          }`,
          { field: name, allowed: names },
        );
      }
      if (seen.has(name)) {
        throw new ApiError(400, `Repeated query parameter ${JSON.stringify(name)}: expected one`, {
          field: name,
        });
      }
      seen.add(name);
      if (q.enum !== undefined && !q.enum.includes(value)) {
        throw new ApiError(
          400,
          `Invalid ${name} ${JSON.stringify(value)}: expected one of ${q.enum.join(", ")}`,
          { field: name, allowed: q.enum },
        );
      }
    }
    await next();
  };
}

function isJsonType(contentType: string): boolean {
  const essence = contentType.split(";")[0]!.trim().toLowerCase();
  return essence === "application/json" || /^application\/[a-z0-9.+-]+\+json$/.test(essence);
}

async function readLimited(req: Request, max: number): Promise<Uint8Array> {
  if (req.body === null) return new Uint8Array(0);
  const reader = req.body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (total > max) {
      await reader.cancel().catch(() => {});
      throw tooLarge(null, max);
    }
    chunks.push(value);
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const ch of chunks) {
    out.set(ch, off);
    off += ch.length;
  }
  return out;
}

/** The values a property schema allows, for error bodies. */
export function allowedValues(schema: JsonSchema | undefined): readonly unknown[] | undefined {
  if (schema === undefined) return undefined;
  if (Array.isArray(schema.enum)) return schema.enum;
  if (schema.type === "boolean") return [true, false];
  return undefined;
}

/**
 * Reads a JSON object body described by `schema`: the content type must be JSON (415), the body
 * at most the app's limit (413), valid UTF-8 JSON (400), an object (400) with no unknown and no
 * missing property (400 naming it). Values are checked by the caller (with {@link checkField}).
 */
export async function readJsonBody(
  c: Context<AppEnv>,
  schema: ObjectSchema,
): Promise<Record<string, unknown>> {
  const type = c.req.header("content-type");
  if (type === undefined || !isJsonType(type)) {
    throw new ApiError(
      415,
      `Cannot read a body of type ${JSON.stringify(type ?? "")}: expected "application/json"`,
      { field: "Content-Type", allowed: ["application/json"] },
    );
  }
  const bytes = await readLimited(c.req.raw, c.get("maxBodyBytes"));
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new ApiError(400, `Cannot parse the body as JSON: ${(e as Error).message}`, {
      field: "body",
      cause: e,
    });
  }
  const names = Object.keys(schema.properties);
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ApiError(
      400,
      `Cannot use a body of ${JSON.stringify(value)}: expected a JSON object with ${
        names.join(", ")
      }`,
      { field: "body" },
    );
  }
  const body = value as Record<string, unknown>;
  for (const key of Object.keys(body)) {
    if (!Object.hasOwn(schema.properties, key)) {
      throw new ApiError(
        400,
        `Unknown field ${JSON.stringify(key)}: expected only ${names.join(", ")}`,
        { field: key, allowed: names },
      );
    }
  }
  for (const key of schema.required) {
    if (!Object.hasOwn(body, key)) {
      const allowed = allowedValues(schema.properties[key]);
      throw new ApiError(
        400,
        `Missing field ${JSON.stringify(key)}${
          allowed ? ": expected one of " + allowed.map((v) => JSON.stringify(v)).join(", ") : ""
        }`,
        { field: key, ...(allowed ? { allowed } : {}) },
      );
    }
  }
  return body;
}

/** A handler that answers 426 for a stream route reached without a WebSocket upgrade. */
export function requireUpgrade(): MiddlewareHandler<AppEnv> {
  return async function expectUpgrade(c, next) {
    if (c.req.header("upgrade")?.toLowerCase() !== "websocket") {
      throw new ApiError(
        426,
        `Cannot serve ${
          JSON.stringify(c.req.path)
        } without a WebSocket upgrade: expected "Upgrade: websocket"`,
        { field: "Upgrade", allowed: ["websocket"], headers: { Upgrade: "websocket" } },
      );
    }
    await next();
  };
}

/** Body of `PUT /api/audio/quality` and `PUT /api/microphone/quality`. */
export const QUALITY_BODY: ObjectSchema = {
  type: "object",
  properties: { preset: { type: "string", enum: PRESET_NAMES } },
  required: ["preset"],
  additionalProperties: false,
};

/** Query of the two stream routes: the token, for browsers that cannot set headers. */
export const TOKEN_QUERY = {
  token: { description: "The API token, when the Authorization header cannot be set" },
} as const;

/** A guard that answers 409 when a pipeline is disabled. */
export function requireEnabled(
  enabled: () => boolean,
  message: string,
): MiddlewareHandler<AppEnv> {
  return async function pipelineEnabled(_c, next) {
    if (!enabled()) throw new ServiceUnavailableError(message);
    await next();
  };
}

/** A pong for a ping, or `null` when `text` is not a control message. */
export function answerControl(text: string): string | null {
  const ctl = parseControlMessage(text);
  if (ctl === null) return null;
  const pong: PongMessage = {
    type: "pong",
    ...(ctl.id !== undefined ? { id: ctl.id } : {}),
    time: Date.now(),
  };
  return JSON.stringify(pong);
}

/** The fields both pipelines' status bodies share, from the service's status. */
export function pipelineStatusBody(s: PipelineStatus) {
  return {
    enabled: s.enabled,
    running: s.running,
    state: s.state,
    device: s.device,
    rate: s.obtained?.rate ?? null,
    obtained: s.obtained,
    lastDeviceError: s.lastDeviceError,
    preset: s.preset,
    restarts: s.supervisor?.restarts ?? 0,
    breaker: {
      open: s.supervisor?.breakerOpen ?? false,
      crashes: s.supervisor?.crashes ?? 0,
      lastError: s.supervisor?.lastError ?? null,
    },
    supervisor: s.supervisor,
  };
}

/** A JSON response spec. */
export const json = (schema: JsonSchema, description: string): ResponseSpec => ({
  description,
  schema,
});
