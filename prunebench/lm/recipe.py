"""The language-model recipe of SparseGPT and Wanda, top to bottom:

    load the model and tokenizer → tokenise the evaluation text and draw the calibration windows
    → dense perplexity → prune once (layer-wise criteria: block by block on the device)
    → pruned perplexity → [fine-tune with the masks held → perplexity] → save_pretrained

Perplexity = exp(mean next-token loss) over every token of the evaluation split (the papers'
windows of seq_len tokens; dataset.last_window=keep also scores the shorter window left over).
Everything that can refuse the configuration happens in `build`, before any evaluation. The run
checkpoints after the dense perplexity and after every pruned block, and resumes from there
(resume.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runs.checkpoint import StopSignals
from ..config import LM_STRUCTURES, Config, ConfigError
from ..criteria import Criterion, ScoreContext, build_criterion
from ..core.device import configure_backends, resolve_device
from ..core.granularity import Granularity, build_granularity
from ..core.masks import Masks
from ..core.metrics import WeightStats, weight_stats
from ..config.options import TextDatasetConfig
from ..runs.experiment import check_granularity, logger_sinks
from ..runs.rows import round_row
from ..runs.summary import versions
from ..runs.record import Recorder
from ..core.allocation import layer_fractions
from ..core.select import SelectOptions, check_reachable
from ..runs.state import calibration_draw
from . import evaluation, hub, moe, owl, recovery, speed, structure, structured
from .blockwise import BlockProgress, prune_block_by_block
from .resume import LMCheckpoints, saved_run
from .text import TextData, load_text, text_dataset

log = logging.getLogger("prunebench")


@dataclass
class LMExperiment:
    cfg: Config
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    tokenizer: object
    data: TextData  # the run's dataset: test (and train when fine-tuning)
    seq_len: int
    calibration: Optional[Tensor]  # (samples, seq_len) token windows, for criteria that calibrate
    calibration_about: Dict
    masks: Masks  # before pruning: which weights are prunable (afterwards the weights' zeros are the masks)
    criterion: Criterion
    granularity: Granularity
    checkpoint_dtype: Optional[torch.dtype] = None  # what the model's config names (model.dtype=auto on a GPU: used)
    saved: Optional[Dict] = None  # how a structurally pruned model was saved (structure.save)
    # granularity=experts: per decoder block, the dense expert count and the experts kept
    experts_kept: Optional[Dict[int, Tuple[int, List[int]]]] = None


def build(cfg: Config) -> LMExperiment:
    device = resolve_device(cfg.device)
    configure_backends(cfg.deterministic, cfg.tf32)  # a sweep's job must not inherit the previous job's
    criterion, granularity = build_criterion(cfg.criterion), build_granularity(cfg.granularity)
    check_criterion(cfg, criterion, granularity)
    evaluation.check_tasks(cfg.eval)  # zero-shot tasks: known, and their data found
    quiet_libraries()
    name, revision, trust = cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code
    hf_config = hub.load_hf_config(name, revision, trust)
    hub.check_causal_lm(hf_config, name)
    masks = check_plan(cfg, criterion, granularity, hub.empty_model(hf_config, trust))
    if is_structured(cfg):
        structured.check_plan(cfg, hf_config)
    seq_len = sequence_length(cfg.dataset, hf_config)
    dtype = hub.resolve_dtype(cfg.model.dtype, device, hf_config)
    local_only = Path(name).is_dir() or not hub.hub_reachable()
    tokenizer = hub.load_tokenizer(name, revision, trust, local_only)
    data = load_text(cfg.dataset, tokenizer, cfg.data_dir, ["test"] + ["train"] * recovery.reads_train(cfg.recovery))
    if data.num_tokens("test") < 2:
        raise ConfigError(f"dataset={cfg.dataset.name}: the test split holds {data.num_tokens('test')} tokens")
    calibration, about = (calibration_windows(cfg, tokenizer, data, seq_len)
                          if criterion.calibrates or cfg.allocation.name == "owl"  # OWL's outlier pass
                          else (None, {}))
    model = hub.load_model(name, revision, trust, dtype, local_only)
    return LMExperiment(cfg, device, dtype, model, tokenizer, data, seq_len, calibration, about, masks,
                        criterion, granularity, hub.checkpoint_dtype(hf_config))


def check_criterion(cfg: Config, criterion: Criterion, granularity: Granularity) -> None:
    check_granularity(cfg, criterion, granularity)
    if criterion.calibrates and cfg.criterion.scope != "layer":
        raise ConfigError(f"criterion={cfg.criterion.name} prunes a language model block by block: it needs "
                          f"criterion.scope=layer (got {cfg.criterion.scope})")


def check_plan(cfg: Config, criterion: Criterion, granularity: Granularity, model: nn.Module) -> Masks:
    """The prunable layers of the (empty) model, checked against the criterion, the granularity and
    the sparsity; as masks of views that hold no memory (a 7B model has no room for a second copy)."""
    alive = torch.ones((), dtype=torch.bool)
    masks = Masks({n: alive.expand(w.shape) for n, w in moe.block_weights(model).items()})
    if is_structured(cfg):  # its own plan: lm/structured.check_plan, on the model's config
        return masks
    linears = hub.block_linears(model)  # (a mixture's expert matrices are layers too: lm/blockwise.py)
    criterion.validate(model, Masks({n: m for n, m in masks.items() if n in linears}))
    granularity.check_plan([cfg.sparsity], masks)
    check_reachable(cfg.sparsity, masks, SelectOptions.of(cfg.criterion), granularity)
    return masks


def is_structured(cfg: Config) -> bool:
    """Whether whole heads, channels or blocks go (lm/structured.py) rather than single weights."""
    return cfg.granularity.name in LM_STRUCTURES


def quiet_libraries() -> None:
    """No download bars or advice from transformers and datasets in a run's log."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # (datasets, which only named corpora need, is quieted where text.hub_split imports it)


