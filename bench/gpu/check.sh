#!/usr/bin/env bash
# The one command a GPU session runs on the GPU machine, from the repository root, with the wheels that
# bench/gpu/wheels.sh put in .whl/ carried along (timeout_s 570: the run ends within its 530 s budget):
#
#     bash bench/gpu/check.sh
#
# Stages, in order, each under its own time limit (so one slow stage cannot eat the others' time) and all of them
# inside the budget, each logging to its own file:
#   install     the carried wheels into a private folder on PYTHONPATH (nothing can be fetched there), then their
#               requirements checked against what is really installed
#   facts       GPU, driver, CUDA, versions, which modules import (facts.json; nvidia-smi -q and pip list in logs)
#   tests       pytest -m gpu tests/test_gpu.py: the compiled Triton kernels and the CUDA paths (TRITON_INTERPRET=0)
#   kernels, train_step, iteration, generate, scaling: the benches' GPU presets, the most valuable first
# At the end, whatever happened (a stage failed, timed out, or found no time left): plots and a summary, packed into
# $OUT as 6 files: summary.txt (printed too), summary.json, stages.tsv, facts.json, results.tar.gz
# (bench/results/*-gpu.*: untar into bench/results) and logs.tar.gz (each stage's log, pytest's junit XML,
# nvidia-smi -q, pip list). After every stage, what the stages have left so far is already in $OUT (all but the
# summary): a run that the device's own limit cuts off, or kills, still brings back what it measured.
#
# The project is not pip-installed there: spin_kernels and spin_fast are symlinks to kernels/ and spin_fast/ in a
# folder on PYTHONPATH, with the repository root for `bench` (imported as `kernels`, the kernels' folder exports
# nothing, by design). Settings (environment), for other runs and the CPU smoke test (tests/test_gpu_kit.py):
#   SPIN_GPU_CHECK_PRESET     bench preset (gpu; tiny for a CPU smoke run)
#   SPIN_GPU_CHECK_STAGES     stages to run, in order (all of the above)
#   SPIN_GPU_CHECK_BUDGET_S   wall-clock budget of the whole run in seconds (530)
#   SPIN_GPU_CHECK_CAP_<stage>  one stage's time limit in seconds (the defaults in CAP below)
#   SPIN_GPU_CHECK_ARGS_<stage> extra arguments of a bench, shell-quoted (e.g. "--methods 'naive PyTorch'")
#   SPIN_GPU_CHECK_TESTS      what pytest collects (tests/test_gpu.py, where every gpu-marked test is: collecting
#                             the other modules would import them for nothing, and one that fails to import under the
#                             image's versions would stop pytest before any test)
#   SPIN_GPU_CHECK_WHEELS     the wheels' folder (.whl)
#   OUT                       where the packed files go (the device sets it; else a folder under /tmp)
#   PYTHON                    the interpreter (python3)
set -uo pipefail  # no -e: a stage that fails is recorded, and the next one runs

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SELF=$ROOT/bench/gpu/check.sh
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}

