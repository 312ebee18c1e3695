"""The options of each named criterion, retrain policy, dataset and model, with their range checks.

They live here, apart from the code they configure, so that the command line checks a config
without importing torch: a typo or an out-of-range value is answered in well under a second.
Each class is named with `@options(group, name, ...)`; every `conf/<group>/<name>.yaml` is
composed over the schema `<group>_<name>_schema`, which is its class here or, when it has none,
the group's base class from config/__init__.py. A new criterion with options of its own is its file in
criteria/, its YAML, and its class here; so is one that can prune language models, which its class
says (`language_models`) so that the command line refuses the others before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Tuple, Type

from hydra.core.config_store import ConfigStore

from . import (LM_STRUCTURES, AllocationConfig, ConfigError, CriterionConfig, DatasetConfig, GranularityConfig,
               ModelConfig, RecoveryConfig, RetrainConfig, check, check_choice)

BASES: Dict[str, type] = {"criterion": CriterionConfig, "retrain": RetrainConfig, "dataset": DatasetConfig,
                          "model": ModelConfig, "granularity": GranularityConfig, "recovery": RecoveryConfig,
                          "allocation": AllocationConfig}
OPTIONS: Dict[str, type] = {}  # "<group>_<name>" -> its options class


def options(group: str, *names: str):
    """Class decorator: the options of `group=<name>` for each name."""

    def wrap(cls: type) -> type:
        for name in names:
            OPTIONS[f"{group}_{name}"] = cls
        return cls

    return wrap


def options_of(group: str, name: str) -> Type:
    return OPTIONS.get(f"{group}_{name}", BASES[group])


def register_schemas() -> None:
    """Every option file of conf/'s named groups, over its schema."""
    root = resources.files("prunebench.conf")
    cs = ConfigStore.instance()
    for group, base in BASES.items():
        cs.store(name=f"{group}_schema", node=base)
        for f in (root / group).iterdir():
            if f.name.endswith(".yaml"):
                name = f.name[:-len(".yaml")]
                cs.store(name=f"{group}_{name}_schema", node=options_of(group, name))


# ------------------------------------------------------------------------------ granularities
@options("granularity", "nm")
@dataclass
class NMConfig(GranularityConfig):
    n: int = 2  # weights kept in every block of m
    m: int = 4  # block length along the input dimension
    # a layer whose input size is not a multiple of m: left dense (and recorded) | error
    indivisible: str = "dense"

    def __post_init__(self):
        super().__post_init__()
        check(self.m >= 2, f"granularity.m must be >= 2, got {self.m}")
        check(1 <= self.n < self.m, f"granularity.n must be in [1, granularity.m), got n={self.n}, m={self.m}")
        check_choice("granularity.indivisible", self.indivisible, ("dense", "error"))
        check(self.reduce == "none", f"granularity.reduce={self.reduce} applies to filter/channel pruning; "
              "N:M compares single weights (leave it at none)")


@options("granularity", "width", "heads", "mlp")
@dataclass
class WidthConfig(GranularityConfig):
    """Whole attention heads and MLP channels of a language model's decoder blocks (lm/structured.py)."""

    # the attention units of a grouped-query model: groups = whole key-value groups (a key and a
    # value head with the query heads that read them) | query = query heads, the same number from
    # every group, the key-value heads kept (the ratio stays an integer). Equal in a model
    # without grouped-query attention
    attention: str = "groups"
    # uniform: every block loses the same share (a standard config of the model's family) |
    # global: the units of all blocks and both modules ranked together on scores standardised per
    # block and module, weighed by their parameters (FLAP's adaptive structure)
    allocation: str = "uniform"
    # how a checkpoint whose blocks differ in size is saved: remote_code = a modeling file beside
    # the weights (from_pretrained(..., trust_remote_code=True)) | pad = every block padded with
    # zero units to the largest (a standard config, loads anywhere, no smaller than the largest block)
    nonuniform: str = "remote_code"

    def __post_init__(self):
        super().__post_init__()
        check_choice("granularity.attention", self.attention, ("groups", "query"))
        check_choice("granularity.allocation", self.allocation, ("uniform", "global"))
        check_choice("granularity.nonuniform", self.nonuniform, ("remote_code", "pad"))
        # (a ViT's units reduce weight-shaped scores: none means l1 there; l2 and sum are choices)


@options("granularity", "depth")
@dataclass
class DepthConfig(GranularityConfig):
    """Whole decoder blocks of a language model (ShortGPT, Gromov et al. 2024)."""

    def __post_init__(self):
        super().__post_init__()
        check(self.reduce == "none", "granularity=depth scores whole blocks: leave granularity.reduce=none")


@options("granularity", "experts")
@dataclass
class ExpertsConfig(GranularityConfig):
    """Whole routed experts of a mixture-of-experts language model (lm/experts.py): `sparsity` is
    the fraction of every MoE block's experts removed, rounded to whole experts."""

    def __post_init__(self):
        super().__post_init__()
        check(self.reduce == "none", "granularity=experts scores whole experts: leave granularity.reduce=none")


