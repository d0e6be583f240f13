/**
 * `GET /api/audio/sdp`: an SDP describing the RTP output (`--rtp-out`) as a receiver at the first
 * destination needs it, so `ffmpeg -protocol_whitelist file,http,udp,rtp -i <url>`, a GStreamer
 * `udpsrc ! rtpopusdepay` pipeline or a WebRTC gateway's RTP mountpoint can play it. It follows
 * the current output preset (channels, frame duration); the session version (`o=`) starts at the
 * route's creation time in seconds and goes up by one whenever what it describes changes, as RFC
 * 8866 asks (it was derived from the preset, and went down from high to ultra).
 *
 * @module
 */

import { SDP_CONTENT_TYPE, sdpFor } from "../lib/transport/sdp.ts";
import type { AudioService } from "../lib/service.ts";
import { ApiError, type RouteSpec } from "./http.ts";
import { SCHEMAS } from "./openapi.ts";

/** What the route needs of the RTP sender. */
export interface RtpOutInfo {
  readonly destinations: readonly { readonly address: string; readonly port: number }[];
  readonly payloadType: number;
  readonly ssrc: number;
}

/** The SDP route. */
export function sdpRoutes(service: AudioService, rtpOut: RtpOutInfo | undefined): RouteSpec[] {
  let described = "";
  let version = Math.floor(Date.now() / 1000);
  return [{
    method: "GET",
    path: "/api/audio/sdp",
    operationId: "getAudioSdp",
    summary: "SDP of the RTP output, for a receiver at the first --rtp-out destination",
    description: "404 when the service sends no RTP (no --rtp-out).",
    tag: "audio",
    auth: "bearer",
    responses: {
      200: { description: "Session description", contentType: SDP_CONTENT_TYPE },
      404: { description: "No RTP output is configured", schema: SCHEMAS.error },
    },
    handlers: [(c) => {
      const dest = rtpOut?.destinations[0];
      if (!rtpOut || !dest) {
        throw new ApiError(404, "No RTP output is configured: start the service with --rtp-out");
      }
      const p = service.outputPreset;
      const key = `${p.channels}/${p.frameMs}/${p.inbandFec}`;
      if (key !== described) {
        if (described !== "") version++;
        described = key;
      }
      const sdp = sdpFor({ address: dest.address, port: dest.port }, {
        payloadType: rtpOut.payloadType,
        channels: p.channels,
        frameMs: p.frameMs,
        inbandFec: p.inbandFec,
        sessionId: rtpOut.ssrc,
        sessionVersion: version,
      });
      return c.body(sdp, 200, { "Content-Type": SDP_CONTENT_TYPE, "Cache-Control": "no-cache" });
    }],
  }];
}
