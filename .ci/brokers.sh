#!/usr/bin/env bash
# Start, stop or check all test brokers (Kafka and Mosquitto) on 127.0.0.1.
# Usage: .ci/brokers.sh start|stop|status
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

case "${1:-}" in
start | status) scripts=(mosquitto kafka) ;;
stop) scripts=(kafka mosquitto) ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac

rc=0
for name in "${scripts[@]}"; do
    "$here/$name.sh" "$1" || rc=1
done
exit "$rc"
