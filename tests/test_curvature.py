"""Curvature diagonals against explicit matrices on networks small enough to form them."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from prunebench import Masks, ScoreContext, get_criterion
from prunebench.core.curvature import fisher_diagonal, ggn_diagonal, hutchinson_diagonal


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3, bias=False)).double()


def explicit_hessian_diag(model, name, x, y):
    w0 = dict(model.named_parameters())[name].detach()

    def loss(flat):
        out = functional_call(model, {name: flat.reshape(w0.shape)}, (x,))
        return F.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss, w0.reshape(-1)).diagonal().reshape(w0.shape)


def test_empirical_fisher_is_the_mean_squared_per_example_gradient():
    model, (x, y) = mlp(), data()
    names = ["0.weight", "2.weight"]
    got = fisher_diagonal(model, names, [(x[:5], y[:5]), (x[5:], y[5:])])
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(y)):  # the slow obvious way
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [params[n] for n in names])
        for n, g in zip(names, grads):
            expected[n] += g.pow(2) / len(y)
    for n in names:
        torch.testing.assert_close(got[n], expected[n])


def test_ggn_diagonal_equals_the_explicit_jacobian_product():
    model, (x, _) = mlp(), data()
    name = "0.weight"
    w0 = dict(model.named_parameters())[name].detach()
    expected = torch.zeros(w0.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(
            lambda flat: functional_call(model, {name: flat.reshape(w0.shape)}, (x[i:i + 1],)).squeeze(0),
            w0.reshape(-1))  # 3 x 20
        p = F.softmax(model(x[i:i + 1]).squeeze(0), 0).detach()
        H = torch.diag(p) - torch.outer(p, p)
        expected += (J.T @ H @ J).diagonal() / x.shape[0]
    got = ggn_diagonal(model, [name], [(x, None)])
    torch.testing.assert_close(got[name].reshape(-1), expected)


def test_for_a_linear_model_ggn_is_the_hessian():
    model, (x, y) = linear(), data()
    torch.testing.assert_close(ggn_diagonal(model, ["0.weight"], [(x, y)])["0.weight"],
                               explicit_hessian_diag(model, "0.weight", x, y))


def test_hutchinson_agrees_with_the_hessian_diagonal_within_sampling_error():
    model, (x, y) = mlp(), data()
    exact = explicit_hessian_diag(model, "2.weight", x, y)
    est = hutchinson_diagonal(model, ["2.weight"], [(x, y)], probes=4000,
                              generator=torch.Generator().manual_seed(0))["2.weight"]
    assert (est - exact).abs().max() < 0.05 * exact.abs().max()


def test_sampled_label_fisher_agrees_with_ggn_in_expectation():
    model, (x, y) = mlp(), data(6)
    reps = 800  # many label draws per example
    batches = [(x, y)] * reps
    fisher = fisher_diagonal(model, ["0.weight"], batches, sample_labels=True,
                             generator=torch.Generator().manual_seed(0))["0.weight"]
    ggn = ggn_diagonal(model, ["0.weight"], [(x, y)])["0.weight"]
    assert (fisher - ggn).abs().max() < 0.1 * ggn.abs().max()


def test_obd_saliency_is_half_h_theta_squared():
    model, (x, y) = linear(), data()
    masks = Masks.ones(model)
    ctx = ScoreContext(model, masks, batches=lambda: iter([(x, y)]))
    scores = get_criterion("obd", estimator="ggn", samples=len(y)).score(ctx)
    h = explicit_hessian_diag(model, "0.weight", x, y)
    torch.testing.assert_close(scores["0.weight"], 0.5 * h * model[0].weight.detach() ** 2)


def test_a_small_memory_budget_chunks_the_fisher_and_the_ggn_without_changing_them():
    """Budgets that force chunks of 2 examples, then of 1 class of one example."""
    model, (x, y) = mlp(), data()
    names = ["0.weight", "2.weight"]
    size = sum(dict(model.named_parameters())[n].numel() * 8 for n in names)
    full = fisher_diagonal(model, names, [(x, y)])
    chunked = fisher_diagonal(model, names, [(x, y)], memory=2 * 2 * size)
    ggn = ggn_diagonal(model, names, [(x, y)])
    ggn_by_examples = ggn_diagonal(model, names, [(x, y)], memory=2 * 7 * size)
    ggn_by_classes = ggn_diagonal(model, names, [(x, y)], memory=3 * size)
    for n in names:
        torch.testing.assert_close(chunked[n], full[n])
        torch.testing.assert_close(ggn_by_examples[n], ggn[n])
        torch.testing.assert_close(ggn_by_classes[n], ggn[n])


def test_a_budget_below_one_class_column_is_refused():
    model, (x, y) = mlp(), data()
    import pytest

    from prunebench.core.curvature import OutOfMemoryBudget

    with pytest.raises(OutOfMemoryBudget):
        ggn_diagonal(model, ["0.weight"], [(x, y)], memory=10)
    with pytest.raises(OutOfMemoryBudget):
        fisher_diagonal(model, ["0.weight"], [(x, y)], memory=10)


def test_hutchinson_over_batches_equals_one_batch_with_the_same_probes():
    """One graph per batch, the same probes replayed in each: the estimate over the whole set."""
    model, (x, y) = mlp(), data()
    whole = hutchinson_diagonal(model, ["0.weight"], [(x, y)], probes=5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    split = hutchinson_diagonal(model, ["0.weight"], [(x[:7], y[:7]), (x[7:], y[7:])], probes=5, generator=g)
    torch.testing.assert_close(split["0.weight"], whole["0.weight"])
    after = torch.Generator().manual_seed(3)
    for _ in range(5):
        torch.randint(0, 2, (5, 4), generator=after)
    assert torch.equal(g.get_state(), after.get_state())  # the stream moved on by one set of probes
