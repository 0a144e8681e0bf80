#!/usr/bin/env bash
# Builds the moebius container image from Containerfile, with buildah, podman or docker
# (the first found; BUILDER=... picks one, with its options, e.g. BUILDER="buildah --root DIR").
#
#   bash scripts/build_image.sh [--tag IMAGE] [--binary PATH] [--runtime IMAGE]
#
#   --tag      the image's name (default moebius:<version of Cargo.toml>)
#   --binary   ship this moebius binary (built for glibc 2.36 or older, e.g. on Debian 12)
#              instead of compiling in the Rust build stage
#   --runtime  the runtime base image (default gcr.io/distroless/cc-debian12:nonroot)
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag="moebius:$version"
binary=""
runtime=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    *) echo "build_image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ -z "${BUILDER:-}" ]; then
  for tool in buildah podman docker; do
    if command -v "$tool" >/dev/null 2>&1; then BUILDER=$tool; break; fi
  done
fi
[ -n "${BUILDER:-}" ] || { echo "build_image.sh: needs buildah, podman or docker" >&2; exit 1; }
case "$BUILDER" in
  buildah*) build=(bud) ;;
  *) build=(build) ;;
esac

args=(-f Containerfile -t "$tag")
[ -n "$runtime" ] && args+=(--build-arg "RUNTIME_IMAGE=$runtime")
context=""
if [ -n "$binary" ]; then
  # The binary replaces the build stage (COPY --from=build /out/moebius).
  context=$(mktemp -d)
  trap 'rm -rf "$context"' EXIT
  install -D "$binary" "$context/out/moebius"
  args+=(--build-context "build=$context")
fi
# shellcheck disable=SC2086 # BUILDER may carry options
$BUILDER "${build[@]}" "${args[@]}" .
echo "built $tag"
