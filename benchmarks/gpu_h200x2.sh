#!/usr/bin/env bash
# One nvidia-h200-x2 call (issue 4 items 1 and 3): $OUT/scaling.jsonl, $OUT/steps.jsonl, logs.
#   1. 1-GPU rows, one per GPU at once: Qwen2.5-1.5B compiled (GPU 0) and eager (GPU 1), product vs plain vs
#      plain + clip_grad_norm_, alternating rounds (benchmarks/step_bench.py); the compiled product row is the
#      best-1-GPU figure item 3 compares with.
#   2. 2-GPU rows, product path through Ray Train (benchmarks/scaling_bench.py): 1.5B DDP, ZeRO-2[, ZeRO-3, 7B].
# ROWS picks the 2-GPU rows (default "ddp zero2"; ddp = PyTorch's DDP with its 25 MB buckets, ddp-bN = N MB buckets,
# ddp-b200-bf16, ddp-blocks (training.ddp.impl: blocks), zero2, zero3, zero3-pf (ZeRO-3 with larger prefetch and
# persistence settings), fsdp (training.strategy: fsdp, ZeRO-3 sharding with FSDP2; fsdp-uN: N blocks per FSDP unit), q7zero2, q7zero3, q7fsdp; a suffix -ncN on a ddp row sets NCCL_MAX_NCHANNELS=N for it);
# ddp-blocks-fp8 (training.fp8 on the blocks reducer's workers, with bf16 weights), ddp-blocks-nobf16w (bf16 weights off);
# T the per-row timeout (s). NO_ONE=1 skips the 1-GPU rows; ONE=best: product only, the default settings on GPU 0 and
# training.fp8 on GPU 1 at once; ONE=compiled runs only the compiled 1-GPU timing
# (product and plain), on both GPUs at once, without the profiles (the best-1-GPU figure, measured on the same
# machine as the 2-GPU rows that follow it).
# SMOKE=1: CPU, tiny shapes (do not run it beside other Ray work here: each row ends with `ray stop --force`).
# As run (with the .whl preamble of ../shared/device/README.md):
#   ... && ROWS="ddp zero2" T=220 bash benchmarks/gpu_h200x2.sh
set -u
export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=${OUT:-/tmp/out}; mkdir -p $O
SM=(); [ -n "${SMOKE:-}" ] && SM=(--smoke --steps 2 --warmup 1)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } >> $O/scaling.log 2>&1
Q15=search_spaces/qwen2.5-1.5b_regression_gpu.yaml; Q15X2=search_spaces/qwen2.5-1.5b-x2_regression_gpu.yaml
Q7=search_spaces/qwen2.5-7b_regression_gpu.yaml
clean() { python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1; pkill -9 -f RayTrainWorker > /dev/null 2>&1; sleep 2; }
t0=$(date +%s)
if [ "${ONE:-}" = best ]; then
  # the best one-GPU product figures, both GPUs at once, product only: the default settings (GPU 0) and with
  # training.fp8 (GPU 1), which item 3's 2-GPU rows ddp-blocks and ddp-blocks-fp8 are compared with
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${T1:-130} python3 benchmarks/step_bench.py --manifest $Q15 --label q15-compiled-gpu0 \
    --modes product --rounds 3 --out $O/steps.jsonl "${SM[@]}" > $O/q15-compiled-gpu0.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout -k 5 ${T1:-130} python3 benchmarks/step_bench.py --manifest $Q15 --label q15-fp8-gpu1 \
    --set training.fp8=true --set training.strategy=plain --modes product --rounds 3 --out $O/steps.jsonl "${SM[@]}" > $O/q15-fp8-gpu1.log 2>&1 &
  wait
  grep -h '^{' $O/q15-compiled-gpu0.log $O/q15-fp8-gpu1.log | tee -a $O/scaling.log
  echo "one-GPU rows done at +$(( $(date +%s) - t0 )) s" | tee -a $O/scaling.log
elif [ "${ONE:-}" = compiled ]; then
  for g in 0 1; do
    CUDA_VISIBLE_DEVICES=$g timeout -k 5 ${T1:-130} python3 benchmarks/step_bench.py --manifest $Q15 --label q15-compiled-gpu$g \
      --modes product,plain --rounds 3 --out $O/steps.jsonl "${SM[@]}" > $O/q15-compiled-gpu$g.log 2>&1 &
  done
  wait
  grep -h '^{' $O/q15-compiled-gpu*.log | tee -a $O/scaling.log
  echo "one-GPU rows done at +$(( $(date +%s) - t0 )) s" | tee -a $O/scaling.log
