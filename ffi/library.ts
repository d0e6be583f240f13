/**
 * Opening a native shared library: an environment override first, then a short list of
 * candidate sonames. When nothing loads, one error lists every path tried and names the variable.
 *
 * @module
 */

/** Thrown when none of a library's candidate paths could be opened. */
export class LibraryNotFoundError extends Error {
  override name = "LibraryNotFoundError";
  /** Every path that was tried, in order, with the loader's reason for each. */
  readonly tried: readonly { path: string; reason: string }[];

  constructor(library: string, envVar: string, tried: { path: string; reason: string }[]) {
    super(
      `Cannot load ${library}: tried ${
        tried.map((t) => `"${t.path}" (${t.reason})`).join(", ")
      }; install it or set ${envVar} to its path`,
    );
    this.tried = tried;
  }
}

/** Where to look for one native library. */
export interface LibrarySpec {
  /** Human name used in errors, e.g. "libopus". */
  readonly name: string;
  /** Environment variable whose value, when set, is the only path tried. */
  readonly envVar: string;
  /** Sonames or paths tried in order when the variable is unset. */
  readonly candidates: readonly string[];
}

function envOverride(envVar: string): string | undefined {
  try {
    const v = Deno.env.get(envVar);
    return v === undefined || v === "" ? undefined : v;
  } catch (e) {
    // Without --allow-env the override cannot be read; the candidates still can be tried.
    if (e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied) {
      return undefined;
    }
    throw e;
  }
}

/**
 * Opens the first loadable candidate of `spec` with the symbol table `symbols`.
 *
 * A `PermissionDenied`/`NotCapable` error (no `--allow-ffi`) is rethrown unchanged; any other
 * failure moves on to the next candidate and ends in a {@link LibraryNotFoundError}.
 */
export function openLibrary<const S extends Deno.ForeignLibraryInterface>(
  spec: LibrarySpec,
  symbols: S,
): Deno.DynamicLibrary<S> {
  const override = envOverride(spec.envVar);
  const paths = override !== undefined ? [override] : spec.candidates;
  const tried: { path: string; reason: string }[] = [];
  for (const path of paths) {
    try {
      return Deno.dlopen(path, symbols);
    } catch (e) {
      if (e instanceof Deno.errors.PermissionDenied || e instanceof Deno.errors.NotCapable) {
        throw e;
      }
      tried.push({ path, reason: e instanceof Error ? e.message.split("\n")[0]! : String(e) });
    }
  }
  throw new LibraryNotFoundError(spec.name, spec.envVar, tried);
}

/** Reads a NUL-terminated C string returned by a native call; `null` gives "". */
export function cString(ptr: Deno.PointerValue): string {
  return ptr === null ? "" : Deno.UnsafePointerView.getCString(ptr);
}

/**
 * The orphan token of a native object: its address as a bigint, 0n when there is none. A worker
 * that may be retired while holding native state publishes the tokens of what it holds in shared
 * memory, so that another thread can take them over and free them (`Pcm.closeOrphan`,
 * `OpusEncoder.destroyOrphan`, …).
 */
export function orphanToken(ptr: Deno.PointerObject | null): bigint {
  return ptr === null ? 0n : BigInt(Deno.UnsafePointer.value(ptr));
}

/**
 * The pointer behind an orphan token, checked to be a positive bigint. Only use it once the
 * thread that made the object no longer uses it and the token was not cleared by a `close()`.
 */
export function orphanPointer(token: bigint): Deno.PointerObject | null {
  if (typeof token !== "bigint" || token <= 0n) {
    throw new RangeError(`Invalid orphan token ${String(token)}: expected a positive bigint`);
  }
  return Deno.UnsafePointer.create(token);
}

/** What the finalizer of a {@link NativeState} frees. */
interface Held {
  readonly ptr: Deno.PointerObject;
  readonly free: (ptr: Deno.PointerObject) => void;
}

const forgotten = new FinalizationRegistry<Held>((h) => h.free(h.ptr));

/**
 * Native state owned by one JavaScript object (a codec, a resampler): freed by `close()` or
 * `using`, by the garbage collector when forgotten, or — from another thread, once the owning
 * thread was terminated — through its {@link NativeState.orphanToken}. Subclasses pass the C
 * destructor and a name for errors.
 */
export abstract class NativeState implements Disposable {
  #ptr: Deno.PointerObject | null;
  readonly #free: (ptr: Deno.PointerObject) => void;
  readonly #kind: string;

  protected constructor(
    ptr: Deno.PointerObject,
    free: (ptr: Deno.PointerObject) => void,
    kind: string,
  ) {
    this.#ptr = ptr;
    this.#free = free;
    this.#kind = kind;
    forgotten.register(this, { ptr, free }, this);
  }

  /** The native pointer; a TypeError ("Cannot <action> with a closed <kind>") once closed. */
  protected live(action: string): Deno.PointerObject {
    const ptr = this.#ptr;
    if (ptr === null) throw new TypeError(`Cannot ${action} with a closed ${this.#kind}`);
    return ptr;
  }

  /** Whether {@link close} has been called. */
  get closed(): boolean {
    return this.#ptr === null;
  }

  /** This object's orphan token (0n once closed): see {@link orphanToken}. */
  get orphanToken(): bigint {
    return orphanToken(this.#ptr);
  }

  /** Frees the native state. Idempotent. */
  close(): void {
    const ptr = this.#ptr;
    if (ptr === null) return;
    this.#ptr = null;
    forgotten.unregister(this);
    this.#free(ptr);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
