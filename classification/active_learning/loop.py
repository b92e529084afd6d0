"""The active-learning loop of an experiment: select → (a person labels) → import → retrain → evaluate.

Each step is one command (``classifier/active_learning.py``) that a person runs between
labelling sessions, and each can be stopped and run again: the state lives in the files
of ``runs/<model>/<experiment>/active_learning/`` (see ``store.py``).

- Round 0 is the experiment's own model (``classifier/train.py``; the checkpoint
  ``active_learning.initial_checkpoint``, default ``best``).
- ``select`` (round k): scores the still-unlabelled pool with the model of round k − 1,
  picks ``batch_size`` images with the configured strategy (never one already labelled or
  requested in an earlier round), writes ``selection.csv`` with the reason for each pick,
  and hands the images to the label tool (a Timelapse request CSV, or a Label Studio
  project with the images as tasks).
- ``import``: reads the labels back (a Timelapse CSV, a Label Studio export file, or the
  Label Studio project itself) into the append-only ``labels.csv``.
- ``retrain``: trains round k's model on the experiment's train split plus every pool
  image labelled in rounds 1 to k (a later round's labels are not round k's; resumable
  like any training run).
- ``evaluate``: scores round k's model on the **held-out** split ``eval_split`` of the
  experiment's dataset (the same images every round; not the remaining pool, which is
  what the original tools reported) and adds a row to ``history.csv``.

With ``active_learning.retrain: head`` a round's model is an MLP on embeddings cached once
(``head_rounds.py``): select, retrain and evaluate then take seconds, and round 0 needs no
``classifier/train.py``.

This module is the loop's public face, one function per command; the work is done at the seams:
``rounds`` (the experiment and its rounds), ``round_models`` (what a round's model is and does: a CNN
or a head, one interface), ``round_datasets`` (a round's dataset and config), ``round_status`` (the
rounds' state, what to run next), ``round_selection`` (select), ``handoff`` (the label tools: hand-off
and import) and ``retraining`` (retrain and evaluate).
"""

from __future__ import annotations

from classification.active_learning.handoff import import_labels
from classification.active_learning.retraining import evaluate_round, retrain_round
from classification.active_learning.round_selection import select_round
from classification.active_learning.round_status import status_table
from classification.active_learning.rounds import Experiment, open_experiment

__all__ = ["Experiment", "evaluate_round", "import_labels", "open_experiment", "retrain_round", "select_round", "status_table"]
