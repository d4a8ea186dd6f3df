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
import time
import warnings

from dagster import (
    DagsterExecutionInterruptedError,
    Failure,
    MaterializeResult,
    MetadataValue,
    PreviewWarning,
    RetryPolicy,
    asset,
    asset_check,
)

from cv_assets.defs.partitions import projects_partitions
from cv_assets.text import markdown_table, printable

STORE_RETRY = RetryPolicy(max_retries=2, delay=1.0)
PREVIEW_ROWS = 20  # rows of a metadata table; the rest are counted

__all__ = ["EMBEDDER_TAG", "STORE_RETRY", "PREVIEW_ROWS", "bad_input", "embedder_label", "note_embedder", "markdown_table", "partitioned_check", "printable", "project_asset",
           "stop_on_termination", "timed"]


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


def timed(compute_fn):
    """Decorate an asset body so every MaterializeResult it returns or yields carries
    `step_seconds`: the wall time of the step up to that result (the UI plots it over runs)."""

    def with_time(result, started: float):
        if isinstance(result, MaterializeResult) and "step_seconds" not in (result.metadata or {}):
            seconds = MetadataValue.float(round(time.perf_counter() - started, 2))
            return result._replace(metadata={**(result.metadata or {}), "step_seconds": seconds})
        return result

    if inspect.isgeneratorfunction(compute_fn):

        @functools.wraps(compute_fn)
        def generator_wrapper(*args, **kwargs):
            started = time.perf_counter()
            for result in compute_fn(*args, **kwargs):
                yield with_time(result, started)

        return generator_wrapper

    @functools.wraps(compute_fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        return with_time(compute_fn(*args, **kwargs), started)

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
                     retry_policy=STORE_RETRY, **kwargs)(timed(stop_on_termination(fn)))

    return decorate


EMBEDDER_TAG = "cv_assets/embedder"  # run tag: the model_version of the vectors the run used
FALLBACK_WARNING = (
    "CLIP is unavailable, so embedder.fallback=color_histogram is in use: vectors are colour histograms "
    "(model_version {version}), not CLIP; similarity and appearances use the histogram's own thresholds and "
    "text search is off. Supply CLIP weights (embedder.model: a local directory) to use CLIP."
)


def _is_fallback(model_version: str) -> bool:
    from cv_assets.embedding.histogram import MODEL_VERSION as HISTOGRAM_VERSION

    return model_version == HISTOGRAM_VERSION


def embedder_label(model_version: str) -> str:
    """What made the vectors, for metadata: says plainly when it is the histogram fallback, not CLIP."""
    return f"colour-histogram fallback, not CLIP ({model_version})" if _is_fallback(model_version) else model_version


def note_embedder(context, model_version: str) -> None:
    """Name the embedder in the run's tags (`cv_assets/embedder`) and, the first time in a
    run that the colour-histogram fallback stands in for CLIP, warn in the run's event log
    (the factory's warning reaches only the process's stderr)."""
    run = context.instance.get_run_by_id(context.run_id)
    if run is not None and run.tags.get(EMBEDDER_TAG) == model_version:
        return  # an earlier step of this run named it (and warned)
    context.instance.add_run_tags(context.run_id, {EMBEDDER_TAG: model_version})
    if _is_fallback(model_version):
        context.log.warning(FALLBACK_WARNING.format(version=model_version))
