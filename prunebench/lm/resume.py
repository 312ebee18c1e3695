"""A language-model run that is killed, preempted or stopped resumes from its last finished block.

The run directory holds, while the run is in progress:

- `checkpoint.pt` (runs/checkpoint.py's format: digest-checked, written atomically): the records so
  far (the dense perplexity: not measured again), how many blocks are pruned, their pruning
  seconds, the digest of every file below, and once pruning is over its figures and the
  pruned perplexity;
- `checkpoint_blocks/block_<i>.pt`: block i's pruned (and, for SparseGPT, reconstructed)
  weights, written once when the block is done: all of them together are the prunable weights'
  size, never a copy of the whole model per block;
- `checkpoint_blocks/inputs_<i>.pt`: the hidden states and keyword arguments entering block i,
  the next one to prune (replaced after each block).

Each file is written beside its final name, flushed and renamed; checkpoint.pt is replaced last,
so a kill at any moment leaves a consistent set. A resumed run loads the finished blocks into the
freshly loaded model and goes on from the next block's saved inputs: on the same device and
versions its weights and numbers are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..runs import checkpoint
from ..runs.checkpoint import CheckpointError
from .blockwise import BlockInput, BlockProgress

log = logging.getLogger("prunebench")

BLOCKS_DIR = "checkpoint_blocks"
CHUNK = 1 << 24


class HashingFile:
    """A file being written, with the sha256 of everything written so far."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_tensors(path: Path, obj: Any) -> str:
    """torch.save(obj) to `path` atomically, streamed (no copy in memory); returns its sha256."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            out = HashingFile(f)
            torch.save(obj, out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_directory(path.parent)  # the rename survives a crash of the machine before checkpoint.pt names it
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {e.strerror or e} (is the disk full?); the run stops "
                              f"here") from None
    return out.digest.hexdigest()


def sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tensors(path: Path, digest: str) -> Any:
    """What write_tensors wrote, after checking its digest (tensors and plain values only)."""
    how = "delete the run's checkpoint.pt, or run with checkpoint.resume=false to start over"
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}); {how}") from None
    if h.hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the digest checkpoint.pt holds; {how}")
    return torch.load(path, map_location="cpu", weights_only=True)


def plain(obj: Any) -> bool:
    """Whether torch.load(weights_only=True) can read `obj` back: tensors, numbers, strings, None,
    and lists, tuples and dicts of them."""
    if obj is None or isinstance(obj, (Tensor, bool, int, float, str, torch.dtype, torch.device)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and plain(v) for k, v in obj.items())
    return False


def moved(obj: Any, device) -> Any:
    """`obj` with every tensor in it on `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: moved(v, device) for k, v in obj.items()}
    return obj


def inputs_state(inputs: List[BlockInput]) -> Dict[str, Any]:
    """Block inputs on the CPU; keyword arguments shared by batches (one dict per batch shape) once."""
    kwargs: List[Dict[str, Any]] = []
    which = []
    for _, kw in inputs:
        index = next((k for k, seen in enumerate(kwargs) if seen is kw), None)
        if index is None:
            kwargs.append(kw)
            index = len(kwargs) - 1
        which.append(index)
    return {"hidden": [h.cpu() for h, _ in inputs], "kwargs": [moved(kw, "cpu") for kw in kwargs], "which": which}


def inputs_from(state: Dict[str, Any], device) -> List[BlockInput]:
    kwargs = [moved(kw, device) for kw in state["kwargs"]]
    return [(h.to(device), kwargs[k]) for h, k in zip(state["hidden"], state["which"])]


# ------------------------------------------------------------------------------ one run's
def saved_run(out_dir: Path, config: Dict[str, Any], device: torch.device, dtype: torch.dtype,
              resume: bool) -> Optional[Dict[str, Any]]:
    """The run's checkpoint when there is one to resume from (checked against this configuration,
    dtype and device); otherwise leftovers of an earlier run are removed."""
    path = Path(out_dir) / checkpoint.FILE
    if not resume or not path.exists():
        discard(out_dir)
        return None
    saved = checkpoint.load(path)
    checkpoint.check_same_config(f"{path} is a checkpoint", json.loads(saved["config"]), config)
    if saved.get("kind") != "causal_lm":
        raise CheckpointError(f"{path} is not a language-model run's checkpoint; checkpoint.resume=false starts over")
    if saved["dtype"] != name_of(dtype):
        raise CheckpointError(f"{path} was written with {saved['dtype']} weights and this run loads {name_of(dtype)} "
                              f"(model.dtype=auto on another device?): set model.dtype={saved['dtype']}, or "
                              f"checkpoint.resume=false to start over")
    if saved["device"] != str(device):
        log.warning(f"the checkpoint was written on {saved['device']} and resumes on {device}: the numbers will "
                    f"not be bit-identical to an uninterrupted run")
    return saved


def discard(out_dir: Path) -> None:
    (Path(out_dir) / checkpoint.FILE).unlink(missing_ok=True)
    shutil.rmtree(Path(out_dir) / BLOCKS_DIR, ignore_errors=True)


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class LMCheckpoints(BlockProgress):
    """Writes one language-model run's checkpoint.pt and block files, and resumes from them."""

    def __init__(self, out_dir: Path, config: Dict[str, Any], device: torch.device, dtype: torch.dtype,
                 records: Callable[[], Dict[str, Any]], started: float, saved: Optional[Dict[str, Any]] = None):
        self.out_dir, self.dir = Path(out_dir), Path(out_dir) / BLOCKS_DIR
        self.records, self.started = records, started
        self.resumable = True  # false once a block's inputs hold what a checkpoint cannot
        self.state: Dict[str, Any] = saved or {
            "format": checkpoint.FORMAT, "kind": "causal_lm", "config": json.dumps(config), "device": str(device),
            "dtype": name_of(dtype), "blocks_done": 0, "block_seconds": [], "files": {}, "inputs": None,
            "checkpoint_seconds": 0.0, "pruning": None, "pruned": None}
        self.state["device"] = str(device)

    def save(self, where: str) -> None:
        """checkpoint.pt as the run stands: replaced last, after the files it names."""
        from transformers import __version__ as transformers_version

        self.state.update(where=where, records=self.records(), seconds=time.perf_counter() - self.started,
                          versions={"torch": str(torch.__version__), "transformers": transformers_version})
        self.dir.mkdir(exist_ok=True)
        checkpoint.save(self.out_dir / checkpoint.FILE, self.state)

    def pruned(self, pruning: Dict[str, Any], perplexity: Dict[str, Any]) -> None:
        """Pruning is over: its figures and the pruned perplexity, so a resumed run skips both."""
        self.state.update(pruning=pruning, pruned=perplexity)
        self.save("pruned")

    def remove(self) -> None:
        discard(self.out_dir)

    # ---------------------------------------------------------------- BlockProgress
    def start(self, model: nn.Module, device: torch.device
              ) -> Tuple[int, Optional[List[BlockInput]], List[float], List[str]]:
        """The finished blocks' weights into `model`; the next block's index and inputs."""
        done, files = self.state["blocks_done"], self.state["files"]
        params = dict(model.named_parameters())
        with torch.no_grad():
            for i in range(done):
                for name, weight in read_tensors(self.dir / f"block_{i}.pt", files[f"block_{i}.pt"]).items():
                    params[name].copy_(weight)
        name = self.state["inputs"]
        inputs = inputs_from(read_tensors(self.dir / name, files[name]), device) if name else None
        if done:
            log.info(f"resuming block-by-block pruning at block {done + 1}: blocks 1-{done} loaded from {self.dir}")
        return done, inputs, list(self.state["block_seconds"]), list(self.state.get("uncalibrated", []))

    def block_done(self, index: int, blocks: int, weights: Dict[str, Tensor], next_inputs: Optional[List[BlockInput]],
                   seconds: float, uncalibrated: List[str]) -> None:
        """Block `index` is pruned: its weights once, the inputs of the next block, then checkpoint.pt."""
        if not self.resumable or (next_inputs is not None and not self.can_hold(next_inputs)):
            return
        t0 = time.perf_counter()
        self.dir.mkdir(exist_ok=True)
        files, old = self.state["files"], self.state["inputs"]
        files[f"block_{index}.pt"] = write_tensors(self.dir / f"block_{index}.pt", weights)
        new = f"inputs_{index + 1}.pt" if next_inputs is not None else None
        if new:
            files[new] = write_tensors(self.dir / new, inputs_state(next_inputs))
        files.pop(old, None)
        self.state["block_seconds"].append(seconds)
        self.state.update(blocks_done=index + 1, inputs=new, uncalibrated=list(uncalibrated))
        self.state["checkpoint_seconds"] += time.perf_counter() - t0
        self.save(f"block {index + 1}/{blocks}")
        if old:
            (self.dir / old).unlink(missing_ok=True)  # checkpoint.pt no longer names it

    def can_hold(self, inputs: List[BlockInput]) -> bool:
        if all(plain(kw) for _, kw in inputs):
            return True
        self.resumable = False
        kinds = sorted({type(v).__name__ for _, kw in inputs for v in kw.values() if not plain(v)})
        log.warning(f"the decoder blocks take arguments of type {', '.join(kinds)}, which a checkpoint cannot hold "
                    f"safely: block-by-block pruning will start over if this run is stopped")
        return False
