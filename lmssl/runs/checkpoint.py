"""Crash-safe checkpoints: write to a temporary folder, fsync, rename, then move ``latest``.

Layout of ``RUN_DIR/checkpoints/``::

    step_0000200/  model.safetensors  optimizer.pt  trainer_state.json  manifest.json
    latest         text file naming the newest complete checkpoint folder

``manifest.json`` (written last, inside the folder) lists every file's size and SHA-256,
so a partial or corrupted checkpoint is detected and skipped. Weights are safetensors;
the optimizer state is loaded with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmssl.errors import UserError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def state_dict_for_save(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of tied (shared-storage) tensors and make the rest contiguous;
    :func:`load_weights` re-ties them through ``load_state_dict(strict=False)``."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(state_dict_for_save(state), str(path), metadata=metadata or {"format": "pt"})


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into ``module``; only tied duplicates may be missing."""
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    really_missing = [m for m in missing if not _is_tied_alias(module, m, state)]
    if really_missing or unexpected:
        raise UserError(f"weights in {path} do not match the model (missing {really_missing[:3]}, unexpected "
                        f"{unexpected[:3]}); was the checkpoint made with a different model config?")


def _is_tied_alias(module: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> bool:
    params = dict(module.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    target = params[name]
    return any(p is target and n in state for n, p in params.items() if n != name)


@dataclass
class Checkpoint:
    path: Path
    step: int


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and rotate old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_weights(model_state, tmp / "model.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        manifest = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():  # same step saved again (e.g. the final save after a periodic one)
            old = root / f".{name}.old{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(root)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap failed writes
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"could not write checkpoint step {step} to {root} ({reason}); free disk space and run "
                        "the same command again: earlier checkpoints are intact") from None
    atomic_write_text(root / "latest", name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete-looking checkpoint folders, oldest first (temporary folders excluded)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit():
            found.append(Checkpoint(d, int(d.name[5:])))
    return sorted(found, key=lambda c: c.step)


def verify(path: Path) -> str | None:
    """``None`` if the checkpoint folder is complete and its checksums match, else why not."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (the save was interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "manifest.json is not valid JSON"
    for name, info in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['bytes']}"
        if _sha256(f) != info["sha256"]:
            return f"{name} fails its checksum"
    return None


def find_resumable(run_dir: Path, log=print) -> Checkpoint | None:
    """The newest checkpoint that verifies, starting from ``latest``; corrupt ones are
    reported and skipped."""
    candidates = list_checkpoints(run_dir)[::-1]
    latest_file = run_dir / "checkpoints" / "latest"
    if latest_file.is_file():
        name = latest_file.read_text().strip()
        candidates.sort(key=lambda c: c.path.name != name)
    for c in candidates:
        problem = verify(c.path)
        if problem is None:
            return c
        log(f"warning: checkpoint {c.path} is unusable ({problem}); falling back to an earlier one")
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def load_optimizer_state(path: Path) -> dict:
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
