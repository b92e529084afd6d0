"""Shared plumbing for entry-point scripts: one-line errors and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError

from classification.config import describe_error
from classification.errors import UserError, closest_names
from classification.shards import DEFAULT_SHARD_SIZE, DaskOptions

if TYPE_CHECKING:
    from classification.data.lila.run import LilaSource
    from classification.data.s3 import AwsOptions

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's ``main``; map user errors to one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(main(argv) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValidationError as error:  # a config built from flags in code (a backbone's, an override): name the field
        print(f"error: {'; '.join(describe_error(e) for e in error.errors())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


MAX_BATCH_SIZE = 1_000_000  # images in one batch: far above any GPU's memory, far below what overflows islice/torch
MAX_WORKERS = 1024  # threads or processes
MAX_COUNT = 10**9  # images, candidates, rounds, shard sizes
MAX_SEED = 2**32 - 1  # numpy's generators take seeds below 2**32


def bounded_int(low: int = 1, high: int = MAX_COUNT) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high``, else argparse's one-line error naming the flag
    (``--batch-size 100000000000000000000`` was a traceback from ``islice``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high:,}, got {text}")
        return value

    parse.__name__ = "integer"  # what argparse says if it ever names the type
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with abbreviations off and one-line errors that suggest the flag meant.

    A typo'd flag is an error (never a guess): ``error: unrecognized arguments:
    --thread (did you mean --threads?)`` and exit code 2, without the usage block.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def known_flags(self) -> list[str]:
        """Every option string this parser (or one of its sub-commands) accepts."""
        flags = [flag for action in self._actions for flag in action.option_strings]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                flags += [flag for sub in action.choices.values() for flag in sub.known_flags()]
        return flags

    def suggest(self, message: str) -> str:
        """Append "did you mean" for each unknown ``--flag`` in an argparse message."""
        hints = []
        for word in message.replace(",", " ").split():
            word = word.rstrip(":")  # argparse writes "argument --flag: ..." about a flag it knows
            if word.startswith("-") and word not in self.known_flags():
                close = closest_names(word.split("=")[0], self.known_flags())
                if close:
                    hints.append(f"{word}: did you mean {close[0]}?")
        return f"{message} ({'; '.join(hints)})" if hints else message

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> argparse.Namespace:  # type: ignore[override]  # typeshed's overloads
        """Report unknown ``--flags`` first: a typo matters more than what it left missing."""
        argv = list(sys.argv[1:] if args is None else args)
        unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in self.known_flags()]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_args(argv, namespace)

    def error(self, message: str) -> NoReturn:
        """Print one line (with a suggestion) and exit with code 2."""
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {self.suggest(message)} (see --help)\n")


def add_dask_arguments(parser: argparse.ArgumentParser, unit: str, shard_size: bool = True) -> None:
    """The flags that run a stage as shards on Dask (``classification.shards``): the same on every entry point
    (``shard_size`` False where the stage has its own unit of work, e.g. embedding's ``--chunk-size``)."""
    group = parser.add_argument_group("Dask (docs/scaling.md)")
    group.add_argument("--dask-workers", type=bounded_int(1, MAX_WORKERS), default=1,
                       help="run as shards on a local Dask cluster of this many worker processes (1: no Dask)")
    group.add_argument("--scheduler", help="run as shards on the existing Dask scheduler at this address (tcp://host:8786)")
    if shard_size:
        group.add_argument("--shard-size", type=bounded_int(), default=DEFAULT_SHARD_SIZE,
                           help=f"{unit} per shard: the most a killed worker loses; keep it when re-running, to reuse finished shards")


def dask_options(args: argparse.Namespace) -> DaskOptions:
    """``DaskOptions`` from the flags of ``add_dask_arguments``."""
    return DaskOptions(workers=args.dask_workers, scheduler=args.scheduler, shard_size=getattr(args, "shard_size", DEFAULT_SHARD_SIZE))


def add_aws_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags for ``s3://`` downloads (credentials come only from the profile or the environment, never a flag)."""
    from classification.data.s3 import ANIML_REGION  # noqa: PLC0415 - boto3 loads only for the commands that download

    group = parser.add_argument_group("S3 (s3:// URLs, Animl exports)")
    group.add_argument("--aws-profile", help="named profile in ~/.aws/config or ~/.aws/credentials (default: AWS_PROFILE, then boto3's chain)")
    group.add_argument("--aws-region", help=f"region of the bucket (default: the profile's, else {ANIML_REGION})")
    group.add_argument("--endpoint-url", help="an S3-compatible server instead of AWS (MinIO, a mirror)")
    group.add_argument("--no-sign-request", action="store_true", help="unsigned requests, for a public bucket")


def aws_options(args: argparse.Namespace) -> AwsOptions:
    """``AwsOptions`` from the flags of ``add_aws_arguments``."""
    from classification.data.s3 import AwsOptions  # noqa: PLC0415 - as above

    return AwsOptions(profile=args.aws_profile, region=args.aws_region, endpoint_url=args.endpoint_url, anonymous=args.no_sign_request)


def add_lila_arguments(parser: argparse.ArgumentParser) -> None:
    """Where LILA's index files come from and are kept, and which cloud's URLs to use: the same on every LILA command."""
    group = parser.add_argument_group("LILA (README: 'Training data from LILA')")
    group.add_argument("--cloud", default="gcp", choices=["gcp", "aws", "azure"], help="which cloud's copy of the images to use")
    group.add_argument("--index-url", help="a folder or URL prefix holding LILA's three index files under their LILA names "
                                           "(a mirror, a local copy, an HPC proxy); default: LILA's own locations")
    group.add_argument("--metadata-dir", type=Path,
                       help="where the index files and the converted table are kept (default: $CLASSIFICATION_LILA_CACHE "
                            "or ~/.cache/camtrap-classification/lila)")
    group.add_argument("--refresh-index", action="store_true", help="fetch the index files again (LILA updates them)")
    group.add_argument("--retries", type=bounded_int(0, 100), default=3, help="retries on network errors, HTTP 5xx and 429")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a server")


def lila_source(args: argparse.Namespace) -> LilaSource:
    """``LilaSource`` from the flags of ``add_lila_arguments``."""
    from classification.data.download import Connection  # noqa: PLC0415 - pyarrow and duckdb load only for LILA commands
    from classification.data.lila.run import LilaSource, default_metadata_dir  # noqa: PLC0415

    return LilaSource(metadata_dir=args.metadata_dir or default_metadata_dir(), index_url=args.index_url, cloud=args.cloud,
                      refresh_index=args.refresh_index, connection=Connection(retries=args.retries, timeout=args.timeout))
