"""The CLIP embedder, loaded through `get_embedder` from a tiny local checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cv_assets.embedding import (
    CLIPEmbeddingService,
    ClipEmbedder,
    EmbedderConfigError,
    ModelUnavailableError,
    get_embedder,
)
from cv_assets.embedding.base import available_cores
from cv_assets.embedding.preprocess import PreprocessConfig, mean_colour, pad_to_square, preprocess_images
from cv_assets.settings import EmbedderSettings


def _processor(**kwargs):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kwargs)


def _photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients, smooth noise, hard-edged shapes and grain: the mix a resize has to get right."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xx / width * 255, yy / height * 255, np.full_like(xx, 128)], axis=-1)
    coarse = rng.normal(0, 30, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(12):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(image, centre, int(rng.integers(3, max(4, min(height, width) // 3))), colour, -1)
        cv2.line(image, centre, (int(rng.integers(0, width)), int(rng.integers(0, height))), colour, 2)
    grain = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(np.int16) + grain, 0, 255).astype(np.uint8)


@pytest.fixture
def clip(settings_factory) -> ClipEmbedder:
    settings, _ = settings_factory()
    return get_embedder(settings.embedder)


# -- loading and versioning ---------------------------------------------------------------------


def test_get_embedder_loads_the_checkpoint_once_per_settings(settings_factory, tiny_clip_dir):
    settings, _ = settings_factory()
    embedder = get_embedder(settings.embedder)
    assert isinstance(embedder, ClipEmbedder) and isinstance(embedder, CLIPEmbeddingService)
    assert (embedder.family, embedder.device, embedder.dim) == ("clip", "cpu", 512)
    assert get_embedder(settings.embedder) is embedder
    assert get_embedder(settings) is embedder  # the whole Settings works too
    other = get_embedder(settings.embedder.model_copy(update={"batch_size": 3}))
    assert other is not embedder and other.batch_size == 3


def test_model_version_of_a_local_directory_hashes_weights_and_preprocessor_config(clip, tiny_clip_dir):
    digest = hashlib.sha256()
    for name in ("model.safetensors", "preprocessor_config.json"):
        digest.update(name.encode() + b"\0" + (tiny_clip_dir / name).read_bytes())
    assert clip.model_version == f"clip:tiny-clip@sha256:{digest.hexdigest()[:12]}"


def test_cpu_load_uses_every_available_core(clip):
    clip.ensure_ready()
    assert torch.get_num_threads() == available_cores()


def test_model_version_of_a_hub_model_is_repo_at_commit(tmp_path, tiny_clip_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-clip"
    shutil.copytree(tiny_clip_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for revision in (None, commit):
        embedder = get_embedder(EmbedderSettings(model="acme/tiny-clip", revision=revision,
                                                 cache_dir=tmp_path / "hub", device="cpu"))
        assert embedder.model_version == f"acme/tiny-clip@{commit}"
        assert embedder.embed_texts(["red car"]).shape == (1, 512)


def test_different_checkpoints_have_different_versions_and_vectors(settings_factory, tiny_clip_dir_b):
    settings_a, _ = settings_factory()
    settings_b, _ = settings_factory(embedder={"model": str(tiny_clip_dir_b)})
    a, b = get_embedder(settings_a.embedder), get_embedder(settings_b.embedder)
    assert a.model_version != b.model_version
    assert b.model_version.startswith("clip:tiny-clip-b@sha256:")
    frame = _photo_like(180, 320)
    assert a.compute_similarity(a.embed_images([frame])[0], b.embed_images([frame])[0]) < 0.99


def test_missing_hub_model_offline_raises_a_clear_error_at_first_use(tmp_path):
    cache = tmp_path / "empty-cache"
    embedder = get_embedder(EmbedderSettings(model="openai/clip-vit-base-patch32", cache_dir=cache, device="cpu"))
    with pytest.raises(ModelUnavailableError) as info:
        embedder.embed_images([_photo_like(64, 64)])
    message = str(info.value)
    assert "'openai/clip-vit-base-patch32'" in message
    assert str(cache) in message
    assert "never contacted" in message
    assert "embedder.model" in message and "embedder.fallback: color_histogram" in message
    # Raised from None: the user sees our message, not the hub client's traceback.
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(ModelUnavailableError):
        embedder.model_version  # still unavailable, still the same clear error


def test_missing_local_directory_is_named(tmp_path):
    missing = tmp_path / "models" / "clip"
    with pytest.raises(ModelUnavailableError, match=f"CLIP model directory {missing} cannot be loaded: "
                                                    "the directory does not exist"):
        get_embedder(EmbedderSettings(model=str(missing), device="cpu")).ensure_ready()


def test_pickled_weights_are_never_loaded(tmp_path, tiny_clip_dir):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-clip"
    shutil.copytree(tiny_clip_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match=r"no \*\.safetensors weights in it \(pickled \.bin weights"):
        get_embedder(EmbedderSettings(model=str(pickled), device="cpu")).ensure_ready()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_config_error(tiny_clip_dir):
    with pytest.raises(EmbedderConfigError, match="embedder.device is 'cuda' but torch sees no CUDA device"):
        get_embedder(EmbedderSettings(model=str(tiny_clip_dir), device="cuda"))


# -- preprocessing ------------------------------------------------------------------------------

SIZES = [(720, 1280), (180, 320), (600, 500), (97, 151), (224, 224), (1080, 1920), (300, 1200)]


def test_preprocessing_matches_clip_image_processor():
    processor = _processor()
    config = PreprocessConfig()
    for index, (height, width) in enumerate(SIZES):
        image = _photo_like(height, width, seed=index)
        ours = preprocess_images([image], config).numpy()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = processor(images=[image], return_tensors="np")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 224, 224)
        diff = np.abs(ours - theirs)
        # One grey level is 1/255/std ~ 0.015 in normalised units: never more than that.
        assert diff.max() <= 0.016, (height, width, diff.max())
        assert diff.mean() < 1e-3, (height, width, diff.mean())


def test_preprocessor_config_of_the_checkpoint_is_honoured(tmp_path):
    custom = {"size": {"shortest_edge": 160}, "crop_size": {"height": 128, "width": 144},
              "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 3}
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(custom))
    config = PreprocessConfig.from_file(path, PreprocessConfig())
    assert (config.shortest_edge, config.crop_height, config.crop_width) == (160, 128, 144)
    processor = _processor(size={"shortest_edge": 160}, crop_size={"height": 128, "width": 144},
                           image_mean=custom["image_mean"], image_std=custom["image_std"])
    image = _photo_like(360, 640, seed=9)
    ours = preprocess_images([image], config).numpy()[0]
    theirs = processor(images=[image], return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 128, 144)
    assert np.abs(ours - theirs).max() <= 1.01 / 255 / 0.2


def test_embedder_reads_mean_and_std_from_its_checkpoint(tmp_path, tiny_clip_dir, clip):
    variant = tmp_path / "tiny-clip-other-norm"
    shutil.copytree(tiny_clip_dir, variant)
    config = json.loads((variant / "preprocessor_config.json").read_text())
    config["image_mean"], config["image_std"] = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    (variant / "preprocessor_config.json").write_text(json.dumps(config))
    other = get_embedder(EmbedderSettings(model=str(variant), device="cpu"))
    assert other.preprocess_config.mean == (0.5, 0.5, 0.5) and other.preprocess_config.std == (0.5, 0.5, 0.5)
    assert clip.preprocess_config.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    # Same weights, other preprocessing: other vectors, so another model_version.
    assert other.model_version != clip.model_version


# -- images -------------------------------------------------------------------------------------


def test_embed_images_returns_unit_float32_rows_in_order(clip):
    frames = [_photo_like(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    vectors = clip.embed_images(frames)
    assert vectors.shape == (len(frames), 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.isnan(vectors).any()
    # Batching and the worker pool change nothing: one at a time gives the same rows.
    singles = np.stack([clip.embed_images([frame])[0] for frame in frames])
    np.testing.assert_allclose(vectors, singles, atol=1e-5)
    assert clip.embed_images([]).shape == (0, 512)


def test_small_batches_and_several_workers_give_the_same_vectors(clip):
    frames = [_photo_like(120, 200, seed=i) for i in range(7)]
    reference = clip.embed_images(frames)
    saved = clip.batch_size, clip.prefetch_workers, clip.prepare_in_workers, clip.prepare_threads
    try:
        for prepare_in_workers in (False, True):  # the CPU layout and the GPU layout
            clip.batch_size, clip.prefetch_workers, clip.prepare_in_workers = 2, 3, prepare_in_workers
            clip.prepare_threads = 3
            np.testing.assert_allclose(clip.embed_images(frames), reference, atol=1e-5)
            outcome = clip.embed_sources(frames + [b"junk"])
            assert outcome.ok == list(range(7)) and list(outcome.errors) == [7]
            np.testing.assert_allclose(outcome.vectors, reference, atol=1e-5)
    finally:
        clip.batch_size, clip.prefetch_workers, clip.prepare_in_workers, clip.prepare_threads = saved


def test_vectors_equal_the_model_on_processor_output(clip):
    frames = [_photo_like(360, 640, seed=1), _photo_like(500, 400, seed=2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = _processor()(images=frames, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = clip.model.get_image_features(pixel_values=pixels).pooler_output
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    ours = clip.embed_images(frames)
    assert (ours * expected).sum(axis=1).min() > 0.9999


def test_regions_are_letterboxed_so_every_pixel_reaches_the_model(clip):
    # A tall slab (a box fit's part): CLIP's centre crop keeps only its middle square, so
    # what stands in its top rows never reaches the model through embed_images.
    slab = _photo_like(240, 60, seed=3)
    changed = slab.copy()
    changed[:40] = (220, 30, 30)
    cropped = clip.embed_images([slab, changed])
    np.testing.assert_allclose(cropped[0], cropped[1], atol=1e-6)
    regions = clip.embed_regions([slab, changed])
    assert float(regions[0] @ regions[1]) < 0.9999
    # The letterbox is the mean colour (zero once normalised), and a square region is as is.
    fill = mean_colour(clip.preprocess_config)
    config = clip.preprocess_config
    normalised = (fill * config.rescale_factor - np.asarray(config.mean)) / np.asarray(config.std)
    assert np.abs(normalised).max() < 0.01
    padded = pad_to_square(slab, fill)
    assert padded.shape == (240, 240, 3) and (padded[:, :90] == fill).all() and (padded[:, 90:150] == slab).all()
    square = _photo_like(100, 100, seed=4)
    np.testing.assert_allclose(clip.embed_regions([square]), clip.embed_images([square]), atol=1e-6)


def test_inherited_service_names(clip, tmp_path):
    frame = _photo_like(240, 320, seed=5)
    path = tmp_path / "frame.png"
    Image.fromarray(frame).save(path)
    vector = clip.generate_embedding(path)
    assert vector.shape == (512,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    np.testing.assert_allclose(vector, clip.generate_embedding(frame), atol=1e-5)
    np.testing.assert_allclose(vector, clip.embed_images([frame])[0], atol=1e-5)
    other = clip.generate_embedding(_photo_like(240, 320, seed=6))
    assert clip.compute_similarity(vector, vector) == pytest.approx(1.0)
    assert clip.compute_similarity(vector, 3 * vector) == pytest.approx(1.0)
    assert clip.compute_similarity(vector, other) == pytest.approx(float(vector @ other), abs=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        clip.compute_similarity(vector, vector[:10])


# -- text ---------------------------------------------------------------------------------------


def test_text_embeddings_use_the_checkpoint_tokenizer(clip, tiny_clip_dir):
    from transformers import CLIPTokenizer

    texts = ["a red car", "blue", "a blue car in the rain"]
    vectors = clip.embed_texts(texts)
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_clip_dir))
    assert tokenizer.tokenize("red")[0] == "red</w>"  # a merge from the fixture's vocabulary
    with torch.inference_mode():
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        expected = torch.nn.functional.normalize(clip.model.get_text_features(**tokens).pooler_output, dim=-1)
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-5)
    assert clip.compute_similarity(vectors[0], vectors[1]) < 0.999
    assert clip.embed_texts([]).shape == (0, 512)
