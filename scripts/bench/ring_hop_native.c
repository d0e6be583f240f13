/*
 * The floor under scripts/bench/ring_hop.ts: the one-way latency of handing a frame from one
 * thread to another that sleeps until it comes, in C — a shared slot, a sequence word and the
 * Linux futex, the mechanism `Atomics.wait`/`Atomics.notify` stand on. The producer copies a
 * frame into the slot with its send time (CLOCK_MONOTONIC), publishes the sequence and wakes
 * the consumer, then sleeps the interval; the consumer, blocked in FUTEX_WAIT while nothing is
 * new, takes the arrival time and records the difference.
 *
 * Usage: ring_hop_native FRAMES INTERVAL_MS FRAME_BYTES WARMUP
 * Prints "<median µs> <p99 µs>" over the frames after the first WARMUP.
 *
 * Build: cc -O2 -std=c11 -Wall -o ring_hop_native ring_hop_native.c -lpthread
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static _Atomic uint32_t published; /* frames published so far */
static _Atomic int64_t sent_ns;    /* send time of the newest frame */
static unsigned char slot[4096];
static unsigned char received[4096];
static int frames, frame_bytes;
static double *latency_us;

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *consumer(void *arg) {
  (void)arg;
  uint32_t seen = 0;
  while ((int)seen < frames) {
    uint32_t p = atomic_load(&published);
    if (p == seen) {
      syscall(SYS_futex, &published, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
      continue;
    }
    int64_t arrived = now_ns();
    memcpy(received, slot, (size_t)frame_bytes);
    latency_us[p - 1] = (double)(arrived - atomic_load(&sent_ns)) / 1000.0;
    seen = p;
  }
  return NULL;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "Usage: ring_hop_native FRAMES INTERVAL_MS FRAME_BYTES WARMUP\n");
    return 2;
  }
  frames = atoi(argv[1]);
  const double interval_ms = atof(argv[2]);
  frame_bytes = atoi(argv[3]);
  const int warmup = atoi(argv[4]);
  if (frames <= warmup || warmup < 0 || interval_ms < 0 || frame_bytes <= 0 ||
      frame_bytes > (int)sizeof slot) {
    fprintf(stderr, "ring_hop_native: FRAMES > WARMUP >= 0, INTERVAL_MS >= 0, 0 < FRAME_BYTES <= 4096\n");
    return 2;
  }
  latency_us = calloc((size_t)frames, sizeof *latency_us);
  for (int i = 0; i < frames; i++) latency_us[i] = -1;
  pthread_t t;
  pthread_create(&t, NULL, consumer, NULL);
  usleep(20000); /* let the consumer block */

  const struct timespec gap = {
      .tv_sec = (time_t)(interval_ms / 1000),
      .tv_nsec = (long)((interval_ms - 1000 * (time_t)(interval_ms / 1000)) * 1e6),
  };
  for (int i = 0; i < frames; i++) {
    for (int b = 0; b < frame_bytes; b++) slot[b] = (unsigned char)(i + b * 31);
    atomic_store(&sent_ns, now_ns());
    atomic_store(&published, (uint32_t)i + 1);
    syscall(SYS_futex, &published, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    if (interval_ms > 0) nanosleep(&gap, NULL);
  }
  pthread_join(t, NULL);

  /* Frames the consumer skipped (flat out) have no latency; count those it took. */
  int n = 0;
  for (int i = warmup; i < frames; i++) {
    if (latency_us[i] >= 0) latency_us[n++] = latency_us[i];
  }
  qsort(latency_us, (size_t)n, sizeof *latency_us, by_value);
  printf("%.3f %.3f\n", latency_us[n / 2], latency_us[(int)(0.99 * n) < n ? (int)(0.99 * n) : n - 1]);
  return 0;
}
