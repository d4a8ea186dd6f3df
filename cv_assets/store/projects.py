"""Project, asset and scene rows in the application database, synced from a manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.exc import OperationalError

from cv_assets.manifest import ProjectKeyConflict, ProjectManifest
from cv_assets.store.database import AppDatabase
from cv_assets.store.models import Asset, AssetAppearance, Project, SceneManifest, utcnow


@dataclass(frozen=True)
class SyncResult:
    project_id: int
    changed: bool
    assets: int
    scenes: int


# (database, key, folder, content hash) this process has synced and committed.
_SYNCED_HERE: set[tuple[str, str, str, str]] = set()


def upsert_project(db: AppDatabase, manifest: ProjectManifest) -> SyncResult:
    """Insert or update the project, its assets and scenes; rows no longer in the manifest go.

    Embeddings and analysis results of unchanged assets and scenes are kept, so an edit
    to one scene does not throw away the work done on the others.
    """
    synced_key = (db.url, manifest.key, str(manifest.root), manifest.content_hash)
    with db.write() as session:
        project = session.scalar(select(Project).where(Project.key == manifest.key))
        _check_owner(project, manifest)
        changed = project is None or project.manifest_hash != manifest.content_hash
        if not changed and synced_key in _SYNCED_HERE:
            # The hash covers the manifest bytes and every resolved file it names, and this
            # process already wrote the rows for it: a sensor tick over unchanged projects
            # skips the sync. (Each process syncs once, so new code always re-derives rows.)
            return SyncResult(project.id, False, len(manifest.spec.assets), len(manifest.spec.scenes))
        if project is None:
            project = Project(key=manifest.key, name=manifest.name, root_path=str(manifest.root))
            session.add(project)
            session.flush()
        project.name, project.root_path, project.manifest_hash = manifest.name, str(manifest.root), manifest.content_hash
        project.ground_truth_path = str(manifest.ground_truth_path) if manifest.ground_truth_path else None
        _sync_assets(session, project, manifest)
        _sync_scenes(session, project, manifest)
        result = SyncResult(project.id, changed, len(manifest.spec.assets), len(manifest.spec.scenes))
    _SYNCED_HERE.add(synced_key)  # committed
    return result


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
        scene.declared_cuts = json.dumps(spec.cuts)
        scene.continues_previous = spec.continues_previous
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
    ground_truth_path: str | None = None

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
        return ProjectRows(project.id, project.key, project.name, project.root_path, scenes, assets,
                           project.ground_truth_path)


def asset_vector(asset: Asset) -> np.ndarray | None:
    if asset.clip_embedding is None:
        return None
    return np.frombuffer(asset.clip_embedding, dtype=np.float32)


def project_outcome(db: AppDatabase, key: str) -> dict:
    """What a finished run left for a project, for summaries: the appearance count and per
    scene its score (None when its clip failed), review flag, clip status and first concern."""
    with db.read() as session:
        project = session.scalar(select(Project).where(Project.key == key))
        appearances = session.scalar(select(func.count()).select_from(AssetAppearance)
                                     .where(AssetAppearance.project_id == project.id))
        rows = session.execute(select(SceneManifest.scene_index, SceneManifest.continuity_score,
                                      SceneManifest.cv_analysis_json)
                               .where(SceneManifest.project_id == project.id).order_by(SceneManifest.scene_index)).all()
    scenes = []
    for index, score, details in rows:
        details = json.loads(details) if details else {}
        concerns = [r for r in details.get("reasons", []) if r.startswith(("clip ", "needs_review"))]
        scenes.append({"scene": index, "score": score, "needs_review": bool(details.get("needs_review")),
                       "clip_status": details.get("clip_status", "ok"), "concern": concerns[0] if concerns else None})
    return {"appearances": appearances, "scenes": scenes}


@dataclass(frozen=True)
class Processed:
    """What a project's last finished run processed."""

    manifest_hash: str | None
    embedder: str | None
    run_id: str | None


def record_processed(db: AppDatabase, key: str, embedder: str, run_id: str) -> str | None:
    """Record that `run_id` finished the project's chain for its current manifest hash and
    the embedder fingerprint `embedder`. A run over the same hash and embedder as the one
    recorded keeps the earlier run id (the run since which nothing changed), which is returned."""
    with db.write() as session:
        project = session.scalar(select(Project).where(Project.key == key))
        if project is None:
            return None
        same = (project.processed_manifest_hash, project.processed_embedder) == (project.manifest_hash, embedder)
        if not (same and project.processed_run_id):
            project.processed_manifest_hash, project.processed_embedder = project.manifest_hash, embedder
            project.processed_run_id = run_id
            project.processed_at = utcnow()
        return project.processed_run_id


def processed_projects(db: AppDatabase) -> dict[str, Processed]:
    """{project key: what its last finished run processed}; empty for a database not yet migrated."""
    try:
        with db.read() as session:
            rows = session.execute(select(Project.key, Project.processed_manifest_hash, Project.processed_embedder,
                                          Project.processed_run_id)).all()
    except OperationalError as exc:
        if "no such table" in str(exc):
            return {}
        raise db.unavailable("cannot read", exc) from None
    return {key: Processed(h, e, r) for key, h, e, r in rows}
