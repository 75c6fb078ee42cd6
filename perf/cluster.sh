#!/usr/bin/env bash
# The cluster scenario (docs/CLUSTER.md) side by side with the single node, in one run:
#
#   perf/cluster.sh [ROUNDS]          # ROUNDS defaults to 3; alternates the order per round
#
# Single node: the (A)/(B) setup of perf/compare.sh (one shard pinned to core 0, loadgen on
# core 1, a WebSocket publisher). Cluster: nats-server -js and two nodes of one shard each,
# ticks fed through NATS (`loadgen fanout --nats`, one message per tick on
# <prefix>.in.<SYMBOL>), subscribers split over both nodes (`--also-target`), in two
# layouts: `core0`, all three pinned to core 0 (the single node's CPU budget: the bus and
# the second node take from the first), and `shared`, the three unpinned, sharing the two
# cores with the load generator (still pinned to core 1). Rows:
#   (A)   1,000 subscribers x 10 of 100 symbols, 1,000 ticks/s: p50/p99;
#   (A10k) the same at 10,000 ticks/s (saturates both sides on this machine);
#   (H)   the bus hop alone: 100 subscribers, one symbol each, 10,000 ticks/s (no fan-out
#         cost to hide it): p50/p99, single against cluster;
#   (B)   zero-drop deliveries/s, rate stepped up to 80,000 ticks/s;
#   (I)   one node's ingest (node 2 stopped): 100 subscribers, one per symbol, stepped up;
#   (C)   CPU per ingested tick at 10,000 ticks/s on that node.
# (H) runs first on each side, on an empty stream. After it, one client per cluster node
# subscribes to all 100 symbols and stays (as a serving node keeps its symbols), so the
# other scenarios do not measure the nodes taking the symbols again; on (I) and (C) it is
# one more delivery per tick. Between scenarios the script waits until the nodes have
# taken nothing from NATS for half a second (an overloaded step leaves a backlog).
# When a cluster latency row ((H) or (A)) has a p50 over ANOMALY_US (default 4,000
# µs, about ten times a normal run's), the script saves what explains it into
# DIAG_DIR (default: a folder under /tmp, named in the output): both nodes' /metrics,
# nats-server's /varz, /connz?subs=1 and /jsz?streams=1, every thread's CPU, and the logs.
# Needs nats-server (Debian's package). Loopback only; every step is bounded in time.
set -euo pipefail

