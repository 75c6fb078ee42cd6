#!/usr/bin/env bash
# Side-by-side: tickgate vs the baseline (tools/baseline), same scenarios, back to back;
# optionally a third server, the uWebSockets peer (tools/peers/uws).
#
#   perf/compare.sh           # full run (~2.5 minutes after a ~2.5-minute build)
#   perf/compare.sh --quick   # ~1.5 minute version (shorter steps, fewer idle connections)
#   UWS_PEER=/path/to/uws-peer perf/compare.sh [--quick]
#                             # the same with the uWebSockets peer as a third column
#   BUSY_POLL=1s perf/compare.sh [--quick]
#                             # and tickgate with `server.busy_poll = BUSY_POLL` as one more
#                             # column ("tickgate bp"), right after tickgate's
#
# UWS_PEER: a binary of tools/peers/uws/main.cpp (tools/peers/uws/build.sh builds it from the
# pinned uWebSockets and uSockets commits), a single-threaded uWebSockets pub/sub
# server speaking the baseline's protocol (app.publish per tick, a topic per symbol, 1 MiB
# backpressure limit, no compression, no SSL; perf/RESULTS.md, "uWebSockets peer", says
# which uWebSockets and uSockets commits it was measured with). It runs every scenario
# below after the baseline, started as `UWS_PEER --listen 127.0.0.1:18091 --key-dir KEYS`
# on core 0 like the others, and adds a column to the table ("uWebSockets"), its JSON lines
# (labels `A:uws`, `B:uws`, ...) and a line to the plot. Without UWS_PEER nothing of it runs.
#
# Output: the table on stdout, then the raw JSON lines, then where the latency plot of (A)
# went: perf/latency.svg (or $PLOT), tickgate, the baseline (with UWS_PEER, the peer) and the
# floor (F) on one latency-by-percentile plot (`loadgen plot`, from each run's `--save-hist`).
#
# Server on core 0 (`taskset -c 0`; tickgate with shards=1, the baseline with one tokio
# worker thread, the uWebSockets peer single-threaded), load generator on core 1
# (`taskset -c 1`, one tokio worker). On a host with more cores, LG_CORES=1-3 LG_THREADS=3
# gives the load generator three cores and three workers: on two cores its one core reads
# as slowly as a server sends, and (A)'s latency runs at its pace (perf/RESULTS.md).
# Scenarios:
#   (A) 1,000 subscribers x 10 of 100 symbols, 1,000 ticks/s (100,000 deliveries/s)
#   (B) the same, rate stepped up until the first step with drops: highest zero-drop rate
#   (C) 10,000 idle authenticated connections: server RSS per connection
#   (D) handshake storm: authenticated upgrades/s (64 concurrent workers, 8 source addresses)
#   (E) 10,000 subscribers x 1 of 100 symbols, 1,000 ticks/s (100,000 deliveries/s), a
#       fresh server, connections from 8 source addresses
#   (G) (A)'s connections at 10,000 ticks/s (1,000,000 deliveries/s), right after (A) on
#       the same server: latency near the top of what one core sends
#   (F) the machine's floor for (A): `loadgen floor`, no server at all (an ideal sender
#       thread on core 0 writing pre-built records to the same 1,000 loopback connections,
#       an ideal epoll receiver on core 1): the latency (A) would have if the server's
#       own work cost nothing
# Not run here: `loadgen abuse --attack head|pings|silent|admin|symbols`, replays of five
# denial-of-service attacks with a watcher measuring the service to others (pass/fail per
# build, not a benchmark; usage at the top of tools/loadgen/src/main.rs).
# Needs: cargo, taskset, python3 (for the table). Loopback only. Builds what it needs
# (release) first.
set -euo pipefail

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
echo "# building (release): tickgate, tickgate-loadgen, tickgate-baseline" >&2
cargo build --release -q -p tickgate -p tickgate-loadgen -p tickgate-baseline
# shellcheck source=perf/bench_config.sh
. "$ROOT/perf/bench_config.sh"
TARGET_DIR=$(bench_target_dir)
TG="$TARGET_DIR/release/tickgate"
LG="$TARGET_DIR/release/loadgen"
BL="$TARGET_DIR/release/baseline"
SERVERS=(tickgate baseline)
[[ -n "${BUSY_POLL:-}" ]] && SERVERS=(tickgate tgbp baseline)
if [[ -n "${UWS_PEER:-}" ]]; then
  [[ -x "$UWS_PEER" ]] || { echo "UWS_PEER=$UWS_PEER: not an executable file" >&2; exit 1; }
  SERVERS+=(uws)
