#!/usr/bin/env bash
# One command for a fresh machine: install everything into .venv, then run the whole
# pipeline on the generated demo data. Re-running reuses the environment, skips
# crops that exist and resumes training. Outputs: data/raw/demo, data/interim/demo,
# data/processed/demo and runs/resnet-18/demo.
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
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"

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
RUN=runs/resnet-18/demo
echo "== 6. train (resumes when re-run; an offline Comet archive in $RUN/comet without a COMET_API_KEY)"
"$PY" classifier/train.py --config "$RUN/config.yml"
echo "== 7. predict and evaluate the test split with the best checkpoint"
"$PY" classifier/predict.py --config "$RUN/config.yml" --checkpoint best --split test
echo "== 8. the evaluation notebook, executed headless"
"$PY" utils/run_notebook.py notebooks/evaluate_results.ipynb --output "$RUN/evaluate_results.ipynb" \
    --set RUN_DIR="$RUN" --set PREDICTIONS_DIR="$RUN/predictions/test_best"
echo "== done: dataset in $PROCESSED; model, metrics.csv, predictions and evaluate_results.ipynb in $RUN"
