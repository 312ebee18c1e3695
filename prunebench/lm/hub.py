"""Hugging Face models and datasets: found locally first, fetched from the Hub only when it can be
reached, and a clear one-line error when neither works (offline machines)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

from ..config import ConfigError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def hub_reachable(endpoint: Optional[str] = None) -> bool:
    """Whether the Hub's host resolves and accepts a connection (a second at most); never when
    HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    host = urlparse(endpoint or constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=1.0).close()
        return True
    except OSError:
        return False


def load_hf_config(name: str, revision: Optional[str], trust_remote_code: bool):
    """The model's transformers config: from a local directory, the Hub cache, or the Hub."""
    from transformers import AutoConfig

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise ConfigError(f"model.name={name} is a directory without config.json (what save_pretrained writes)")
        return AutoConfig.from_pretrained(name, **kwargs)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise ConfigError(f"model.name={name} is neither a local directory nor in the Hugging Face cache, and the "
                          f"Hub cannot be reached from here: download it where there is network (`hf download "
                          f"{name}`, then copy the cache or the folder) and set model.name to the local directory")
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except OSError as e:
        raise ConfigError(f"model.name={name}: {str(e).splitlines()[0]}") from None


def check_causal_lm(config, name: str) -> None:
    """The config belongs to an architecture AutoModelForCausalLM can build."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping and not getattr(config, "auto_map", {}).get("AutoModelForCausalLM"):
        raise ConfigError(f"model.name={name} is a {config.model_type} model, which is not a causal language "
                          f"model (AutoModelForCausalLM cannot load it)")


def empty_model(config, trust_remote_code: bool) -> nn.Module:
    """The architecture without weights (on the meta device): what can be checked before any
    weights or data are loaded."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def context_length(config) -> Optional[int]:
    """The longest sequence the model's positions cover, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_dtype(dtype: str, device: torch.device, config=None) -> torch.dtype:
    """model.dtype, or for auto: on a GPU the checkpoint's own dtype (a bfloat16 model's
    activations can pass float16's 65504), float32 where it names none or another; on a CPU
    float32 (its half-precision kernels are slow or missing)."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    return checkpoint_dtype(config) or torch.float32


def checkpoint_dtype(config) -> Optional[torch.dtype]:
    """The dtype the checkpoint's config names, when it is one of DTYPES (transformers 5:
    config.dtype; before: config.torch_dtype; a torch.dtype or its name)."""
    if config is None:
        return None
    value = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    return None if value is None else DTYPES.get(str(value).replace("torch.", ""))


def load_tokenizer(name: str, revision: Optional[str], trust_remote_code: bool, local_only: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                             local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name={name}: no tokenizer could be loaded ({str(e).splitlines()[0]})") from None


def load_model(name: str, revision: Optional[str], trust_remote_code: bool, dtype: torch.dtype,
               local_only: bool) -> nn.Module:
    """The pretrained causal LM on the CPU, in eval mode, in `dtype`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                                 dtype=dtype, local_files_only=local_only)
    model.config.use_cache = False  # whole windows, no generation: no key/value cache to fill
    return model.eval()


def decoder_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The stack of decoder blocks: the ModuleList of same-class modules holding the most
    parameters (model.decoder.layers in OPT, model.layers in LLaMA, transformer.h in GPT-2)."""
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no stack of decoder blocks (a ModuleList of layers) to "
                          f"prune block by block")
    return best[1], best[2]


def block_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """The prunable nn.Linear layers: every one inside the decoder blocks but a mixture of
    experts' routing gates (gating_linears), by weight name."""
    prefix, blocks = decoder_blocks(model)
    gates = gating_linears(blocks)
    out: Dict[str, nn.Linear] = {}
    for name, module in blocks.named_modules():
        if isinstance(module, nn.Linear) and name not in gates:
            out[f"{prefix}.{name}.weight"] = module
        elif type(module).__name__ == "Conv1D":  # GPT-2's transposed linear layers
            raise ConfigError(f"{type(model).__name__} computes its layers with transformers' Conv1D (weights "
                              f"stored transposed), which prunebench's layer-wise criteria do not handle; use an "
                              f"OPT, LLaMA, Mistral, Qwen or similar model with nn.Linear layers")
    if not out:
        raise ConfigError(f"the decoder blocks of {type(model).__name__} hold no nn.Linear layers to prune")
    return out


def is_expert_module(module: nn.Module) -> bool:
    """A module holding fused expert weights as its own 3-D parameters, one slice per expert (not
    a wrapper around one, as peft's LoRA on expert weights)."""
    count = getattr(module, "num_experts", None)
    down = module._parameters.get("down_proj")
    return (isinstance(count, int) and isinstance(down, nn.Parameter) and down.dim() == 3
            and down.shape[0] == count)


def gating_linears(model: nn.Module) -> set:
    """Names of the nn.Linear modules that route rather than compute: inside a block holding
    experts, those called gate or shared_expert_gate (Qwen2-MoE's sigmoid gate of its shared
    expert; routers that are nn.Linear in other families). They are not pruned, as llm-compressor's
    MoE recipes leave them: a few weights per expert that decide where every token goes."""
    names = set()
    for name, module in model.named_modules():
        if any(is_expert_module(m) for m in module.children()):
            for child_name, child in module.named_children():
                if isinstance(child, nn.Linear) and child_name in ("gate", "shared_expert_gate", "router"):
                    names.add(f"{name}.{child_name}" if name else child_name)
    return names


def library_versions() -> Dict[str, Any]:
    """What moves a language model's perplexity besides the config (the papers' issues: the
    transformers version changes numbers)."""
    import importlib.metadata

    import tokenizers
    import transformers

    def installed(package: str) -> Optional[str]:  # a run on text files alone needs no datasets
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"transformers": transformers.__version__, "datasets": installed("datasets"),
            "tokenizers": tokenizers.__version__, "lm_eval": installed("lm_eval"), "peft": installed("peft")}