ROUNDS=${1:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
command -v nats-server >/dev/null || { echo "perf/cluster.sh: needs nats-server (apt-get install nats-server)" >&2; exit 1; }
cargo build --release -q -p tickgate -p tickgate-loadgen
# shellcheck source=perf/bench_config.sh
. "$ROOT/perf/bench_config.sh"
TARGET_DIR=$(bench_target_dir)
TG="$TARGET_DIR/release/tickgate"
LG="$TARGET_DIR/release/loadgen"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

NATS_PORT=${NATS_PORT:-14322}
"$TG" keygen --out "$TMP/keys" >/dev/null
bench_config "$TMP/single.toml" "$TMP/keys" 18280 19280 "$TMP"
for n in 1 2; do
  bench_config "$TMP/n$n.toml" "$TMP/keys" $((18280 + n)) $((19280 + n)) "$TMP"
  cat >>"$TMP/n$n.toml" <<CFG

[cluster]
nats = ["nats://127.0.0.1:$NATS_PORT"]
node = "bench-$n"
subject_prefix = "bench"
CFG
done

wait_ready() { # ADMIN_PORT
  for _ in $(seq 1 400); do
    if curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  echo "node on admin port $1 not ready" >&2; exit 2
}
leader_up() {
  for _ in $(seq 1 200); do
    for a in 19281 19282; do
      curl -fsS "http://127.0.0.1:$a/metrics" 2>/dev/null | grep -q '^tickgate_bus_ingest_leader 1' && return 0
    done
    sleep 0.05
  done
  echo "no ingest leader" >&2; exit 2
}

# Waits until the nodes on these admin ports have taken nothing from NATS for half a second
# (at most 60 s): no tick and no history read back. So a scenario never measures the
# backlog an overloaded one left queued in NATS and the nodes (the (B) and (I) searches end
# past the knee on purpose), nor the history the holders' symbols are read back with.
settle() { # ADMIN_PORT...
  local before="" now waited=0
  while (( waited < 120 )); do
    now=$(for a in "$@"; do curl -fsS "http://127.0.0.1:$a/metrics" 2>/dev/null |
      awk '/^tickgate_bus_(received|backfilled_ticks)_total /{print $2}'; done | awk '{s += $1} END {print s + 0}')
    [[ -n $before && $now == "$before" ]] && break
    before=$now; sleep 0.5; waited=$((waited + 1))
  done
  (( waited > 2 )) && echo "  (waited $((waited / 2)) s for the nodes to drain what the last scenario left)" >&2
  return 0
}

RES="$TMP/res.jsonl"
: >"$RES"
run_lg() { # LABEL PID ARGS...
  local label=$1 pid=$2; shift 2
  taskset -c 1 "$LG" "$@" --server-pid "$pid" --key "$TMP/keys/k1.key" --label "$label" --json \
    >"$TMP/out.txt" 2>"$TMP/err.txt" || echo "  (loadgen exit $? for $label: $(tail -1 "$TMP/err.txt"))" >&2
  grep '^{' "$TMP/out.txt" >>"$RES" || true
  diagnose "$label"
}
NATS_MON=${NATS_MON:-18222}
ANOMALY_US=${ANOMALY_US:-4000}
DIAG_DIR=${DIAG_DIR:-$(dirname "$TMP")/tickgate-cluster-diag-$(date -u +%Y%m%dT%H%M%SZ)}
# A cluster latency row far off the normal: save the state of the nodes and the bus.
diagnose() { # LABEL
  local label=$1 p50
  # (A10k) is left out: it saturates both sides on this machine (p50 8-45 ms normally).
  [[ $label == H:* || $label == A:* ]] || return 0
  [[ $label == *:single:* ]] && return 0
  p50=$(grep '^{' "$TMP/out.txt" | tail -1 | python3 -c 'import json, sys
print(int(json.loads(sys.stdin.read()).get("p50_us") or 0))' 2>/dev/null || echo 0)
  (( p50 > ANOMALY_US )) || return 0
  local d="$DIAG_DIR/${label//:/-}"
  mkdir -p "$d" || return 0
  echo "  !! $label: p50 $p50 µs over $ANOMALY_US µs; state saved in $d" >&2
  for a in 19281 19282; do curl -fsS "http://127.0.0.1:$a/metrics" >"$d/metrics-$a.txt" 2>/dev/null || true; done
  for q in varz "connz?subs=1" "jsz?streams=1"; do
    curl -fsS "http://127.0.0.1:$NATS_MON/$q" >"$d/nats-${q%%\?*}.json" 2>/dev/null || true
  done
  ps -eLo pid,tid,psr,pcpu,stat,comm >"$d/threads.txt" 2>/dev/null || true
  cat /proc/loadavg >"$d/loadavg.txt" || true
  cp "$TMP/out.txt" "$TMP/err.txt" "$TMP/n1.log" "$TMP/n2.log" "$TMP/nats.log" "$d/" 2>/dev/null || true
}
A=(fanout --subscribers 1000 --symbols 100 --per-sub 10 --warmup 1 --duration 4)
B=(fanout --subscribers 1000 --symbols 100 --per-sub 10
   --rates 5000,10000,15000,20000,25000,30000,40000,50000,60000,80000
   --stop-on-drop --warmup 0.5 --duration 2 --drain 0.5)
H=(fanout --subscribers 100 --symbols 100 --per-sub 1 --rate 10000 --warmup 1 --duration 4)

single() { # ROUND
  taskset -c 0 "$TG" serve --config "$TMP/single.toml" >"$TMP/single.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  wait_ready 19280
  run_lg "H:single:$1" "$pid" "${H[@]}" --target 127.0.0.1:18280
  run_lg "A:single:$1" "$pid" "${A[@]}" --rate 1000 --target 127.0.0.1:18280
  run_lg "A10k:single:$1" "$pid" "${A[@]}" --rate 10000 --target 127.0.0.1:18280
  run_lg "B:single:$1" "$pid" "${B[@]}" --target 127.0.0.1:18280
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

cluster() { # ROUND LAYOUT (core0: nats and both nodes on core 0; shared: unpinned)
  local cores=0 side="core0"
  [[ $2 == shared ]] && cores=0,1 side="shared"
  rm -rf "$TMP/js"
  taskset -c $cores nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON" -sd "$TMP/js" >"$TMP/nats.log" 2>&1 &
  local np=$!; PIDS+=("$np")
  sleep 0.3
  taskset -c $cores "$TG" serve --config "$TMP/n1.toml" >"$TMP/n1.log" 2>&1 &
  local p1=$!; PIDS+=("$p1")
  taskset -c $cores "$TG" serve --config "$TMP/n2.toml" >"$TMP/n2.log" 2>&1 &
  local p2=$!; PIDS+=("$p2")
  wait_ready 19281; wait_ready 19282; leader_up
  local via=(--target 127.0.0.1:18281 --also-target 127.0.0.1:18282 --nats "nats://127.0.0.1:$NATS_PORT" --nats-prefix bench)
  # The hop first, on an empty stream (nothing to read back) and with no other client.
  run_lg "H:$side:$1" "$p1" "${H[@]}" "${via[@]}"
  settle 19281 19282
  # Then one client per node holds the 100 symbols for the whole layout, as a node serving
  # traffic does: the scenarios measure the steady state, not each scenario's first
  # subscribers making the nodes take the symbols again (head, then history read behind
  # the live ticks: up to feed.history messages per symbol through NATS).
  local tok syms
  tok=$("$TG" token --key "$TMP/keys/k1.key" --sub holder --symbols '*' --ttl 900 2>/dev/null)
  syms=$(seq -f 'S%04g' 0 99 | paste -sd,)
  for port in 18281 18282; do
    taskset -c 1 "$TG" client --url "ws://127.0.0.1:$port/v1/stream" --token "$tok" \
      --symbols "$syms" --no-reconnect >/dev/null 2>&1 &
    PIDS+=("$!")
  done
  sleep 0.5; settle 19281 19282
  run_lg "A:$side:$1" "$p1" "${A[@]}" --rate 1000 "${via[@]}"
  settle 19281 19282
  run_lg "A10k:$side:$1" "$p1" "${A[@]}" --rate 10000 "${via[@]}"
  settle 19281 19282
  run_lg "B:$side:$1" "$p1" "${B[@]}" "${via[@]}"
  # One node's ingest: node 2 stopped, node 1 leads (after the claim expires) and has one
  # subscriber per symbol.
  kill "$p2"; wait "$p2" 2>/dev/null || true
  leader_up; settle 19281
  run_lg "I:$side:$1" "$p1" fanout --subscribers 100 --symbols 100 --per-sub 1 \
    --rates 5000,10000,20000,40000,80000,160000 --stop-on-drop --warmup 0.5 --duration 2 --drain 0.5 \
    --target 127.0.0.1:18281 --nats "nats://127.0.0.1:$NATS_PORT" --nats-prefix bench
  settle 19281
  run_lg "C:$side:$1" "$p1" fanout --subscribers 100 --symbols 100 --per-sub 1 --rate 10000 \
    --warmup 1 --duration 4 --target 127.0.0.1:18281 --nats "nats://127.0.0.1:$NATS_PORT" --nats-prefix bench
  kill "$p1" "$np"; wait "$p1" "$np" 2>/dev/null || true
}

echo "# $(date -u +%FT%TZ) nproc=$(nproc) $(uname -r) $(nats-server --version) load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then single "$r"; cluster "$r" core0; cluster "$r" shared
  else cluster "$r" shared; cluster "$r" core0; single "$r"; fi
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$RES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def pick(prefix):
    return [r for r in rows if r.get("label", "").startswith(prefix)]
def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals: return "-"
    return f"{statistics.median(vals):,.0f} ({min(vals):,.0f}-{max(vals):,.0f}, n={len(vals)})"
for side in ("single", "core0", "shared"):
    for m in ("A", "A10k", "H"):
        a = pick(f"{m}:{side}:")
        print(f"{side:8} ({m}) p50 us {med([r.get('p50_us') for r in a])}; p99 us {med([r.get('p99_us') for r in a])}")
    b = pick(f"B:{side}:")
    print(f"{side:8} (B) zero-drop deliveries/s {med([r.get('max_zero_drop_deliveries_per_s') for r in b])}")
    # How long those deliveries took: the p50 of each run's highest zero-drop step (a
    # search passes a step that queues, as long as every tick arrives by its drain).
    tops = []
    for s in b:
        top = s.get("max_zero_drop_rate_ticks_per_s")
        steps = [r for r in b if r["label"] == s["label"] and r.get("rate_ticks_per_s") == top and "step" in r]
        if steps and isinstance(steps[-1].get("p50_us"), (int, float)):
            tops.append(steps[-1]["p50_us"])
    print(f"{side:8} (B) p50 us at that rate {med(tops)}")
for side in ("core0", "shared"):
    hops = []
    for h in pick(f"H:{side}:"):
        rnd = h["label"].split(":")[-1]
        base = [r for r in pick(f"H:single:{rnd}") if isinstance(r.get("p50_us"), (int, float))]
        if base and isinstance(h.get("p50_us"), (int, float)):
            hops.append(h["p50_us"] - base[0]["p50_us"])
    print(f"{side:8} (H) the bus hop, added p50 us (cluster minus single, same round): {med(hops)}")
for side in ("core0", "shared"):
    i = pick(f"I:{side}:")
    print(f"{side:8} one node's ingest, zero-drop ticks/s (1 subscriber per symbol): {med([r.get('max_zero_drop_deliveries_per_s') for r in i])}")
c = pick("C:")
for r in c:
    cpu = r.get("server_cpu_pct")
    if isinstance(cpu, (int, float)):
        print(f"  {r['label']}: 10,000 ticks/s in, node CPU {cpu:.0f}% of a core = {cpu / 100 * 10:.2f} s of CPU per 100,000 ingested ticks; p50/p99 {r.get('p50_us')}/{r.get('p99_us')} us")
print()
for r in rows:
    keys = ("p50_us", "p99_us", "server_cpu_pct", "max_zero_drop_deliveries_per_s", "delivered", "expected", "pub_max_lag_us")
    print(r.get("label"), {k: r[k] for k in keys if k in r})
PY