# ------------------------------------------------------------------------------ criteria
# What a criterion allows is a class attribute of its options here, read before torch loads:
#   language_models: ClassVar[bool] = True   it can prune model=hf_causal_lm (default: no)
#   structures: ClassVar[Tuple[str, ...]]     the structured granularities of language models it
#                                             scores (width, heads, mlp, depth, experts; default: none)


def check_structured_criterion(criterion: CriterionConfig, granularity: str) -> None:
    """The selection options of single weights do not apply to a language model's units
    (granularity.allocation decides how blocks share them; every block keeps a unit of each module)."""
    unused = {"exclude_first": criterion.exclude_first, "exclude_last": criterion.exclude_last,
              "exclude": list(criterion.exclude), "layer_rates": dict(criterion.layer_rates),
              "stage_ratios": list(criterion.stage_ratios), "min_density": criterion.min_density,
              "sanity": criterion.sanity != "none" and criterion.sanity}
    for key, value in unused.items():
        check(not value, f"criterion.{key}={value} selects single weights; granularity={granularity} removes "
                         f"units of every decoder block (granularity.allocation shares them among blocks)")
    check(criterion.scope != "stage", f"criterion.scope=stage is for convolutional stages; granularity="
                                      f"{granularity} shares units by granularity.allocation")


def structure_criteria(granularity: str) -> List[str]:
    names = [key.split("_", 1)[1] for key in OPTIONS if key.startswith("criterion_")]
    return sorted(n for n in names if granularity in options_of("criterion", n).structures)


def language_model_criteria() -> List[str]:
    """The criteria that can prune a language model: those whose options class says so."""
    names = [key.split("_", 1)[1] for key in OPTIONS if key.startswith("criterion_")]
    return sorted(n for n in names if options_of("criterion", n).language_models)


@options("criterion", "magnitude")
@dataclass
class MagnitudeConfig(CriterionConfig):
    language_models: ClassVar[bool] = True  # |θ| needs neither labels nor a classifier
    structures: ClassVar[Tuple[str, ...]] = ("width", "heads", "mlp")  # the L2 norm of a unit's weights
    channel_scoring: str = "independent"  # independent | greedy (filter/channel pruning, scope layer/stage)

    def __post_init__(self):
        super().__post_init__()
        check_choice("criterion.channel_scoring", self.channel_scoring, ("independent", "greedy"))
        check(self.channel_scoring == "independent" or self.scope in ("layer", "stage"),
              "criterion.channel_scoring=greedy decides layer by layer: it needs criterion.scope=layer or stage")


@options("criterion", "random")
@dataclass
class RandomConfig(CriterionConfig):
    """No options of its own: the class says that random scores prune language models too."""

    language_models: ClassVar[bool] = True
    structures: ClassVar[Tuple[str, ...]] = ("width", "heads", "mlp", "experts")  # the baseline of structured pruning


@options("criterion", "magnitude_std")
@dataclass
class MagnitudeStdConfig(CriterionConfig):
    scope: str = "layer"  # the threshold is per layer by definition
    quality: float = 1.0  # λ: prune |w| < λ·std(W)
    # λ per layer (the paper tunes it per layer), keyed by weight name: {"fc3.weight": 0.5}
    layer_quality: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check(self.quality >= 0, f"criterion.quality must be >= 0, got {self.quality}")
        for name, q in self.layer_quality.items():
            check(q >= 0, f"criterion.layer_quality[{name}] must be >= 0, got {q}")
        check(self.scope == "layer", "criterion=magnitude_std thresholds each layer by its own std: "
              f"criterion.scope must be layer, got {self.scope}")
        check(self.sanity != "invert", "criterion.sanity=invert needs a criterion that ranks; "
              "magnitude_std thresholds (use shuffle, or criterion=magnitude)")


@options("criterion", "snip")
@dataclass
class SnipConfig(CriterionConfig):
    batches: int = 1  # mini-batches of the training batch size (SNIP: one)
    bn_mode: str = "eval"  # eval | train: the model's mode while scoring

    def __post_init__(self):
        super().__post_init__()
        check(self.batches >= 1, f"criterion.batches must be >= 1, got {self.batches}")
        check_choice("criterion.bn_mode", self.bn_mode, ("eval", "train"))


@options("criterion", "grasp")
@dataclass
class GraspConfig(CriterionConfig):
    samples_per_class: int = 10
    iterations: int = 1  # class-balanced batches
    temperature: float = 200.0  # logits / T before the softmax
    bn_mode: str = "train"

    def __post_init__(self):
        super().__post_init__()
        check(self.samples_per_class >= 1, "criterion.samples_per_class must be >= 1")
        check(self.iterations >= 1, "criterion.iterations must be >= 1")
        check(self.temperature > 0, f"criterion.temperature must be > 0, got {self.temperature}")
        check_choice("criterion.bn_mode", self.bn_mode, ("eval", "train"))


