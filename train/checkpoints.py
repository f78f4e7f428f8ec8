"""Checkpoints that a kill cannot leave half-written under their real name.

`checkpoint-N` is written as `checkpoint-N.partial` and renamed when whole; the last
file written into it is `controlforge_state.json`, which lists every other file with
its size. A folder under the real name without that file, or whose files do not have
the listed sizes (a weight file cut short by hand or by a dying disk), is incomplete:
`--resume latest` names it, moves it aside to `checkpoint-N.incomplete` and takes the
one before. Old checkpoints are removed only once the new one is complete.

The final model is written the same way: into `.model.partial/`, then each file is
renamed into the output folder (one rename per file; `train_state.json`, written last,
says the model is whole).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import torch

STATE_FILE = "controlforge_state.json"
NAME = re.compile(r"checkpoint-(\d+)")
PARTIAL, INCOMPLETE = ".partial", ".incomplete"


def checkpoints(output_dir: Path) -> list[Path]:
    """Folders named checkpoint-N (complete or not), oldest first; partial and moved-aside ones are not."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(NAME.fullmatch(path.name).group(1))


def _safetensors_fault(path: Path) -> str | None:
    """Why a .safetensors file is not whole (its header names where its data ends), or None."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return f"{path.name}: {size} bytes, shorter than a header"
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            return f"{path.name}: header of {length} bytes in a file of {size}"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return f"{path.name}: unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return None if 8 + length + end == size else f"{path.name}: {size} bytes, its header needs {8 + length + end}"


def incomplete_reason(path: Path) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE} (the save did not finish)"
    try:
        state = json.loads(state_file.read_text())
    except ValueError:
        return f"{STATE_FILE} is not valid JSON"
    for name, size in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} were written"
    for file in path.rglob("*.safetensors"):
        fault = _safetensors_fault(file)
        if fault:
            return fault
    return None


def _aside(path: Path) -> Path:
    target, n = path.with_name(path.name + INCOMPLETE), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{INCOMPLETE}-{n}")
    path.rename(target)
    return target


def latest_complete(output_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest whole checkpoint; newer incomplete ones are named and moved aside
    (kept, not deleted: a user may want to look at them)."""
    for path in reversed(checkpoints(output_dir)):
        why = incomplete_reason(path)
        if why is None:
            return path
        moved = _aside(path)
        log(f"skipping incomplete checkpoint {path.name}: {why}; moved to {moved.name}")
    return None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary name, flush to disk, rename: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + PARTIAL)
    with tmp.open("w") as handle:
        handle.write(json.dumps(data))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def rank_state_file(path: Path, rank: int) -> Path:
    return path / f"controlforge_rank{rank}.pt"


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int | None, rank_state: dict[str, Any],
                    state: dict[str, Any], ema_model=None, controlnet=None) -> Path:
    """accelerate's state (model, optimizer, lr schedule, RNG states per rank), each
    rank's `rank_state` (accelerate saves custom objects from rank 0 only, so a per-rank
    generator would come back wrong on the other ranks), `controlnet/` (the weights as a
    ControlNet folder that `from_pretrained` loads; the EMA weights when EMA is on), and
    `state` plus the file list in controlforge_state.json, last. All ranks call it."""
    final = Path(output_dir) / f"checkpoint-{step}"
    partial = final.with_name(final.name + PARTIAL)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    torch.save(rank_state, rank_state_file(partial, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if controlnet is not None:
            model = accelerator.unwrap_model(controlnet)
            if ema_model is not None:
                ema_model.store(model.parameters())
                ema_model.copy_to(model.parameters())
            model.save_pretrained(partial / "controlnet")
            if ema_model is not None:
                ema_model.restore(model.parameters())
        _fsync_tree(partial)
        write_json_atomic(partial / STATE_FILE, {**state, "global_step": step, "files": _sizes(partial)})
        if final.exists():  # a step saved again (a resumed run that ran past an older copy)
            replaced = _aside(final)
            os.replace(partial, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(partial, final)
        if keep:
            for old in checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
    """This rank's saved state (None in checkpoints from before it was saved per rank)."""
    file = rank_state_file(path, rank)
    return torch.load(file, weights_only=True) if file.is_file() else None


def _fsync_tree(folder: Path) -> None:
    """Data on disk before the state file says it is there (a power cut, not only a kill)."""
    for file in folder.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_model_atomic(model, output_dir: Path, state: dict[str, Any]) -> None:
    """`save_pretrained` into a partial folder, then each file renamed into `output_dir`,
    and `train_state.json` (the run's summary) written last."""
    partial = Path(output_dir) / ".model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    _fsync_tree(partial)
    for file in sorted(partial.iterdir()):
        os.replace(file, Path(output_dir) / file.name)
    partial.rmdir()
    write_json_atomic(Path(output_dir) / "train_state.json", state)
