#!/usr/bin/env bash
# Loss curves: training.bf16_weights, and training.fp8 on top of it (from the eighth session of 2026-11-27 on),
# against bf16 mixed precision (autocast, fp32 weights) over the same steps,
# from the same weights, on the real data path; a mixed run with another batch order as the yardstick
# (benchmarks/loss_curve.py). CURVES: which of q05 q15 vitb (default all; one per device call: q15 takes about
# 7 minutes for its four runs). Writes $OUT/curve_<name>.json.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p $O
c() { case " ${CURVES:-q05 q15 vitb} " in *" $1 "*) ;; *) return ;; esac
      local name=$1; shift
      timeout -k 5 ${T:-450} python3 benchmarks/loss_curve.py --out $O/curve_$name.json "$@" \
        --variant mixed:training.bf16_weights=false --variant bf16w:training.bf16_weights=true \
        --variant mixed-order2:training.bf16_weights=false@order=1 --variant fp8:training.fp8=true 2>&1 | grep '^{' | tee -a $O/curves.log; }
c q05 --manifest search_spaces/qwen2.5-0.5b_regression_gpu.yaml --hp lr=1e-4 --steps ${STEPS:-240}
c q15 --manifest search_spaces/qwen2.5-1.5b_regression_gpu.yaml --hp lr=1e-4 --set search.space.batch_size=16 --steps ${STEPS:-240}
c vitb --manifest search_spaces/dinov2-vitb14_classifier_gpu.yaml --hp lr=1e-4 --set training.max_epochs=15 --steps ${STEPS:-240}
# training.fast_blocks (ninth session; the same arithmetic, roundings moved): ViT-B/14 with it against without it,
# and without it reordered as the yardstick (bf16 weights on in all three, the default). CURVES=vitb-fast
case " ${CURVES:-q05 q15 vitb} " in *" vitb-fast "*)
  timeout -k 5 ${T:-450} python3 benchmarks/loss_curve.py --out $O/curve_vitb-fast.json \
    --manifest search_spaces/dinov2-vitb14_classifier_gpu.yaml --hp lr=1e-4 --set training.max_epochs=15 --steps ${STEPS:-240} \
    --variant plain-blocks:training.fast_blocks=false --variant fast:training.fast_blocks=true \
    --variant plain-blocks-order2:training.fast_blocks=false@order=1 2>&1 | grep '^{' | tee -a $O/curves.log ;; esac
# training.gelu_epilogue (2026-11-28, twelfth session; the tanh GELU in cuBLASLt's epilogues, numerics change): ViT-B/14
# with it against without it (erf GELU), and without it reordered as the yardstick (bf16 weights and fast blocks on
# in all three, the defaults). CURVES=vitb-gelu
case " ${CURVES:-q05 q15 vitb} " in *" vitb-gelu "*)
  timeout -k 5 ${T:-450} python3 benchmarks/loss_curve.py --out $O/curve_vitb-gelu.json \
    --manifest search_spaces/dinov2-vitb14_classifier_gpu.yaml --hp lr=1e-4 --set training.max_epochs=15 --steps ${STEPS:-240} \
    --variant erf:training.gelu_epilogue=false --variant gelu-epilogue:training.gelu_epilogue=true \
    --variant erf-order2:training.gelu_epilogue=false@order=1 2>&1 | grep '^{' | tee -a $O/curves.log ;; esac
