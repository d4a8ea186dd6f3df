"""Event thumbnails: base64 text and file paths, every way they can be wrong."""

from __future__ import annotations

import base64
import os

import pytest

from cv_assets.events.thumbnails import (
    ThumbnailError,
    base64_text_limit,
    decode_base64_thumbnail,
    load_thumbnail_bytes,
    read_thumbnail_file,
    resolve_thumbnail_path,
)

PAYLOAD = bytes(range(256)) * 3 + b"\xfb\xff\xfe"  # contains bytes that encode to + / (and - _ url-safe)


def decode(text, max_bytes=10_000):
    return decode_base64_thumbnail(text, event_id="evt-1", max_bytes=max_bytes)


# ---------------------------------------------------------------- base64


def test_plain_base64_decodes():
    assert decode(base64.b64encode(PAYLOAD).decode()) == PAYLOAD


def test_data_url_prefix_is_accepted():
    assert decode("data:image/jpeg;base64," + base64.b64encode(PAYLOAD).decode()) == PAYLOAD
    assert decode("DATA:image/png;BASE64," + base64.b64encode(PAYLOAD).decode()) == PAYLOAD


def test_whitespace_and_line_breaks_are_ignored():
    text = base64.encodebytes(PAYLOAD).decode()  # 76-character lines with \n
    assert "\n" in text
    assert decode("  " + text.replace("\n", "\r\n") + "\t ") == PAYLOAD


def test_urlsafe_alphabet_is_accepted():
    text = base64.urlsafe_b64encode(PAYLOAD).decode()
    assert "-" in text or "_" in text
    assert decode(text) == PAYLOAD


@pytest.mark.parametrize("cut", [1, 2])
def test_missing_padding_is_fixed(cut):
    data = PAYLOAD[:-cut]  # lengths that need padding
    text = base64.b64encode(data).decode().rstrip("=")
    assert decode(text) == data


def test_invalid_characters_are_an_error_not_dropped():
    text = base64.b64encode(PAYLOAD).decode()
    bad = text[:20] + "*" + text[21:]
    with pytest.raises(ThumbnailError, match=r"event evt-1: thumbnail_base64 is not valid base64"):
        decode(bad)


def test_impossible_length_is_reported_as_truncated():
    text = base64.b64encode(PAYLOAD).decode()[:41]  # 4k+1 characters
    with pytest.raises(ThumbnailError, match="impossible length"):
        decode(text)


def test_empty_base64_is_an_error():
    with pytest.raises(ThumbnailError, match="empty"):
        decode("data:image/png;base64,   ")


def test_non_image_data_url_is_refused():
    with pytest.raises(ThumbnailError, match="text/plain"):
        decode("data:text/plain;base64," + base64.b64encode(b"hello").decode())
    with pytest.raises(ThumbnailError, match="without ';base64'"):
        decode("data:image/png,rawbytes")


def test_size_is_checked_before_decoding():
    data = b"x" * 2100
    text = base64.b64encode(data).decode()
    with pytest.raises(ThumbnailError, match=r"decodes to 2100 bytes, over events.thumbnail_max_bytes=2048"):
        decode(text, max_bytes=2048)
    # Absurdly long text is refused on its length alone, before any normalising.
    huge = "A" * (base64_text_limit(2048) + 1)
    with pytest.raises(ThumbnailError, match="refused before decoding"):
        decode(huge, max_bytes=2048)
    assert decode(text, max_bytes=2100) == data


def test_non_text_base64_is_an_error():
    with pytest.raises(ThumbnailError, match="must be text"):
        decode(b"abcd")


# ---------------------------------------------------------------- file paths


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "thumbs"
    (root / "front_door").mkdir(parents=True)
    (root / "front_door" / "evt-1.jpg").write_bytes(PAYLOAD)
    return root


def read(raw, root, max_bytes=10_000):
    return read_thumbnail_file(raw, event_id="evt-1", root=root, max_bytes=max_bytes)


def test_relative_path_under_root_is_read(root):
    assert read("front_door/evt-1.jpg", root) == PAYLOAD


def test_absolute_path_inside_root_is_read(root):
    assert read(str(root / "front_door" / "evt-1.jpg"), root) == PAYLOAD


