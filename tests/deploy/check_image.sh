#!/usr/bin/env bash
# Builds the moebius image with scripts/build_image.sh and buildah in a throwaway store, and
# runs `moebius --version` in it as its user. No registry is needed: the runtime base is
# assembled from this machine's glibc (what distroless' cc image holds) and the binary is the
# one given, so the Rust build stage is skipped. Run by tests/deploy.rs:
#
#   bash tests/deploy/check_image.sh MOEBIUS_BINARY
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=$1
store=$(mktemp -d)
buildah=(buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs)
cleanup() {
  "${buildah[@]}" rm --all >/dev/null 2>&1 || true
  "${buildah[@]}" rmi --all --force >/dev/null 2>&1 || true
  rm -rf "$store"
}
trap cleanup EXIT

# The base: the binary's shared libraries and a passwd with the nonroot user (65532).
base=$store/base
mkdir -p "$base/etc" "$base/tmp"
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
  install -D "$(readlink -f "$lib")" "$base$lib"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  >"$base/etc/passwd"
container=$("${buildah[@]}" from scratch)
"${buildah[@]}" copy "$container" "$base/" / >/dev/null
"${buildah[@]}" commit --quiet "$container" localhost/moebius-base:test >/dev/null
"${buildah[@]}" rm "$container" >/dev/null

BUILDER="${buildah[*]}" bash scripts/build_image.sh --tag localhost/moebius:test \
  --binary "$binary" --runtime localhost/moebius-base:test

config=$("${buildah[@]}" inspect --type image localhost/moebius:test)
user=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["OCIv1"]["config"]["User"])' <<<"$config")
entrypoint=$(python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["OCIv1"]["config"]["Entrypoint"]))' <<<"$config")
echo "image user: $user"
echo "image entrypoint: $entrypoint"

# Run the entrypoint as the image's user in the image's root filesystem (running a container
# needs a runtime this machine may not have; chroot is enough for a static check).
container=$("${buildah[@]}" from localhost/moebius:test)
root=$("${buildah[@]}" mount "$container")
echo "in the image: $(chroot --userspec="$user" "$root" $entrypoint --version)"
"${buildah[@]}" umount "$container" >/dev/null
