"""Active learning for an experiment: pick the images worth labelling, read the labels back, retrain, evaluate.

    python classifier/active_learning.py select   --config runs/resnet-18/al/config.yml
    python classifier/active_learning.py import   --config ... [--file timelapse_export.csv | label_studio_export.json]
    python classifier/active_learning.py retrain  --config ... [--round K] [--overwrite]
    python classifier/active_learning.py evaluate --config ... [--round K]
    python classifier/active_learning.py status   --config ...
    python classifier/active_learning.py simulate --config ... [--strategies margin random] [--seeds 0 1 2] [--rounds 5]

The config's ``active_learning:`` section says which pool, strategy, batch size and label
tool; round 0 is the model of ``classifier/train.py``. Everything is kept in
<experiment>/active_learning/ (see docs/active_learning.md); any step can be stopped and
run again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from classification.active_learning.loop import (
    evaluate_round,
    import_labels,
    open_experiment,
    retrain_round,
    select_round,
    status_table,
)
from classification.active_learning.registry import strategy_names
from classification.cli import MAX_BATCH_SIZE, MAX_SEED, ArgumentParser, bounded_int, run_main


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "select": "score the pool with the newest model and pick the next round's images",
        "import": "read the labels of a round back from the label tool",
        "retrain": "train the round's model on the train split plus every labelled pool image",
        "evaluate": "score a round's model on the held-out split; adds a row to history.csv",
        "status": "one row per round, and what to run next",
        "simulate": "simulated rounds with the known labels: accuracy against labels per strategy",
    }
    for name, text in helps.items():
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--config", type=Path, required=True, help="runs/<model>/<experiment>/config.yml")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config key, e.g. active_learning.strategy=k_center (repeatable)")
        if name in ("import", "retrain", "evaluate"):
            command.add_argument("--round", type=bounded_int(0), help="the round (default: the newest one this step applies to)")
        if name == "import":
            command.add_argument("--file", type=Path,
                                 help="the export: Timelapse CSV, or Label Studio JSON_MIN (default for Label Studio: "
                                      "export the round's project from the server)")
        if name == "retrain":
            command.add_argument("--overwrite", action="store_true",
                                 help="retrain from scratch with the labels imported since (the earlier model is archived)")
        if name == "simulate":
            command.add_argument("--strategies", nargs="+", choices=strategy_names(), help="default: the config's simulation.strategies")
            command.add_argument("--seeds", nargs="+", type=bounded_int(0, MAX_SEED), help="default: the config's simulation.seeds")
            command.add_argument("--rounds", type=bounded_int(), help="default: the config's simulation.rounds")
            command.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH_SIZE), help="images per round (default: active_learning.batch_size)")
            command.add_argument("--output-dir", type=Path, help="default: <experiment>/active_learning/simulation")
    return parser


def run_select(args: argparse.Namespace) -> int:
    result = select_round(open_experiment(args.config, args.overrides))
    print(result.message)
    print(result.selection[["rank", "path", "score", "predicted", "confidence"]].head(10).to_string(index=False))
    if len(result.selection) > 10:
        print(f"... and {len(result.selection) - 10} more in the selection file")
    for path in result.handoff:
        print(f"for the label tool: {path}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    result = import_labels(open_experiment(args.config, args.overrides), args.file, args.round)
    received = result.received
    print(f"round {result.round}: {received.summary()}")
    for line in received.detail_lines():
        print(f"  {line}")
    print(f"{result.added} new labels stored ({len(received.labels) - result.added} already stored); "
          f"{result.pending} requested images still without a label; export kept in {result.saved_copy}")
    return 0


def run_retrain(args: argparse.Namespace) -> int:
    result = retrain_round(open_experiment(args.config, args.overrides), args.round, args.overwrite)
    if result.exit_code == 0:
        print(f"trained {result.epochs_completed} epochs in {result.run_dir}; next: python classifier/active_learning.py "
              f"evaluate --config {args.config}")
    return result.exit_code


def run_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_round(open_experiment(args.config, args.overrides), args.round)
    print(f"round {metrics['round']}: {metrics['eval_split']} top-1 {metrics['top1']:.4f}, macro F1 {metrics['macro_f1']:.4f} "
          f"on {metrics['eval_images']} held-out images, with {metrics['pool_labels']} pool labels")
    return 0


def run_status(args: argparse.Namespace) -> int:
    table, next_step = status_table(open_experiment(args.config, args.overrides))
    print(table.to_string(index=False))
    print(f"next: {next_step}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from classification.active_learning.simulation import settings_with, simulate  # noqa: PLC0415 - matplotlib only for this command

    experiment = open_experiment(args.config, args.overrides)
    settings = settings_with(experiment.active_learning.simulation, strategies=args.strategies, seeds=args.seeds, rounds=args.rounds)
    result = simulate(experiment, settings, args.batch_size, args.output_dir)
    print(result.summary.to_string(index=False))
    print(f"curves: {result.output_dir / 'curves.csv'}, {result.output_dir / 'curves.png'}")
    return 0


COMMANDS = {"select": run_select, "import": run_import, "retrain": run_retrain, "evaluate": run_evaluate,
            "status": run_status, "simulate": run_simulate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(run_main(main))
