"""Helpers shared by test modules: plain functions, constants and dataclasses, imported as ``tests.helpers.<topic>``.

One way for each kind of thing: a test module imports plain helpers from here (never from another test
module, whose fixtures would come along and shadow its own, ruff F811), and the fixtures several modules use
are in tests/conftest.py, where pytest finds them without an import. The modules here are importable and
typed like the library; pytest rewrites their asserts (tests/__init__.py), so a failing check reads the same.
"""

import os

# One torch thread, in this process and in the entry points the tests start (a value set by whoever runs the
# tests is kept): the models here are tiny, and on a 2-core machine a second thread only spins against the
# first and against loader workers (one in-process resume test: 53 CPU-s with 2 threads, 18 with one).
# Set here, before any helper imports torch (conftest.py imports these modules first).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
