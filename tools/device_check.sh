#!/bin/bash
# The GPU checks and benchmarks of a change, in one device call, from the repo root: builds
# llama.cpp's llama-bench (background) and glmoe (tools/device_setup.sh), makes the Air-shaped
# 8-layer file, runs the GPU tests, then tools/hybrid_compare.sh with the glmoe just built.
#   tools/device_check.sh LLAMA_CPP_SRC OUT_DIR
# env: TEST_S, TEST_FILES, SKIP_TESTS, BENCH_TESTS, BUDGET_S (or TOTAL_S, the whole call); BORROW_SWEEP=1 adds tools/borrow_crossover.py
# (BORROW_TOKENS) before the benchmarks.
# One call takes about 6 min before the benchmarks start with the tests (H100, 2026-12-06): with
# SKIP_TESTS=1 the benchmarks get the time the tests would take.
set -u
t0=$SECONDS
src=${1:?llama.cpp source}; out=${2:?output dir}
mkdir -p "$out" build
export PYTHONUNBUFFERED=1
( cmake -S "$src" -B build/hybrid-lcpp -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DCMAKE_BUILD_TYPE=Release && cmake --build build/hybrid-lcpp --target llama-bench -j10 ) > "$out/lcpp-build.log" 2>&1 &
lcpp_job=$!
. tools/device_setup.sh > "$out/setup.log" 2>&1 || { tail -30 "$out/setup.log"; exit 1; }
tail -1 "$out/setup.log"
[ -s build/air8.gguf ] || ( python3 tools/make_model.py build/air8.part.gguf --preset air-8layer && mv build/air8.part.gguf build/air8.gguf ) > "$out/make_model.log" 2>&1 &
model_job=$!
nvidia-smi --query-gpu=name --format=csv,noheader
[ "${SKIP_TESTS:-0}" = 1 ] && test_files= || test_files=${TEST_FILES:-tests/test_cuda_model.py tests/test_cuda_reference.py}
for f in $test_files; do
    timeout "${TEST_S:-100}" python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short "$f" > "$out/$(basename "$f" .py).log" 2>&1
    echo "$f: exit $?; $(tail -n 1 "$out/$(basename "$f" .py).log")"
    grep -E "^FAILED|Fatal Python|^E  " "$out/$(basename "$f" .py).log" | head -n 12
done
wait "$model_job"; wait "$lcpp_job" || tail -5 "$out/lcpp-build.log"
echo "ready for benchmarks at $((SECONDS - t0)) s"
if [ "${BORROW_SWEEP:-0}" = 1 ]; then
    timeout 120 python3 tools/borrow_crossover.py build/air8.gguf -t 16 -n "${BORROW_TOKENS:-32,64,128,256,512}" -r "${BORROW_REPS:-2}" \
        2>&1 | tee "$out/borrow_crossover.md"
fi
TESTS=${BENCH_TESTS:-a b c d e} BUDGET_S=${BUDGET_S:-$((${TOTAL_S:-570} - (SECONDS - t0)))} MODEL=build/air8.gguf \
    tools/hybrid_compare.sh "$src" "$out/hybrid" "${GLMOE_SITE:-/tmp/site}/glmoe/bin"
