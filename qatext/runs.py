"""A training run's directory: what produced its checkpoints (so a rerun resumes only the same run),
and which directories are qatext's to write into.

OUTPUT/checkpoints/run.json records the run's identity: method, quantization, the options that change
the result, and fingerprints of the model and the training tokens. A rerun whose identity differs is
refused with every difference listed, unless it asks to restart."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .outdir import MANIFEST_NAME

RUN_NAME = "run.json"
LOG_NAME = "train_log.json"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def model_fingerprint(model_dir) -> dict:
    """The model's config and the sizes of its weight files (hashing gigabytes of weights at every
    start would cost more than it protects)."""
    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"config_sha256": file_sha256(model_dir / "config.json"),
            "weight_bytes": sum(p.stat().st_size for p in weights)}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_run_dir(out: Path) -> None:
    """OUTPUT must be new, empty, or a directory an earlier `qatext train` wrote."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a directory; choose another path (the file was left "
                         "as it is)")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / "checkpoints" / RUN_NAME).exists() or (out / "model" / MANIFEST_NAME).exists()
        if not ours:
            raise ValueError(f"--output-dir {out} is not empty and is not a qatext run directory; choose a new or "
                             "empty directory (nothing in it was touched)")


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The settings that differ, as "key old -> new" (a setting left to its default reads "(default)")."""
    def shown(value):
        return "(default)" if value is None else value

    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {shown(a)} -> {shown(b)}")
    return out


def check_resume(out: Path, identity: dict, restart: bool) -> bool:
    """Whether this run resumes OUTPUT/checkpoints (read only; every rank may call it): True for the
    same run, False for a fresh one or --restart; a different or unrecorded run is refused."""
    checkpoints = out / "checkpoints"
    record = checkpoints / RUN_NAME
    if restart:
        return False
    if record.exists():
        try:
            old = json.loads(record.read_text())
        except ValueError:
            raise ValueError(f"{record} is corrupt; rerun with --restart to start over") from None
        changed = differences(old, identity)
        if changed:
            raise ValueError(f"{checkpoints} belongs to a different run ({'; '.join(changed)}); rerun with the "
                             "original settings to resume it, or pass --restart to start over (deletes its "
                             "checkpoints)")
        return True
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise ValueError(f"{checkpoints} holds checkpoints without a record of the run that wrote them; pass "
                         "--restart to start over")
    return False


def record_run(out: Path, identity: dict, restart: bool) -> None:
    """Write OUTPUT/checkpoints/run.json for a fresh run (after --restart: remove the old checkpoints
    and log first, both qatext's own). One process writes."""
    checkpoints = out / "checkpoints"
    if restart:
        shutil.rmtree(checkpoints, ignore_errors=True)
        (out / LOG_NAME).unlink(missing_ok=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    if not (checkpoints / RUN_NAME).exists():
        atomic_write_text(checkpoints / RUN_NAME, json.dumps(identity, indent=1))
