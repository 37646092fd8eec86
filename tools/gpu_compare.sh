#!/bin/bash
# The GPU comparison of docs/PERFORMANCE.md, as run on the device machine: builds llama.cpp's
# llama-bench from LLAMA_CPP_SRC and glmoe from this checkout, makes the Air-shaped 8-layer file,
# measures the copy bandwidth, then runs both llama-bench binaries with the same flags.
#   tools/gpu_compare.sh LLAMA_CPP_SRC OUT_DIR
# (LLAMA_CPP_SRC: e.g. llama-cpp-python's sdist vendor/llama.cpp; needs nvcc, CMake, ninja, and
# PyTorch for the copy-bandwidth figure.)
set -u
src=${1:?llama.cpp source dir}; out=${2:?output dir}
mkdir -p "$out"
work=$(mktemp -d)
( cmake -S "$src" -B "$work/lcpp" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DCMAKE_BUILD_TYPE=Release \
  && cmake --build "$work/lcpp" --target llama-bench -j"$(nproc)" ) > "$out/llama.cpp-build.log" 2>&1 &
lcpp_build=$!
cmake -S . -B "$work/glmoe" -G Ninja -DGLMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release > "$out/glmoe-build.log" 2>&1 \
  && cmake --build "$work/glmoe" --target llama-bench -j"$(nproc)" >> "$out/glmoe-build.log" 2>&1 || { echo "glmoe build failed"; exit 1; }
python3 tools/make_model.py "$work/air8.gguf" --preset air-8layer > "$out/make_model.log" 2>&1 || exit 1
wait $lcpp_build || { echo "llama.cpp build failed"; exit 1; }
python3 - <<'PY' | tee "$out/copy_bandwidth.txt"
import torch
n = 1 << 30
a = torch.randn(n, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
ts = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); b.copy_(a); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
t = sorted(ts)[len(ts) // 2] / 1e3
print(f"copy bandwidth: {2 * 4 * n / t / 1e9:.0f} GB/s (read + write, median of 20 copies of 4 GiB)")
PY
flags="-m $work/air8.gguf -ngl 99 -fa 1 -p 512 -n 128 -d 0,4096,16384,65536"
date -u | tee "$out/date.txt"
LD_LIBRARY_PATH="$work/lcpp/bin" "$work/lcpp/bin/llama-bench" $flags | tee "$out/llama.cpp.md"
"$work/glmoe/llama-bench" $flags | tee "$out/glmoe.md"
