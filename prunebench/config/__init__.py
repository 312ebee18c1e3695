"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML under conf/<group>/ starts from one of these schemas (its defaults list names
`<group>_<name>_schema` or `<group>_schema`), so a misspelt key or a wrongly typed value is
rejected when Hydra composes the config. Range checks live in `__post_init__` and run when
`load_config` turns the composed DictConfig into these dataclasses, before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# cuBLAS needs a fixed workspace to be deterministic (CUDA's documented setting); it reads it once,
# when it starts, so the command sets it before any CUDA work (cli.py), for every job of a sweep
CUBLAS_WORKSPACE = ":4096:8"


class ConfigError(ValueError):
    """A user error in the configuration or the environment it names; reported in one line."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: str, choices) -> None:
    check(value in choices, f"{key}={value!r} is not one of: {', '.join(sorted(choices))}")


# --------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    # what the model does with its data: classification (logits over labels) | causal_lm (next token)
    task: ClassVar[str] = "classification"
    name: str = MISSING  # the architecture (torchvision: a torchvision model name; hf: a Hub name or path)
    # prunebench: models/ registry | torchvision: torchvision.models | hf: transformers' Auto classes
    source: str = "prunebench"
    # default: each layer's own PyTorch init; the others are applied to all Conv/Linear weights
    init: str = "default"
    # the prunable set: Conv/Linear weights always; their biases and the norm layers' affine
    # parameters only when asked (pruning papers leave them dense)
    prune_biases: bool = False
    prune_norm: bool = False
    # a state_dict file (e.g. a dense run's model.pt) loaded over the initialisation, to prune an
    # already trained network with several criteria without training it again
    checkpoint: Optional[str] = None

    def __post_init__(self):
        check_choice("model.init", self.init, INITS)
        check_choice("model.source", self.source, ("prunebench", "torchvision", "hf"))

    def check_with(self, cfg: "Config") -> None:
        """Raise ConfigError for options that do not fit the rest of the config."""


INITS = ("default", "kaiming_normal", "kaiming_uniform", "xavier_normal", "orthogonal", "delta_orthogonal")


# ------------------------------------------------------------------------------------- dataset
@dataclass
class DatasetConfig:
    task: ClassVar[str] = "classification"  # the models it feeds (ModelConfig.task)
    name: str = MISSING
    # examples carved from the training set for validation (0: none); the test set is only
    # ever used for reporting
    val_size: int = 0
    split_seed: int = 0  # which examples go to validation: fixed, whatever the run's seed
    # random crop after zero-padding by crop_padding pixels, and random horizontal flips,
    # applied to training batches on the device
    augment: bool = False
    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self):
        check(self.val_size >= 0, f"dataset.val_size must be >= 0, got {self.val_size}")
        check(self.crop_padding >= 0, f"dataset.crop_padding must be >= 0, got {self.crop_padding}")


# ----------------------------------------------------------------------------------- criterion
SCOPES = ("global", "layer", "stage")


@dataclass
class CriterionConfig:
    # it can prune model=hf_causal_lm (needs neither labels nor a classifier's curvature): its
    # options class says so (config/options.py), read before torch loads
    language_models: ClassVar[bool] = False
    structures: ClassVar[Tuple[str, ...]] = ()  # structured granularities of language models it scores
    name: str = MISSING
    # global: rank all prunable weights (or units) together; layer: the same sparsity in every
    # pruned layer; stage (filter/channel pruning): each pruned layer of a stage (layers whose
    # outputs have the same spatial size) loses the stage's ratio of its units: `stage_ratios`
    # if given, else `sparsity` (then a ratio per layer, not a fraction of all units)
    scope: str = "global"
    # with scope=stage: the final ratio of each stage, first stage first (Li et al.'s p1, p2, p3);
    # the top-level `sparsity` is then not used
    stage_ratios: List[float] = field(default_factory=list)
    exclude_first: bool = False  # leave the first prunable layer dense
    # leave the last prunable layer (the classifier) dense; with filter/channel pruning that keeps
    # every unit it reads
    exclude_last: bool = False
    exclude: List[str] = field(default_factory=list)  # module names to leave dense, e.g. [conv2]
    # with scope=layer and schedule.rate: each round removes this fraction of the remaining
    # weights of the layers whose module name starts with the key (the longest key wins), the
    # others at schedule.rate: Frankle & Carbin's {conv: 0.1, fc3: 0.1}. The top-level
    # `sparsity` then only sets the number of rounds (those schedule.rate needs to reach it).
    layer_rates: Dict[str, float] = field(default_factory=dict)
    # every pruned layer keeps at least this fraction of its weights (0: a layer may be emptied,
    # which is then reported as a warning)
    min_density: float = 0.0
    # sanity checks (Frankle et al. 2021): invert keeps the lowest scores; shuffle keeps each
    # layer's number of survivors but places them at random
    sanity: str = "none"
    # when its paper prunes: init (SNIP, GraSP, SynFlow: before training, then the network trains)
    # or trained (after pretraining); train.pretrain_epochs, when set, decides instead
    prunes_at: str = "trained"

    def __post_init__(self):
        check_choice("criterion.scope", self.scope, SCOPES)
        check_choice("criterion.prunes_at", self.prunes_at, ("init", "trained"))
        check_choice("criterion.sanity", self.sanity, ("none", "invert", "shuffle"))
        check(0.0 <= self.min_density <= 1.0,
              f"criterion.min_density must be in [0, 1], got {self.min_density}")
        check(all(0.0 <= r < 1.0 for r in self.stage_ratios),
              f"criterion.stage_ratios must each be in [0, 1), got {list(self.stage_ratios)}")
        check(not self.stage_ratios or self.scope == "stage",
              f"criterion.stage_ratios needs criterion.scope=stage (got scope={self.scope})")
        check(all(0.0 < r < 1.0 for r in self.layer_rates.values()),
              f"criterion.layer_rates must each be in (0, 1), got {dict(self.layer_rates)}")
        check(not self.layer_rates or self.scope == "layer",
              f"criterion.layer_rates needs criterion.scope=layer (got scope={self.scope})")

    def resolve_with(self, cfg: "Config") -> None:
        """Fill the options whose null means "what fits the rest of the config"."""

    def check_with(self, cfg: "Config") -> None:
        """Raise ConfigError for options that do not fit the rest of the config (changes nothing)."""


# --------------------------------------------------------------------------------- granularity
GROUP_REDUCTIONS = ("none", "l1", "l2", "sum")
# the structured granularities of language models: what each removes from the decoder blocks
LM_STRUCTURES: Dict[str, Tuple[str, ...]] = {"width": ("heads", "mlp"), "heads": ("heads",), "mlp": ("mlp",),
                                             "depth": ("blocks",), "experts": ("experts",)}


@dataclass
class GranularityConfig:
    name: str = MISSING
    # how weight-shaped scores become one score per filter/channel: l1 = sum of |score| (with
    # magnitude scores, Li et al.'s filter norm), l2, or sum (keeps signs, e.g. GraSP's);
    # none for unstructured
    reduce: str = "none"

    def __post_init__(self):
        check_choice("granularity.reduce", self.reduce, GROUP_REDUCTIONS)


# ------------------------------------------------------------------------------------- retrain
@dataclass
class RetrainConfig:
    """A retrain policy's options (policies with options subclass it: see retrain/)."""

    name: str = MISSING

    def __post_init__(self):
        pass

    def keeps_epoch(self) -> Optional[int]:
        """The pretraining epoch whose weights the policy needs (a rewind point), if any."""
        return None

    def check_with(self, cfg: "Config") -> None:
        """Raise ConfigError for options that do not fit the rest of the config."""


