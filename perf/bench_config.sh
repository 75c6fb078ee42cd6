# Sourced by the perf/ scripts: the one benchmark configuration, and the helpers they share.
#
#   bench_config FILE KEYDIR PORT ADMIN_PORT LOGDIR [EXTRA_LIMITS_LINES]
#
# One shard, no core pinning (the scripts pin with taskset), the key in KEYDIR, no Origin
# needed, per-IP and per-user limits out of the load generator's way. EXTRA_LIMITS_LINES
# go into `[limits]` (ab.sh leaves out keys an older binary would refuse).
bench_config() {
  local file=$1 keys=$2 port=$3 admin=$4 logdir=$5 extra=${6:-}
  cat >"$file" <<CFG
[server]
listen = "127.0.0.1:$port"
shards = 1
pin_cores = false

[auth]
keys = [{ kid = "k1", path = "$keys/k1.pub" }]
allow_missing_origin = true
allowed_origins = []

[limits]
per_ip_handshakes_per_sec = 1000000
per_ip_burst = 1000000
per_user_max_connections = 100
inbound_messages_per_sec = 100000
$extra

[admin]
listen = "127.0.0.1:$admin"

[log]
level = "warn"
security = "$logdir/security.log"
CFG
}

# The cargo target directory (where `cargo build --release` put the binaries).
bench_target_dir() {
  cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])'
}

# Stop the server whose pid is in $SPID, if one runs, and wait for it.
bench_stop() {
  if [[ -n "${SPID:-}" ]]; then kill "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; fi
  SPID=""
}

# Wait until a server listens on loopback port $1 (10 s at most; exit 2 otherwise).
bench_wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server on port $1 did not come up" >&2; exit 2
}

# A scratch directory in $TMP, removed at exit together with the server in $SPID.
bench_scratch() {
  TMP=$(mktemp -d)
  SPID=""
  trap 'bench_stop; rm -rf "$TMP"' EXIT
}
