"""The one writer of `embedding_failures`: why an item (event, reference asset, frame)
could not be embedded for a model version, and how many times it was tried."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from cv_assets.store.models import EmbeddingFailure, utcnow

FAILURES = EmbeddingFailure.__table__
# Chunks keep each statement under SQLite's bound-parameter limit on large batches.
CHUNK = 500


def chunks(items: Sequence, size: int = CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def record_failures(session: Session, kind: str, model_version: str, failures: Mapping[str, str]) -> dict[str, int]:
    """Count one more attempt per failed item (read-then-write: call inside `db.write()`).
    Returns the attempts now recorded for each item."""
    if not failures:
        return {}
    known: dict[str, int] = {}
    for chunk in chunks(list(failures)):
        rows = session.execute(
            select(FAILURES.c.item_id, FAILURES.c.attempts).where(
                FAILURES.c.item_kind == kind, FAILURES.c.model_version == model_version, FAILURES.c.item_id.in_(chunk)))
        known.update({item_id: attempts for item_id, attempts in rows})
    now = utcnow()
    attempts: dict[str, int] = {}
    new_rows = []
    for item_id, reason in failures.items():
        if item_id in known:
            attempts[item_id] = known[item_id] + 1
            session.execute(
                update(FAILURES)
                .where(FAILURES.c.item_kind == kind, FAILURES.c.model_version == model_version,
                       FAILURES.c.item_id == item_id)
                .values(attempts=attempts[item_id], reason=reason, last_failed_at=now))
        else:
            attempts[item_id] = 1
            new_rows.append({"item_kind": kind, "item_id": item_id, "model_version": model_version, "reason": reason,
                             "attempts": 1, "first_failed_at": now, "last_failed_at": now})
    if new_rows:
        session.execute(insert(FAILURES), new_rows)
    return attempts


def clear_failures(session: Session, kind: str, model_version: str, item_ids: Sequence[str]) -> None:
    """Forget the failures of items that have now embedded."""
    for chunk in chunks(list(item_ids)):
        session.execute(delete(FAILURES).where(
            FAILURES.c.item_kind == kind, FAILURES.c.model_version == model_version, FAILURES.c.item_id.in_(chunk)))
