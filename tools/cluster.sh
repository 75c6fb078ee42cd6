#!/usr/bin/env bash
# Several tickgate nodes on this machine, sharing one local nats-server with JetStream
# (docs/CLUSTER.md), to try [cluster] by hand:
#
#   tools/cluster.sh [N]          N nodes (3 by default); prints a token and how to subscribe
#                                 and feed ticks, then waits: Ctrl-C stops everything
#   tools/cluster.sh --check [N]  the same nodes, then one tick published on NATS must reach
#                                 a subscriber on node 2, exactly once; prints PASS (exit 0)
#                                 or FAIL (exit 1)
#
# Node i listens on 127.0.0.1:(8080+i) (WebSocket) and 127.0.0.1:(9090+i) (admin).
# NATS_PORT (default 4222) is nats-server's port. Everything (JetStream store, keys,
# configs, logs) lives in one temporary directory, removed on exit with every process
# started here. It builds `tickgate` and `examples/nats_pub.rs` (a NATS publisher) first.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

CHECK=0
N=3
for arg in "$@"; do
  case $arg in
    --check) CHECK=1 ;;
    -h | --help)
      sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *[!0-9]* | '')
      echo "tools/cluster.sh: unknown argument $arg (usage: tools/cluster.sh [--check] [N])" >&2
      exit 2
      ;;
    *) N=$arg ;;
  esac
done
NATS_PORT=${NATS_PORT:-4222}
if ((N < 1 || N > 9)); then
  echo "tools/cluster.sh: N must be 1 to 9 (ports 8081-8089, 9091-9099)" >&2
  exit 2
fi
if ((CHECK && N < 2)); then
  echo "tools/cluster.sh: --check needs at least 2 nodes (it subscribes on node 2)" >&2
  exit 2
fi

log() { echo "cluster: $*" >&2; }

if ! command -v nats-server >/dev/null 2>&1; then
  echo "tools/cluster.sh: nats-server is not on PATH; install it first:" >&2
  echo "  sudo apt-get install nats-server    (or https://github.com/nats-io/nats-server/releases)" >&2
  exit 1
fi

# Build the server and the example publisher together: built apart, the example's
# dev-dependencies change the features of shared crates and each build undoes the other.
BUILD=(cargo build --release -p tickgate --bin tickgate --example nats_pub)
log "building: ${BUILD[*]}"
"${BUILD[@]}"
OUT=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=$OUT/release/tickgate
PUB=$OUT/release/examples/nats_pub

