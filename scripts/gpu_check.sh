#!/usr/bin/env bash
# The GPU check, prepared to run as is on a GPU node:
#
#   scripts/gpu_check.sh OUT_DIR
#
#   1. data path (CPU): images/s per core of every method's input pipeline at 224 px, against the
#      official ones where IJEPA_CHECKOUT, MAE_CHECKOUT, DINO_CHECKOUT name checkouts; ours again
#      through the loader with all but one of this node's cores; the worker cores one GPU needs
#      at 40 % of PEAK_TFLOPS (default 989: H100 SXM, dense bf16);
#   2. the tests marked `cuda` (pytest -m cuda);
#   3. a tiny `bench run device=cuda`: the CPU preset of IWM, 1 pretraining epoch, linear probe;
#   4. `bench perf --device cuda --gpu-cases`: ViT-B/16 at 224 px, bf16, every method, the plain
#      (eager) and the default (fast) step, losses checked against each other; s/step, img/s,
#      peak memory, the rate against a bf16 matmul measured in the same run, model FLOP
#      utilisation of PEAK_TFLOPS;
#   5. the same with torch.compile, one method at a time, within what is left of the budget.
#
# Under OUT_DIR (new or empty): a log and a JSON per part, env.txt, summary.txt (each part's
# exit status and seconds, then the figures of every part side by side). Without a CUDA device
# it stops after part 1 with one line, exit 3; a failed part makes the exit 1.
#
# Budget: 8 minutes (GPU_CHECK_BUDGET_S=480), estimated for one H100 with 16 cores, not yet timed
# on one: part 1 about 2 min (256 files x 3 rounds; FLOPs counted on fake tensors), 2 and 3 about
# 1 min, 4 about 2 min (8 cases of 2 timed steps after 1 warm-up, each in a fresh process). Part 5
# gets the rest, 30-90 s of compiling per method: a method whose compiled case would not finish
# in time is stopped and listed as over budget (GPU_CHECK_BUDGET_S=900 leaves room for all four).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
if [[ -n $(ls -A "$OUT") ]]; then
    echo "gpu_check: $OUT is not empty: give a new or empty folder" >&2
    exit 2
fi
PY=python3
if [[ -x $ROOT/.venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python
fi
BENCH=("$PY" -m benchmark.cli)
METHODS=(ijepa iwm mae dino)
PEAK=${PEAK_TFLOPS:-989}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
CORES=$(nproc)
LOADER_WORKERS=$((CORES > 2 ? CORES - 2 : 1))  # the step's loader: one core for the training process
cd "$ROOT"
FAILED=()

part() { # part NAME CMD...: CMD's output to OUT/NAME.log; its status and seconds to summary.txt
    local name=$1 start=$SECONDS rc=0
    shift
    echo "gpu_check: $name ..." >&2
    "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    printf '%-20s exit %3d %5d s\n' "$name" "$rc" $((SECONDS - start)) | tee -a "$OUT/summary.txt" >&2
    if [[ $rc -ne 0 ]]; then
        FAILED+=("$name")
    fi
}

{
    date -u +%FT%TZ
    echo "host $(hostname), $CORES cores usable, budget $BUDGET s, peak $PEAK TFLOP/s"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
    nvidia-smi 2>&1 || true
} >"$OUT/env.txt"

official=()
for kind in ijepa mae dino; do
    var=${kind^^}_CHECKOUT
    if [[ -n ${!var:-} ]]; then
        official+=("--official-$kind" "${!var}")
    fi
done
part data_path "${BENCH[@]}" perf --data-path --methods "$(IFS=,; echo "${METHODS[*]}")" --data-images 256 \
    --rounds 3 --data-workers $((CORES - 1)) --peak-tflops "$PEAK" --mfu 0.4 ${official[@]+"${official[@]}"} \
    --out "$OUT/data_path.json"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    "$PY" -m benchmark.perf.gpu_summary "$OUT" >>"$OUT/summary.txt"
    failed=""
    if [[ ${#FAILED[@]} -gt 0 ]]; then
        failed=" (failed: ${FAILED[*]})"
    fi
    echo "gpu_check: no CUDA device visible (torch.cuda.is_available() is False): CPU parts done$failed, see $OUT" >&2
    exit 3
fi

part cuda_tests "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
part bench_run "${BENCH[@]}" run device=cuda method=iwm task=linear pretrain.epochs=1 tasks.linear.epochs=20 \
    progress=false run_dir="$OUT/bench_run"
step=(perf --device cuda --gpu-cases --precision bf16 --steps 2 --warmup 1 --no-probe --peak-tflops "$PEAK")
part perf_gpu "${BENCH[@]}" "${step[@]}" --methods "$(IFS=,; echo "${METHODS[*]}")" --variants eager,fast \
    --out "$OUT/perf_gpu.json" workers="$LOADER_WORKERS"
for method in mae ijepa dino iwm; do
    left=$((BUDGET - SECONDS))
    if [[ $left -lt 30 ]]; then
        printf '%-20s over budget, not run\n' "perf_compiled_$method" | tee -a "$OUT/summary.txt" >&2
        continue
    fi
    part "perf_compiled_$method" timeout "$left" "${BENCH[@]}" "${step[@]}" --methods "$method" --variants compiled \
        --out "$OUT/perf_compiled_$method.json" workers="$LOADER_WORKERS"
done

"$PY" -m benchmark.perf.gpu_summary "$OUT" | tee -a "$OUT/summary.txt"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "gpu_check: failed: ${FAILED[*]} (logs in $OUT), $SECONDS s" >&2
    exit 1
fi
echo "gpu_check: done in $SECONDS s, see $OUT/summary.txt" >&2
