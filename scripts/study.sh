#!/usr/bin/env bash
# The loss study of docs/results.md: the phantom (5 seeds: 7 losses, beta and alpha sweeps, and the Combo
# loss's halves with its class weights) and the real CT sample (3 seeds: 7 losses, beta 0.1 / 0.5 / 0.9).
# Every run is a train.py subprocess of the experiment runner, so an interrupted study resumes where it
# stopped when the same command is run again.
#
#   scripts/study.sh [--gpu] [--python PY] [--ct-data DIR] [--archive FILE] [--deadline SECONDS] OUT
#
# OUT receives OUT/phantom, OUT/phantom_weighted_halves and OUT/totalseg_ct (tables, CSVs, plots, study.json;
# runs under */runs/). `make study` runs it with OUT=results on the CPU.
#
# CPU (default): the six commands one after another, as many trainings at a time as there are cores, at most
#   2 (--parallel, each pinned to its share of the cores). Measured on a 2-core CPU: see docs/results.md
#   (about 2 hours 20 minutes in all).
# --gpu: one GPU shared by 16 trainings at once (the runner turns memory preallocation off when trainings share
#   a GPU), the commands running side by side and one JAX compilation cache for all. Trainings of this size are
#   bound by the host's CPU cores (16 on an H200 machine), not by the GPU. The sweeps first train their
#   values other than the loss's own, which the comparison trains, and are then rerun with every value: that
#   rerun trains nothing and writes the sweep tables.
# --ct-data: the folder holding example_ct_sm.nii.gz and example_seg.nii.gz (default: the config's own,
#   ../shared/data/totalsegmentator_ct beside the repository). Runs with another data root are another configuration to the runner:
#   keep them in another OUT.
# --archive FILE: at the end, pack OUT's tables and each run's summary.json, report.md, metrics.jsonl and
#   train.log (no checkpoints) into FILE (.tar.gz), also when the study stopped early.
# --deadline SECONDS (with --gpu): stop the trainings that are still running after that many seconds (each saves
#   a checkpoint and stops; rerunning the script resumes them) and pack what finished.
# Missing Python packages (grain, ml_collections, nibabel, tensorboardX) are installed from ./.whl/*.whl when
# that folder exists (see docs/results.md, "Running the study on a GPU machine").
set -euo pipefail
cd "$(dirname "$0")/.."

GPU=0; PY=${PYTHON:-.venv/bin/python}; CT_DATA=""; ARCHIVE=""; DEADLINE=0
while [ $# -gt 1 ]; do
  case "$1" in
    --gpu) GPU=1; shift ;;
    --python) PY=$2; shift 2 ;;
    --ct-data) CT_DATA=$2; shift 2 ;;
    --archive) ARCHIVE=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
OUT=${1:?usage: scripts/study.sh [--gpu] [--python PY] [--ct-data DIR] [--archive FILE] [--deadline SECONDS] OUT}

