#!/usr/bin/env bash
# H100 calls for issue 7 items 3 and 4 (benchmarks/gpu_packing.py), as run on 2026-11-26:
#   call 1: PART=packed   (16 trials at 0.25 GPU)
#   call 2: PART=rest     (50-trial memory return, `gpus: auto`, then 8 trials at 1 GPU each)
# N_TRAIN=N: N training rows per trial instead of 4096, so the fixed start-up and evaluation weigh less. Issue 7 item 3
# as measured on 2026-11-27 (benchmarks/RESULTS.md (c4)): MPS=1 PART=packed N_TRAIN=49152 T1=540 (8.8 % overhead),
# then `python3 benchmarks/gpu_packing.py --out $OUT/b --trials 2 --n-train 49152 --skip packed,auto,memory` for the
# one-trial-per-GPU side of the trials/hour ratio (4.19x)
# Run through the device tool with `.whl` carried (see ../shared/device/README.md for the preamble).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p $O/a $O/b
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $O/nvidia-smi.txt 2>&1
# MPS=1: run under NVIDIA's Multi-Process Service, so the packed trials' kernels share the GPU at once instead of
# time-slicing it (the Ray workers inherit the pipe directory from this shell through ray.init's local cluster)
if [ -n "${MPS:-}" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  { command -v nvidia-cuda-mps-control && nvidia-cuda-mps-control -d && echo "MPS daemon started"; } >> $O/nvidia-smi.txt 2>&1 \
    || echo "MPS daemon did not start" >> $O/nvidia-smi.txt
  trap 'echo quit | nvidia-cuda-mps-control; cp -r /tmp/mps-log $O/ 2>/dev/null' EXIT
fi
if [ "${PART:-rest}" = packed ]; then
  timeout ${T1:-330} python3 benchmarks/gpu_packing.py --out $O/a ${N_TRAIN:+--n-train $N_TRAIN} --skip whole,auto,memory 2>&1 | grep -v -i warn | grep -v logging.cc | tail -30 | tee $O/a.log
else
  timeout ${T1:-240} python3 benchmarks/gpu_packing.py --out $O/a --skip packed,whole 2>&1 | grep -v -i warn | grep -v logging.cc | tail -30 | tee $O/a.log
  timeout ${T2:-170} python3 benchmarks/gpu_packing.py --out $O/b --trials 8 --skip packed,auto,memory 2>&1 | grep -v -i warn | grep -v logging.cc | tail -20 | tee $O/b.log
fi
