/**
 * The Hono app: control API, metrics, health, OpenAPI document and the two WebSocket streams,
 * over one {@link AudioService}.
 *
 * ```ts
 * const shutdown = new AbortController();
 * const app = createApp(service, { token, signal: shutdown.signal });
 * Deno.serve({ hostname, port, signal: shutdown.signal }, app.fetch);
 * ```
 *
 * Every route comes from a {@link RouteSpec} table (one module per resource); the same table
 * writes `/openapi.json`. Middleware, in order: request context and access log (`X-Request-Id`
 * in and out), body size limit, bearer authentication (when a token is given: `/api/*` and
 * `/metrics`; the two streams also take `?token=`; `/healthz` and `/openapi.json` stay open),
 * then per route the query validator and the route's handlers. A known path asked with another
 * method answers 405 with `Allow`; an unknown path 404; errors are mapped in one `onError`.
 *
 * @module
 */

import { type RtpOutInfo, sdpRoutes } from "./sdp.ts";
import { mountWeb } from "./web.ts";
import { Hono } from "hono";
import type { AudioService } from "../lib/service.ts";
import { type HubOptions, WebSocketHub } from "../lib/transport/hub.ts";
import { audioRoutes } from "./audio.ts";
import { healthRoutes } from "./health.ts";
import {
  type AppEnv,
  bearerAuth,
  bodyLimit,
  errorHandler,
  methodNotAllowed,
  notFoundHandler,
  queryValidator,
  requestContext,
  type RouteDeps,
  type RouteSpec,
} from "./http.ts";
import { metricsRoutes } from "./metrics.ts";
import { microphoneRoutes, TalkChannel } from "./microphone.ts";
import { openApiRoutes } from "./openapi.ts";
import { presetRoutes } from "./presets.ts";

/** Default largest request body, bytes. */
export const DEFAULT_MAX_BODY_BYTES = 16 * 1024;

/** Options of {@link createApp}. */
export interface AppOptions {
  /**
   * Require `Authorization: Bearer <token>` on `/api/*` and `/metrics` (and accept `?token=` on
   * the stream routes). No authentication when unset — main.ts insists on a token when bound to a
   * non-loopback address.
   */
  readonly token?: string;
  /** Largest request body, bytes (default {@link DEFAULT_MAX_BODY_BYTES}). */
  readonly maxBodyBytes?: number;
  /** Listener queue tuning of the listen stream. */
  readonly hub?: HubOptions;
  /** When aborted, every WebSocket (listeners, talker) is closed with 1001 and new ones refused. */
  readonly signal?: AbortSignal;
  /** The RTP sender (`--rtp-out`), for `GET /api/audio/sdp`. */
  readonly rtpOut?: RtpOutInfo;
}

/**
 * Builds the app over `service`.
 *
 * @throws {TypeError} when `token` is given but empty
 * @throws {RangeError} when `maxBodyBytes` is not a positive integer
 */
export function createApp(service: AudioService, opts: AppOptions = {}): Hono<AppEnv> {
  const maxBodyBytes = opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  if (!Number.isInteger(maxBodyBytes) || maxBodyBytes < 1) {
    throw new RangeError(
      `Invalid maxBodyBytes ${JSON.stringify(maxBodyBytes)}: expected a positive integer`,
    );
  }
  const hub = new WebSocketHub(service, opts.hub);
  const talk = new TalkChannel(service);
  const deps: RouteDeps = { service, hub, talk };
  // Whoever changes a preset, mute or a pipeline's running state, clients get a new hello.
  const unsubscribe = service.onControlChange(() => {
    hub.refresh();
    talk.refresh();
  });
  if (opts.signal !== undefined) {
    const shutdown = () => {
      unsubscribe();
      hub.close();
      talk.close();
    };
    if (opts.signal.aborted) shutdown();
    else opts.signal.addEventListener("abort", shutdown, { once: true });
  }

  const auth = opts.token !== undefined;
  const routes: RouteSpec[] = [
    ...audioRoutes(deps),
    ...microphoneRoutes(deps),
    ...presetRoutes(),
    ...metricsRoutes(deps),
    ...healthRoutes(deps),
    ...sdpRoutes(service, opts.rtpOut),
  ];
  routes.push(...openApiRoutes(() => routes, { auth }));

  const app = new Hono<AppEnv>();
  app.use("*", requestContext({ maxBodyBytes }));
  app.use("*", bodyLimit());
  if (opts.token !== undefined) {
    const requireToken = bearerAuth({
      token: opts.token,
      queryPaths: new Set(routes.filter((r) => r.auth === "bearer-or-query").map((r) => r.path)),
    });
    app.use("/api/*", requireToken);
    app.use("/metrics", requireToken);
  }
  for (const r of routes) {
    // The prefixes above must cover exactly the routes whose spec asks for a token.
    const covered = r.path.startsWith("/api/") || r.path === "/metrics";
    if (covered !== (r.auth !== "none")) {
      throw new Error(
        `Route ${r.method} ${r.path} has auth "${r.auth}" but is ${
          covered ? "" : "not "
        }under /api/ or /metrics`,
      );
    }
  }
  const methods = new Map<string, string[]>();
  for (const r of routes) {
    app.on(r.method, r.path, queryValidator(r.query ?? {}), ...r.handlers);
    const m = methods.get(r.path) ?? [];
    m.push(r.method);
    if (r.method === "GET") m.push("HEAD");
    methods.set(r.path, m);
  }
  for (const [path, allowed] of methods) app.all(path, methodNotAllowed(allowed));
  // The operator's page (embedded assets; no token needed to load it, the API still asks).
  mountWeb(app);
  app.notFound(notFoundHandler());
  app.onError(errorHandler());
  return app;
}
