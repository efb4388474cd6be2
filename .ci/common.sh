# shellcheck shell=bash
# Helpers shared by .ci/kafka.sh and .ci/mosquitto.sh (sourced, not executed).
# The caller sets PROG (the name used in messages) before sourcing this file.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${STREAMFLOW_BROKERS_DIR:-$REPO_ROOT/.brokers}"
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"

log() { printf '%s: %s\n' "${PROG:-broker}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() { timeout 1 bash -c ": >/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# alive PID: the process exists and is not a zombie.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]
}

# live_pid PIDFILE MARKER: print the pid from PIDFILE if that process is alive
# and its command line contains MARKER (guards against recycled pids).
live_pid() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    [[ "$(ps -ww -o args= -p "$pid" 2>/dev/null)" == *"$2"* ]] || return 1
    echo "$pid"
}

# stop_pidfile NAME PIDFILE MARKER: SIGTERM, wait up to 30 s, then SIGKILL.
stop_pidfile() {
    local name="$1" pidfile="$2" marker="$3" pid i
    if ! pid="$(live_pid "$pidfile" "$marker")"; then
        log "$name is not running (nothing started by this script)"
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name still running after 30 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    log "$name stopped"
}

# show_status NAME PIDFILE MARKER PORT: exit status 0 if a broker answers.
show_status() {
    local name="$1" pidfile="$2" marker="$3" port="$4" pid
    if pid="$(live_pid "$pidfile" "$marker")"; then
        log "$name is running (pid $pid, 127.0.0.1:$port)"
    elif port_open "$port"; then
        log "$name: something not started by this script answers on 127.0.0.1:$port"
    else
        log "$name is not running"
        return 1
    fi
}

# tail_log FILE: show the end of a log file on stderr.
tail_log() {
    [[ -s "$1" ]] || return 0
    log "last lines of $1:"
    tail -n 25 "$1" >&2
}

# lock DIR: serialise concurrent start/stop calls on one state dir (holds fd 9;
# commands that outlive the script must be started with 9>&-).
lock() {
    mkdir -p "$1"
    command -v flock >/dev/null || return 0
    exec 9>"$1/.lock"
    flock -w 180 9 || die "timed out waiting for another ${PROG:-broker} call (lock $1/.lock)"
}
