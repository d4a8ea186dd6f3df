"""face_match on real faces: two portraits that packages ship in their wheels (scikit-image's
astronaut, Eileen Collins; matplotlib's Grace Hopper), composed into frames with known face
boxes, matched against separate reference crops as a user would upload them. Plus the
backend choice (auto / dlib / yunet) with availability injected, not uninstalled."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from cv_assets.analysis import faces
from cv_assets.analysis.appearances import FrameInput, iou
from cv_assets.analysis.sources import FaceMatchSource, build_sources, choose_face_backend
from cv_assets.settings import AppearanceSettings, CvAnalysisSettings

INSTALL = "install the faces extra: pip install '.[faces]'"
# Face boxes in the original portraits (x1, y1, x2, y2), drawn from dlib's CNN (MMOD)
# detector, a different model from the HOG detector under test, and checked by eye.
ASTRONAUT_FACE = (168, 69, 264, 165)
HOPPER_FACE = (190, 145, 356, 311)
W, H = 960, 540


def _jpeg(image: np.ndarray, quality: int = 90) -> np.ndarray:
    """A JPEG round trip, as sampled frames and uploaded references go through one."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    return cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def portraits():
    import dlib  # noqa: F401  (the faces extra is part of the install: missing is a failure)
    from matplotlib import cbook
    from skimage import data as skimage_data
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {"ASTRONAUT": (skimage_data.astronaut(), ASTRONAUT_FACE), "HOPPER": (hopper, HOPPER_FACE),
            "COFFEE": skimage_data.coffee()}


def _background(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, W)[None, :, None]
    y = np.linspace(0, 1, H)[:, None, None]
    base = 60 + 120 * x * np.array([0.4, 0.7, 1.0]) + 50 * y * np.array([1.0, 0.5, 0.2])
    return np.clip(base + rng.normal(0, 6, (H, W, 3)), 0, 255).astype(np.uint8)


# frame index -> placements (portrait, scale, x, y); frames 2 and 3 hold one face, frame 4 none.
LAYOUT = {
    0: [("ASTRONAUT", 0.6, 40, 60), ("HOPPER", 0.7, 520, 80)],
    1: [("HOPPER", 0.5, 40, 200), ("ASTRONAUT", 0.9, 420, 40)],
    2: [("HOPPER", 0.8, 300, 40)],
    3: [("ASTRONAUT", 0.75, 200, 100)],
    4: [],
}


@pytest.fixture(scope="module")
def scene(portraits):
    """Frames of one scene with the true face box of each person in each frame."""
    frames, truth = [], {}
    for index, placements in LAYOUT.items():
        canvas = _background(index)
        for code, scale, x, y in placements:
            image, (x1, y1, x2, y2) = portraits[code]
            pasted = _resize(image, scale)
            canvas[y:y + pasted.shape[0], x:x + pasted.shape[1]] = pasted
            truth[(index, code)] = (round(x + x1 * scale), round(y + y1 * scale), round(x + x2 * scale), round(y + y2 * scale))
        frames.append(FrameInput(0, index, index * 2.0, _jpeg(canvas)))
    return frames, truth


@pytest.fixture(scope="module")
def references(portraits):
    """What a user uploads per asset: a head-and-shoulders crop of each person, mirrored and
    at another size than in the clip, and a prop photo with no face."""
    astronaut, hopper = portraits["ASTRONAUT"][0], portraits["HOPPER"][0]
    return {
        1: ("ASTRONAUT", _jpeg(_resize(astronaut[20:300, 100:340, :][:, ::-1], 1.3), 85)),
        2: ("HOPPER", _jpeg(_resize(hopper[40:440, 110:440, :][:, ::-1], 0.8), 85)),
        3: ("COFFEE", portraits["COFFEE"]),
    }


@pytest.fixture(scope="module")
def found(scene, references):
    frames, _ = scene
    source = FaceMatchSource(backend="auto", threshold=0.6, reference_images=references)
    assert source.enabled and source.backend_name == "dlib"
    return source, source.find(frames, [])


def test_each_face_is_found_in_its_frames_and_matched_to_its_own_reference(scene, found):
    frames, truth = scene
    source, appearances = found
    by_frame = {f.frame_index: sorted(a.asset_code for a in appearances if a.frame_index == f.frame_index) for f in frames}
    assert by_frame == {i: sorted(code for code, *_ in LAYOUT[i]) for i in LAYOUT}
    for a in appearances:
        assert a.source == "face_match"
        assert iou(a.bbox, truth[(a.frame_index, a.asset_code)]) >= 0.5, (a.frame_index, a.asset_code, a.bbox)
        assert 0.5 <= a.confidence <= 1.0  # a match is within the threshold: confidence 0.5..1
    assert source.found == len(appearances) == 6
    assert source.reference_faces == 2  # the coffee cup has no face, so it is never matched


@pytest.fixture(scope="module")
def described(scene, references):
    """Every face of every frame with its descriptor, and the reference faces by code."""
    frames, _ = scene
    backend = faces.DlibFaceBackend(threshold=0.6)
    known = {r.code: r for r in faces.reference_faces(backend, references)}
    return backend, {f.frame_index: backend.faces(f.image) for f in frames}, known


