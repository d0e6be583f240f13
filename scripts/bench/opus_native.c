/*
 * Native baseline for scripts/bench/opus_codec.ts: the same libopus, the same settings and the
 * same loops as the FFI side, in plain C.
 *
 *   opus_native BITRATE CHANNELS FRAME_SAMPLES COMPLEXITY VBR VBR_CONSTRAINT SIGNAL
 *               MAX_BANDWIDTH DTX FEC LOSS_PERC APPLICATION FRAMES INPUT.raw
 *
 * SIGNAL, MAX_BANDWIDTH and APPLICATION are the libopus constants (e.g. 3002, 1105, 2049);
 * INPUT.raw is interleaved native-endian int16 PCM at 48 kHz, a whole number of frames, read
 * frame by frame; frame i is the input's frame i modulo its length.
 *
 * 1. Collection pass (also the warm-up): a fresh encoder encodes frames 0 to FRAMES-1; the
 *    packets are kept and hashed (FNV-1a over each packet's length and bytes), then a fresh
 *    decoder decodes them and the PCM is hashed (FNV-1a over the samples as uint16). One JSON
 *    line reports {version, frames, packetBytes, packetHash, pcmHash}.
 * 2. Then one timed chunk per line read from stdin, so the caller can interleave its own runs
 *    with these at a fine grain:
 *    "encode FROM COUNT" — encodes frames FROM to FROM+COUNT-1 into one reused buffer;
 *    "decode FROM COUNT" — decodes kept packets FROM to FROM+COUNT-1 (packet i is kept packet
 *    i modulo FRAMES) into one reused buffer.
 *    FROM 0 starts a fresh encoder (decoder); later chunks must continue where the previous one
 *    of the same kind ended. Each prints {wallNs, processNs, threadNs, count}:
 *    CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID and CLOCK_THREAD_CPUTIME_ID nanoseconds (the
 *    last two agree here: the program has one thread), and the packet bytes or samples per
 *    channel produced. Encoders and decoders are created outside the timed region. End of input ends
 *    the program.
 */

#define _POSIX_C_SOURCE 200809L

#include <opus/opus.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SAMPLE_RATE 48000
#define MAX_PACKET (1275 * 3 + 7)

#define FNV_OFFSET 2166136261u
#define FNV_PRIME 16777619u

static void die(const char *what, const char *detail) {
  fprintf(stderr, "opus_native: %s: %s\n", what, detail);
  exit(1);
}

static long arg_int(char **argv, int i, const char *what, long lo, long hi) {
  char *end = NULL;
  errno = 0;
  long v = strtol(argv[i], &end, 10);
  if (errno != 0 || end == argv[i] || *end != '\0' || v < lo || v > hi) {
    fprintf(stderr, "opus_native: invalid %s \"%s\": expected an integer %ld to %ld\n", what,
            argv[i], lo, hi);
    exit(2);
  }
  return v;
}

