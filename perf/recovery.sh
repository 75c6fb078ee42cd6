#!/usr/bin/env bash
# Recovery on reconnect (issue 19): (A) of perf/compare.sh with and without a reconnect
# storm, alternating round by round on fresh servers so both sides see the same minutes
# of a shared host.
#
#   perf/recovery.sh [ROUNDS]      # ROUNDS of each side, default 3 (~25 s per run)
#   STORM_PER_SUB=1 perf/recovery.sh   # a smaller storm: one symbol per storm client
#   STORM_BACK=0 perf/recovery.sh      # control: the same 1,000 connections, nothing to replay
#   STORM_NICE=19 perf/recovery.sh     # the storm clients' thread at nice 19 (default 0): they
#                                      # get only the generator core's spare time, as clients
#                                      # on other machines would take none of it
#   STORM_IDLE=1 perf/recovery.sh      # the storm clients' thread as SCHED_IDLE: it runs only
#                                      # when the measuring clients leave the core idle
#   STORM_CORE=0 perf/recovery.sh      # the storm clients' thread on core 0 (the server's; with
#                                      # STORM_IDLE=1 it takes only the server's idle time): the
#                                      # kernel's work for the storm's sockets then runs on the
#                                      # server's core, as for clients on other machines
#   STORM_ELSEWHERE=1 perf/recovery.sh # control: the storm goes to a second server (core 1)
#                                      # that the staying subscribers' server shares nothing
#                                      # with: what is left is the generator's and the host's
#   PUB_CORE=0 perf/recovery.sh        # the publisher's thread on core 0 (the server's), out
#                                      # of the clients' core
#   TG=/path/to/tickgate perf/recovery.sh  # another build of the server (before/after pairs)
#   ARRIVAL=1 perf/recovery.sh         # staying subscribers read one tick per recvmsg, so the
#                                      # arrival figures (below) are exact
#
# (A): 1,000 subscribers x 10 of 100 symbols, 1,000 ticks/s (100,000 deliveries/s), 10 s
# measured after 2 s of warm-up; server on core 0 (`taskset -c 0`, shards = 1,
# feed.history = 1000), load generator on core 1 (one tokio worker). Both sides first
# publish 600 ticks per symbol (`--prefill 600`, ~1.2 s) so the history reaches back.
# The storm side adds, 3 s into the window, 1,000 more clients (10 of the 100 symbols
# each) that all connect at once and subscribe with `since` = each symbol's current `seq`
# - 500 (read from a probe's snapshots just before): 500 ticks of replay per symbol,
# 5,000 per client, 5,000,000 in all. A storm client leaves once it has every tick it was
# owed. Everything is `loadgen recover` (tools/loadgen/src/recover.rs), which checks
# every client's `seq`s end to end (gaps, duplicates, resets, behind at the end).
#
# Prints one line per run, then per side the medians (min-max) of the staying
# subscribers' latency, drops and gaps, the server's CPU, and for the storm how long it
# took to be served, what was replayed (the clients' count and the server's
# `tickgate_replayed_ticks_total`), the resets, the storm's p99 against the calm
# side's, and the server's own p99 from accepting a tick to issuing its write
# (`tickgate_publish_to_write_seconds`): what the server adds, without the load
# generator's core, which receives the storm's replays too. The staying subscribers' latency
# is given twice: at the read, and at the arrival in their kernel (`arrival_*`, from the
# kernel's receive stamp of each read, SO_TIMESTAMPNS): the second leaves out how long the
# clients' own thread took to get to the bytes. Needs: cargo, taskset, curl, python3. Loopback only; every run is bounded.
set -euo pipefail

