"""Text datasets for language models: each split tokenised once by the model's tokenizer and
cached in data_dir/tokens; evaluation windows and calibration windows of seq_len tokens.

As in SparseGPT's and Wanda's scripts: WikiText's lines are joined with "\\n\\n" and tokenised as
one text; C4's validation documents with spaces; calibration windows start at random positions
of the training tokens, or (C4) lie inside random documents longer than seq_len.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from importlib import resources
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

from ..config import ConfigError
from ..config.options import TextDatasetConfig
from .hub import hub_reachable

log = logging.getLogger("prunebench")

SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}  # ours -> the Hub's
Split = Union[Tensor, List[str]]  # a token stream, or documents tokenised when drawn (C4's training shard)


@dataclass
class TextData:
    name: str
    splits: Dict[str, Split]
    tokenizer: object
    about: Dict[str, object] = field(default_factory=dict)  # what was used, for summary.json

    def num_tokens(self, split: str) -> Optional[int]:
        s = self.splits[split]
        return int(s.numel()) if isinstance(s, Tensor) else None

    def max_windows(self, split: str, seq_len: int) -> int:
        """How many windows of seq_len tokens the split holds without overlap."""
        s = self.splits[split]
        return int(s.numel()) // seq_len if isinstance(s, Tensor) else len(s)

    def eval_windows(self, split: str, seq_len: int, last_window: str, cap: Optional[int] = None) -> List[Tensor]:
        """Consecutive windows over the whole split; the shorter last one too unless dropped."""
        tokens = self.splits[split]
        whole = tokens.numel() // seq_len
        windows = list(tokens[:whole * seq_len].view(whole, seq_len)) if whole else []
        if last_window == "keep" and tokens.numel() - whole * seq_len >= 2:
            windows.append(tokens[whole * seq_len:])
        return windows[:cap] if cap else windows

    def calibration_windows(self, split: str, samples: int, seq_len: int, generator: torch.Generator) -> Tensor:
        """`samples` windows of seq_len tokens at random places (samples, seq_len)."""
        source = self.splits[split]
        if isinstance(source, Tensor):
            starts = torch.randint(0, source.numel() - seq_len + 1, (samples,), generator=generator)
            return torch.stack([source[s:s + seq_len] for s in starts.tolist()])
        return document_windows(source, self.tokenizer, samples, seq_len, generator)


def document_windows(documents: List[str], tokenizer, samples: int, seq_len: int,
                     generator: torch.Generator, max_draws: int = 1_000_000) -> Tensor:
    """Windows inside random documents longer than seq_len tokens (SparseGPT's C4 sampler)."""
    out = []
    for _ in range(max_draws):
        if len(out) == samples:
            return torch.stack(out)
        doc = documents[int(torch.randint(0, len(documents), (1,), generator=generator))]
        ids = tokenizer(doc, verbose=False)["input_ids"]
        if len(ids) > seq_len:
            start = int(torch.randint(0, len(ids) - seq_len, (1,), generator=generator))
            out.append(torch.tensor(ids[start:start + seq_len]))
    raise ConfigError(f"calibration: after {max_draws} draws only {len(out)} documents were longer than "
                      f"{seq_len} tokens; use a shorter dataset.seq_len")


# ------------------------------------------------------------------------------ loading
def tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_text(cfg: TextDatasetConfig, tokenizer, data_dir: str, splits: List[str]) -> TextData:
    """The named splits (train, val, test) of the dataset, tokenised (from the cache when there)."""
    loaded: Dict[str, Split] = {}
    about: Dict[str, object] = {"name": cfg.name, "source": describe_source(cfg)}
    for split in splits:
        if cfg.name == "c4" and split == "train":  # documents, tokenised only when drawn
            loaded[split] = c4_documents(cfg, "train")
            about["train_documents"] = len(loaded[split])
            continue
        key = hashlib.sha256(json.dumps([describe_source(cfg), split, source_stamp(cfg),
                                         tokenizer_key(tokenizer)]).encode()).hexdigest()[:16]
        cache = Path(data_dir) / "tokens" / f"{cfg.name}-{split}-{key}.pt"
        if cache.exists():
            loaded[split] = torch.load(cache, weights_only=True)
        else:
            text = split_text(cfg, split)
            loaded[split] = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
            save_cache(cache, loaded[split])
        about[f"{split}_tokens"] = int(loaded[split].numel())
    return TextData(cfg.name, loaded, tokenizer, about)


def save_cache(path: Path, tokens: Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(tokens, tmp)
        tmp.replace(path)
    except OSError as e:  # a read-only data_dir: tokenise again next time
        log.warning(f"could not cache the tokens in {path.parent}: {e.strerror or e}")


def describe_source(cfg: TextDatasetConfig) -> Dict[str, object]:
    if cfg.name == "text":
        return {"path": str(Path(cfg.path).resolve()), "test_fraction": cfg.test_fraction,
                "val_fraction": cfg.val_fraction}
    out = {"hub_name": cfg.hub_name, "hub_config": cfg.hub_config}
    if cfg.name == "c4":
        out.update(train_file=cfg.train_file, validation_file=cfg.validation_file, eval_documents=cfg.eval_documents)
    return out


def source_stamp(cfg: TextDatasetConfig) -> List[object]:
    """Size and modification time of local files, so an edited file is tokenised again."""
    root = Path(cfg.path if cfg.name == "text" else cfg.hub_name)
    if not root.exists():
        return []
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def split_text(cfg: TextDatasetConfig, split: str) -> str:
    if cfg.name == "text":
        return local_split(cfg, split)
    if cfg.name == "c4":
        if split != "test":
            raise ConfigError(f"dataset=c4 has a training shard and an evaluation split, no {split} split")
        return " ".join(c4_documents(cfg, "validation")[:cfg.eval_documents])
    rows = hub_split(cfg, split, name=cfg.hub_name, config=cfg.hub_config)
    return "\n\n".join(rows)


def local_split(cfg: TextDatasetConfig, split: str) -> str:
    path = Path(cfg.path)
    if path.is_dir():
        files = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
        file = path / files[split]
        if not file.exists():
            raise ConfigError(f"dataset.path={path} has no {files[split]} (the {split} split)")
        return file.read_text(encoding="utf-8")
    if not path.is_file():
        raise ConfigError(f"dataset.path={path}: no such file or directory")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    test_start = len(lines) - max(1, round(cfg.test_fraction * len(lines)))
    val_start = test_start - round(cfg.val_fraction * len(lines))
    if split == "val" and val_start == test_start:
        raise ConfigError(f"dataset.path={path} has no validation split (dataset.val_fraction=0)")
    parts = {"train": lines[:val_start], "val": lines[val_start:test_start], "test": lines[test_start:]}
    return "".join(parts[split])


def hub_split(cfg: TextDatasetConfig, split: str, **where) -> List[str]:
    """The `text` column of a split, through datasets.load_dataset (a local copy or the Hub)."""
    import datasets

    name = where.pop("name")
    local = Path(name).exists()
    if not local and not hub_reachable():
        raise ConfigError(f"dataset={cfg.name}: {name} is not cached in {cfg.name}'s token cache (data_dir/tokens) "
                          f"and the Hub cannot be reached from here: copy the dataset's files to a directory and set "
                          f"dataset.hub_name to it, or use dataset=text dataset.path=<a text file>")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, where.get("config"), data_files=where.get("data_files"),
                                   split=SPLIT_NAMES[split] if "data_files" not in where else "train")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"dataset={cfg.name}: {name} has no {split} split ({str(e).splitlines()[0]})") from None
    return list(ds["text"])


def c4_documents(cfg: TextDatasetConfig, shard: str) -> List[str]:
    file = cfg.train_file if shard == "train" else cfg.validation_file
    return hub_split(cfg, "train", name=cfg.hub_name, config=None, data_files=file)


def text_dataset(name: str, hub_name: Optional[str]) -> TextDatasetConfig:
    """A named text dataset's shipped settings (conf/dataset/<name>.yaml), or a local text file:
    what calibration.dataset names (calibration, and recovery.data=calibration)."""
    from omegaconf import OmegaConf

    if Path(name).is_file():
        return TextDatasetConfig(name="text", path=name)
    raw = OmegaConf.load(str(resources.files("prunebench.conf") / "dataset" / f"{name}.yaml"))
    raw.pop("defaults", None)
    if hub_name is not None:
        raw.hub_name = hub_name
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TextDatasetConfig), raw))
