"""The HTML report: contact sheets with boxes, continuity components, timeline."""

import base64
import re

import cv2
import numpy as np

from cv_assets.analysis.appearances import Appearance
from cv_assets.analysis.continuity import SceneInput, score_scenes
from cv_assets.analysis.report import ReportFrame, asset_colours, draw_appearances, render_report, write_report


def test_boxes_are_drawn_in_the_asset_colour():
    img = np.zeros((180, 320, 3), np.uint8)
    app = Appearance(1, "CHAR_01", 0, 0, 0.0, (40, 60, 140, 160), 0.87)
    colours = asset_colours(["CHAR_01"])
    out = draw_appearances(img, [app], colours)
    assert img.sum() == 0, "the input frame is not modified"
    assert tuple(out[110, 40]) == colours["CHAR_01"]  # left edge of the box
    assert out[110, 90].sum() == 0  # inside the box stays as it was


def test_report_has_scenes_timeline_scores_and_embedded_images(tmp_path):
    frames = [ReportFrame(s, f, f / 24, ["base"], np.full((90, 160, 3), 100, np.uint8)) for s in (0, 1) for f in (0, 48)]
    frames.append(ReportFrame(1, 96, 4.0, ["motion"], None))
    apps = [Appearance(1, "CHAR_01", 0, 0, 0.0, (10, 10, 60, 60), 0.9, embedding=np.eye(512, dtype=np.float32)[0])]
    scenes = [SceneInput(0, ["CHAR_01"], None, None), SceneInput(1, ["CHAR_01", "PROP_01"], None, None)]
    continuity = score_scenes(scenes, apps, {"adherence": 1.0, "identity": 0.0, "boundary": 0.0}, 5.0)
    html = render_report("demo", "Demo", frames, apps, continuity, ["CHAR_01", "PROP_01"], "clip-test", {"CHAR_01": {
        "precision": 1.0, "recall": 0.5, "true_positives": 1, "predicted": 1, "actual": 2}})
    path = write_report(tmp_path / "reports" / "demo.html", html)
    text = path.read_text()
    assert "<h2>Scene 0</h2>" in text and "<h2>Scene 1</h2>" in text
    assert "Continuity 10.0 / 10" in text and "Continuity 0.0 / 10 — needs review" in text
    assert "missing: CHAR_01, PROP_01" in text
    assert "image missing" in text
    assert text.count("<img ") == 4
    first = re.search(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", text).group(1)
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(first), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (90, 160, 3)
    assert "<th>CHAR_01</th><td>1 frame</td>" in text
    assert "Against ground truth" in text and "<td>0.50</td>" in text