ROUNDS=${1:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
echo "# building (release): tickgate, tickgate-loadgen" >&2
cargo build --release -q -p tickgate -p tickgate-loadgen
# shellcheck source=perf/bench_config.sh
. "$ROOT/perf/bench_config.sh"
TARGET_DIR=$(bench_target_dir)
TG=${TG:-"$TARGET_DIR/release/tickgate"}
LG="$TARGET_DIR/release/loadgen"

bench_scratch
PORT=18280; ADMIN=19280
"$TG" keygen --out "$TMP/keys" >/dev/null
# The storm's 1,000 upgrades come at once from one address.
bench_config "$TMP/tickgate.toml" "$TMP/keys" "$PORT" "$ADMIN" "$TMP" \
  "per_ip_pending_handshakes = 1024"
printf '\n[feed]\nhistory = 1000\nhistory_age = "5m"\n' >>"$TMP/tickgate.toml"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

wait_port() { bench_wait_port "$PORT"; }
# The server's recovery counters as one JSON line.
metrics() { # $1 = label
  curl -s "http://127.0.0.1:$ADMIN/metrics" | python3 -c '
import json, sys
want = {"tickgate_replayed_ticks_total": "srv_replayed", "tickgate_replay_resets_total": "srv_resets",
        "tickgate_conflated_ticks_total": "srv_conflated", "tickgate_history_ticks": "srv_history_ticks",
        "tickgate_history_bytes": "srv_history_bytes"}
out = {"mode": "metrics", "label": sys.argv[1], "srv_closes": {}}
for line in sys.stdin:
    parts = line.split()
    if len(parts) == 2 and parts[0] in want:
        out[want[parts[0]]] = float(parts[1])
    elif parts and parts[0].startswith("tickgate_closes_total{"):
        out["srv_closes"][parts[0][len("tickgate_closes_total"):]] = float(parts[1])
    elif parts and parts[0].startswith("tickgate_publish_to_write_seconds_bucket{le="):
        out.setdefault("srv_write_buckets", {})[parts[0].split("\"")[1]] = float(parts[1])
print(json.dumps(out))' "$1"
}
RES="$TMP/res.jsonl"
: >"$RES"
A=(recover --subscribers 1000 --symbols 100 --per-sub 10 --rate 1000 --warmup 2 --duration 10
  --drain 1 --prefill 600 --reconnect-every 0)
STORM=(--storm 1000 --storm-back "${STORM_BACK:-500}" --storm-at 3 --storm-per-sub "${STORM_PER_SUB:-10}"
  --storm-nice "${STORM_NICE:-0}")
[[ -n ${STORM_IDLE:-} ]] && STORM+=(--storm-idle)
[[ -n ${STORM_CORE:-} ]] && STORM+=(--storm-core "$STORM_CORE")
[[ -n ${STORM_ELSEWHERE:-} ]] && STORM+=(--storm-target "127.0.0.1:$((PORT + 1))")
[[ -n ${PUB_CORE:-} ]] && A+=(--pub-core "$PUB_CORE")
[[ -n ${ARRIVAL:-} ]] && A+=(--arrival)
if [[ -n ${STORM_ELSEWHERE:-} ]]; then
  bench_config "$TMP/elsewhere.toml" "$TMP/keys" "$((PORT + 1))" "$((ADMIN + 1))" "$TMP" \
    "per_ip_pending_handshakes = 1024"
fi
echo "# $(date -u +%FT%TZ) nproc=$(nproc) $(uname -r) load: $(cut -d' ' -f1-3 /proc/loadavg)" \
  "storm: 1000 clients x ${STORM_PER_SUB:-10} symbols, since ${STORM_BACK:-500} back, nice ${STORM_NICE:-0}" \
  "${STORM_IDLE:+storm thread SCHED_IDLE }${STORM_CORE:+storm thread on core $STORM_CORE }${STORM_ELSEWHERE:+to a second server on core 1 }${PUB_CORE:+publisher on core $PUB_CORE }${ARRIVAL:+exact arrival}" >&2
for r in $(seq 1 "$ROUNDS"); do
  # Alternate which side goes first, so neither always gets the fresher minute.
  if (( r % 2 )); then order="calm storm"; else order="storm calm"; fi
  for side in $order; do
    extra=(); [[ $side == storm ]] && extra=("${STORM[@]}")
    taskset -c 0 "$TG" serve --config "$TMP/tickgate.toml" >"$TMP/server.log" 2>&1 &
    SPID=$!
    wait_port
    OPID=""
    if [[ $side == storm && -n ${STORM_ELSEWHERE:-} ]]; then
      taskset -c 1 "$TG" serve --config "$TMP/elsewhere.toml" >"$TMP/elsewhere.log" 2>&1 &
      OPID=$!
      bench_wait_port "$((PORT + 1))"
    fi
    echo "# $side round $r (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    taskset -c 1 "$LG" "${A[@]}" "${extra[@]}" --server-pid "$SPID" --target "127.0.0.1:$PORT" \
      --key "$TMP/keys/k1.key" --label "$side:$r" --json >"$TMP/out.txt" 2>"$TMP/err.txt" ||
      echo "  (loadgen exit $? for $side:$r: $(grep -v '^loadgen: [0-9]' "$TMP/err.txt" | tail -3 | tr '\n' ' '))" >&2
    grep '^{' "$TMP/out.txt" >>"$RES" || true
    metrics "$side:$r" >>"$RES" || true
    bench_stop; [[ -n $OPID ]] && { kill "$OPID" 2>/dev/null; wait "$OPID" 2>/dev/null || true; }; sleep 0.3
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 - "$RES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs = {r["label"]: r for r in rows if r.get("mode") == "recover"}
mets = {r["label"]: r for r in rows if r.get("mode") == "metrics"}
def side(s):
    return [(runs[l], mets.get(l, {})) for l in sorted(runs) if l.startswith(s + ":")]
def med(vals, nd=1):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals: return "-"
    f = lambda v: f"{v:,.{nd}f}"
    return f"{f(statistics.median(vals))} ({f(min(vals))}-{f(max(vals))})"
for l in sorted(runs):
    r, m = runs[l], mets.get(l, {})
    keys = ("p50_us", "p99_us", "p999_us", "drops", "gaps", "dups", "behind_at_end", "server_cpu_pct",
            "storm_served_max_ms", "storm_replayed", "storm_resets", "result")
    print(l, " ".join(f"{k}={r.get(k)}" for k in keys if k in r), f"srv_replayed={m.get('srv_replayed')}")
print()
for s in ("calm", "storm"):
    rs = side(s)
    if not rs: continue
    g = lambda k: [r.get(k) for r, _ in rs]
    print(f"{s} (n={len(rs)}): staying subscribers p50 us {med(g('p50_us'))}, p99 us {med(g('p99_us'))}, "
          f"p99.9 us {med(g('p999_us'))}, max us {med(g('max_us'))}")
    print(f"{s}: the same at their arrival in the clients' kernel: p50 us {med(g('arrival_p50_us'))}, "
          f"p99 us {med(g('arrival_p99_us'))}, p99.9 us {med(g('arrival_p999_us'))}")
    print(f"{s}: drops {med(g('drops'), 0)}, gaps {med(g('gaps'), 0)}, dups {med(g('dups'), 0)}, "
          f"behind at end {med(g('behind_at_end'), 0)}, server CPU % {med(g('server_cpu_pct'))}, "
          f"client CPU % {med(g('client_cpu_pct'))}")
    if s == "storm":
        print(f"storm: served all in ms {med(g('storm_served_max_ms'))}, p50 ms {med(g('storm_served_p50_ms'))}, "
              f"p99 ms {med(g('storm_served_p99_ms'))}; served {med(g('storm_served'), 0)} of 1,000, "
              f"failed {med(g('storm_fail'), 0)}")
        print(f"storm: replay owed {med(g('storm_owed_replay'), 0)}, replayed (clients) {med(g('storm_replayed'), 0)}, "
              f"replayed (server) {med([m.get('srv_replayed') for _, m in rs], 0)}, "
              f"resets {med(g('storm_resets'), 0)}, storm gaps {med(g('storm_gaps'), 0)}, "
              f"server CPU % during the storm {med(g('storm_server_cpu_pct'))}")
        for r, _ in rs:
            print(f"  {r['label']} staying p99 per second of the window (us): {r.get('stay_p99_by_s_us')}")
            print(f"  {r['label']} the same at arrival (us): {r.get('stay_arrival_p99_by_s_us')}")
            print(f"  {r['label']} the generator's 1 ms timer, worst lateness per second (ms): "
                  f"{r.get('gen_timer_late_max_by_s_ms')}")
def srv_p99(m):
    # The server's own view: hub accepted -> socket write issued (`tickgate_publish_to_
    # write_seconds`, one write in 16 sampled, live ticks only: the server leaves replayed
    # ones out), as the bucket holding the 99th percentile.
    b = m.get("srv_write_buckets") or {}
    les = sorted((float(k), v) for k, v in b.items() if k != "+Inf")
    if not les: return None
    live = b.get("+Inf", les[-1][1])
    prev = 0.0
    for le, n in les:
        if n >= 0.99 * live:
            return f"{prev * 1e3:g}-{le * 1e3:g} ms"
        prev = le
    return f"over {prev * 1e3:g} ms"
for s in ("calm", "storm"):
    print(f"{s}: server-side p99 (publish -> write issued), per run: "
          f"{[srv_p99(m) for _, m in side(s)]}")
calm = [r.get("p99_us") for r, _ in side("calm") if isinstance(r.get("p99_us"), (int, float))]
storm = [r.get("p99_us") for r, _ in side("storm") if isinstance(r.get("p99_us"), (int, float))]
if calm and storm:
    ratio = statistics.median(storm) / statistics.median(calm)
    drops = sum((r.get("drops") or 0) + (r.get("stay_gaps") or 0) for r, _ in side("storm"))
    print(f"\ncriterion: staying subscribers' drops+gaps during the storms: {drops} (target 0); "
          f"p99 storm/calm (medians): {ratio:.2f}x (target <= 2x)")
    ca = [r.get("arrival_p99_us") for r, _ in side("calm") if isinstance(r.get("arrival_p99_us"), (int, float))]
    sa = [r.get("arrival_p99_us") for r, _ in side("storm") if isinstance(r.get("arrival_p99_us"), (int, float))]
    if ca and sa:
        print(f"at arrival in the clients' kernel: p99 storm/calm (medians): "
              f"{statistics.median(sa) / statistics.median(ca):.2f}x")
print("\nraw JSON lines:")
for r in rows: print(json.dumps(r, sort_keys=True))
PY
