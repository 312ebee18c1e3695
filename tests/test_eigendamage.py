"""EigenDamage: the eigenbasis rewrite keeps the network's function; direction scores are
½ W′² λ_S λ_A summed over rows/columns; removing directions shrinks the network physically."""

import copy
import math

import torch
from conftest import make_config
from torch import nn

from prunebench.criteria import ScoreContext, build_criterion
from prunebench.criteria.eigendamage import Eigenbasis, bottleneck_params, eigenbasis_layer
from prunebench.core.curvature import kfac_factors
from prunebench.core.granularity import build_granularity
from prunebench.core.masks import Masks
from prunebench.schedules.steps import with_coupled


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
            for _ in range(2)]


def context(model):
    cfg = make_config("criterion=eigendamage", "granularity=filter", "criterion.samples=32")
    crit = build_criterion(cfg.criterion)
    masks = Masks.ones(model)
    ctx = ScoreContext(model, masks, batches=batches, generator=torch.Generator().manual_seed(2),
                       input_shape=(2, 8, 8), num_classes=3)
    return cfg, crit, ctx


def test_eigenbasis_rewrite_keeps_the_function():
    model = tiny_net()
    model[1].running_mean.uniform_(-1, 1)
    model.eval()
    factors = kfac_factors(model, ["0", "3", "6", "8"], batches(), fisher="empirical")
    new = copy.deepcopy(model)
    for name, f in factors.items():
        new[int(name)] = eigenbasis_layer(model[int(name)], f)[0]
    x = torch.randn(7, 2, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(new(x), model(x), rtol=1e-10, atol=1e-10)
    # the conv's in_basis has one output channel per direction of its patch space (2·3·3)
    assert new[0].in_basis.weight.shape == (18, 2, 3, 3) and new[0].core.weight.shape[:2] == (4, 18)


def test_direction_scores_are_half_core_squared_times_eigenvalues():
    model = tiny_net().eval()
    _, crit, ctx = context(model)
    new = crit.reparameterize(ctx, 0.9)
    assert isinstance(new[6], Eigenbasis) and isinstance(new[8], nn.Linear)  # the classifier stays
    scores = crit.score(ctx)
    # by hand for the Linear "6": factors of the original layer, eigendecomposed
    f = kfac_factors(model, ["6"], batches(), fisher="true", generator=torch.Generator().manual_seed(2),
                     max_examples=32)["6"]
    lam_a = torch.linalg.eigvalsh(f.A[:-1, :-1]).clamp(min=0)
    lam_s = torch.linalg.eigvalsh(f.S).clamp(min=0)
    core = new[6].core.weight.detach()
    damage = 0.5 * core ** 2 * lam_s[:, None] * lam_a[None, :]
    torch.testing.assert_close(scores["6.in_basis.weight"], damage.sum(0))
    torch.testing.assert_close(scores["6.core.weight"], damage.sum(1))


def test_a_layer_is_rewritten_only_when_its_bottleneck_is_smaller():
    model = tiny_net().eval()
    _, crit, ctx = context(model)
    assert not any(isinstance(m, Eigenbasis) for m in crit.reparameterize(ctx, 0.0).modules())
    new = crit.reparameterize(ctx, 0.9)
    assert any(isinstance(m, Eigenbasis) for m in new.modules())
    everything = torch.cat([s for s in crit.score(ctx).values()])
    for i in (0, 3, 6):
        layer = model[i]
        if isinstance(new[i], Eigenbasis):
            kept = [max(int((crit.score(ctx)[f"{i}.{part}.weight"] >= crit.threshold).sum()), 1)
                    for part in ("in_basis", "core")]
            assert bottleneck_params(layer, *kept) <= sum(p.numel() for p in layer.parameters())
        else:
            assert new[i] is not layer and type(new[i]) is type(layer)
    assert everything.numel() > 0


def test_removing_directions_shrinks_the_network_to_the_same_function():
    model = tiny_net().eval()
    cfg, crit, ctx = context(model)
    new = crit.reparameterize(ctx, 0.9)
    gran = build_granularity(cfg.granularity)
    gran.bind(new, (2, 8, 8))
    ctx.model, ctx.masks = new, Masks.ones(new)
    scores = crit.score(ctx)
    assert scores
    masks = crit.prune(ctx, 0.9, gran)
    for w, s in scores.items():  # above the threshold, or the 5% (1 at least) each side keeps
        kept = gran.structure.alive(w, masks[w])
        assert int(kept.sum()) == max(int((s >= crit.threshold).sum()), max(1, math.ceil(0.05 * s.numel())))
    with_coupled(masks, gran, new).apply(new)
    small = gran.structure.compact(new, masks, (2, 8, 8))
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    new.eval()
    torch.testing.assert_close(small(x), new(x), rtol=1e-9, atol=1e-9)
    assert small[8].weight.shape == (3, 6)
