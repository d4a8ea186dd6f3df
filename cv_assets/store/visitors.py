"""Every SQL statement on recurring visitors: `recognized_entities` and `entity_events`.
The grouping itself lives in `cv_assets/events/visitors.py`."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from cv_assets.store.models import EntityEvent, RecognizedEntity

ENTITIES = RecognizedEntity.__table__
MEMBERS = EntityEvent.__table__


def state_fingerprint(session: Session) -> tuple:
    """Changes whenever any run writes entities or memberships (optimistic concurrency)."""
    entities = session.execute(
        select(func.count(), func.max(ENTITIES.c.updated_at), func.coalesce(func.sum(ENTITIES.c.event_count), 0))
    ).one()
    members = session.execute(select(func.count()).select_from(MEMBERS)).scalar_one()
    return (*entities, members)


def memberships(session: Session, model_version: str) -> list[tuple[int, str]]:
    """(entity_id, event_id) of every member of this version's entities."""
    return [tuple(row) for row in session.execute(
        select(MEMBERS.c.entity_id, MEMBERS.c.event_id)
        .join(ENTITIES, ENTITIES.c.id == MEMBERS.c.entity_id)
        .where(ENTITIES.c.model_version == model_version)
    )]


def entity_event_counts(session: Session, model_version: str) -> dict[int, int]:
    return dict(session.execute(
        select(ENTITIES.c.id, ENTITIES.c.event_count).where(ENTITIES.c.model_version == model_version)
    ).all())


def count_entities(session: Session, model_version: str) -> int:
    return session.execute(
        select(func.count()).select_from(ENTITIES).where(ENTITIES.c.model_version == model_version)
    ).scalar_one()


def delete_entities(session: Session, *, other_than_version: str | None = None, version: str | None = None,
                    entity_id: int | None = None) -> None:
    """Delete entities of every version but one, of one version, or one entity (members go with them)."""
    if other_than_version is not None:
        session.execute(delete(ENTITIES).where(ENTITIES.c.model_version != other_than_version))
    if version is not None:
        session.execute(delete(ENTITIES).where(ENTITIES.c.model_version == version))
    if entity_id is not None:
        session.execute(delete(ENTITIES).where(ENTITIES.c.id == entity_id))


def save_entity(session: Session, entity_id: int | None, model_version: str, values: dict,
                members: Sequence[tuple[str, float]]) -> int:
    """Insert (entity_id None) or update one entity and replace its members
    ((event_id, similarity) pairs); returns the entity id."""
    if entity_id is None:
        entity_id = session.execute(
            insert(ENTITIES).values(model_version=model_version, created_at=values["updated_at"], **values)
            .returning(ENTITIES.c.id)
        ).scalar_one()
    else:
        session.execute(update(ENTITIES).where(ENTITIES.c.id == entity_id).values(**values))
    session.execute(delete(MEMBERS).where(MEMBERS.c.entity_id == entity_id))
    session.execute(insert(MEMBERS), [{"entity_id": entity_id, "event_id": event_id, "similarity": similarity}
                                      for event_id, similarity in members])
    return entity_id


def recurring_entities(session: Session, model_version: str, min_events: int, limit: int | None) -> list[Row]:
    """(id, event_count, first_seen, last_seen, cameras) of entities seen at least
    `min_events` times, most frequent first."""
    query = (
        select(ENTITIES.c.id, ENTITIES.c.event_count, ENTITIES.c.first_seen, ENTITIES.c.last_seen, ENTITIES.c.cameras)
        .where(ENTITIES.c.model_version == model_version, ENTITIES.c.event_count >= min_events)
        .order_by(ENTITIES.c.event_count.desc(), ENTITIES.c.last_seen.desc(), ENTITIES.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    return session.execute(query).all()


def entity_members(session: Session, entity_ids: Sequence[int]) -> dict[int, list[str]]:
    """Event ids of each entity, sorted."""
    members: dict[int, list[str]] = {entity_id: [] for entity_id in entity_ids}
    if entity_ids:
        for entity_id, event_id in session.execute(
            select(MEMBERS.c.entity_id, MEMBERS.c.event_id)
            .where(MEMBERS.c.entity_id.in_(list(entity_ids)))
            .order_by(MEMBERS.c.event_id)
        ):
            members[entity_id].append(event_id)
    return members
