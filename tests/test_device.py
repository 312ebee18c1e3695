"""Device discipline without a GPU: the data path and a training step with tensors that claim to
be on a CUDA device (FakeTensorMode propagates devices without running kernels), so that a tensor
left on the CPU shows up on a CPU-only machine."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from prunebench.data import Augment, TensorData
from prunebench.models import build_model
from prunebench.train import to_layout
from conftest import make_config

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
