"""``model_card.md``: a package's ``model.json`` in words and tables for the person deciding whether to use it."""

from __future__ import annotations

from typing import Any

from classification.package.spec import PackageSpec


def figure(value: Any) -> str:
    """A metric as text: four decimals, or n/a."""
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def class_table(spec: PackageSpec) -> list[str]:
    """One row per class: train crops, and held-out precision/recall/support when the run predicted a split."""
    counts = (spec.provenance.get("data") or {}).get("train_counts") or {}
    held_out: dict[str, Any] = next(iter(spec.metrics.values())) if spec.metrics else {}
    per_class = held_out.get("per_class") or {}
    rows = ["| id | class | train crops | precision | recall | support |", "|---:|---|---:|---:|---:|---:|"]
    for i, name in enumerate(spec.label_names):
        scores = per_class.get(name) or {}
        rows.append(f"| {i} | {name} | {counts.get(name, 'n/a')} | {figure(scores.get('precision'))} | "
                    f"{figure(scores.get('recall'))} | {scores.get('support', 'n/a')} |")
    return rows


def metrics_section(spec: PackageSpec) -> list[str]:
    """Held-out top-1, top-3 and macro F1 per predicted split, and per-location accuracy."""
    if not spec.metrics:
        return ["No held-out predictions were found in the run (predict `--split test` before exporting to record them)."]
    lines = ["| split | images | top-1 | top-3 | macro F1 |", "|---|---:|---:|---:|---:|"]
    for split, metrics in spec.metrics.items():
        lines.append(f"| {split} | {metrics.get('n_scored')} | {figure(metrics.get('top1'))} | {figure(metrics.get('top3'))} | "
                     f"{figure(metrics.get('macro_f1'))} |")
    locations = next(iter(spec.metrics.values())).get("per_location") or []
    if locations:
        lines += ["", "Per location (first split above):", "", "| dataset | location | images | top-1 |", "|---|---|---:|---:|"]
        for row in locations:
            lines.append(f"| {row.get('dataset', '')} | {row.get('location', '')} | {row.get('n', '')} | {figure(row.get('top1'))} |")
    return lines


def int8_section(spec: PackageSpec) -> list[str]:
    """The int8 network, when the package has one: how it was calibrated and what it costs on val."""
    if spec.onnx_int8 is None:
        return []
    facts = spec.int8 or {}
    check = facts.get("check") or {}
    cost = (f" On {check.get('n_images')} {check.get('split')} crops: top-1 {figure(check.get('top1_int8'))} against "
            f"{figure(check.get('top1_fp32'))} in float32, the same class for {figure(check.get('same_top1'))} of them."
            if check else " What it costs was not measured (the val split was empty).")
    return [f"`{spec.onnx_int8.name}`: the same network quantized to int8 ({facts.get('format')}, weights "
            f"{facts.get('weights')}, activations {facts.get('activations')}), calibrated on {facts.get('calibration_crops')} "
            f"{facts.get('calibration_split')} crops; run it with `--precision int8`." + cost, ""]


def model_card(spec: PackageSpec) -> str:
    """The whole card."""
    facts = spec.provenance
    data = facts.get("data") or {}
    checkpoint = facts.get("checkpoint") or {}
    pretrained = facts.get("pretrained") or {}
    fitted = spec.fitted_postprocess or {}
    lines = [
        f"# {spec.name}", "",
        f"A {spec.architecture} camera-trap classifier of {len(spec.label_names)} classes, exported on {facts.get('date')} "
        f"from `{checkpoint.get('name')}` (epoch {checkpoint.get('epoch')}, {checkpoint.get('weights')} weights, "
        f"SHA-256 `{str(checkpoint.get('sha256', ''))[:16]}...`).", "",
        "## Input", "",
        f"RGB crops resized to {spec.input.size} x {spec.input.size} ({spec.input.interpolation}), scaled to [0, 1], "
        f"normalised with mean {list(spec.input.mean)} and std {list(spec.input.std)}; layout {spec.input.layout}. "
        f"Training crops: `{spec.input.crop_strategy or 'unknown'}` strategy (utils/crop_detections.py).", "",
        f"Network: `{spec.onnx.name}` (ONNX opset {spec.onnx_opset}, input `{spec.onnx_input}`, output `{spec.onnx_output}`, "
        f"logits: apply a softmax), and `{spec.weights.name}` (a PyTorch state dict).", "",
        *int8_section(spec),
        "## Classes", "", *class_table(spec), "",
        "## Held-out results", "", *metrics_section(spec), "",
        "## Training", "",
        f"- Dataset: {data.get('dataset')}; split targets {data.get('split_targets')} (locations kept whole), "
        f"split score {data.get('split_score')}.",
        f"- Pretrained weights: {pretrained.get('source', 'none') if pretrained.get('pretrained') else 'none (trained from scratch)'}"
        + (f" ({pretrained.get('licence')})" if pretrained.get("licence") else "") + ".",
        f"- Config SHA-256: `{facts.get('config_sha256')}`.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in (facts.get('versions') or {}).items())}.", "",
        "## Post-processing", "",
        (f"Fitted on {fitted.get('n_fitted')} {fitted.get('fitted_on')} predictions of `{fitted.get('checkpoint')}`: "
         f"temperature {fitted.get('temperature')}, thresholds for precision {fitted.get('target_precision')}."
         if fitted else "Nothing fitted (predict `--split val` with a postprocess: section before exporting)."), "",
        "Use it: `python classifier/predict.py --model <this folder> --images DIR --output-dir OUT`, or load "
        f"`{spec.onnx.name}` with any ONNX runtime and `classes.csv` for the class names.", "",
    ]
    return "\n".join(lines)