# ------------------------------------------------------------------ stage bodies (run by `timeout`, through $SELF)
step_install() {
  shopt -s nullglob
  local wheels=("$SPIN_GPU_CHECK_WHEELS"/*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "no wheels in $SPIN_GPU_CHECK_WHEELS (bench/gpu/wheels.sh makes them; carry .whl)"
    return 99
  fi
  local install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
                 --target "$WORK/site") wheel failed=()
  # All in one pip call; if that fails, one at a time, so that one bad wheel costs only its own package.
  if ! "${install[@]}" "${wheels[@]}"; then
    echo "installing the wheels together failed: one at a time"
    for wheel in "${wheels[@]}"; do
      "${install[@]}" "$wheel" || failed+=("${wheel##*/}")
    done
  fi
  # A requirement that the machine's own packages miss is reported, not fatal: the facts stage shows whether the
  # modules import all the same.
  "$PY" -m bench.gpu.check_wheels "$SPIN_GPU_CHECK_WHEELS" --installed \
    || echo "installed ${#wheels[@]} wheels; some requirements are not met (PROBLEM lines above)"
  if (( ${#failed[@]} )); then
    echo "not installed: ${failed[*]}"
    return 1
  fi
}

step_facts() {
  nvidia-smi -q >"$WORK/logs/nvidia-smi-q.txt" 2>&1 || echo "nvidia-smi -q failed (no GPU, or no driver)"
  "$PY" -m pip list >"$WORK/logs/pip-list.txt" 2>&1
  "$PY" -m bench.gpu.facts "$WORK/facts.json"
}

step_tests() {
  local tests args=(-m gpu -p no:cacheprovider -v --durations=15 --junitxml="$WORK/logs/pytest.xml")
  read -ra tests <<<"${SPIN_GPU_CHECK_TESTS:-tests/test_gpu.py}"
  # -v: each test's outcome is in the log as it ends, even if the slot runs out; a per-test limit where the
  # pytest-timeout plugin is installed (the GPU image has it), so that one hung test cannot take the whole slot;
  # 4 workers where pytest-xdist is (the image has it too): Triton's compiles and the DeepSpeed tests' process
  # starts are CPU time, and 16 cores sit idle otherwise (the tests' GPU memory, ~35 GB at most each, fits 4 times).
  "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout=150)
  "$PY" -c "import xdist" 2>/dev/null && args+=(-n 4)
  TRITON_INTERPRET=0 "$PY" -m pytest "${args[@]}" "${tests[@]}"
  local rc=$?
  if (( rc == 5 )); then
    echo "no test is marked gpu"
    return 99
  fi
  return $rc
}

if [[ ${1:-} == --step ]]; then
  "step_$2"
  exit
fi

# ------------------------------------------------------------------------------------------------------- set-up
START=$SECONDS
BUDGET=${SPIN_GPU_CHECK_BUDGET_S:-530}
RESERVE=25   # seconds kept for the report (plots, summary) and the packing
MIN_SLOT=15  # a stage is not started with less time than this left
PRESET=${SPIN_GPU_CHECK_PRESET:-gpu}
STAGES=${SPIN_GPU_CHECK_STAGES:-install facts tests kernels train_step iteration generate scaling}
# Each stage's time limit. Expected times on one H200 (each bench preset's comment gives its estimate): install
# ~10 s, facts ~15 s, tests ~120 s (5 of them launch DeepSpeed under torchrun), kernels ~140 s,
# train_step ~80 s, iteration ~65 s, generate ~40 s, scaling ~60 s: ~530 s against the 505 s the stages may use. A
# late stage gets what is left when the earlier ones overrun, down to MIN_SLOT: scaling, last, matters least on one
# GPU, and a cut-off bench keeps what it measured.
STAGE=""  # the running stage's pid (its process group's too)
declare -A CAP=([install]=60 [facts]=45 [tests]=180 [kernels]=160 [train_step]=110 [iteration]=85 [generate]=70
                [scaling]=90)

WORK=$(mktemp -d /tmp/spin-gpu-check.XXXXXX)
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK/logs" "$WORK/results" "$WORK/path" "$WORK/site" "$OUT"
ln -s "$ROOT/kernels" "$WORK/path/spin_kernels"
ln -s "$ROOT/spin_fast" "$WORK/path/spin_fast"
export WORK PYTHON=$PY SPIN_GPU_CHECK_WHEELS=${SPIN_GPU_CHECK_WHEELS:-$ROOT/.whl}
export PYTHONPATH=$WORK/site:$WORK/path:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export SPIN_GPU_CHECK_RUN=$WORK  # marks every process a stage starts (end_leftovers)
export PYTHONUNBUFFERED=1 SPIN_BENCH_RESULTS=$WORK/results MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
# Caches in /tmp, never in the checkout or the home folder; nothing can be downloaded there, so no one tries.
export TRITON_CACHE_DIR=$WORK/cache/triton TORCHINDUCTOR_CACHE_DIR=$WORK/cache/inductor HF_HOME=$WORK/cache/hf \
  TORCH_EXTENSIONS_DIR=$WORK/cache/torch_extensions
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

record() {  # record STAGE STATUS SECONDS LIMIT NOTE: one line of $WORK/stages.tsv, which the report reads
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >>"$WORK/stages.tsv"
}

run_stage() {  # run_stage NAME LIMIT COMMAND...: COMMAND under min(LIMIT, what the budget has left)
  local name=$1 limit=$2
  shift 2
  local override="SPIN_GPU_CHECK_CAP_$name"
  limit=${!override:-$limit}
  local left=$(( BUDGET - RESERVE - (SECONDS - START) ))
  if (( left < MIN_SLOT )); then
    echo "== $name: skipped, ${left} s left in the budget"
    record "$name" skipped 0 "$left" "no time left in the budget"
    return
  fi
  (( limit > left )) && limit=$left
  printf '== %-10s (limit %3s s) ... ' "$name" "$limit"
  local t0=$SECONDS rc status note=""
  # timeout signals the stage's process group (-k: KILL 5 s later); a bench's workers, in sessions of their own (as
  # torchrun's ranks), are ended by end_leftovers right after. In the background, waited for, so that a TERM sent to
  # this script runs its trap at once, not after the stage.
  timeout -k 5 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1 &
  STAGE=$! STAGE_NAME=$name STAGE_T0=$t0
  wait "$STAGE"
  rc=$?
  STAGE=""
  case $rc in
    0) status=ok ;;
    99) status=skipped ;;
    124|137) status="timed out" ;;
    *) status=failed; note="exit status $rc" ;;
  esac
  # The last line of a stage of this script (install, facts, tests) says what happened: wheels, GPU, test counts.
  if [[ $status != "timed out" && ${2:-} == "$SELF" ]]; then
    note="${note:+$note: }$(tail -n 1 "$WORK/logs/$name.log" | sed "s/^=* *//; s/ *=*$//" | cut -c1-160)"
  fi
  echo "$status ($(( SECONDS - t0 )) s)"
  [[ $status == ok ]] || tail -n 4 "$WORK/logs/$name.log" | cut -c1-300 | sed 's/^/    /'
  end_leftovers "$name"
  record "$name" "$status" "$(( SECONDS - t0 ))" "$limit" "$note"
  snapshot
}

