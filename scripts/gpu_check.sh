#!/usr/bin/env bash
# GPU check, run on a lent NVIDIA machine with a binary built elsewhere (nothing is compiled here):
#   carry devbin/mvlt (cargo build --release --features cuda) and .devfix/ (copies of the shared
#   reference fixtures), then: bash scripts/gpu_check.sh
# Parity on CUDA against the reference fixtures, then forward-pass timings; logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/mvlt-gpu}; mkdir -p "$OUT"
B=./devbin/mvlt; F=.devfix
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# cudarc loads the driver and NVRTC at run time. The driver's folder goes first: some toolkit and
# wheel folders hold a stub libcuda that fails with CUDA_ERROR_STUB_LIBRARY.
drv=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
nvrtc=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so*' -not -path '*stubs*' -printf '%h\n' 2>/dev/null | sort -u | head -1)
echo "driver: $drv; nvrtc: $nvrtc" | tee -a "$OUT/gpu.txt"
export LD_LIBRARY_PATH="$(dirname "${drv:-/usr/lib/x}"):${nvrtc}:${LD_LIBRARY_PATH:-}"
{
  echo "== verify on cuda"
  $B verify $F/small_io.json --device cuda
  $B verify $F/small_e2e_256.json --config $F/small_io.json --weights $F/small_model.safetensors \
     --image-tensor $F/image_preproc.safetensors:02_dress_striped_navy_256x256/tensor_u8 --device cuda
  $B verify $F/pvt_partial_load.json --config $F/small_io.json --weights $F/small_model.safetensors \
     --inputs $F/small_io.safetensors --device cuda
} 2>&1 | tee "$OUT/verify_cuda.txt"
{
  echo "== forward timings (pvlt_tiny, 256x256)"
  for heads in itm all; do
    for batch in 8 64; do
      $B bench --device cuda --config tiny --image-size 256 --batch $batch --heads $heads --warmup 3 --iters 10
    done
  done
  $B bench --device cpu --config tiny --image-size 256 --batch 8 --heads itm --warmup 1 --iters 3
} 2>&1 | tee "$OUT/bench.txt"
