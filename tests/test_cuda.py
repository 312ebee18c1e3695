"""The GPU path, on a real CUDA device (skipped without one; scripts/gpu_check.sh runs these).

CIFAR-shaped augmented data, bf16 and channels_last, a structured run with compaction and
latency, OBS and SNIP scores against the CPU's, files a CPU opens, resuming across devices, an
unstructured run's sparse latency with TF32 on, and Wanda's scores of float16 inputs with an
outlier feature."""

import copy
import signal

import pytest
import torch
from conftest import make_config, read_summary
from test_resume import StopAfter, checkpoint_of, without_wall_clock

from prunebench.runs import checkpoint
from prunebench.criteria import ScoreContext, build_criterion
from prunebench.data import build_dataset
from prunebench.core.device import exact_fp32
from prunebench.core.masks import Masks
from prunebench.models import build_model
from prunebench.pipeline import run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

CIFAR_SHAPED = ["dataset.shape=[3,32,32]", "dataset.augment=true", "dataset.num_train=256", "dataset.num_test=128",
                "train.batch_size=64"]


def only_cpu_tensors(state):
    return all(t.device.type == "cpu" for t in state.values())


@pytest.mark.parametrize("extra", [(), ("train.precision=bf16", "train.channels_last=true")], ids=["fp32", "bf16_nhwc"])
def test_cifar_shaped_augmented_run_on_the_gpu(extra, tmp_path):
    summary = run(make_config(*CIFAR_SHAPED, "model=resnet20", "device=cuda", *extra), tmp_path)
    assert summary["device"].startswith("cuda") and summary["versions"]["gpu"]
    assert abs(summary["final"]["sparsity"] - 0.9) * summary["prunable_total"] <= 1
    state = torch.load(tmp_path / "model.pt", weights_only=True)  # no map_location: written from the CPU
    assert only_cpu_tensors(state)
    zeros = sum(int((state[n] == 0).sum()) for n in Masks.load(tmp_path / "masks.pt"))
    assert zeros == round(summary["final"]["sparsity"] * summary["prunable_total"])


def test_structured_run_compacts_times_and_exports_for_the_cpu(tmp_path):
    cfg = make_config(*CIFAR_SHAPED, "model=resnet20", "device=cuda", "granularity=filter", "criterion.scope=layer",
                      "sparsity=0.5", "latency.repeats=3", "latency.batch_sizes=[1,64]", "train.precision=bf16")
    final = run(cfg, tmp_path)["final"]
    assert final["latency_precision"] == "bf16" and final["speedup_b64"] > 0
    program = torch.export.load(str(tmp_path / "model_compact.pt2")).module()
    assert program(torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("criterion, options", [("snip", []),
                                                ("obs", ["criterion.block_size=16", "criterion.samples=64"])])
def test_scores_on_the_gpu_are_the_cpus_in_fp32(criterion, options):
    cfg = make_config("dataset.num_train=128", f"criterion={criterion}", *options)
    data = build_dataset(cfg.dataset, cfg.data_dir)
    torch.manual_seed(0)
    cpu_model = build_model(cfg.model, data.input_shape, data.num_classes)
    scores = {}
    for device, model in (("cpu", cpu_model), ("cuda", copy.deepcopy(cpu_model).to("cuda"))):
        on_device = data.to(device)
        ctx = ScoreContext(model, Masks.ones(model), generator=torch.Generator().manual_seed(2),
                           batches=lambda: on_device.train_batches(32, torch.Generator().manual_seed(1)),
                           input_shape=data.input_shape, num_classes=data.num_classes)
        with exact_fp32():
            scores[device] = {n: s.cpu() for n, s in build_criterion(cfg.criterion).score(ctx).items()}
    for name, s in scores["cpu"].items():
        torch.testing.assert_close(scores["cuda"][name].to(s.dtype), s, rtol=1e-3, atol=1e-6 * float(s.abs().max()))


@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_device(first, then, monkeypatch, tmp_path):
    cfg = ["schedule=iterative", "schedule.rounds=2", "train.finetune_epochs=2", "sparsity=0.75"]
    with monkeypatch.context() as m:
        StopAfter(m, signal.SIGUSR1, "finetune", 2, 1)
        with pytest.raises(checkpoint.Interrupted):
            run(make_config(*cfg, f"device={first}"), tmp_path)
    assert checkpoint_of(tmp_path)["device"].startswith(first)
    resumed = run(make_config(*cfg, f"device={then}"), tmp_path)
    assert resumed["device"].startswith(then) and len(resumed["rounds"]) == 2
    reference = run(make_config(*cfg, f"device={then}"), tmp_path / "reference")
    # the same run to within the devices' arithmetic (not bit-identical)
    assert abs(resumed["final"]["test_acc"] - reference["final"]["test_acc"]) <= 0.1
    assert without_wall_clock(read_summary(tmp_path))["final"]["sparsity"] == reference["final"]["sparsity"]


def test_reinit_leaves_the_gpu_stream_alone(tmp_path):
    """fresh_model seeds its own draws; the run's CUDA generator goes on as if it had not."""
    torch.cuda.manual_seed_all(7)
    expected = torch.cuda.get_rng_state()
    from prunebench.core.device import seeded

    with seeded(123):
        torch.rand(3, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), expected)


def test_an_unstructured_run_times_sparse_kernels_on_the_gpu_with_tf32_on(tmp_path):
    """The defaults (tf32=true, latency.sparse=true): the sparse layers' check against the dense ones
    must not mistake TF32's rounding of the dense product for a wrong sparse kernel."""
    cfg = make_config("device=cuda", "dataset.num_train=512", "tf32=true", "latency.repeats=3",
                      "latency.batch_sizes=[1,128]")
    assert cfg.latency.sparse
    final = run(cfg, tmp_path)["final"]
    latency = final["sparse_latency"]
    assert set(latency) == {"batch_1", "batch_128"}
    for b in latency.values():
        assert b["dense_ms"] > 0 and b["sparse_ms"] > 0 and b["speedup"] > 0
        assert set(b["sparse_layers"]) <= {"fc1", "fc2", "fc3"}


def test_wanda_scores_of_float16_inputs_with_an_outlier_feature_on_the_gpu():
    """An outlier feature (RMS 200) over 128 x 2048 tokens: its norm passes float16's 65504, the
    scores must stay finite and equal the float64 ones (the authors compute them in float32)."""
    from prunebench.criteria.wanda import wanda_scores
    from prunebench.core.layerwise import SquaredNorms

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(128 * 2048, 64, device="cuda", generator=g).half()
    x[:, 0] *= 200
    w = torch.randn(32, 64, device="cuda", generator=g).half()
    norms = SquaredNorms()
    for part in x.split(2048):  # one calibration window at a time, as the block-by-block pass feeds them
        norms(part)
    scores = wanda_scores(w, norms.value)
    assert torch.isfinite(scores).all()
    expected = w.double().abs() * x.double().pow(2).sum(0).sqrt()
    torch.testing.assert_close(scores.double(), expected, rtol=2e-3, atol=0)
    assert float(x.double().pow(2).sum(0).sqrt()[0]) > torch.finfo(torch.float16).max
