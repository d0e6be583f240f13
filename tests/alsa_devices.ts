/**
 * Named virtual ALSA PCMs for tests: writes a private ALSA configuration and says how to make a
 * process (or worker) see it.
 *
 * How libasound picks up `ALSA_CONFIG_PATH` (checked with alsa-lib 1.2.8):
 * - The configuration is read lazily, inside `snd_pcm_open` (through `snd_config_update`), not
 *   when the library is loaded. `ALSA_CONFIG_PATH` is read from the process environment at every
 *   open, so `Deno.env.set("ALSA_CONFIG_PATH", …)` before an open is enough — also after other
 *   PCMs were opened, also from the main thread for a worker that opens later (workers share the
 *   process environment). PCMs already open are not affected by a switch.
 * - The configuration is re-read only when the list of files or a file's device, inode or
 *   modification time (whole seconds) changed. Rewriting a file in place within the same second is
 *   NOT noticed: always write a new file (these helpers do) instead of editing one.
 * - `ALSA_CONFIG_PATH` replaces the whole configuration. With `includeSystem` (the default) the
 *   system's `/usr/share/alsa/alsa.conf` comes first, so `file:FILE=…`, `null`, `hw:…` keep
 *   working; without it the file is self-contained: it defines its own minimal `null`,
 *   `file:FILE=…,FORMAT=…` and `hw:CARD,DEV` next to the PCMs asked for, and nothing else exists.
 * - Under qemu on aarch64 (scripts/test-arm64.sh) the system configuration cannot be loaded at
 *   all: `/etc/alsa/conf.d/99-pulse.conf` runs a hook from `libasound_module_conf_pulse.so`
 *   (libasound2-plugins, installed for x86_64 only), and the failed hook makes every
 *   `snd_pcm_open` fail with ENOENT, even for PCMs defined in a later file. With `KVM_AUDIO_TEST_SELF_CONTAINED_ALSA=1`
 *   every configuration written here is self-contained whatever `includeSystem` says, and
 *   {@link SELF_CONTAINED_ALSA} lets tests that need the PulseAudio plugin skip themselves.
 * - A child process gets the configuration through its environment: pass `config.env`.
 *
 * @module
 */

/** The system configuration that defines the standard PCMs (`hw`, `null`, `file`, …). */
export const SYSTEM_ALSA_CONFIG = "/usr/share/alsa/alsa.conf";

/** The environment variable that makes every configuration self-contained (see the module notes). */
export const SELF_CONTAINED_ALSA_ENV = "KVM_AUDIO_TEST_SELF_CONTAINED_ALSA";

function selfContainedFromEnv(): boolean {
  try {
    return Deno.env.get(SELF_CONTAINED_ALSA_ENV) === "1";
  } catch (e) {
    // Without --allow-env the variable cannot be read: behave as on a normal host.
    if (e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied) {
      return false;
    }
    throw e;
  }
}

/**
 * True when `KVM_AUDIO_TEST_SELF_CONTAINED_ALSA=1` (aarch64 under qemu): the system ALSA
 * configuration and the PulseAudio ALSA plugin cannot be loaded, so every configuration written
 * here is self-contained, and a test of `pulse` PCMs can skip itself (`ignore: SELF_CONTAINED_ALSA`).
 */
export const SELF_CONTAINED_ALSA: boolean = selfContainedFromEnv();

/**
 * The standard PCMs the tests open by name, for a self-contained configuration: `null`,
 * `file:FILE=…[,FORMAT=…]` over `null`, and `hw:CARD[,DEV[,SUBDEV]]` (so a missing card fails
 * as it does with the system configuration).
 */
const STANDARD_PCMS = [
  "pcm.null {",
  "  type null",
  "}",
  "",
  "pcm.file {",
  "  @args [ FILE FORMAT ]",
  "  @args.FILE { type string }",
  '  @args.FORMAT { type string default "raw" }',
  "  type file",
  "  slave.pcm null",
  "  file $FILE",
  "  format $FORMAT",
  "  truncate true",
  "}",
  "",
  "pcm.hw {",
  "  @args [ CARD DEV SUBDEV ]",
  "  @args.CARD { type string }",
  "  @args.DEV { type integer default 0 }",
  "  @args.SUBDEV { type integer default -1 }",
  "  type hw",
  "  card $CARD",
  "  device $DEV",
  "  subdevice $SUBDEV",
  "}",
  "",
].join("\n");

/**
 * One named PCM.
 * - `file`: the `file` plugin. Playback writes raw S16_LE samples to `outfile`; capture serves
 *   `infile` (past its end, reads succeed but leave the buffer untouched — stop at its length).
 *   Without `slave` it runs over a `null` PCM: no pacing at all. With `slave` (the name of a PCM
 *   defined in the same configuration, e.g. a pulse one) it is clocked by that PCM.
 * - `pulse`: a PulseAudio sink or source (`device`) of the server at `server`
 *   (e.g. "unix:/tmp/x/pulse.sock"): paced like hardware.
 */
export type PcmDefinition =
  | {
    type: "file";
    infile?: string;
    outfile?: string;
    slave?: string;
    /** Channel positions the (null) slave reports, e.g. "FC,FL,FR,RL,RR,LFE". */
    chmap?: string;
  }
  | { type: "pulse"; server: string; device: string };

