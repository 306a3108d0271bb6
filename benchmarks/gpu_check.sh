#!/usr/bin/env bash
# One command that measures what matters on a GPU, in at most ~8 minutes on one H100/H200, installing
# nothing beyond the project (run it from the repository root in the project's virtualenv):
#
#   benchmarks/gpu_check.sh [OUT_DIR]              # GPU run; figures on stdout and in OUT_DIR/*.txt
#   benchmarks/gpu_check.sh --cpu-dry-run [OUT]    # every step on CPU with the tiny preset (minutes)
#
# It prints:
#   1. FLOPs per lesion and stage (benchmarks/flops.py), tiny + paper presets, and the measured network
#      seconds per lesion, lesions per second and FLOP utilisation at 50 and 200 DDIM steps, batch 1
#      and 8, bf16 autocast, plus peak GPU memory;
#   2. the whole paper-preset pipeline (placement, crop, LMNet, VQ, LINet, blend) in seconds per lesion
#      at 50 and 200 steps, batch 1 and 8, on a procedural phantom (benchmarks/bench_synthesis.py);
#   2b. one lesion of the shipped tiny bundle stage by stage (placement, crop, LMNet, VQ, LINet, blend, mask
#      checks, writing) with the share that is not network time (benchmarks/bench_synthesis.py part 0);
#   3. nnU-Net's iteration time, plain vs on-the-fly with the paper-preset generator on the same GPU
#      (unthrottled and with the default 5 % budget), default 3d_fullres plans of a phantom dataset
#      (benchmarks/bench_trainer.py).
# Each step has its own time limit, so a slow step is cut off (its partial output kept) and the next
# still runs. Random weights: costs do not depend on what the networks learned.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export nnUNet_compile="${nnUNet_compile:-false}"

if [[ $DRY == 1 ]]; then
  DEV=cpu; PRESETS=tiny; BATCH=1,2; STEPS=2,4; LIMIT=(600 600 900)
  SYN_ARGS=(--pipeline-presets tiny --presets tiny --steps 2,4 --fit-steps 1 2 --max-direct-steps 0 --batch 2
            --repeats 1 --skip-whole --phantom --threads 2)
  TR_ARGS=(--tiny --iters 4 --warmup-iters 1 --repeats 1 --warmup-cases 1 --store-size 2 --options '{"ddim_steps": 2}'
           --shape 48 48 32 --n-proc-da 0)
  BUNDLE_PRESET=tiny
else
  DEV=cuda; PRESETS=tiny,paper; BATCH=1,8; STEPS=50,200; LIMIT=(100 120 220)
  SYN_ARGS=(--pipeline-presets paper --skip-networks --steps 50,200 --fit-steps 2 10 --max-direct-steps 0 --batch 8
            --repeats 2 --skip-whole --phantom)
  TR_ARGS=(--iters 20 --warmup-iters 2 --repeats 2 --warmup-cases 1 --unthrottled --store-size 8 --shape 112 112 72
           --n-proc-da 4)
  BUNDLE_PRESET=paper
fi

echo "== gpu_check ($( [[ $DRY == 1 ]] && echo 'CPU dry run' || echo GPU )) $(date -u +%FT%TZ), output in $OUT"
if [[ $DRY == 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch, monai, nnunetv2, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'monai', monai.__version__, 'nnunetv2', getattr(nnunetv2, '__version__', '?'), platform.processor() or platform.machine())"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, keep the output, report the exit status
  local name=$1 limit=$2; shift 2
  echo; echo "== [$name] (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | grep -v -e '%|' -e '^\s*$'
  local rc=${PIPESTATUS[0]}
  echo "== [$name] exit $rc after $((SECONDS - t0)) s"
}

# 1. FLOPs, network-only speed, utilisation, peak memory
step flops "${LIMIT[0]}" "$PY" benchmarks/flops.py --device "$DEV" --presets "$PRESETS" --measure \
  --measure-presets "$PRESETS" --batch "$BATCH" --steps "$STEPS" --repeats 3 --threads 2

# 2. the whole pipeline, paper preset (tiny in the dry run)
step pipeline "${LIMIT[1]}" "$PY" benchmarks/bench_synthesis.py --device "$DEV" "${SYN_ARGS[@]}"

# 2b. one lesion stage by stage (placement ... writing, and the share that is not network time): the
#     shipped tiny bundle, the same table as on CPU (benchmarks/bench_synthesis.py part 0)
step stages 120 "$PY" benchmarks/bench_synthesis.py --device "$DEV" --stages-only --phantom --repeats 3 \
  --stage-steps 10 $( [[ $DRY == 1 ]] && echo --threads 1 )

# 3. nnU-Net iteration time: plain vs on-the-fly, generator on the same device, budget 5 % vs none
"$PY" -m lesiondiffusion bundle init --preset "$BUNDLE_PRESET" -o "$OUT/bundle_$BUNDLE_PRESET" >/dev/null 2>&1 \
  || [[ -f "$OUT/bundle_$BUNDLE_PRESET/config.yaml" ]] || { echo "bundle init failed"; exit 1; }
step trainer "${LIMIT[2]}" "$PY" benchmarks/bench_trainer.py --root "$OUT/nnunet" --device "$DEV" --gen-device "$DEV" \
  --backend lesiondiffusion --bundle "$OUT/bundle_$BUNDLE_PRESET" --budgets 0.05 "${TR_ARGS[@]}"

echo; echo "== gpu_check done in $SECONDS s; figures in $OUT/{flops,pipeline,stages,trainer}.txt"
