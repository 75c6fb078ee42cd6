#!/usr/bin/env bash
# Side-by-side: tickgate vs the baseline (tools/baseline), same scenarios, back to back.
#
#   perf/compare.sh           # full run (~2 minutes after a ~2.5-minute build)
#   perf/compare.sh --quick   # ~1 minute version (shorter steps, fewer idle connections)
#
# Output: the table on stdout, then the raw JSON lines, then where the latency plot of (A)
# went: perf/latency.svg (or $PLOT), tickgate, the baseline and the floor (F) on one
# latency-by-percentile plot (`loadgen plot`, from each run's `--save-hist`).
#
# Server on core 0 (`taskset -c 0`; tickgate with shards=1, the baseline with one tokio
# worker thread), load generator on core 1 (`taskset -c 1`, one tokio worker). Scenarios:
#   (A) 1,000 subscribers x 10 of 100 symbols, 1,000 ticks/s (100,000 deliveries/s)
#   (B) the same, rate stepped up until the first step with drops: highest zero-drop rate
#   (C) 10,000 idle authenticated connections: server RSS per connection
#   (D) handshake storm: authenticated upgrades/s (64 concurrent workers, 8 source addresses)
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

bench_scratch

TG_PORT=18080; TG_ADMIN=19090; BL_PORT=18090
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
# placed within a factor of two, in 8 steps of 3.5 s (the whole run, build included,
# stays under five minutes on a 2-core VM). Zero drops means every tick was received by
# the end of the step's drain: a server slightly over capacity builds a backlog it
# cannot flush in the drain, and that shows as drops.
RATES=250,500,1000,2000,5000,10000,20000,40000
KEY="$TMP/keys/k1.key"
RES="$TMP/results.jsonl"
: >"$RES"

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server on port $1 did not come up" >&2; exit 2
}
start() { # $1 = tickgate|baseline
  if [[ $1 == tickgate ]]; then
    taskset -c 0 "$TG" serve --config "$TMP/tickgate.toml" >"$TMP/tickgate.log" 2>&1 &
    SPID=$!; PORT=$TG_PORT
  else
    taskset -c 0 "$BL" --listen "127.0.0.1:$BL_PORT" --key-dir "$TMP/keys" --threads 1 >"$TMP/baseline.log" 2>&1 &
    SPID=$!; PORT=$BL_PORT
  fi
  wait_port "$PORT"
}
stop() { bench_stop; sleep 0.3; }
lg() { # $1 = label, rest = loadgen args
  local label=$1; shift
  taskset -c 1 "$LG" "$@" --target "127.0.0.1:$PORT" --key "$KEY" --label "$label" --json \
    >"$TMP/out.txt" 2>"$TMP/err.txt" || echo "  (loadgen exit $? for $label: $(tail -1 "$TMP/err.txt"))" >&2
  grep '^{' "$TMP/out.txt" >>"$RES" || true
}

echo "# $(date -u +%FT%TZ)  nproc=$(nproc)  $(uname -r)  nofile=$NOFILE  load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
T0=$SECONDS
for S in tickgate baseline; do
  echo "# [$S] (A) fanout 1000 x 10/100 @ 1000 ticks/s" >&2
  start "$S"
  lg "A:$S" fanout --subscribers 1000 --symbols 100 --per-sub 10 --rate 1000 --warmup "$A_WARM" --duration "$A_DUR" --server-pid "$SPID" \
    --save-hist "$TMP/A-$S.hist"
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
done
echo "# (F) machine floor for (A): loadgen floor, no server" >&2
taskset -c 0,1 "$LG" floor --subscribers 1000 --symbols 100 --per-sub 10 --rate 1000 \
  --warmup "$A_WARM" --duration "$A_DUR" --label "F:floor" --json --save-hist "$TMP/A-floor.hist" \
  >"$TMP/out.txt" 2>"$TMP/err.txt" ||
  echo "  (loadgen floor exit $?: $(tail -1 "$TMP/err.txt"))" >&2