def sequence_length(dataset: TextDatasetConfig, hf_config) -> int:
    context = hub.context_length(hf_config)
    seq_len = dataset.seq_len or context
    if seq_len is None:
        raise ConfigError(f"the {hf_config.model_type} config does not say its context length: set dataset.seq_len")
    if context is not None and seq_len > context:
        raise ConfigError(f"dataset.seq_len={seq_len} is beyond the model's context of {context} tokens "
                          f"(max_position_embeddings); use at most {context}")
    return seq_len


def calibration_windows(cfg: Config, tokenizer, data: TextData, seq_len: int):
    """calibration.samples windows of seq_len tokens from the calibration text's split (seeded)."""
    cal = cfg.calibration
    if cal.dataset is None:
        source = data if cal.source in data.splits else load_text(cfg.dataset, tokenizer, cfg.data_dir, [cal.source])
    else:
        source = load_text(text_dataset(cal.dataset, cal.hub_name), tokenizer, cfg.data_dir, [cal.source])
    have = source.max_windows(cal.source, seq_len)
    if cal.samples > have:
        raise ConfigError(f"calibration.samples={cal.samples} is more than the {have} windows of {seq_len} tokens "
                          f"that {source.name}'s {cal.source} split holds; use fewer samples or a shorter "
                          f"dataset.seq_len")
    windows = source.calibration_windows(cal.source, cal.samples, seq_len, calibration_draw(cfg))
    about = {"dataset": source.name, "source": source.about["source"], "split": cal.source,
             "split_tokens": source.num_tokens(cal.source), "samples": cal.samples, "seq_len": seq_len,
             "tokens": int(windows.numel()), "seed": cfg.seed if cal.seed is None else cal.seed,
             "sha256": windows_digest(windows)}
    return windows, about


