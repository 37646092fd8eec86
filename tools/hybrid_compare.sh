#!/bin/bash
# Hybrid expert offload beside llama.cpp, on the device machine (one H100, 16 cores), from the repo
# root: builds llama.cpp's llama-bench from LLAMA_CPP_SRC and glmoe's (unless GLMOE_BENCH is given),
# makes the Air-shaped 8-layer file, then runs both llama-bench binaries with the same flags:
#   a) experts in host memory       -ngl 99 -fa 1 -ot exps=CPU -t 16 -p 512 -n 64 -d $HYBRID_DEPTHS (0)
#   b) the same, one 4096 batch     -ngl 99 -fa 1 -ot exps=CPU -t 16 -p 4096 -b 4096 -ub 4096 -n 0
#   c) first 4 layers' experts CPU  -ngl 99 -fa 1 --n-cpu-moe 4 -t 16 -p 512 -n 64
#   d) all on the GPU (regression)  -ngl 99 -fa 1 -p 512 -n 128 -d 0,16384
#   e) CPU only                     -ngl 0 -t 16 -p 128 -n 32
#   f) llama.cpp alone, e) with -dev none (without it, llama.cpp's prompt batches use the GPU)
#
#   tools/hybrid_compare.sh LLAMA_CPP_SRC OUT_DIR [GLMOE_BENCH]
#
# LLAMA_CPP_SRC: e.g. peer/llama.cpp (llama-cpp-python's vendored llama.cpp, see its SOURCE.txt).
# GLMOE_BENCH: a prebuilt glmoe llama-bench, or a folder holding one (a CMake build folder, or
#   $GLMOE_SITE/glmoe/bin after `. tools/device_setup.sh`).
# OUT_DIR gets one markdown table per test and runtime (NAME.llama.cpp.md, NAME.glmoe.md, with
# stderr in NAME.*.err), the build logs and env.txt; the tables also go to the terminal.
# Needs nvcc, CMake, ninja, and gguf (from the carried wheels: tools/device_setup.sh's PYTHONPATH).
#
# Environment: BUDGET_S (default 520): the whole script's wall-clock budget in seconds; builds
# and each benchmark are cut (timeout) to what is left of it, and a test with under 15 s left is
# skipped with a note. TESTS (default "a b c d e f"): which tests, in order. THREADS (16), REPS (2;
# test d uses REPS_GPU, 3). MODEL (default build/air8.gguf, made when missing and reused after).
# Builds go to build/hybrid-lcpp and build/hybrid-glmoe (git-ignored; LCPP_BUILD, GLMOE_BUILD) and
# are reused, so a second call on a warm machine skips them, and a build cut short by the budget
# resumes there. LCPP_CMAKE_ARGS, GLMOE_CMAKE_ARGS: extra CMake arguments (split on spaces).
# LCPP_BENCH: a prebuilt llama.cpp llama-bench (its shared libraries beside it): no llama.cpp build.
set -u
t0=$SECONDS
src=${1:?usage: tools/hybrid_compare.sh LLAMA_CPP_SRC OUT_DIR [GLMOE_BENCH]}
out=${2:?usage: tools/hybrid_compare.sh LLAMA_CPP_SRC OUT_DIR [GLMOE_BENCH]}
glmoe_bench=${3:-}
budget=${BUDGET_S:-520}
tests=${TESTS:-a b c d e f}
threads=${THREADS:-16}
reps=${REPS:-2}
reps_gpu=${REPS_GPU:-3}
jobs=$(nproc)
if [ ! -f pyproject.toml ] || [ ! -f tools/make_model.py ]; then echo "run from the glmoe repo root"; exit 1; fi
[ -f "$src/CMakeLists.txt" ] || { echo "no llama.cpp source at $src"; exit 1; }
src=$(cd "$src" && pwd)
mkdir -p "$out" build && out=$(cd "$out" && pwd)
root=$(pwd)
lcpp=${LCPP_BUILD:-$root/build/hybrid-lcpp}
gbuild=${GLMOE_BUILD:-$root/build/hybrid-glmoe}
read -r -a lcpp_args <<< "${LCPP_CMAKE_ARGS:-}"
read -r -a glmoe_args <<< "${GLMOE_CMAKE_ARGS:-}"
model=${MODEL:-$root/build/air8.gguf}
left() { echo $((budget - (SECONDS - t0))); }
# upto RESERVE_S: a timeout that ends RESERVE_S before the budget does (at least 1 s: timeout 0 waits forever)
upto() { local s=$(($(left) - $1)); [ "$s" -ge 1 ] || s=1; echo "$s"; }