@options("criterion", "synflow")
@dataclass
class SynflowConfig(CriterionConfig):
    iterations: int = 100
    schedule: str = "exponential"  # exponential | linear: the sparsity of the inner iterations

    def __post_init__(self):
        super().__post_init__()
        check(self.iterations >= 1, f"criterion.iterations must be >= 1, got {self.iterations}")
        check_choice("criterion.schedule", self.schedule, ("exponential", "linear"))


ESTIMATORS = ("empirical_fisher", "fisher", "ggn", "hutchinson")  # OBD's curvature diagonals


@options("criterion", "obd")
@dataclass
class OBDConfig(CriterionConfig):
    estimator: str = "empirical_fisher"
    samples: int = 1024  # training examples the curvature is averaged over
    probes: int = 100  # hutchinson: Rademacher vectors

    def __post_init__(self):
        super().__post_init__()
        check_choice("criterion.estimator", self.estimator, ESTIMATORS)
        check(self.samples >= 1, f"criterion.samples must be >= 1, got {self.samples}")
        check(self.probes >= 1, f"criterion.probes must be >= 1, got {self.probes}")


@options("criterion", "obs")
@dataclass
class OBSConfig(CriterionConfig):
    alpha: float = 1e-5  # damping: H = αI + empirical Fisher
    samples: int = 1024  # per-example gradients in the Fisher
    block_size: int = 128  # weights per diagonal block of H⁻¹ (within a layer)
    chunk: int = 32  # gradients per Woodbury update

    def __post_init__(self):
        super().__post_init__()
        check(1e-8 <= self.alpha <= 1e-4, f"criterion.alpha must be in [1e-8, 1e-4], got {self.alpha}")
        check(self.samples >= 1, f"criterion.samples must be >= 1, got {self.samples}")
        check(self.block_size >= 1, f"criterion.block_size must be >= 1, got {self.block_size}")
        check(self.chunk >= 1, f"criterion.chunk must be >= 1, got {self.chunk}")


@options("criterion", "kron_obd", "kron_obs")
@dataclass
class KronConfig(CriterionConfig):
    samples: int = 1024  # training examples the factors are averaged over
    fisher: str = "true"  # true: labels sampled from the model (as the paper) | empirical: data labels
    # kron_obs: S⁻¹ is taken of S + damping·mean(diag S)·I
    damping: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        check(self.samples >= 1, f"criterion.samples must be >= 1, got {self.samples}")
        check_choice("criterion.fisher", self.fisher, ("true", "empirical"))
        check(self.damping >= 0, f"criterion.damping must be >= 0, got {self.damping}")


@options("criterion", "eigendamage")
@dataclass
class EigenDamageConfig(CriterionConfig):
    samples: int = 1024  # training examples the K-FAC factors are averaged over
    fisher: str = "true"  # true: labels sampled from the model (as the paper) | empirical

    def __post_init__(self):
        super().__post_init__()
        check(self.samples >= 1, f"criterion.samples must be >= 1, got {self.samples}")
        check_choice("criterion.fisher", self.fisher, ("true", "empirical"))


@dataclass
class LayerwiseConfig(CriterionConfig):
    """Options of the criteria that prune layer by layer after training (Wanda, SparseGPT)."""

    language_models: ClassVar[bool] = True  # block by block on the device (lm/blockwise.py)

    # true: layer by layer in forward order, each calibrated on the inputs the pruned layers before
    # it produce (the authors' code); false: every layer calibrated on the dense network's inputs
    sequential: bool = True
    # layer: each layer after the ones before it are pruned | block: the layers of a block (the
    # first numbered container: blocks.3, layer1.0, a decoder block) together, on the pruned
    # blocks' outputs (the authors' scripts) | null: block for language models, layer otherwise
    sequential_unit: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        check(self.sequential_unit in (None, "layer", "block"),
              f"criterion.sequential_unit={self.sequential_unit!r} is not one of: layer, block, null")

    def resolve_with(self, cfg) -> None:
        if self.sequential_unit is None:
            self.sequential_unit = "block" if cfg.model.task == "causal_lm" else "layer"


@options("criterion", "wanda")
@dataclass
class WandaConfig(LayerwiseConfig):
    structures: ClassVar[Tuple[str, ...]] = ("width", "heads", "mlp")  # Wanda-sp: Σ |W|·‖X‖ over a unit
    scope: str = "layer"  # the paper's: every layer at the same sparsity
    # row: weights compete within their output row (the paper's choice for LLMs) | layer: within
    # the layer (or the whole network with scope=global and sequential=false). N:M: within blocks
    compare: str = "row"

    def __post_init__(self):
        super().__post_init__()
        check_choice("criterion.compare", self.compare, ("row", "layer"))
        check(self.scope == "layer" or (self.compare == "layer" and not self.sequential),
              f"criterion=wanda with compare={self.compare}, sequential={self.sequential} decides layer by layer: "
              f"criterion.scope must be layer (scope=global needs compare=layer sequential=false), got {self.scope}")
        check(self.sanity != "shuffle" or (self.compare == "layer" and not self.sequential),
              "criterion.sanity=shuffle re-places a whole network's survivors after selection; criterion=wanda "
              "decides layer by layer unless compare=layer sequential=false")


