#!/usr/bin/env bash
# Builds the CPU's stand-in for CUDA (`shim.cpp`, with the backend's kernels from nvrtc.cu
# compiled under cuda_host.h) into DIR as libcuda.so, libcublas.so, libcublasLt.so, libnvrtc.so
# and libnccl.so, so that `LD_LIBRARY_PATH=DIR cargo test --features cuda -p moebius-worker --test gpu` runs the
# CUDA backend on the CPU (CUDA_HOST_DEVICES=N: N devices). Needs a C++20 compiler (g++ 11 or later; CXX picks another).
set -euo pipefail
dir=${1:?usage: build_shim.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
kernels=$here/../../src/backend/nvrtc.cu
mkdir -p "$dir"
{
    echo "#include \"$here/cuda_host.h\""
    echo "#include \"$kernels\""
    grep -oE 'extern "C" __global__ void [A-Za-z0-9_]+' "$kernels" |
        sed -E 's/.* ([A-Za-z0-9_]+)$/MOEBIUS_EXPORT(\1)/'
} > "$dir/kernels.cpp"
"${CXX:-c++}" -std=c++20 -O2 -U_FORTIFY_SOURCE -fno-strict-aliasing -shared -fPIC -pthread \
    -o "$dir/libcuda_host.so" "$here/shim.cpp" "$dir/kernels.cpp" -ldl
for name in libcuda.so libcuda.so.1 libcublas.so libcublas.so.12 libcublasLt.so libcublasLt.so.12 \
    libnvrtc.so libnvrtc.so.12 libnccl.so libnccl.so.2; do
    ln -sf libcuda_host.so "$dir/$name"
done