def test_a_face_never_matches_the_other_persons_reference(described):
    backend, by_frame, known = described
    assert set(known) == {"ASTRONAUT", "HOPPER"}
    for index, detected in by_frame.items():
        people = {code for code, *_ in LAYOUT[index]}
        for other in ("ASTRONAUT", "HOPPER"):
            # only the other person's reference is known: this person's face matches nothing
            matched = {m.code for m in faces.assign_faces(backend, detected, [known[other]])}
            assert matched == ({other} if other in people else set()), (index, other)
    # and the descriptors say why: the own reference well within 0.6, the other's beyond it
    own = [m.distance for detected in by_frame.values() for m in faces.assign_faces(backend, detected, list(known.values()))]
    assert len(own) == 6 and max(own) < 0.5
    assert backend.distance(known["ASTRONAUT"].descriptor, known["HOPPER"].descriptor) > 0.6


def test_a_face_far_from_every_reference_is_not_matched(described):
    backend, by_frame, known = described
    strict = faces.DlibFaceBackend(threshold=0.1)  # no real pair of photos is this close
    assert all(faces.assign_faces(strict, detected, list(known.values())) == [] for detected in by_frame.values())
    assert faces.assign_faces(backend, by_frame[0], []) == []


def test_describe_names_backend_and_model_files(found):
    source, _ = found
    text = source.describe()
    assert text.startswith("enabled, 6 appearance(s): backend dlib")
    assert "shape_predictor_5_face_landmarks.dat" in text and "dlib_face_recognition_resnet_model_v1.dat" in text
    assert "Euclidean distance <= 0.6" in text and "2 of 3 reference image(s) with a face" in text


def test_grey_rgba_and_tiny_images(portraits):
    backend = faces.DlibFaceBackend()
    image, box = portraits["HOPPER"]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    for variant in (grey, rgba):
        detected = backend.faces(variant)
        assert len(detected) == 1 and iou(detected[0][0].box, box) >= 0.5
    assert backend.faces(np.zeros((1, 1, 3), np.uint8)) == []


def test_a_damaged_model_file_is_named(tmp_path):
    import dlib  # noqa: F401  (the faces extra is part of the install: missing is a failure)
    for name in faces.DLIB_MODEL_FILES.values():
        (tmp_path / name).write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="cannot load dlib model file .*shape_predictor_5_face_landmarks.dat"):
        faces.DlibFaceBackend(models_dir=tmp_path)


def test_confidence_mapping():
    backend = object.__new__(faces.DlibFaceBackend)
    backend.threshold = 0.6
    assert backend.confidence(0.0) == 1.0
    assert backend.confidence(0.6) == pytest.approx(0.5)
    assert backend.confidence(1.2) == 0.0 and backend.confidence(2.0) == 0.0
    assert backend.matches(0.6) and not backend.matches(0.61)


def test_large_frames_are_detected_downscaled_with_boxes_in_frame_pixels(portraits):
    import dlib  # noqa: F401  (the faces extra is part of the install: missing is a failure)
    image, box = portraits["HOPPER"]
    big = _resize(image, 4.0)  # 2048 x 2400, above the detector's 1280 px side
    detected = faces.DlibFaceBackend().faces(big)
    assert len(detected) == 1
    assert iou(detected[0][0].box, tuple(4 * v for v in box)) >= 0.5


@pytest.fixture
def yunet_files(tmp_path):
    det, rec = tmp_path / "yunet.onnx", tmp_path / "sface.onnx"
    det.write_bytes(b"x")
    rec.write_bytes(b"x")
    return det, rec


def test_auto_prefers_dlib_then_yunet_then_says_how_to_install(yunet_files, tmp_path):
    det, rec = yunet_files
    installed, absent = (lambda: None), (lambda: f"dlib is not installed ({INSTALL})")
    assert choose_face_backend("auto", None, None, installed) == ("dlib", None)
    assert choose_face_backend("auto", det, rec, installed) == ("dlib", None)
    assert choose_face_backend("auto", det, rec, absent) == ("yunet", None)
    name, reason = choose_face_backend("auto", None, None, absent)
    assert name is None and reason.startswith(INSTALL)
    name, reason = choose_face_backend("auto", tmp_path / "gone.onnx", rec, absent)
    assert name is None and "model file not found" in reason and INSTALL in reason
    name, reason = choose_face_backend("auto", det, None, absent)
    assert name is None and "face_recognizer_model" in reason


def test_explicit_backends(yunet_files):
    det, rec = yunet_files
    absent = lambda: f"dlib is not installed ({INSTALL})"  # noqa: E731
    assert choose_face_backend("dlib", None, None, lambda: None) == ("dlib", None)
    assert choose_face_backend("dlib", det, rec, absent) == (None, f"face_backend dlib: dlib is not installed ({INSTALL})")
    assert choose_face_backend("yunet", det, rec, lambda: None) == ("yunet", None)
    name, reason = choose_face_backend("yunet", None, None, lambda: None)
    assert name is None and reason.startswith("face_backend yunet: not configured")