if ! python3 -c 'import gguf' 2> /dev/null; then
    # shellcheck source=tools/device_setup.sh disable=SC2317  # (device_setup returns when sourced)
    GLMOE_SKIP_BUILD=1 . tools/device_setup.sh > "$out/device_setup.log" 2>&1 \
        || { cat "$out/device_setup.log"; echo "no gguf module: carry .whl and see tools/device_setup.sh"; exit 1; }
fi
if ! command -v nvcc > /dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=$PATH:/usr/local/cuda/bin; fi
gen=()
command -v ninja > /dev/null 2>&1 && gen=(-G Ninja)

{
    date -u
    nvidia-smi --query-gpu=name,memory.used --format=csv
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $jobs; $(free -g | awk '/^Mem:/ {print $2 " GiB memory"}')"
    if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
        echo "glmoe: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src ggml-cuda tools bindings CMakeLists.txt || echo ' with uncommitted changes')"
    fi
    echo "llama.cpp: $src $(head -n 1 "$src/SOURCE.txt" 2> /dev/null)"
} 2>&1 | tee "$out/env.txt"

# A build folder configured for another source tree is started afresh.
if [ -n "${LCPP_BENCH:-}" ]; then
    lcpp=$(cd "$(dirname "$LCPP_BENCH")/.." && pwd)
    true &
