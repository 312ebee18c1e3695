"""Language models in half precision and on GPUs, checked on the CPU: mixed-precision fine-tuning
with fp32 master weights and bit-packed masks, Wanda's scores in fp32, TF32 off where the
layer-wise criteria solve, the backend switches set from the config, and the load dtype."""

import types

import pytest
import torch
from conftest import tiny_lm_config
from torch.overrides import TorchFunctionMode

import prunebench
from prunebench.runs.checkpoint import StopSignals
from prunebench.core.granularity import Unstructured
from prunebench.core.layerwise import Gram, SquaredNorms
from prunebench.lm import hub, packed, recipe, recovery, tiny
from prunebench.runs.record import Recorder

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llama")
    torch.set_num_threads(2)
    tiny.build(root, "llama", sentences=3000, steps=150, width=32)
    return root


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    pass


def lm_config(path, tmp_path, *extra):
    return tiny_lm_config(path, tmp_path, "dataset.seq_len=64", *extra)


# ------------------------------------------------------------------------------ fine-tuning
def mean_loss(model, windows):
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_fine_tuning_moves_the_weights_and_lowers_the_loss(tiny_llama, tmp_path, dtype):
    """At lr 2e-5 an update is below half an ulp of a bf16 weight: AdamW on the bf16 weights
    themselves moved none of them (measured); fp32 master weights move most of them."""
    cfg = lm_config(tiny_llama, tmp_path, "criterion=magnitude", "criterion.scope=layer", "sparsity=0.5",
                    f"model.dtype={dtype}", "recovery=full", "recovery.epochs=1", "recovery.lr=2e-5",
                    "recovery.batch_size=8")
    exp = recipe.build(cfg)
    recipe.prune(exp, StopSignals())
    params = dict(exp.model.named_parameters())
    before = {n: params[n].detach().clone() for n in exp.masks}
    buffers = {n: b.dtype for n, b in exp.model.named_buffers()}
    windows = torch.stack(exp.data.eval_windows("train", exp.seq_len, "drop"))[:64]
    loss_before = mean_loss(exp.model, windows)
    recovery.recover(exp, Recorder(tmp_path / "rec", metric="ppl"), StopSignals())
    alive = sum(int((w != 0).sum()) for w in before.values())
    moved = sum(int(((params[n] != w) & (w != 0)).sum()) for n, w in before.items())
    assert moved / alive > 0.8, moved / alive
    assert all(torch.equal(params[n][w == 0], torch.zeros_like(params[n][w == 0])) for n, w in before.items())
    assert mean_loss(exp.model, windows) < loss_before
    assert {p.dtype for p in exp.model.parameters()} == {getattr(torch, dtype)}  # the load dtype again
    assert {n: b.dtype for n, b in exp.model.named_buffers()} == buffers


