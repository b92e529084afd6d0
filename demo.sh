#!/usr/bin/env bash
# One command for a fresh machine: install everything into .venv, then run the whole
# pipeline on the generated demo data. Re-running reuses the environment, skips
# crops that exist and resumes training. Outputs: data/raw/demo, data/interim/demo,
# data/processed/demo{,_al}, runs/efficientnet-lite0/demo and runs/efficientnet-lite0/demo-al.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
echo "== installing the project and its pinned dependencies"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[dev,weights,dask]"

PY="$VENV/bin/python"
RAW=data/raw/demo
INTERIM=data/interim/demo
PROCESSED=data/processed/demo

echo "== 1. generate demo images and a CCT file"
"$PY" utils/make_demo_data.py "$RAW"
echo "== 2. validate the CCT file"
"$PY" utils/validate_cct.py "$RAW/demo_cct.json" --max-problems 3
echo "== 3. category map (edit it to drop or merge classes), then clean"
"$PY" utils/make_category_map.py "$RAW/demo_cct.json" --output "$INTERIM/category_map.json" --overwrite
"$PY" utils/clean_cct.py "$RAW/demo_cct.json" "$INTERIM/clean_cct.json" \
    --category-map "$INTERIM/category_map.json" --missing-locations sequence --dataset demo
echo "== 4. crop every detection"
"$PY" utils/crop_detections.py "$INTERIM/clean_cct.json" "$INTERIM/crops" --images-dir "$RAW/images" \
    --crop-strategy pad --threads 2 --logdir "$INTERIM/logs"
echo "== 5. classification dataset and location-disjoint splits"
"$PY" utils/create_classification_dataset.py "$PROCESSED" --mode csv cct splits \
    --crops-dir "$INTERIM/crops" --cct-json "$INTERIM/clean_cct.json" --min-locs 2 \
    --val-frac 0.2 --test-frac 0.2 --method random --seed 0
RUN=runs/efficientnet-lite0/demo
echo "== 6. train (resumes when re-run; an offline Comet archive in $RUN/comet without a COMET_API_KEY)"
"$PY" classifier/train.py --config "$RUN/config.yml"
echo "== 7. predict and evaluate the test split with the best checkpoint"
"$PY" classifier/predict.py --config "$RUN/config.yml" --checkpoint best --split test
echo "== 8. the evaluation notebook, executed headless"
"$PY" utils/run_notebook.py notebooks/evaluate_results.ipynb --output "$RUN/evaluate_results.ipynb" \
    --set RUN_DIR="$RUN" --set PREDICTIONS_DIR="$RUN/predictions/test_best"

AL_RUN=runs/efficientnet-lite0/demo-al
AL_ROUND="$AL_RUN/active_learning/round_1"
echo "== 9. active learning: hide 70% of the train split in an unlabelled pool"
"$PY" utils/make_al_pool.py "$PROCESSED" data/processed/demo_al "$INTERIM/pool" --crops-dir "$INTERIM/crops" \
    --labelled-fraction 0.3 --seed 0
if [ ! -f "$AL_ROUND/metrics.json" ]; then
    echo "== 10. round 0 (a head on the frozen ImageNet features of the labelled rest), then one round:"
    echo "       select -> label (answered from the hidden labels) -> import -> retrain -> evaluate"
    "$PY" classifier/active_learning.py evaluate --config "$AL_RUN/config.yml" --round 0
    "$PY" classifier/active_learning.py select --config "$AL_RUN/config.yml"
    "$PY" utils/answer_requests.py "$AL_ROUND/timelapse_request.csv" data/processed/demo_al/pool_answers.csv \
        --output "$AL_ROUND/demo_timelapse_export.csv"
    "$PY" classifier/active_learning.py import --config "$AL_RUN/config.yml" --file "$AL_ROUND/demo_timelapse_export.csv"
    "$PY" classifier/active_learning.py retrain --config "$AL_RUN/config.yml"
    "$PY" classifier/active_learning.py evaluate --config "$AL_RUN/config.yml"
fi
"$PY" classifier/active_learning.py status --config "$AL_RUN/config.yml"
echo "== done: dataset in $PROCESSED; model, metrics.csv, predictions and evaluate_results.ipynb in $RUN;"
echo "   active learning in $AL_RUN/active_learning (history.csv: held-out accuracy per round)"
