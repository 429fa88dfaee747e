# crisisd: build in the official Rust image, run from a minimal Debian image
# as a non-root user. `docker build -t crisisd .`; the README shows the run
# line. The rules are compiled into the binary; the copy under
# /usr/share/crisisd/rules is for reading and for `--rules`.

# The toolchain the project is tested with (rust-version in Cargo.toml is
# the floor; the AWS SDK needs 1.91 or later).
FROM rust:1.95-bookworm AS build
WORKDIR /src
# protoc is vendored (protoc-bin-vendored): no system packages are needed.
COPY Cargo.toml Cargo.lock build.rs crisisd.example.toml roster.example.toml ./
COPY proto proto
COPY rules rules
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin crisisd \
 && install -D -m 0755 target/release/crisisd /out/crisisd

FROM debian:bookworm-slim
# CA roots for TLS to AWS (SNS, Bedrock) and to PostgreSQL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/crisisd --shell /usr/sbin/nologin crisisd \
 && install -d -o crisisd -g crisisd -m 0700 /var/lib/crisisd
COPY --from=build /out/crisisd /usr/local/bin/crisisd
COPY rules /usr/share/crisisd/rules
USER 10001:10001
WORKDIR /var/lib/crisisd
# A non-loopback listener needs TLS and tokens in the config, mounted at
# /etc/crisisd/crisisd.toml; health and metrics stay inside the container
# unless published on purpose.
ENV CRISISD_CONFIG=/etc/crisisd/crisisd.toml \
    CRISISD_DATA_DIR=/var/lib/crisisd \
    CRISISD_LISTEN=0.0.0.0:50051 \
    CRISISD_HEALTH_LISTEN=127.0.0.1:50052 \
    CRISISD_LOG_FORMAT=json
EXPOSE 50051
VOLUME ["/var/lib/crisisd"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["crisisd", "health", "--addr", "127.0.0.1:50052"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["crisisd"]
CMD ["serve"]