pack() {
  [ -n "$ARCHIVE" ] || return 0
  (cd "$OUT" && find . \( -name jax_cache -o -name checkpoints -o -name 'events.out.*' \) -prune -o -type f -print \
     | tar -czf - -T -) > "$ARCHIVE"
  ls -l "$ARCHIVE"
}
trap pack EXIT
# SIGTERM or Ctrl-C to this script reaches the study commands, which ask their trainings to save and stop.
children=()
forward() { [ ${#children[@]} = 0 ] || kill -TERM "${children[@]}" 2>/dev/null; wait; exit 130; }
trap forward TERM INT
run() { "$@" & children=($!); wait "${children[0]}"; local rc=$?; children=(); return $rc; }

case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
[ -z "$CT_DATA" ] || CT_DATA=$(cd "$CT_DATA" && pwd)
[ -z "$ARCHIVE" ] || ARCHIVE=$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")

# A Python without the training extra or without combo_jax installed (a GPU machine's image, say): install the
# wheels of ./.whl and this checkout into /tmp/study_site, and run from outside the checkout so that the
# installed package (with its combo_jax.configs) is the one imported.
if ! "$PY" -c "import grain, ml_collections, nibabel, tensorboardX, combo_jax.configs" 2>/dev/null; then
  site=/tmp/study_site
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl
  fi
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target $site .
  cd /tmp
  "$PY" -c "import grain, ml_collections, nibabel, tensorboardX, combo_jax.configs" \
    || { echo "missing Python packages (see above)" >&2; exit 1; }
fi

SEEDS=5; CT_SEEDS=3
VALUES=0.1,0.5,0.9; CT_BETAS=0.1,0.5,0.9
CT_SET=(); [ -n "$CT_DATA" ] && CT_SET=(--set "data.root=$(cd "$CT_DATA" && pwd)")
EXP=("$PY" -m combo_jax.experiments)
export PYTHONUNBUFFERED=1
started=$(date +%s)

# The loss's own alpha and beta (the comparison's combo runs): left out of the sweeps' first pass on a GPU.
own() { "$PY" -c "from combo_jax.config import loss_options; print(loss_options('combo')['$1'])"; }
others() { "$PY" -c "import sys; own = float(sys.argv[2]); print(','.join(v for v in sys.argv[1].split(',') if float(v) != own))" "$1" "$2"; }

phantom_compare=(compare --config study --seeds $SEEDS --out "$OUT/phantom")
phantom_beta=(sweep --config study --param loss.beta --seeds $SEEDS --out "$OUT/phantom")
phantom_alpha=(sweep --config study --param loss.alpha --seeds $SEEDS --out "$OUT/phantom")
# The Combo loss's two halves alone, with the class weights the Combo default carries (a control for claim 1).
phantom_halves=(compare --config study --losses wce,dice --seeds $SEEDS --set loss.frequency_power=0.25
                --out "$OUT/phantom_weighted_halves")
ct_compare=(compare --config totalseg_ct --seeds $CT_SEEDS --out "$OUT/totalseg_ct" "${CT_SET[@]}")
ct_beta=(sweep --config totalseg_ct --param loss.beta --seeds $CT_SEEDS --out "$OUT/totalseg_ct" "${CT_SET[@]}")

if [ $GPU = 0 ]; then
  P=$("$PY" -c "import os; print(min(2, len(os.sched_getaffinity(0))))")
  run "${EXP[@]}" "${phantom_compare[@]}" --parallel "$P"
  run "${EXP[@]}" "${phantom_beta[@]}" --values $VALUES --parallel "$P"
  run "${EXP[@]}" "${phantom_alpha[@]}" --values $VALUES --parallel "$P"
  run "${EXP[@]}" "${phantom_halves[@]}" --parallel "$P"
  run "${EXP[@]}" "${ct_compare[@]}" --parallel "$P"
  run "${EXP[@]}" "${ct_beta[@]}" --values $CT_BETAS --parallel "$P"
else
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  CACHE=(--compile-cache "$OUT/jax_cache")
  mkdir -p "$OUT/phantom" "$OUT/phantom_weighted_halves" "$OUT/totalseg_ct"
  beta=$(own beta); alpha=$(own alpha)
  limit=(); [ "$DEADLINE" -gt 0 ] && limit=(timeout -s TERM -k 120 "$DEADLINE")
  children=()
  "${limit[@]}" "${EXP[@]}" "${phantom_compare[@]}" --parallel 6 "${CACHE[@]}" > "$OUT/phantom_compare.log" 2>&1 & children+=($!)
  "${limit[@]}" "${EXP[@]}" "${phantom_beta[@]}" --values "$(others $VALUES "$beta")" --parallel 3 "${CACHE[@]}" > "$OUT/phantom_beta.log" 2>&1 & children+=($!)
  "${limit[@]}" "${EXP[@]}" "${phantom_alpha[@]}" --values "$(others $VALUES "$alpha")" --parallel 3 "${CACHE[@]}" > "$OUT/phantom_alpha.log" 2>&1 & children+=($!)
  "${limit[@]}" "${EXP[@]}" "${phantom_halves[@]}" --parallel 2 "${CACHE[@]}" > "$OUT/phantom_halves.log" 2>&1 & children+=($!)
  "${limit[@]}" "${EXP[@]}" "${ct_compare[@]}" --parallel 3 "${CACHE[@]}" > "$OUT/ct_compare.log" 2>&1 & children+=($!)
  "${limit[@]}" "${EXP[@]}" "${ct_beta[@]}" --values "$(others $CT_BETAS "$beta")" --parallel 1 "${CACHE[@]}" > "$OUT/ct_beta.log" 2>&1 & children+=($!)
  status=0
  for pid in "${children[@]}"; do wait "$pid" || status=1; done
  children=()
  tail -n 3 "$OUT"/*.log
  [ $status = 0 ] || { echo "a study command failed; see $OUT/*.log (rerun this script to resume)" >&2; exit 1; }
  "${EXP[@]}" "${phantom_beta[@]}" --values $VALUES "${CACHE[@]}"
  "${EXP[@]}" "${phantom_alpha[@]}" --values $VALUES "${CACHE[@]}"
  "${EXP[@]}" "${ct_beta[@]}" --values $CT_BETAS "${CACHE[@]}"
fi
echo "study finished in $(( ($(date +%s) - started) / 60 )) min"
