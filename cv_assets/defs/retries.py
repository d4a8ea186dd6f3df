"""Retries of steps that write the stores, and the one case they must not cover.

A transient store error (the DuckDB file or the SQLite write lock held past the wait)
is worth a retry, so those steps carry `STORE_RETRY`. But Dagster also answers the
interrupt that terminates a run (for instance past its `dagster/max_runtime` tag) with
the step's RetryPolicy: the step starts again and the run goes on although it was marked
failed. `stop_on_termination` turns that interrupt into a final failure.
"""

import functools

from dagster import Failure, RetryPolicy
from dagster._core.errors import DagsterExecutionInterruptedError

STORE_RETRY = RetryPolicy(max_retries=2, delay=1.0)


def stop_on_termination(compute_fn):
    """Decorate an asset body (under `@asset`) so that terminating its run ends the step
    for good instead of retrying it."""

    @functools.wraps(compute_fn)
    def wrapper(*args, **kwargs):
        try:
            return compute_fn(*args, **kwargs)
        except (DagsterExecutionInterruptedError, KeyboardInterrupt):
            raise Failure(
                f"{compute_fn.__name__}: the run was terminated while this step ran (past its "
                "dagster/max_runtime, or canceled); the step is not retried",
                allow_retries=False,
            ) from None

    return wrapper
