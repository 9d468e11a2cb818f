"""Directories qatext writes (saved models, exports): written whole into a temporary sibling, then
published file by file with os.replace, and recorded in a manifest so that a later write replaces
only qatext's own files. Nothing else in a directory is ever deleted or overwritten: a non-empty
directory without a manifest, a file at the target path, or a name clash with a user's file refuses."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST_NAME = ".qatext_manifest.json"


def owned_files(directory) -> set[str] | None:
    """The names qatext wrote into `directory` (from its manifest), or None where it has none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return set(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_target(out_dir, overwrite: bool) -> None:
    """Refuse, before any work, a target that would cost the user a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory; choose another path (the file was left as it is)")
    if out.is_dir() and any(out.iterdir()):
        owned = owned_files(out)
        if owned is None:
            raise ValueError(f"{out} is not empty and was not written by qatext; choose a new or empty directory "
                             "(nothing in it was touched)")
        if not overwrite:
            raise ValueError(f"{out} already holds files qatext wrote; pass --overwrite (overwrite=True) to replace "
                             "them (other files there are kept)")


def check_not_source(out_dir, source_dir, name: str = "out_dir") -> None:
    """Refuse to write an export into the directory its model was read from (`name`: the argument that
    gave out_dir): the export would replace that model's files (overwrite=True replaces an earlier output,
    never the input)."""
    if not source_dir or not Path(source_dir).is_dir():  # (a model built in memory has no directory)
        return
    if Path(out_dir).resolve() == Path(source_dir).resolve():
        raise ValueError(f"{name} {out_dir} is the directory the model was read from; exporting there would "
                         "replace the saved model with the export; choose another directory (nothing was written)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def written_dir(out_dir, overwrite: bool = False):
    """Yields an empty temporary directory; when the block succeeds its files are published into
    out_dir (each by one rename; qatext's earlier files there replaced or removed, every other file
    kept) and listed in out_dir's manifest. On error out_dir is untouched."""
    out = Path(out_dir)
    check_target(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir())
        manifest = json.dumps({"written_by": "qatext", "files": names}, indent=1)
        if not out.exists():
            (tmp / MANIFEST_NAME).write_text(manifest)
            os.replace(tmp, out)
            return
        old = owned_files(out) or set()
        clash = [n for n in names if n not in old and (out / n).exists()]
        if clash:
            raise ValueError(f"{out} holds files of yours that qatext would replace ({', '.join(clash)}); "
                             "move them or choose another directory")
        for name in names:
            if (out / name).is_dir():
                _remove(out / name)
            os.replace(tmp / name, out / name)
        for name in sorted(old - set(names)):
            _remove(out / name)
        (tmp / MANIFEST_NAME).write_text(manifest)
        os.replace(tmp / MANIFEST_NAME, out / MANIFEST_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
