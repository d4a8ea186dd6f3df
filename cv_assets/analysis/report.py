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


def draw_appearances(image: np.ndarray, appearances: Sequence[Appearance], colours: dict[str, tuple],
                     scale: float = 1.0) -> np.ndarray:
    """A copy of `image` with each appearance's box and `CODE 0.83` label drawn in the
    asset's colour (the legend's). `scale` maps frame pixels to `image` pixels (a thumbnail).
    Labels never overlap: one that would cover an earlier label moves inside its box, then
    below it, then further down."""
    out = np.ascontiguousarray(image.copy())
    height, width = out.shape[:2]
    thickness = max(1, width // 320) if scale < 1 else max(2, width // 320)
    font_scale = max(0.4, width / 1280)
    boxes = [(app, colours.get(app.asset_code, (255, 255, 255)), tuple(int(round(v * scale)) for v in app.bbox))
             for app in sorted(appearances, key=lambda a: -a.confidence)]  # the surest label gets the best place
    for _, colour, (x1, y1, x2, y2) in boxes:
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
    placed: list[tuple[int, int, int, int]] = []
    for app, colour, box in boxes:  # labels after every box, so no box line crosses a label
        placed.append(_place_label(out, f"{app.asset_code} {app.confidence:.2f}", box, colour, font_scale, placed))
    return out


def _place_label(out: np.ndarray, label: str, box: tuple[int, int, int, int], colour, font_scale: float,
                 placed: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """Draw `label` on a filled tag beside `box` where it covers no earlier label; return its rectangle."""
    height, width = out.shape[:2]
    (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    tag_w, tag_h = tw + 4, th + 6
    x1, y1, _, y2 = box
    left = min(max(0, x1), max(0, width - tag_w))
    candidates = [y1 - tag_h, y1, y2]  # above the box, inside its top edge, below it
    candidates += [y2 + k * tag_h for k in range(1, height // max(tag_h, 1) + 1)]
    top = candidates[0]
    for candidate in candidates:
        top = min(max(0, candidate), max(0, height - tag_h))
        rect = (left, top, left + tag_w, top + tag_h)
        if not any(_overlaps(rect, other) for other in placed):
            break
    rect = (left, top, left + tag_w, top + tag_h)
    cv2.rectangle(out, rect[:2], (rect[2] - 1, rect[3] - 1), colour, -1)
    cv2.putText(out, label, (left + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return rect


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _jpeg_data_uri(image: np.ndarray) -> str:
    return jpeg_data_uri(image, THUMB_WIDTH, 80)


def jpeg_data_uri(image: np.ndarray, max_width: int, quality: int) -> str:
    """`image` (RGB) as a `data:image/jpeg;base64,...` URI, shrunk to at most `max_width` pixels wide."""
    height, width = image.shape[:2]
    if width > max_width:
        image = cv2.resize(image, (max_width, int(round(height * max_width / width))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
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



# The pictures project_report puts in its metadata (small JPEGs, so the UI shows them inline).
SHEET_THUMB_WIDTH = 240
SHEET_COLUMNS = 3
CAPTION_HEIGHT = 18
REVIEW_RED = (200, 0, 0)
OK_GREEN = (0, 120, 0)


def contact_sheet(frames: Sequence[ReportFrame], appearances: Sequence[Appearance], colours: dict[str, tuple],
                  thumb_width: int = SHEET_THUMB_WIDTH, columns: int = SHEET_COLUMNS) -> np.ndarray:
    """One scene's sampled frames in a grid (RGB): each with its appearance boxes and labels
    in the asset colours, and `frame N · 1.25s` under it."""
    from PIL import Image, ImageDraw

    frames = sorted(frames, key=lambda f: f.frame_index)
    shapes = [f.image.shape[:2] for f in frames if f.image is not None] or [(9, 16)]
    thumb_h = int(round(thumb_width * shapes[0][0] / shapes[0][1]))
    columns = max(1, min(columns, len(frames)))
    rows = max(1, -(-len(frames) // columns))
    sheet = Image.new("RGB", (columns * (thumb_width + 4) + 4, rows * (thumb_h + CAPTION_HEIGHT + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for i, frame in enumerate(frames):
        x = 4 + (i % columns) * (thumb_width + 4)
        y = 4 + (i // columns) * (thumb_h + CAPTION_HEIGHT + 4)
        if frame.image is None:
            draw.rectangle((x, y, x + thumb_width - 1, y + thumb_h - 1), fill=(235, 235, 235))
            draw.text((x + 8, y + thumb_h // 2 - 6), "image missing", fill=REVIEW_RED, font=font)
        else:
            factor = thumb_width / frame.image.shape[1]
            thumb = cv2.resize(frame.image, (thumb_width, int(round(frame.image.shape[0] * factor))),
                               interpolation=cv2.INTER_AREA)
            apps = [a for a in appearances if (a.scene_index, a.frame_index) == (frame.scene_index, frame.frame_index)]
            sheet.paste(Image.fromarray(draw_appearances(thumb, apps, colours, scale=factor)[:thumb_h]), (x, y))
        draw.text((x, y + thumb_h + 2), f"frame {frame.frame_index} · {frame.timestamp_sec:.2f}s · "
                  f"{'+'.join(frame.reasons)}", fill=(60, 60, 60), font=font)
    return np.asarray(sheet)


def timeline_image(appearances: Sequence[Appearance], continuity: Sequence[SceneContinuity],
                   asset_codes: Sequence[str], colours: dict[str, tuple]) -> np.ndarray:
    """The asset timeline as a picture (RGB): a column per scene; the clip row marks a failed
    or partial clip and each hard cut (red when the manifest does not announce it); each asset
    row is filled in the asset's colour with its frame count where it appears, and says
    missing / unexpected against the manifest."""
    from PIL import Image, ImageDraw

    counts: dict[tuple[str, int], int] = {}
    for app in appearances:
        counts[(app.asset_code, app.scene_index)] = counts.get((app.asset_code, app.scene_index), 0) + 1
    scenes = list(continuity)
    codes = sorted(asset_codes)
    label_w, cell_w, row_h = 90, 170, 30
    image = Image.new("RGB", (label_w + cell_w * max(1, len(scenes)) + 1, row_h * (len(codes) + 2) + 1), "white")
    draw = ImageDraw.Draw(image)
    font, bold = _font(13), _font(14)
    grey = (190, 190, 190)
    for col, scene in enumerate(scenes):
        x = label_w + col * cell_w
        score = "no score" if scene.score is None else f"{scene.score:.1f}/10"
        draw.text((x + 6, 8), f"scene {scene.scene_index} · {score}", fill=REVIEW_RED if scene.needs_review else (0, 0, 0),
                  font=bold)
    draw.text((6, row_h + 8), "clip", fill=(0, 0, 0), font=bold)
    for row, code in enumerate(codes, start=2):
        draw.rectangle((4, row * row_h + 6, 16, row * row_h + 18), fill=colours.get(code, (255, 255, 255)))
        draw.text((22, row * row_h + 8), code, fill=(0, 0, 0), font=bold)
    for col, scene in enumerate(scenes):
        x = label_w + col * cell_w
        y = row_h
        _clip_cell_image(draw, scene, (x, y, x + cell_w, y + row_h), font)
        expected = set(scene.found) - set(scene.unexpected) | set(scene.missing)
        for row, code in enumerate(codes, start=2):
            y = row * row_h
            box = (x + 2, y + 2, x + cell_w - 2, y + row_h - 2)
            n = counts.get((code, scene.scene_index), 0)
            if n:
                draw.rectangle(box, fill=colours.get(code, (255, 255, 255)))
                draw.text((box[0] + 6, y + 8), f"{n} frame{'s' if n != 1 else ''}"
                          + ("" if code in expected else " · unexpected"), fill=(0, 0, 0), font=font)
            elif code in expected:
                draw.rectangle(box, outline=REVIEW_RED, width=2)
                draw.text((box[0] + 6, y + 8), "missing", fill=REVIEW_RED, font=font)
            else:
                draw.text((box[0] + 6, y + 8), "-", fill=grey, font=font)  # (the default font has no em dash)
    for row in range(len(codes) + 3):
        draw.line((0, row * row_h, image.width, row * row_h), fill=grey)
    for col in range(len(scenes) + 1):
        draw.line((label_w + col * cell_w, 0, label_w + col * cell_w, image.height), fill=grey)
    return np.asarray(image)


def _clip_cell_image(draw, scene: SceneContinuity, box: tuple[int, int, int, int], font) -> None:
    x1, y1, x2, y2 = box
    if scene.clip_status == "failed":
        draw.rectangle((x1 + 2, y1 + 2, x2 - 2, y2 - 2), fill=(255, 215, 215))
        draw.text((x1 + 6, y1 + 8), "clip failed", fill=REVIEW_RED, font=font)
        return
    # What needs review first: a partial clip, then cuts the manifest does not announce, then declared ones.
    marks = [("partial", REVIEW_RED)] if scene.clip_status == "partial" else []
    marks += [(f"cut {c['timestamp_sec']:.2f}s", REVIEW_RED) for c in scene.cuts if not c["declared"]]
    marks += [(f"cut {c['timestamp_sec']:.2f}s", OK_GREEN) for c in scene.cuts if c["declared"]]
    marks = marks or [("ok", OK_GREEN)]
    x = x1 + 6
    for i, (text, colour) in enumerate(marks):
        width = draw.textlength(text + "  ", font=font)
        more = f"+{len(marks) - i}"
        if i and x + width + draw.textlength(more, font=font) > x2:
            draw.text((x, y1 + 8), more, fill=REVIEW_RED if any(c == REVIEW_RED for _, c in marks[i:]) else OK_GREEN,
                      font=font)
            break
        draw.text((x, y1 + 8), text, fill=colour, font=font)
        x += width


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without a scalable default font
        return ImageFont.load_default()


def write_report(path: Path, content: str) -> Path:
    """Write atomically so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)
    return path