def windows_digest(windows: Tensor) -> str:
    """The calibration token windows' fingerprint: two runs that claim the same calibration can
    show it (the ids as little-endian int64, row by row)."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


# ------------------------------------------------------------------------------ perplexity
@dataclass
class Perplexity:
    ppl: float
    loss: float  # mean next-token cross-entropy (nats)
    tokens: int  # tokens predicted (each window's first token has no context to be predicted from)
    windows: int


@torch.no_grad()
def perplexity(model: nn.Module, windows: List[Tensor], batch_size: int, device: torch.device,
               stop: Optional[StopSignals] = None) -> Perplexity:
    """exp(Σ token losses / tokens) over every window, the whole model on the device."""
    model.to(device).eval()
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches_of_equal_length(windows, batch_size):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        for row, target in zip(logits, ids):  # one sequence at a time in float32: bounded memory
            total += F.cross_entropy(row[:-1].float(), target[1:], reduction="sum").double()
        tokens += ids.shape[0] * (ids.shape[1] - 1)
        if stop is not None:
            stop.check()
    model.to("cpu")
    loss = float(total) / tokens
    return Perplexity(math.exp(loss), loss, tokens, len(windows))


def batches_of_equal_length(windows: List[Tensor], batch_size: int):
    start = 0
    while start < len(windows):
        end = start + 1
        while end < len(windows) and end - start < batch_size and windows[end].numel() == windows[start].numel():
            end += 1
        yield torch.stack(windows[start:end])
        start = end


# ------------------------------------------------------------------------------ pruning
def prune(exp: LMExperiment, stop: StopSignals, progress: Optional[BlockProgress] = None) -> Dict:
    """One-shot pruning to cfg.sparsity, in place: the pruned weights are zero afterwards.
    `progress`: where block-by-block pruning starts and what it keeps of each block (resume.py)."""
    cfg = exp.cfg
    if is_structured(cfg):
        figures = structured.prune_structures(exp.model, exp.criterion, cfg, exp.calibration, exp.device, stop.check)
        exp.experts_kept = figures.pop("experts_kept", None)
        exp.masks = Masks({n: w.detach() for n, w in moe.block_weights(exp.model).items()})
        return figures
    started = time.perf_counter()
    opts = SelectOptions.of(cfg.criterion)
    figures, earlier = {}, 0.0
    if exp.criterion.calibrates:
        fractions, figures = owl.allocate(exp, layer_fractions(cfg.sparsity, exp.masks, opts, exp.granularity))
        cost = prune_block_by_block(exp.model, fractions, exp.criterion, exp.granularity, exp.calibration,
                                    cfg.calibration.batch_size, exp.device, stop.check, progress)
        earlier = sum(cost.seconds[:cost.resumed])  # a resumed run's blocks pruned before it stopped
        if cost.uncalibrated:
            log.warning(f"{len(cost.uncalibrated)} expert matrices received no calibration token and were pruned "
                        f"as if every input feature were alike (by magnitude): {', '.join(cost.uncalibrated[:4])}"
                        f"{', ...' if len(cost.uncalibrated) > 4 else ''} (summary: final.uncalibrated_experts)")
        figures = {**figures, "block_seconds": cost.seconds,
                   **({"uncalibrated_experts": cost.uncalibrated} if moe.has_experts(exp.model) else {}),
                   **({"peak_device_gib": cost.peak_device_bytes / 2**30} if cost.peak_device_bytes else {})}
    elif opts.scope == "layer":  # data-free (magnitude, random), one layer's scores at a time
        selector = build_criterion(replace(cfg.criterion, exclude_first=False, exclude_last=False, exclude=[]))
        fractions, figures = owl.allocate(exp, layer_fractions(cfg.sparsity, exp.masks, opts, exp.granularity))
        generator = torch.Generator().manual_seed(cfg.seed + 1)  # one stream: no two layers drawn alike
        params = dict(exp.model.named_parameters())
        for name, fraction in fractions.items():
            for matrix, mask in moe.layers_of(exp.model, name, params[name], exp.masks[name]):
                prune_data_free(exp, selector, matrix, Masks({"weight": mask}), fraction, generator)
    else:  # scope=global: every layer's scores at once
        prune_data_free(exp, exp.criterion, exp.model, exp.masks, cfg.sparsity,
                        torch.Generator().manual_seed(cfg.seed + 1))
    zeros = weight_zeros(exp.model, exp.masks)
    exp.granularity.verify(zeros, dict(zeros.items()), cfg.sparsity)
    return {"score_seconds": time.perf_counter() - started + earlier, **figures}


def prune_data_free(exp: LMExperiment, criterion: Criterion, model: nn.Module, masks: Masks, target: float,
                    generator: torch.Generator) -> None:
    """`model`'s weights named in `masks` pruned to `target` in place (`model`: the language model,
    or one layer as a module of its own, moe.Matrix)."""
    ctx = ScoreContext(model, masks, generator=generator)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in criterion.prune(ctx, target, exp.granularity).items():
            params[name].mul_(mask.to(params[name].dtype))


def weight_zeros(model: nn.Module, names) -> Masks:
    """The pruned model's masks as its weights' nonzeros: the weights themselves, for reading
    (`!= 0`, counts, patterns), never to multiply with."""
    params = dict(model.named_parameters())
    return Masks({n: params[n].detach() for n in names})


# ------------------------------------------------------------------------------ the run
def run_language_model(cfg: Config, out_dir: Path, group: Optional[str], config: Dict, stop: StopSignals) -> Dict:
    """The whole recipe into out_dir; resumed from the run's checkpoint when it holds one (resume.py)."""
    exp = build(cfg)
    recovery.check(exp)
    teacher = recovery.dense_teacher(exp)  # distillation's teacher: the dense model, before pruning
    saved = saved_run(out_dir, config, exp.device, exp.dtype, cfg.checkpoint.resume)
    started = time.perf_counter() - (saved["seconds"] if saved else 0.0)  # a resumed run counts its past
    rec = make_recorder(cfg, out_dir, group, config, saved)
    checkpoints = LMCheckpoints(out_dir, config, exp.device, exp.dtype, rec.state, started, saved)
    try:
        windows = exp.data.eval_windows("test", exp.seq_len, cfg.dataset.last_window, cfg.dataset.eval_windows)
        batch = cfg.train.eval_batch_size
        if saved is None:  # resumed: measured already, in the records
            with moe.routing_counts(exp.model) as routed:
                dense = perplexity(exp.model, windows, batch, exp.device, stop)
            zeroshot = evaluation.evaluate(exp.model, exp.tokenizer, cfg.eval, exp.device, "dense")
            rec.record_dense({"test_ppl": dense.ppl, "test_loss": dense.loss}, weight_stats(exp.model, exp.masks),
                             test_tokens=dense.tokens, test_windows=dense.windows, speed=measure_speed(exp),
                             **evaluation.fields("zeroshot", zeroshot), **routing_field("routing", routed))
            checkpoints.save("dense perplexity")
        pruning, pruned = prune_and_measure(exp, checkpoints, windows, stop)
        zeroshot_pruned = evaluation.evaluate(exp.model, exp.tokenizer, cfg.eval, exp.device, "pruned")
        recovered = recovery.recover(exp, rec, stop, teacher) if cfg.recovery.trains else {"seconds": 0.0}
        del teacher
        final = pruned
        if cfg.recovery.trains:
            with moe.routing_counts(exp.model, exp.experts_kept) as routed:
                final = perplexity(exp.model, windows, batch, exp.device, stop)
            pruning.update({**routing_field("routing_pruned", pruning.pop("routing", None)),
                            **routing_field("routing", routed)})
        zeroshot = (evaluation.evaluate(exp.model, exp.tokenizer, cfg.eval, exp.device, "recovered")
                    if cfg.recovery.trains else zeroshot_pruned)
        save_pretrained(exp, out_dir)  # before the stats: an unmerged LoRA's adapter is taken off here
        stats = pruned_stats(exp, rec)
        figures = {**pruning, **speed_figures(exp, rec), **expert_figures(exp)}
        row = round_row(1, cfg.sparsity, stats, {"test_ppl": pruned.ppl, "test_loss": pruned.loss},
                        {"test_ppl": final.ppl, "test_loss": final.loss}, figures.pop("score_seconds"),
                        recovered.pop("seconds"), None, **figures, **recovered, recovery=cfg.recovery.name,
                        recovery_epochs=cfg.recovery.epochs if cfg.recovery.trains else 0,
                        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                        **evaluation.fields("zeroshot_pruned", zeroshot_pruned),
                        **evaluation.fields("zeroshot", zeroshot))
        rec.record_round(row, stats)
        summary = rec.finish({"status": "completed", **summary_fields(exp, rec, started, config, row),
                              **evaluation.fields("dense_zeroshot", rec.dense.get("zeroshot"))})
    finally:
        rec.close()
    if not cfg.checkpoint.keep:  # the run is finished: its summary.json says so
        checkpoints.remove()
    return summary