@pytest.mark.parametrize("shape", [(7,), (3, 5), (16, 8), (2, 3, 11)])
def test_packed_masks_round_trip_at_one_bit_per_weight(shape):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.4
    p = packed.pack(bits)
    assert p.dtype == torch.uint8 and p.numel() == -(-bits.numel() // 8)
    assert torch.equal(packed.unpack(p, shape), bits)


def test_fine_tuning_holds_one_bit_per_weight_and_keeps_pruned_weights_zero(tiny_llama, tmp_path, monkeypatch):
    held = []
    of_zeros = packed.PackedMasks.of_zeros
    monkeypatch.setattr(packed.PackedMasks, "of_zeros",
                        classmethod(lambda cls, *a: held.append(of_zeros(*a)) or held[-1]))
    cfg = lm_config(tiny_llama, tmp_path, "criterion=magnitude", "criterion.scope=layer", "sparsity=0.6",
                    "recovery=full", "recovery.epochs=1", "recovery.lr=1e-3", "recovery.batch_size=16")
    exp = recipe.build(cfg)
    recipe.prune(exp, StopSignals())
    zeros = {n: (w == 0).clone() for n, w in recipe.weight_zeros(exp.model, exp.masks).items()}
    recovery.recover(exp, Recorder(tmp_path / "rec", metric="ppl"), StopSignals())
    (masks,) = held
    numel = {n: w.numel() for n, w in zeros.items()}
    assert all(masks.bits[n].numel() * masks.bits[n].element_size() <= numel[n] / 8 + 1 for n in numel)
    tensors = [v for v in vars(masks).values() if isinstance(v, torch.Tensor)]
    assert not tensors and masks.nbytes() <= sum(numel.values()) / 8 + len(numel)
    params = dict(exp.model.named_parameters())
    assert all(bool((params[n] == 0)[z].all()) for n, z in zeros.items())


def test_a_revived_pruned_weight_is_caught():
    w = torch.nn.Parameter(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    masks = packed.PackedMasks({"w": w})
    w.grad = torch.ones_like(w)
    masks.zero_grads()
    assert torch.equal(w.grad, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    with torch.no_grad():
        w[0, 0] = 1e-3
    with pytest.raises(RuntimeError, match="revived"):
        masks.check_weights()


# ------------------------------------------------------------------------------ Wanda in fp16
def test_wanda_scores_fp16_weights_with_large_input_norms_in_fp32():
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(8, 16, generator=g)
    w16 = w32.half()
    norms = SquaredNorms()
    norms(torch.randn(2048, 16, generator=g, dtype=torch.float64) * 200)  # ‖X_j‖ ≈ 9000
    norms(torch.full((4, 16), 0.0, dtype=torch.float64).index_fill_(1, torch.tensor([3, 9]), 4e4))  # ≈ 80000
    assert float(norms.value.sqrt().max()) > 65504  # float16's largest
    scores = prunebench.criteria.wanda.wanda_scores(w16, norms.value)
    assert torch.isfinite(scores).all()
    wanda = prunebench.get_criterion("wanda", scope="layer")
    masks = {}
    for name, w in (("fp16", w16), ("fp32", w16.float())):
        masks[name] = wanda.prune_layer(torch.nn.Parameter(w.clone()), norms, torch.ones_like(w), 0.5, Unstructured())
    assert torch.equal(masks["fp16"].bool(), masks["fp32"].bool())
    assert torch.equal(scores, prunebench.criteria.wanda.wanda_scores(w16.float(), norms.value))


# ------------------------------------------------------------------------------ TF32
class TF32Seen(TorchFunctionMode):
    """Records the TF32 switches at every matrix product and factorisation run inside."""

    WATCHED = {"matmul", "__matmul__", "mm", "cholesky", "cholesky_inverse", "linalg_cholesky"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.WATCHED:
            self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_on():
    """Both TF32 switches on (settable without a GPU), as they were afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_hessian_and_sparsegpt_solve_run_without_tf32(tf32_on):
    g = torch.Generator().manual_seed(0)
    rows, weight = torch.randn(64, 16, generator=g), torch.nn.Parameter(torch.randn(8, 16, generator=g))
    gram, sparsegpt = Gram(torch.float32), prunebench.get_criterion("sparsegpt", scope="layer")
    with TF32Seen() as mode:
        gram(rows)
        sparsegpt.prune_layer(weight, gram, torch.ones_like(weight), 0.5, Unstructured())
    assert len(mode.seen) >= 3 and set(mode.seen) == {(False, False)}
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # as it was before


def test_build_sets_the_backend_switches_from_the_config(tiny_llama, tmp_path, tf32_on, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        recipe.build(lm_config(tiny_llama, tmp_path, "tf32=false", "deterministic=true"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        recipe.build(lm_config(tiny_llama, tmp_path))  # the defaults: tf32=true, deterministic=false
        assert torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


# ------------------------------------------------------------------------------ load dtype
def test_auto_dtype_is_the_checkpoints_own_on_a_gpu_and_float32_on_a_cpu():
    from transformers import LlamaConfig

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16 = LlamaConfig(dtype=torch.bfloat16)
    assert hub.resolve_dtype("auto", cuda, bf16) == torch.bfloat16
    assert hub.resolve_dtype("auto", cpu, bf16) == torch.float32
    assert hub.resolve_dtype("auto", cuda, LlamaConfig(dtype="float16")) == torch.float16
    assert hub.resolve_dtype("auto", cuda, LlamaConfig()) == torch.float32  # the config names none
    assert hub.resolve_dtype("auto", cuda, types.SimpleNamespace(torch_dtype="bfloat16")) == torch.bfloat16  # older
    assert hub.resolve_dtype("float16", cuda, bf16) == torch.float16  # asked for: as asked


def test_the_summary_records_the_checkpoints_dtype(tiny_llama, tmp_path):
    from prunebench.pipeline import run  # not prunebench.pipeline: that attribute exists only once imported

    s = run(lm_config(tiny_llama, tmp_path, "criterion=magnitude", "criterion.scope=layer", "sparsity=0.3"),
            tmp_path / "run")
    assert (s["dtype"], s["checkpoint_dtype"]) == ("float32", "float32")
