"""Pruning-at-initialisation criteria, each against an independent computation on a tiny net."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from prunebench import Masks, ScoreContext, get_criterion
from prunebench.criteria.grasp import hessian_gradient_product
from prunebench.criteria.synflow import synaptic_flow


def tiny_net(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3, bias=bias), nn.Tanh(), nn.Linear(3, 2, bias=bias)).double()


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def test_snip_equals_the_finite_difference_loss_change_of_a_gate():
    net, (x, y) = tiny_net(), batch()
    masks = Masks.ones(net)
    scores = get_criterion("snip").score(ScoreContext(net, masks, batches=lambda: iter([(x, y)])))
    eps = 1e-6
    for name, w in ((n, p) for n, p in net.named_parameters() if n in masks):
        for idx in [(0, 0), (1, 2), (w.shape[0] - 1, w.shape[1] - 1)]:
            def loss_with_gate(c):
                gated = w.detach().clone()
                gated[idx] *= c
                return F.cross_entropy(functional_call(net, {name: gated}, (x,)), y).item()

            dl_dc = (loss_with_gate(1 + eps) - loss_with_gate(1 - eps)) / (2 * eps)
            assert scores[name][idx].item() == pytest.approx(abs(dl_dc), rel=1e-5, abs=1e-10)


def test_grasp_hg_equals_the_explicit_hessian_times_gradient():
    net = tiny_net()
    halves = [batch(4, 1), batch(4, 2)]
    names = ["0.weight", "2.weight"]
    params = dict(net.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    T = 200.0

    def loss(flat):
        chunks = torch.split(flat, [s.numel() for s in shapes])
        new = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return sum(F.cross_entropy(functional_call(net, new, (x,)) / T, y) for x, y in halves)

    H = torch.autograd.functional.hessian(loss, flat0)
    g = torch.autograd.functional.jacobian(loss, flat0)
    expected = H @ g
    got = hessian_gradient_product(net, [params[n] for n in names], halves, T)
    torch.testing.assert_close(torch.cat([h.reshape(-1) for h in got]), expected, rtol=1e-6, atol=1e-14)


def test_grasp_score_keeps_the_largest_theta_times_hg():
    net = tiny_net()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.arange(40) % 2
    ctx = ScoreContext(net, Masks.ones(net), batches=lambda: iter([(x, y)]), num_classes=2)
    scores = get_criterion("grasp", samples_per_class=10, temperature=1.0).score(ctx)
    xb = torch.cat([x[y == 0][:10], x[y == 1][:10]])
    yb = torch.cat([torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    params = dict(net.named_parameters())
    weights = [params["0.weight"], params["2.weight"]]
    hg = hessian_gradient_product(net, weights, [(xb[:10], yb[:10]), (xb[10:], yb[10:])], 1.0)
    torch.testing.assert_close(scores["0.weight"], weights[0].detach() * hg[0])
    # the paper's S(-θ) = -θ ⊙ Hg: the weights it removes first are the ones ranked lowest here
    assert torch.equal(torch.argsort(scores["2.weight"].flatten()),
                       torch.argsort(-(-weights[1].detach() * hg[1]).flatten()))


def test_synflow_conserves_the_flow_through_every_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False), nn.ReLU(),
                        nn.Linear(3, 2, bias=False))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    scores = synaptic_flow(net, Masks.ones(net), (5,))
    sums = torch.stack([s.sum() for s in scores.values()]).double()
    # every layer's total score equals R = 1ᵀ|W3||W2||W1|1
    R = (net[4].weight.abs() @ net[2].weight.abs() @ net[0].weight.abs()).sum().double()
    torch.testing.assert_close(sums, R.expand(3), rtol=1e-5, atol=0)
    for n, p in net.named_parameters():  # the model itself is untouched (signs included)
        assert torch.equal(p, before[n])


def test_synflow_prunes_iteratively_to_the_exact_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    masks = get_criterion("synflow", iterations=10).prune(
        ScoreContext(net, Masks.ones(net), input_shape=(20,)), 0.9)
    assert round(0.9 * masks.numel()) == masks.numel() - sum(int(m.sum()) for _, m in masks.items())


def test_invert_keeps_the_lowest_scores_and_shuffle_keeps_layer_counts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    ctx = ScoreContext(net, Masks.ones(net), generator=torch.Generator().manual_seed(0))
    plain = get_criterion("magnitude").prune(ctx, 0.7)
    inverted = get_criterion("magnitude", sanity="invert").prune(ctx, 0.7)
    w = net[0].weight.detach().abs()
    assert w[inverted["0.weight"] == 1].max() <= w[inverted["0.weight"] == 0].min()
    shuffled = get_criterion("magnitude", sanity="shuffle").prune(ctx, 0.7)
    for n in plain:
        assert int(shuffled[n].sum()) == int(plain[n].sum())
        assert not torch.equal(shuffled[n], plain[n])
    # in a later round, shuffling only moves survivors among weights still alive
    later = ScoreContext(net, plain, generator=torch.Generator().manual_seed(1))
    again = get_criterion("magnitude", sanity="shuffle").prune(later, 0.9)
    for n in plain:
        assert torch.all(again[n][plain[n] == 0] == 0)


def test_isometry_lowers_the_gap_on_surviving_weights_only():
    from prunebench.config.options import IsometryConfig
    from prunebench.retrain import apply_policy
    from prunebench.retrain.isometry import gram_gap, layer_matrix

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))
    masks = get_criterion("random").prune(
        ScoreContext(net, Masks.ones(net), generator=torch.Generator().manual_seed(0)), 0.5)
    masks.apply(net)
    before = {n: gram_gap(layer_matrix(p.detach())) for n, p in net.named_parameters() if n in masks}
    report = apply_policy(IsometryConfig(name="isometry", steps=300, lr=0.01), net, masks,
                          init_state={}, rewind_state={}, fresh_model=None)
    for n, p in net.named_parameters():
        if n in masks:
            assert torch.all(p[masks[n] == 0] == 0)
            after = gram_gap(layer_matrix(p.detach()))
            assert after < 0.5 * before[n]
            assert report[n]["gap_after"] == pytest.approx(float(after), rel=1e-5)
            # singular values move towards 1
            sv = report[n]["singular_values_after"]
            assert abs(sv["mean"] - 1) < abs(report[n]["singular_values_before"]["mean"] - 1)


def test_delta_orthogonal_init_is_an_orthogonal_centre_tap():
    from prunebench.models import delta_orthogonal_

    w = torch.empty(8, 16, 3, 3)
    delta_orthogonal_(w)
    centre = w[:, :, 1, 1]
    torch.testing.assert_close(centre @ centre.T, torch.eye(8), atol=1e-5, rtol=0)
    w[:, :, 1, 1] = 0
    assert torch.count_nonzero(w) == 0
