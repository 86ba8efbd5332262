#!/usr/bin/env bash
# Everything on a GPU machine in one call, within a time budget, short table last:
#   1. the CUDA kernel tests (scripts/gpu_check.sh: build, tests, optional memcheck and benchmark),
#   2. the Python package built with its CUDA kernels, and its CUDA tests (tests/python/test_cuda.py),
#      then with --bench the module-level step times (scripts/bench_module.py, eager and CUDA graphs)
#      and the large shapes' steps under sustained load with power and clocks (scripts/power_step.py),
#   3. the accuracy table of docs/accuracy.md (python -m int4train.train.table), as many runs as the
#      remaining budget allows, several processes at once, spread over every visible GPU; runs already
#      in the table folder are kept (a table can be finished over several calls); logs under $OUT.
# Usage: scripts/gpu_all.sh [--budget SECONDS] [--tasks lm,imagecls] [--jobs N] [--seeds 0,1,2]
#                           [--recipes R,R,...] [--table-dir DIR] [--no-kernels] [--no-pytest]
#                           [--memcheck] [--bench] [--task-args "TASK=FLAGS"]...
# Data: Moby Dick ships in data/; Fashion-MNIST is looked for in $FMNIST (IDX folder); textcls needs
# $SPAM (spam-assassin.jsonl.gz) and $MINILM (a model folder; fp16 weights are widened to fp32).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/int4train_gpu_all}
mkdir -p "$OUT"
budget=570 tasks=lm,imagecls jobs=12 seeds=0,1,2 kernels=1 pytest=1 memcheck=0 bench=0 table_dir=
extra_task_args=()
recipes=fp,int8,lsq_luq,hq,hq_bs,hq_lss
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget=$2; shift ;;
    --tasks) tasks=$2; shift ;;
    --jobs) jobs=$2; shift ;;
    --seeds) seeds=$2; shift ;;
    --table-dir) table_dir=$2; shift ;;
    --recipes) recipes=$2; shift ;;
    --task-args) extra_task_args+=(--task-args "$2"); shift ;;
    --no-kernels) kernels=0 ;;
    --no-pytest) pytest=0 ;;
    --memcheck) memcheck=1 ;;
    --bench) bench=1 ;;
    *) echo "gpu_all.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
table_dir=${table_dir:-$OUT/table}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The device machine's default C++ compiler (/opt/gcc) produced an extension that crashed inside
# libstdc++ when formatting errors (docs/pytorch.md); the system g++ matches torch's ABI.
CXX_BIN=${CXX_BIN:-/usr/bin/g++}
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | head -1)
summary=()

if [ "$kernels" = 1 ]; then
  flags=()
  [ "$memcheck" = 1 ] || flags+=(--no-memcheck)
  [ "$bench" = 1 ] || flags+=(--no-bench)
  OUT=$OUT/kernels bash scripts/gpu_check.sh "${flags[@]}" > "$OUT/kernels.log" 2>&1
  rc=$?
  summary+=("kernel tests   : rc=$rc; $(grep -E '^[0-9]+ passed' "$OUT/kernels/tests.log" 2>/dev/null | tail -1) ($(elapsed) s)")
  grep -E "FAIL|error" "$OUT/kernels.log" | head -20
fi

python3 -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -C cmake.define.CMAKE_CXX_COMPILER="$CXX_BIN" -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90a \
  -C build-dir=build-gpu-py . > "$OUT/pip.log" 2>&1
rc=$?
summary+=("package build  : rc=$rc ($(elapsed) s)")
[ $rc = 0 ] || { tail -30 "$OUT/pip.log"; printf '%s\n' "${summary[@]}"; exit 1; }

if [ "$pytest" = 1 ]; then
  python3 -m pytest -q tests/python/test_cuda.py -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  rc=$?
  summary+=("pytest (CUDA)  : rc=$rc; $(tail -1 "$OUT/pytest.log") ($(elapsed) s)")
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
fi

if [ "$bench" = 1 ]; then
  # The module-level step times (what a PyTorch user sees), the small-shape rule included; then
  # the same steps replayed from CUDA graphs (no host cost).
  python3 scripts/bench_module.py > "$OUT/bench_module.md" 2>&1
  rc=$?
  python3 scripts/bench_module.py --graphs >> "$OUT/bench_module.md" 2>&1
  summary+=("module bench   : rc=$rc, graphs rc=$? ($(elapsed) s)")
  # The large shapes under sustained load (3 s a layer's turn): time, board power, SM clock and
  # energy per step; a GPU held at its power limit runs slower than a short benchmark's turns.
  python3 scripts/power_step.py --recipes hq_bs,hq_lss:dense_fallback=never > "$OUT/power_step.md" 2>&1
  summary+=("power step     : rc=$? ($(elapsed) s)")
fi

table_args=()
case ",$tasks," in
  *,imagecls,*) table_args+=(--task-args "imagecls=--data ${FMNIST:-fashion-mnist}") ;;
esac
case ",$tasks," in
  *,textcls,*)
    model=/tmp/int4train_minilm
    python3 - "${MINILM:?set MINILM to the model folder}" "$model" <<'PY' || exit 1
import shutil, sys, torch, transformers
src, dst = sys.argv[1], sys.argv[2]
m = transformers.AutoModel.from_pretrained(src, local_files_only=True, dtype=torch.float32)
m.float().save_pretrained(dst)
transformers.AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(dst)
PY
    table_args+=(--task-args "textcls=--data ${SPAM:?set SPAM} --model $model") ;;
esac
table_args+=("${extra_task_args[@]}")
left=$(( budget - $(elapsed) - 25 ))
if [ "$left" -gt 30 ]; then
  python3 -m int4train.train.table run --out "$table_dir" --tasks "$tasks" --recipes "$recipes" --seeds "$seeds" \
    --jobs "$jobs" --deadline "$left" "${table_args[@]}" > "$OUT/table.log" 2>&1
  summary+=("accuracy table : $(tail -1 "$OUT/table.log") ($(elapsed) s)")
  # runs.json: every run's metrics, configuration, command and loss curve in one file at $OUT's top
  # level (the run folders below the table folder may be too deep to come back from a device call).
  python3 -m int4train.train.table summarize "$table_dir" --md "$OUT/table.md" --plots "$OUT/plots" \
    --json "$OUT/runs.json" > /dev/null 2>&1
else
  summary+=("accuracy table : no time left ($(elapsed) s)")
fi

echo
echo "==================== int4train GPU run: $device ===================="
printf '%s\n' "${summary[@]}"
[ -f "$OUT/bench_module.md" ] && cat "$OUT/bench_module.md"
[ -f "$OUT/power_step.md" ] && cat "$OUT/power_step.md"
[ -f "$OUT/table.md" ] && cat "$OUT/table.md"
exit 0
