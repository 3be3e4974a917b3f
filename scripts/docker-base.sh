#!/usr/bin/env bash
# Local base images, for machines that can build images but pull none (no registry): a
# Debian bookworm root file system made with debootstrap and `docker import`-ed as
# `taxon-base/debian:bookworm`. Every image of both compose files builds on it when
# TAXON_BUILD_BASE / TAXON_RUNTIME_BASE / TAXON_BASE name it; a user with a registry needs
# none of this: the defaults are the public images.
#
#   scripts/docker-base.sh            (idempotent: skips images that exist)
#
# Needs root (debootstrap) and Debian's mirror; installs debootstrap when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=${TAXON_DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=taxon-base/debian:bookworm

if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  # minbase: apt and dpkg only; ca-certificates for the weights download and database TLS.
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$base" >/dev/null
  echo "built $base"
fi

docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^taxon-base/'
