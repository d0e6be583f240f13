/**
 * UDP through the C library, called synchronously. The RTP sender sends each packet in the turn
 * that handed its frame over (`node:dgram` completes every send in a later event-loop turn: one
 * more wake-up of the main thread per packet). And the input worker, which cannot wait on Deno's
 * event loop, reads RTP input itself, without waking the main thread for every packet. The main
 * thread binds the socket ({@link UdpSocket.open}) and lends its descriptor to the worker, which
 * reads it with {@link UdpSocket.borrow}: non-blocking `recv` whenever it wakes for the device, and
 * the kernel's arrival time of each datagram (`SIOCGSTAMPNS`), so that jitter is measured as the
 * packets came, not as the worker found them.
 *
 * Linux only; every constant used is the same on x86_64 and aarch64.
 *
 * @module
 */

import { ERRNO, errno, errnoText, libc } from "./libc.ts";

export { ERRNO, errnoText };

/**
 * 4 or 6 for an IPv4 or IPv6 address literal, 0 otherwise. (Not `node:net`'s `isIP`: that import
 * alone takes the input worker 1.5 s to load under qemu, ≈ 30× this whole module.)
 */
function ipFamily(address: string): 0 | 4 | 6 {
  if (/^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.test(address)) {
    return address.split(".").every((b) => Number(b) <= 255) ? 4 : 0;
  }
  const text = address.split("%")[0]!;
  if (!/^[0-9a-fA-F:.]+$/.test(text) || !text.includes(":")) return 0;
  const tail = /:(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (tail !== null && ipFamily(tail[1]!) !== 4) return 0;
  const groups = (tail === null ? text : text.slice(0, -tail[1]!.length - 1)).split("::");
  if (groups.length > 2) return 0;
  const parts = groups.flatMap((g) => g === "" ? [] : g.split(":"));
  if (!parts.every((g) => /^[0-9a-fA-F]{1,4}$/.test(g))) return 0;
  const count = parts.length + (tail === null ? 0 : 2);
  return (groups.length === 2 ? count <= 7 : count === 8) ? 6 : 0;
}

const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_DGRAM = 2;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const MSG_DONTWAIT = 0x40;
const SIOCGSTAMPNS = 0x8907n;
const CLOCK_REALTIME = 0;
/** A failed socket call. */
export class UdpError extends Error {
  override name = "UdpError";
  /** The `errno` value. */
  readonly code: number;

  constructor(fn: string, code: number, where: string) {
    super(`${fn} failed for ${where}: ${errnoText(code)} (errno ${code})`);
    this.code = code;
  }
}

/** Bytes of an IPv6 address literal (`::1`, `fe80::1`, `::ffff:192.0.2.1`, …). */
function ipv6Bytes(address: string): Uint8Array {
  const out = new Uint8Array(16);
  let text = address.split("%")[0]!;
  // An embedded IPv4 tail becomes two groups.
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4 !== null) {
    const b = v4[1]!.split(".").map(Number);
    text = text.slice(0, -v4[1]!.length) +
      `${((b[0]! << 8) | b[1]!).toString(16)}:${((b[2]! << 8) | b[3]!).toString(16)}`;
  }
  const [head, tail] = text.includes("::") ? text.split("::") : [text, undefined];
  const groups = (s: string | undefined) => s === undefined || s === "" ? [] : s.split(":");
  const h = groups(head), t = groups(tail);
  const all = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill("0"), ...t];
  all.forEach((g, i) => {
    const v = parseInt(g, 16);
    out[i * 2] = v >> 8;
    out[i * 2 + 1] = v & 0xff;
  });
  return out;
}

/**
 * A `struct sockaddr_in`/`sockaddr_in6` for an IP address literal and port.
 *
 * @throws {RangeError} when `address` is not an IP literal or `port` not 0–65535
 */
export function socketAddress(address: string, port: number): Uint8Array {
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new RangeError(
      `Invalid port ${JSON.stringify(port)}: expected an integer from 0 to 65535`,
    );
  }
  const family = ipFamily(address);
  if (family === 0) {
    throw new RangeError(`Invalid address "${address}": expected an IPv4 or IPv6 literal`);
  }
  const sa = new Uint8Array(family === 4 ? 16 : 28);
  const v = new DataView(sa.buffer);
  v.setUint16(0, family === 4 ? AF_INET : AF_INET6, true);
  v.setUint16(2, port, false);
  if (family === 4) sa.set(address.split(".").map(Number), 4);
  else {
    sa.set(ipv6Bytes(address), 8);
    v.setUint32(24, scopeId(address), true);
  }
  return sa;
}

/**
 * `sin6_scope_id` of an IPv6 literal: its zone (`fe80::1%eth0`, or `%2`) as an interface index, 0
 * without one. A link-local address is ambiguous without it: Linux refuses to send to one with
 * scope 0 (EINVAL), so the zone was dropped at the cost of every packet.
 *
 * @throws {RangeError} when the zone names no interface of this machine
 */