/** A written ALSA configuration. */
export interface AlsaConfig {
  /** The file written. */
  readonly file: string;
  /** The value for `ALSA_CONFIG_PATH`. */
  readonly configPath: string;
  /** Environment for a child process: `{ ALSA_CONFIG_PATH }`. */
  readonly env: { ALSA_CONFIG_PATH: string };
  /** The PCM names defined. */
  readonly names: readonly string[];
}

function configString(what: string, value: string): string {
  if (typeof value !== "string" || value.length === 0 || /["\\\n\r\0]/.test(value)) {
    throw new RangeError(
      `Invalid ${what} ${JSON.stringify(value)}: expected a non-empty string without quotes, ` +
        `backslashes or line breaks`,
    );
  }
  return `"${value}"`;
}

function pcmName(name: string): string {
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
    throw new RangeError(
      `Invalid PCM name ${JSON.stringify(name)}: expected letters, digits and underscores`,
    );
  }
  return name;
}

/** The text of an ALSA configuration defining `pcms` (name → definition). */
export function alsaConfigText(pcms: Readonly<Record<string, PcmDefinition>>): string {
  const lines = ["# Written by kvm-audio tests/alsa_devices.ts", ""];
  for (const [name, def] of Object.entries(pcms)) {
    lines.push(`pcm.${pcmName(name)} {`);
    if (def.type === "pulse") {
      lines.push("  type pulse");
      lines.push(`  server ${configString("pulse server", def.server)}`);
      lines.push(`  device ${configString("pulse device", def.device)}`);
    } else if (def.type === "file") {
      if (def.infile === undefined && def.outfile === undefined) {
        throw new TypeError(`Invalid file PCM ${JSON.stringify(name)}: expected infile or outfile`);
      }
      lines.push("  type file");
      const chmap = def.chmap === undefined
        ? ""
        : ` chmap [ ${configString("channel map", def.chmap)} ]`;
      lines.push(
        def.slave === undefined
          ? `  slave.pcm { type null${chmap} }`
          : `  slave.pcm ${configString("slave PCM", pcmName(def.slave))}`,
      );
      // The plugin insists on an output file; capture-only PCMs discard theirs.
      lines.push(`  file ${configString("outfile", def.outfile ?? "/dev/null")}`);
      if (def.infile !== undefined) lines.push(`  infile ${configString("infile", def.infile)}`);
      lines.push("  format raw");
      lines.push("  truncate true");
    } else {
      throw new TypeError(
        `Invalid PCM definition ${JSON.stringify(def)}: expected type "file" or "pulse"`,
      );
    }
    lines.push("}", "");
  }
  return lines.join("\n");
}

let serial = 0;

/**
 * Writes a configuration defining `pcms` into directory `dir`, under a file name not used
 * before (so libasound notices the change; see the module notes), and returns how to use it.
 * With `includeSystem: false`, or always when {@link SELF_CONTAINED_ALSA}, the file is
 * self-contained: it also defines `null`, `file:FILE=…` and `hw:…` itself.
 */
export async function writeAlsaConfig(
  dir: string,
  pcms: Readonly<Record<string, PcmDefinition>>,
  { includeSystem = true }: { includeSystem?: boolean } = {},
): Promise<AlsaConfig> {
  const system = includeSystem && !SELF_CONTAINED_ALSA;
  const text = system ? alsaConfigText(pcms) : `${alsaConfigText(pcms)}\n${STANDARD_PCMS}`;
  const file = `${dir}/asound-${Deno.pid}-${++serial}-${Date.now()}.conf`;
  await Deno.writeTextFile(file, text);
  const configPath = system ? `${SYSTEM_ALSA_CONFIG}:${file}` : file;
  return { file, configPath, env: { ALSA_CONFIG_PATH: configPath }, names: Object.keys(pcms) };
}

/**
 * Makes this process (and its workers) use `config` for every later `Pcm.open`. Returns a
 * disposer that restores the previous value of `ALSA_CONFIG_PATH`.
 */
export function useAlsaConfig(config: AlsaConfig): Disposable {
  const previous = Deno.env.get("ALSA_CONFIG_PATH");
  Deno.env.set("ALSA_CONFIG_PATH", config.configPath);
  return {
    [Symbol.dispose]() {
      if (previous === undefined) Deno.env.delete("ALSA_CONFIG_PATH");
      else Deno.env.set("ALSA_CONFIG_PATH", previous);
    },
  };
}

/**
 * Writes `samples` (interleaved 16-bit, as the capture is asked for) to `dir`/in.raw and makes
 * it the capture PCM `kvm_test_capture` — the `file` plugin, unpaced — of every later
 * `Pcm.open` until the result is disposed.
 */
export async function useCaptureFile(dir: string, samples: Int16Array): Promise<Disposable> {
  await writeRaw(`${dir}/in.raw`, samples);
  return useAlsaConfig(
    await writeAlsaConfig(dir, { kvm_test_capture: { type: "file", infile: `${dir}/in.raw` } }),
  );
}

/** Writes `samples` as a raw S16_LE file (little-endian hosts: x86_64, aarch64) (the format the `file` plugin reads and writes). */
export async function writeRaw(path: string, samples: Int16Array): Promise<void> {
  await Deno.writeFile(
    path,
    new Uint8Array(samples.buffer, samples.byteOffset, samples.byteLength),
  );
}

/** Reads a raw S16_LE file into an Int16Array. */
export async function readRaw(path: string): Promise<Int16Array> {
  const bytes = await Deno.readFile(path);
  const n = Math.floor(bytes.byteLength / 2);
  return new Int16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + n * 2));
}