# ------------------------------------------------------------------------------------ schedule
@dataclass
class ScheduleConfig:
    """oneshot and iterative: rounds between training phases. A schedule's rules that need only
    the config live here (torch-free); those that need the built run, in its schedules/ file."""

    # prunes inside one training run (gradual, dynamic): retrain=retain, train.epochs of training
    inside_training: ClassVar[bool] = False
    name: str = MISSING
    # iterative: number of rounds R; each removes the same fraction of the remaining weights
    rounds: Optional[int] = 1
    # iterative, alternative to rounds: the fraction of remaining weights removed per round
    # (LTH: 0.2); the number of rounds is then the fewest that reach `sparsity`
    rate: Optional[float] = None

    def __post_init__(self):
        if self.name == "oneshot":
            check(self.rounds == 1 and self.rate is None,
                  "schedule=oneshot has exactly one round; use schedule=iterative for "
                  "schedule.rounds or schedule.rate")
        check((self.rounds is None) != (self.rate is None),
              "set exactly one of schedule.rounds and schedule.rate (the other null)")
        if self.rounds is not None:
            check(self.rounds >= 1, f"schedule.rounds must be >= 1, got {self.rounds}")
        if self.rate is not None:
            check(0.0 < self.rate < 1.0, f"schedule.rate must be in (0, 1), got {self.rate}")

    def targets(self, sparsity: float) -> List[float]:
        """Sparsity after each round: round r removes the same fraction of what remains."""
        if self.rate is not None:
            # fewest rounds with 1 - (1 - rate)^R >= sparsity; the last round lands on `sparsity`
            rounds = max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-self.rate) - 1e-9))
            return [1.0 - (1.0 - self.rate) ** r for r in range(1, rounds)] + [sparsity]
        R = self.rounds
        # the last round lands exactly on `sparsity` (1 - (1 - s)^1 is not always s in floating point)
        return [1.0 - (1.0 - sparsity) ** (r / R) for r in range(1, R)] + [sparsity]

    def check_with(self, cfg: "Config") -> None:
        """Raise ConfigError for what this schedule cannot run with the rest of the config."""
        if not self.inside_training:
            return
        check(cfg.retrain.name == "retain", f"schedule={self.name} prunes inside one training run: "
                                            f"it needs retrain=retain, not retrain={cfg.retrain.name}")
        check(cfg.train.pretrain_epochs >= 1, f"schedule={self.name} prunes inside training: "
                                              f"train.epochs (or train.pretrain_epochs) must be >= 1")


