import pytest
import torch
from torch import nn

from prunebench.config import TrainConfig
from prunebench.data import TensorData
from prunebench.core.masks import Masks, prunable_weights
from prunebench.training.loop import fit


def tiny_data(n=256, d=20, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1))
    return TensorData("tiny", x, y, x[:64], y[:64], classes)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


def random_masks(model, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Masks({n: (torch.rand(w.shape, generator=g) < density).float()
                  for n, w in prunable_weights(model).items()})


@pytest.mark.parametrize("optimizer,extra", [
    ("sgd", dict(momentum=0.9, weight_decay=5e-4)),
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("adam", dict(weight_decay=1e-3)),
])
def test_pruned_weights_stay_exactly_zero_through_training(optimizer, extra):
    model, data = tiny_model(), tiny_data()
    # pretrain densely first, so the optimizer would have momentum for every weight if reused
    masks = random_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01, batch_size=16, **extra)
    fit(model, data, cfg, epochs=3, lr=cfg.lr, generator=torch.Generator().manual_seed(0), masks=masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        w = params[name]
        assert torch.all(w[mask == 0] == 0), f"{name}: a pruned weight was revived"
        # and the surviving weights did train
        assert not torch.equal(w[mask == 1], before[name][mask == 1])


def test_masks_are_applied_before_the_first_step():
    model, data = tiny_model(), tiny_data()
    masks = random_masks(model, 0.3)
    cfg = TrainConfig(optimizer="adam", lr=1e-3, batch_size=32)
    fit(model, data, cfg, epochs=0, lr=1e-3, generator=torch.Generator(), masks=masks)
    assert Masks.from_model(model).sparsity() == pytest.approx(masks.sparsity())


def test_masks_save_load_roundtrip(tmp_path):
    model = tiny_model()
    masks = random_masks(model)
    masks.save(tmp_path / "m.pt")
    loaded = Masks.load(tmp_path / "m.pt", model)
    assert loaded.names() == masks.names()
    for n in masks:
        assert torch.equal(loaded[n], masks[n])


def test_export_to_torch_prune_gives_the_same_function():
    model = tiny_model()
    masks = random_masks(model)
    x = torch.randn(8, 20)
    masked = tiny_model()
    masks.apply(masked)
    masks.to_torch_prune(model)
    assert hasattr(model[0], "weight_mask")
    torch.testing.assert_close(model(x), masked(x))


def test_prunable_weights_are_conv_and_linear_weights_only():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert list(prunable_weights(model)) == ["0.weight", "3.weight"]


def test_an_optimizer_that_moves_pruned_weights_is_caught(monkeypatch):
    class Jitter(torch.optim.Optimizer):
        """Moves every weight, whatever its gradient (as a noisy optimizer would)."""

        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)

    import prunebench.training.loop as train

    monkeypatch.setattr(train, "make_optimizer", lambda model, cfg, lr: Jitter(model.parameters()))
    model, data = tiny_model(), tiny_data()
    with pytest.raises(RuntimeError, match="pruned weights of .* are nonzero"):
        fit(model, data, TrainConfig(batch_size=32), epochs=1, lr=0.1,
            generator=torch.Generator(), masks=random_masks(model))


def test_prunable_set_can_include_biases_and_norm_layers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert list(prunable_weights(model, biases=True)) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert list(prunable_weights(model, norm=True)) == ["0.weight", "1.weight", "1.bias", "3.weight"]
    assert Masks.ones(model, biases=True, norm=True).numel() == 36 + 4 + 8 + 288 + 2
