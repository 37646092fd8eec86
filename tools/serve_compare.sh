#!/bin/bash
# The serving path beside llama.cpp (issue 16), on the device machine, from the repo root after
# `. tools/device_setup.sh` (glmoe built and on PATH): builds llama.cpp's llama-server from
# LLAMA_CPP_SRC (reused from build/serve-lcpp when there), makes the Air-shaped 8-layer file when
# missing, then
#   1. glmoe's engine without HTTP (tools/engine_bench.py, with Llama's stream TPOT) and glmoe's
#      llama-bench tg128, the figures the server and Llama are held to;
#   2. each server in turn on the same file and flags (-ngl 99 -fa on -np 64 -c 16384) under
#      tools/load_bench.py at CLIENTS (default "1 8 32 64") concurrent streaming clients.
#
#   tools/serve_compare.sh LLAMA_CPP_SRC OUT_DIR
#
# Environment: MODEL (build/air8.gguf), CLIENTS, REQUESTS (2 per client), MAX_TOKENS (128).
set -u
src=${1:?usage: tools/serve_compare.sh LLAMA_CPP_SRC OUT_DIR}
out=${2:?usage: tools/serve_compare.sh LLAMA_CPP_SRC OUT_DIR}
[ -f "$src/CMakeLists.txt" ] || { echo "no llama.cpp source at $src"; exit 1; }
command -v llama-server > /dev/null || { echo "glmoe's llama-server is not on PATH: . tools/device_setup.sh"; exit 1; }
mkdir -p "$out" build
model=${MODEL:-build/air8.gguf}
lcpp=build/serve-lcpp
export PYTHONUNBUFFERED=1

( cmake -S "$src" -B "$lcpp" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
      -DCMAKE_BUILD_TYPE=Release \
  && cmake --build "$lcpp" --target llama-server -j"$(nproc)" ) > "$out/llama.cpp-build.log" 2>&1 &
build_job=$!
if [ ! -s "$model" ]; then
    if ! python3 tools/make_model.py "$model.part" --preset air-8layer > "$out/make_model.log" 2>&1; then
        tail -n 5 "$out/make_model.log"; exit 1
    fi
    mv "$model.part" "$model"
fi

python3 tools/engine_bench.py "$model" -ngl 99 -npp 16 -ntg 128 -npl 1,8,32,64 --llama | tee "$out/engine.md"
"$(python3 -c 'import glmoe, os; print(os.path.join(os.path.dirname(glmoe.__file__), "bin", "llama-bench"))')" \
    -m "$model" -ngl 99 -fa 1 -p 0 -n 128 -r 3 | tee "$out/llama-bench.md"

# serve NAME PORT BINARY: one server under every client count, then stopped.
serve() {
    local name=$1 port=$2 bin=$3 n
    "$bin" -m "$model" -ngl 99 -fa on -np 64 -c 16384 --port "$port" > "$out/$name.server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 240); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 0.5; done
    for n in ${CLIENTS:-1 8 32 64}; do
        python3 tools/load_bench.py --url "http://127.0.0.1:$port" --clients "$n" --requests "${REQUESTS:-2}" \
            --max-tokens "${MAX_TOKENS:-128}" --label "$name" | tail -n 1
    done
    kill "$pid"; wait "$pid" 2> /dev/null
}
{
    echo "| server | clients | requests | TTFT ms p50 / p90 / p99 | TPOT ms p50 / p90 / p99 | tokens | tok/s |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    serve glmoe 18091 "$(command -v llama-server)"
    if wait "$build_job"; then
        LD_LIBRARY_PATH=$lcpp/bin serve llama.cpp 18092 "$lcpp/bin/llama-server"
    else
        tail -n 20 "$out/llama.cpp-build.log"; echo "(llama.cpp build failed)"
    fi
} | tee "$out/servers.md"
