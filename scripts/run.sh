#!/usr/bin/env bash
# Sets up everything (idempotent) and runs kvm-audio. Arguments are passed to the service
# (--help lists them).
#
# With no sound hardware (no /proc/asound/cards entry) and no --capture/--playback given, it starts
# the virtual devices of scripts/virtual-audio.sh — a capture PCM playing a 440 Hz tone and a
# playback PCM — in .cache/virtual-audio, and stops them when the service exits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

args=("$@")
names_device=0
for a in "$@"; do
  case "$a" in --capture|--capture=*|--playback|--playback=*|--help) names_device=1 ;; esac
done
[ -n "${KVM_AUDIO_CAPTURE:-}${KVM_AUDIO_PLAYBACK:-}" ] && names_device=1

has_hardware=0
if [ -r /proc/asound/cards ] && ! grep -q "no soundcards" /proc/asound/cards; then has_hardware=1; fi

if [ "$has_hardware" = 0 ] && [ "$names_device" = 0 ]; then
  va_dir="$PWD/.cache/virtual-audio"
  echo "run: no sound hardware found; starting virtual devices in $va_dir"
  # Stopped on exit only when this run started them: another run may be using them.
  started=0
  bash scripts/virtual-audio.sh status "$va_dir" >/dev/null 2>&1 || started=1
  # (A failure inside "$(…)" would not stop `eval`, and the service would start without devices.)
  env_lines=$(bash scripts/virtual-audio.sh start "$va_dir") || {
    echo "run: cannot start the virtual devices (see above)" >&2
    exit 1
  }
  eval "$env_lines"
  if [ "$started" = 1 ]; then
    trap 'bash scripts/virtual-audio.sh stop "$va_dir" >/dev/null 2>&1 || true' EXIT
  fi
  args=(--capture kvm_capture --playback kvm_playback "${args[@]}")
fi

# The service runs as a child; SIGINT and SIGTERM to this script are passed on to it, and the script
# ends (and stops the devices it started) only once the service has.
.tools/bin/deno task start "${args[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
rc=0
wait "$child" || rc=$?
# A trapped signal ends `wait` early: wait again until the service itself has ended.
while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done
exit "$rc"
