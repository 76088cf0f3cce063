#!/usr/bin/env bash
# One H100 call for issue 7 items 3 and 4 (benchmarks/gpu_packing.py), most important part first:
# packing + memory return, then `gpus: auto`, then the 1-trial-per-GPU comparison.
# Run through the device tool with `.whl` carried (see ../shared/device/README.md for the preamble).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p $O/a $O/b
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $O/nvidia-smi.txt 2>&1
timeout ${T1:-330} python3 benchmarks/gpu_packing.py --out $O/a --skip whole 2>&1 | grep -v -i warn | tail -30 | tee $O/a.log
timeout ${T2:-200} python3 benchmarks/gpu_packing.py --out $O/b --skip packed,auto,memory 2>&1 | grep -v -i warn | tail -20 | tee $O/b.log
