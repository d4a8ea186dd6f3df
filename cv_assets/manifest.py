"""Project manifests: `<projects_root>/<key>/project.yaml`, parsed and validated.

Format (paths relative to the project folder):

    project: demo                     # partition key: lower-case letters, digits, _ and -
    name: Demo project
    assets:
      - {code: CHAR_01, kind: character, name: Red runner, reference_image: refs/CHAR_01.png}
    scenes:
      - {index: 0, clip: clips/scene_00.mp4, expected_assets: [CHAR_01]}

Validation reports every bad field at once, each named by its path in the file.

A project's key is its folder name: `project:` must equal it. The key then belongs to the
folder that registered it first (recorded in SQLite, see `store.projects`): another folder
declaring it is invalid and never touches the registered project's rows.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cv_assets.analysis.ground_truth import GroundTruthError, validate_ground_truth
from cv_assets.text import printable

MANIFEST_NAME = "project.yaml"
PROJECT_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ASSET_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


# libyaml's parser when available: several times faster on a large manifest.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and every bad field.
    Control characters from folder names, keys or values are escaped in the message."""

    def __init__(self, message: str):
        super().__init__(printable(message).replace("\n", "\\n").replace("\t", "\\t"))


class ProjectKeyConflict(ManifestError):
    """A folder declares a project key that another folder registered first."""


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
    # Hard cuts the clip is meant to have (seconds from its start): continuity ignores them.
    cuts: list[Annotated[float, Field(ge=0.0)]] = []
    # False for a deliberate change of place or time: the boundary with the previous scene
    # is then not scored.
    continues_previous: bool = True


class ManifestSpec(_Strict):
    project: str
    name: str | None = None
    # A ground truth file (see cv_assets/analysis/ground_truth.py) to measure quality against.
    ground_truth: str | None = None
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
    # Resolved parent folders, so 10,000 clips in a few folders resolve their folder once.
    _folders: dict = field(default_factory=dict, compare=False, repr=False)

    def clip_path(self, scene: SceneSpec) -> Path:
        return _inside(self.root, scene.clip, self._folders)

    def reference_path(self, asset: ReferenceAssetSpec) -> Path:
        return _inside(self.root, asset.reference_image, self._folders)

    @property
    def ground_truth_path(self) -> Path | None:
        return None if self.spec.ground_truth is None else _inside(self.root, self.spec.ground_truth, self._folders)


@dataclass(frozen=True)
class ManifestLimits:
    """Caps checked before a manifest is parsed. The functions below take this or any object
    with the same two attributes (the `manifests` section of the settings)."""

    max_bytes: int = 1024 * 1024
    max_scenes: int = 10_000


def load_manifest(project_dir: Path, limits: ManifestLimits | None = None) -> ProjectManifest:
    """Parse and validate `project_dir/project.yaml`; raise ManifestError naming each bad field.

    The project key must equal the folder name (one folder, one key), the file must be a
    regular file inside the folder, and it must fit `limits` (size read from stat, then
    read with a cap; the scene count checked before the schema is validated)."""
    limits = limits or ManifestLimits()
    path = Path(project_dir) / MANIFEST_NAME
    raw_bytes = _read_capped(path, Path(project_dir), limits)
    spec = _validated_spec(path, raw_bytes, limits)
    folder_name = Path(project_dir).name
    if spec.project != folder_name:
        raise ManifestError(
            f"{path}: project key {spec.project!r} differs from its folder name {folder_name!r}; "
            f"a project's key is its folder name (rename the folder or set `project: {folder_name}`)"
        )
    root = Path(project_dir).resolve()
    problems = _missing_files(root, spec)
    if problems:
        raise ManifestError(f"{path}: " + "; ".join(problems))
    manifest = ProjectManifest(spec.project, spec.name or spec.project, root, spec, "")
    return ProjectManifest(manifest.key, manifest.name, root, spec, _content_hash(raw_bytes, manifest), manifest._folders)


