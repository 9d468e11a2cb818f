"""outdir.written_dir: publish into new, empty or qatext-owned directories; never touch a user's file."""

import errno
import tempfile

import pytest

from qatext.outdir import MANIFEST_NAME, check_not_source, owned_files, written_dir


def write(out, files, overwrite=False):
    with written_dir(out, overwrite) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_new_directory_gets_a_manifest(tmp_path):
    write(tmp_path / "out", {"a.json": "1", "b.bin": "2"})
    assert owned_files(tmp_path / "out") == {"a.json", "b.bin"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST_NAME, "a.json", "b.bin"]


def test_rewrite_replaces_and_removes_only_qatexts_files(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.json": "1", "old.bin": "2"})
    (out / "mine.txt").write_text("user")
    with pytest.raises(ValueError, match="pass --overwrite"):
        write(out, {"a.json": "3"})
    write(out, {"a.json": "3"}, overwrite=True)
    assert (out / "a.json").read_text() == "3" and not (out / "old.bin").exists()
    assert (out / "mine.txt").read_text() == "user" and owned_files(out) == {"a.json"}


def test_a_users_file_of_the_same_name_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.json": "1"})
    (out / "tokenizer.json").write_text("user's")
    with pytest.raises(ValueError, match=r"files of yours that qatext would replace \(tokenizer.json\)"):
        write(out, {"a.json": "2", "tokenizer.json": "ours"}, overwrite=True)
    assert (out / "tokenizer.json").read_text() == "user's" and (out / "a.json").read_text() == "1"


def test_failure_inside_leaves_everything_as_it_was(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.json": "1"})
    with pytest.raises(RuntimeError):
        with written_dir(out, overwrite=True) as tmp:
            (tmp / "a.json").write_text("half")
            raise RuntimeError("disk full")
    assert (out / "a.json").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_parent_names_the_users_path(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".out.x1y2"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError) as e:
        write(tmp_path / "out", {"a": "1"})
    assert str(e.value) == f"cannot write {tmp_path / 'out'}: Permission denied"


def test_the_source_directory_is_refused_however_spelled(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.chdir(tmp_path)
    for spelled in ("model", "model/", "./model/../model", str(model)):
        with pytest.raises(ValueError, match=f"--output {spelled} is the directory the model was read from"):
            check_not_source(spelled, model, "--output")
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(ValueError, match="read from"):
        check_not_source("link", "model")
    for other in ("model/export", "export", tmp_path):
        check_not_source(other, model)
    check_not_source(".", "")  # a model built in memory (no directory) has no source to protect
    check_not_source("model", None)
