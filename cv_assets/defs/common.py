"""What every asset module shares: one retry policy, termination that is final, the
per-project check decorator and the markdown table helper.

A transient store error (the DuckDB file or the SQLite write lock held past the wait)
is worth a retry, so every writing step carries `STORE_RETRY`. Bad input is never
retried: it raises `Failure(allow_retries=False)` (see `bad_input`). Dagster also answers
the interrupt that terminates a run (past its `dagster/max_runtime` tag, or canceled)
with the step's RetryPolicy: the step would start again in a run already marked failed.
`stop_on_termination` turns that interrupt into a final failure.
"""

import functools
import inspect
import warnings

from dagster import (
    DagsterExecutionInterruptedError,
    Failure,
    PreviewWarning,
    RetryPolicy,
    asset,
    asset_check,
)

from cv_assets.defs.partitions import projects_partitions
from cv_assets.text import markdown_table, printable

STORE_RETRY = RetryPolicy(max_retries=2, delay=1.0)
PREVIEW_ROWS = 20  # rows of a metadata table; the rest are counted

__all__ = ["STORE_RETRY", "PREVIEW_ROWS", "bad_input", "markdown_table", "partitioned_check", "printable", "project_asset",
           "stop_on_termination"]


def bad_input(message: str) -> Failure:
    """A Failure for input the user must fix: retrying cannot help, so it is never retried."""
    return Failure(printable(message), allow_retries=False)


def stop_on_termination(compute_fn):
    """Decorate an asset body (under `@asset`) so that terminating its run ends the step
    for good instead of retrying it."""

    def terminated() -> Failure:
        return Failure(
            f"{compute_fn.__name__}: the run was terminated while this step ran (past its "
            "dagster/max_runtime, or canceled); the step is not retried",
            allow_retries=False,
        )

    if inspect.isgeneratorfunction(compute_fn):  # a multi-asset yielding one result per asset

        @functools.wraps(compute_fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from compute_fn(*args, **kwargs)
            except (DagsterExecutionInterruptedError, KeyboardInterrupt):
                raise terminated() from None

        return generator_wrapper

    @functools.wraps(compute_fn)
    def wrapper(*args, **kwargs):
        try:
            return compute_fn(*args, **kwargs)
        except (DagsterExecutionInterruptedError, KeyboardInterrupt):
            raise terminated() from None

    return wrapper


def partitioned_check(asset_def, description: str, name: str | None = None):
    """An asset check that runs per project partition, so it judges the project just
    materialised. (Partitioned checks are a Dagster preview feature; its warning is
    silenced here only.)"""

    def decorate(fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PreviewWarning)
            return asset_check(
                asset=asset_def, name=name or fn.__name__, partitions_def=projects_partitions, description=description
            )(fn)

    return decorate


def project_asset(*, group_name: str, kinds: set[str], deps=(), **kwargs):
    """`@asset` for one step of a project's chain: partitioned by project, retried on a
    transient store error (`STORE_RETRY`), and final when its run is terminated."""

    def decorate(fn):
        return asset(partitions_def=projects_partitions, group_name=group_name, kinds=kinds, deps=list(deps),
                     retry_policy=STORE_RETRY, **kwargs)(stop_on_termination(fn))

    return decorate