def discover_manifests(
    projects_root: Path, limits: ManifestLimits | None = None
) -> tuple[list[ProjectManifest], dict[str, str]]:
    """Every project folder under `projects_root` (a folder holding a `project.yaml` entry of
    any kind): the valid manifests and, per bad folder, why. Each folder is loaded on its
    own, within `limits`, so one bad or large project never holds up the others."""
    good: list[ProjectManifest] = []
    bad: dict[str, str] = {}
    if not Path(projects_root).is_dir():
        return good, bad
    for folder in sorted(p for p in Path(projects_root).iterdir() if _has_manifest_entry(p)):
        try:
            good.append(load_manifest(folder, limits))
        except ManifestError as exc:
            bad[printable(folder.name)] = str(exc)
    return good, bad


# Parsed specs by (path, sha256 of the bytes, caps): a sensor tick re-reads every manifest,
# and parsing (YAML, then the schema) is nearly all of the cost of a large one. A pure
# optimisation: the spec is a function of the key, so a hit and a miss give the same result.
# Bounded by the manifest bytes it stands for.
_SPEC_CACHE: OrderedDict[tuple, tuple[ManifestSpec | None, str | None, int]] = OrderedDict()
_SPEC_CACHE_MAX_BYTES = 4 * 1024 * 1024


def clear_cache() -> None:
    """Forget parsed manifests (benchmarks measure a cold parse with it)."""
    _SPEC_CACHE.clear()


def _validated_spec(path: Path, raw_bytes: bytes, limits) -> ManifestSpec:
    key = (str(path), hashlib.sha256(raw_bytes).digest(), limits.max_bytes, limits.max_scenes)
    if key in _SPEC_CACHE:
        _SPEC_CACHE.move_to_end(key)
        spec, error, _ = _SPEC_CACHE[key]
    else:
        try:
            spec, error = ManifestSpec.model_validate(_parse_yaml(path, raw_bytes, limits)), None
        except ValidationError as exc:
            spec, error = None, f"{path}: " + "; ".join(_field_errors(exc))
        except ManifestError as exc:
            spec, error = None, str(exc)
        _remember(key, spec, error, len(raw_bytes))
    if error is not None:
        raise ManifestError(error)
    return spec  # shared between hits: nothing mutates a validated spec


def _remember(key: tuple, spec: ManifestSpec | None, error: str | None, size: int) -> None:
    _SPEC_CACHE[key] = (spec, error, size)
    while sum(entry[2] for entry in _SPEC_CACHE.values()) > _SPEC_CACHE_MAX_BYTES and len(_SPEC_CACHE) > 1:
        _SPEC_CACHE.popitem(last=False)


def _has_manifest_entry(folder: Path) -> bool:
    try:
        return folder.is_dir() and os.path.lexists(folder / MANIFEST_NAME)
    except OSError:
        return False


def _read_capped(path: Path, project_dir: Path, limits: ManifestLimits) -> bytes:
    """The manifest's bytes: a regular file inside its folder, at most `limits.max_bytes`.
    Never opens a FIFO or device (that could block) and never reads a file outside the
    folder (its contents must not reach an error message)."""
    try:
        resolved = path.resolve()
        info = os.stat(resolved)
    except FileNotFoundError:
        detail = " (a symlink whose target does not exist)" if path.is_symlink() else ""
        raise ManifestError(f"{path}: no {MANIFEST_NAME} in this project folder{detail}") from None
    except (OSError, RuntimeError) as exc:
        raise ManifestError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if not resolved.is_relative_to(Path(project_dir).resolve()):
        raise ManifestError(f"{path}: is a symlink to {resolved}, outside the project folder; refused unread")
    if not stat.S_ISREG(info.st_mode):
        raise ManifestError(f"{path}: is {_file_kind(info.st_mode)}, not a regular file; refused unread")
    if info.st_size > limits.max_bytes:
        raise ManifestError(_too_big(path, info.st_size, limits))
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the stat, open never blocks.
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ManifestError(f"{path}: is not a regular file; refused unread")
            data = handle.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limits.max_bytes:  # grew after the stat
        raise ManifestError(_too_big(path, len(data), limits))
    return data