static int64_t now_ns(clockid_t clock) {
  struct timespec ts;
  if (clock_gettime(clock, &ts) != 0) die("clock_gettime", strerror(errno));
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint32_t fnv_byte(uint32_t h, uint32_t b) { return (h ^ (b & 0xffu)) * FNV_PRIME; }

/* Packet hash: each packet's length (two bytes, little end first), then its bytes. */
static uint32_t fnv_packet(uint32_t h, const unsigned char *p, int32_t len) {
  h = fnv_byte(h, (uint32_t)len);
  h = fnv_byte(h, (uint32_t)len >> 8);
  for (int32_t i = 0; i < len; i++) h = fnv_byte(h, p[i]);
  return h;
}

/* PCM hash: each sample as an unsigned 16-bit value. */
static uint32_t fnv_pcm(uint32_t h, const opus_int16 *pcm, int n) {
  for (int i = 0; i < n; i++) h = (h ^ (uint16_t)pcm[i]) * FNV_PRIME;
  return h;
}

struct settings {
  int bitrate, channels, frame, complexity, vbr, vbr_constraint, signal, max_bandwidth, dtx, fec,
      loss, application;
};

static void ctl(int rc, const char *what) {
  if (rc != OPUS_OK) die(what, opus_strerror(rc));
}

/* A fresh encoder with every setting applied in the order ffi/opus.ts applies them. */
static OpusEncoder *new_encoder(const struct settings *s) {
  int err = OPUS_OK;
  OpusEncoder *enc = opus_encoder_create(SAMPLE_RATE, s->channels, s->application, &err);
  if (enc == NULL || err != OPUS_OK) die("opus_encoder_create", opus_strerror(err));
  ctl(opus_encoder_ctl(enc, OPUS_SET_BITRATE(s->bitrate)), "set bitrate");
  ctl(opus_encoder_ctl(enc, OPUS_SET_COMPLEXITY(s->complexity)), "set complexity");
  ctl(opus_encoder_ctl(enc, OPUS_SET_VBR(s->vbr)), "set vbr");
  ctl(opus_encoder_ctl(enc, OPUS_SET_VBR_CONSTRAINT(s->vbr_constraint)), "set vbr constraint");
  ctl(opus_encoder_ctl(enc, OPUS_SET_SIGNAL(s->signal)), "set signal");
  ctl(opus_encoder_ctl(enc, OPUS_SET_MAX_BANDWIDTH(s->max_bandwidth)), "set max bandwidth");
  ctl(opus_encoder_ctl(enc, OPUS_SET_DTX(s->dtx)), "set dtx");
  ctl(opus_encoder_ctl(enc, OPUS_SET_INBAND_FEC(s->fec)), "set inband fec");
  ctl(opus_encoder_ctl(enc, OPUS_SET_PACKET_LOSS_PERC(s->loss)), "set packet loss");
  return enc;
}

static OpusDecoder *new_decoder(const struct settings *s) {
  int err = OPUS_OK;
  OpusDecoder *dec = opus_decoder_create(SAMPLE_RATE, s->channels, &err);
  if (dec == NULL || err != OPUS_OK) die("opus_decoder_create", opus_strerror(err));
  return dec;
}

static opus_int16 *read_pcm(const char *path, long *samples) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) die(path, strerror(errno));
  if (fseek(f, 0, SEEK_END) != 0) die(path, strerror(errno));
  long bytes = ftell(f);
  if (bytes <= 0 || bytes % 2 != 0) die(path, "expected a non-empty file of int16 samples");
  rewind(f);
  opus_int16 *pcm = malloc((size_t)bytes);
  if (pcm == NULL) die("malloc", "out of memory");
  if (fread(pcm, 1, (size_t)bytes, f) != (size_t)bytes) die(path, "short read");
  fclose(f);
  *samples = bytes / 2;
  return pcm;
}

