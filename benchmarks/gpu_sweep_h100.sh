#!/usr/bin/env bash
# One H100 call: issue 4 item 5, a real 8-trial ASHA sweep of the qwen2.5-0.5b shape on one GPU through
# `python -m sweeper run` (search_spaces/qwen2.5-0.5b_sweep-h100.yaml), then its leaderboard, cost and checkpoints.
# Run through the device tool with `.whl` carried (the Ray/DeepSpeed/Optuna kit of ../shared/device/README.md, plus
# the cryptography, cffi and pycparser wheels: the export imports sweeper.crypto and the image has no cryptography).
# The command line, as run on 2026-11-26 (results: benchmarks/results/gpu_sweep_h100_2026-11-26.md):
#   S0=$(date +%s.%N); python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; S0=$S0 T=450 bash benchmarks/gpu_sweep_h100.sh
# Extra arguments are passed to `sweeper run` as overrides; T caps the sweep (seconds) so that the reports below
# still run inside the call. SMOKE=1 runs the same script on a CPU with a tiny model (checks the script, not the
# figures). Writes to $OUT: nvidia-smi.txt, smi_trace.csv (GPU use every 5 s), sweep.log, report.txt (leaderboard,
# cost, cost --json), summary.txt (wall times, per-trial rows, checkpoint listing), diag.tgz (Ray session logs, the
# sweep's driver and trial logs, Tune's experiment state: what to read when the sweep does not finish).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p $O
M=${M:-search_spaces/qwen2.5-0.5b_sweep-h100.yaml}
R=${RESULTS_ROOT:-results}
EXTRA=()
if [ -n "${SMOKE:-}" ]; then
  EXTRA=(model.size=tiny data.max_length=64 data.generator.n_train=128 "data.generator.doc_words=[10, 16]"
         resources.cpus=1 resources.gpus=0 training.precision=fp32 training.strategy=plain)
fi
[ "$R" != results ] && EXTRA+=(output.root=$R)
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; df -h . /tmp 2>&1; } > $O/nvidia-smi.txt
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 5 > $O/smi_trace.csv 2>/dev/null &
SMI=$!
T0=$(now)
echo "command: python3 -m sweeper run --no-dashboard --manifest $M ${EXTRA[*]} $*" | tee $O/sweep.log
timeout ${T:-450} python3 -m sweeper run --no-dashboard --manifest $M "${EXTRA[@]}" "$@" 2>&1 \
  | grep -v -i "warn" | grep -v logging.cc >> $O/sweep.log
RC=${PIPESTATUS[0]}
T1=$(now)
kill $SMI 2>/dev/null
D=$(readlink -f $R/latest)
{
  echo "## sweeper leaderboard $D"; python3 -m sweeper leaderboard $D 2>&1
  echo; echo "## sweeper cost $D"; python3 -m sweeper cost $D 2>&1
  echo; echo "## sweeper cost --json $D"; python3 -m sweeper cost --json $D 2>&1
} > $O/report.txt
{
  echo "sweep_dir $D"
  echo "sweeper_run_rc $RC"
  echo "sweeper_run_wall_s $(sub $T1 $T0)"
  [ -n "${S0:-}" ] && echo "wheel_install_s $(sub $T0 $S0)"
  python3 benchmarks/trials_summary.py "$D"
  echo "## checkpoints/ (links)"; ls -l $D/checkpoints
  echo "## the linked checkpoints (sizes)"; ls -lLR $D/checkpoints
  echo "## every trial checkpoint under sweep/"; find $D/sweep -name 'checkpoint_*' -type d -exec du -sh {} +
  echo "## export"; ls -l $D/export
  echo "## du"; for x in $D $D/sweep $D/export; do du -sh $x; done; df -h .
  echo "## sweeper verify checkpoints/best"; python3 -m sweeper verify $D/checkpoints/best 2>&1 | tail -3
  echo "## processes left"; ps -eo pid,ppid,etime,stat,rss,args | grep -E "ray::|sweeper" | grep -v grep | cut -c1-160
  [ -n "${S0:-}" ] && echo "call_wall_s $(sub $(now) $S0)"
} > $O/summary.txt 2>&1
nvidia-smi >> $O/nvidia-smi.txt 2>&1
nvidia-smi --query-compute-apps=pid,used_memory --format=csv >> $O/nvidia-smi.txt 2>&1
L=/tmp/ray/session_latest/logs
tar czf $O/diag.tgz --ignore-failed-read $D/logs $D/sweep/decisions.jsonl $D/sweep/progress.json \
  $(ls $D/sweep/tune/experiment_state-*.json $D/sweep/tune/*/trial.log $D/sweep/tune/*/error.txt 2>/dev/null) \
  $(ls $L/worker-*.err $L/worker-*.out $L/raylet.out $L/raylet.err 2>/dev/null) 2>/dev/null
tail -4 $O/sweep.log; sed -n '/^## sweeper cost /,/all phases/p' $O/report.txt | head -14; head -16 $O/summary.txt