def _too_big(path: Path, size: int, limits: ManifestLimits) -> str:
    return (f"{path}: {size} bytes, above the limit manifests.max_bytes={limits.max_bytes}; "
            "split the project or raise the limit")


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _parse_yaml(path: Path, raw_bytes: bytes, limits: ManifestLimits) -> dict:
    """The YAML mapping, its scene count and its alias-expanded size checked before the schema."""
    try:
        data = yaml.load(raw_bytes, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ManifestError(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping with project, assets and scenes")
    scenes = data.get("scenes")
    if isinstance(scenes, list) and len(scenes) > limits.max_scenes:
        raise ManifestError(
            f"{path}: {len(scenes)} scenes, above the limit manifests.max_scenes={limits.max_scenes}"
        )
    if _expanded_size(data, limit=limits.max_bytes) > limits.max_bytes:
        raise ManifestError(
            f"{path}: YAML aliases expand to more than {limits.max_bytes} values "
            f"(the limit manifests.max_bytes applies to the expanded document)"
        )
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: the problem and where, without quoting the file's text."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(problem)


def _expanded_size(root: object, limit: int) -> int:
    """Number of values in the document with every alias expanded, counted without expanding
    (each shared node is sized once); stops counting past `limit`."""
    sizes: dict[int, int] = {}
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in sizes:
            continue
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        if children_done:
            total = 1 + sum(sizes.get(id(c), 1) if isinstance(c, (dict, list)) else 1 for c in children)
            sizes[id(node)] = min(total, limit + 1)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if isinstance(c, (dict, list)) and id(c) not in sizes)
    return sizes.get(id(root), 1)


def _field_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{loc or 'manifest'}: {'unknown field' if err['type'] == 'extra_forbidden' else msg}")
    return out


def _inside(root: Path, relative: str, folders: dict | None = None) -> Path:
    """`(root / relative).resolve()`; with `folders`, each parent folder is resolved once
    and only the last component is checked for a symlink (the same result, far fewer
    system calls for many files in one folder)."""
    path = root / relative
    if folders is None or path.name in ("", ".", ".."):
        return path.resolve()
    parent = folders.get(path.parent)
    if parent is None:
        parent = folders[path.parent] = path.parent.resolve()
    candidate = parent / path.name
    return candidate.resolve() if candidate.is_symlink() else candidate


def _missing_files(root: Path, spec: ManifestSpec) -> list[str]:
    problems = []
    for i, asset in enumerate(spec.assets):
        ref = _inside(root, asset.reference_image)
        if not ref.is_relative_to(root):
            problems.append(f"assets[{i}].reference_image: {asset.reference_image} resolves outside the project folder")
        elif not ref.is_file():
            problems.append(f"assets[{i}].reference_image: file not found: {asset.reference_image}")
    if spec.ground_truth is not None:
        truth = _inside(root, spec.ground_truth)
        if not truth.is_relative_to(root):
            problems.append(f"ground_truth: {spec.ground_truth} resolves outside the project folder")
        else:
            try:
                validate_ground_truth(truth)
            except GroundTruthError as exc:
                problems.append(f"ground_truth: {exc}")
    # Clips are checked by the video sampler (which records per-scene failures) so one
    # bad clip never stops the other scenes; only a missing file is worth flagging here.
    return problems


def _content_hash(manifest_bytes: bytes, manifest: ProjectManifest) -> str:
    """Manifest bytes plus size and mtime of every referenced file: an edited clip or image
    changes the hash (and so launches a run) without hashing gigabytes on every sensor tick."""
    digest = hashlib.sha256(manifest_bytes)
    paths = [manifest.clip_path(s) for s in manifest.spec.scenes] + [
        manifest.reference_path(a) for a in manifest.spec.assets
    ] + ([manifest.ground_truth_path] if manifest.ground_truth_path else [])
    for path in paths:
        try:
            st = path.stat()
            digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"{path}:missing".encode())
    return digest.hexdigest()[:16]
