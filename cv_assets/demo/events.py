"""The demo security-event set: events.jsonl, thumbnails and the ground truth.

Five recurring visitors come back across cameras and days, each a distinctive colour
with small per-event changes (position, size, light, noise); the other events are
one-offs (people, cars, dogs in hues no visitor uses) or empty "motion" frames.
Thumbnails are mostly base64 in four spellings (plain, data URI, URL-safe without
padding, wrapped lines) and about 15% JPEG files; five are deliberately broken.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from cv_assets.demo.thumbnails import (
    JPEG_QUALITY,
    ONE_OFF_HUES,
    THUMB_H,
    THUMB_W,
    PersonLook,
    draw_car,
    draw_cat,
    draw_dog,
    draw_person,
    draw_van,
    grey,
    hsv,
    render_thumbnail,
)

CAMERAS = ("front_door", "driveway", "backyard", "garage")
FIRST_DAY = datetime(2026, 10, 20)
N_DAYS = 17  # 2026-10-20 .. 2026-11-05
MIN_EVENTS = 30  # five visitors of at least 3 events, five corrupted, some one-offs
FILE_SHARE = 0.15  # share of thumbnails written as files instead of base64
BASE64_SPELLINGS = (("base64", 0.55), ("data_uri", 0.20), ("base64url_nopad", 0.15), ("base64_wrapped", 0.10))
CORRUPTIONS = ("truncated_jpeg", "not_an_image", "invalid_base64", "missing_file", "path_escape")
ONE_OFF_LABELS = (("person", 0.35), ("vehicle", 0.20), ("animal", 0.12), ("motion", 0.33))
CAMERA_SEEDS = {camera: 100 + i for i, camera in enumerate(CAMERAS)}
# Where a subject stands on each camera: (cx range, feet y range, size) in thumbnail pixels.
STAGE = {
    "front_door": ((40.0, 130.0), (100.0, 112.0), 1.2),
    "driveway": ((45.0, 120.0), (95.0, 115.0), 1.0),
    "backyard": ((30.0, 130.0), (85.0, 112.0), 0.9),
    "garage": ((40.0, 120.0), (100.0, 116.0), 1.0),
}

Drawer = Callable[[np.ndarray, np.random.Generator, float, float, float], None]


@dataclass(frozen=True)
class Visitor:
    name: str
    label: str
    share: float  # of all events
    cameras: tuple[tuple[str, float], ...]
    hours: tuple[int, int]  # first and last hour of a visit
    draw: Drawer  # (img, rng, cx, bottom, scale)
    weekdays_only: bool = False


def _jitter(rng: np.random.Generator, hue: float, sat: float, val: float):
    """The same colour under slightly different conditions."""
    return hsv(hue + rng.uniform(-3, 3), sat * rng.uniform(0.93, 1.05), val * rng.uniform(0.92, 1.06))


def _skin(rng: np.random.Generator):
    return hsv(rng.uniform(18, 30), rng.uniform(0.3, 0.5), rng.uniform(0.45, 0.9))


def _mail_carrier(img, rng, cx, bottom, s):
    navy = _jitter(rng, 222, 0.7, 0.38)
    look = PersonLook(_jitter(rng, 218, 0.78, 0.75), navy, _skin(rng), hat=navy, bag=grey(60))
    draw_person(img, cx, bottom, s, look)


def _delivery_van(img, rng, cx, bottom, s):
    draw_van(img, cx, bottom, s * 1.1, _jitter(rng, 6, 0.85, 0.82), 1 if rng.random() < 0.5 else -1)


def _orange_cat(img, rng, cx, bottom, s):
    facing = 1 if rng.random() < 0.5 else -1
    draw_cat(img, cx, bottom, s * 0.9, _jitter(rng, 28, 0.85, 0.95), _jitter(rng, 22, 0.9, 0.62), facing)


def _gardener(img, rng, cx, bottom, s):
    jacket = _jitter(rng, 125, 0.72, 0.58)
    draw_person(img, cx, bottom, s, PersonLook(jacket, grey(55), _skin(rng), hat=_jitter(rng, 125, 0.6, 0.4)))


def _purple_visitor(img, rng, cx, bottom, s):
    coat = _jitter(rng, 282, 0.62, 0.62)
    draw_person(img, cx, bottom, s, PersonLook(coat, grey(35), _skin(rng), hat=grey(28), long_coat=True))


VISITORS: tuple[Visitor, ...] = (
    Visitor("mail carrier", "person", 0.10, (("front_door", 0.8), ("driveway", 0.2)), (10, 12), _mail_carrier,
            weekdays_only=True),
    Visitor("red delivery van", "vehicle", 0.075, (("driveway", 0.7), ("front_door", 0.3)), (9, 17), _delivery_van),
    Visitor("orange cat", "animal", 0.125, (("backyard", 0.6), ("garage", 0.25), ("driveway", 0.15)), (0, 23),
            _orange_cat),
    Visitor("green-jacket gardener", "person", 0.0625, (("backyard", 0.75), ("driveway", 0.25)), (8, 16), _gardener),
    Visitor("purple-coat visitor", "person", 0.05, (("front_door", 0.8), ("driveway", 0.2)), (17, 21),
            _purple_visitor),
)


def _one_off_hue(rng: np.random.Generator) -> float:
    low, high = ONE_OFF_HUES[int(rng.integers(len(ONE_OFF_HUES)))]
    return float(rng.uniform(low, high))


def _one_off_colour(rng: np.random.Generator):
    return hsv(_one_off_hue(rng), rng.uniform(0.5, 0.9), rng.uniform(0.45, 0.9))


def _stranger(img, rng, cx, bottom, s):
    look = PersonLook(_one_off_colour(rng), _one_off_colour(rng), _skin(rng),
                      hat=_one_off_colour(rng) if rng.random() < 0.4 else None, long_coat=bool(rng.random() < 0.3))
    draw_person(img, cx, bottom, s * rng.uniform(0.9, 1.1), look)


def _passing_car(img, rng, cx, bottom, s):
    draw_car(img, cx, bottom, s, _one_off_colour(rng))


def _dog(img, rng, cx, bottom, s):
    facing = 1 if rng.random() < 0.5 else -1
    draw_dog(img, cx, bottom, s * 0.9, grey(rng.uniform(30, 220)), _one_off_colour(rng), facing)


def _nothing(img, rng, cx, bottom, s):
    """Motion with nothing to see: wind, a shadow, the light changing."""


ONE_OFF_DRAW: dict[str, Drawer] = {"person": _stranger, "vehicle": _passing_car, "animal": _dog, "motion": _nothing}


@dataclass
class EventSpec:
    order: int  # creation order, the last tie-breaker of the sort
    started_at: datetime
    camera: str
    label: str
    visitor: Visitor | None
    draw: Drawer
    event_id: str = ""
    thumbnail: str = ""  # spelling: one of BASE64_SPELLINGS, "file" or a corruption
    seed: int = 0


def visitor_counts(n_events: int) -> list[int]:
    return [max(3, int(round(v.share * n_events))) for v in VISITORS]


def _lighting(rng: np.random.Generator, hour: int) -> float:
    base = 1.0 if 7 <= hour <= 17 else 0.85 if hour in (6, 18, 19) else 0.68
    return base * float(rng.uniform(0.9, 1.1))


def _time(rng: np.random.Generator, hours: tuple[int, int], weekdays_only: bool) -> datetime:
    days = [d for d in range(N_DAYS) if not weekdays_only or (FIRST_DAY + timedelta(days=d)).weekday() < 6]
    day = days[int(rng.integers(len(days)))]
    hour = int(rng.integers(hours[0], hours[1] + 1))
    return FIRST_DAY + timedelta(days=day, hours=hour, minutes=int(rng.integers(60)), seconds=int(rng.integers(60)))


def _one_off_time(rng: np.random.Generator) -> datetime:
    weights = np.array([0.4] * 6 + [1.0] * 16 + [0.6] * 2)  # quieter at night
    hour = int(rng.choice(24, p=weights / weights.sum()))
    return _time(rng, (hour, hour), False)


def plan_events(n_events: int, seed: int) -> list[EventSpec]:
    """Who appears where and when, sorted by start time, with ids and thumbnail spellings."""
    rng = np.random.default_rng([seed, 1])
    specs: list[EventSpec] = []
    for visitor, count in zip(VISITORS, visitor_counts(n_events)):
        cams, weights = zip(*visitor.cameras)
        for _ in range(count):
            camera = cams[int(rng.choice(len(cams), p=np.array(weights) / sum(weights)))]
            started = _time(rng, visitor.hours, visitor.weekdays_only)
            specs.append(EventSpec(len(specs), started, camera, visitor.label, visitor, visitor.draw))
    labels, label_weights = zip(*ONE_OFF_LABELS)
    while len(specs) < n_events:
        label = labels[int(rng.choice(len(labels), p=np.array(label_weights)))]
        camera = CAMERAS[int(rng.integers(len(CAMERAS)))]
        specs.append(EventSpec(len(specs), _one_off_time(rng), camera, label, None, ONE_OFF_DRAW[label]))
    specs.sort(key=lambda e: (e.started_at, e.camera, e.order))
    for number, spec in enumerate(specs, start=1):
        spec.event_id = f"evt-{number:05d}"
        spec.seed = number
    _assign_thumbnail_spellings(specs, rng)
    return specs


def _assign_thumbnail_spellings(specs: list[EventSpec], rng: np.random.Generator) -> None:
    """Five one-offs get a corruption each; ~15% of the rest are files; the others are
    base64 in exact proportions, every spelling at least once."""
    one_offs = [i for i, e in enumerate(specs) if e.visitor is None]
    broken = sorted(int(i) for i in rng.choice(one_offs, size=len(CORRUPTIONS), replace=False))
    for index, kind in zip(broken, CORRUPTIONS):
        specs[index].thumbnail = kind
    healthy = [i for i in range(len(specs)) if not specs[i].thumbnail]
    n_files = int(round(FILE_SHARE * len(specs)))
    files = set(int(i) for i in rng.choice(healthy, size=n_files, replace=False))
    rest = [i for i in healthy if i not in files]
    spellings = []
    for name, share in BASE64_SPELLINGS[1:]:
        spellings += [name] * max(1, int(round(share * len(rest))))
    spellings += [BASE64_SPELLINGS[0][0]] * (len(rest) - len(spellings))
    for index, spelling in zip(rest, rng.permutation(spellings)):
        specs[index].thumbnail = str(spelling)
    for index in files:
        specs[index].thumbnail = "file"


def render_event(spec: EventSpec, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2, spec.seed])
    (x_lo, x_hi), (y_lo, y_hi), size = STAGE[spec.camera]
    cx, bottom = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
    scale = size * float(rng.uniform(0.85, 1.15)) * (0.75 + 0.25 * (bottom - y_lo) / (y_hi - y_lo + 1e-9))
    lighting = _lighting(rng, spec.started_at.hour)
    draw_rng = np.random.default_rng([seed, 3, spec.seed])
    return render_thumbnail(spec.camera, CAMERA_SEEDS[spec.camera], rng, lighting,
                            lambda img: spec.draw(img, draw_rng, cx, bottom, scale))


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, subsampling=2)
    return buffer.getvalue()


def spell_base64(data: bytes, spelling: str) -> str:
    if spelling == "base64":
        return base64.b64encode(data).decode("ascii")
    if spelling == "data_uri":
        return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    if spelling == "base64url_nopad":
        return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
    if spelling == "base64_wrapped":
        return base64.encodebytes(data).decode("ascii")  # 76-character lines, as MIME writes them
    raise ValueError(f"unknown base64 spelling {spelling!r}")


@dataclass(frozen=True)
class EventsOutput:
    events_path: Path
    events_truth_path: Path
    thumbnails_dir: Path
    events: int
    corrupted: int
    visitors: int
    visitor_events: int
    file_thumbnails: int
    cameras: int
    days: int


def _thumbnail_fields(spec: EventSpec, jpeg: bytes, thumbnails_dir: Path, events_dir: Path) -> dict[str, str]:
    """The event's thumbnail column, writing any file it points to."""
    relative = f"{spec.camera}/{spec.event_id}.jpg"
    kind = spec.thumbnail
    if kind == "file":
        path = thumbnails_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg)
        return {"thumbnail_path": relative}
    if kind == "truncated_jpeg":
        return {"thumbnail_base64": base64.b64encode(jpeg[: len(jpeg) * 2 // 5]).decode("ascii")}
    if kind == "not_an_image":
        return {"thumbnail_base64": base64.b64encode(b"<html><body>502 Bad Gateway</body></html>\n").decode("ascii")}
    if kind == "invalid_base64":
        return {"thumbnail_base64": "not base64 at all: ###!!!***"}
    if kind == "missing_file":
        return {"thumbnail_path": relative}  # never written
    if kind == "path_escape":
        # A real JPEG outside the thumbnails root: only a containment check refuses it.
        (events_dir / f"{spec.event_id}.jpg").write_bytes(jpeg)
        return {"thumbnail_path": f"../{events_dir.name}/{spec.event_id}.jpg"}
    return {"thumbnail_base64": spell_base64(jpeg, kind)}


def write_events(root: Path, n_events: int, seed: int) -> EventsOutput:
    """Write `root/events/events.jsonl`, `root/events/events_truth.json` and `root/thumbnails/`."""
    if n_events < MIN_EVENTS:
        raise ValueError(f"n_events must be at least {MIN_EVENTS} (five visitors, five corrupted), got {n_events}")
    events_dir, thumbnails_dir = root / "events", root / "thumbnails"
    events_dir.mkdir(parents=True, exist_ok=True)
    thumbnails_dir.mkdir(parents=True, exist_ok=True)
    specs = plan_events(n_events, seed)
    lines = []
    for spec in specs:
        record = {"id": spec.event_id, "camera_id": spec.camera, "started_at": spec.started_at.isoformat(),
                  "label": spec.label}
        record.update(_thumbnail_fields(spec, jpeg_bytes(render_event(spec, seed)), thumbnails_dir, events_dir))
        lines.append(json.dumps(record))
    events_path = events_dir / "events.jsonl"
    events_path.write_text("\n".join(lines) + "\n")
    corrupted = {s.event_id: s.thumbnail for s in specs if s.thumbnail in CORRUPTIONS}
    truth = {
        "visitors": {s.event_id: (s.visitor.name if s.visitor else None) for s in specs},
        "corrupted": sorted(corrupted),
        "corruption": corrupted,
        "thumbnail_encoding": {s.event_id: s.thumbnail for s in specs},
        "visitor_names": [v.name for v in VISITORS],
        "cameras": list(CAMERAS),
        "first_day": FIRST_DAY.date().isoformat(),
        "last_day": (FIRST_DAY + timedelta(days=N_DAYS - 1)).date().isoformat(),
        "thumbnail_size": [THUMB_W, THUMB_H],
    }
    truth_path = events_dir / "events_truth.json"
    truth_path.write_text(json.dumps(truth, indent=1) + "\n")
    return EventsOutput(
        events_path, truth_path, thumbnails_dir, len(specs), len(corrupted), len(VISITORS),
        sum(1 for s in specs if s.visitor), sum(1 for s in specs if s.thumbnail == "file"),
        len({s.camera for s in specs}), len({s.started_at.date() for s in specs}),
    )
