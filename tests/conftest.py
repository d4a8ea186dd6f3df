"""Shared fixtures: a tiny CLIP checkpoint built locally (nothing is downloaded) and a
settings factory that points every store into the test's tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cv_assets.settings import load_settings

TINY_SEED_A = 0
TINY_SEED_B = 1
# Letters and a few words the tokenizer merges, so text tests see multi-character tokens.
TINY_MERGES = ["r e", "re d</w>", "b l", "bl u", "blu e</w>", "c a", "ca r</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_tiny_tokenizer_files(directory: Path) -> None:
    """vocab.json + merges.txt of a byte-level BPE vocabulary: 256 bytes, their end-of-word
    forms, a handful of merges and CLIP's two special tokens."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")


def build_tiny_clip(directory: Path, seed: int) -> Path:
    """A CLIP checkpoint with the real layout and 512-d projections but tiny towers,
    saved like a downloaded model: safetensors weights, preprocessor config, tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer_files(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(tower, image_size=224, patch_size=32),
        projection_dim=512,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    CLIPImageProcessorPil().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP checkpoint directory (seed 0), loadable with `embedder.model: <dir>`."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_a") / "tiny-clip", TINY_SEED_A)


@pytest.fixture(scope="session")
def tiny_clip_dir_b(tmp_path_factory) -> Path:
    """A second tiny checkpoint with other weights (seed 1): a model change."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_b") / "tiny-clip-b", TINY_SEED_B)


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def settings_factory(tmp_path, tiny_clip_dir):
    """`make(**sections) -> (settings, config_path)`: a config.yaml in tmp_path with every
    store inside tmp_path and the tiny CLIP model on CPU; keyword arguments are merged
    per section, e.g. `make(embedder={"model": str(other)}, events={"max_batch": 5})`."""

    def make(**overrides):
        base = {
            "storage": {
                "database_url": f"sqlite:///{tmp_path / 'app.sqlite'}",
                "duckdb_path": str(tmp_path / "warehouse.duckdb"),
                "frames_dir": str(tmp_path / "frames"),
                "reports_dir": str(tmp_path / "reports"),
                "projects_root": str(tmp_path / "projects"),
                "thumbnails_root": str(tmp_path / "thumbnails"),
            },
            # torch fp32: the behaviour under test is the embedder's, not a backend's or a number
            # format's, and the same on every CPU (auto picks bf16 where the CPU has it). The
            # OpenVINO path and every precision have their own tests (test_embedding_backends).
            "embedder": {"model": str(tiny_clip_dir), "fallback": "none", "device": "cpu", "backend": "torch",
                         "precision": "fp32",
                         "compiled_cache_dir": str(tmp_path / "openvino")},
        }
        config = _deep_merge(base, overrides)
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return load_settings(config_path, env={}), config_path

    return make


# ---------------------------------------------------------------- PostgreSQL (the scale-out backend)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A real PostgreSQL server with pgvector, from the `pgserver` pip package (test extra),
    started once per session on a Unix socket and stopped at the end."""
    import shutil
    import tempfile

    import pgserver

    # Not under tmp_path_factory: as root, pgserver runs the server as another user, who
    # cannot enter pytest's private (0700) temp folders.
    data_dir = tempfile.mkdtemp(prefix="cv_assets_pg_")
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    yield server
    server.cleanup()
    shutil.rmtree(data_dir, ignore_errors=True)


def pg_url(server, database: str) -> str:
    """The SQLAlchemy URL of `database` on a pgserver server (Unix socket, user postgres)."""
    from urllib.parse import parse_qs, urlparse

    socket_dir = parse_qs(urlparse(server.get_uri()).query)["host"][0]
    return f"postgresql+psycopg://postgres@/{database}?host={socket_dir}"


@pytest.fixture
def postgres_url(pg_server):
    """A new, empty PostgreSQL database for this test (dropped afterwards)."""
    import uuid

    name = f"cv_{uuid.uuid4().hex[:12]}"
    pg_server.psql(f"CREATE DATABASE {name};")
    yield pg_url(pg_server, name)
    from cv_assets.store import database

    database._migrated.discard((pg_url(pg_server, name), 0, 0))
    pg_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


@pytest.fixture(params=["sqlite", "postgresql"])
def app_db_url(request, tmp_path):
    """The application database URL, once per backend: an SQLite file in tmp_path and a
    fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.sqlite'}"
    return request.getfixturevalue("postgres_url")
