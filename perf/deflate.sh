#!/usr/bin/env bash
# permessage-deflate against plain on one server: (A) and (B) of perf/compare.sh with the
# load generator's subscribers plain, then offering permessage-deflate (`loadgen fanout
# --deflate`), alternating round by round on the same server (`compression.enabled`, the
# default level and window), so both see the same minutes of a shared host.
#
#   perf/deflate.sh TICKGATE [ROUNDS]      # ROUNDS defaults to 3
#
# Server pinned to core 0 with one shard, load generator on core 1 (it inflates what it
# receives, so (B) with compression may be the client's limit, not the server's). Prints
# one line per run and the medians per side: latency, server CPU %, wire bytes per message.
set -euo pipefail

BIN=${1:?usage: perf/deflate.sh TICKGATE [ROUNDS]}
ROUNDS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p tickgate-loadgen
# shellcheck source=perf/bench_config.sh
. "$ROOT/perf/bench_config.sh"
TARGET_DIR=$(bench_target_dir)
LG="$TARGET_DIR/release/loadgen"

bench_scratch
PORT=18180
"$BIN" keygen --out "$TMP/keys" >/dev/null
bench_config "$TMP/tickgate.toml" "$TMP/keys" "$PORT" 19190 "$TMP"
printf '\n[compression]\nenabled = true\n' >>"$TMP/tickgate.toml"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

wait_port() { bench_wait_port "$PORT"; }
RES="$TMP/res.jsonl"
: >"$RES"
echo "# $(date -u +%FT%TZ) nproc=$(nproc) $(uname -r) load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order="plain deflate"; else order="deflate plain"; fi
  for side in $order; do
    extra=(); [[ $side == deflate ]] && extra=(--deflate)
    taskset -c 0 "$BIN" serve --config "$TMP/tickgate.toml" >"$TMP/server.log" 2>&1 &
    SPID=$!
    wait_port
    for mode in A B; do
      if [[ $mode == A ]]; then
        args=(fanout --subscribers 1000 --symbols 100 --per-sub 10 --rate 1000 --warmup 1 --duration 4)
      else
        args=(fanout --subscribers 1000 --symbols 100 --per-sub 10 --rates 5000,10000,20000,40000
          --stop-on-drop --warmup 0.5 --duration 2 --drain 0.5)
      fi
      taskset -c 1 "$LG" "${args[@]}" "${extra[@]}" --server-pid "$SPID" --target "127.0.0.1:$PORT" \
        --key "$TMP/keys/k1.key" --label "$mode:$side:$r" --json >"$TMP/out.txt" 2>"$TMP/err.txt" ||
        echo "  (loadgen exit $? for $mode:$side:$r: $(tail -1 "$TMP/err.txt"))" >&2
      grep '^{' "$TMP/out.txt" >>"$RES" || true
    done
    bench_stop; sleep 0.3
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 - "$RES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def pick(mode, side):
    return [r for r in rows if r.get("label", "").startswith(f"{mode}:{side}:")]
def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return f"{statistics.median(vals):,.1f} ({min(vals):,.1f}-{max(vals):,.1f})" if vals else "-"
for r in rows:
    keys = ("p50_us", "p99_us", "server_cpu_pct", "delivered_per_s", "wire_bytes_per_msg", "drops")
    print(r.get("label"), r.get("rate_ticks_per_s"), " ".join(f"{k}={r.get(k)}" for k in keys))
for side in ("plain", "deflate"):
    a = pick("A", side)
    print(f"{side}: (A) p50 us {med([r.get('p50_us') for r in a])}, p99 us {med([r.get('p99_us') for r in a])}, "
          f"server CPU % {med([r.get('server_cpu_pct') for r in a])}, delivered/s {med([r.get('delivered_per_s') for r in a])}, "
          f"wire bytes/msg {med([r.get('wire_bytes_per_msg') for r in a])}")
    b = pick("B", side)
    best = []
    for run in set(r["label"] for r in b):
        ok = [(r.get("rate_ticks_per_s") or 0) * 100 for r in b if r["label"] == run and not r.get("drops")]
        best.append(max(ok) if ok else 0)
    print(f"{side}: (B) highest zero-drop deliveries/s per round {sorted(best)}")
PY
