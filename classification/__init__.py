"""Config-driven training of camera-trap image classifiers.

The library is organised by pipeline stage, each a layer that imports only those below it:
``classification.data`` prepares data (CCT files, crops, datasets, splits),
``classification.training`` trains with exact resume, ``classification.evaluation`` predicts
and scores, and ``classification.active_learning`` picks what to label next. Beneath them,
``runtime`` (devices, DDP, AMP, progress bars), ``shards`` (jobs cut into shards on Dask),
``io`` (atomic writes, JSON and CSV reading) and ``errors``; ``config`` (the experiment's
``config.yml``) imports no stage. See docs/architecture.md. Entry points in ``utils/`` and
``classifier/`` only parse arguments and call functions here.
"""

__version__ = "0.1.0"