elif [ -z "${NO_ONE:-}" ]; then
  # each GPU: a timing row, then a profile of a product step (3 steps, torch.profiler table in $O/prof-*.txt)
  { CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${T1:-130} python3 benchmarks/step_bench.py --manifest $Q15 --label q15-compiled \
      --modes product,plain,plain-clip --rounds 3 --out $O/steps.jsonl "${SM[@]}" > $O/q15-compiled.log 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${T2:-90} python3 benchmarks/step_bench.py --manifest $Q15 --label q15-compiled \
      --steps 3 --profile $O/prof-q15-compiled.txt "${SM[@]}" > $O/prof-q15-compiled.log 2>&1; } &
  { CUDA_VISIBLE_DEVICES=1 timeout -k 5 ${T1:-130} python3 benchmarks/step_bench.py --manifest $Q15 --label q15-eager \
      --set training.compile=false --modes product,plain,plain-clip --rounds 3 --out $O/steps.jsonl "${SM[@]}" > $O/q15-eager.log 2>&1
    CUDA_VISIBLE_DEVICES=1 timeout -k 5 ${T2:-90} python3 benchmarks/step_bench.py --manifest $Q15 --label q15-ds2-1gpu \
      --set training.strategy=deepspeed --steps 3 --profile $O/prof-q15-ds2-1gpu.txt "${SM[@]}" > $O/prof-q15-ds2.log 2>&1; } &
  wait
  grep -h '^{' $O/q15-compiled.log $O/q15-eager.log $O/prof-*.log | tee -a $O/scaling.log
  echo "one-GPU rows done at +$(( $(date +%s) - t0 )) s" | tee -a $O/scaling.log
fi
s() {  # label, args...
  local label=$1; shift
  local a=$(date +%s)
  local pr=(); [ -n "${PROF:-}" ] && pr=(--profile $O/prof-$label)  # PROF=1: a torch.profiler table and trace per row
  timeout -k 5 ${T:-220} python3 benchmarks/scaling_bench.py --workers 2 --out $O/scaling.jsonl --label $label "${SM[@]}" "${pr[@]}" "$@" > $O/$label.log 2>&1
  echo "$label rc=$? $(( $(date +%s) - a )) s" | tee -a $O/scaling.log
  grep -E '^\{' $O/$label.log | tail -1 | tee -a $O/scaling.log
  grep -E 'Error|error|Traceback' $O/$label.log | grep -v -i warn | tail -3 >> $O/scaling.log
  clean
}
for r0 in ${ROWS:-ddp zero2}; do
  r=${r0%-nc*}; sfx=${r0#$r}; unset NCCL_MAX_NCHANNELS
  [ -n "$sfx" ] && export NCCL_MAX_NCHANNELS=${sfx#-nc}
  case $r in
    ddp) s q15-ddp$sfx --manifest $Q15X2 --set training.strategy=ddp --set training.ddp.impl=torch --set training.ddp.bucket_cap_mb=25 ;;
    ddp-blocks) s q15-ddp-blocks$sfx --manifest $Q15X2 --set training.strategy=ddp --set training.ddp.impl=blocks ;;
    ddp-blocks-fp8) s q15-ddp-blocks-fp8$sfx --manifest $Q15X2 --set training.strategy=ddp --set training.ddp.impl=blocks --set training.fp8=true ;;
    ddp-blocks-fp8-nographs) s q15-ddp-blocks-fp8-nographs$sfx --manifest $Q15X2 --set training.strategy=ddp --set training.ddp.impl=blocks --set training.fp8=true --no-cudagraphs ;;
    ddp-blocks-nobf16w) s q15-ddp-blocks-nobf16w$sfx --manifest $Q15X2 --set training.strategy=ddp --set training.ddp.impl=blocks --set training.bf16_weights=false ;;
    ddp-bf16) s q15-ddp-bf16$sfx --manifest $Q15X2 --set training.strategy=ddp --set training.ddp.impl=torch --set training.ddp.comm_hook=bf16 ;;
    ddp-b200-bf16) s q15-ddp-b200-bf16$sfx --manifest $Q15X2 --set training.strategy=ddp --set training.ddp.impl=torch --set training.ddp.bucket_cap_mb=200 --set training.ddp.comm_hook=bf16 ;;
    ddp-b[0-9]*) s q15-$r$sfx --manifest $Q15X2 --set training.strategy=ddp --set training.ddp.impl=torch --set training.ddp.bucket_cap_mb=${r#ddp-b} ;;
    zero2) s q15-zero2 --manifest $Q15X2 --set training.deepspeed.stage=2 ;;
    zero3) s q15-zero3 --manifest $Q15X2 --set training.deepspeed.stage=3 ;;
    zero3-pf) s q15-zero3-pf --manifest $Q15X2 --set training.deepspeed.stage=3 \
      --set 'training.deepspeed.config={zero_optimization: {stage3_prefetch_bucket_size: 500000000, stage3_param_persistence_threshold: 1000000, stage3_max_live_parameters: 3000000000}}' ;;
    fsdp) s q15-fsdp --manifest $Q15X2 --set training.strategy=fsdp ;;
    fsdp-u[0-9]*) s q15-$r --manifest $Q15X2 --set training.strategy=fsdp --set training.fsdp.blocks_per_unit=${r#fsdp-u} ;;
    q7fsdp) s q7-fsdp --manifest $Q7 --set training.strategy=fsdp ;;
    q7zero2) s q7-zero2 --manifest $Q7 --set training.deepspeed.stage=2 --set search.space.batch_size=4 ;;
    q7zero2-bs[0-9]*) s q7-zero2-bs${r#q7zero2-bs} --manifest $Q7 --set training.deepspeed.stage=2 --set search.space.batch_size=${r#q7zero2-bs} ;;
    q7zero3) s q7-zero3 --manifest $Q7 --set training.deepspeed.stage=3 --set search.space.batch_size=4 ;;
  esac
done
echo "all done at +$(( $(date +%s) - t0 )) s" | tee -a $O/scaling.log
