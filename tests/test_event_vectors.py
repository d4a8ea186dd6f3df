"""The event vectors' JSON encoding (the inherited contract) and the test embedder the
events tests rely on."""

import numpy as np
import pytest

from cv_assets.store.vectors import vector_from_json, vector_to_json
from helpers.events import COLOURS, MeanColourEmbedder, jpeg_bytes


def test_vector_json_round_trips_float32_exactly():
    vector = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    vector /= np.linalg.norm(vector)
    text = vector_to_json(vector)
    assert text.startswith("[") and text.endswith("]")
    assert np.array_equal(vector_from_json(text), vector)
    assert len(text) < 512 * 14  # shorter than json.dumps of the float64 values (~19 chars each)


def test_vector_json_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        vector_to_json(np.array([0.1, np.nan], dtype=np.float32))


def test_mean_colour_embedder_separates_colours():
    embedder = MeanColourEmbedder()
    outcome = embedder.embed_sources([jpeg_bytes(COLOURS["red"]), b"junk", jpeg_bytes(COLOURS["blue"])],
                                     names=["a", "b", "c"])
    assert outcome.ok == [0, 2] and list(outcome.errors) == [1]
    assert "b" in outcome.errors[1]
    assert float(outcome.vectors[0] @ outcome.vectors[1]) < 0.0