def test_dotdot_is_refused(root, tmp_path):
    (tmp_path / "secret.jpg").write_bytes(PAYLOAD)
    with pytest.raises(ThumbnailError, match=r"event evt-1: .*must not contain '\.\.'"):
        read("../secret.jpg", root)
    with pytest.raises(ThumbnailError, match=r"must not contain '\.\.'"):
        read("front_door/../../secret.jpg", root)


def test_absolute_path_elsewhere_is_refused(root, tmp_path):
    (tmp_path / "secret.jpg").write_bytes(PAYLOAD)
    with pytest.raises(ThumbnailError, match="outside storage.thumbnails_root"):
        read(str(tmp_path / "secret.jpg"), root)


def test_symlink_escaping_the_root_is_refused(root, tmp_path):
    (tmp_path / "secret.jpg").write_bytes(PAYLOAD)
    os.symlink(tmp_path / "secret.jpg", root / "front_door" / "link.jpg")
    os.symlink(tmp_path, root / "dirlink")
    with pytest.raises(ThumbnailError, match="outside storage.thumbnails_root"):
        read("front_door/link.jpg", root)
    with pytest.raises(ThumbnailError, match="outside storage.thumbnails_root"):
        read("dirlink/secret.jpg", root)


def test_symlink_inside_the_root_is_followed(root):
    os.symlink(root / "front_door" / "evt-1.jpg", root / "alias.jpg")
    assert read("alias.jpg", root) == PAYLOAD


def test_the_root_itself_is_refused(root):
    with pytest.raises(ThumbnailError, match="outside storage.thumbnails_root"):
        resolve_thumbnail_path(".", event_id="evt-1", root=root)


def test_missing_file_names_the_path(root):
    with pytest.raises(ThumbnailError, match=r"event evt-1: thumbnail file not found: .*front_door/nope.jpg"):
        read("front_door/nope.jpg", root)


def test_directory_is_refused(root):
    with pytest.raises(ThumbnailError, match="not a regular file \\(a directory\\)"):
        read("front_door", root)


def test_fifo_is_refused_without_opening_it(root):
    os.mkfifo(root / "pipe.jpg")
    # Opening a FIFO for reading with no writer would block forever: this returning proves it is never opened.
    with pytest.raises(ThumbnailError, match="not a regular file \\(a FIFO\\)"):
        read("pipe.jpg", root)


def test_device_is_refused(tmp_path):
    # /dev/null is a character device; make the root contain a link to it.
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(ThumbnailError, match="outside storage.thumbnails_root"):
        read("/dev/null", root)
    # A root that itself holds devices (e.g. mounted at /dev) still refuses them by type.
    with pytest.raises(ThumbnailError, match="a character device"):
        read("null", "/dev")


def test_empty_and_oversized_files_are_refused(root):
    (root / "empty.jpg").write_bytes(b"")
    with pytest.raises(ThumbnailError, match="is empty"):
        read("empty.jpg", root)
    with pytest.raises(ThumbnailError, match="over events.thumbnail_max_bytes=100"):
        read("front_door/evt-1.jpg", root, max_bytes=100)


def test_nul_and_blank_paths_are_refused(root):
    with pytest.raises(ThumbnailError, match="NUL"):
        read("a\x00b.jpg", root)
    with pytest.raises(ThumbnailError, match="empty"):
        read("  ", root)


# ---------------------------------------------------------------- choosing the source


def test_load_thumbnail_prefers_base64_and_needs_one(root):
    inline = base64.b64encode(b"inline").decode()
    assert load_thumbnail_bytes("e", inline, "front_door/evt-1.jpg", root=root, max_bytes=10_000) == b"inline"
    assert load_thumbnail_bytes("e", None, "front_door/evt-1.jpg", root=root, max_bytes=10_000) == PAYLOAD
    assert load_thumbnail_bytes("e", "  ", "front_door/evt-1.jpg", root=root, max_bytes=10_000) == PAYLOAD
    with pytest.raises(ThumbnailError, match="event e: has no thumbnail"):
        load_thumbnail_bytes("e", None, None, root=root, max_bytes=10_000)