def prune_and_measure(exp: LMExperiment, checkpoints: LMCheckpoints, windows: List[Tensor],
                      stop: StopSignals) -> Tuple[Dict, Perplexity]:
    """Pruning's figures and the pruned perplexity. Block by block, each finished block is
    checkpointed and a resumed run goes on after the last one; once the pruned perplexity is
    measured a resumed run only loads the pruned blocks. (Data-free criteria prune again: seconds.)"""
    blockwise = exp.criterion.calibrates and not is_structured(exp.cfg)  # structured: pruned again on resume
    pruning = prune(exp, stop, checkpoints if blockwise else None)
    if checkpoints.state["pruned"] is not None:
        return checkpoints.state["pruning"], Perplexity(**checkpoints.state["pruned"])
    with moe.routing_counts(exp.model, exp.experts_kept) as routed:
        pruned = perplexity(exp.model, windows, exp.cfg.train.eval_batch_size, exp.device, stop)
    pruning.update(routing_field("routing", routed))
    if blockwise:
        pruning["checkpoint_seconds"] = checkpoints.state["checkpoint_seconds"]
        checkpoints.pruned(pruning, asdict(pruned))
    return pruning, pruned


def routing_field(key: str, routed: Optional[Dict]) -> Dict:
    """{key: where the router sent the test tokens} for a mixture of experts, {} for a dense model."""
    return {key: routed} if routed and routed["blocks"] else {}


