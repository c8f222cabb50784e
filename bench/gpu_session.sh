#!/usr/bin/env bash
# One short GPU lease, prepared: the CUDA tests, the training-throughput benchmark, then full-schedule CIFAR-10-LT
# runs until a deadline (a lease gives minutes, not hours), with what a later session needs packed into OUT.
#
#   bash bench/gpu_session.sh OUT [DEADLINE_S]
#
# Runs in the repository root under the host's python3 (PY to change it). OUT receives a few files, refreshed every
# minute so a hard stop still leaves them: session.tgz (logs, benchmark JSON, runs.json), runs.json
# (bench/collect_runs.py: per-epoch history of every stage, finished or not, and metrics of finished runs), the
# benchmarks' JSON, and runs-a.tgz / runs-b.tgz: each slot's runs, whole where unfinished (checkpoints), metrics and
# config where finished. The table outlasts a lease: carry those two files into the next lease in RESUME (a folder,
# default .gpu-runs) and its runs continue where they stopped, finished ones skipped. What to run: BENCHES
# (';'-separated bench/train_throughput.py argument sets; BENCHES= skips them), SLOT_A and SLOT_B (lines 'name config
# overrides...', run in order, the two slots side by side). Knobs for a smoke run on a CPU: TRAIN_ARGS (extra
# overrides for every run), TEST_TIMEOUT (0 skips the tests), BENCH_TIMEOUT, WORK.
set -u
OUT=${1:?usage: gpu_session.sh OUT [DEADLINE_S]}
DEADLINE=${2:-540}
PY=${PY:-python3}
WORK=${WORK:-/tmp/ltd-gpu-session}
RUNS=$WORK/runs
RESUME=${RESUME:-.gpu-runs}
# The CIFAR-10-LT table's cells still to run (CE, LWS and SSD at IF 100, seed 0 ran in earlier leases; a LWS run
# reports CE as its stage I), IF 10 (1.65x the images) in slot B. Lines: 'name config overrides...'.
cfg=configs/cifar10_lt
SLOT_A=${SLOT_A-"lws_if50 $cfg/lws.yaml data.imbalance_factor=50
ssd_if50 $cfg/ssd.yaml data.imbalance_factor=50
lws_if100_s1 $cfg/lws.yaml seed=1
ssd_if100_s1 $cfg/ssd.yaml seed=1
lws_if50_s1 $cfg/lws.yaml data.imbalance_factor=50 seed=1
ssd_if50_s1 $cfg/ssd.yaml data.imbalance_factor=50 seed=1
lws_if100_s2 $cfg/lws.yaml seed=2
ssd_if100_s2 $cfg/ssd.yaml seed=2
lws_if50_s2 $cfg/lws.yaml data.imbalance_factor=50 seed=2
ssd_if50_s2 $cfg/ssd.yaml data.imbalance_factor=50 seed=2"}
SLOT_B=${SLOT_B-"lws_if10 $cfg/lws.yaml data.imbalance_factor=10
ssd_if10 $cfg/ssd.yaml data.imbalance_factor=10
lws_if10_s1 $cfg/lws.yaml data.imbalance_factor=10 seed=1
ssd_if10_s1 $cfg/ssd.yaml data.imbalance_factor=10 seed=1
lws_if10_s2 $cfg/lws.yaml data.imbalance_factor=10 seed=2
ssd_if10_s2 $cfg/ssd.yaml data.imbalance_factor=10 seed=2"}
START=$(date +%s)
left() { echo $((DEADLINE - ($(date +%s) - START))); }
stamp() { echo "[$(($(date +%s) - START)) s] $*"; }
slot_runs() {  # what a slot's runs left, relative to RUNS: all of an unfinished run, metrics and config of a finished one
  local name
  for name in $(sed -n 's/^ *\([^ ][^ ]*\).*$/\1/p' <<< "$1"); do
    if [ -f "$RUNS/$name/metrics.json" ]; then echo "$name/metrics.json $name/config.yaml"
    elif [ -d "$RUNS/$name" ]; then echo "$name"; fi
  done
}
pack() {  # everything so far into OUT; each file replaced whole
  [ -d "$RUNS" ] && $PY bench/collect_runs.py "$RUNS" "$WORK/runs.json" > "$WORK/logs/collect.log" 2>&1
  tar -czf "$WORK/session.tgz" -C "$WORK" logs bench $([ -f "$WORK/runs.json" ] && echo runs.json) 2>/dev/null
  local slot runs
  for slot in a b; do
    runs=$(slot_runs "$([ $slot = a ] && echo "$SLOT_A" || echo "$SLOT_B")")
    [ -n "$runs" ] && tar -czf "$WORK/runs-$slot.tgz.part" -C "$RUNS" --exclude='*.tmp' --exclude=model.pt \
      --exclude=teacher.pt --exclude='*.png' --exclude=ray_train $runs 2>/dev/null \
      && mv "$WORK/runs-$slot.tgz.part" "$WORK/runs-$slot.tgz"
  done
  cp "$WORK"/bench/*.json "$WORK/session.tgz" "$WORK"/runs-?.tgz $([ -f "$WORK/runs.json" ] && echo "$WORK/runs.json") \
    "$OUT/" 2>/dev/null
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

gpu_tests() {  # log name, then pytest's selection
  local log=$1; shift
  timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -m gpu -q -p no:cacheprovider "$@" tests/trainer/test_engine.py \
    tests/trainer/test_augment.py tests/trainer/test_classifiers.py tests/trainer/test_losses.py > "$WORK/logs/$log" 2>&1
}
if [ "${TEST_TIMEOUT:-150}" = 0 ]; then
  tests_rc=0
else
  gpu_tests gpu_tests.log -k "not compiled_kernels"
  tests_rc=$?  # decides whether the runs below use CUDA graphs
  stamp "gpu tests rc=$tests_rc: $(tail -1 "$WORK/logs/gpu_tests.log")"
  gpu_tests gpu_tests_compile.log -k compiled_kernels
  stamp "compiled-kernels-in-the-graph test rc=$?: $(tail -1 "$WORK/logs/gpu_tests_compile.log")"
fi
wait $decode

# Nothing else may use the GPU while the throughput is timed. BENCHES: ';'-separated argument sets, one run each.
# First the default step (augmentation inside the graph, cuDNN autotuning), then Inductor's kernels inside the graph,
# then the default without autotuning (which of the changes moved it), then NCHW.
default_benches="--cuda-graph --precision bf16 --rounds 1 --profile 20"
default_benches+=";--cuda-graph --compile default --precision bf16 --rounds 1 --profile 20"
default_benches+=";--cuda-graph --precision bf16 --no-cudnn-benchmark --rounds 1"
default_benches+=";--cuda-graph --precision bf16 --no-channels-last --rounds 1"
IFS=';' read -ra benches <<< "${BENCHES-$default_benches}"
[ -z "${benches[0]:-}" ] && benches=()  # BENCHES= : none
for i in "${!benches[@]}"; do
  TQDM_DISABLE=1 timeout "${BENCH_TIMEOUT:-240}" $PY bench/train_throughput.py --out "$WORK/bench" ${benches[$i]} \
    > "$WORK/logs/bench$i.log" 2>&1
  stamp "bench ${benches[$i]}: rc=$?: $(grep -- '->' "$WORK/logs/bench$i.log" | tail -1)"
done
pack

# Full-schedule runs, two slots on the one GPU (SLOT_A, SLOT_B above); the whole-step CUDA graph only where the tests
# showed it trains like eager. Runs carried in from an earlier lease go on where they stopped.
for bundle in "$RESUME"/runs-*.tgz; do
  [ -f "$bundle" ] && mkdir -p "$RUNS" && tar -xzf "$bundle" -C "$RUNS" && stamp "resumed from $bundle: $(tar -tzf "$bundle" | cut -d/ -f1 | sort -u | tr '\n' ' ')"
done
graph=$([ $tests_rc -eq 0 ] && echo true || echo false)
train() {  # name config overrides...
  local name=$1 config=$2; shift 2
  [ -f "$RUNS/$name/metrics.json" ] && { stamp "$name finished in an earlier lease"; return; }
  stamp "start $name"
  OMP_NUM_THREADS=4 $PY -c "from service.cli import app; app()" train --no-ray -c "$config" seed=0 \
    cuda_graph=$graph out_dir="$RUNS/$name" "$@" $TRAIN_ARGS > "$WORK/logs/$name.log" 2>&1
  stamp "end $name rc=$?"
}
budget=$(($(left) - 20))
[ "$budget" -gt 10 ] || budget=10
slot() {  # one slot's lines as train calls, one after another, in the background; stopped at the deadline
  timeout "$budget" bash -c "$(declare -f train stamp); START=$START graph=$graph PY=$PY WORK=$WORK RUNS=$RUNS
    TRAIN_ARGS='${TRAIN_ARGS:-}'; $(sed -n 's/^ *\([^ ].*\)$/train \1/p' <<< "$1")" &
}
slot "$SLOT_A"
a=$!
slot "$SLOT_B"
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
