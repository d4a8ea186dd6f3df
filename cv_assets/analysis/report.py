"""The per-project HTML report: contact sheets with boxes, continuity, asset timeline.

One self-contained file (images embedded as base64 JPEG), so it can be mailed or
opened from any path.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from cv_assets.analysis.appearances import Appearance
from cv_assets.analysis.continuity import SceneContinuity

THUMB_WIDTH = 320
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 0)]


@dataclass(frozen=True)
class ReportFrame:
    scene_index: int
    frame_index: int
    timestamp_sec: float
    reasons: Sequence[str]
    image: np.ndarray | None  # RGB; None when the frame image is gone


def draw_appearances(image: np.ndarray, appearances: Sequence[Appearance], colours: dict[str, tuple]) -> np.ndarray:
    """A copy of `image` with each appearance's box and `CODE 0.83` label drawn."""
    out = np.ascontiguousarray(image.copy())
    for app in appearances:
        colour = colours.get(app.asset_code, (255, 255, 255))
        x1, y1, x2, y2 = app.bbox
        thickness = max(2, image.shape[1] // 320)
        cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), colour, thickness)
        label = f"{app.asset_code} {app.confidence:.2f}"
        scale = max(0.5, image.shape[1] / 1280)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(th + 4, y1)
        cv2.rectangle(out, (x1, ty - th - 4), (x1 + tw + 4, ty), colour, -1)
        cv2.putText(out, label, (x1 + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _jpeg_data_uri(image: np.ndarray) -> str:
    height, width = image.shape[:2]
    if width > THUMB_WIDTH:
        image = cv2.resize(image, (THUMB_WIDTH, int(round(height * THUMB_WIDTH / width))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


def asset_colours(codes: Sequence[str]) -> dict[str, tuple]:
    return {code: PALETTE[i % len(PALETTE)] for i, code in enumerate(sorted(codes))}


def render_report(
    project_key: str,
    project_name: str,
    frames: Sequence[ReportFrame],
    appearances: Sequence[Appearance],
    continuity: Sequence[SceneContinuity],
    asset_codes: Sequence[str],
    model_version: str,
    quality: dict[str, dict] | None = None,
) -> str:
    colours = asset_colours(asset_codes)
    by_frame: dict[tuple[int, int], list[Appearance]] = {}
    for app in appearances:
        by_frame.setdefault((app.scene_index, app.frame_index), []).append(app)
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(project_name)} — cv_assets report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:center}"
        ".sheet{display:flex;flex-wrap:wrap;gap:8px}.sheet figure{margin:0}.sheet figcaption{font-size:12px;color:#555}"
        ".review{color:#b00;font-weight:bold}.ok{color:#070}.legend span{display:inline-block;padding:2px 8px;margin-right:6px;color:#000}</style>",
        "</head><body>",
        f"<h1>{esc(project_name)} <small>({esc(project_key)})</small></h1>",
        f"<p>Embedder: <code>{esc(model_version)}</code>. Scenes: {len(continuity)}. Appearances: {len(appearances)}.</p>",
        "<p class='legend'>" + "".join(f"<span style='background:rgb{colours[c]}'>{esc(c)}</span>" for c in sorted(colours)) + "</p>",
        _timeline_table(appearances, continuity, asset_codes),
    ]
    if quality:
        parts.append(_quality_table(quality))
    by_scene = {c.scene_index: c for c in continuity}
    scene_indices = sorted({f.scene_index for f in frames} | set(by_scene))
    for scene_index in scene_indices:
        parts.append(_scene_section(scene_index, by_scene.get(scene_index), [f for f in frames if f.scene_index == scene_index], by_frame, colours))
    parts.append("</body></html>")
    return "\n".join(parts)


def _timeline_table(appearances, continuity, asset_codes) -> str:
    counts: dict[tuple[str, int], int] = {}
    for app in appearances:
        counts[(app.asset_code, app.scene_index)] = counts.get((app.asset_code, app.scene_index), 0) + 1
    scenes = [c.scene_index for c in continuity]
    expected = {c.scene_index: set(c.found) - set(c.unexpected) | set(c.missing) for c in continuity}
    rows = ["<h2>Timeline</h2><table><tr><th>asset</th>" + "".join(f"<th>scene {s}</th>" for s in scenes) + "</tr>",
            "<tr><th>clip</th>" + "".join(f"<td>{_clip_cell(c)}</td>" for c in continuity) + "</tr>"]
    for code in sorted(asset_codes):
        cells = []
        for s in scenes:
            n = counts.get((code, s), 0)
            exp = code in expected.get(s, set())
            mark = f"{n} frame{'s' if n != 1 else ''}" if n else "—"
            note = "" if (n > 0) == exp else (" <span class='review'>missing</span>" if exp else " <span class='review'>unexpected</span>")
            cells.append(f"<td>{mark}{note}</td>")
        rows.append(f"<tr><th>{html.escape(code)}</th>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _clip_cell(result: SceneContinuity) -> str:
    """The clip row of the timeline: failed or partial clips and hard cuts, marked."""
    if result.clip_status == "failed":
        return "<span class='review'>clip failed</span>"
    marks = [f"<span class='{'ok' if c['declared'] else 'review'}'>cut {c['timestamp_sec']:.2f}s"
             f"{' (declared)' if c['declared'] else ''}</span>" for c in result.cuts]
    if result.clip_status == "partial":
        marks.insert(0, "<span class='review'>partial</span>")
    return " ".join(marks) or "ok"


def _quality_table(quality: dict[str, dict]) -> str:
    rows = ["<h2>Against ground truth</h2><table><tr><th>asset</th><th>precision</th><th>recall</th><th>mean IoU</th>"
            "<th>TP</th><th>predicted</th><th>actual</th></tr>"]
    for code, q in sorted(quality.items()):
        fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append(f"<tr><th>{html.escape(code)}</th><td>{fmt(q['precision'])}</td><td>{fmt(q['recall'])}</td>"
                    f"<td>{fmt(q.get('mean_iou'))}</td><td>{q['true_positives']}</td><td>{q['predicted']}</td><td>{q['actual']}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _scene_section(scene_index, result, frames, by_frame, colours) -> str:
    esc = html.escape
    out = [f"<h2>Scene {scene_index}</h2>"]
    if result is not None:
        cls = "review" if result.needs_review else "ok"
        comp = lambda v: "neutral" if v is None else f"{v:.2f}"  # noqa: E731
        score = "no score (the clip failed)" if result.score is None else f"{result.score:.1f} / 10"
        out.append(
            f"<p class='{cls}'>Continuity {score}{' — needs review' if result.needs_review else ''}</p>"
            f"<table><tr><th>adherence</th><th>identity</th><th>boundary</th><th>intra-scene</th></tr>"
            f"<tr><td>{comp(result.adherence)}</td><td>{comp(result.identity)}</td><td>{comp(result.boundary)}</td>"
            f"<td>{comp(result.intra_scene)}</td></tr></table>"
            "<ul>" + "".join(f"<li>{esc(r)}</li>" for r in result.reasons) + "</ul>"
        )
    out.append("<div class='sheet'>")
    for frame in sorted(frames, key=lambda f: f.frame_index):
        apps = by_frame.get((frame.scene_index, frame.frame_index), [])
        caption = f"frame {frame.frame_index} · {frame.timestamp_sec:.2f}s · {'+'.join(frame.reasons)}"
        if frame.image is None:
            out.append(f"<figure><div style='width:{THUMB_WIDTH}px;height:180px;background:#eee'>image missing</div><figcaption>{esc(caption)}</figcaption></figure>")
            continue
        uri = _jpeg_data_uri(draw_appearances(frame.image, apps, colours))
        out.append(f"<figure><img src='{uri}' width='{THUMB_WIDTH}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>")
    out.append("</div>")
    return "".join(out)


def write_report(path: Path, content: str) -> Path:
    """Write atomically so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)
    return path