def expert_figures(exp: LMExperiment) -> Dict:
    """A mixture of experts' fraction of zero weights in each expert's matrices."""
    sparsities = moe.expert_sparsities(exp.model)
    return {"expert_sparsity": sparsities} if sparsities else {}


def make_recorder(cfg: Config, out_dir: Path, group: Optional[str], config: Dict, saved: Optional[Dict]) -> Recorder:
    """The run's records (and wandb, when asked), resumed from the checkpoint's."""
    records = saved["records"] if saved else None
    wandb_state = (records.get("sinks") or [None])[0] if records else None  # resumed: the same wandb run
    sinks = logger_sinks(cfg, out_dir, group, config, resume=wandb_state)
    title = f"{cfg.criterion.name} · {cfg.model.name} · {cfg.dataset.name} · {cfg.granularity.name} · seed {cfg.seed}"
    shutil.rmtree(out_dir / "model", ignore_errors=True)  # a rerun's old checkpoint must not look current
    rec = Recorder(out_dir, title, cfg.recovery.epochs if cfg.recovery.trains else 0, sinks, resume=records,
                   metric="ppl")
    if saved:
        rec.event("resumed", where=saved["where"])
    return rec


def pruned_stats(exp: LMExperiment, rec: Recorder) -> WeightStats:
    """The weights as they are; after structured pruning, counted against the dense model's
    prunable weights and parameters (those removed are pruned: their zeros are gone with them)."""
    stats = weight_stats(exp.model, exp.masks)
    if not is_structured(exp.cfg):
        return stats
    return replace(stats, params_total=rec.dense["params_total"], prunable_total=rec.dense["prunable_total"])