@options("criterion", "ria")
@dataclass
class RiaConfig(LayerwiseConfig):
    """RIA (Zhang et al. 2024): (|W_ij|/Σ_j|W_ij| + |W_ij|/Σ_i|W_ij|) · ‖X_j‖₂^a (criteria/ria.py)."""

    scope: str = "layer"  # every layer at the same sparsity (the authors' code)
    a: float = 0.5  # the exponent of the input norm (the authors' --a)
    # layer: weights compete within the layer (the authors' default) | row: within their output
    # row (their --per_outneuron, Wanda's). N:M: within blocks
    compare: str = "layer"
    # N:M only: choose the blocks on input channels reallocated by their scores (the authors'
    # --reallocation, off in their scripts); the layer is then N:M after that permutation
    permute: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_choice("criterion.compare", self.compare, ("row", "layer"))
        check(self.a >= 0, f"criterion.a must be >= 0 (0: relative importance alone), got {self.a}")
        check(self.scope == "layer", f"criterion=ria decides layer by layer: criterion.scope must be layer, "
                                     f"got {self.scope}")
        check(self.sanity != "shuffle", "criterion.sanity=shuffle re-places a whole network's survivors after "
                                        "selection; criterion=ria decides layer by layer")

    def check_with(self, cfg) -> None:
        super().check_with(cfg)
        check(not self.permute or cfg.granularity.name == "nm",
              f"criterion.permute reallocates input channels for N:M sparsity: it needs granularity=nm "
              f"(got {cfg.granularity.name})")
        # the run checks N:M in each layer's storage order; a permuted layer is N:M only in its own order
        check(not self.permute, "criterion.permute=true gives layers that are N:M after a permutation of "
                                "their inputs, not in storage order, which the run's N:M check (and 2:4 kernels "
                                "without that permutation) require: not available in runs yet "
                                "(prunebench.criteria.ria.permuted_nm_keep computes it)")


@options("criterion", "sparsegpt")
@dataclass
class SparseGPTConfig(LayerwiseConfig):
    scope: str = "layer"  # every layer at the same sparsity, each column block too (the paper)
    block_size: int = 128  # columns solved together; the mask is chosen per block (the paper: 128)
    damp: float = 0.01  # λ = damp · mean(diag H), added to H = 2XXᵀ
    precision: str = "float32"  # of H, its Cholesky factors and the updates (the paper: float32)

    def __post_init__(self):
        super().__post_init__()
        check(self.block_size >= 1, f"criterion.block_size must be >= 1, got {self.block_size}")
        check(self.damp > 0, f"criterion.damp must be > 0 (a fraction of mean diag H), got {self.damp}")
        check_choice("criterion.precision", self.precision, ("float32", "float64"))
        check(self.scope == "layer", "criterion=sparsegpt prunes every layer (every column block) to the same "
              f"sparsity: criterion.scope must be layer, got {self.scope}")
        check(self.sanity == "none", f"criterion=sparsegpt chooses its mask while it reconstructs: "
              f"criterion.sanity={self.sanity} does not apply")

    def check_with(self, cfg) -> None:
        super().check_with(cfg)
        if cfg.granularity.name == "nm":
            check(self.block_size % cfg.granularity.m == 0, f"criterion.block_size={self.block_size} must be a "
                  f"multiple of granularity.m={cfg.granularity.m} (an N:M block may not straddle two column blocks)")


@dataclass
class StructureCriterionConfig(CriterionConfig):
    """Options of the criteria that score only language models' structures (lm/structured.py)."""

    language_models: ClassVar[bool] = True
    scope: str = "layer"  # unused: granularity.allocation decides how units are shared among blocks


@options("criterion", "flap")
@dataclass
class FlapConfig(StructureCriterionConfig):
    structures: ClassVar[Tuple[str, ...]] = ("width", "heads", "mlp")
    # wifv: the fluctuation of each input feature of o_proj / down_proj over the calibration tokens
    # times the squared norm of the weight column that reads it (the paper's choice) | ifv: the
    # fluctuation alone | wifn: ‖X_j‖ · ‖W_:,j‖
    metric: str = "wifv"
    # add the removed features' mean contribution W[:, removed] · mean(X[removed]) to the output bias
    compensate: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_choice("criterion.metric", self.metric, ("wifv", "ifv", "wifn"))


@options("criterion", "taylor")
@dataclass
class TaylorConfig(StructureCriterionConfig):
    """LLM-Pruner's first-order importance |w · ∂L/∂w| summed over a unit, from the gradients of
    the next-token loss on the calibration windows (the dense model's, accumulated)."""

    structures: ClassVar[Tuple[str, ...]] = ("width", "heads", "mlp")
    # model: one backward pass of the whole model on the device (the authors') | blocks: one
    # decoder block on the device at a time (each block's inputs kept on the CPU, its graph rebuilt
    # on the way back): the same gradients, for models whose backward pass does not fit
    gradients: str = "model"

    def __post_init__(self):
        super().__post_init__()
        check_choice("criterion.gradients", self.gradients, ("model", "blocks"))


