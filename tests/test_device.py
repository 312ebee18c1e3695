"""Device discipline without a GPU: the data path and a training step with tensors that claim to
be on a CUDA device (FakeTensorMode propagates devices without running kernels), so that a tensor
left on the CPU shows up on a CPU-only machine."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config
from torch._subclasses.fake_tensor import FakeTensorMode

from prunebench.data import Augment, TensorData
from prunebench.models import build_model
from prunebench.core.device import to_layout

CUDA = torch.device("cuda", 0)


def cifar_like(n_train=10, n_test=4, pixel_zero=True):
    g = torch.Generator().manual_seed(0)
    return TensorData("cifar-like", torch.randn(n_train, 3, 16, 16, generator=g), torch.randint(0, 3, (n_train,)),
                      torch.randn(n_test, 3, 16, 16, generator=g), torch.randint(0, 3, (n_test,)), 3,
                      x_val=torch.randn(2, 3, 16, 16, generator=g), y_val=torch.randint(0, 3, (2,)),
                      pixel_zero=torch.tensor([-1.9, -2.0, -1.7]) if pixel_zero else None,
                      augment=Augment(padding=2, flip=True))


def tensors_of(data: TensorData):
    return {k: v for k, v in vars(data).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("pixel_zero", [True, False])
def test_augmented_data_path_stays_on_the_device(pixel_zero):
    with FakeTensorMode(allow_non_fake_inputs=True):
        data = cifar_like(pixel_zero=pixel_zero).to("cuda")
        assert {k: t.device for k, t in tensors_of(data).items()} == {k: CUDA for k in tensors_of(data)}
        for x, y in data.train_batches(4, torch.Generator().manual_seed(1)):
            assert (x.device, y.device) == (CUDA, CUDA)
        for split in ("test", "val"):
            for x, y in data.eval_batches(split, 3):
                assert (x.device, y.device) == (CUDA, CUDA)


def test_a_training_forward_pass_stays_on_the_device():
    """Augmented batch → ResNet (batch norm in training mode) → loss, all on the device. (The
    autograd engine and the fused optimizers need a real device: the GPU check runs those.)"""
    cfg = make_config("model=resnet20")
    model = build_model(cfg.model, (3, 16, 16), 3)  # real CPU parameters, moved under the fake mode
    with FakeTensorMode(allow_non_fake_inputs=True):
        data = cifar_like().to("cuda")
        model = model.to("cuda").train()
        x, y = next(iter(data.train_batches(4, torch.Generator().manual_seed(1))))
        loss = F.cross_entropy(model(to_layout(x, True)), y)
        assert loss.device == CUDA
        assert {b.device for b in model.buffers()} == {CUDA}


def test_augment_draws_are_those_of_the_cpu_generator():
    """The packed draws are the same numbers, in the same order, as three separate CPU draws."""
    g = torch.Generator().manual_seed(5)
    dy, dx, flip = Augment(padding=3).draws(7, g, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(dy, torch.randint(0, 7, (7,), generator=g))
    assert torch.equal(dx, torch.randint(0, 7, (7,), generator=g))
    assert torch.equal(flip.bool(), torch.rand(7, generator=g) < 0.5)


# ------------------------------------------------------------------ device settings, streams, memory
def test_backend_switches_are_set_both_ways():
    from prunebench.core.device import configure_backends, exact_fp32

    try:
        configure_backends(deterministic=True, tf32=False)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        configure_backends(deterministic=False, tf32=True)  # a later run in the same process
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with exact_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        configure_backends(deterministic=False, tf32=True)
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default, for the other tests


def test_seeded_draws_leave_every_global_stream_as_it_was(monkeypatch):
    """The CPU stream is restored, and the fork covers every visible GPU (torch.manual_seed
    reseeds them all), here with a stand-in for two GPUs."""
    import contextlib

    from prunebench.core import device

    forked = []
    real_fork = torch.random.fork_rng

    @contextlib.contextmanager
    def recording_fork(devices):
        forked.append(list(devices))
        with real_fork(devices=[]):
            yield

    monkeypatch.setattr(torch.random, "fork_rng", recording_fork)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    with device.seeded(5):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before) and forked == [[0, 1]]
    torch.manual_seed(5)
    assert torch.equal(inside, torch.rand(3))


def test_cuda_asked_for_without_a_gpu_is_a_config_error(monkeypatch):
    from prunebench.config import ConfigError
    from prunebench.core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("device, job, expected", [("auto", 5, 1), ("cuda", 2, 2), ("cuda:3", 5, None),
                                                   ("cpu", 5, None)])
def test_parallel_local_jobs_spread_over_the_gpus(monkeypatch, device, job, expected):
    from omegaconf import OmegaConf

    from prunebench import cli
    from prunebench.runs import record

    chosen = []
    hydra_cfg = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.x", "n_jobs": 2},
                                  "job": {"num": job}})
    monkeypatch.setattr(cli.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(record, "LIVE_PROGRESS", True)
    threads = torch.get_num_threads()
    try:
        cli.share_machine_with_parallel_jobs(device)
    finally:
        torch.set_num_threads(threads)
    assert chosen == ([] if expected is None else [expected])


def test_rng_state_holds_no_gpu_stream_for_a_cpu_run():
    from prunebench.runs.checkpoint import rng_state, set_rng_state

    g = torch.Generator().manual_seed(3)
    state = rng_state({"g": g}, torch.device("cpu"))
    assert state["cuda"] is None
    torch.rand(2, generator=g)
    set_rng_state(state, {"g": g}, torch.device("cpu"))
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("criterion, options, what", [
    ("obs", [], "inverse Fisher"),
    ("obd", ["criterion.estimator=ggn"], "Gauss-Newton"),
    ("kron_obd", ["granularity=filter"], "K-FAC"),
])
def test_a_criterion_that_cannot_fit_the_memory_budget_is_refused_before_training(criterion, options, what):
    from prunebench.config import ConfigError
    from prunebench.pipeline import build

    cfg = make_config(f"criterion={criterion}", *options, "curvature.memory_gb=0.000001")
    with pytest.raises(ConfigError, match=f"needs about .* GiB at once for .*{what}.*curvature.memory_gb=1e-06"):
        build(cfg)
    build(make_config(f"criterion={criterion}", *options, "curvature.memory_gb=8"))  # fits
