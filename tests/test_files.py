"""Atomic writes: a reader sees the old file or the complete new one, and a failed write leaves no trace."""

from __future__ import annotations

import pytest

from rnnlm.files import atomic_open, atomic_path, write_atomically


def test_write_atomically_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "meta.json"
    write_atomically(path, "first")
    write_atomically(path, "zweite Fassung ✓")
    assert path.read_text(encoding="utf-8") == "zweite Fassung ✓"
    write_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


@pytest.mark.parametrize("how", ["open", "path"])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, how):
    path = tmp_path / "ids.bin"
    path.write_bytes(b"old and complete")
    with pytest.raises(OSError, match="disk full"):
        if how == "open":
            with atomic_open(path) as f:
                f.write(b"half of the new")
                raise OSError("disk full")
        else:
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"half of the new")
                raise OSError("disk full")
    assert path.read_bytes() == b"old and complete"
    assert [p.name for p in tmp_path.iterdir()] == ["ids.bin"], "no temporary file left behind"


def test_a_failed_first_write_creates_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "new.bin") as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_the_target_is_unchanged_until_the_write_completes(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("old")
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("new")
        f.flush()
        assert path.read_text() == "old"  # a concurrent reader still sees the old file
        temporary = [p for p in tmp_path.iterdir() if p != path]
        assert len(temporary) == 1 and temporary[0].name.startswith(".tokenizer.json.")
    assert path.read_text() == "new"


def test_atomic_open_only_writes_whole_files(tmp_path):
    with pytest.raises(ValueError, match="must start with 'w'"), atomic_open(tmp_path / "x", "ab"):
        pass