@options("criterion", "block_influence")
@dataclass
class BlockInfluenceConfig(StructureCriterionConfig):
    """ShortGPT's Block Influence 1 − E[cos(x_in, x_out)] of each decoder block over the calibration tokens."""

    structures: ClassVar[Tuple[str, ...]] = ("depth",)


@options("criterion", "angular")
@dataclass
class AngularConfig(StructureCriterionConfig):
    """Gromov et al. 2024: the angular distance arccos(cos(x^l, x^(l+n)))/π between the input of
    block l and of block l+n at each window's last token, averaged over the windows; the n
    consecutive blocks with the smallest go."""

    structures: ClassVar[Tuple[str, ...]] = ("depth",)


@options("criterion", "frequency")
@dataclass
class FrequencyConfig(StructureCriterionConfig):
    """How often the router chooses each expert (among its top-k) over the calibration tokens; the
    least chosen experts go (the frequency baseline of expert pruning, e.g. Lu et al. 2024)."""

    structures: ClassVar[Tuple[str, ...]] = ("experts",)


@options("criterion", "reap")
@dataclass
class ReapConfig(StructureCriterionConfig):
    """REAP (Lasby et al. 2025): an expert's mean, over the calibration tokens routed to it, of its
    router gate times the L2 norm of its output; the lowest go."""

    structures: ClassVar[Tuple[str, ...]] = ("experts",)
    # the gate g: score = the router's score of the expert (softmax probability over all experts,
    # the authors' code's default; a DeepSeek-V3-style router's sigmoid affinity) | renormalized =
    # divided by the sum over the token's chosen experts (their renormalize option)
    gate: str = "score"

    def __post_init__(self):
        super().__post_init__()
        check_choice("criterion.gate", self.gate, ("score", "renormalized"))


# ------------------------------------------------------------------------ recovery
@options("recovery", "lora")
@dataclass
class LoraRecoveryConfig(RecoveryConfig):
    rank: int = 8
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0
    targets: Optional[List[str]] = None  # module names within a block (q_proj, ...); null: every prunable Linear
    merge: Optional[bool] = None  # null: merge when the pruned weights are dense (structured or no pruning)
    lr: float = 2e-4

    def __post_init__(self):
        super().__post_init__()
        check(self.rank >= 1, f"recovery.rank must be >= 1, got {self.rank}")
        check(self.alpha > 0, f"recovery.alpha must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, f"recovery.dropout must be in [0, 1), got {self.dropout}")
        check(self.targets is None or len(self.targets) > 0, "recovery.targets must name some layers, or be null")

    def check_with(self, cfg) -> None:
        super().check_with(cfg)
        check(not (self.merge is False and getattr(cfg.granularity, "nonuniform", None) == "pad"
                   and cfg.granularity.allocation == "global"),
              "recovery.merge=false keeps the adapters apart, sized for the blocks as pruned; granularity."
              "nonuniform=pad saves the blocks padded to the largest, which they would not fit: merge them "
              "(recovery.merge=null) or save with granularity.nonuniform=remote_code")
        check(not (self.merge and cfg.granularity.name in ("unstructured", "nm") and cfg.sparsity > 0),
              f"recovery.merge=true would add the dense product B·A of every adapter to the {cfg.granularity.name} "
              f"sparse weights and fill their zeros: keep the adapters apart (recovery.merge=null or false; they "
              f"are saved as a peft adapter in model/adapter)")


# ------------------------------------------------------------------------ allocation
@options("allocation", "owl")
@dataclass
class OwlConfig(AllocationConfig):
    """OWL (Yin et al. 2024): block l's outlier ratio D_l is the share of its Wanda scores above
    m × their mean; the blocks' densities are D rescaled to a spread of 2·lam and shifted to
    mean 1 − sparsity (lm/owl.py). The authors' defaults: m=5, lam=0.08."""

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self):
        super().__post_init__()
        check(self.m > 0, f"allocation.m must be > 0, got {self.m}")
        check(self.lam >= 0, f"allocation.lam must be >= 0, got {self.lam}")

    def check_with(self, cfg) -> None:
        check(cfg.model.task == "causal_lm", f"allocation=owl shares the sparsity among a language model's decoder "
                                             f"blocks (model=hf_causal_lm); model={cfg.model.name} is a classifier")
        check(cfg.criterion.scope == "layer", f"allocation=owl sets each block's sparsity: it needs "
                                              f"criterion.scope=layer (got {cfg.criterion.scope})")
        check(not cfg.criterion.layer_rates, "allocation=owl sets each block's sparsity; criterion.layer_rates "
                                             "sets each layer's: choose one")
        check(cfg.granularity.name == "unstructured",
              f"allocation=owl gives the blocks different sparsities: granularity={cfg.granularity.name} is not "
              f"supported (N:M fixes every layer at 1 - n/m; the authors' mixed N:M and structured targets per "
              f"block are not implemented): use granularity=unstructured")
        s = cfg.sparsity
        check(2 * self.lam <= s and 2 * self.lam < 1 - s,
              f"allocation.lam={self.lam:g} spreads the blocks' sparsities over 2·lam around sparsity={s:g}, so a "
              f"block may be up to 2·lam from it; every block must stay in [0, 1): use lam < "
              f"{min(s, 1 - s) / 2:g}")


