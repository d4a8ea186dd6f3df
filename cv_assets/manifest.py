"""Project manifests: `<projects_root>/<key>/project.yaml`, parsed and validated.

Format (paths relative to the project folder):

    project: demo                     # partition key: lower-case letters, digits, _ and -
    name: Demo project
    assets:
      - {code: CHAR_01, kind: character, name: Red runner, reference_image: refs/CHAR_01.png}
    scenes:
      - {index: 0, clip: clips/scene_00.mp4, expected_assets: [CHAR_01]}

Validation reports every bad field at once, each named by its path in the file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_NAME = "project.yaml"
PROJECT_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ASSET_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReferenceAssetSpec(_Strict):
    code: str
    kind: Literal["character", "prop", "location"]
    name: str = Field(min_length=1)
    reference_image: str

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        if not ASSET_CODE.match(value):
            raise ValueError("must look like CHAR_01 (upper-case letters, digits, _)")
        return value


class SceneSpec(_Strict):
    index: int = Field(ge=0)
    clip: str
    expected_assets: list[str] = []


class ManifestSpec(_Strict):
    project: str
    name: str | None = None
    assets: list[ReferenceAssetSpec] = []
    scenes: list[SceneSpec] = Field(min_length=1)

    @field_validator("project")
    @classmethod
    def _key(cls, value: str) -> str:
        if not PROJECT_KEY.match(value):
            raise ValueError("must be lower-case letters, digits, '_' or '-' (max 64)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ManifestSpec":
        codes = [a.code for a in self.assets]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(f"assets: duplicate codes {dupes}")
        indices = [s.index for s in self.scenes]
        if len(set(indices)) != len(indices):
            raise ValueError("scenes: duplicate scene index")
        for scene in self.scenes:
            unknown = sorted(set(scene.expected_assets) - set(codes))
            if unknown:
                raise ValueError(f"scenes[index={scene.index}].expected_assets: unknown asset codes {unknown}")
        return self


@dataclass(frozen=True)
class ProjectManifest:
    """A validated manifest with absolute paths and a content hash."""

    key: str
    name: str
    root: Path
    spec: ManifestSpec
    content_hash: str

    def clip_path(self, scene: SceneSpec) -> Path:
        return _inside(self.root, scene.clip)

    def reference_path(self, asset: ReferenceAssetSpec) -> Path:
        return _inside(self.root, asset.reference_image)


def load_manifest(project_dir: Path) -> ProjectManifest:
    """Parse and validate `project_dir/project.yaml`; raise ManifestError naming each bad field."""
    path = Path(project_dir) / MANIFEST_NAME
    try:
        raw_bytes = path.read_bytes()
        data = yaml.safe_load(raw_bytes)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no {MANIFEST_NAME} in this project folder") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping with project, assets and scenes")
    try:
        spec = ManifestSpec.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{path}: " + "; ".join(_field_errors(exc))) from None
    root = Path(project_dir).resolve()
    problems = _missing_files(root, spec)
    if problems:
        raise ManifestError(f"{path}: " + "; ".join(problems))
    manifest = ProjectManifest(spec.project, spec.name or spec.project, root, spec, "")
    return ProjectManifest(manifest.key, manifest.name, root, spec, _content_hash(raw_bytes, manifest))


def discover_manifests(projects_root: Path) -> tuple[list[ProjectManifest], dict[str, str]]:
    """Every project folder under `projects_root`: the valid manifests and, per bad folder, why."""
    good: list[ProjectManifest] = []
    bad: dict[str, str] = {}
    if not Path(projects_root).is_dir():
        return good, bad
    seen: dict[str, Path] = {}
    for folder in sorted(p for p in Path(projects_root).iterdir() if (p / MANIFEST_NAME).is_file()):
        try:
            manifest = load_manifest(folder)
        except ManifestError as exc:
            bad[folder.name] = str(exc)
            continue
        if manifest.key in seen:
            bad[folder.name] = f"{folder / MANIFEST_NAME}: project key {manifest.key!r} already used by {seen[manifest.key]}"
            continue
        seen[manifest.key] = folder
        good.append(manifest)
    return good, bad


def _field_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{loc or 'manifest'}: {'unknown field' if err['type'] == 'extra_forbidden' else msg}")
    return out


def _inside(root: Path, relative: str) -> Path:
    return (root / relative).resolve()


def _missing_files(root: Path, spec: ManifestSpec) -> list[str]:
    problems = []
    for i, asset in enumerate(spec.assets):
        ref = _inside(root, asset.reference_image)
        if not ref.is_relative_to(root):
            problems.append(f"assets[{i}].reference_image: {asset.reference_image} resolves outside the project folder")
        elif not ref.is_file():
            problems.append(f"assets[{i}].reference_image: file not found: {asset.reference_image}")
    # Clips are checked by the video sampler (which records per-scene failures) so one
    # bad clip never stops the other scenes; only a missing file is worth flagging here.
    return problems


def _content_hash(manifest_bytes: bytes, manifest: ProjectManifest) -> str:
    """Manifest bytes plus size and mtime of every referenced file: an edited clip or image
    changes the hash (and so launches a run) without hashing gigabytes on every sensor tick."""
    digest = hashlib.sha256(manifest_bytes)
    paths = [manifest.clip_path(s) for s in manifest.spec.scenes] + [
        manifest.reference_path(a) for a in manifest.spec.assets
    ]
    for path in paths:
        try:
            st = path.stat()
            digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"{path}:missing".encode())
    return digest.hexdigest()[:16]