fi

bench_scratch

TG_PORT=18080; TG_ADMIN=19090; BL_PORT=18090; UWS_PORT=18091
"$TG" keygen --out "$TMP/keys" >/dev/null
# The load generator opens its connections from one address (or eight): let its whole
# connect burst wait in the upgrade at once.
bench_config "$TMP/tickgate.toml" "$TMP/keys" "$TG_PORT" "$TG_ADMIN" "$TMP" \
  "per_ip_pending_handshakes = 1024"

# Idle connections need descriptors on both sides.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
NOFILE=$(ulimit -n)

if [[ $QUICK == 1 ]]; then
  A_WARM=1; A_DUR=4; B_WARM=0.5; B_DUR=2; B_DRAIN=0.5; C_N=5000; D_DUR=3
else
  A_WARM=2; A_DUR=10; B_WARM=0.5; B_DUR=2; B_DRAIN=1; C_N=10000; D_DUR=5
fi
# Roughly doubling steps: a server that keeps up at one step and not at the next is
# placed within a factor of two, in steps of 3.5 s (the whole run, build included,
# stays around five minutes on a 2-core VM; UWS_PEER adds half the scenario time). Zero
# drops means every tick was received by the end of the step's drain: a server slightly
# over capacity builds a backlog it cannot flush in the drain, and that shows as drops.
# The steps from 20,000 ticks/s on are 10,000 apart (2-8 million deliveries/s), to place
# both knees: uWebSockets' (between 1 and 3 million in every run so far) and tickgate's
# own, above the 4,000,000 of the earlier top step.
RATES=250,500,1000,2000,5000,10000,20000,30000,40000,50000,60000,70000,80000
KEY="$TMP/keys/k1.key"
RES="$TMP/results.jsonl"
: >"$RES"

wait_port() { bench_wait_port "$1"; }
start() { # $1 = tickgate|tgbp|baseline|uws
  if [[ $1 == tickgate || $1 == tgbp ]]; then
    # tgbp: the same server with busy polling.
    TICKGATE_SERVER_BUSY_POLL=$([[ $1 == tgbp ]] && echo "$BUSY_POLL" || echo 0s) \
      taskset -c 0 "$TG" serve --config "$TMP/tickgate.toml" >"$TMP/$1.log" 2>&1 &
    SPID=$!; PORT=$TG_PORT
  elif [[ $1 == uws ]]; then
    taskset -c 0 "$UWS_PEER" --listen "127.0.0.1:$UWS_PORT" --key-dir "$TMP/keys" >"$TMP/uws.log" 2>&1 &
    SPID=$!; PORT=$UWS_PORT
  else
    taskset -c 0 "$BL" --listen "127.0.0.1:$BL_PORT" --key-dir "$TMP/keys" --threads 1 >"$TMP/baseline.log" 2>&1 &
    SPID=$!; PORT=$BL_PORT
  fi
  wait_port "$PORT"
}
stop() { bench_stop; sleep 0.3; }
lg() { # $1 = label, rest = loadgen args
  local label=$1; shift
  taskset -c "${LG_CORES:-1}" "$LG" "$@" --threads "${LG_THREADS:-1}" --target "127.0.0.1:$PORT" \
    --key "$KEY" --label "$label" --json \
    >"$TMP/out.txt" 2>"$TMP/err.txt" || echo "  (loadgen exit $? for $label: $(tail -1 "$TMP/err.txt"))" >&2
  grep '^{' "$TMP/out.txt" >>"$RES" || true
}

