"""A backfill worker process for tests/test_scale_backfill.py (standing in for a pod):
`python tests/helpers/backfill_worker.py URL THUMBS LOG [--hold MARKER | --start-when GO]`.

It runs `embed_next_batch` until no event is left for it, appending the ids of each
stored batch to LOG. With --hold it claims one batch, writes the claimed ids to MARKER
from inside the embedder (the transaction still open) and then sleeps until killed.
With --start-when it writes LOG.ready once started and claims nothing until GO exists,
so workers whose processes started at different speeds begin together."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a child-process script: make `helpers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.events import MeanColourEmbedder  # noqa: E402

from cv_assets.events.backfill import BackfillLimits, embed_next_batch
from cv_assets.store import AppDatabase

BATCH = 5


class HoldingEmbedder(MeanColourEmbedder):
    def __init__(self, marker: Path):
        super().__init__()
        self.marker = marker

    def embed_sources(self, sources, names=None):
        claimed = [name.removeprefix("event ") for name in names]
        partial = self.marker.with_suffix(".tmp")
        partial.write_text(json.dumps(claimed))
        partial.rename(self.marker)
        time.sleep(600)  # killed by the test long before
        raise AssertionError("not killed")


def wait_to_start(log: Path, go: Path, timeout_sec: float = 120.0) -> None:
    Path(f"{log}.ready").touch()
    deadline = time.monotonic() + timeout_sec
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{go} never appeared")
        time.sleep(0.01)


def main(argv: list[str]) -> int:
    url, thumbs, log = argv[:3]
    db = AppDatabase(url)
    limits = BackfillLimits(max_batch=100, max_attempts=3, thumbnails_root=Path(thumbs), thumbnail_max_bytes=1_000_000)
    embedder = HoldingEmbedder(Path(argv[4])) if argv[3:4] == ["--hold"] else MeanColourEmbedder()
    if argv[3:4] == ["--start-when"]:
        wait_to_start(Path(log), Path(argv[4]))
    with open(log, "a") as out:
        while True:
            batch = embed_next_batch(db, embedder, limits, batch_size=BATCH)
            if not batch.outcomes:
                return 0
            out.write(json.dumps([o.event_id for o in batch.outcomes if o.status == "embedded"]) + "\n")
            out.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
