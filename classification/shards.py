"""Run a stage's jobs as shards on Dask (``dask.distributed``) and merge what they wrote.

A stage (cropping, prediction, embedding) cuts its job list into contiguous shards of a
fixed size (``cut_shards``); each shard runs as one Dask task that writes its result
atomically to its own shard file (``<folder>/shard-<digest>.pkl``, the digest naming the
shard's jobs and options); the stage then reads the shard files back in shard order and
writes exactly the files a single-process run writes. Faults:

- A shard file exists only once its shard finished (written with ``atomic_open``, fsynced),
  so a worker killed mid-shard loses that shard's unfinished work and nothing else.
- A re-run of the same command reuses every shard file whose digest still matches (same
  jobs, same options) and that the stage accepts (``reusable``), and runs only the others.
- The shard size does not depend on the number of workers, so a re-run with another
  cluster reuses the same shard files.

The cluster (``dask_client``): a ``LocalCluster`` of ``workers`` processes (one thread
each) or an existing scheduler by address (``tcp://host:8786``: a ``dask scheduler``
started by hand, or a ``dask-jobqueue`` Slurm/PBS cluster's ``scheduler_address``; see
docs/scaling.md). Workers must see the same files as this process (a shared filesystem).

Shard files are pickles written by the stage's own workers into the run's output folder;
they are trusted as a checkpoint is. This layer sits under the stages (above ``io``) and
imports dask only when a cluster is asked for: it is an optional extra (``.[dask]``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tqdm import tqdm

from classification.errors import DataError, UserError
from classification.io import atomic_open

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")

SHARDS_DIR = ".shards"  # a stage's shard files, in its output folder; removed once its outputs are written
SHARD_FORMAT = 1  # bump when a shard file's content changes meaning: older files are then redone
DEFAULT_SHARD_SIZE = 100  # jobs per shard: a few seconds to a minute of work, the most a killed worker loses
MAX_WORKERS_PER_CORE = 4  # local Dask worker processes per core, at most
CONNECT_TIMEOUT_S = 30


@dataclass(frozen=True)
class DaskOptions:
    """Where shards run: ``workers`` local processes, or the scheduler at ``scheduler``; ``shard_size`` jobs a task."""

    workers: int = 1
    scheduler: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE

    @property
    def enabled(self) -> bool:
        """True when the stage should run on Dask (an address, or more than one worker process)."""
        return self.scheduler is not None or self.workers > 1

    def validate(self) -> None:
        """Raise a one-line ``UserError`` for a value out of range or a contradiction."""
        if self.workers < 1:
            raise UserError(f"--dask-workers must be at least 1, got {self.workers}")
        most = MAX_WORKERS_PER_CORE * (os.cpu_count() or 1)
        if self.workers > most:  # each is a process: a typo'd 10**30 would start them until memory runs out
            raise UserError(f"--dask-workers {self.workers}: more than {most} local worker processes "
                            f"({MAX_WORKERS_PER_CORE} per core of this machine); for more machines, start a cluster and give --scheduler")
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.scheduler is not None and self.workers > 1:
            raise UserError("give --dask-workers (a local cluster) or --scheduler (an existing one), not both")


NO_DASK = DaskOptions()  # the default of every stage: one process, no Dask


@dataclass(frozen=True)
class Shard(Generic[J]):
    """A contiguous piece of the job list and the file its result goes to."""

    index: int
    jobs: Sequence[J]
    path: Path


@dataclass(frozen=True)
class ShardResult(Generic[R]):
    """A shard's result, and whether it was read from an earlier run's shard file instead of computed."""

    value: R
    reused: bool


def cut_shards(jobs: Sequence[J], size: int, folder: Path, fingerprint: Callable[[Sequence[J]], str]) -> list[Shard[J]]:
    """Contiguous shards of ``size`` jobs, each named by the digest of ``fingerprint(its jobs)``."""
    shards = []
    for index, start in enumerate(range(0, len(jobs), size)):
        piece = jobs[start:start + size]
        digest = hashlib.sha256(f"{SHARD_FORMAT}\n{fingerprint(piece)}".encode()).hexdigest()[:24]
        shards.append(Shard(index, piece, folder / f"shard-{digest}.pkl"))
    return shards


def write_shard(path: Path, value: object) -> None:
    """Write a shard's result atomically and durably: once it exists, the shard is finished."""
    with atomic_open(path, "wb") as handle:
        pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)


def read_shard(path: Path) -> Any | None:
    """A shard file's result; ``None`` when it is missing or cannot be read (the shard is then redone)."""
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)  # our own workers' output, trusted as a checkpoint is
    except FileNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - any unreadable file (truncated, older code) means: redo the shard
        log.warning("%s: unreadable shard file, redoing it (%s)", path, error)
        return None