def measure_speed(exp: LMExperiment) -> Optional[Dict]:
    """Prefill and cached-decode tokens/s of the model as it is, on the run's device (latency.repeats=0: none)."""
    lat = exp.cfg.latency
    if not lat.repeats:
        return None
    context = hub.context_length(exp.model.config) or lat.prompt_tokens + lat.decode_tokens
    prompt = min(lat.prompt_tokens, context - lat.decode_tokens)
    return speed.measure(exp.model, exp.device, prompt_tokens=prompt, new_tokens=lat.decode_tokens,
                         batch_sizes=tuple(lat.lm_batch_sizes), repeats=lat.repeats, warmup=lat.warmup,
                         seed=exp.cfg.seed)


def speed_figures(exp: LMExperiment, rec: Recorder) -> Dict:
    """The final model's speed beside the dense model's, measured the same way in this run."""
    dense = rec.dense.get("speed")
    if dense is None:
        return {}
    final = measure_speed(exp)
    return {"speed": final, "speedup": speed.compare(dense, final)}


def save_pretrained(exp: LMExperiment, out_dir: Path) -> None:
    """out_dir/model: the pruned model and its tokenizer, loadable by transformers alone (the pruned
    weights are exactly zero there: they are the masks). LoRA adapters kept apart (recovery=lora
    on sparse weights) go to model/adapter in peft's format, and exp.model is left without them."""
    tmp = out_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    exp.model = recovery.save_adapter(exp.model, tmp / "adapter")
    if is_structured(exp.cfg) and exp.cfg.granularity.name != "experts":  # a smaller config, or a modeling file
        exp.saved = structure.save(exp.model, exp.tokenizer, tmp, getattr(exp.cfg.granularity, "nonuniform", "pad"))
    else:
        exp.model.save_pretrained(tmp)
        exp.tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir / "model")


def protocol_stamp(exp: LMExperiment, rec: Recorder) -> Dict:
    """What makes two language-model results comparable (report.py refuses to mix them otherwise):
    the protocol's name and the settings that move the numbers."""
    cfg, cal = exp.cfg, exp.calibration_about or {}
    return {"name": cfg.protocol.name, "dataset": cfg.dataset.name, "seq_len": exp.seq_len,
            "last_window": cfg.dataset.last_window, "eval_windows": rec.dense["test_windows"],
            "calibration": {k: cal.get(k) for k in ("dataset", "samples", "seed", "sha256")} if cal else None,
            "tasks": list(cfg.eval.tasks), "limit": cfg.eval.limit}


def summary_fields(exp: LMExperiment, rec: Recorder, started: float, config: Dict, final: Dict) -> Dict:
    cfg = exp.cfg
    return {
        "criterion": cfg.criterion.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
        "retrain": cfg.retrain.name, "schedule": cfg.schedule.name, "sparsity_requested": cfg.sparsity,
        "seed": cfg.seed, "device": str(exp.device), "threads": torch.get_num_threads(),
        "dtype": str(exp.dtype).replace("torch.", ""),
        "checkpoint_dtype": None if exp.checkpoint_dtype is None else str(exp.checkpoint_dtype).replace("torch.", ""),
        "params_total": rec.dense["params_total"], "prunable_total": rec.dense["prunable_total"],
        "dense_test_ppl": rec.dense["test_ppl"], "dense_test_loss": rec.dense["test_loss"],
        "test_tokens": rec.dense["test_tokens"],
        "data": {**exp.data.about, "seq_len": exp.seq_len, "last_window": cfg.dataset.last_window,
                 "eval_windows": rec.dense["test_windows"]},
        "calibration": exp.calibration_about or None,
        "protocol": protocol_stamp(exp, rec),
        **({"granularity": exp.granularity.describe(weight_zeros(exp.model, exp.masks))}
           if exp.granularity.local else {}),
        "rounds": rec.rounds, "final": final, "seconds_total": time.perf_counter() - started,
        "versions": {**versions(exp.device), **hub.library_versions()},
        **({"structure": exp.saved} if exp.saved else {}),
        "dense_speed": rec.dense.get("speed"),
        **({"dense_routing": rec.dense["routing"]} if "routing" in rec.dense else {}),
        "file_bytes": {"model": sum(p.stat().st_size for p in (rec.out_dir / "model").rglob("*") if p.is_file())},
        "config": config,
    }
