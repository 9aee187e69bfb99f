#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, as the device call's command (carry [".whl", ".gpudata"]):
#   bash benchmarks/gpu/run.sh checks     # ~4 min: DRR, inference, training throughput, registration timing
#   bash benchmarks/gpu/run.sh training   # ~6 min: cohort on 14 CPU workers + full-model training + held-out PCC
# Each stage has its own time limit and writes under $OUT (what comes back), so a stage that
# overruns loses only itself. Dry run on a CPU machine: DEVICE=cpu SCALE=tiny OUT=/tmp/o bash ... .
set -uo pipefail
cd "$(dirname "$0")/../.."
what=${1:-checks}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-full}
OUT=${OUT:-/tmp/mskdex_gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MSKDEX_DATA=$PWD/.gpudata PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import SimpleITK, pydicom, cma, monai" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log=$OUT/$what.log
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $OUT/$what.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}
if [ "$SCALE" = tiny ]; then
  drr_sizes="64"; reps=2; inf_size=64; tp_bs=2; tp_steps=2; reg_trials=1; reg_size=64
  subj=6; val=3; held=3; asize=32; det=64; vox=6; steps=20; workers=2
else
  drr_sizes="256 512"; reps=50; inf_size=256; tp_bs=16; tp_steps=20; reg_trials=3; reg_size=256
  subj=200; val=20; held=50; asize=128; det=256; vox=2; steps=4000; workers=14
fi
stage env 60 $PY -c "import torch, platform; print(platform.platform(), 'torch', torch.__version__, 'device', '$DEVICE',
  torch.cuda.get_device_name() if '$DEVICE'.startswith('cuda') else 'cpu')"
case $what in
checks)
  stage drr 120 $PY benchmarks/bench_drr.py --cases pelvis --sizes $drr_sizes --threads 1 --repeats $reps \
    --device "$DEVICE" --no-peer --no-memory-check --markdown "$OUT/drr.md"
  stage inference 90 $PY benchmarks/bench_network.py --part inference --device "$DEVICE" --image-size $inf_size \
    --repeats $reps --out "$OUT/net" --markdown
  stage throughput 90 $PY benchmarks/bench_network.py --part throughput --device "$DEVICE" --image-size $inf_size \
    --batch-size $tp_bs --train-steps $tp_steps --out "$OUT/net" --markdown
  stage registration 180 $PY benchmarks/bench_registration.py --cases pelvis --ranges 30,20 --trials $reg_trials \
    --size $reg_size --device "$DEVICE" --json "$OUT/registration.json" --out "$OUT/registration.md"
  ;;
training)
  stage ablation 540 $PY benchmarks/bench_network.py --part ablation --device "$DEVICE" --subjects $subj --val $val \
    --heldout $held --ablation-size $asize --detector $det --voxel-mm $vox --steps $steps --workers $workers \
    --batch-size 16 --variants full --tta 4 --out /tmp/mskdex_ablation --markdown
  cp /tmp/mskdex_ablation/*.json "$OUT/" 2>/dev/null
  ;;
*) echo "usage: run.sh checks|training" >&2; exit 2 ;;
esac
