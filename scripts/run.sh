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
  case "$a" in --capture|--capture=*|--playback|--playback=*|--help|--check) names_device=1 ;; esac
done
[ -n "${KVM_AUDIO_CAPTURE:-}${KVM_AUDIO_PLAYBACK:-}" ] && names_device=1

has_hardware=0
if [ -r /proc/asound/cards ] && ! grep -q "no soundcards" /proc/asound/cards; then has_hardware=1; fi

if [ "$has_hardware" = 0 ] && [ "$names_device" = 0 ]; then
  va_dir="$PWD/.cache/virtual-audio"
  echo "run: no sound hardware found; starting virtual devices in $va_dir"
  eval "$(bash scripts/virtual-audio.sh start "$va_dir")"
  trap 'bash scripts/virtual-audio.sh stop "$va_dir" >/dev/null 2>&1 || true' EXIT
  args=(--capture kvm_capture --playback kvm_playback "${args[@]}")
fi

.tools/bin/deno task start "${args[@]}"