else
    if [ -f "$lcpp/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$src" "$lcpp/CMakeCache.txt"; then
        rm -rf "$lcpp"
    fi
    ( timeout "$(upto 120)" cmake -S "$src" -B "$lcpp" "${gen[@]}" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release "${lcpp_args[@]}" \
    && timeout "$(upto 120)" cmake --build "$lcpp" --target llama-bench -j"$jobs" ) > "$out/llama.cpp-build.log" 2>&1 &
fi
lcpp_job=$!

model_job=
if [ ! -s "$model" ]; then
    ( timeout "$(upto 120)" python3 tools/make_model.py "${model%.gguf}.part.gguf" --preset air-8layer \
        && mv "${model%.gguf}.part.gguf" "$model" ) \
        > "$out/make_model.log" 2>&1 &
    model_job=$!
fi

if [ -n "$glmoe_bench" ]; then
    [ -d "$glmoe_bench" ] && glmoe_bench=$glmoe_bench/llama-bench
    [ -x "$glmoe_bench" ] || { echo "no glmoe llama-bench at $glmoe_bench"; glmoe_bench=; }
    glmoe_bench=${glmoe_bench:+$(cd "$(dirname "$glmoe_bench")" && pwd)/$(basename "$glmoe_bench")}
else
    t=$SECONDS
    if timeout "$(upto 120)" cmake -S . -B "$gbuild" "${gen[@]}" -DGLMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release "${glmoe_args[@]}" > "$out/glmoe-build.log" 2>&1 \
        && timeout "$(upto 120)" cmake --build "$gbuild" --target llama-bench -j"$jobs" >> "$out/glmoe-build.log" 2>&1; then
        glmoe_bench=$gbuild/llama-bench
        echo "glmoe build: $((SECONDS - t)) s"
    else
        tail -n 30 "$out/glmoe-build.log"; echo "glmoe build failed (log: $out/glmoe-build.log)"
    fi
fi
if [ -n "$model_job" ]; then
    wait "$model_job" || { tail -n 20 "$out/make_model.log"; echo "make_model failed"; exit 1; }
fi
echo "model: $model ($(du -h "$model" | cut -f1)) at $((SECONDS - t0)) s"
lcpp_bench=
if wait "$lcpp_job"; then
    lcpp_bench=$lcpp/bin/llama-bench
    echo "llama.cpp build done at $((SECONDS - t0)) s"
else
    tail -n 30 "$out/llama.cpp-build.log"; echo "llama.cpp build failed or ran out of time (log: $out/llama.cpp-build.log)"
fi
[ -n "$lcpp_bench$glmoe_bench" ] || exit 1

# bench NAME TAG BINARY CAP_S ARGS...: one llama-bench run under timeout, its table to OUT_DIR and
# the terminal; a failure (an unknown flag, a crash, the timeout) is shown and the script goes on.
bench() {
    local name=$1 tag=$2 bin=$3 cap=$4 rc
    shift 4
    [ -n "$bin" ] || { echo "($tag: no binary, $name skipped)"; return; }
    [ "$(left)" -lt "$cap" ] && cap=$(($(left) - 5))
    if [ "$cap" -lt 15 ]; then
        echo "($tag: $name skipped, out of the ${budget} s budget)" | tee "$out/$name.$tag.md"
        return
    fi
    echo "--- $name, $tag: llama-bench $* (timeout ${cap} s)"
    LD_LIBRARY_PATH=$lcpp/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
        "$bin" "$@" --progress > "$out/$name.$tag.md" 2> "$out/$name.$tag.err" &
    local pid=$! waited=0
    while kill -0 "$pid" 2> /dev/null && [ "$waited" -lt "$cap" ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$pid" 2> /dev/null; then
        # Where a run hangs is worth the seconds: its threads' stacks go to the .err file.
        stacks "$pid" >> "$out/$name.$tag.err" 2>&1
        kill "$pid"; sleep 2; kill -9 "$pid" 2> /dev/null
        wait "$pid"; rc=124
    else
        wait "$pid"; rc=$?
    fi
    cat "$out/$name.$tag.md"
    if [ "$rc" -ne 0 ]; then
        grep -i -m 3 -E 'error|unknown|invalid|fail' "$out/$name.$tag.err" || tail -n 5 "$out/$name.$tag.err"
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "($tag: $name timed out after ${cap} s, at: $(grep 'llama-bench: test' "$out/$name.$tag.err" | tail -n 1))"
            grep -E '^Thread|glmoe::' "$out/$name.$tag.err" | cut -c1-160 | head -n 40
        else
            echo "($tag: $name exit $rc)"
        fi
    fi
}

# stacks PID: every thread's call stack (gdb when there is one, else the kernel's view).
stacks() {
    echo "=== stacks of $1 after the timeout"
    if command -v gdb > /dev/null 2>&1; then
        timeout 20 gdb -batch -p "$1" -ex 'thread apply all bt 12' 2>&1 | grep -E '^#|^Thread' | head -n 200
    else
        for t in /proc/"$1"/task/*; do echo "${t##*/} $(cut -d' ' -f3 "$t/stat") $(cat "$t/wchan" 2> /dev/null)"; cat "$t/stack" 2> /dev/null | head -n 6; done
    fi
}

both() {
    local name=$1 cap=$2
    shift 2
    bench "$name" llama.cpp "$lcpp_bench" "$cap" "$@"
    bench "$name" glmoe "$glmoe_bench" "$cap" "$@"
}

m=(-m "$model")
for t in $tests; do
    case $t in
        a) both a-hybrid-ot-exps 150 "${m[@]}" -ngl 99 -fa 1 -ot exps=CPU -t "$threads" -p 512 -n 64 -d "${HYBRID_DEPTHS:-0}" -r "$reps" ;;
        b) both b-hybrid-pp4096 75 "${m[@]}" -ngl 99 -fa 1 -ot exps=CPU -t "$threads" -p 4096 -b 4096 -ub 4096 -n 0 -r "$reps" ;;
        c) both c-n-cpu-moe-4 60 "${m[@]}" -ngl 99 -fa 1 --n-cpu-moe 4 -t "$threads" -p 512 -n 64 -r "$reps" ;;
        d) both d-all-gpu 75 "${m[@]}" -ngl 99 -fa 1 -p 512 -n 128 -d 0,16384 -r "$reps_gpu" ;;
        e) both e-cpu-only 60 "${m[@]}" -ngl 0 -t "$threads" -p 128 -n 32 -r "$reps" ;;
        # llama.cpp alone: at -ngl 0 a CUDA build still sends batches of 32+ tokens through the GPU
        # (op offload, weights copied per batch); -dev none keeps e) on the CPU.
        f) bench f-cpu-only-dev-none llama.cpp "$lcpp_bench" 60 "${m[@]}" -dev none -ngl 0 -t "$threads" -p 128 -n 32 -r "$reps" ;;
        *) echo "unknown test $t (a-f)" ;;
    esac
done
date -u
echo "total: $((SECONDS - t0)) s"
