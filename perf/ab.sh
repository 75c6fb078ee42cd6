#!/usr/bin/env bash
# Before/after pairs: two tickgate binaries, (A) and (B) of perf/compare.sh, alternating
# round by round so that both sides see the same minutes of a shared, noisy host.
#
#   perf/ab.sh OLD_TICKGATE NEW_TICKGATE [ROUNDS]     # ROUNDS defaults to 3
#   MODES="A E B" perf/ab.sh ...   # also (E): 10,000 subscribers x 1 of 100 symbols,
#                                  # 100,000 deliveries/s (issue 17's one-tick-per-write case)
#   MODES="C A" perf/ab.sh ...     # also (C): RSS per idle authenticated connection (10,000);
#                                  # put C first: it reads the fresh server's RSS growth
#   MODES="L A" perf/ab.sh ...     # also (L): a light load, 10 subscribers x 1 symbol at 1,000
#                                  # ticks/s (what a tick pays on a mostly idle shard)
#   MODES="G B" perf/ab.sh ...     # (G): (A)'s connections at 10,000 ticks/s (1,000,000
#                                  # deliveries/s); B_RATES=5000,...,80000 sets (B)'s steps
#                                  # in ticks/s (default 5000,10000,20000,40000)
#   NEW_ENV="TICKGATE_SERVER_BUSY_POLL=1s" perf/ab.sh TG TG
#                                  # one binary, two settings: OLD_ENV / NEW_ENV are
#                                  # VAR=value words put in the environment of that side's server
#
# Builds the load generator from this tree (release). Server pinned to core 0 with one
# shard, load generator on core 1, the same config for both sides (the keys only the newer
# binary knows are left out, so an older build accepts it). Prints one line per run and the
# medians and spreads per side. Loopback only; every run is bounded in time.
set -euo pipefail

OLD=${1:?usage: perf/ab.sh OLD_TICKGATE NEW_TICKGATE [ROUNDS]}
NEW=${2:?usage: perf/ab.sh OLD_TICKGATE NEW_TICKGATE [ROUNDS]}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p tickgate-loadgen
# shellcheck source=perf/bench_config.sh
. "$ROOT/perf/bench_config.sh"
TARGET_DIR=$(bench_target_dir)
LG="$TARGET_DIR/release/loadgen"

bench_scratch
PORT=18080
"$NEW" keygen --out "$TMP/keys" >/dev/null
# No extension keys: an older binary must accept the same file.
bench_config "$TMP/tickgate.toml" "$TMP/keys" "$PORT" 19090 "$TMP"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

wait_port() { bench_wait_port "$PORT"; }
RES="$TMP/res.jsonl"
: >"$RES"
echo "# $(date -u +%FT%TZ) nproc=$(nproc) $(uname -r) load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq 1 "$ROUNDS"); do
  # Alternate which side goes first, so neither always gets the fresher minute.
  if (( r % 2 )); then order="old new"; else order="new old"; fi
  for side in $order; do
    bin=$OLD; [[ $side == new ]] && bin=$NEW
    envs=${OLD_ENV:-}; [[ $side == new ]] && envs=${NEW_ENV:-}
    # shellcheck disable=SC2086 # VAR=value words, split on purpose
    env $envs taskset -c 0 "$bin" serve --config "$TMP/tickgate.toml" >"$TMP/server.log" 2>&1 &
    SPID=$!
    wait_port
    for mode in ${MODES:-A B}; do
      if [[ $mode == C ]]; then
        args=(idle --connections 10000 --sources 8 --hold 2 --settle 1)
      elif [[ $mode == L ]]; then
        args=(fanout --subscribers 10 --symbols 1 --per-sub 1 --rate 1000 --warmup 1 --duration 4)
      elif [[ $mode == E ]]; then
        args=(fanout --subscribers 10000 --symbols 100 --per-sub 1 --rate 1000 --sources 8 --warmup 2 --duration 5)
      elif [[ $mode == G ]]; then
        args=(fanout --subscribers 1000 --symbols 100 --per-sub 10 --rate 10000 --warmup 1 --duration 4)
      elif [[ $mode == A ]]; then
        args=(fanout --subscribers 1000 --symbols 100 --per-sub 10 --rate 1000 --warmup 1 --duration 4)
      else
        args=(fanout --subscribers 1000 --symbols 100 --per-sub 10 --rates "${B_RATES:-5000,10000,20000,40000}"
          --stop-on-drop --warmup 0.5 --duration 2 --drain 0.5)
      fi
      taskset -c 1 "$LG" "${args[@]}" --server-pid "$SPID" --target "127.0.0.1:$PORT" \
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
def pick(mode, side, kind):
    return [r for r in rows if r.get("label", "").startswith(f"{mode}:{side}:") and r.get("mode") == kind]
def summary(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals: return "-"
    return f"median {statistics.median(vals):,.0f} (min {min(vals):,.0f}, max {max(vals):,.0f}, n={len(vals)})"
for side in ("old", "new"):
    a = pick("A", side, "fanout")
    e = pick("E", side, "fanout")
    g = pick("G", side, "fanout")
    light = pick("L", side, "fanout")
    if light:
        print(f"{side}: (L) p50_us {summary([r.get('p50_us') for r in light])}")
        print(f"{side}: (L) p99_us {summary([r.get('p99_us') for r in light])}")
    b = pick("B", side, "search")
    c = pick("C", side, "idle")
    if c:
        print(f"{side}: (C) RSS bytes per idle connection {summary([r.get('rss_per_conn_bytes') for r in c])}")
    print(f"{side}: (A) p50_us {summary([r.get('p50_us') for r in a])}")
    print(f"{side}: (A) p99_us {summary([r.get('p99_us') for r in a])}")
    print(f"{side}: (A) server_cpu_pct {summary([r.get('server_cpu_pct') for r in a])}")
    if g:
        print(f"{side}: (G) p50_us {summary([r.get('p50_us') for r in g])}")
        print(f"{side}: (G) p99_us {summary([r.get('p99_us') for r in g])}")
        print(f"{side}: (G) server_cpu_pct {summary([r.get('server_cpu_pct') for r in g])}")
    if e:
        print(f"{side}: (E) p50_us {summary([r.get('p50_us') for r in e])}")
        print(f"{side}: (E) p99_us {summary([r.get('p99_us') for r in e])}")
        print(f"{side}: (E) server_cpu_pct {summary([r.get('server_cpu_pct') for r in e])}")
        print(f"{side}: (E) dropped {summary([r.get('dropped') for r in e])}")
    print(f"{side}: (B) zero-drop deliveries/s {summary([r.get('max_zero_drop_deliveries_per_s') for r in b])}")
print()
for r in rows:
    if (r.get("mode") == "fanout" and r.get("label", "")[:2] in ("A:", "E:", "G:", "L:")) or r.get("mode") in ("search", "idle"):
        keys = ("p50_us", "p99_us", "server_cpu_pct", "max_zero_drop_deliveries_per_s", "rss_per_conn_bytes")
        print(r.get("label"), {k: r[k] for k in keys if k in r})
PY