@dataclass
class GradualConfig(ScheduleConfig):
    """Zhu & Gupta 2017: inside one training run (train.epochs), prune every `every` from
    `start` for n = (end - start)/every pruning steps to s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))³,
    s_f = sparsity; then train.finetune_epochs of fine-tuning at the final masks."""

    inside_training: ClassVar[bool] = True
    initial_sparsity: float = 0.0  # s_i: at t0 (pruned at t0 only when > 0)
    unit: str = "epochs"  # epochs | steps: what start, end and every count (epochs may be fractional)
    start: float = 1.0  # t0
    end: float = 7.0  # t0 + nΔt, the last pruning step
    every: float = 0.25  # Δt

    def __post_init__(self):
        super().__post_init__()
        check_choice("schedule.unit", self.unit, ("epochs", "steps"))
        check(0.0 <= self.initial_sparsity < 1.0, f"schedule.initial_sparsity must be in [0, 1), "
                                                  f"got {self.initial_sparsity}")
        check(self.every > 0, f"schedule.every must be > 0, got {self.every}")
        check(self.start >= 0, f"schedule.start must be >= 0, got {self.start}")
        check(self.end >= self.start + self.every, f"schedule.end={self.end} must be at least schedule.start + "
                                                   f"schedule.every = {self.start + self.every} (one pruning step)")

    def pruning_steps(self) -> int:
        """n: the pruning steps after t0."""
        return int(math.floor((self.end - self.start) / self.every + 1e-9))

    def times(self) -> List[float]:
        """When each pruning step happens, in `unit`: t0 (if s_i > 0), t0 + Δt, ..., t0 + nΔt."""
        first = 0 if self.initial_sparsity > 0 else 1
        return [self.start + k * self.every for k in range(first, self.pruning_steps() + 1)]

    def targets(self, sparsity: float) -> List[float]:
        """Sparsity after each pruning step, on Zhu & Gupta's cubic."""
        s_i, n = self.initial_sparsity, self.pruning_steps()
        first = 0 if s_i > 0 else 1
        return [sparsity + (s_i - sparsity) * (1 - k / n) ** 3 for k in range(first, n)] + [sparsity]

    def check_with(self, cfg: "Config") -> None:
        super().check_with(cfg)
        check(cfg.sparsity > self.initial_sparsity,
              f"sparsity={cfg.sparsity} must exceed schedule.initial_sparsity={self.initial_sparsity}")
        check(self.unit == "steps" or self.end <= cfg.train.pretrain_epochs,
              f"schedule.end={self.end} epochs is beyond the training ({cfg.train.pretrain_epochs} "
              f"epochs: train.epochs, or train.pretrain_epochs when set): the last pruning step must come "
              f"before training ends")


