"""Tests for tfquant.files' atomic writes: contents, replacement, permissions, and nothing left on failure."""
import os

import pytest

from tfquant import files


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_write_atomically_writes_text_as_utf8_and_bytes_as_they_are(tmp_path):
    text_path, bytes_path = tmp_path / "a.json", tmp_path / "b.bin"
    files.write_atomically(text_path, "größe {}\n")
    files.write_atomically(bytes_path, b"\x00\xffabc")
    assert text_path.read_bytes() == "größe {}\n".encode("utf-8")
    assert bytes_path.read_bytes() == b"\x00\xffabc"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin"]


def test_written_files_get_the_umask_mode_of_ordinary_output_files(tmp_path, umask_022):
    # A report or checkpoint state another user of the run directory must read: 0644 under umask 022, not the
    # private 0600 of a temporary file.
    path = tmp_path / "report.json"
    files.write_atomically(path, "{}")
    assert os.stat(path).st_mode & 0o777 == 0o644
    with files.atomic_writer(tmp_path / "model.tfq") as handle:
        handle.write(b"x")
    assert os.stat(tmp_path / "model.tfq").st_mode & 0o777 == 0o644


def test_atomic_writer_replaces_only_a_complete_file(tmp_path):
    path = tmp_path / "state"
    path.write_bytes(b"old")
    with files.atomic_writer(path) as handle:
        handle.write(b"new ")
        assert path.read_bytes() == b"old"  # readers see the old file while the new one is written
        handle.write(b"contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["state"]


@pytest.mark.parametrize("error", [ValueError("bad tensor"), KeyboardInterrupt()])
def test_a_failure_inside_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    path = tmp_path / "state"
    path.write_bytes(b"old")
    with pytest.raises(type(error)):
        with files.atomic_writer(path) as handle:
            handle.write(b"half")
            raise error
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state"]


def test_a_missing_directory_raises_oserror_and_creates_nothing(tmp_path):
    with pytest.raises(OSError):
        files.write_atomically(tmp_path / "absent" / "state", "x")
    assert os.listdir(tmp_path) == []
