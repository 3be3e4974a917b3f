#!/usr/bin/env bash
# Builds the feature-server with `--features cuda` on a machine WITHOUT a system CUDA toolkit:
# nvcc, headers and the CUDA 13.0 libraries come from PyPI wheels into a virtual environment,
# and a stub libcuda.so (the driver library, present only where a GPU is) satisfies the linker.
# The binaries then run on any machine with an NVIDIA driver for CUDA >= 13.0 and the CUDA 13
# cuBLAS/cuRAND/cudart libraries on LD_LIBRARY_PATH.
#
#   scripts/build-cuda.sh [cargo args...]     default: build --release -p feature-server
#   (add `--features cudnn` for cuDNN's convolutions; scripts/gpu-bundle.sh builds both)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TAXON_CUDA_VENV:-$HOME/.cache/taxon/cuda-venv}
cuda=${TAXON_CUDA_HOME:-$HOME/.cache/taxon/cuda13}
if [ ! -x "$cuda/bin/nvcc" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand" "nvidia-nvvm==13.0.*"
  wheels=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
  mkdir -p "$cuda/lib64/stubs"
  for d in bin include nvvm; do ln -sfn "$wheels/$d" "$cuda/$d"; done
  for l in cublas cublasLt nvrtc cudart; do ln -sf "$wheels/lib/lib$l.so.13" "$cuda/lib64/lib$l.so"; done
  ln -sf "$wheels/lib/libcurand.so.10" "$cuda/lib64/libcurand.so"
fi
# cudarc's source, where the symbols the stubs must define are listed.
cudarc_src() {
  dirname "$(cargo metadata --format-version 1 --features feature-server/cuda |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')"
}
if [ ! -s "$cuda/lib64/stubs/libcuda.so" ]; then
  cudarc=$(cudarc_src)
  # The driver API's symbols, as cudarc declares them, in a library named like the driver's.
  grep -oE 'load::<_F>\("cu[A-Za-z0-9_]+"\)' "$cudarc/src/driver/sys/mod.rs" | sed -E 's/.*"(cu[A-Za-z0-9_]+)".*/void \1(void){}/' | sort -u >"$cuda/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib64/stubs/libcuda.so" "$cuda/libcuda_stub.c"
fi
# Likewise cuDNN's symbols, for `--features cudnn` (cudarc links it; its 9.x bindings need no
# headers): the real libcudnn.so.9 is found at run time on the GPU machine.
if [ ! -s "$cuda/lib64/stubs/libcudnn.so" ]; then
  cudarc=$(cudarc_src)
  grep -oE 'load::<_F>\("cudnn[A-Za-z0-9_]+"\)' "$cudarc/src/cudnn/sys/mod.rs" | sed -E 's/.*"(cudnn[A-Za-z0-9_]+)".*/void \1(void){}/' | sort -u >"$cuda/libcudnn_stub.c"
  cc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o "$cuda/lib64/stubs/libcudnn.so" "$cuda/libcudnn_stub.c"
fi
export CUDA_HOME=$cuda CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export PATH=$cuda/bin:$PATH
if [ $# -eq 0 ]; then set -- build --release -p feature-server; fi
cargo "$@" --features cuda
