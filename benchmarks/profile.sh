#!/bin/sh
# Where a nanomsg server spends its time under one benchmark scenario (BENCHMARKS.md, "Where
# the time goes"): starts a server on a fresh database, runs the scenario against it, attaches
# py-spy for a window in the middle of the run, and prints the samples grouped by area.
#
#   benchmarks/profile.sh sqlite|postgres <scenario> [scenario options...]
#   benchmarks/profile.sh sqlite fanout --subscribers 1000 --rate 400 --publishers 4 \
#       --duration 15 --client-procs 2 --sample-every 100
#
# Needs py-spy (pip install py-spy). PROFILE_DELAY (s, default 8) and PROFILE_SECONDS (default
# 6) place the sampling window; PROFILE_OUT (default /tmp/nanomsg-profile.txt) keeps the raw
# folded stacks.
set -eu
db=$1
scenario=$2
shift 2
secret=profile-secret-0123456789abcdef0123
port=${PROFILE_PORT:-7931}
out=${PROFILE_OUT:-/tmp/nanomsg-profile.txt}
tmp=$(mktemp -d)
case $db in
  sqlite) url="sqlite:///$tmp/profile.db" ;;
  postgres)
    name="nanomsg_profile_$$"
    psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $name" >/dev/null
    url="postgresql://postgres@127.0.0.1:5432/$name" ;;
  *) echo "first argument: sqlite or postgres" >&2; exit 2 ;;
esac
python -m nanomsg migrate --database-url "$url" >/dev/null
python -m nanomsg serve --database-url "$url" --port "$port" --http-port $((port + 1)) \
    --jwt-secret "$secret" --log-level WARNING >"$tmp/server.log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  if [ "$db" = postgres ]; then
    psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $name" >/dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
sleep 1.5
(sleep "${PROFILE_DELAY:-8}"
 py-spy record -r 250 -d "${PROFILE_SECONDS:-6}" -f raw -o "$out" --pid "$server" \
     --nonblocking >"$tmp/py-spy.log" 2>&1) &
spy=$!
set -- --url "ws://127.0.0.1:$port/chat" --http-url "http://127.0.0.1:$((port + 1))" \
    --jwt-secret "$secret" --server-pid "$server" --runs 1 --json-out "$tmp/result.jsonl" "$@"
if [ "$db" = postgres ]; then set -- --database-url "$url" "$@"; fi
python -m benchmarks "$scenario" "$@" 2>&1 | grep -v '^{'
wait "$spy"
python -m benchmarks.profile_report "$out"
