/**
 * The C library calls the bindings need besides libasound and libopus: `poll` for the PCM waits
 * (ffi/alsa.ts) and the UDP socket calls (ffi/udp.ts) — one symbol table, one handle on libc.
 *
 * Linux only; the declarations are the same on x86_64 and aarch64.
 *
 * @module
 */

import { cString, openLibrary } from "./library.ts";

const symbols = {
  // int poll(struct pollfd *fds, nfds_t nfds, int timeout);   nfds_t is unsigned long
  poll: { parameters: ["buffer", "usize", "i32"], result: "i32" },
  // int socket(int domain, int type, int protocol);
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // int bind(int fd, const struct sockaddr *addr, socklen_t len);
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  // int getsockname(int fd, struct sockaddr *addr, socklen_t *len);
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  // ssize_t recv(int fd, void *buf, size_t n, int flags);
  // Declared as returning int: the result is at most 65,535 or -1, which the low 32 bits of the
  // return register hold exactly on x86_64 and aarch64 — and an i32 is a JS number, where a
  // 64-bit result would be a BigInt allocated per datagram.
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  // ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *to,
  //                socklen_t len);   int result, as recv
  sendto: { parameters: ["i32", "buffer", "usize", "i32", "buffer", "u32"], result: "i32" },
  // int ioctl(int fd, unsigned long request, ...);   variadic: one pointer argument, declared
  // with a fixed signature (integer and pointer arguments pass alike on x86_64 and aarch64).
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  // int clock_gettime(clockid_t clk, struct timespec *tp);
  clock_gettime: { parameters: ["i32", "buffer"], result: "i32" },
  // void free(void *ptr);   for what libasound allocates for its caller (snd_pcm_get_chmap)
  free: { parameters: ["pointer"], result: "void" },
  // int close(int fd);
  close: { parameters: ["i32"], result: "i32" },
  // int *__errno_location(void);   the calling thread's errno
  __errno_location: { parameters: [], result: "pointer" },
  // unsigned int if_nametoindex(const char *ifname);   an IPv6 zone ("fe80::1%eth0") → scope id
  if_nametoindex: { parameters: ["buffer"], result: "u32" },
  // char *strerror(int errnum);
  strerror: { parameters: ["i32"], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

let lib: Deno.DynamicLibrary<typeof symbols> | undefined;

/** The C library's symbols, opened on first use (`KVM_AUDIO_LIBC` names another file). */
export function libc(): Deno.DynamicLibrary<typeof symbols>["symbols"] {
  lib ??= openLibrary(
    { name: "libc", envVar: "KVM_AUDIO_LIBC", candidates: ["libc.so.6", "libc.so"] },
    symbols,
  );
  return lib.symbols;
}

/** This thread's `errno` cell: its address is fixed for the thread's life. */
let errnoCell: Deno.UnsafePointerView | null = null;

/** The calling thread's `errno` (read right after the failed call). */
export function errno(): number {
  if (errnoCell === null) {
    const p = libc().__errno_location();
    if (p === null) return 0;
    errnoCell = new Deno.UnsafePointerView(p);
  }
  return errnoCell.getInt32();
}

/** `errno` values (Linux, every architecture). */
export const ERRNO = { EAGAIN: 11, EACCES: 13, ENOBUFS: 105 } as const;

/** The text of an `errno` value, e.g. "Address already in use". */
export function errnoText(code: number): string {
  return cString(libc().strerror(code));
}