end_leftovers() {  # end_leftovers STAGE: kill the processes a stage left running
  # torchrun starts each rank in a session of its own, out of reach of timeout's signal to its process group: a rank
  # that outlived its stage would hold GPU memory and skew the next stage's figures. Every process a stage starts
  # inherits SPIN_GPU_CHECK_RUN; between stages, none of this run's should be left.
  local pid left=()
  for pid in $(grep -lsxz "SPIN_GPU_CHECK_RUN=$WORK" /proc/[0-9]*/environ | cut -d/ -f3); do
    [[ $pid != "$$" && -d /proc/$pid ]] && left+=("$pid")  # grep and cut themselves are gone
  done
  (( ${#left[@]} )) || return 0
  kill -KILL "${left[@]}" 2>/dev/null
  echo "    $1 left processes running: killed ${left[*]}" | tee -a "$WORK/logs/$1.log"
  sleep 1  # their GPU memory is freed as they go
}

into_out() {  # into_out NAME COMMAND...: COMMAND's stdout becomes $OUT/NAME whole or not at all (a kill midway
  # leaves the last complete one)
  local name=$1
  shift
  "$@" >"$OUT/.$name.partial" && mv -f "$OUT/.$name.partial" "$OUT/$name"
}

pack_results() {
  find "$WORK/results" -maxdepth 1 \( -name "*-$PRESET.*" -o -name "*-$PRESET-custom.*" \) -printf '%f\n' | sort \
    | into_out results.tar.gz tar -cz -C "$WORK/results" -T -
}

snapshot() {  # what the stages have left so far, into $OUT (a second or so): pack() completes it at the end.
  # stages.tsv last: a reader who finds a stage in it finds that stage's results and logs too.
  [[ -f $WORK/facts.json ]] && into_out facts.json cat "$WORK/facts.json"
  pack_results
  into_out logs.tar.gz tar -cz -C "$WORK" logs
  into_out stages.tsv cat "$WORK/stages.tsv"
}

pack() {  # plots and summary, then at most 8 files into $OUT
  trap - TERM INT
  timeout -k 3 20 "$PY" -m bench.gpu.report --preset "$PRESET" --stages "$WORK/stages.tsv" \
    --facts "$WORK/facts.json" --json "$OUT/summary.json" >"$OUT/summary.txt" 2>"$WORK/logs/report.log" \
    || echo "the report failed or timed out: see logs/report.log" >>"$OUT/summary.txt"
  echo
  cat "$OUT/summary.txt"
  touch "$WORK/stages.tsv"
  snapshot
  echo
  echo "in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')($(( SECONDS - START )) s in all)"
}

stop_stage() {  # the stage running when this script is told to stop, and its process group, with it
  [[ -n ${STAGE:-} ]] || return 0
  kill -TERM -- "-$STAGE" "$STAGE" 2>/dev/null
  sleep 2
  kill -KILL -- "-$STAGE" "$STAGE" 2>/dev/null
  end_leftovers "$STAGE_NAME"
  record "$STAGE_NAME" stopped "$(( SECONDS - STAGE_T0 ))" - "this script was told to stop (TERM or INT) midway"
}
trap 'stop_stage; snapshot; pack; exit 1' TERM INT

# -------------------------------------------------------------------------------------------------------- stages
echo "spin-fast GPU check: preset $PRESET, budget $BUDGET s, stages: $STAGES; work folder $WORK"
for name in $STAGES; do
  case $name in
    install|facts|tests)
      run_stage "$name" "${CAP[$name]}" bash "$SELF" --step "$name" ;;
    kernels|train_step|iteration|generate|scaling)
      args="SPIN_GPU_CHECK_ARGS_$name"
      eval "extra=(${!args:-})"  # shell-quoted, so that method names with spaces survive
      run_stage "$name" "${CAP[$name]}" "$PY" -m "bench.$name" --preset "$PRESET" "${extra[@]}" ;;
    *)
      echo "== $name: unknown stage"
      record "$name" failed 0 0 "unknown stage" ;;
  esac
done
pack