# Everything started from here on is stopped by cleanup.
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tickgate-cluster.XXXXXX")
PIDS=()
cleanup() {
  local pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# http_get PORT PATH: the whole HTTP/1.1 response from 127.0.0.1:PORT (the admin
# listener answers one request per connection, then closes it).
http_get() {
  # shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
  timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n" "$2" "$1" >&3
    cat <&3' _ "$1" "$2" 2>/dev/null
}

# http_status PORT PATH: the status code, or 000 when nothing answered.
http_status() {
  local line
  line=$(http_get "$1" "$2" | head -n 1) || true
  line=${line#HTTP/1.1 }
  echo "${line:0:3}" | grep -E '^[0-9]{3}$' || echo 000
}

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 100 ms.
wait_for() {
  local what=$1 secs=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${secs}s waiting for $what"
      return 1
    fi
    sleep 0.1
  done
}

# alive PID NAME LOG: fails (showing the log's tail) when the process has exited.
alive() {
  kill -0 "$1" 2>/dev/null && return 0
  log "$2 exited; the end of its log ($3):"
  tail -n 20 "$3" >&2 || true
  return 1
}

# NATS with JetStream, its store in the temporary directory.
NATS_URL=nats://127.0.0.1:$NATS_PORT
if port_open "$NATS_PORT"; then
  log "port $NATS_PORT is taken; set NATS_PORT to a free port"
  exit 1
fi
for i in $(seq "$N"); do
  for p in $((8080 + i)) $((9090 + i)); do
    if port_open "$p"; then
      log "port $p (node-$i) is taken; stop what listens there first"
      exit 1
    fi
  done
done
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$TMP/nats" >"$TMP/nats.log" 2>&1 &
NATS_PID=$!
PIDS+=("$NATS_PID")
nats_up() { alive "$NATS_PID" nats-server "$TMP/nats.log" || exit 1; port_open "$NATS_PORT"; }
wait_for "nats-server on $NATS_URL" 10 nats_up
log "nats-server $(nats-server --version | sed 's/^nats-server: //') on $NATS_URL, store $TMP/nats"

# One signing key for every node.
"$BIN" keygen --out "$TMP/keys" --kid k1 >/dev/null

# One config per node.
for i in $(seq "$N"); do
  cat >"$TMP/node-$i.toml" <<EOF
# node-$i of tools/cluster.sh
[server]
listen = "127.0.0.1:$((8080 + i))"
shards = 1
pin_cores = false               # several nodes share this machine's CPUs
drain_timeout = "1s"

[auth]
keys = [{ kid = "k1", path = "$TMP/keys/k1.pub" }]
allow_missing_origin = true     # the CLI client and scripts send no Origin

[feed]
simulator = false               # ticks come from NATS with [cluster]

[admin]
listen = "127.0.0.1:$((9090 + i))"

[cluster]
nats = ["$NATS_URL"]
node = "node-$i"

[log]
security = "$TMP/node-$i.security.jsonl"
EOF
  if ! "$BIN" check-config "$TMP/node-$i.toml" >/dev/null; then
    log "check-config refused $TMP/node-$i.toml"
    exit 1
  fi
done

# The nodes.
NODE_PIDS=()
for i in $(seq "$N"); do
  "$BIN" serve --config "$TMP/node-$i.toml" >"$TMP/node-$i.log" 2>&1 &
  PIDS+=("$!")
  NODE_PIDS+=("$!")
done
node_ready() {
  alive "${NODE_PIDS[$1 - 1]}" "node-$1" "$TMP/node-$1.log" || exit 1
  [[ $(http_status $((9090 + $1)) /readyz) == 200 ]]
}
for i in $(seq "$N"); do
  wait_for "node-$i's /readyz" 30 node_ready "$i"
  log "node-$i ready: ws://127.0.0.1:$((8080 + i))/v1/stream, admin http://127.0.0.1:$((9090 + i))"
done

# metric PORT NAME: a node's gauge or counter (empty when absent).
metric() { http_get "$1" /metrics | tr -d '\r' | awk -v n="$2" '$1 == n { print $2 }'; }

# Raw ticks are plain NATS messages: one published before a node reads <prefix>.in.> is
# lost. Wait for the ingest leader's claim.
LEADER=
has_leader() {
  local i
  for i in $(seq "$N"); do
    if [[ $(metric $((9090 + i)) tickgate_bus_ingest_leader) == 1 ]]; then
      LEADER=node-$i
      return 0
    fi
  done
  return 1
}
wait_for "an ingest leader" 30 has_leader
log "ingest leader: $LEADER"

TOKEN=$("$BIN" token --key "$TMP/keys/k1.key" --sub demo --ttl 600 \
  --roles subscriber,publisher --symbols '*')

# For --check: the subscriber on node 2 is connected and subscribed; node 2 follows the
# symbol on the bus; the tick with ts $TS arrived.
subscribed() {
  alive "$CLIENT_PID" client "$TMP/client.err" || return 2
  grep -q '"type":"subscribed"' "$TMP/client.out"
}
bus_subscribed() { [[ $(metric 9092 tickgate_bus_subscriptions) -ge 1 ]]; }
ticks_seen() { grep -c "\"type\":\"tick\",\"s\":\"BTC-USD\",\"seq\":[0-9]*,\"ts\":$TS," "$TMP/client.out"; }
got_tick() { [[ $(ticks_seen) -ge 1 ]]; }

if ((CHECK)); then
  # A subscriber on node 2, then one raw tick on NATS.
  "$BIN" client --url ws://127.0.0.1:8082/v1/stream --token "$TOKEN" \
    --symbols BTC-USD >"$TMP/client.out" 2>"$TMP/client.err" &
  CLIENT_PID=$!
  PIDS+=("$CLIENT_PID")
  TS=$(date +%s%N)
  TICK="{\"s\":\"BTC-USD\",\"ts\":$TS,\"bid\":100.25,\"ask\":100.5,\"last\":100.375,\"qty\":2}"
  ok=0
  why="the tick did not reach the subscriber on node-2"
  if wait_for "the subscriber on node-2" 10 subscribed &&
    wait_for "node-2's bus subscription for BTC-USD" 10 bus_subscribed; then
    # The subscription is taken before the head is read: give the head its moment.
    sleep 0.2
    log "publishing on tickgate.in.BTC-USD: $TICK"
    if "$PUB" --url "$NATS_URL" tickgate.in.BTC-USD "$TICK" &&
      wait_for "the tick on node-2" 10 got_tick; then
      # A second ingest leader would append it again within its claim refresh (1 s).
      sleep 1.5
      seen=$(ticks_seen)
      if ((seen == 1)); then
        ok=1
      else
        why="the tick reached the subscriber on node-2 $seen times (one raw tick, several seqs)"
      fi
    fi
  fi
  log "node-2 subscriber received:"
  sed 's/^/  /' "$TMP/client.out" >&2
  if ((ok)); then
    echo "PASS: a tick published on NATS (tickgate.in.BTC-USD) reached a subscriber on node-2 of $N, once"
    exit 0
  fi
  echo "FAIL: $why (logs below)"
  for f in "$TMP"/node-*.log "$TMP/client.err"; do
    echo "--- $f"
    tail -n 20 "$f"
  done
  exit 1
fi

REL_BIN=${BIN#"$ROOT"/}
REL_PUB=${PUB#"$ROOT"/}
cat <<EOF

$N tickgate nodes on $NATS_URL (node i: ws://127.0.0.1:808i/v1/stream, admin http://127.0.0.1:909i).
Logs and configs: $TMP

A token (sub demo, subscriber and publisher, every symbol, valid 10 minutes):

  TOKEN=$TOKEN

Subscribe, one terminal per node:

EOF
for i in $(seq "$N"); do
  echo "  $REL_BIN client --url ws://127.0.0.1:$((8080 + i))/v1/stream --token \$TOKEN --symbols BTC-USD"
done
cat <<EOF

Feed ticks as a feed handler does: one tick object per NATS message on tickgate.in.<SYMBOL>.
Every subscriber, whatever its node, gets each tick with the same seq.

  with the nats CLI (if installed):
    nats --server $NATS_URL pub tickgate.in.BTC-USD '{"s":"BTC-USD","ts":1,"bid":1,"ask":2,"last":1.5,"qty":1}'
  with this repository's example (examples/nats_pub.rs, async-nats):
    $REL_PUB --url $NATS_URL tickgate.in.BTC-USD '{"s":"BTC-USD","ts":1,"bid":1,"ask":2,"last":1.5,"qty":1}'
  with Python (pip install nats-py):
    python3 -c 'import asyncio, nats
async def main():
    nc = await nats.connect("$NATS_URL")
    await nc.publish("tickgate.in.BTC-USD", b"{\"s\":\"BTC-USD\",\"ts\":1,\"bid\":1,\"ask\":2,\"last\":1.5,\"qty\":1}")
    await nc.drain()
asyncio.run(main())'

A publisher's WebSocket "publish" on any node goes through the same order. Metrics:
http://127.0.0.1:909i/metrics (tickgate_bus_*, tickgate_ingest_*). Ctrl-C stops everything.
EOF

# Wait; a node that exits stops the rest.
while true; do
  alive "$NATS_PID" nats-server "$TMP/nats.log" || exit 1
  for i in $(seq "$N"); do
    alive "${NODE_PIDS[$i - 1]}" "node-$i" "$TMP/node-$i.log" || exit 1
  done
  sleep 1
done
