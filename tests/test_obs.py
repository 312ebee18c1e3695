"""OBS against explicit matrices on a network small enough to form its Fisher."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunebench.criteria.obs import block_diagonal, inverse_fisher_blocks, joint_obs_update
from prunebench.config.options import OBSConfig


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


@pytest.mark.parametrize("alpha", [1e-4, 1e-6])
def test_woodbury_recursion_equals_the_explicit_inverse(alpha):
    model, (x, y) = tiny(), data()
    name = "0.weight"
    w = dict(model.named_parameters())[name]
    grads = torch.stack([torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), w)[0].reshape(-1)
                         for i in range(len(y))])
    explicit = torch.linalg.inv(alpha * torch.eye(12, dtype=torch.float64) + grads.T @ grads / len(y))
    cfg = OBSConfig(name="obs", alpha=alpha, block_size=12, chunk=3)  # one full block, 4 updates
    got = inverse_fisher_blocks(model, [name], [(x[:4], y[:4]), (x[4:], y[4:])], cfg)[name][0][0]
    torch.testing.assert_close(got, explicit, rtol=1e-7, atol=1e-7 * float(explicit.abs().max()))
    # smaller blocks are the diagonal blocks of the same matrix
    cfg4 = OBSConfig(name="obs", alpha=alpha, block_size=5, chunk=4)
    blocks = inverse_fisher_blocks(model, [name], [(x, y)], cfg4)[name]
    assert [tuple(b.shape) for b in blocks] == [(2, 5, 5), (1, 2, 2)]
    assert block_diagonal(blocks).shape == (12,)


def test_joint_obs_update_is_the_constrained_optimum():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    H = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    theta = torch.randn(6, generator=g, dtype=torch.float64)
    pruned = torch.tensor([True, False, True, False, False, True])
    delta, predicted = joint_obs_update(torch.linalg.inv(H)[None], theta[None], pruned[None])
    delta = delta[0]
    # the pruned weights become exactly zero
    assert torch.allclose((theta + delta)[pruned], torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # the predicted loss increase is the quadratic model's: ½ δᵀ H δ
    assert predicted == pytest.approx(float(0.5 * delta @ H @ delta), rel=1e-10)
    # and δ solves min ½ δᵀHδ s.t. δ_Q = −θ_Q (the KKT system, solved directly)
    E = torch.eye(6, dtype=torch.float64)[:, pruned]
    kkt = torch.cat([torch.cat([H, E], 1), torch.cat([E.T, torch.zeros(3, 3, dtype=torch.float64)], 1)])
    rhs = torch.cat([torch.zeros(6, dtype=torch.float64), -theta[pruned]])
    torch.testing.assert_close(delta, torch.linalg.solve(kkt, rhs)[:6])


def test_single_weight_saliency_is_theta_squared_over_twice_the_inverse_diagonal():
    from prunebench import Masks, ScoreContext, get_criterion

    model, (x, y) = tiny(), data()
    crit = get_criterion("obs", alpha=1e-4, block_size=12, samples=10)
    scores = crit.score(ScoreContext(model, Masks.ones(model), batches=lambda: iter([(x, y)])))
    h_inv = crit.h_inv["0.weight"][0][0]
    w = model[0].weight.detach().reshape(-1)
    torch.testing.assert_close(scores["0.weight"].reshape(-1), w ** 2 / (2 * h_inv.diagonal()))


def test_obs_round_records_predicted_and_measured_loss_increase(tmp_path):
    from conftest import make_config

    from prunebench.pipeline import run

    cfg = make_config("criterion=obs", "criterion.block_size=16", "criterion.samples=64", "dataset.num_train=128",
                      "dataset.num_test=64", "sparsity=0.5")
    final = run(cfg, tmp_path)["final"]
    assert final["obs_predicted_loss_increase"] >= 0
    assert isinstance(final["obs_measured_loss_increase"], float)
    assert abs(final["sparsity"] - 0.5) * 266_200 <= 1


def test_batched_block_updates_equal_one_solve_per_block():
    """Blocks losing different numbers of weights (none, some, all) solved in batches by count:
    the same change as one constrained solve per block."""
    g = torch.Generator().manual_seed(0)
    m, b = 40, 6
    a = torch.randn(m, b, b, generator=g, dtype=torch.float64)
    h_inv = a @ a.transpose(1, 2) + 0.1 * torch.eye(b, dtype=torch.float64)
    theta = torch.randn(m, b, generator=g, dtype=torch.float64)
    pruned = torch.rand(m, b, generator=g) < 0.5
    pruned[0], pruned[1] = False, True
    delta, predicted = joint_obs_update(h_inv, theta, pruned)
    expected, cost = torch.zeros_like(theta), 0.0
    for i in range(m):
        q = pruned[i].nonzero().squeeze(1)
        if q.numel():
            lam = torch.linalg.solve(h_inv[i][q][:, q], theta[i, q])
            expected[i] = -h_inv[i][:, q] @ lam
            cost += 0.5 * float(theta[i, q] @ lam)
    assert torch.allclose(delta, expected, rtol=1e-10, atol=1e-12) and abs(predicted - cost) < 1e-9 * abs(cost)
    assert torch.allclose((theta + delta)[pruned], torch.zeros(int(pruned.sum()), dtype=torch.float64), atol=1e-10)