function scopeId(address: string): number {
  const at = address.indexOf("%");
  if (at < 0) return 0;
  const zone = address.slice(at + 1);
  if (/^[0-9]+$/.test(zone)) {
    const index = Number(zone);
    if (index > 0xffffffff) {
      throw new RangeError(`Invalid address "${address}": zone ${zone} is not an interface index`);
    }
    return index;
  }
  const index = libc().if_nametoindex(new TextEncoder().encode(zone + "\0"));
  if (index === 0) {
    throw new RangeError(
      `Invalid address "${address}": no network interface "${zone}" on this machine`,
    );
  }
  return index;
}

/** Milliseconds in a `struct timespec` (two 64-bit words, read as 32-bit halves: no BigInt). */
function timespecMs(w: Uint32Array): number {
  return (w[1]! * 4294967296 + w[0]!) * 1000 + w[2]! / 1e6;
}

const clockWords = new Uint32Array(4);

/** `CLOCK_REALTIME` in epoch milliseconds (the clock of kernel arrival times). */
export function realtimeMs(): number {
  libc().clock_gettime(CLOCK_REALTIME, clockWords);
  return timespecMs(clockWords);
}

const leaked = new FinalizationRegistry<number>((fd) => {
  libc().close(fd);
});

/**
 * A non-blocking UDP socket of the C library. One thread owns it ({@link UdpSocket.open}, and
 * {@link close} when done); another may read it through {@link UdpSocket.borrow} while the owner
 * keeps it open.
 */
export class UdpSocket {
  #fd: number;
  readonly #owned: boolean;
  readonly #stamp = new Uint32Array(4);
  readonly #sizes = new Map<number, bigint>();

  private constructor(fd: number, owned: boolean) {
    this.#fd = fd;
    this.#owned = owned;
    if (owned) leaked.register(this, fd, this);
  }

  /**
   * Opens a socket bound to `address` (an IP literal) and `port` (0: a free one).
   *
   * @throws {RangeError} for a bad address or port
   * @throws {UdpError} when the socket cannot be made or bound (e.g. the port is in use)
   */
  static open(address: string, port: number): UdpSocket {
    const sa = socketAddress(address, port);
    const c = libc();
    const fd = c.socket(
      ipFamily(address) === 4 ? AF_INET : AF_INET6,
      SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
      0,
    );
    if (fd < 0) throw new UdpError("socket", errno(), address);
    if (c.bind(fd, sa, sa.length) < 0) {
      const code = errno();
      c.close(fd);
      throw new UdpError(
        "bind",
        code,
        `${ipFamily(address) === 6 ? `[${address}]` : address}:${port}`,
      );
    }
    const socket = new UdpSocket(fd, true);
    // The first SIOCGSTAMPNS switches the kernel's receive timestamps on; datagrams queued before
    // that carry none (the kernel would answer with the time of asking).
    socket.arrivalMs();
    return socket;
  }

  /** A reader of a descriptor another thread owns (its {@link close} does nothing). */
  static borrow(fd: number): UdpSocket {
    if (!Number.isInteger(fd) || fd < 0) {
      throw new RangeError(`Invalid socket descriptor ${fd}: expected an integer of 0 or more`);
    }
    return new UdpSocket(fd, false);
  }

  /** The descriptor, to lend to another thread; -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /** The bound port. */
  get port(): number {
    const sa = new Uint8Array(28);
    const len = new Uint32Array([sa.length]);
    if (libc().getsockname(this.#fd, sa, len) < 0) {
      throw new UdpError("getsockname", errno(), `descriptor ${this.#fd}`);
    }
    return (sa[2]! << 8) | sa[3]!;
  }

  /**
   * Reads one waiting datagram into `buffer` without waiting: its length (a longer one is cut to
   * the buffer), or a negative `errno` — `-EAGAIN` when none is waiting.
   */
  receive(buffer: Uint8Array): number {
    const n = libc().recv(this.#fd, buffer, this.#size(buffer.length), MSG_DONTWAIT);
    return n >= 0 ? n : -errno();
  }

  /**
   * Sends one datagram to `to` (from {@link socketAddress}) without waiting: the bytes sent, or
   * a negative `errno` (`-EAGAIN`/`-ENOBUFS`: the kernel's buffer is full). Allocates nothing
   * after the first datagram of each length.
   */
  sendTo(data: Uint8Array, to: Uint8Array): number {
    const n = libc().sendto(this.#fd, data, this.#size(data.length), MSG_DONTWAIT, to, to.length);
    return n >= 0 ? n : -errno();
  }

  /** `size_t` arguments are BigInts: one per length ever used, then reused. */
  #size(n: number): bigint {
    let size = this.#sizes.get(n);
    if (size === undefined) this.#sizes.set(n, size = BigInt(n));
    return size;
  }

  /**
   * When the kernel received the datagram {@link receive} returned last, in epoch milliseconds
   * (`CLOCK_REALTIME`); NaN when it cannot say. {@link UdpSocket.open} switches the kernel's
   * timestamps on (the first call does).
   */
  arrivalMs(): number {
    if (libc().ioctl(this.#fd, SIOCGSTAMPNS, this.#stamp) < 0) return NaN;
    return timespecMs(this.#stamp);
  }

  /** Closes an owned socket (idempotent); a borrowed one is left to its owner. */
  close(): void {
    if (this.#fd < 0) return;
    if (this.#owned) {
      leaked.unregister(this);
      libc().close(this.#fd);
    }
    this.#fd = -1;
  }
}
