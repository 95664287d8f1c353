#!/usr/bin/env bash
# Builds llama.cpp's llama-batched-bench, CPU only, from the llama.cpp sources vendored in the
# llama-cpp-python sdist, for `glinthawk bench engine`'s optional llama.cpp baseline. A baseline
# only: glinthawk never imports or needs it. The sdist pins one llama.cpp commit per release, so a
# registry version names the exact sources measured.
#
#   scripts/build_llamacpp.sh [SDIST]   (SDIST: an already downloaded llama_cpp_python-*.tar.gz)
#
# Into $GLINTHAWK_LLAMACPP_DIR (default ~/.cache/glinthawk/llama.cpp): src/ (the unpacked sdist),
# llama.cpp -> its vendor/llama.cpp (the converter, gguf-py), build/bin/llama-batched-bench.
# JOBS (default 2) sets the build's parallelism.
set -euo pipefail
version=0.3.36
dir=${GLINTHAWK_LLAMACPP_DIR:-$HOME/.cache/glinthawk/llama.cpp}
python=${PYTHON:-python3}
mkdir -p "$dir/src"
sdist=${1:-}
if [ -z "$sdist" ]; then
    sdist=$(ls "$dir"/src/llama_cpp_python-$version.tar.gz 2>/dev/null || true)
fi
if [ -z "$sdist" ]; then
    "$python" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$dir/src"
    sdist="$dir/src/llama_cpp_python-$version.tar.gz"
fi
[ -f "$sdist" ] || { echo "no sdist at $sdist: pass the path of llama_cpp_python-$version.tar.gz" >&2; exit 1; }
# sdists unpack into a folder named as the file is
top=$(basename "$sdist" .tar.gz)
# Only vendor/llama.cpp is needed; the Python binding around it is never built.
[ -d "$dir/src/$top/vendor/llama.cpp" ] || tar xzf "$sdist" -C "$dir/src" "$top/vendor/llama.cpp"
ln -sfn "$dir/src/$top/vendor/llama.cpp" "$dir/llama.cpp"
# The one change to its sources: upstream leaks its logger on purpose (llama.cpp issue 22142), so a run
# can exit before the logging thread has written the result table; stopping that thread flushes it.
bench_src="$dir/llama.cpp/tools/batched-bench/batched-bench.cpp"
grep -q glinthawk "$bench_src" || sed -i \
    's|^    llama_backend_free();$|&\n    common_log_pause(common_log_main()); // glinthawk: flush the table before exit|' \
    "$bench_src"
grep -q glinthawk "$bench_src" || { echo "could not patch $bench_src: is it llama-cpp-python $version's?" >&2; exit 1; }
command -v cmake >/dev/null && command -v c++ >/dev/null \
    || { echo "the build needs cmake and a C++ compiler: apt-get install cmake g++ (ninja-build optional)" >&2; exit 1; }
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
start=$(date +%s)
# No network code: LLAMA_CURL is deprecated in this llama.cpp (kept for older ones); downloads go through OpenSSL.
cmake -S "$dir/llama.cpp" -B "$dir/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    >"$dir/cmake.log" 2>&1 || { echo "cmake failed: see $dir/cmake.log" >&2; exit 1; }
cmake --build "$dir/build" -j"${JOBS:-2}" --target llama-batched-bench >"$dir/build.log" 2>&1 \
    || { echo "the build failed: see $dir/build.log" >&2; exit 1; }
echo "built $dir/build/bin/llama-batched-bench in $(( $(date +%s) - start )) s (llama.cpp from llama-cpp-python $version)"