@dataclass
class DynamicConfig(ScheduleConfig):
    """Sparse from the start (SET, Mocanu et al. 2018; RigL, Evci et al. 2020): train
    train.epochs at a fixed sparsity; every `every` steps until `end` of training, drop
    the fraction α_t = α/2 (1 + cos(π t / T_end)) of each layer's live weights with the smallest
    magnitude and regrow as many (SET: at random; RigL: largest dense gradient; static: never)."""

    inside_training: ClassVar[bool] = True
    method: str = "rigl"  # static | set | rigl
    distribution: str = "erk"  # the layer budget: uniform | er | erk (Erdős–Rényi(-Kernel))
    init: str = "random"  # the initial mask in that budget: random (the papers') | criterion (its scores at init)
    every: int = 100  # ΔT, optimizer steps between mask updates
    alpha: float = 0.3  # α: the drop fraction at the start
    end: float = 0.75  # T_end as a fraction of the training's steps (no updates after it)

    def __post_init__(self):
        super().__post_init__()
        check_choice("schedule.method", self.method, ("static", "set", "rigl"))
        check_choice("schedule.distribution", self.distribution, ("uniform", "er", "erk"))
        check_choice("schedule.init", self.init, ("random", "criterion"))
        check(self.every >= 1, f"schedule.every must be >= 1 step, got {self.every}")
        check(0.0 < self.alpha < 1.0, f"schedule.alpha must be in (0, 1), got {self.alpha}")
        check(0.0 < self.end <= 1.0, f"schedule.end must be in (0, 1] (a fraction of training), got {self.end}")


# --------------------------------------------------------------------------------------- train
OPTIMIZERS = ("sgd", "adam", "adamw")  # adamw: decoupled weight decay (Loshchilov & Hutter 2019)
LR_SCHEDULES = ("constant", "step", "cosine")


@dataclass
class TrainConfig:
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.0  # SGD only
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 60
    eval_batch_size: int = 1000
    lr_schedule: str = "constant"
    lr_milestones: List[int] = field(default_factory=list)  # step: epochs at which lr *= gamma
    lr_gamma: float = 0.1
    # linear warmup of the training phase from lr/steps to lr over this many epochs, stepped per
    # optimizer step, then lr_schedule over the remaining steps (cosine: to 0 at the end); 0: none
    warmup_epochs: int = 0
    epochs: int = 5  # the recipe's training: before pruning, or after it for criteria that prune at init
    # null: as the criterion's prunes_at says (trained: `epochs`; init: 0, and the network then
    # trains `epochs` with this recipe after pruning); a number: this many, whatever the criterion
    pretrain_epochs: Optional[int] = None
    finetune_epochs: int = 3  # per round
    # lr of the finetune phases; null = lr (Han et al. retrain LeNets at lr/10)
    finetune_lr: Optional[float] = None
    # the finetune phases' own weight decay and lr milestones; null = those above
    finetune_weight_decay: Optional[float] = None
    finetune_lr_milestones: Optional[List[int]] = None
    # each finetune phase's warmup: none by default, as the network is trained already (a
    # criterion that prunes at init trains after pruning: that phase gets warmup_epochs)
    finetune_warmup_epochs: int = 0
    eval_every_epoch: bool = True  # test accuracy per epoch in metrics.jsonl (reported, never selected on)
    precision: str = "fp32"  # fp32 | bf16 (autocast for forward and loss; weights stay fp32)
    channels_last: bool = False  # NHWC memory layout for conv nets (faster on recent GPUs)
    # several processes on GPUs: batch norm statistics over the whole global batch (SyncBatchNorm),
    # not each rank's shard; one process: no effect
    sync_bn: bool = False

    def __post_init__(self):
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("train.precision", self.precision, ("fp32", "bf16"))
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        check(self.finetune_lr is None or self.finetune_lr > 0,
              f"train.finetune_lr must be > 0 or null, got {self.finetune_lr}")
        check(self.momentum >= 0, f"train.momentum must be >= 0, got {self.momentum}")
        check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.finetune_weight_decay is None or self.finetune_weight_decay >= 0,
              f"train.finetune_weight_decay must be >= 0 or null, got {self.finetune_weight_decay}")
        check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        check(self.epochs >= 0, f"train.epochs must be >= 0, got {self.epochs}")
        check(self.pretrain_epochs is None or self.pretrain_epochs >= 0,
              f"train.pretrain_epochs must be >= 0 or null, got {self.pretrain_epochs}")
        check(self.finetune_epochs >= 0, f"train.finetune_epochs must be >= 0, got {self.finetune_epochs}")
        check(0 < self.lr_gamma <= 1, f"train.lr_gamma must be in (0, 1], got {self.lr_gamma}")
        self._check_warmup()
        check(not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
              "train.nesterov needs train.optimizer=sgd and train.momentum > 0")

    def _check_warmup(self) -> None:
        """Each warmup fits in the phase it warms up (a shorter train.pretrain_epochs caps it)."""
        for name, warmup, phase, epochs in (("warmup_epochs", self.warmup_epochs, "epochs", self.epochs),
                                            ("finetune_warmup_epochs", self.finetune_warmup_epochs,
                                             "finetune_epochs", self.finetune_epochs)):
            check(0 <= warmup <= epochs, f"train.{name} must be in [0, train.{phase}={epochs}] (the epochs it "
                                         f"warms up), got {warmup}")