grep '^{' "$TMP/out.txt" >>"$RES" || true
echo "# scenarios took $((SECONDS - T0)) s; load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# (A)'s latency by percentile distribution: the three runs on one SVG (a run that failed
# is left out; the plot is skipped if none has a histogram).
PLOT=${PLOT:-$ROOT/perf/latency.svg}
PLOT_ARGS=()
for s in tickgate baseline floor; do
  name=$s; [[ $s == floor ]] && name="floor (F, no server)"
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

python3 - "$RES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
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
def row(name, t, b, better):  # better: "low" or "high"
    ratio = "-"
    if isinstance(t, (int, float)) and isinstance(b, (int, float)) and t and b:
        ratio = f"{(b / t) if better == 'low' else (t / b):.1f}x"
    lines.append((name, fmt(t), fmt(b), ratio))
def one(label, mode):
    r = get(label, mode); return r[-1] if r else {}
for key, what in [("p50_us","low"),("p99_us","low"),("p999_us","low"),("delivered_per_s","high"),("delivery_pct","high"),("drops","low"),("server_cpu_pct","low"),("server_runq_wait_pct","low"),("client_cpu_pct","low")]:
    row(f"(A) {key}", one("A:tickgate","fanout").get(key), one("A:baseline","fanout").get(key), what)
bt, bb = one("B:tickgate","search"), one("B:baseline","search")
row("(B) zero-drop deliveries/s", bt.get("max_zero_drop_deliveries_per_s"), bb.get("max_zero_drop_deliveries_per_s"), "high")
row("(B) zero-drop ticks/s", bt.get("max_zero_drop_rate_ticks_per_s"), bb.get("max_zero_drop_rate_ticks_per_s"), "high")
def at(label, rate):
    r = get(label, "fanout", lambda r: r.get("rate_ticks_per_s") == rate); return r[-1] if r else {}
pt, pb = at("B:tickgate", bt.get("max_zero_drop_rate_ticks_per_s")), at("B:baseline", bb.get("max_zero_drop_rate_ticks_per_s"))
row("(B) p99_us at that rate", pt.get("p99_us"), pb.get("p99_us"), "low")
ct, cb = one("C:tickgate","idle"), one("C:baseline","idle")
row("(C) established", ct.get("established"), cb.get("established"), "high")
row("(C) RSS/conn KiB", ct.get("rss_per_conn_kib"), cb.get("rss_per_conn_kib"), "low")
dt, db = one("D:tickgate","handshake"), one("D:baseline","handshake")
row("(D) upgrades/s", dt.get("accepted_per_s"), db.get("accepted_per_s"), "high")
row("(D) p99_us", dt.get("p99_us"), db.get("p99_us"), "low")
row("(D) server_cpu_pct", dt.get("server_cpu_pct"), db.get("server_cpu_pct"), "low")
row("(D) server_runq_wait_pct", dt.get("server_runq_wait_pct"), db.get("server_runq_wait_pct"), "low")
row("(D) rejected+errors", (dt.get("rejected",0) or 0)+(dt.get("errors",0) or 0) if dt else None,
    (db.get("rejected",0) or 0)+(db.get("errors",0) or 0) if db else None, "low")
w = max(len(l[0]) for l in lines)
print(f"{'scenario / metric':<{w}}  {'tickgate':>14}  {'baseline':>14}  {'tickgate advantage':>18}")
for n, t, b, r in lines:
    print(f"{n:<{w}}  {t:>14}  {b:>14}  {r:>18}")
print()
# (F): not a server, so its own block: the latency (A) would have with a server that cost
# nothing (loopback TCP, wake-ups and the host's scheduling remain).
fl = one("F:floor", "floor")
ta = one("A:tickgate", "fanout")
print("(F) machine floor for (A): loadgen floor, no server")
for key in ("p50_us", "p99_us", "p999_us", "drops", "sender_cpu_pct", "sender_ns_per_send"):
    v, t = fl.get(key), ta.get(key)
    extra = ""
    if key.endswith("_us") and isinstance(v, (int, float)) and isinstance(t, (int, float)) and v:
        extra = f"   tickgate (A) / floor: {t / v:.1f}x"
    print(f"  {key:<20} {fmt(v):>14}{extra}")
print()
print("raw JSON lines:")
for r in rows: print(json.dumps(r, sort_keys=True))
PY
echo
echo "$PLOT_MSG"
