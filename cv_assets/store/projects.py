"""Project, asset and scene rows in the application database, synced from a manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError

from cv_assets.manifest import ProjectKeyConflict, ProjectManifest
from cv_assets.store.database import AppDatabase
from cv_assets.store.models import Asset, Project, SceneManifest


@dataclass(frozen=True)
class SyncResult:
    project_id: int
    changed: bool
    assets: int
    scenes: int


def upsert_project(db: AppDatabase, manifest: ProjectManifest) -> SyncResult:
    """Insert or update the project, its assets and scenes; rows no longer in the manifest go.

    Embeddings and analysis results of unchanged assets and scenes are kept, so an edit
    to one scene does not throw away the work done on the others.
    """
    with db.write() as session:
        project = session.scalar(select(Project).where(Project.key == manifest.key))
        _check_owner(project, manifest)
        changed = project is None or project.manifest_hash != manifest.content_hash
        if not changed:
            # The hash covers the manifest bytes and every resolved file it names, so the
            # rows synced from it are already these (a sensor tick re-syncs every project).
            return SyncResult(project.id, False, len(manifest.spec.assets), len(manifest.spec.scenes))
        if project is None:
            project = Project(key=manifest.key, name=manifest.name, root_path=str(manifest.root))
            session.add(project)
            session.flush()
        project.name, project.root_path, project.manifest_hash = manifest.name, str(manifest.root), manifest.content_hash
        _sync_assets(session, project, manifest)
        _sync_scenes(session, project, manifest)
        return SyncResult(project.id, changed, len(manifest.spec.assets), len(manifest.spec.scenes))


def _check_owner(project: Project | None, manifest: ProjectManifest) -> None:
    """A key belongs to the folder that registered it first: another folder declaring it
    (a second projects_root, a copied or moved folder) must never overwrite its rows."""
    if project is not None and project.root_path != str(manifest.root):
        raise ProjectKeyConflict(
            f"{manifest.root}/project.yaml: project key {manifest.key!r} is registered to the folder "
            f"{project.root_path}, not {manifest.root}; its rows are left untouched. Give this project "
            f"another key (and folder name), move it back to {project.root_path}, or, if the project "
            f"moved here, run `cv-assets projects reassign {manifest.key}`"
        )


def reassign_project(db: AppDatabase, key: str, root: Path) -> str | None:
    """Record `root` as the folder owning `key` (a project folder that moved); returns the
    previous folder, or None when the key is not registered. Rows are kept."""
    with db.write() as session:
        project = session.scalar(select(Project).where(Project.key == key))
        if project is None:
            return None
        previous, project.root_path = project.root_path, str(Path(root).resolve())
        return previous


def check_owners(db: AppDatabase, manifests: list[ProjectManifest]) -> tuple[list[ProjectManifest], dict[str, str]]:
    """Split `manifests` into those whose key is free or registered to their own folder, and
    (per key) why the others conflict. Reads only; `upsert_project` checks again in its write."""
    owners = registered_folders(db)
    good, bad = [], {}
    for manifest in manifests:
        try:
            _check_owner(_Owner(owners[manifest.key]) if manifest.key in owners else None, manifest)
            good.append(manifest)
        except ProjectKeyConflict as exc:
            bad[manifest.key] = str(exc)
    return good, bad


@dataclass(frozen=True)
class _Owner:
    root_path: str


def registered_folders(db: AppDatabase) -> dict[str, str]:
    """{project key: folder that registered it}; empty for a database not yet migrated."""
    try:
        with db.read() as session:
            return dict(session.execute(select(Project.key, Project.root_path)).tuples().all())
    except OperationalError as exc:
        if "no such table" in str(exc):
            return {}
        raise db.unavailable("cannot read", exc) from None


def _sync_assets(session, project: Project, manifest: ProjectManifest) -> None:
    existing = {a.code: a for a in session.scalars(select(Asset).where(Asset.project_id == project.id))}
    for spec in manifest.spec.assets:
        asset = existing.pop(spec.code, None) or Asset(project_id=project.id, code=spec.code)
        ref = str(manifest.reference_path(spec))
        if asset.reference_image_path != ref:
            asset.reference_image_hash = None  # a new image must be re-embedded
        asset.kind, asset.name, asset.reference_image_path = spec.kind, spec.name, ref
        session.add(asset)
    for gone in existing.values():
        session.delete(gone)


def _sync_scenes(session, project: Project, manifest: ProjectManifest) -> None:
    existing = {s.scene_index: s for s in session.scalars(select(SceneManifest).where(SceneManifest.project_id == project.id))}
    for spec in manifest.spec.scenes:
        scene = existing.pop(spec.index, None) or SceneManifest(project_id=project.id, scene_index=spec.index)
        scene.clip_path = str(manifest.clip_path(spec))
        scene.expected_asset_codes = json.dumps(spec.expected_assets)
        session.add(scene)
    if existing:
        session.execute(delete(SceneManifest).where(SceneManifest.id.in_([s.id for s in existing.values()])))


@dataclass(frozen=True)
class ProjectRows:
    """What the analysis of one project needs from the application database."""

    project_id: int
    key: str
    name: str
    root_path: str
    scenes: list[SceneManifest]
    assets: list[Asset]

    def expected_codes(self, scene_index: int) -> list[str]:
        for scene in self.scenes:
            if scene.scene_index == scene_index:
                return json.loads(scene.expected_asset_codes)
        return []


def load_project(db: AppDatabase, key: str) -> ProjectRows | None:
    with db.read() as session:
        project = session.scalar(select(Project).where(Project.key == key))
        if project is None:
            return None
        scenes = list(session.scalars(select(SceneManifest).where(SceneManifest.project_id == project.id).order_by(SceneManifest.scene_index)))
        assets = list(session.scalars(select(Asset).where(Asset.project_id == project.id).order_by(Asset.code)))
        return ProjectRows(project.id, project.key, project.name, project.root_path, scenes, assets)


def asset_vector(asset: Asset) -> np.ndarray | None:
    if asset.clip_embedding is None:
        return None
    return np.frombuffer(asset.clip_embedding, dtype=np.float32)