def test_source_disabled_without_either_backend_and_reference_images_untouched():
    source = FaceMatchSource(backend="auto", dlib_problem=lambda: "dlib is not installed")
    assert not source.enabled
    assert source.describe().startswith(f"disabled: {INSTALL}")
    assert source.find([FrameInput(0, 0, 0.0, np.zeros((8, 8, 3), np.uint8))], []) == []

    calls = []
    sources = build_sources(AppearanceSettings(face_backend="yunet"), CvAnalysisSettings(), lambda images: None,
                            "color_histogram", lambda: calls.append(1) or {})
    face = next(s for s in sources if s.name == "face_match")
    assert not face.enabled and calls == []  # reference images are decoded only for an enabled face_match


def test_build_sources_passes_backend_and_threshold():
    import dlib  # noqa: F401  (the faces extra is part of the install: missing is a failure)
    assert faces.dlib_problem() is None
    sources = build_sources(AppearanceSettings(face_backend="dlib"), CvAnalysisSettings(face_match_threshold=0.55),
                            lambda images: None, "color_histogram", lambda: {})
    face = next(s for s in sources if s.name == "face_match")
    assert face.enabled and face.backend_name == "dlib" and face.threshold == 0.55
    assert face.find([], []) == [] and "Euclidean distance <= 0.55" in face.describe()


def test_face_backend_setting_is_validated():
    assert AppearanceSettings().face_backend == "auto"
    with pytest.raises(ValidationError):
        AppearanceSettings(face_backend="opencv")


@pytest.mark.slow
def test_face_match_through_the_chain_on_a_clip(tmp_path, scene, references):
    """The composed frames as a real clip (each layout held 2 s) in a project whose assets are
    the two portraits and a prop: asset_appearances finds each face with face_match and the
    metadata names the backend."""
    import av
    import yaml
    from dagster import DagsterInstance

    from sqlalchemy import select

    from cv_assets.definitions import build_definitions
    from cv_assets.settings import load_settings
    from cv_assets.store import AppDatabase
    from cv_assets.store.models import Asset, AssetAppearance
    from helpers.video import materialization

    frames, truth = scene
    root = tmp_path / "projects" / "faces"
    (root / "refs").mkdir(parents=True)
    fps, hold = 5, 2
    with av.open(str(root / "scene1.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = W, H, "yuv420p", 4_000_000
        for frame in frames:
            for _ in range(fps * hold):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.image, format="rgb24")))
        container.mux(stream.encode())
    assets = []
    for code, image in references.values():
        cv2.imwrite(str(root / "refs" / f"{code}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assets.append({"code": code, "kind": "prop" if code == "COFFEE" else "character", "name": code.title(),
                       "reference_image": f"refs/{code}.jpg"})
    (root / "project.yaml").write_text(yaml.safe_dump({"project": "faces", "assets": assets, "scenes": [
        {"index": 1, "clip": "scene1.mp4", "expected_assets": ["ASTRONAUT", "HOPPER"]}]}, sort_keys=False))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"database_url": f"sqlite:///{tmp_path / 'app.sqlite'}", "duckdb_path": str(tmp_path / "wh.duckdb"),
                    "frames_dir": str(tmp_path / "frames"), "reports_dir": str(tmp_path / "reports"),
                    "projects_root": str(tmp_path / "projects"), "thumbnails_root": str(tmp_path / "thumbnails")},
        "embedder": {"model": str(tmp_path / "no-model"), "fallback": "color_histogram", "device": "cpu"},
        "appearances": {"face_backend": "dlib"},
    }))
    settings = load_settings(config, env={})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["faces"])
    result = build_definitions(settings).resolve_job_def("project_reprocess_job").execute_in_process(
        partition_key="faces", instance=instance, raise_on_error=False)
    assert result.success
    described = materialization(result, "asset_appearances").metadata["source_face_match"].value
    assert described.startswith("enabled, ") and "backend dlib" in described
    assert "2 of 3 reference image(s) with a face" in described

    with AppDatabase(settings.storage.sqlite_url).read() as session:
        rows = session.scalars(select(AssetAppearance).where(AssetAppearance.source == "face_match")).all()
        codes = {a.id: a.code for a in session.scalars(select(Asset))}
        found = [(codes[r.asset_id], r.timestamp_sec, tuple(json.loads(r.bbox)), r.confidence) for r in rows]
    layouts_seen = set()
    for code, t, box, confidence in found:
        layout = min(int(t // hold), len(LAYOUT) - 1)
        layouts_seen.add(layout)
        assert code in {c for c, *_ in LAYOUT[layout]}, (code, t)
        assert iou(box, truth[(layout, code)]) >= 0.5 and 0.5 <= confidence <= 1.0
    # sampled at 0, 2, 4 and 6 s at least: every layout with a face is seen, each of its faces found
    assert layouts_seen >= {0, 1, 2, 3}
    for layout in (0, 1, 2, 3):
        times = {t for _, t, _, _ in found if int(t // hold) == layout}
        for t in times:
            assert sorted(c for c, tt, *_ in found if tt == t) == sorted(c for c, *_ in LAYOUT[layout])
