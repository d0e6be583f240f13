/**
 * `GET /healthz`: liveness plus a summary of both pipelines. Never needs the token.
 *
 * The status code answers one question — is the API process up and serving? — so it is 200
 * whenever this handler runs, also when a pipeline is in trouble: restarting the process would not
 * bring back a missing device, and the supervisor already restarts crashed workers. The body says
 * `"status": "degraded"` (with each problem) when a pipeline that should run is not healthy: its
 * crash-loop breaker is open, it is backing off after a crash, its device cannot be opened, or it
 * stopped on its own — or when the control state could not be saved to the state file (the change
 * is in effect but would not survive a restart). A pipeline stopped by the operator or disabled is
 * not a problem.
 *
 * @module
 */

import type { AudioService, PipelineStatus } from "../lib/service.ts";
import type { RouteDeps, RouteSpec } from "./http.ts";
import { SCHEMAS } from "./openapi.ts";

/** Health of one pipeline. */
export interface PipelineHealth {
  readonly enabled: boolean;
  /** Whether the operator wants it running. */
  readonly wanted: boolean;
  readonly state: string;
  readonly breakerOpen: boolean;
  /** What is wrong, `null` when nothing. */
  readonly problem: string | null;
}

function pipelineHealth(s: PipelineStatus, wanted: boolean): PipelineHealth {
  let problem: string | null = null;
  if (s.enabled && wanted) {
    if (s.state === "broken") {
      problem = `crash-loop breaker open: ${s.supervisor?.lastError ?? "too many crashes"}`;
    } else if (s.state === "backoff") {
      problem = `restarting after a crash: ${s.supervisor?.lastError ?? "unknown error"}`;
    } else if (s.lastDeviceError !== null) {
      problem = `device unavailable: ${s.lastDeviceError}`;
    } else if (
      s.state === "stopped" && s.supervisor?.lastExit != null && s.supervisor.lastExit !== "stopped"
    ) {
      problem = `stopped on its own (${s.supervisor.lastExit})`;
    }
  }
  return {
    enabled: s.enabled,
    wanted: s.enabled && wanted,
    state: s.state,
    breakerOpen: s.supervisor?.breakerOpen ?? false,
    problem,
  };
}

/** The health summary `GET /healthz` returns. */
export function health(service: AudioService) {
  const wanted = service.controlState;
  const output = pipelineHealth(service.outputStatus(), wanted.outputRunning);
  const microphone = pipelineHealth(service.microphoneStatus(), wanted.microphoneRunning);
  const stateFile = { problem: service.stateFileProblem };
  const degraded = output.problem !== null || microphone.problem !== null ||
    stateFile.problem !== null;
  return { status: degraded ? "degraded" : "ok", output, microphone, stateFile } as const;
}

/** The health route. */
export function healthRoutes({ service }: RouteDeps): RouteSpec[] {
  return [{
    method: "GET",
    path: "/healthz",
    operationId: "getHealth",
    summary: "Liveness and pipeline health",
    description: "200 whenever the API is up; `status` is `degraded` when a pipeline that " +
      "should run is broken (breaker open), backing off, without its device, or ended, or " +
      "when the last change could not be saved to the state file. Open " +
      "without a token.",
    tag: "health",
    auth: "none",
    responses: { 200: { description: "Health", schema: SCHEMAS.health } },
    handlers: [(c) => c.json(health(service))],
  }];
}