# ------------------------------------------------------------------------------------ recovery
RECOVERIES = ("none", "full", "lora")  # lm/recovery.py
RECOVERY_DATA = ("train", "calibration")


@dataclass
class RecoveryConfig:
    """What trains a pruned language model back before its final perplexity: recovery=none, full
    (every surviving weight, the masks held) or lora (low-rank adapters, the pruned weights
    frozen); each optionally distilled from the dense model's logits (Minitron's recovery)."""

    name: str = MISSING
    epochs: int = 1  # passes over the recovery windows
    lr: float = 2e-5
    batch_size: int = 8  # windows of dataset.seq_len tokens per step
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # constant | cosine (to 0 at the end), stepped per epoch
    # train: the dataset's training split | calibration: the calibration text's split (the
    # calibration windows are a sample of it; recovery takes every window of it)
    data: str = "train"
    windows: Optional[int] = None  # at most this many windows, a seeded draw (null: all of them)
    # the loss: (1 − distill) · next-token cross-entropy + distill · T² · KL(dense ‖ pruned) of the
    # logits at temperature T; 0: no teacher, 1: the teacher's logits alone (Minitron)
    distill: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        check_choice("recovery", self.name, RECOVERIES)
        check(self.epochs >= 0, f"recovery.epochs must be >= 0, got {self.epochs}")
        check(self.lr > 0, f"recovery.lr must be > 0, got {self.lr}")
        check(self.batch_size >= 1, f"recovery.batch_size must be >= 1, got {self.batch_size}")
        check(self.weight_decay >= 0, f"recovery.weight_decay must be >= 0, got {self.weight_decay}")
        check_choice("recovery.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_choice("recovery.data", self.data, RECOVERY_DATA)
        check(self.windows is None or self.windows >= 1, f"recovery.windows must be >= 1 or null, got {self.windows}")
        check(0.0 <= self.distill <= 1.0, f"recovery.distill must be in [0, 1], got {self.distill}")
        check(self.temperature > 0, f"recovery.temperature must be > 0, got {self.temperature}")

    @property
    def trains(self) -> bool:
        return self.name != "none" and self.epochs > 0

    def check_with(self, cfg: "Config") -> None:
        check(self.name == "none" or cfg.model.task == "causal_lm",
              f"recovery={self.name} recovers pruned language models; model={cfg.model.name} fine-tunes with "
              f"train.finetune_epochs (and retrain=...)")
        text, split = self.text(cfg)
        check(not (self.trains and text == "c4" and split == "train" and self.windows is None),
              "recovery on c4's training shard (356k documents) draws windows inside its documents: set "
              "recovery.windows to how many")

    def text(self, cfg: "Config") -> Tuple[str, str]:
        """The dataset (a name or a file's path) and the split that recovery trains on."""
        if self.data == "train":
            return cfg.dataset.name, "train"
        return cfg.calibration.dataset or cfg.dataset.name, cfg.calibration.source


# ---------------------------------------------------------------------------------- allocation
ALLOCATIONS = ("uniform", "owl")  # lm/owl.py


@dataclass
class AllocationConfig:
    """How the target sparsity is shared among a language model's decoder blocks when the
    criterion decides layer by layer: uniform (every layer the same) or owl (Yin et al. 2024:
    blocks with more outlier scores keep more weights; options.OwlConfig)."""

    name: str = MISSING

    def __post_init__(self):
        check_choice("allocation", self.name, ALLOCATIONS)

    def check_with(self, cfg: "Config") -> None:
        """The rules between allocation and the other groups (options.OwlConfig has owl's)."""


# ---------------------------------------------------------------------------------------- root
@dataclass
class LoggerConfig:
    """Where the run is mirrored besides its run directory (which is always written)."""

    name: str = "none"  # none | wandb
    mode: str = "offline"  # wandb: online | offline | disabled
    project: str = "prunebench"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        check_choice("logger.name", self.name, ("none", "wandb"))
        check_choice("logger.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class CheckpointConfig:
    """checkpoint.pt in the run directory, so that a killed or preempted run resumes where it
    stopped when the same command runs again with the same run directory."""

    # also every N epochs of training (0: only at the end of pretraining and of each round, and
    # when a stop signal arrives)
    every_epochs: int = 1
    resume: bool = True  # false: start over, discarding the checkpoint and results the directory holds
    keep: bool = False  # keep checkpoint.pt once the run has finished (it holds θ0 and the rewind point)

    def __post_init__(self):
        check(self.every_epochs >= 0, f"checkpoint.every_epochs must be >= 0, got {self.every_epochs}")


@dataclass
class LatencyConfig:
    """CPU/GPU forward latency of the final pruned network against the dense one: the compacted
    network (structured pruning), or sparse CSR kernels where they pay (unstructured: core/csr.py)."""

    batch_sizes: List[int] = field(default_factory=lambda: [1, 128])
    repeats: int = 10  # the median of this many timed forward passes (0: do not measure)
    warmup: int = 2
    sparse: bool = True  # unstructured: time the final network with sparse kernels too (sparse_latency)
    # language models: tokens/s of a prefill of prompt_tokens and of decode_tokens single-token
    # steps with the KV cache, at each of lm_batch_sizes sequences
    prompt_tokens: int = 128
    decode_tokens: int = 32
    lm_batch_sizes: List[int] = field(default_factory=lambda: [1, 8])

    def __post_init__(self):
        check(self.repeats >= 0 and self.warmup >= 0, "latency.repeats and latency.warmup must be >= 0")
        check(self.prompt_tokens >= 1 and self.decode_tokens >= 1,
              "latency.prompt_tokens and latency.decode_tokens must be >= 1")
        check(all(b >= 1 for b in self.lm_batch_sizes),
              f"latency.lm_batch_sizes must be >= 1, got {list(self.lm_batch_sizes)}")
        check(all(b >= 1 for b in self.batch_sizes), f"latency.batch_sizes must be >= 1, got {list(self.batch_sizes)}")


@dataclass
class CalibrationConfig:
    """The examples that layer-wise criteria (Wanda, SparseGPT) read each layer's inputs from: a
    fixed draw, seeded apart from every other random stream, never from the test split."""

    samples: int = 128  # examples (images; sequences for language models), as the papers
    # language models: the text they come from (null: the run's dataset; c4 | wikitext2 | wikitext103,
    # or the path of a local text file); windows of dataset.seq_len tokens
    dataset: Optional[str] = None
    hub_name: Optional[str] = None  # that dataset's Hub name or the directory of a local copy (null: its default)
    source: str = "train"  # the split: train | val (dataset.val_size > 0); never the test split
    seed: Optional[int] = None  # null: the run's seed; another one draws another sample
    # examples through the network at once; null: 128 images, or 1 sequence for language models (the papers)
    batch_size: Optional[int] = None
    # record each pruned layer's ‖WX − ŴX‖² / ‖WX‖² on these inputs, for every criterion
    layer_errors: bool = False

    def __post_init__(self):
        check(self.samples >= 1, f"calibration.samples must be >= 1, got {self.samples}")
        check_choice("calibration.source", self.source, ("train", "val"))
        check(self.batch_size is None or self.batch_size >= 1,
              f"calibration.batch_size must be >= 1 or null, got {self.batch_size}")


@dataclass
class CurvatureConfig:
    """Memory that curvature estimates (OBD's diagonals, OBS's inverse blocks, K-FAC factors)
    may hold at once; per-example work is chunked to fit, and a configuration whose smallest
    chunk cannot fit is refused before any training."""

    memory_gb: Optional[float] = None  # null: 80% of the device's free memory when the run starts

    def __post_init__(self):
        check(self.memory_gb is None or self.memory_gb > 0, f"curvature.memory_gb must be > 0 or null, "
                                                            f"got {self.memory_gb}")


@dataclass
class ProtocolConfig:
    """A paper line's evaluation settings (conf/protocol/: wanda, llm_pruner), applied over the
    run's dataset, calibration and eval; its name is stamped on the result, and the report never
    puts results of different protocols in one table."""

    name: str = "none"


@dataclass
class EvalConfig:
    """Language models: zero-shot task accuracy through lm-evaluation-harness (lm/evaluation.py),
    on the dense, the pruned and the recovered model."""

    tasks: List[str] = field(default_factory=list)  # lm-eval task names (boolq, arc_easy, ...); empty: none
    limit: Optional[int] = None  # examples per task (null: all)
    batch_size: int = 1  # sequences per forward pass (lm-eval's default)
    include_path: Optional[str] = None  # a directory of task YAMLs in lm-eval's format, beside its own

    def __post_init__(self):
        check(self.limit is None or self.limit >= 1, f"eval.limit must be >= 1 or null, got {self.limit}")
        check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Config:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    criterion: CriterionConfig = MISSING
    granularity: GranularityConfig = MISSING
    retrain: RetrainConfig = MISSING
    schedule: ScheduleConfig = MISSING
    train: TrainConfig = MISSING
    recovery: RecoveryConfig = MISSING
    allocation: AllocationConfig = MISSING
    # fraction of all prunable weights that are zero after the last round (structured pruning:
    # fraction of all units removed)
    sparsity: float = 0.9
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when present, else CPU
    # GPU only (the CPU is deterministic): deterministic algorithms and cuDNN convolutions (same
    # numbers on the same GPU, slower), or cuDNN's benchmarked fastest ones
    deterministic: bool = False
    tf32: bool = True  # GPU only: TensorFloat-32 convolutions and matmuls (Ampere and later); false: fp32
    data_dir: str = "data"

    def __post_init__(self):
        self.resolve()
        self.check()

    def resolve(self) -> None:
        """What the values left null mean, given the rest of the config: the only step that
        changes a value (every check after it only reads)."""
        self.train = when_to_prune(self)
        if self.calibration.batch_size is None:
            self.calibration.batch_size = 1 if self.model.task == "causal_lm" else 128
        self.criterion.resolve_with(self)

    def check(self) -> None:
        """Every rule between the groups; raises ConfigError, changes nothing."""
        check(0.0 <= self.sparsity < 1.0, f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.granularity.name == "nm":  # the pattern fixes the sparsity of the layers it covers
            n, m = self.granularity.n, self.granularity.m
            check(abs(self.sparsity - (1 - n / m)) < 1e-9, f"granularity=nm {n}:{m} leaves the layers it applies to "
                  f"at sparsity {1 - n / m:g} exactly: set sparsity={1 - n / m:g} (got {self.sparsity:g})")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
              f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check_tasks(self.model, self.dataset)
        check_protocol(self)
        check(not self.eval.tasks or self.model.task == "causal_lm",
              f"eval.tasks are zero-shot tasks of language models (lm-eval); model={self.model.name} is a "
              f"classifier, judged by its test accuracy")
        check_transformer_units(self)
        check(self.calibration.hub_name is None or self.calibration.dataset is not None,
              "calibration.hub_name says where calibration.dataset's files are: set calibration.dataset too")
        check(self.calibration.dataset is None or self.model.task == "causal_lm",
              f"calibration.dataset={self.calibration.dataset} chooses the text of language models; model="
              f"{self.model.name} calibrates on its own dataset's {self.calibration.source} split")
        self.model.check_with(self)
        self.retrain.check_with(self)
        self.recovery.check_with(self)
        self.allocation.check_with(self)
        self.criterion.check_with(self)
        check(not self.criterion.layer_rates or self.schedule.rate is not None,
              "criterion.layer_rates are per-round rates: they need schedule.rate (schedule=iterative "
              "schedule.rounds=null schedule.rate=0.2)")
        self.schedule.check_with(self)
        check(not self.criterion.stage_ratios or self.schedule.rate is None,
              "criterion.stage_ratios needs a fixed number of rounds (schedule.rounds), not schedule.rate")


VIT_MODELS = ("vit_tiny", "vit_small")  # models whose heads and MLP channels granularity=width|heads|mlp removes


def check_transformer_units(cfg: "Config") -> None:
    """granularity=width|heads|mlp: language models and ViTs; depth, experts: language models only (which
    criteria score a ViT's units: options.ViTConfig.check_with)."""
    name, model = cfg.granularity.name, cfg.model.name
    if name not in LM_STRUCTURES or cfg.model.task == "causal_lm":
        return
    vit = model in VIT_MODELS
    others = "filter, channel, width, heads or mlp" if vit else "filter or channel"
    what = {"depth": "whole decoder blocks of", "experts": "whole experts of mixture-of-experts"}
    check(name not in what, f"granularity={name} removes {what.get(name)} language models (model=hf_causal_lm); "
                            f"model={model} prunes structures with granularity={others}")
    check(vit, f"granularity={name} removes attention heads and MLP channels of transformers (model=hf_causal_lm, "
               f"{', '.join(VIT_MODELS)}); model={model} prunes structures with granularity=filter or channel")


def check_protocol(cfg: "Config") -> None:
    """A protocol is its YAML's settings exactly: a run that overrides one is not that protocol."""
    name = cfg.protocol.name
    if name == "none":
        return
    check(cfg.model.task == "causal_lm", f"protocol={name} is a language-model evaluation protocol; "
                                         f"model={cfg.model.name} is a classifier")
    from importlib import resources

    settings = OmegaConf.to_container(OmegaConf.load(str(resources.files("prunebench.conf") / "protocol"
                                                         / f"{name}.yaml")))
    for group, values in settings.items():
        for key, value in values.items():
            have = getattr(getattr(cfg, group), key)
            have = list(have) if isinstance(have, (list, tuple)) else have
            check(have == value, f"protocol={name} sets {group}.{key}={value}; this run has {have}, so it would "
                                 f"not be {name}'s protocol: leave the override out, or use protocol=none")


def check_tasks(model: ModelConfig, dataset: DatasetConfig) -> None:
    """A classifier needs labelled examples, a language model text."""
    if model.task == dataset.task:
        return
    if model.task == "causal_lm":
        raise ConfigError(f"model=hf_causal_lm ({model.name}) is a causal language model; dataset={dataset.name} "
                          f"holds labelled examples for classifiers: use dataset=wikitext2, wikitext103, c4 or text")
    raise ConfigError(f"dataset={dataset.name} is text for causal language models; model={model.name} is a "
                      f"classifier: use model=hf_causal_lm model.name=<Hub name or local path>")


def when_to_prune(cfg: "Config") -> TrainConfig:
    """train.pretrain_epochs=null resolved: a criterion that prunes at initialisation prunes
    before training, and the pruned network then trains `epochs` with the training recipe (lr,
    milestones, weight decay: no finetune_* values); one that prunes a trained network pretrains
    `epochs`. Schedules that prune inside training train `epochs`."""
    train = cfg.train
    if train.pretrain_epochs is not None:
        return train
    if cfg.criterion.prunes_at == "init" and not cfg.schedule.inside_training:
        return replace(train, pretrain_epochs=0, finetune_epochs=train.epochs, finetune_lr=None,
                       finetune_weight_decay=None, finetune_lr_milestones=None, warmup_epochs=0,
                       finetune_warmup_epochs=train.warmup_epochs)
    return replace(train, pretrain_epochs=train.epochs)


def finetune_recipe(train: TrainConfig) -> TrainConfig:
    """The recipe of the finetune phases: the training recipe with its finetune_* values."""
    return replace(train, lr=train.finetune_lr or train.lr, epochs=train.finetune_epochs,
                   warmup_epochs=train.finetune_warmup_epochs,
                   weight_decay=train.weight_decay if train.finetune_weight_decay is None
                   else train.finetune_weight_decay,
                   lr_milestones=train.lr_milestones if train.finetune_lr_milestones is None
                   else list(train.finetune_lr_milestones))


# ------------------------------------------------------------------------------ registration
def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="prunebench_schema", node=Config)
    cs.store(name="logger_schema", node=LoggerConfig)
    cs.store(name="schedule_schema", node=ScheduleConfig)
    cs.store(name="schedule_gradual_schema", node=GradualConfig)
    cs.store(name="schedule_dynamic_schema", node=DynamicConfig)
    cs.store(name="train_schema", node=TrainConfig)
    # criteria and retrain policies register their own schemas: see criteria/ and retrain/


register_schemas()


# options whose value is a mapping with keys of the user's choosing: Hydra refuses a plain
# `key={new: ...}` on the empty default as an unknown key ("use +"), so it is given as `++key=...`
MAPPING_OPTIONS = ("criterion.layer_rates",)


def with_mapping_overrides(overrides: List[str]) -> List[str]:
    return [f"++{o}" if o.split("=", 1)[0] in MAPPING_OPTIONS else o for o in overrides]


def load_config(cfg: DictConfig | Config) -> Config:
    """Composed DictConfig -> dataclasses, running every range check (raises ConfigError)."""
    if isinstance(cfg, Config):
        return cfg
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf wraps errors raised in __post_init__
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def to_plain(cfg: Any) -> Any:
    """Dataclass/DictConfig -> plain dicts and lists (for summary.json and wandb)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
