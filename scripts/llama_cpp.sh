#!/usr/bin/env bash
# llama.cpp for the engine benchmark (scripts/bench_engine.sh): builds `llama-bench` from the
# llama.cpp that a pinned llama-cpp-python sdist vendors (PyPI, checked by its SHA-256), for this
# CPU (GGML_NATIVE), and converts the bench model to a bf16 GGUF with llama.cpp's own converter
# (scripts/gguf_convert.py). Both are kept under target/llama.cpp and made once.
# Two builds: `native` for every instruction set of this CPU (GGML_NATIVE), and `avx2` with
# AVX2, FMA and F16C but no AVX-512, to compare with Moebius' avx2 kernels on a CPU that also has
# AVX-512. Prints two lines: the llama-bench binary and the GGUF file.
#   bash scripts/llama_cpp.sh [native|avx2] [model_dir]
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:-native}
model=${2:-bench-models/v3-bench}
case $variant in
  native) flags=(-DGGML_NATIVE=ON) ;;
  avx2) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VNNI=OFF
    -DGGML_AVX512_VBMI=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
    -DGGML_AMX_BF16=OFF) ;;
  *) echo "llama_cpp.sh: unknown build '$variant' (native or avx2)" >&2; exit 2 ;;
esac
version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
dir=target/llama.cpp
src=$dir/llama_cpp_python-$version/vendor/llama.cpp
bench=$src/build-$variant/bin/llama-bench
gguf=$dir/$(basename "$model")-bf16.gguf

if [ ! -x "$bench" ]; then
  if ! command -v cmake >/dev/null; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq cmake; } >&2
  fi
  mkdir -p "$dir"
  sdist=$dir/llama_cpp_python-$version.tar.gz
  if [ ! -f "$sdist" ]; then
    # PyPI's simple index (PEP 503), which PyPI mirrors serve where the JSON API may be missing.
    url=$(python3 - "$version" <<'PY'
import re, sys, urllib.parse, urllib.request
index = "https://pypi.org/simple/llama-cpp-python/"
page = urllib.request.urlopen(index).read().decode()
name = re.escape(f"llama_cpp_python-{sys.argv[1]}.tar.gz")
href = re.search(f'href="([^"#]*{name})[#"]', page).group(1)
print(urllib.parse.urljoin(index, href))
PY
)
    curl -sSfL -o "$sdist.part" "$url"
    echo "$sha256  $sdist.part" | sha256sum -c --quiet
    mv "$sdist.part" "$sdist"
  fi
  [ -f "$src/CMakeLists.txt" ] || tar -xzf "$sdist" -C "$dir"
  echo "llama_cpp.sh: building llama-bench ($variant) of llama-cpp-python $version's llama.cpp" >&2
  cmake -S "$src" -B "$src/build-$variant" -DCMAKE_BUILD_TYPE=Release "${flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$src/build-$variant" --target llama-bench -j "$(nproc)" >&2
fi

if [ ! -f "$gguf" ]; then
  [ -f "$model/config.json" ] || { echo "llama_cpp.sh: no checkpoint at $model" >&2; exit 1; }
  source scripts/bench_env.sh
  echo "llama_cpp.sh: converting $model to $gguf" >&2
  "$BENCH_PY" scripts/gguf_convert.py "$src" "$model" fixtures/demo "$gguf.part" >&2
  mv "$gguf.part" "$gguf"
fi
echo "$bench"
echo "$gguf"
