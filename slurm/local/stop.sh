#!/usr/bin/env bash
# Stop the localhost cluster started by slurm/local/start.sh: only the processes named in its own
# pid files, and only when /proc/PID/comm says they are the daemon we started. State, database
# and logs stay in $CMSCALE_SLURM_DIR, so start.sh brings the same cluster back.
set -uo pipefail

DIR="${CMSCALE_SLURM_DIR:-/tmp/cmscale-slurm}"
log() { echo "stop.sh: $*" >&2; }

if [ ! -d "$DIR/run" ]; then
    log "nothing to stop ($DIR/run does not exist)"
    exit 0
fi

pid_of() {  # pid_of NAME: the pid in $DIR/run/NAME.pid if that process is NAME
    local pidfile="$DIR/run/$1.pid" pid
    [ -s "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] && echo "$pid"
}

# Jobs of this cluster die with it; cancel them first so their steps do not outlive slurmd.
if pid_of slurmctld >/dev/null && [ -f "$DIR/etc/slurm.conf" ]; then
    SLURM_CONF="$DIR/etc/slurm.conf" scancel --full --quiet --user=root 2>/dev/null || true
    for _ in $(seq 50); do
        [ -z "$(SLURM_CONF="$DIR/etc/slurm.conf" squeue -h -t running,completing 2>/dev/null)" ] && break
        sleep 0.2
    done
fi

for name in slurmd slurmctld slurmdbd mariadbd munged; do
    pid="$(pid_of "$name")" || { rm -f "$DIR/run/$name.pid"; continue; }
    log "stopping $name ($pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        log "$name ($pid) ignored SIGTERM for 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$DIR/run/$name.pid"
done
