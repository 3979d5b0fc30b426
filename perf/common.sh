# Shared by the perf scripts (sourced): build, broker, server start.
# The server runs on core 0, the broker and the load on core 1.

LT=target/release/moonx-loadtest

build_release() {
  cargo build --release --quiet -p moonx-ws -p moonx-loadtest
}

# start_broker OUTDIR: a mock Kafka broker on core 1; sets BROKERS.
start_broker() {
  rm -f "$1/broker"
  # shellcheck disable=SC2086 # BROKER_ARGS holds several flags
  taskset -c 1 "$LT" broker --duration "${BROKER_SECS:-3600}" --address-file "$1/broker" ${BROKER_ARGS:-} > /dev/null 2> "$1/broker.log" &
  BROKER_PID=$!
  for _ in $(seq 100); do [ -s "$1/broker" ] && break; sleep 0.1; done
  BROKERS=$(cat "$1/broker")
}

# wait_port PORT: until something accepts on 127.0.0.1:PORT (bounded).
wait_port() {
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  return 1
}

# start_moonx PORT LOG [VAR=value...]: moonx-ws on core 0 (one shard) with
# the perf settings; sets SERVER_PID. MOONX_BIN picks another build (A/B runs).
start_moonx() {
  local port=$1 log=$2; shift 2
  env KAFKA_BROKERS="$BROKERS" KAFKA_FETCH_WAIT_MAX_MS=5 JWT_SECRET=loadtest-secret WS_SHARDS="${WS_SHARDS:-1}" \
    WEBSOCKET_SERVICE_HOST=127.0.0.1 WEBSOCKET_SERVICE_PORT="$port" RATE_LIMIT_MAX_CONNECTIONS_PER_IP=100000 \
    WS_MAX_CONNECTIONS=19000 LOG_LEVEL=warn "$@" taskset -c "${SERVER_CPUS:-0}" "${MOONX_BIN:-target/release/moonx-ws}" > "$log" 2>&1 &
  SERVER_PID=$!
  wait_port "$port"
  sleep 2 # partitions assigned at their high watermark
}

# start_rust_tokio PORT LOG: the rust-tokio peer (built under PEERS_DIR,
# default /tmp/peers) on core 0; sets SERVER_PID.
start_rust_tokio() {
  env PORT="$1" JWT_SECRET=loadtest-secret KAFKA_BROKERS="$BROKERS" \
    taskset -c 0 "${PEERS_DIR:-/tmp/peers}/rust-tokio/target/release/rust-tokio-peer" > "$2" 2>&1 &
  SERVER_PID=$!
  wait_port "$1"
  sleep 2 # the consumer joins and positions
}
