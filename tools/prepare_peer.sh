#!/bin/bash
# The llama.cpp that glmoe's device benchmarks compare with, prepared on this machine (the device
# has no network): llama-cpp-python 0.3.36's vendored llama.cpp, pruned to what llama-bench,
# llama-server and batched-bench need with the CPU and CUDA backends (~26 MB), in the git-ignored
# peer/llama.cpp; carry `peer` (and .whl, tools/device_wheels.txt) to the device. Its tools list
# is cut to those three (and mtmd, which the server links), so configure it with
# -DLLAMA_BUILD_APP=OFF; the server builds without its web UI (no network to fetch it).
#   tools/prepare_peer.sh [WORK_DIR]       (WORK_DIR: where the sdist goes, default a temp dir)
set -eu
[ -f pyproject.toml ] && [ -d ggml-cuda ] || { echo "run from the glmoe repo root"; exit 1; }
work=${1:-$(mktemp -d)}
version=0.3.36
mkdir -p "$work"
python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$version" -d "$work"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
dst=peer/llama.cpp
rm -rf "$dst"
mkdir -p "$dst/ggml/src" "$dst/tools/ui" "$dst/scripts"
cp -r "$src"/{CMakeLists.txt,cmake,common,include,src,vendor,licenses} "$dst/"
cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} "$dst/ggml/"
cp "$src"/ggml/src/*.c "$src"/ggml/src/*.cpp "$src"/ggml/src/*.h "$src"/ggml/src/*.in "$src/ggml/src/CMakeLists.txt" "$dst/ggml/src/"
cp -r "$src"/ggml/src/{ggml-cpu,ggml-cuda} "$dst/ggml/src/"
cp -r "$src"/tools/{llama-bench,server,mtmd,batched-bench} "$dst/tools/"
cp "$src"/tools/ui/{CMakeLists.txt,sources.cmake,ui.cpp.in,ui.h.in} "$dst/tools/ui/"
cp "$src"/scripts/*.cmake "$dst/scripts/"
cat > "$dst/tools/CMakeLists.txt" << 'CMAKE'
# glmoe's pruned copy (tools/prepare_peer.sh): only the tools its benchmarks run.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(batched-bench)
add_subdirectory(llama-bench)
if (LLAMA_BUILD_SERVER)
    add_subdirectory(ui)
    add_subdirectory(server)
endif()
add_subdirectory(mtmd)
CMAKE
echo "llama-cpp-python $version's llama.cpp, pruned by tools/prepare_peer.sh" > "$dst/SOURCE.txt"
du -sh "$dst"
