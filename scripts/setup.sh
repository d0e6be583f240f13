#!/usr/bin/env bash
# Idempotent set-up for kvm-audio on Debian with Node/npm: installs what is missing, nothing twice.
#   - Deno 2.9.5 (exact pin, from the npm registry) into .tools/, linked as .tools/bin/deno
#   - the Debian packages the service and its tests use
# Usage: scripts/setup.sh [--with-test-tools] [--with-bench-tools] [--quiet]
set -euo pipefail
cd "$(dirname "$0")/.."

want_test_tools=0
want_bench_tools=0
quiet=0
for arg in "$@"; do
  case "$arg" in
    --with-test-tools) want_test_tools=1 ;;
    --with-bench-tools) want_bench_tools=1 ;;
    --quiet) quiet=1 ;;
    *) echo "setup.sh: unknown option \"$arg\" (expected --with-test-tools, --with-bench-tools or --quiet)" >&2; exit 2 ;;
  esac
done
say() { [ "$quiet" = 1 ] || echo "setup: $*"; }

# Runtime libraries, the tools to find devices, and paced virtual devices (PulseAudio null sink/source).
packages=(libopus0 libasound2 alsa-utils libspeexdsp1 pulseaudio pulseaudio-utils libasound2-plugins)
# Tests and benchmarks also build a small C baseline and drive real clients: ffmpeg (RTP and SDP
# interoperability) and Chromium (the operator's page).
if [ "$want_test_tools" = 1 ]; then
  packages+=(gcc libc6-dev libopus-dev libspeexdsp-dev ffmpeg chromium)
fi
# Benchmarks also build C baselines against libasound and run the GStreamer pair they are set
# against: alsasrc/alsasink, opusenc/opusdec, rtpopuspay/depay, udpsrc/udpsink, rtpjitterbuffer.
if [ "$want_bench_tools" = 1 ]; then
  packages+=(gcc libc6-dev libopus-dev libspeexdsp-dev libasound2-dev gstreamer1.0-tools
    gstreamer1.0-alsa gstreamer1.0-plugins-base gstreamer1.0-plugins-good)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

want_deno="2.9.5"
if [ -x .tools/bin/deno ] && .tools/bin/deno --version 2>/dev/null | head -1 | grep -q "deno $want_deno "; then
  say "deno $want_deno present"
else
  say "installing deno $want_deno from the npm registry into .tools/"
  (cd .tools && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  mkdir -p .tools/bin
  ln -sf ../node_modules/.bin/deno .tools/bin/deno
  .tools/bin/deno --version | head -1 | grep -q "deno $want_deno " || {
    echo "setup.sh: .tools/bin/deno is not deno $want_deno" >&2
    exit 1
  }
fi
