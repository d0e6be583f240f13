/**
 * The control state that must survive a crash of the whole process (a fault inside a C library
 * ends the process, not just a worker): presets, mute, which pipelines run. Written atomically
 * (a temporary file in the same directory, then a rename) on every change and read at start.
 *
 * @module
 */

import { dirname } from "node:path";
import { PRESET_NAMES, type PresetName } from "./quality.ts";

/** What is saved. */
export interface ControlState {
  outputPreset: PresetName;
  microphonePreset: PresetName;
  muted: boolean;
  outputRunning: boolean;
  microphoneRunning: boolean;
}

function isPreset(v: unknown): v is PresetName {
  return typeof v === "string" && (PRESET_NAMES as readonly string[]).includes(v);
}

/**
 * Reads the state file. A missing file gives `null`; an unreadable one (a directory, no
 * permission) or a corrupt one is reported through `onInvalid` and also gives `null` (the service
 * then starts from its flags rather than refusing to start). Fields that are missing are left out;
 * an invalid one is left out and reported. Unknown fields are ignored (a newer version's).
 */
export function readControlState(
  path: string,
  onInvalid: (message: string) => void,
): Partial<ControlState> | null {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) {
      onInvalid(`Cannot read state file "${path}": ${(e as Error).message}`);
    }
    return null;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    onInvalid(`Cannot read state file "${path}": ${(e as Error).message}`);
    return null;
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    onInvalid(`Cannot read state file "${path}": expected a JSON object`);
    return null;
  }
  const r = raw as Record<string, unknown>;
  const out: Partial<ControlState> = {};
  // A field present with a value this version cannot use is said, not silently replaced by
  // the flags' value (a hand edit "Ultra" for "ultra" would otherwise look like a lost setting).
  const invalid = (k: string, expected: string) =>
    onInvalid(
      `Ignoring ${k} ${JSON.stringify(r[k])} in state file "${path}": expected ${expected}`,
    );
  for (const k of ["outputPreset", "microphonePreset"] as const) {
    const v = r[k];
    if (isPreset(v)) out[k] = v;
    else if (v !== undefined) invalid(k, `one of ${PRESET_NAMES.join(", ")}`);
  }
  for (const k of ["muted", "outputRunning", "microphoneRunning"] as const) {
    const v = r[k];
    if (typeof v === "boolean") out[k] = v;
    else if (v !== undefined) invalid(k, "true or false");
  }
  return out;
}

/**
 * Writes the state file atomically and durably: a temporary file in the same directory, flushed
 * to disk, renamed over the old file, and the directory flushed — a power cut leaves the old state
 * or the new one, never an empty file. (Control changes are operator actions, a few a minute at
 * most: two `fsync`s each cost nothing that matters.)
 */
export function writeControlState(path: string, state: ControlState): void {
  const tmp = `${path}.${Deno.pid}.tmp`;
  const bytes = new TextEncoder().encode(JSON.stringify(state, null, 2) + "\n");
  try {
    {
      using f = Deno.openSync(tmp, { write: true, create: true, truncate: true });
      for (let at = 0; at < bytes.length;) at += f.writeSync(bytes.subarray(at));
      f.syncSync();
    }
    Deno.renameSync(tmp, path);
  } catch (e) {
    // A full disk or a vanished directory: leave no half-written temporary file behind.
    try {
      Deno.removeSync(tmp);
    } catch {
      // Never created.
    }
    throw e;
  }
  try {
    using d = Deno.openSync(dirname(path), { read: true });
    d.syncSync();
  } catch {
    // A directory that cannot be opened or flushed (some file systems): the rename stands.
  }
}
