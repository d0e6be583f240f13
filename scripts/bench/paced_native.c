/*
 * The least a program can spend on the paced engine benchmark's job (scripts/bench/engine.ts,
 * figure 2): one thread, blocking calls, no jitter buffer, no metrics. Each 10 ms it reads a
 * period from the capture PCM, encodes it with libopus (the ultra output preset's settings),
 * sends it as one RTP packet to itself over 127.0.0.1, receives it, decodes it and writes it to
 * the playback PCM — the same work as our service and the GStreamer pair, through the same ALSA
 * PCMs (PulseAudio's plugin) and the same libopus.
 *
 * Usage: paced_native CAPTURE PLAYBACK BITRATE COMPLEXITY FRAME_MS
 * Runs until killed; prints "running" once both PCMs run, then a line per xrun on stderr.
 *
 * Build: cc -O2 -std=c11 -Wall -o paced_native paced_native.c -lopus -lasound
 */
#define _DEFAULT_SOURCE
#include <alsa/asoundlib.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <opus/opus.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define RATE 48000
#define CHANNELS 2
#define PERIODS 4

static void die(const char *what, const char *detail) {
  fprintf(stderr, "paced_native: %s: %s\n", what, detail);
  exit(1);
}

static snd_pcm_t *open_pcm(const char *name, snd_pcm_stream_t stream, snd_pcm_uframes_t period) {
  snd_pcm_t *pcm;
  int err = snd_pcm_open(&pcm, name, stream, 0);
  if (err < 0) die(name, snd_strerror(err));
  snd_pcm_hw_params_t *hw;
  snd_pcm_hw_params_alloca(&hw);
  snd_pcm_hw_params_any(pcm, hw);
  unsigned rate = RATE;
  snd_pcm_uframes_t buffer = period * PERIODS;
  if ((err = snd_pcm_hw_params_set_access(pcm, hw, SND_PCM_ACCESS_RW_INTERLEAVED)) < 0 ||
      (err = snd_pcm_hw_params_set_format(pcm, hw, SND_PCM_FORMAT_S16_LE)) < 0 ||
      (err = snd_pcm_hw_params_set_channels(pcm, hw, CHANNELS)) < 0 ||
      (err = snd_pcm_hw_params_set_rate_near(pcm, hw, &rate, NULL)) < 0 ||
      (err = snd_pcm_hw_params_set_period_size_near(pcm, hw, &period, NULL)) < 0 ||
      (err = snd_pcm_hw_params_set_buffer_size_near(pcm, hw, &buffer)) < 0 ||
      (err = snd_pcm_hw_params(pcm, hw)) < 0) {
    die(name, snd_strerror(err));
  }
  if (rate != RATE) die(name, "48 kHz not available");
  return pcm;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "Usage: paced_native CAPTURE PLAYBACK BITRATE COMPLEXITY FRAME_MS\n");
    return 2;
  }
  const int bitrate = atoi(argv[3]), complexity = atoi(argv[4]), frame_ms = atoi(argv[5]);
  const int fs = RATE / 1000 * frame_ms;
  if (bitrate <= 0 || complexity < 0 || complexity > 10 || fs <= 0 || fs > 2880) {
    die("arguments", "bitrate > 0, complexity 0-10, frame 2.5-60 ms expected");
  }

  int err;
  OpusEncoder *enc = opus_encoder_create(RATE, CHANNELS, OPUS_APPLICATION_RESTRICTED_LOWDELAY, &err);
  if (err != OPUS_OK) die("opus_encoder_create", opus_strerror(err));
  opus_encoder_ctl(enc, OPUS_SET_BITRATE(bitrate));
  opus_encoder_ctl(enc, OPUS_SET_COMPLEXITY(complexity));
  opus_encoder_ctl(enc, OPUS_SET_VBR(1));
  opus_encoder_ctl(enc, OPUS_SET_VBR_CONSTRAINT(0));
  opus_encoder_ctl(enc, OPUS_SET_MAX_BANDWIDTH(OPUS_BANDWIDTH_FULLBAND));
  OpusDecoder *dec = opus_decoder_create(RATE, CHANNELS, &err);
  if (err != OPUS_OK) die("opus_decoder_create", opus_strerror(err));

  /* One UDP socket sending to itself. */
  int sock = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (sock < 0 || bind(sock, (struct sockaddr *)&addr, sizeof addr) < 0 ||
      getsockname(sock, (struct sockaddr *)&addr, &len) < 0) {
    die("socket", strerror(errno));
  }

  snd_pcm_t *cap = open_pcm(argv[1], SND_PCM_STREAM_CAPTURE, (snd_pcm_uframes_t)fs);
  snd_pcm_t *play = open_pcm(argv[2], SND_PCM_STREAM_PLAYBACK, (snd_pcm_uframes_t)fs);

  static int16_t in[2880 * CHANNELS], out[2880 * CHANNELS];
  static unsigned char tx[12 + 4000], rx[12 + 4000];
  /* Two periods of silence ahead of the first played frame, as a minimal playout depth. */
  memset(out, 0, sizeof out);
  for (int i = 0; i < 2; i++) snd_pcm_writei(play, out, fs);
  snd_pcm_start(cap);
  printf("running\n");
  fflush(stdout);

  uint16_t seq = 0;
  uint32_t ts = 0;
  for (;;) {
    snd_pcm_sframes_t n = snd_pcm_readi(cap, in, fs);
    if (n < 0) {
      fprintf(stderr, "capture xrun: %s\n", snd_strerror((int)n));
      if (snd_pcm_recover(cap, (int)n, 1) < 0) die("capture", snd_strerror((int)n));
      snd_pcm_start(cap);
      continue;
    }
    if (n < fs) continue; /* blocking reads return whole periods */

    opus_int32 bytes = opus_encode(enc, in, fs, tx + 12, sizeof tx - 12);
    if (bytes < 0) die("opus_encode", opus_strerror(bytes));
    tx[0] = 0x80;
    tx[1] = 96;
    tx[2] = seq >> 8, tx[3] = seq & 0xff;
    tx[4] = ts >> 24, tx[5] = ts >> 16, tx[6] = ts >> 8, tx[7] = ts & 0xff;
    memset(tx + 8, 0x4b, 4); /* SSRC */
    seq++, ts += (uint32_t)fs;
    if (sendto(sock, tx, 12 + (size_t)bytes, 0, (struct sockaddr *)&addr, sizeof addr) < 0) {
      die("sendto", strerror(errno));
    }

    ssize_t got = recv(sock, rx, sizeof rx, 0);
    if (got <= 12) die("recv", got < 0 ? strerror(errno) : "short packet");
    int samples = opus_decode(dec, rx + 12, (opus_int32)(got - 12), out, 2880, 0);
    if (samples < 0) die("opus_decode", opus_strerror(samples));

    snd_pcm_sframes_t w = snd_pcm_writei(play, out, samples);
    if (w < 0) {
      fprintf(stderr, "playback xrun: %s\n", snd_strerror((int)w));
      if (snd_pcm_recover(play, (int)w, 1) < 0) die("playback", snd_strerror((int)w));
      snd_pcm_writei(play, out, samples);
    }
  }
}