int main(int argc, char **argv) {
  if (argc != 15) {
    fprintf(stderr,
            "usage: opus_native BITRATE CHANNELS FRAME_SAMPLES COMPLEXITY VBR VBR_CONSTRAINT "
            "SIGNAL MAX_BANDWIDTH DTX FEC LOSS_PERC APPLICATION FRAMES INPUT.raw\n");
    return 2;
  }
  struct settings s;
  s.bitrate = (int)arg_int(argv, 1, "bitrate", 500, 512000);
  s.channels = (int)arg_int(argv, 2, "channel count", 1, 2);
  s.frame = (int)arg_int(argv, 3, "frame size", 120, 2880);
  s.complexity = (int)arg_int(argv, 4, "complexity", 0, 10);
  s.vbr = (int)arg_int(argv, 5, "vbr", 0, 1);
  s.vbr_constraint = (int)arg_int(argv, 6, "vbr constraint", 0, 1);
  s.signal = (int)arg_int(argv, 7, "signal", INT_MIN, INT_MAX);
  s.max_bandwidth = (int)arg_int(argv, 8, "max bandwidth", INT_MIN, INT_MAX);
  s.dtx = (int)arg_int(argv, 9, "dtx", 0, 1);
  s.fec = (int)arg_int(argv, 10, "fec", 0, 1);
  s.loss = (int)arg_int(argv, 11, "packet loss", 0, 100);
  s.application = (int)arg_int(argv, 12, "application", INT_MIN, INT_MAX);
  const long frames = arg_int(argv, 13, "frame count", 1, 1000000);

  long total = 0;
  opus_int16 *input = read_pcm(argv[14], &total);
  const long per_frame = (long)s.frame * s.channels;
  if (total % per_frame != 0) die(argv[14], "length is not a whole number of frames");
  const long input_frames = total / per_frame;

  size_t store_size = (size_t)frames * 64;
  unsigned char *store = malloc(store_size);
  int32_t *offsets = malloc((size_t)frames * sizeof *offsets);
  int32_t *lengths = malloc((size_t)frames * sizeof *lengths);
  opus_int16 *pcm = malloc((size_t)per_frame * sizeof *pcm);
  unsigned char packet[MAX_PACKET];
  if (store == NULL || offsets == NULL || lengths == NULL || pcm == NULL) {
    die("malloc", "out of memory");
  }

  /* 1. Collection pass. */
  uint32_t packet_hash = FNV_OFFSET, pcm_hash = FNV_OFFSET;
  long long packet_bytes = 0;
  OpusEncoder *enc = new_encoder(&s);
  for (long i = 0; i < frames; i++) {
    const opus_int16 *in = input + (i % input_frames) * per_frame;
    int32_t n = opus_encode(enc, in, s.frame, packet, MAX_PACKET);
    if (n < 0) die("opus_encode", opus_strerror(n));
    if ((size_t)packet_bytes + (size_t)n > store_size) {
      store_size *= 2;
      store = realloc(store, store_size);
      if (store == NULL) die("realloc", "out of memory");
    }
    offsets[i] = (int32_t)packet_bytes;
    lengths[i] = n;
    memcpy(store + packet_bytes, packet, (size_t)n);
    packet_bytes += n;
    packet_hash = fnv_packet(packet_hash, packet, n);
  }
  opus_encoder_destroy(enc);
  OpusDecoder *dec = new_decoder(&s);
  for (long i = 0; i < frames; i++) {
    int n = opus_decode(dec, store + offsets[i], lengths[i], pcm, s.frame, 0);
    if (n != s.frame) die("opus_decode", n < 0 ? opus_strerror(n) : "short frame");
    pcm_hash = fnv_pcm(pcm_hash, pcm, n * s.channels);
  }
  opus_decoder_destroy(dec);

  printf("{\"version\":\"%s\",\"frames\":%ld,\"packetBytes\":%lld,\"packetHash\":%u,"
         "\"pcmHash\":%u}\n",
         opus_get_version_string(), frames, packet_bytes, (unsigned)packet_hash,
         (unsigned)pcm_hash);
  fflush(stdout);

  /* 2. Timed chunks, one per command line on stdin. */
  char command[64], op[16];
  long from = 0, count = 0, enc_next = -1, dec_next = -1;
  enc = NULL;
  dec = NULL;
  while (fgets(command, sizeof command, stdin) != NULL) {
    command[strcspn(command, "\n")] = '\0';
    if (sscanf(command, "%15s %ld %ld", op, &from, &count) != 3 || from < 0 || count < 1 ||
        from > LONG_MAX / 2 || count > LONG_MAX / 2) {
      die("invalid command", command);
    }
    long long produced = 0;
    int64_t w0, c0, t0, cpu, thread, wall;
    if (strcmp(op, "encode") == 0) {
      if (from == 0) {
        if (enc != NULL) opus_encoder_destroy(enc);
        enc = new_encoder(&s);
      } else if (from != enc_next) {
        die("invalid command", "encode chunks must follow each other from frame 0");
      }
      w0 = now_ns(CLOCK_MONOTONIC);
      c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
      t0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
      for (long i = from; i < from + count; i++) {
        int32_t n =
            opus_encode(enc, input + (i % input_frames) * per_frame, s.frame, packet, MAX_PACKET);
        if (n < 0) die("opus_encode", opus_strerror(n));
        produced += n;
      }
      thread = now_ns(CLOCK_THREAD_CPUTIME_ID) - t0;
      cpu = now_ns(CLOCK_PROCESS_CPUTIME_ID) - c0;
      wall = now_ns(CLOCK_MONOTONIC) - w0;
      enc_next = from + count;
    } else if (strcmp(op, "decode") == 0) {
      if (from == 0) {
        if (dec != NULL) opus_decoder_destroy(dec);
        dec = new_decoder(&s);
      } else if (from != dec_next) {
        die("invalid command", "decode chunks must follow each other from frame 0");
      }
      w0 = now_ns(CLOCK_MONOTONIC);
      c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
      t0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
      for (long i = from; i < from + count; i++) {
        const long k = i % frames;
        int n = opus_decode(dec, store + offsets[k], lengths[k], pcm, s.frame, 0);
        if (n < 0) die("opus_decode", opus_strerror(n));
        produced += n;
      }
      thread = now_ns(CLOCK_THREAD_CPUTIME_ID) - t0;
      cpu = now_ns(CLOCK_PROCESS_CPUTIME_ID) - c0;
      wall = now_ns(CLOCK_MONOTONIC) - w0;
      dec_next = from + count;
    } else {
      die("unknown command", command);
    }
    printf("{\"wallNs\":%lld,\"processNs\":%lld,\"threadNs\":%lld,\"count\":%lld}\n",
           (long long)wall, (long long)cpu, (long long)thread, produced);
    fflush(stdout);
  }
  if (enc != NULL) opus_encoder_destroy(enc);
  if (dec != NULL) opus_decoder_destroy(dec);

  free(input);
  free(store);
  free(offsets);
  free(lengths);
  free(pcm);
  return 0;
}
