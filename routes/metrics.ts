/**
 * Metrics: `GET /api/metrics` (JSON, for the operator's page) and `GET /metrics` (Prometheus text
 * exposition format 0.0.4, for a scraper). Both refresh the supervisor-derived series first.
 *
 * @module
 */

import { PROMETHEUS_CONTENT_TYPE } from "../lib/metrics.ts";
import { refreshSupervisorMetrics } from "../lib/service.ts";
import type { RouteDeps, RouteSpec } from "./http.ts";
import { SCHEMAS } from "./openapi.ts";

/** The metrics routes. */
export function metricsRoutes({ service }: RouteDeps): RouteSpec[] {
  return [
    {
      method: "GET",
      path: "/api/metrics",
      operationId: "getMetrics",
      summary: "Every metric as JSON",
      description: "Counters and gauges by name (labelled ones as objects keyed by the label " +
        'set, e.g. `reason="listener_slow"`); histograms with count, sum, min, max, p50/p90/p99 ' +
        "and cumulative buckets.",
      tag: "metrics",
      auth: "bearer",
      responses: { 200: { description: "Metrics", schema: SCHEMAS.metrics } },
      handlers: [(c) => {
        refreshSupervisorMetrics(service);
        return c.json(service.metrics.toJSON());
      }],
    },
    {
      method: "GET",
      path: "/metrics",
      operationId: "getPrometheusMetrics",
      summary: "Every metric in Prometheus text format 0.0.4",
      tag: "metrics",
      auth: "bearer",
      responses: {
        200: { description: "Prometheus text exposition", contentType: PROMETHEUS_CONTENT_TYPE },
      },
      handlers: [(c) => {
        refreshSupervisorMetrics(service);
        return c.body(service.metrics.toPrometheus(), 200, {
          "Content-Type": PROMETHEUS_CONTENT_TYPE,
        });
      }],
    },
  ];
}