# ------------------------------------------------------------------------ retrain policies
@options("retrain", "rewind")
@dataclass
class RewindConfig(RetrainConfig):
    # reset survivors to the weights after this many pretraining epochs (0 = θ0)
    rewind_epoch: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.rewind_epoch >= 0, f"retrain.rewind_epoch must be >= 0, got {self.rewind_epoch}")

    def keeps_epoch(self) -> int:
        return self.rewind_epoch

    def check_with(self, cfg) -> None:
        check(self.rewind_epoch <= cfg.train.pretrain_epochs,
              f"retrain.rewind_epoch={self.rewind_epoch} is beyond the pretraining "
              f"(train.pretrain_epochs={cfg.train.pretrain_epochs}); use 0..{cfg.train.pretrain_epochs}")


@options("retrain", "isometry")
@dataclass
class IsometryConfig(RetrainConfig):
    steps: int = 1000  # SGD steps per layer
    lr: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        check(self.steps >= 1, f"retrain.steps must be >= 1, got {self.steps}")
        check(self.lr > 0, f"retrain.lr must be > 0, got {self.lr}")


# -------------------------------------------------------------------------------- datasets
@options("dataset", "synthetic")
@dataclass
class SyntheticConfig(DatasetConfig):
    num_train: int = 1024
    num_test: int = 512
    num_classes: int = 10
    shape: List[int] = field(default_factory=lambda: [1, 28, 28])
    noise: float = 8.0  # noise std around each unit-variance prototype (LeNet-300-100: ~75% test acc)
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.num_train > 0 and self.num_test > 0, "dataset.num_train and dataset.num_test must be > 0")
        check(self.num_classes >= 2, f"dataset.num_classes must be >= 2, got {self.num_classes}")
        check(len(self.shape) == 3 and all(s > 0 for s in self.shape),
              f"dataset.shape must be [channels, height, width], got {list(self.shape)}")
        check(self.noise >= 0, f"dataset.noise must be >= 0, got {self.noise}")


@options("dataset", "mnist")
@dataclass
class MNISTConfig(DatasetConfig):
    normalize: bool = True  # (x - mean) / std with the training set's statistics
    download: bool = True  # fetch with torchvision into data_dir when the files are not found


DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts the files


@options("dataset", "fashion_mnist")
@dataclass
class FashionMNISTConfig(MNISTConfig):
    # also looked in after data_dir (Debian's package puts the files here); null: only data_dir
    system_dir: Optional[str] = DEBIAN_DIR


@options("dataset", "cifar10", "cifar100")
@dataclass
class CIFARConfig(DatasetConfig):
    normalize: bool = True  # per channel (x - mean) / std with the training set's statistics
    download: bool = True  # fetch with torchvision into data_dir when the files are not found


@options("dataset", "imagefolder")
@dataclass
class ImageFolderConfig(DatasetConfig):
    train_dir: str = "train"  # relative to data_dir
    test_dir: str = "val"
    image_size: int = 224  # side of the square crop the model sees
    resize: int = 256  # test images: shorter side resized to this, then the centre crop
    workers: int = 4  # DataLoader worker processes (0: load in the main process)

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.train_dir) and bool(self.test_dir), "dataset.train_dir and dataset.test_dir must be set")
        check(self.image_size >= 1, f"dataset.image_size must be >= 1, got {self.image_size}")
        check(self.resize >= self.image_size,
              f"dataset.resize must be >= dataset.image_size ({self.image_size}), got {self.resize}")
        check(self.workers >= 0, f"dataset.workers must be >= 0, got {self.workers}")


TEXT_DATASETS = ("wikitext2", "wikitext103", "c4", "text")