echo "# $(date -u +%FT%TZ)  nproc=$(nproc)  $(uname -r)  nofile=$NOFILE  load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
T0=$SECONDS
for S in "${SERVERS[@]}"; do
  echo "# [$S] (A) fanout 1000 x 10/100 @ 1000 ticks/s" >&2
  start "$S"
  lg "A:$S" fanout --subscribers 1000 --symbols 100 --per-sub 10 --rate 1000 --warmup "$A_WARM" --duration "$A_DUR" --server-pid "$SPID" \
    --save-hist "$TMP/A-$S.hist"
  echo "# [$S] (G) fanout 1000 x 10/100 @ 10000 ticks/s" >&2
  lg "G:$S" fanout --subscribers 1000 --symbols 100 --per-sub 10 --rate 10000 --warmup "$A_WARM" --duration "$A_DUR" --server-pid "$SPID"
  echo "# [$S] (B) zero-drop search over $RATES ticks/s" >&2
  lg "B:$S" fanout --subscribers 1000 --symbols 100 --per-sub 10 --rates "$RATES" --stop-on-drop \
    --warmup "$B_WARM" --duration "$B_DUR" --drain "$B_DRAIN" --server-pid "$SPID"
  stop
  echo "# [$S] (C) $C_N idle connections" >&2
  start "$S"
  lg "C:$S" idle --connections "$C_N" --sources 8 --hold 2 --settle 1 --server-pid "$SPID"
  stop
  echo "# [$S] (D) handshake storm" >&2
  start "$S"
  lg "D:$S" handshake --concurrency 64 --sources 8 --duration "$D_DUR" --server-pid "$SPID"
  stop
  echo "# [$S] (E) fanout 10000 x 1/100 @ 1000 ticks/s" >&2
  start "$S"
  lg "E:$S" fanout --subscribers 10000 --symbols 100 --per-sub 1 --rate 1000 --sources 8 \
    --warmup "$A_WARM" --duration "$A_DUR" --server-pid "$SPID"
  stop
done
echo "# (F) machine floor for (A): loadgen floor, no server" >&2
taskset -c 0,1 "$LG" floor --subscribers 1000 --symbols 100 --per-sub 10 --rate 1000 \
  --warmup "$A_WARM" --duration "$A_DUR" --label "F:floor" --json --save-hist "$TMP/A-floor.hist" \
  >"$TMP/out.txt" 2>"$TMP/err.txt" ||
  echo "  (loadgen floor exit $?: $(tail -1 "$TMP/err.txt"))" >&2
grep '^{' "$TMP/out.txt" >>"$RES" || true
echo "# scenarios took $((SECONDS - T0)) s; load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# (A)'s latency by percentile distribution: the runs on one SVG (a run that failed is left
# out; the plot is skipped if none has a histogram).
PLOT=${PLOT:-$ROOT/perf/latency.svg}
PLOT_ARGS=()
for s in "${SERVERS[@]}" floor; do
  name=$s; [[ $s == floor ]] && name="floor (F, no server)"; [[ $s == uws ]] && name="uWebSockets"
  [[ $s == tgbp ]] && name="tickgate, busy_poll $BUSY_POLL"
  [[ -s "$TMP/A-$s.hist" ]] && PLOT_ARGS+=(--series "$name=$TMP/A-$s.hist")
