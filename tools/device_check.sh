#!/bin/bash
# The GPU checks of a change, in one device call, from the repo root: starts llama.cpp's
# llama-bench build and the Air-shaped 8-layer file in the background (for tools/hybrid_compare.sh
# in a following call on the warm machine), builds glmoe (tools/device_setup.sh), runs the GPU
# tests, then a short hybrid smoke run.   tools/device_check.sh LLAMA_CPP_SRC OUT_DIR
set -u
src=${1:?llama.cpp source}; out=${2:?output dir}
mkdir -p "$out" build
export PYTHONUNBUFFERED=1
( cmake -S "$src" -B build/hybrid-lcpp -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_BUILD_TYPE=Release && cmake --build build/hybrid-lcpp --target llama-bench -j8 ) > "$out/lcpp-build.log" 2>&1 &
. tools/device_setup.sh > "$out/setup.log" 2>&1 || { tail -30 "$out/setup.log"; exit 1; }
tail -1 "$out/setup.log"
[ -s build/air8.gguf ] || ( python3 tools/make_model.py build/air8.part.gguf --preset air-8layer && mv build/air8.part.gguf build/air8.gguf ) > "$out/make_model.log" 2>&1 &
model_job=$!
nvidia-smi --query-gpu=name --format=csv,noheader
timeout "${TEST_S:-300}" python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda_model.py tests/test_cuda_ops.py \
    tests/test_cuda_reference.py ${PYTEST_ARGS:-} 2>&1 | tee "$out/pytest.log" | tail -n 30
wait "$model_job"
B=$(command -v llama-bench)
for f in "-ot exps=CPU" "--n-cpu-moe 4"; do
    timeout 90 "$B" -m build/air8.gguf -ngl 99 -fa 1 -t 16 -p 512 -n 32 -r 1 $f 2>&1 | tail -n 4
done
wait