def run_and_store(task: Callable[..., R], jobs: Sequence[J], path: Path, args: tuple[Any, ...]) -> Path:
    """The Dask task: run ``task(jobs, *args)`` and write its result to the shard file ``path``."""
    write_shard(path, task(jobs, *args))
    return path


@contextmanager
def quiet_dask_logs() -> Iterator[None]:
    """Dask's own INFO lines (every worker started, every connection) off while a stage runs: warnings stay."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def dask_client(options: DaskOptions) -> Iterator[Client]:
    """A client of the scheduler at ``options.scheduler``, else of a new ``LocalCluster`` of ``options.workers`` processes."""
    try:
        from distributed import Client, LocalCluster  # noqa: PLC0415 - dask is an optional extra, imported when asked for
    except ImportError:
        raise UserError("running on Dask needs the dask extra: pip install -e '.[dask]'") from None
    if options.scheduler is not None:
        try:
            client = Client(options.scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as error:
            raise UserError(f"--scheduler {options.scheduler}: cannot connect ({error})") from None
        with client:
            yield client
        return
    # dashboard_address ":0": a free port (the scheduler's HTTP server starts even without bokeh; 8787 may be taken)
    with LocalCluster(n_workers=options.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        yield client


def load_reusable(shards: Sequence[Shard[J]], reusable: Callable[[Any], bool]) -> dict[int, Any]:
    """The results of the shards whose files an earlier run finished and the stage accepts, by shard index."""
    done = {}
    for shard in shards:
        value = read_shard(shard.path)
        if value is not None and reusable(value):
            done[shard.index] = value
    if done:
        log.info("reusing %d of %d shards finished by an earlier run", len(done), len(shards))
    return done


def run_on_dask(task: Callable[..., R], shards: Sequence[Shard[J]], args: tuple[Any, ...], options: DaskOptions,
                bar: tqdm) -> list[BaseException]:
    """Run each shard as one Dask task writing its shard file; wait for all; the errors of those that failed."""
    from distributed import as_completed  # noqa: PLC0415 - optional extra (see dask_client)

    errors: list[BaseException] = []
    with quiet_dask_logs(), dask_client(options) as client:
        submitted = client.map(run_and_store, [task] * len(shards), [shard.jobs for shard in shards],
                               [shard.path for shard in shards], [args] * len(shards),
                               key=[f"run-{shard.path.stem}" for shard in shards], pure=False)
        futures = dict(zip(submitted, shards))
        for future in as_completed(futures):
            error = future.exception()
            if error is not None:
                errors.append(error)
            bar.update(len(futures[future].jobs))
    return errors


def shard_failure(errors: Sequence[BaseException], total: int) -> UserError:
    """One line for failed shards: the task's own one-line error, else what killed it and how to finish."""
    first = errors[0]
    if isinstance(first, (UserError, DataError)):
        return first
    return UserError(
        f"{len(errors)} of {total} shards failed ({type(first).__name__}: {first}); the finished shards are kept:"
        " run the same command again to do only the rest"
    )


def run_shards(task: Callable[..., R], shards: Sequence[Shard[J]], args: tuple[Any, ...], options: DaskOptions,
               reusable: Callable[[R], bool] = lambda value: True, progress: bool = False, unit: str = "job") -> list[ShardResult[R]]:
    """Every shard's result in shard order: read from its file when an earlier run finished it, else run on Dask.

    ``task(jobs, *args)`` runs in a worker process (a module-level function, so it pickles by
    name). A shard that fails (a worker killed, a task error) is reported after the others
    finish, so their shard files are kept for the re-run.
    """
    done = load_reusable(shards, reusable)
    unfinished = [shard for shard in shards if shard.index not in done]
    total_jobs = sum(len(shard.jobs) for shard in shards)
    with tqdm(total=total_jobs, unit=unit, desc="shards", disable=not progress) as bar:
        bar.update(total_jobs - sum(len(shard.jobs) for shard in unfinished))
        errors = run_on_dask(task, unfinished, args, options, bar) if unfinished else []
    if errors:
        raise shard_failure(errors, len(shards))
    results = []
    for shard in shards:
        value = done[shard.index] if shard.index in done else read_shard(shard.path)
        if value is None:
            raise UserError(f"{shard.path}: a finished shard's file is missing or unreadable (is the folder shared with the workers?)")
        results.append(ShardResult(value, shard.index in done))
    return results


def remove_shard_files(folder: Path) -> None:
    """Delete a finished run's shard files once the stage's own outputs hold their results (and ``folder`` when empty)."""
    if not folder.is_dir():
        return
    for path in folder.glob("shard-*.pkl"):
        path.unlink(missing_ok=True)
    with suppress(OSError):
        folder.rmdir()
