# syntax=docker/dockerfile:1
# Build: the release binary, with dependencies cached in their own layer.
# build-essential brings perl, which OpenSSL's build (rdkafka ssl-vendored)
# needs; OpenSSL, librdkafka and zstd are compiled and linked statically.
FROM rust:1.95-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY loadtest ./loadtest
COPY vendor ./vendor
# /docs renders docs/PROTOCOL.md, compiled into the binary.
COPY docs ./docs
RUN cargo build --release --locked --bin moonx-ws && strip target/release/moonx-ws

# Run: a slim image with the binary and a non-root user. ca-certificates:
# the trust store librdkafka (ssl.ca.location=probe) and the Redis client
# (rustls, system roots) use for managed Kafka and Redis over TLS.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home moonx
COPY --from=build /src/target/release/moonx-ws /usr/local/bin/moonx-ws
USER moonx
EXPOSE 3008
ENV WEBSOCKET_SERVICE_HOST=0.0.0.0 WEBSOCKET_SERVICE_PORT=3008 LOG_FORMAT=json
# bash's /dev/tcp keeps the image free of curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/3008 && printf 'GET /health/live HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3 && head -c 12 <&3 | grep -q 200"]
ENTRYPOINT ["/usr/local/bin/moonx-ws"]
