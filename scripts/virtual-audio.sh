#!/usr/bin/env bash
# Virtual sound devices for running kvm-audio on a machine without sound hardware.
#
#   scripts/virtual-audio.sh start <dir>    start (or find running) a private PulseAudio, write
#                                           <dir>/asound.conf, print the export lines to use it
#   scripts/virtual-audio.sh stop <dir>     stop that PulseAudio (only the process it started)
#   scripts/virtual-audio.sh status <dir>   say whether it runs; exit 0 if so
#
#   eval "$(scripts/virtual-audio.sh start /tmp/kvm-va)"   # then run the service in this shell
#
# PCMs defined in <dir>/asound.conf (a self-contained ALSA configuration):
#   kvm_capture   a 440 Hz test tone (KVM_TONE_HZ), paced like a microphone
#   kvm_playback  a null sink: paced like a loudspeaker, heard on kvm_monitor
#   kvm_monitor   what is played to kvm_playback
#   kvm_silence   a silent, paced source
#   default       kvm_playback for playback, kvm_capture for capture (for aplay/arecord)
#
# The server runs as an ordinary process with its own HOME/XDG_RUNTIME_DIR under <dir> (as root
# too: it warns, but a per-user instance works), socket <dir>/pulse.sock, no D-Bus, no shm.
# Needs: pulseaudio, pulseaudio-utils (pactl), libasound2-plugins (the ALSA "pulse" PCM type).
set -euo pipefail

usage() {
  echo "usage: $0 start|stop|status <dir>" >&2
  exit 2
}
[ "$#" -eq 2 ] || usage
cmd=$1
if [ "$cmd" = start ]; then mkdir -p -- "$2"; fi
if [ ! -d "$2" ]; then
  echo "virtual-audio: not running (no directory \"$2\")" >&2
  [ "$cmd" = stop ] && exit 0
  exit 1
fi
dir=$(cd -- "$2" && pwd)

rate=${KVM_AUDIO_RATE:-48000}
channels=${KVM_AUDIO_CHANNELS:-2}
tone_hz=${KVM_TONE_HZ:-440}
socket="$dir/pulse.sock"
server="unix:$socket"
pidfile="$dir/pulse.pid"
conf="$dir/asound.conf"
log="$dir/pulse.log"

case "$rate$channels$tone_hz" in *[!0-9]*) echo "$0: rate, channels and tone must be integers" >&2; exit 2 ;; esac
if [ "${#socket}" -gt 107 ]; then
  echo "$0: socket path \"$socket\" is longer than 107 characters: choose a shorter <dir>" >&2
  exit 2
fi
case "$dir" in *'"'* | *'\'* | *' '*)
  echo "$0: <dir> \"$dir\" must not contain quotes, backslashes or spaces" >&2
  exit 2
  ;;
esac

# The pid in <dir>/pulse.pid, if it is still our pulseaudio (the same socket in its command line).
our_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid=$(cat "$pidfile")
  case "$pid" in '' | *[!0-9]*) return 1 ;; esac
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "pulseaudio.*$dir/server.pa" || return 1
  echo "$pid"
}

answers() {
  env -i PATH="$PATH" LANG=C pactl --server="$server" info >/dev/null 2>&1
}

write_config() {
  cat >"$conf.tmp" <<EOF
# Written by scripts/virtual-audio.sh: PCMs on the private PulseAudio at $socket
pcm.kvm_capture {
  type pulse
  server "$server"
  device "kvm_tone_sink.monitor"
}
pcm.kvm_silence {
  type pulse
  server "$server"
  device "kvm_source"
}
pcm.kvm_playback {
  type pulse
  server "$server"
  device "kvm_sink"
}
pcm.kvm_monitor {
  type pulse
  server "$server"
  device "kvm_sink.monitor"
}
pcm.!default {
  type asym
  playback.pcm "kvm_playback"
  capture.pcm "kvm_capture"
}
EOF
  mv -f "$conf.tmp" "$conf"
}

start() {
  if pid=$(our_pid) && answers; then
    echo "virtual-audio: PulseAudio already running (pid $pid)" >&2
  else
    if pid=$(our_pid); then # alive but not answering: replace it
      kill "$pid" 2>/dev/null || true
      sleep 1
    fi
    rm -f "$pidfile" "$socket"
    mkdir -p "$dir/home" "$dir/run"
    chmod 700 "$dir/run"
    local spec="rate=$rate channels=$channels format=s16le"
    cat >"$dir/server.pa" <<EOF
load-module module-native-protocol-unix socket=$socket auth-anonymous=1
load-module module-null-sink sink_name=kvm_sink $spec
load-module module-null-source source_name=kvm_source $spec
load-module module-null-sink sink_name=kvm_tone_sink $spec
load-module module-sine sink=kvm_tone_sink frequency=$tone_hz
set-default-sink kvm_sink
set-default-source kvm_tone_sink.monitor
EOF
    # A new session, so the server outlives this shell; stdio closed.
    env -i PATH="$PATH" HOME="$dir/home" XDG_RUNTIME_DIR="$dir/run" LANG=C \
      setsid pulseaudio -n --file="$dir/server.pa" --daemonize=no --exit-idle-time=-1 \
      --disable-shm=yes --use-pid-file=no --realtime=no --high-priority=no \
      --log-target="file:$log" </dev/null >/dev/null 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 100); do
      answers && break
      # Gone, not merely not yet exec'ed (until then its command line is this shell's).
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "virtual-audio: pulseaudio exited; its log ($log):" >&2
        tail -n 15 "$log" >&2 || true
        rm -f "$pidfile"
        exit 1
      fi
      sleep 0.1
    done
    if ! answers; then
      echo "virtual-audio: pulseaudio does not answer on $socket; its log ($log):" >&2
      tail -n 15 "$log" >&2 || true
      kill "$(cat "$pidfile")" 2>/dev/null || true # not left running behind a failed start
      rm -f "$pidfile"
      exit 1
    fi
    echo "virtual-audio: PulseAudio started (pid $(cat "$pidfile")), tone ${tone_hz} Hz" >&2
  fi
  write_config
  echo "export ALSA_CONFIG_PATH=$conf"
  echo "export PULSE_SERVER=$server"
}

stop() {
  local pid
  if ! pid=$(our_pid); then
    rm -f "$pidfile"
    echo "virtual-audio: not running" >&2
    return 0
  fi
  kill "$pid"
  for _ in $(seq 1 50); do
    [ -d "/proc/$pid" ] || break
    sleep 0.1
  done
  if [ -d "/proc/$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile" "$socket"
  echo "virtual-audio: stopped (pid $pid)" >&2
}

status() {
  local pid
  if pid=$(our_pid) && answers; then
    echo "virtual-audio: running (pid $pid), ALSA_CONFIG_PATH=$conf" >&2
  else
    echo "virtual-audio: not running" >&2
    return 1
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