done
PLOT_MSG="latency plot (A): not written (no histogram saved)"
if [[ ${#PLOT_ARGS[@]} -gt 0 ]]; then
  if "$LG" plot --out "$PLOT" "${PLOT_ARGS[@]}" \
    --title "(A) 1,000 subscribers x 10 of 100 symbols, 1,000 ticks/s: latency by percentile" \
    --note "perf/compare.sh$([[ $QUICK == 1 ]] && echo ' --quick'), ${A_DUR} s measured, $(date -u +%F), $(nproc) CPUs, $(uname -r); server on core 0, loadgen on core 1" \
    >"$TMP/plot.txt" 2>"$TMP/err.txt"; then
    PLOT_MSG="latency plot (A): $PLOT"
  else
    PLOT_MSG="latency plot (A): not written: $(tail -1 "$TMP/err.txt")"
  fi
fi
echo "# $PLOT_MSG" >&2

python3 - "$RES" "${SERVERS[@]}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
servers = sys.argv[2:]  # tickgate first, then the others it is compared with
title = {"tickgate": "tickgate", "tgbp": "tickgate bp", "baseline": "baseline", "uws": "uWebSockets"}
def get(label, mode=None, pred=None):
    out = [r for r in rows if r.get("label") == label and (mode is None or r.get("mode") == mode)]
    if pred: out = [r for r in out if pred(r)]
    return out
def fmt(v):
    if v is None: return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)
lines = []
def row(name, vals, better):  # vals: one value per server; better: "low" or "high"
    t = vals[0]
    ratios = []
    for b in vals[1:]:
        ratio = "-"
        if isinstance(t, (int, float)) and isinstance(b, (int, float)) and t and b:
            ratio = f"{(b / t) if better == 'low' else (t / b):.1f}x"
        ratios.append(ratio)
    lines.append((name, [fmt(v) for v in vals], ratios))
def one(label, mode):
    r = get(label, mode); return r[-1] if r else {}
def each(scen, mode, key):
    return [one(f"{scen}:{s}", mode).get(key) for s in servers]
for key, what in [("p50_us","low"),("p99_us","low"),("p999_us","low"),("delivered_per_s","high"),("delivery_pct","high"),("drops","low"),("server_cpu_pct","low"),("server_runq_wait_pct","low"),("client_cpu_pct","low")]:
    row(f"(A) {key}", each("A", "fanout", key), what)
for key, what in [("p50_us","low"),("p99_us","low"),("delivered_per_s","high"),("drops","low"),("server_cpu_pct","low")]:
    row(f"(G) {key}", each("G", "fanout", key), what)
row("(B) zero-drop deliveries/s", each("B", "search", "max_zero_drop_deliveries_per_s"), "high")
row("(B) zero-drop ticks/s", each("B", "search", "max_zero_drop_rate_ticks_per_s"), "high")
def at(label, rate):
    r = get(label, "fanout", lambda r: r.get("rate_ticks_per_s") == rate); return r[-1] if r else {}
row("(B) p99_us at that rate", [at(f"B:{s}", one(f"B:{s}", "search").get("max_zero_drop_rate_ticks_per_s")).get("p99_us") for s in servers], "low")
row("(C) established", each("C", "idle", "established"), "high")
row("(C) RSS/conn KiB", each("C", "idle", "rss_per_conn_kib"), "low")
row("(D) upgrades/s", each("D", "handshake", "accepted_per_s"), "high")
row("(D) p99_us", each("D", "handshake", "p99_us"), "low")
row("(D) server_cpu_pct", each("D", "handshake", "server_cpu_pct"), "low")
row("(D) server_runq_wait_pct", each("D", "handshake", "server_runq_wait_pct"), "low")
def failed(d): return (d.get("rejected",0) or 0)+(d.get("errors",0) or 0) if d else None
row("(D) rejected+errors", [failed(one(f"D:{s}", "handshake")) for s in servers], "low")
for key, what in [("p50_us","low"),("p99_us","low"),("p999_us","low"),("delivered_per_s","high"),("delivery_pct","high"),("drops","low"),("server_cpu_pct","low")]:
    row(f"(E) {key}", each("E", "fanout", key), what)
w = max(len(l[0]) for l in lines)
ratio_heads = ["tickgate advantage"] if len(servers) == 2 else [f"vs {title[s]}" for s in servers[1:]]
print(f"{'scenario / metric':<{w}}  " + "  ".join(f"{title[s]:>14}" for s in servers) + "  " + "  ".join(f"{h:>18}" for h in ratio_heads))
for n, vals, ratios in lines:
    print(f"{n:<{w}}  " + "  ".join(f"{v:>14}" for v in vals) + "  " + "  ".join(f"{r:>18}" for r in ratios))
print()
# (F): not a server, so its own block: the latency (A) would have with a server that cost
# nothing (loopback TCP, wake-ups and the host's scheduling remain).
fl = one("F:floor", "floor")
print("(F) machine floor for (A): loadgen floor, no server")
for key in ("p50_us", "p99_us", "p999_us", "drops", "sender_cpu_pct", "sender_ns_per_send"):
    v = fl.get(key)
    extra = ""
    for s in servers:
        t = one(f"A:{s}", "fanout").get(key)
        if s != "baseline" and key.endswith("_us") and isinstance(v, (int, float)) and isinstance(t, (int, float)) and v:
            extra += f"   {title[s]} (A) / floor: {t / v:.1f}x"
    print(f"  {key:<20} {fmt(v):>14}{extra}")
print()
print("raw JSON lines:")
for r in rows: print(json.dumps(r, sort_keys=True))
PY
echo
echo "$PLOT_MSG"
