"""Config-driven training of camera-trap image classifiers.

The library is organised by pipeline stage: ``classification.data`` prepares data
(CCT files, crops, datasets, splits); later stages add training, evaluation and
active learning. Entry points in ``utils/`` and ``classifier/`` only parse arguments
and call functions here.
"""

__version__ = "0.1.0"
