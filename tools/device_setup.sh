# shellcheck shell=bash
# Set up the device machine (no network, python3 without glmoe's dependencies) from the repo root:
#   . tools/device_setup.sh
# Installs the wheels carried in .whl/ (git-ignored, listed in tools/device_wheels.txt; carry it) into
# $GLMOE_SITE (default /tmp/site), builds glmoe with CUDA and installs it there too, and exports
# PYTHONPATH and PATH (its console scripts: llama-bench, llama-server, glmoe) for this shell.
# Sourced, a failure returns 1 without ending the shell; it can also be run as a plain script to
# install only (the exports then do not outlive it). Build log: $GLMOE_SITE.build.log.
# Set GLMOE_SKIP_BUILD=1 to install the wheels only.

_glmoe_device_setup() {
    local site=${GLMOE_SITE:-/tmp/site} py=${PYTHON:-python3}
    if [ ! -f pyproject.toml ] || [ ! -d bindings/glmoe ]; then echo "device_setup: run from the glmoe repo root" >&2; return 1; fi
    ls .whl/*.whl > /dev/null 2>&1 || { echo "device_setup: no .whl/*.whl here (carry .whl)" >&2; return 1; }
    mkdir -p "$site" || return 1
    # pip --target --upgrade replaces whole top-level folders (bin/ too), so the wheels go in only
    # when the set in .whl/ changed, and glmoe's build (below) is merged in from a folder of its own.
    if [ "$(ls .whl)" != "$(cat "$site/.wheels" 2> /dev/null)" ]; then
        "$py" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-index --no-deps \
            --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            || { echo "device_setup: wheel install failed" >&2; return 1; }
        ls .whl > "$site/.wheels"
    fi
    case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
    case ":$PATH:" in *":$site/bin:"*) ;; *) export PATH="$site/bin:$PATH" ;; esac
    if ! command -v nvcc > /dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
        export PATH="$PATH:/usr/local/cuda/bin"
    fi
    "$py" -c 'import gguf, scikit_build_core, nanobind, fastapi, uvicorn, pydantic, jinja2, llguidance' \
        || { echo "device_setup: carried packages do not import" >&2; return 1; }
    echo "device_setup: wheels in $site; in a new shell: export PYTHONPATH=$site PATH=$site/bin:\$PATH"
    [ "${GLMOE_SKIP_BUILD:-0}" = 1 ] && return 0
    local t0=$SECONDS f
    # The CMake build stays in build/{wheel_tag} (pyproject.toml), so a warm machine rebuilds
    # incrementally; glmoe then goes beside its dependencies and its scripts into $site/bin.
    rm -rf "$site.glmoe"
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$py" -m pip install --disable-pip-version-check --root-user-action=ignore --no-index --no-build-isolation \
        --no-deps --no-cache-dir --target "$site.glmoe" . > "$site.build.log" 2>&1 \
        || { tail -n 40 "$site.build.log" >&2; echo "device_setup: glmoe build failed (log: $site.build.log)" >&2; return 1; }
    mkdir -p "$site/bin" && rm -rf "$site"/glmoe "$site"/glmoe-*.dist-info || return 1
    for f in "$site.glmoe"/*; do
        if [ "${f##*/}" = bin ]; then mv -f "$f"/* "$site/bin/"; else mv "$f" "$site/"; fi || return 1
    done
    rm -rf "$site.glmoe"
    "$py" -c 'import glmoe, glmoe._core' || { echo "device_setup: glmoe does not import" >&2; return 1; }
    echo "device_setup: glmoe built and installed in $((SECONDS - t0)) s ($(command -v llama-bench))"
}

_glmoe_device_setup
_glmoe_rc=$?
unset -f _glmoe_device_setup
# shellcheck disable=SC2317  # the exit is reached when run rather than sourced
return "$_glmoe_rc" 2> /dev/null || exit "$_glmoe_rc"
