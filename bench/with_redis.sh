#!/usr/bin/env bash
# with_redis.sh PORT COMMAND...: start a throwaway redis-server on 127.0.0.1:PORT (no
# persistence), wait until it answers, then exec COMMAND (the gateway) in its place. The
# benchmark stops the session with SIGTERM, then SIGKILL, which ends Redis too.
set -euo pipefail
port=$1
shift
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --logfile redis.log &
for _ in $(seq 100); do
  if redis-cli -p "$port" ping >/dev/null 2>&1; then
    exec "$@"
  fi
  sleep 0.05
done
echo "redis-server did not answer on port $port" >&2
exit 1
