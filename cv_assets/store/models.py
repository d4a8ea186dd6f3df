"""SQLAlchemy 2 ORM models of the application database (SQLite).

The schema itself is owned by the Alembic migrations in `store/migrations/`;
these classes mirror the head revision.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

APPEARANCE_SOURCES = ("yolo", "face_match", "clip_match")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    root_path: Mapped[str] = mapped_column(Text)
    manifest_hash: Mapped[str | None] = mapped_column(String(64))
    ground_truth_path: Mapped[str | None] = mapped_column(Text)
    # What the last finished run processed: the project sensor skips a project whose current
    # manifest hash and embedder fingerprint match (whoever ran it).
    processed_manifest_hash: Mapped[str | None] = mapped_column(String(64))
    processed_embedder: Mapped[str | None] = mapped_column(String(64))
    processed_run_id: Mapped[str | None] = mapped_column(String(64))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    assets: Mapped[list["Asset"]] = relationship(back_populates="project", cascade="all, delete-orphan")
    scenes: Mapped[list["SceneManifest"]] = relationship(back_populates="project", cascade="all, delete-orphan")


class Asset(Base):
    """A reference character, prop or location of a project (CHAR_01, PROP_02, ...)."""

    __tablename__ = "assets"
    __table_args__ = (UniqueConstraint("project_id", "code"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    code: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(256))
    reference_image_path: Mapped[str] = mapped_column(Text)
    reference_image_hash: Mapped[str | None] = mapped_column(String(64))
    clip_embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    embedding_model_version: Mapped[str | None] = mapped_column(String(256))
    face_embedding: Mapped[bytes | None] = mapped_column(LargeBinary)

    project: Mapped[Project] = relationship(back_populates="assets")


class SceneManifest(Base):
    __tablename__ = "scene_manifests"
    __table_args__ = (UniqueConstraint("project_id", "scene_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    scene_index: Mapped[int] = mapped_column(Integer)
    clip_path: Mapped[str] = mapped_column(Text)
    expected_asset_codes: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of codes
    declared_cuts: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of seconds
    continues_previous: Mapped[bool] = mapped_column(Boolean, default=True)
    cv_analysis_json: Mapped[str | None] = mapped_column(Text)
    continuity_score: Mapped[float | None] = mapped_column(Float)

    project: Mapped[Project] = relationship(back_populates="scenes")


class AssetAppearance(Base):
    """Where a reference asset shows up: scene, frame, time, box, confidence, source."""

    __tablename__ = "asset_appearances"
    __table_args__ = (CheckConstraint(f"source IN {APPEARANCE_SOURCES}", name="ck_appearance_source"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    scene_index: Mapped[int] = mapped_column(Integer)
    frame_index: Mapped[int] = mapped_column(Integer)
    timestamp_sec: Mapped[float] = mapped_column(Float)
    bbox: Mapped[str] = mapped_column(Text)  # JSON [x1, y1, x2, y2] in frame pixels
    confidence: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Event(Base):
    """A home-security event; the thumbnail is base64 text or a path under thumbnails_root."""

    __tablename__ = "events"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    camera_id: Mapped[str] = mapped_column(String(128), index=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    label: Mapped[str | None] = mapped_column(String(128))
    thumbnail_base64: Mapped[str | None] = mapped_column(Text)
    thumbnail_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EventEmbedding(Base):
    __tablename__ = "event_embeddings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), unique=True)
    embedding: Mapped[str] = mapped_column(Text)  # JSON float array
    model_version: Mapped[str] = mapped_column(String(256), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EmbeddingFailure(Base):
    """Why an item could not be embedded, and how often it was tried."""

    __tablename__ = "embedding_failures"
    __table_args__ = (UniqueConstraint("item_kind", "item_id", "model_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_kind: Mapped[str] = mapped_column(String(32))  # event | asset | frame
    item_id: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    first_failed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_failed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RecognizedEntity(Base):
    """A recurring visitor: a group of similar events."""

    __tablename__ = "recognized_entities"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(256), index=True)
    centroid: Mapped[str] = mapped_column(Text)  # JSON float array, unit norm
    event_count: Mapped[int] = mapped_column(Integer, default=0)
    first_seen: Mapped[datetime | None] = mapped_column(DateTime)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime)
    cameras: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class EmbedderVersion(Base):
    """The model_version an embedder configuration produces (recorded by its last run), keyed by its
    fingerprint (`cv_assets.events.backfill.embedder_fingerprint`): lets the schedule count
    what is left for the configured model without loading it."""

    __tablename__ = "embedder_versions"
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(256))
    recorded_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class EntityEvent(Base):
    __tablename__ = "entity_events"
    entity_id: Mapped[int] = mapped_column(ForeignKey("recognized_entities.id", ondelete="CASCADE"), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), primary_key=True, unique=True)
    similarity: Mapped[float] = mapped_column(Float)
