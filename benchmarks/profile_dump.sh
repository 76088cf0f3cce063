#!/usr/bin/env bash
# One GPU call: a torch.profiler table of the product's step (benchmarks/step_bench.py --profile) with every kernel
# listed, and the Python modules Inductor generated for it (its Triton kernels and the order it calls them in), so a
# profile row can be read back to the ops it fused. Writes $OUT/profile_<label>.txt and $OUT/code_<label>/.
# Usage: LABEL=vitb-bs512 bash benchmarks/profile_dump.sh --manifest M.yaml --set search.space.batch_size=512 [...]
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; L=${LABEL:-run}; mkdir -p $O/code_$L
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor.XXXX)
PROF_ROWS=${PROF_ROWS:-200} timeout -k 5 ${T:-240} python3 benchmarks/step_bench.py --profile $O/profile_$L.txt "$@" \
  2>&1 | grep -v -i warn | tail -4
# the generated modules: the ones with a call() that launches kernels (forward and backward graphs of each region)
n=0
for f in $(grep -rl --include='*.py' "def call(" $TORCHINDUCTOR_CACHE_DIR 2>/dev/null); do
  [ $(stat -c %s $f) -lt 2000000 ] || continue
  cp $f $O/code_$L/graph_$n.py; n=$((n+1))
done
echo "profile_dump: $n generated modules in $O/code_$L"
