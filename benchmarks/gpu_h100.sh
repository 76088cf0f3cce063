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
# 2026-11-27 (seventh session): experiments toward the MFU targets, each row its own process.
# --sdpa X: only that SDPA backend (default: PyTorch's choice, cuDNN on the H100). --pure-bf16: an upper bound
# (model, gradients and AdamW state in bf16), not a product setting.
b --manifest $Q5 --label q05-bs64 --set search.space.batch_size=64 --modes product
b --manifest $Q5 --label q05-bs64-purebf16 --set search.space.batch_size=64 --modes product --pure-bf16
b --manifest $Q5 --label q05-bs64-flash --set search.space.batch_size=64 --modes product --sdpa flash
b --manifest $VB --label vitb-bs512 --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs512-flash --set search.space.batch_size=512 --modes product --sdpa flash
b --manifest $VB --label vitb-bs512-purebf16 --set search.space.batch_size=512 --modes product --pure-bf16
b --manifest $Q15 --label q15-bs16 --set search.space.batch_size=16 --modes product
b --manifest $Q15 --label q15-bs16-purebf16 --set search.space.batch_size=16 --modes product --pure-bf16
b --manifest $VB --label vitb-bs512-efficient --set search.space.batch_size=512 --modes product --sdpa efficient
# training.bf16_weights (on by default for one GPU process): against the same step with it off, each its own process
b --manifest $Q5 --label q05-bs64-bf16w --set search.space.batch_size=64 --modes product,plain
b --manifest $Q5 --label q05-bs64-mixed --set search.space.batch_size=64 --set training.bf16_weights=false --modes product
b --manifest $Q15 --label q15-bs16-bf16w --set search.space.batch_size=16 --modes product,plain
b --manifest $Q15 --label q15-bs16-mixed --set search.space.batch_size=16 --set training.bf16_weights=false --modes product
b --manifest $VB --label vitb-bs512-bf16w --set search.space.batch_size=512 --modes product,plain
b --manifest $VB --label vitb-bs512-mixed --set search.space.batch_size=512 --set training.bf16_weights=false --modes product
b --manifest $Q15 --label q15-bs64-bf16w --set search.space.batch_size=64 --modes product --steps 6
b --manifest $Q15 --label q15-bs32-bf16w --set search.space.batch_size=32 --modes product --steps 6
b --manifest $Q5 --label q05-bs64-bf16w-only --set search.space.batch_size=64 --modes product
b --manifest $Q15 --label q15-bs16-bf16w-only --set search.space.batch_size=16 --modes product
b --manifest $Q5 --label q05-bs16-bf16w-vs-plain --modes product,plain,plain-clip
b --manifest $Q5 --label q05-bs16-mixed-vs-plain --set training.bf16_weights=false --modes product,plain,plain-clip
b --manifest $VB --label vitb-bs512-bf16w-only --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs128-bf16w-vs-plain --modes product,plain,plain-clip
# 2026-11-27 (eighth session): training.fp8 (the blocks' linear layers in FP8) against the same step without it
b --manifest $Q15 --label q15-bs16-fp8 --set search.space.batch_size=16 --set training.fp8=true --modes product
b --manifest $Q15 --label q15-bs64-fp8 --set search.space.batch_size=64 --set training.fp8=true --modes product --steps 6
b --manifest $Q5 --label q05-bs64-fp8 --set search.space.batch_size=64 --set training.fp8=true --modes product
b --manifest $VB --label vitb-bs512-fp8 --set search.space.batch_size=512 --set training.fp8=true --modes product
b --manifest $Q5 --label q05-bs16-fp8-vs-plain --set training.fp8=true --modes product,plain,plain-clip
b --manifest $VB --label vitb-bs512-fp8-mlp --set search.space.batch_size=512 --set training.fp8=true --modes product --fp8-only mlp.
b --manifest $Q5 --label q05-bs16-fp8-mixed-vs-plain --set training.fp8=true --set training.bf16_weights=false --modes product,plain,plain-clip
b --manifest $Q15 --label q15-bs16-fp8-mixed --set search.space.batch_size=16 --set training.fp8=true --set training.bf16_weights=false --modes product
b --manifest $Q5 --label q05-bs64-fp8-mixed --set search.space.batch_size=64 --set training.fp8=true --set training.bf16_weights=false --modes product
b --manifest $Q15 --label q15-bs16-fp8-vs-plain --set search.space.batch_size=16 --set training.fp8=true --modes product,plain,plain-clip --steps 20 --rounds 5
b --manifest $Q5 --label q05-bs16-fp8-vs-plain-long --set training.fp8=true --modes product,plain,plain-clip --steps 40 --rounds 5
# 2026-11-27 (ninth session): training.fast_blocks (DINOv2: LayerScale folded into the projections) against the
# same step without it, each its own process
b --manifest $VB --label vitb-bs512-fastoff --set search.space.batch_size=512 --set training.fast_blocks=false --modes product
b --manifest $VB --label vitb-bs512-fast --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs128-fast-vs-plain --modes product,plain,plain-clip
b --manifest $VS --label vits-bs512-fastoff --set search.space.batch_size=512 --set training.fast_blocks=false --modes product
b --manifest $VS --label vits-bs512-fast --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs512-fast-autotune --set search.space.batch_size=512 --modes product --autotune
# 2026-11-28 (tenth session): ViT-B/14 at a larger batch (768 fits the H100 whole), against 512 in the same call
b --manifest $VB --label vitb-bs512-ctl --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs768-fast --set search.space.batch_size=768 --modes product
# 2026-11-28 (tenth session): Inductor's CUDA graphs for the compiled blocks at a host-bound size (0.5B bs 16)
b --manifest $Q5 --label q05-bs16-ctl --modes product
b --manifest $Q5 --label q05-bs16-cg --modes product --cudagraphs
b --manifest $Q5 --label q05-bs16-fp8-cg --set training.fp8=true --modes product --cudagraphs
b --manifest $Q5 --label q05-bs16-fp8-cg-vs-plain --set training.fp8=true --modes product,plain --cudagraphs
# 2026-11-28 (eleventh session): training.fp8 now compiles the blocks with CUDA graphs (speed.use_cudagraphs, with
# bf16 weights on CUDA), and the plain loop does the same; the product's own path, no experiment flag
b --manifest $Q5 --label q05-bs16-fp8-graphs-vs-plain --set training.fp8=true --modes product,plain,plain-clip --steps 40 --rounds 5
b --manifest $Q15 --label q15-bs16-fp8-graphs-vs-plain --set search.space.batch_size=16 --set training.fp8=true --modes product,plain,plain-clip --steps 20 --rounds 5
b --manifest $Q5 --label q05-bs64-fp8-graphs --set search.space.batch_size=64 --set training.fp8=true --modes product
b --manifest $Q15 --label q15-bs64-fp8-graphs --set search.space.batch_size=64 --set training.fp8=true --modes product --steps 6
# the same product step with and without the CUDA graphs (--no-cudagraphs), each its own process: time and peak memory
b --manifest $Q5 --label q05-bs16-fp8-graphs --set training.fp8=true --modes product --steps 20 --rounds 5
b --manifest $Q5 --label q05-bs16-fp8-nographs --set training.fp8=true --modes product --steps 20 --rounds 5 --no-cudagraphs
b --manifest $Q15 --label q15-bs64-fp8-nographs --set search.space.batch_size=64 --set training.fp8=true --modes product --steps 6 --no-cudagraphs
# 2026-11-28 (twelfth session): training.gelu_epilogue (GELU, tanh form, in cuBLASLt's matmul epilogues; on in the
# ViT-B/14 manifest since then, so the rows above that name $VB run with it) against the same step without it,
# each its own process, twice in turn
b --manifest $VB --label vitb-bs512-erf --set search.space.batch_size=512 --set training.gelu_epilogue=false --modes product
b --manifest $VB --label vitb-bs512-gelu-lt --set search.space.batch_size=512 --set training.gelu_epilogue=true --modes product
b --manifest $VB --label vitb-bs512-erf-2 --set search.space.batch_size=512 --set training.gelu_epilogue=false --modes product
b --manifest $VB --label vitb-bs512-gelu-lt-2 --set search.space.batch_size=512 --set training.gelu_epilogue=true --modes product
b --manifest $VB --label vitb-bs128-gelu-lt-vs-plain --set training.gelu_epilogue=true --modes product,plain,plain-clip
# Commit 46e3662 also had the backward's other forms as rows (SWEEPER_GELU_LT_BWD=bgrad, torch, dgelu-wb: DGELU_BGRAD, the
# forward's epilogue only, BGRADB weight gradients); all slower than the DGELU form kept (gpu_2026-11-28-twelfth.md)
b --manifest $VB --label vitb-bs512-gelu-lt-loader --set search.space.batch_size=512 --set training.gelu_epilogue=true --modes product,loader
b --manifest $VS --label vits-gelu-lt --set training.gelu_epilogue=true --modes product,loader,plain
# 2026-11-28 (fourteenth session, an H200): training.fast_blocks makes DINOv2's patch-embedding convolution one matmul
# (trainables/dinov2_fast.PatchConv2d); --patch-conv keeps cuDNN's convolution. Each its own process, twice in turn
b --manifest $VB --label vitb-bs512-patchconv --set search.space.batch_size=512 --modes product --patch-conv
b --manifest $VB --label vitb-bs512-patchmm --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs512-patchconv-2 --set search.space.batch_size=512 --modes product --patch-conv
b --manifest $VB --label vitb-bs512-patchmm-2 --set search.space.batch_size=512 --modes product
b --manifest $VS --label vits-bs512-patchconv --set search.space.batch_size=512 --modes product --patch-conv
b --manifest $VS --label vits-bs512-patchmm --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs512-patchmm-loader --set search.space.batch_size=512 --modes product,loader
b --manifest $VB --label vitb-bs128-patchmm-vs-plain --modes product,plain,plain-clip
# the loader's batches gathered straight into pinned memory (make_collate(pin=True)) against the old pageable gather
# and pin (--pageable-collate), each its own process, twice in turn
b --manifest $VB --label vitb-bs512-loader-pageable --set search.space.batch_size=512 --modes product,loader --pageable-collate
b --manifest $VB --label vitb-bs512-loader-pinned --set search.space.batch_size=512 --modes product,loader
b --manifest $VB --label vitb-bs512-loader-pageable-2 --set search.space.batch_size=512 --modes product,loader --pageable-collate
b --manifest $VB --label vitb-bs512-loader-pinned-2 --set search.space.batch_size=512 --modes product,loader
# ViT-S/14 at its manifest's batch (256), where the step is short enough to be host-bound: product against plain with
# more steps and rounds, with bf16 weights off, and with Inductor's CUDA graphs for the compiled blocks
b --manifest $VS --label vits-bs256-vs-plain --modes product,plain,plain-clip --steps 20 --rounds 5
b --manifest $VS --label vits-bs256-mixed-vs-plain --set training.bf16_weights=false --modes product,plain --steps 20 --rounds 5
b --manifest $VS --label vits-bs256-cg-vs-plain --modes product,plain --steps 20 --rounds 5 --cudagraphs
# training.cuda_graphs: true (CUDA graphs without FP8) on ViT-S/14 at batch 256, against the default, each its own process
b --manifest $VS --label vits-bs256-default --modes product,plain --steps 20 --rounds 5
b --manifest $VS --label vits-bs256-cudagraphs --set training.cuda_graphs=true --modes product,plain,loader --steps 20 --rounds 5
# 2026-11-28 (fifteenth session, an H200): knobs without code changes, each its own process. Inductor's coordinate-
# descent tuning of its Triton kernels (the norms, residual adds and bias sums), a batch of 1024, and PyTorch's
# matmuls through cuBLASLt instead of cuBLAS
b --manifest $VB --label vitb-bs512-base15 --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs512-coord --set search.space.batch_size=512 --modes product --inductor coordinate_descent_tuning=True
b --manifest $VB --label vitb-bs1024 --set search.space.batch_size=1024 --modes product
b --manifest $VB --label vitb-bs512-cublaslt --set search.space.batch_size=512 --modes product --blas cublaslt
# Family.compile_rest (DINOv2's embeddings, final LayerNorm and pooling compiled, each on its own) against them eager
# (--eager-rest), each its own process, twice in turn; then a batch of 1024 with them compiled
b --manifest $VB --label vitb-bs512-eager-rest --set search.space.batch_size=512 --modes product --eager-rest
b --manifest $VB --label vitb-bs512-compiled-rest --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs512-eager-rest-2 --set search.space.batch_size=512 --modes product --eager-rest
b --manifest $VB --label vitb-bs512-compiled-rest-2 --set search.space.batch_size=512 --modes product,loader
b --manifest $VB --label vitb-bs128-compiled-rest-vs-plain --modes product,plain,plain-clip
b --manifest $VB --label vitb-bs1024-compiled-rest --set search.space.batch_size=1024 --modes product
# eighteenth session: attention with the CLS token outside the tiles (training.cls_attention: trainables/cls_attn.py)
# against PyTorch's SDPA (cuDNN), each its own process; run twice in turn for an A/B
b --manifest $VB --label vitb-bs512-sdpa --set search.space.batch_size=512 --set training.cls_attention=false --modes product
b --manifest $VB --label vitb-bs512-clsattn --set search.space.batch_size=512 --set training.cls_attention=true --modes product,loader
b --manifest $VB --label vitb-bs1024-clsattn --set search.space.batch_size=1024 --set training.cls_attention=true --modes product
b --manifest $VB --label vitb-bs128-clsattn-vs-plain --set training.cls_attention=true --modes product,plain,plain-clip
b --manifest $VB --label vitb-bs128-sdpa-vs-plain --set training.cls_attention=false --modes product,plain,plain-clip
b --manifest $VS --label vits-bs256-sdpa --set training.cls_attention=false --modes product
b --manifest $VS --label vits-bs256-clsattn --set training.cls_attention=true --modes product,plain
# fc1's weight and bias gradients in one cuBLASLt matmul (BGRADB epilogue; step_bench.py --fc1-bgradb) against
# PyTorch's matmul and a separate sum, each its own process, twice in turn (the twelfth session's BGRADB form did
# both layers, and fc2's bias sum is fused into the LayerNorm's backward for free)
b --manifest $VB --label vitb-bs512-fc1-sum --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs512-fc1-bgradb --set search.space.batch_size=512 --modes product --fc1-bgradb
b --manifest $VB --label vitb-bs512-fc1-sum-2 --set search.space.batch_size=512 --modes product
b --manifest $VB --label vitb-bs512-fc1-bgradb-2 --set search.space.batch_size=512 --modes product --fc1-bgradb
# the final code: product against plain at batch 128 (both with the compiled rest), ViT-S/14 at its manifest's batch
# and settings (CUDA graphs) with the rest compiled and eager, and ViT-B/14 at batch 1024 again
b --manifest $VS --label vits-bs256-eager-rest --modes product,plain --steps 20 --rounds 5 --eager-rest
b --manifest $VS --label vits-bs256-compiled-rest --modes product,plain,loader --steps 20 --rounds 5
b --manifest $VB --label vitb-bs1024-compiled-rest-2 --set search.space.batch_size=1024 --modes product,loader
# nineteenth session: the default settings (cls_attention: auto) at the manifest's batch 128 against the plain loop,
# the same with training.cuda_graphs=true (auto then takes the CLS kernels), and batch 768 (whose peak memory fits
# an 80 GB H100, where batch 1024's 82.6 GB may not)
b --manifest $VB --label vitb-bs128-default-vs-plain --modes product,plain,plain-clip --steps 20 --rounds 5
b --manifest $VB --label vitb-bs128-graphs-vs-plain --set training.cuda_graphs=true --modes product,plain,plain-clip --steps 20 --rounds 5
b --manifest $VB --label vitb-bs768-clsattn --set search.space.batch_size=768 --modes product
# q, k and v as one matmul read in place by the CLS kernels (cls_attn.FusedQKVAttention) against three matmuls,
# each its own process, twice in turn
b --manifest $VB --label vitb-bs512-qkv3 --set search.space.batch_size=512 --set training.cls_attention=true --modes product --no-fuse-qkv
b --manifest $VB --label vitb-bs512-qkv1 --set search.space.batch_size=512 --set training.cls_attention=true --modes product,loader
b --manifest $VB --label vitb-bs512-qkv3-2 --set search.space.batch_size=512 --set training.cls_attention=true --modes product --no-fuse-qkv
b --manifest $VB --label vitb-bs512-qkv1-2 --set search.space.batch_size=512 --set training.cls_attention=true --modes product
b --manifest $VB --label vitb-bs1024-qkv1 --set search.space.batch_size=1024 --set training.cls_attention=true --modes product
b --manifest $VB --label vitb-bs768-qkv1 --set search.space.batch_size=768 --set training.cls_attention=true --modes product
b --manifest $VB --label vitb-bs128-qkv1-vs-plain --modes product,plain,plain-clip --steps 20 --rounds 5
b --manifest $VS --label vits-bs256-qkv1 --modes product,plain --steps 20 --rounds 5
