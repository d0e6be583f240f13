/**
 * `/api/presets`: both preset tables, as data.
 *
 * @module
 */

import { MICROPHONE_PRESETS, OUTPUT_PRESETS, PRESET_NAMES } from "../lib/quality.ts";
import type { RouteSpec } from "./http.ts";
import { SCHEMAS } from "./openapi.ts";

/** The routes of `/api/presets`. */
export function presetRoutes(): RouteSpec[] {
  const body = { names: PRESET_NAMES, output: OUTPUT_PRESETS, microphone: MICROPHONE_PRESETS };
  return [{
    method: "GET",
    path: "/api/presets",
    operationId: "getPresets",
    summary: "Every preset of both directions",
    description: "`output` is target → operator (music-capable), `microphone` operator → target " +
      "(voice). Names are ordered lowest first.",
    tag: "presets",
    auth: "bearer",
    responses: { 200: { description: "Both preset tables", schema: SCHEMAS.presets } },
    handlers: [(c) => c.json(body)],
  }];
}