@options("dataset", *TEXT_DATASETS)
@dataclass
class TextDatasetConfig(DatasetConfig):
    """Text for causal language models, tokenised by the model's tokenizer once and cached in
    data_dir/tokens; evaluated in consecutive windows of seq_len tokens."""

    task: ClassVar[str] = "causal_lm"
    # tokens per window, for evaluation and calibration; null: the model's context
    # (max_position_embeddings), as SparseGPT's and Wanda's scripts do (OPT 2048, LLaMA-2 4096)
    seq_len: Optional[int] = None
    hub_name: Optional[str] = None  # datasets.load_dataset name, or the directory of a local copy
    hub_config: Optional[str] = None  # its configuration (wikitext-2-raw-v1)
    train_file: Optional[str] = None  # c4: the shards (data_files) of the training and validation splits
    validation_file: Optional[str] = None
    path: Optional[str] = None  # text: a UTF-8 file, or a directory with train.txt [valid.txt] test.txt
    test_fraction: float = 0.1  # text, one file: its last lines are the test split
    val_fraction: float = 0.0  # text, one file: the lines before them are the validation split
    eval_documents: Optional[int] = None  # c4: the first validation documents joined (the papers: 1100)
    eval_windows: Optional[int] = None  # at most this many evaluation windows (c4 papers: 256); null: all
    # keep: the shorter window left at the end is evaluated too, every token counts | drop: as the papers
    last_window: str = "keep"

    def __post_init__(self):
        super().__post_init__()
        check(self.seq_len is None or self.seq_len >= 2, f"dataset.seq_len must be >= 2 or null, got {self.seq_len}")
        check_choice("dataset.last_window", self.last_window, ("keep", "drop"))
        check(self.val_size == 0, f"dataset.val_size carves images from a training set; dataset={self.name} "
                                  f"has its own splits (text: dataset.val_fraction), got val_size={self.val_size}")
        check(not self.augment, f"dataset.augment crops and flips images; dataset={self.name} is text")
        check(0.0 < self.test_fraction < 1.0 and 0.0 <= self.val_fraction < 1.0 - self.test_fraction,
              f"dataset.test_fraction must be in (0, 1) and dataset.val_fraction in [0, 1 - test_fraction), got "
              f"{self.test_fraction} and {self.val_fraction}")
        for key in ("eval_documents", "eval_windows"):
            value = getattr(self, key)
            check(value is None or value >= 1, f"dataset.{key} must be >= 1 or null, got {value}")
        if self.name == "text":
            check(bool(self.path), "dataset=text needs dataset.path: a text file, or a directory with train.txt "
                                   "and test.txt")
        else:
            check(bool(self.hub_name), f"dataset={self.name} needs dataset.hub_name (a Hub dataset or a local copy)")


# ---------------------------------------------------------------------------------- models
@options("model", "hf_causal_lm")
@dataclass
class CausalLMConfig(ModelConfig):
    """Any transformers AutoModelForCausalLM checkpoint: a Hub name or a local directory."""

    task: ClassVar[str] = "causal_lm"
    name: str = "facebook/opt-125m"
    source: str = "hf"
    revision: Optional[str] = None  # a Hub branch, tag or commit (null: main)
    # the weights' precision: auto = the checkpoint's own dtype on a GPU, float32 on a CPU
    dtype: str = "auto"
    trust_remote_code: bool = False  # run model code shipped with the checkpoint (off: only transformers' own)

    def __post_init__(self):
        super().__post_init__()
        check_choice("model.dtype", self.dtype, ("auto", "float16", "bfloat16", "float32"))
        check(self.source == "hf", "model=hf_causal_lm loads through transformers: model.source must be hf")
        check(self.init == "default", f"model.init={self.init} would overwrite the pretrained weights of "
                                      f"{self.name}; leave model.init=default")
        check(not self.prune_biases and not self.prune_norm and not self.checkpoint,
              "model=hf_causal_lm prunes the Linear weights of the decoder blocks (as SparseGPT and Wanda): "
              "model.prune_biases, model.prune_norm and model.checkpoint do not apply (model.name takes a path)")

    def check_with(self, cfg) -> None:
        """The language-model recipe: one-shot post-training pruning, as the papers."""
        usable = language_model_criteria()
        check(cfg.criterion.name in usable, f"criterion={cfg.criterion.name} is not available for language "
              f"models (it needs labels or a classifier's curvature); use one of: {', '.join(usable)}")
        check(cfg.schedule.name == "oneshot", f"schedule={cfg.schedule.name}: language models are pruned once "
                                              f"after training (schedule=oneshot)")
        check(cfg.retrain.name == "retain", f"retrain={cfg.retrain.name}: a pretrained language model keeps its "
                                            f"surviving weights (retrain=retain)")
        structures = options_of("criterion", cfg.criterion.name).structures
        check(cfg.granularity.name in ("unstructured", "nm") + tuple(LM_STRUCTURES), f"granularity="
              f"{cfg.granularity.name}: language models are pruned unstructured, N:M, or by structure "
              f"({', '.join(LM_STRUCTURES)})")
        check(cfg.granularity.name not in LM_STRUCTURES or cfg.granularity.name in structures,
              f"criterion={cfg.criterion.name} cannot score granularity={cfg.granularity.name}"
              f"{f' (it scores: {chr(44).join(structures)})' if structures else ' (it scores single weights)'}; "
              f"criteria for {cfg.granularity.name}: {', '.join(structure_criteria(cfg.granularity.name))}")
        if cfg.granularity.name not in LM_STRUCTURES and issubclass(options_of("criterion", cfg.criterion.name),
                                                                   StructureCriterionConfig):
            raise ConfigError(f"criterion={cfg.criterion.name} scores structures ({', '.join(structures)}), not "
                              f"single weights: set granularity={structures[0]}")
        if cfg.granularity.name in LM_STRUCTURES:
            check_structured_criterion(cfg.criterion, cfg.granularity.name)
        check(cfg.granularity.name not in LM_STRUCTURES or cfg.granularity.reduce == "none",
              f"granularity.reduce={cfg.granularity.reduce}: a language model's criterion scores its "
              f"{cfg.granularity.name} units itself (leave granularity.reduce=none)")
        check(cfg.train.finetune_epochs == 0, f"train.finetune_epochs={cfg.train.finetune_epochs}: a language "
              f"model is fine-tuned after pruning by recovery=full or recovery=lora (recovery.epochs)")
        check(cfg.train.pretrain_epochs == 0, f"train.pretrain_epochs={cfg.train.pretrain_epochs}: model="
              f"hf_causal_lm prunes the pretrained {self.name} as it is (train.pretrain_epochs=0)")
        check(not cfg.calibration.layer_errors, "calibration.layer_errors is not measured for language models yet")
        source = cfg.calibration.dataset
        check(source is None or source in TEXT_DATASETS[:-1] or Path(source).is_file(),
              f"calibration.dataset={source} is neither one of {', '.join(TEXT_DATASETS[:-1])} nor a text file")


