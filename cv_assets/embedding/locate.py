"""Where a CLIP model is, or why it is not there: answered without importing torch or
transformers, so a missing model (and the explicit fallback) costs no heavy import."""

from __future__ import annotations

from pathlib import Path

from cv_assets.settings import EmbedderSettings


def default_cache_dir(settings: EmbedderSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def unavailable_message(settings: EmbedderSettings, reason: str) -> str:
    """Say which model, where it was looked for, and the two ways out."""
    model = settings.model
    revision = f" (revision {settings.revision})" if settings.revision else ""
    fallback = ("  - or, for an air-gapped demo, set embedder.fallback: color_histogram (a colour-histogram "
                "embedder with its own model_version; its vectors are never mixed with CLIP vectors).")
    if _looks_like_path(model):
        return (
            f"CLIP model directory {Path(model).expanduser()}{revision} cannot be loaded: {reason}\n"
            "To fix it:\n"
            "  - put a checkpoint written by CLIPModel.save_pretrained(DIR, safe_serialization=True) there "
            "(config.json, model.safetensors, preprocessor_config.json and the tokenizer files), or point "
            "embedder.model (config.yaml, or CV_ASSETS__EMBEDDER__MODEL) at another local copy,\n" + fallback
        )
    cache = default_cache_dir(settings)
    offline = " (embedder.local_files_only is true, so the hub is never contacted)" if settings.local_files_only else ""
    return (
        f"CLIP model {model!r}{revision} is not available: no usable copy in the Hugging Face cache "
        f"at {cache}{offline}. Details: {reason}\n"
        "To fix it:\n"
        f"  - on a machine with internet run `hf download {model}` (or CLIPModel.from_pretrained + "
        "save_pretrained(DIR) with its processor and tokenizer), copy the folder here and set embedder.model "
        "to that local directory (config.yaml, or CV_ASSETS__EMBEDDER__MODEL=/path/to/clip), or set "
        "embedder.cache_dir to a cache that holds it,\n" + fallback
    )


def missing_model_reason(settings: EmbedderSettings) -> str | None:
    """Why the configured model certainly cannot load, found from the file system alone: a
    local directory that does not exist, or (offline) a hub id with no weights in the local
    cache. None when it may load (the loader then has the last word)."""
    if _looks_like_path(settings.model):
        return None if Path(settings.model).expanduser().is_dir() else "the directory does not exist"
    if not settings.local_files_only:
        return None
    snapshots = default_cache_dir(settings) / f"models--{settings.model.replace('/', '--')}" / "snapshots"
    if not any(snapshots.glob("*/*.safetensors")):
        return f"no snapshot with safetensors weights under {snapshots}"
    return None
