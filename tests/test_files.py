"""craftfn._files.atomic_write: the one atomic writer behind tokenizer files, token shards and run files."""

import os

import pytest

from craftfn import _files
from craftfn.data import atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "tokenizer.json"
    target.write_text("old")

    def produce(write):
        write(b"half of the new ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _files.atomic_write(target, produce)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["tokenizer.json"]


def test_write_replaces_whole_with_umask_mode_and_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real = _files.fsync_path
    monkeypatch.setattr(_files, "fsync_path", lambda p: (synced.append(os.fspath(p)), real(p)))
    target = tmp_path / "sub" / "notes.txt"
    atomic_write_text(target, "première\n")
    atomic_write_text(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert sorted(os.listdir(target.parent)) == ["notes.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    # The new folder and each rename are made durable: the parent of the folder it created, then the
    # folder holding the new name after each write.
    assert synced == [str(tmp_path), str(target.parent), str(target.parent)]
