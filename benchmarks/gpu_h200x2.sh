#!/usr/bin/env bash
# One nvidia-h200-x2 call: 1-GPU baseline and 2-GPU DDP / ZeRO-2 / ZeRO-3 for 1.5B, then 7B. $OUT/scaling.jsonl
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv >> $O/scaling.log 2>&1
Q15=search_spaces/qwen2.5-1.5b-x2_regression_gpu.yaml; Q7=search_spaces/qwen2.5-7b_regression_gpu.yaml
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/step_bench.py --manifest search_spaces/qwen2.5-1.5b_regression_gpu.yaml --label q15-1gpu --modes product --out $O/scaling.jsonl 2>&1 | grep '^{' | tee -a $O/scaling.log
s() { timeout ${T:-110} python3 benchmarks/scaling_bench.py --workers 2 --out $O/scaling.jsonl "$@" > $O/last.log 2>&1; grep -E '^\{|Error|error' $O/last.log | grep -v -i warn | tail -4 | tee -a $O/scaling.log; }
s --manifest $Q15 --label q15-ddp --set training.strategy=ddp
s --manifest $Q15 --label q15-zero2 --set training.deepspeed.stage=2
s --manifest $Q15 --label q15-zero3 --set training.deepspeed.stage=3
T=170 s --manifest $Q7 --label q7-zero3 --set training.deepspeed.stage=3
T=150 s --manifest $Q7 --label q7-zero2 --set training.deepspeed.stage=2
