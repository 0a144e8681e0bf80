# Sourced by the benchmark scripts: the Python that runs transformers and llama.cpp's
# converter, in a virtual environment at target/bench-venv with pinned versions (installed
# on first use, about 6 GB with torch's CUDA libraries, which PyPI's torch wheel requires).
# Sets BENCH_PY.
bench_venv=target/bench-venv
bench_requirements=(torch==2.15.0 transformers==5.25.0 tokenizers==0.23.3 safetensors==0.8.0
  numpy==2.4.6 sentencepiece==0.2.3 protobuf==7.36.2)
if ! "$bench_venv/bin/python" -c 'import torch, transformers, sentencepiece' >/dev/null 2>&1; then
  echo "bench_env.sh: installing ${bench_requirements[*]} into $bench_venv" >&2
  python3 -m venv "$bench_venv"
  "$bench_venv/bin/pip" install -q "${bench_requirements[@]}"
fi
BENCH_PY=$PWD/$bench_venv/bin/python
