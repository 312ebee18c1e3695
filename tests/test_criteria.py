import pytest
import torch
from torch import nn

from prunebench import ConfigError, Masks, ScoreContext, get_criterion, select_by_rank, weight_stats
from prunebench.criteria.magnitude_std import MagnitudeStd
from prunebench.config.options import MagnitudeStdConfig


def model_with(weights):
    model = nn.Sequential(nn.Linear(weights.shape[1], weights.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weights)
    return model


def test_magnitude_std_prunes_below_quality_times_std():
    w = torch.tensor([[0.1, -0.2, 0.3, -0.4], [1.0, -2.0, 0.05, 3.0]])
    model = model_with(w)
    std = float(w.std())
    assert std == pytest.approx(1.4079, abs=1e-4)  # sample std of the layer's 8 weights, by hand
    crit = MagnitudeStd(MagnitudeStdConfig(name="magnitude_std", quality=0.25))
    ctx = ScoreContext(model, Masks.ones(model))
    masks = crit.select(crit.score(ctx), ctx, target=None)
    expected = (w.abs() >= 0.25 * std).float()
    assert torch.equal(masks["0.weight"], expected)
    # threshold 0.25 × 1.4079 = 0.352: -0.4, 1.0, -2.0 and 3.0 survive
    assert masks["0.weight"].tolist() == [[0, 0, 0, 1], [1, 1, 0, 1]]


def test_magnitude_std_threshold_ramps_over_rounds_and_uses_the_dense_std():
    w = torch.linspace(-1, 1, 101).reshape(1, 101)
    model = model_with(w)
    crit = MagnitudeStd(MagnitudeStdConfig(name="magnitude_std", quality=1.0))
    masks = Masks.ones(model)
    dense_std = float(w.std())
    for r in (1, 2):
        ctx = ScoreContext(model, masks, round=r, rounds=2)
        masks = crit.select(crit.score(ctx), ctx, target=None)
        masks.apply(model)
        kept = masks["0.weight"] == 1
        assert torch.equal(kept, w.abs() >= dense_std * r / 2)


def test_magnitude_std_per_layer_quality_and_unknown_layer():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    crit = MagnitudeStd(MagnitudeStdConfig(name="magnitude_std", quality=0.0, layer_quality={"1.weight": 1.0}))
    ctx = ScoreContext(model, Masks.ones(model))
    masks = crit.select(crit.score(ctx), ctx, target=None)
    assert bool(masks["0.weight"].all()) and not bool(masks["1.weight"].all())
    bad = MagnitudeStd(MagnitudeStdConfig(name="magnitude_std", layer_quality={"nope.weight": 1.0}))
    with pytest.raises(ConfigError, match="nope.weight"):
        bad.validate(model, ctx.masks)
    with pytest.raises(ConfigError, match="scope must be layer"):
        MagnitudeStdConfig(name="magnitude_std", scope="global")


def test_magnitude_increase_is_abs_theta_minus_abs_theta0():
    w0 = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    w = torch.tensor([[2.0, -0.5, -0.5, 0.1]])
    model = model_with(w)
    scores = get_criterion("magnitude_increase").score(
        ScoreContext(model, Masks.ones(model), init_state={"0.weight": w0}))
    assert torch.allclose(scores["0.weight"], torch.tensor([[1.0, -0.5, 0.0, 0.1]]))


def test_random_scores_follow_the_generator():
    model = nn.Sequential(nn.Linear(5, 5))
    masks = Masks.ones(model)
    crit = get_criterion("random")
    a = crit.score(ScoreContext(model, masks, generator=torch.Generator().manual_seed(3)))
    b = crit.score(ScoreContext(model, masks, generator=torch.Generator().manual_seed(3)))
    c = crit.score(ScoreContext(model, masks, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(a["0.weight"], b["0.weight"]) and not torch.equal(a["0.weight"], c["0.weight"])


def test_python_api_on_any_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.bn(self.conv(x)).mean((2, 3)))

    net = Net()
    conv_w, head_w = net.conv.weight.detach().clone(), net.head.weight.detach().clone()
    masks = Masks.ones(net)
    scores = get_criterion("magnitude").score(ScoreContext(net, masks))
    masks = select_by_rank(scores, masks, target=0.75)
    masks.apply(net)
    stats = weight_stats(net, masks.names())
    assert stats.prunable_total == 8 * 3 * 9 + 4 * 8
    assert abs(stats.sparsity - 0.75) <= 1 / stats.prunable_total
    # the kept weights are the largest in magnitude, across both layers
    kept = torch.cat([net.conv.weight.flatten(), net.head.weight.flatten()]).abs()
    original = torch.cat([w.flatten() for w in (conv_w, head_w)]).abs()
    threshold = torch.sort(original).values[round(0.75 * original.numel()) - 1]
    assert torch.equal(kept > 0, original > threshold)


def test_what_a_criterion_needs_is_declared_by_the_criterion_itself():
    """No name list elsewhere: the criterion's class says it needs a trained network; its options
    class says it can prune a language model (read by the config checks before torch loads)."""
    from prunebench.config.options import language_model_criteria
    from prunebench.criteria import CRITERIA

    assert [n for n in CRITERIA if CRITERIA[n].needs_trained] == [
        "eigendamage", "kron_obd", "kron_obs", "magnitude_increase", "magnitude_std", "sparsegpt"]
    assert language_model_criteria() == ["angular", "block_influence", "flap", "frequency", "magnitude", "random",
                                         "reap", "ria", "sparsegpt", "taylor", "wanda"]
    from prunebench.config.options import structure_criteria

    assert structure_criteria("width") == ["flap", "magnitude", "random", "taylor", "wanda"]
    assert structure_criteria("depth") == ["angular", "block_influence"]
    assert structure_criteria("experts") == ["frequency", "random", "reap"]
