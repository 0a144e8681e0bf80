#!/usr/bin/env bash
# The test command of README.md: installs what the tests need when it is missing (Debian's
# etcd, Prometheus and Chromium), then checks formatting and lints and runs every test of the
# workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run for real: etcd (the topology store), Prometheus (scrapes a
# cluster), Chromium (loads the built-in dashboard), buildah (builds the container image), an
# English word list (the demo model's text is checked against it), Python's venv (for the
# tests' Python packages, below) and a C++20 compiler (the GPU kernels run on the CPU in
# worker/tests/nvrtc_kernels.rs).
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
[ -f /usr/share/dict/words ] || missing+=(wamerican)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]} (Debian packages) for the end-to-end tests"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# PyPI packages of the tests, in a virtual environment: real Helm as a library and the
# Kubernetes API schemas (tests/deploy.rs), OpenAI's own client (tests/openai_api.rs), and
# NVIDIA's NVRTC (the GPU backend's kernels compile with it on any machine, GPU or not).
venv=target/test-venv
nvrtc="$venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib"
if ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate, yaml, openai' >/dev/null 2>&1 ||
  ! compgen -G "$nvrtc/libnvrtc.so.12" >/dev/null; then
  echo "test.sh: installing helm-python-sdk, kubernetes-validate, openai and NVRTC into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.4 \
    openai==3.63.0 nvidia-cuda-nvrtc-cu12==12.9.86
fi
export MOEBIUS_TEST_PYTHON="$PWD/$venv/bin/python"
nvrtc=$(compgen -G "$PWD/$nvrtc" | head -1)

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The GPU backend builds and lints without CUDA: cudarc loads its libraries at run time.
cargo clippy --workspace --all-targets --locked --features cuda -- -D warnings
cargo test --workspace --locked
# The GPU tests with the feature, each step with the whole workspace selected so that all of them
# share one build of it. Here, without a GPU, each GPU test says why it skips, and the kernels
# compile with NVIDIA's NVRTC.
cuda_test=(cargo test --workspace --locked --features cuda)
MOEBIUS_REQUIRE_NVRTC=1 LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "${cuda_test[@]}" --test gpu
# The same tests on the CPU's stand-in for two GPUs (worker/tests/cuda_host/shim.cpp): the whole
# CUDA backend runs, its kernels under cuda_host.h, its cuBLAS products in a reference gemm, and
# the nccl data plane between ranks of one process. This checks what the backend asks of the
# driver, cuBLAS and NCCL (sizes, offsets, page tables, launch arguments, waits and aborts), not
# a GPU; the device names itself "cuda_host: the CPU standing in for a GPU". The stand-in's
# NVRTC compiles nothing, so the NVRTC test stays with the step above.
shim=target/cuda-host-shim
bash worker/tests/cuda_host/build_shim.sh "$shim"
on_shim=(env CUDA_HOST_DEVICES=2 MOEBIUS_REQUIRE_GPU=1 LD_LIBRARY_PATH="$PWD/$shim")
"${on_shim[@]}" "${cuda_test[@]}" --test gpu -- --skip kernels_compile_with_nvrtc
# ...and as a user starts GPU ranks: `generate --device cuda:0`, `up --device cuda:0,cpu` and
# `up --device cuda:0 --data-plane nccl`.
"${on_shim[@]}" "${cuda_test[@]}" --test generate_cli gpu_ranks
