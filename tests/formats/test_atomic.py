"""Atomic writes: whole-directory replacement, nothing torn or left behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from torchcompress.errors import InputError
from torchcompress.formats.atomic import atomic_directory, atomic_write_bytes


def _tree(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_creates_new_directory_and_parents(tmp_path):
    out = tmp_path / "a" / "b" / "model"
    with atomic_directory(out) as tmp:
        assert tmp != out and tmp.parent == out.parent and tmp.is_dir()
        assert not out.exists()  # nothing visible until the block succeeds
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"123")
    assert _tree(out) == ["config.json", "sub", "sub/x.bin"]
    assert (out / "sub" / "x.bin").read_bytes() == b"123"
    assert _leftovers(out.parent) == []


def test_replaces_existing_directory_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old_only.txt").write_text("old")
    (out / "shared.txt").write_text("old")
    with atomic_directory(out) as tmp:
        (tmp / "shared.txt").write_text("new")
        assert (out / "old_only.txt").read_text() == "old"  # old output intact while writing
    assert _tree(out) == ["shared.txt"]  # no merge: stale files are gone
    assert (out / "shared.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []  # old copy and temp dir removed


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_keeps_old_directory_and_removes_temp(tmp_path, exc):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"old weights")
    with pytest.raises(type(exc)):
        with atomic_directory(out) as tmp:
            (tmp / "weights.bin").write_bytes(b"half-writ")
            raise exc
    assert _tree(out) == ["weights.bin"]
    assert (out / "weights.bin").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_exception_without_previous_output_leaves_nothing(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ValueError):
        with atomic_directory(out) as tmp:
            (tmp / "a").write_text("x")
            raise ValueError("fail")
    assert list(tmp_path.iterdir()) == []


def test_parent_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError) as ei:
        with atomic_directory(blocker / "model"):
            pass
    assert "model" in str(ei.value)
    with pytest.raises(InputError):
        atomic_write_bytes(blocker / "x.bin", b"1")


def test_target_is_a_file(tmp_path):
    target = tmp_path / "model"
    target.write_text("not a dir")
    with pytest.raises(InputError):
        with atomic_directory(target):
            pass
    assert target.read_text() == "not a dir"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(InputError):
            with atomic_directory(ro / "model"):
                pass
        with pytest.raises(InputError):
            atomic_write_bytes(ro / "x.bin", b"1")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_unwritable_parent_via_access(tmp_path, monkeypatch):
    # runs as root too: the writability check is what turns the failure into an InputError
    real_access = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(ro) else real_access(p, mode, **k))
    with pytest.raises(InputError) as ei:
        with atomic_directory(ro / "model"):
            pass
    assert "not writable" in str(ei.value)
    assert list(ro.iterdir()) == []


def test_output_directory_has_normal_permissions(tmp_path):
    # tempfile.mkdtemp makes 0700 directories; a saved model must be readable like any mkdir'ed
    # directory (0777 & ~umask), e.g. by other users of a shared model cache
    umask = os.umask(0o022)
    os.umask(umask)
    plain = tmp_path / "plain"
    plain.mkdir()
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "f").write_text("x")
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_atomic_write_bytes(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.bin"]


def test_atomic_file_has_normal_permissions(tmp_path):
    # tempfile.mkstemp makes 0600 files; the renamed result should look like open(p, "wb") made it
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"x")
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
