#!/usr/bin/env bash
# Build llama.cpp's command-line tools into benchmarks/work/llamacpp/bin/, the peer of the GGUF benchmark.
#
# The llama.cpp source is the one vendored in the sdist of llama-cpp-python 0.3.36 (vendor/llama.cpp),
# so the tools and the Python binding (installed into the project's .venv from the same sdist) are
# the same llama.cpp commit. The sdist is fetched with pip (the only registry reachable here) into
# benchmarks/work/llamacpp/, which is git-ignored. Only the tools the benchmark uses are built:
# llama-quantize, llama-imatrix, llama-perplexity, llama-bench, llama-completion (the classic
# command-line client; llama-cli now links the whole server), llama-simple and llama-tokenize. They
# are linked statically (BUILD_SHARED_LIBS=OFF) so bin/ holds self-contained executables, and with
# GGML_NATIVE=ON, so they are tuned for (and only run on) this machine's CPU. Each step is skipped
# when its output is already there; delete benchmarks/work/llamacpp/ to start over. JOBS sets the
# build's parallelism (2 by default).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
version="0.3.36"
work="$repo/benchmarks/work/llamacpp"
sdist="$work/llama_cpp_python-$version.tar.gz"
src="$work/src/llama_cpp_python-$version"
llama="$src/vendor/llama.cpp"
build="$work/build"
bin="$work/bin"
python="${PYTHON:-python3}"
jobs="${JOBS:-2}"
targets=(llama-quantize llama-imatrix llama-perplexity llama-bench llama-completion llama-simple llama-tokenize)

mkdir -p "$work"
if [ ! -f "$sdist" ]; then
  "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
fi
if [ ! -f "$llama/CMakeLists.txt" ]; then
  rm -rf "$work/src"
  mkdir -p "$work/src"
  tar -xzf "$sdist" -C "$work/src"
fi

# The sdist has no git checkout of llama.cpp, only the submodule's HEAD under .git/modules; without
# it the build info would name whatever git repository encloses the folder (this project's).
commit="unknown"
if [ -f "$src/.git/modules/vendor/llama.cpp/HEAD" ]; then
  commit="$(head -c 40 "$src/.git/modules/vendor/llama.cpp/HEAD")"
fi

missing=0
for t in "${targets[@]}"; do
  [ -x "$bin/$t" ] || missing=1
done
if [ "$missing" = 1 ]; then
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S "$llama" -B "$build" "${generator[@]}" \
      -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF \
      -DGGML_NATIVE=ON \
      -DGGML_OPENMP=ON \
      -DLLAMA_CURL=OFF \
      -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_APP=OFF \
      -DLLAMA_BUILD_TOOLS=ON \
      -DLLAMA_BUILD_EXAMPLES=ON \
      -DLLAMA_BUILD_NUMBER=0 \
      -DLLAMA_BUILD_COMMIT="${commit:0:9}"
  fi
  start=$SECONDS
  cmake --build "$build" --config Release -j "$jobs" --target "${targets[@]}"
  echo "built llama.cpp tools in $((SECONDS - start)) s"
  mkdir -p "$bin"
  for t in "${targets[@]}"; do
    cp -f "$build/bin/$t" "$bin/$t"
  done
fi

echo "llama-cpp-python sdist $version, vendored llama.cpp commit $commit"
"$bin/llama-completion" --version 2>&1 | grep -E "^(version|built with)" || true
ls -1 "$bin"