@options("model", "lenet300")
@dataclass
class LeNet300Config(ModelConfig):
    hidden: List[int] = field(default_factory=lambda: [300, 100])

    def __post_init__(self):
        super().__post_init__()
        check(len(self.hidden) > 0 and all(h > 0 for h in self.hidden),
              f"model.hidden must be positive layer widths, got {list(self.hidden)}")


@options("model", "resnet20", "resnet32", "resnet56")
@dataclass
class ResNetConfig(ModelConfig):
    # A: zero-padding shortcut, no parameters | B: 1x1 conv + batch norm where the shape changes
    shortcut: str = "A"

    def __post_init__(self):
        super().__post_init__()
        check_choice("model.shortcut", self.shortcut, ("A", "B"))


@options("model", "torchvision")
@dataclass
class TorchvisionConfig(ModelConfig):
    source: str = "torchvision"
    # pretrained weights by name (IMAGENET1K_V1, DEFAULT, ...; downloaded into the torch hub
    # cache, so the first use needs the network); null: randomly initialised
    weights: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        check(self.weights is None or self.init == "default",
              f"model.init={self.init} would overwrite the pretrained model.weights={self.weights}; "
              f"use model.init=default with pretrained weights")


VIT_PRUNABLE = ("patch", "attention", "mlp", "head")  # the kinds of layer model.prune may name


@options("model", "vit_tiny")
@dataclass
class ViTConfig(ModelConfig):
    depth: int = 4  # transformer blocks
    width: int = 64  # embedding dimension
    heads: int = 4  # attention heads (width must divide among them)
    mlp_ratio: float = 2.0  # MLP hidden width / width
    patch_size: int = 4  # side of the square, non-overlapping patches (must divide the image)
    dropout: float = 0.0
    # whose weights may be pruned: patch (the patch embedding), attention (q, k, v, proj), mlp
    # (fc1, fc2), head (the classifier). LayerNorms, the class token and position embeddings never
    prune: List[str] = field(default_factory=lambda: ["attention", "mlp", "head"])

    def __post_init__(self):
        super().__post_init__()
        for key in ("depth", "width", "heads", "patch_size"):
            check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        check(self.width % self.heads == 0,
              f"model.width={self.width} must be divisible by model.heads={self.heads}")
        check(self.mlp_ratio * self.width >= 1, f"model.mlp_ratio must leave the MLP >= 1 unit, got {self.mlp_ratio}")
        check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        check(len(self.prune) > 0 and all(k in VIT_PRUNABLE for k in self.prune),
              f"model.prune must list some of: {', '.join(VIT_PRUNABLE)}; got {list(self.prune)}")
        check(not self.prune_norm, "model.prune_norm: a ViT's LayerNorms are never pruned (model.prune "
                                   "chooses its prunable layers)")


    def check_with(self, cfg) -> None:
        """A ViT's heads and MLP channels are ranked from weight-shaped scores (core/granularity.
        TransformerUnits): the criteria that score a language model's units from calibration do not apply."""
        super().check_with(cfg)
        if cfg.granularity.name not in LM_STRUCTURES:
            return
        check(not isinstance(cfg.criterion, (LayerwiseConfig, StructureCriterionConfig)),
              f"criterion={cfg.criterion.name} scores the units of language models (from calibration); a ViT's "
              f"heads and MLP channels are ranked from weight scores: use criterion=magnitude, random, snip "
              f"(first-order Taylor), grasp, obd or magnitude_increase")
        check(getattr(cfg.criterion, "channel_scoring", "independent") == "independent",
              f"criterion.channel_scoring=greedy rescores consecutive layers' channels; a ViT's "
              f"{cfg.granularity.name} units do not feed one another: leave channel_scoring=independent")


@options("model", "vit_small")
@dataclass
class ViTSmallConfig(ViTConfig):
    depth: int = 6
    width: int = 192
    heads: int = 3


register_schemas()
