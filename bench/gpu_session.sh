#!/usr/bin/env bash
# One short GPU lease, prepared: the CUDA tests, the training-throughput benchmark, then full-schedule CIFAR-10-LT
# runs until a deadline (a lease gives minutes, not hours), with what a later session needs packed into OUT.
#
#   bash bench/gpu_session.sh OUT [DEADLINE_S]
#
# Runs in the repository root under the host's python3 (PY to change it). OUT receives three files, refreshed every
# minute so a hard stop still leaves them: session.tgz (logs, benchmark JSON, runs.json), runs.json
# (bench/collect_runs.py: per-epoch history of every stage, finished or not, and metrics of finished runs) and the
# benchmark's JSON. Runs still going at the deadline are stopped. Knobs for a smoke run on a CPU: BENCH_ARGS,
# TRAIN_ARGS (extra overrides for every run), TEST_TIMEOUT, WORK.
set -u
OUT=${1:?usage: gpu_session.sh OUT [DEADLINE_S]}
DEADLINE=${2:-540}
PY=${PY:-python3}
WORK=${WORK:-/tmp/ltd-gpu-session}
RUNS=$WORK/runs
START=$(date +%s)
left() { echo $((DEADLINE - ($(date +%s) - START))); }
stamp() { echo "[$(($(date +%s) - START)) s] $*"; }
pack() {  # everything so far into OUT; each file replaced whole
  [ -d "$RUNS" ] && $PY bench/collect_runs.py "$RUNS" "$WORK/runs.json" > "$WORK/logs/collect.log" 2>&1
  tar -czf "$WORK/session.tgz" -C "$WORK" logs bench $([ -f "$WORK/runs.json" ] && echo runs.json) 2>/dev/null
  cp "$WORK"/bench/*.json "$WORK/session.tgz" $([ -f "$WORK/runs.json" ] && echo "$WORK/runs.json") "$OUT/" 2>/dev/null
}
rm -rf "$WORK"; mkdir -p "$WORK/logs" "$WORK/bench" "$OUT"
export PYTHONUNBUFFERED=1

{ nvidia-smi 2>&1 | head -15; $PY -c "import torch, torchvision; print(torch.__version__, torchvision.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"; nproc; } > "$WORK/logs/machine.txt" 2>&1
stamp "$(tail -2 "$WORK/logs/machine.txt" | head -1)"

# Decode the CIFAR-10 copy into its cache once, beside the tests, so the runs below do not race to write it.
$PY -c "from trainer.config import DataConfig; from trainer.datasets import load_dataset
load_dataset(DataConfig(name='cifar10_npz'))" > "$WORK/logs/decode.log" 2>&1 &
decode=$!

timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -m gpu -q -p no:cacheprovider tests/trainer/test_engine.py \
  tests/trainer/test_augment.py tests/trainer/test_classifiers.py tests/trainer/test_losses.py \
  > "$WORK/logs/gpu_tests.log" 2>&1
tests_rc=$?
stamp "gpu tests rc=$tests_rc: $(tail -1 "$WORK/logs/gpu_tests.log")"
wait $decode

# Nothing else may use the GPU while the throughput is timed.
TQDM_DISABLE=1 timeout 200 $PY bench/train_throughput.py --out "$WORK/bench" \
  ${BENCH_ARGS:---cuda-graph --precision bf16 --rounds 2 --profile 20} > "$WORK/logs/bench.log" 2>&1
bench_rc=$?
stamp "bench rc=$bench_rc: $(grep -- '->' "$WORK/logs/bench.log" | tail -1)"
if [ $bench_rc -ne 0 ] && [ -z "${BENCH_ARGS:-}" ]; then  # no graph step: the eager bf16 row still says something
  TQDM_DISABLE=1 timeout 120 $PY bench/train_throughput.py --out "$WORK/bench" --precision bf16 --rounds 1 \
    > "$WORK/logs/bench_eager.log" 2>&1
  stamp "eager bench rc=$?: $(grep -- '->' "$WORK/logs/bench_eager.log" | tail -1)"
fi
pack

# Full-schedule runs, two at a time on the one GPU, in order of what they answer; the whole-step CUDA graph only
# where the tests showed it trains like eager.
graph=$([ $tests_rc -eq 0 ] && echo true || echo false)
train() {  # name config overrides...
  local name=$1 config=$2; shift 2
  stamp "start $name"
  OMP_NUM_THREADS=4 $PY -c "from service.cli import app; app()" train --no-ray -c "$config" seed=0 \
    cuda_graph=$graph out_dir="$RUNS/$name" "$@" $TRAIN_ARGS > "$WORK/logs/$name.log" 2>&1
  stamp "end $name rc=$?"
}
budget=$(($(left) - 20))
[ "$budget" -gt 10 ] || budget=10
slot() {  # runs one after another in the background, all stopped at the deadline
  timeout "$budget" bash -c "$(declare -f train stamp); START=$START graph=$graph PY=$PY WORK=$WORK RUNS=$RUNS
    TRAIN_ARGS='${TRAIN_ARGS:-}'; $1" &
}
slot "train ssd_if100_w03 configs/cifar10_lt/ssd.yaml stage1.moco.weight=0.3
      train ssd_if50_w03 configs/cifar10_lt/ssd.yaml stage1.moco.weight=0.3 data.imbalance_factor=50"
a=$!
slot "train lws_if100 configs/cifar10_lt/lws.yaml
      train ssd_if100_w10 configs/cifar10_lt/ssd.yaml"
b=$!
while kill -0 $a 2>/dev/null || kill -0 $b 2>/dev/null; do
  sleep 5
  [ $((($(date +%s) - START) % 60)) -lt 5 ] && pack
done
stamp "runs stopped or done"
pack
grep -o -E "[a-z_]+ stage [A-Za-z_]+: test .*" "$WORK"/logs/*.log
cat "$WORK/logs/collect.log"
ls -la "$OUT"
stamp "packed"
