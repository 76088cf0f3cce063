#!/usr/bin/env bash
# One H100 call: the step-benchmark matrix (benchmarks/step_bench.py). Writes $OUT/steps.jsonl and $OUT/steps.log.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> $O/steps.log 2>&1
# ROWS: the labels to run (default: all). product, plain and plain-clip are timed in alternating rounds (step_bench.py)
b() { case " ${ROWS:-all} " in *" all "*|*" $4 "*) ;; *) return ;; esac
      timeout -k 5 ${T:-150} python3 benchmarks/step_bench.py --out $O/steps.jsonl "$@" 2>&1 | grep -v -i warn | tail -6 | tee -a $O/steps.log; }
Q5=search_spaces/qwen2.5-0.5b_regression_gpu.yaml; Q15=search_spaces/qwen2.5-1.5b_regression_gpu.yaml
VB=search_spaces/dinov2-vitb14_classifier_gpu.yaml; VS=search_spaces/dinov2-vits14_classifier_gpu.yaml
b --manifest $Q5 --label q05-compiled --modes product,loader,plain,plain-clip
b --manifest $Q5 --label q05-eager --set training.compile=false --modes product,plain,plain-clip
b --manifest $Q15 --label q15-compiled --modes product,loader,plain,plain-clip
b --manifest $Q15 --label q15-eager --set training.compile=false --modes product,plain,plain-clip
b --manifest $VB --label vitb-compiled --modes product,loader,plain,plain-clip
b --manifest $VB --label vitb-eager --set training.compile=false --modes product,plain,plain-clip
b --manifest $VS --label vits-compiled --modes product,loader,plain,plain-clip
b --manifest $Q5 --label q05-ds2-1gpu --set training.strategy=deepspeed --modes product
b --manifest $Q15 --label q15-compiled-bs16 --set search.space.batch_size=16 --modes product
b --manifest $Q15 --label q15-norm-ab --modes product,product-late-norm,plain  # EarlyNorm on/off, same run
# training.micro_batch: auto (a batch larger than fits is split, gradients accumulated): the probe's choice and
# the step at 2 and 4 micro-batches per update, against the whole-batch step (q15-compiled-bs16, q05-bs16)
b --manifest $Q15 --label q15-bs32-micro-auto --set search.space.batch_size=32 --modes product
b --manifest $Q15 --label q15-bs64-micro-auto --set search.space.batch_size=64 --modes product --steps 6
b --manifest $Q5 --label q05-bs16 --modes product
b --manifest $Q5 --label q05-bs64-micro-auto --set search.space.batch_size=64 --modes product
b --manifest $Q5 --label q05-bs128-micro-auto --set search.space.batch_size=128 --modes product
