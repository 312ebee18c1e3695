"""K-FAC / KFC factors against patches and per-example gradients built by hand, one example at a time."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunebench.core.curvature import kfac_factors, per_example_gradients

LAYERS = ["0", "2", "4"]  # conv (bias), conv (no bias), linear (bias)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, bias=False),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double()


def data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 7, 7, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def batches(x, y):
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def conv_patches(conv, x):
    """Rows ā_t of one example's input (C, H, W), by explicit loops; checked against the conv itself."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    c, h, w = x.shape
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            patch = torch.zeros(c, kh, kw, dtype=x.dtype)
            for ki in range(kh):
                for kj in range(kw):
                    r, s = i * sh - ph + ki * dh, j * sw - pw + kj * dw
                    if 0 <= r < h and 0 <= s < w:
                        patch[:, ki, kj] = x[:, r, s]
            rows.append(patch.reshape(-1))
    rows = torch.stack(rows)  # T, C*kh*kw in weight.reshape order
    out = rows @ conv.weight.detach().reshape(conv.out_channels, -1).T
    if conv.bias is not None:
        out = out + conv.bias.detach()
    torch.testing.assert_close(out.T.reshape(-1, oh, ow), conv(x.unsqueeze(0)).detach()[0], rtol=1e-12, atol=1e-12)
    return rows


def brute_force(model, x, y):
    """A, S of every layer, one example at a time, from explicit patches and that example's own loss."""
    conv1, conv2, lin = model[0], model[2], model[4]
    A = {n: 0 for n in LAYERS}
    S = {n: 0 for n in LAYERS}
    for xi, yi in zip(x, y):
        s1 = conv1(xi.unsqueeze(0))
        h1 = F.relu(s1)
        s2 = conv2(h1)
        h2 = s2.flatten(1)
        s3 = lin(h2)
        g1, g2, g3 = torch.autograd.grad(F.cross_entropy(s3, yi.unsqueeze(0)), [s1, s2, s3])
        layer_inputs = {"0": conv_patches(conv1, xi), "2": conv_patches(conv2, h1[0].detach()), "4": h2.detach()}
        layer_grads = {"0": g1[0].reshape(3, -1).T, "2": g2[0].reshape(4, -1).T, "4": g3}  # T, d_out
        for n, module in zip(LAYERS, [conv1, conv2, lin]):
            a, g = layer_inputs[n], layer_grads[n]
            if module.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            T = a.shape[0]
            A[n] = A[n] + sum(torch.outer(a[t], a[t]) for t in range(T)) / T
            S[n] = S[n] + sum(torch.outer(g[t], g[t]) for t in range(T))
    return {n: (A[n] / len(x), S[n] / len(x)) for n in LAYERS}


def assert_factors(got, expected, examples):
    for n in LAYERS:
        assert got[n].examples == examples
        assert got[n].A.dtype == got[n].S.dtype == torch.float64
        torch.testing.assert_close(got[n].A, expected[n][0], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got[n].S, expected[n][1], rtol=1e-10, atol=1e-14)


def test_empirical_factors_match_brute_force():
    model, (x, y) = net(), data()
    model.train()
    got = kfac_factors(model, LAYERS, batches(x, y), fisher="empirical")
    assert model.training
    assert [got[n].has_bias for n in LAYERS] == [True, False, True]
    assert [tuple(got[n].A.shape) for n in LAYERS] == [(19, 19), (12, 12), (37, 37)]
    assert [tuple(got[n].S.shape) for n in LAYERS] == [(3, 3), (4, 4), (5, 5)]
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert_factors(got, brute_force(model, x, y), 6)


def test_max_examples_truncates_the_last_batch():
    model, (x, y) = net(), data()
    got = kfac_factors(model, LAYERS, batches(x, y), fisher="empirical", max_examples=5)
    assert_factors(got, brute_force(model, x[:5], y[:5]), 5)


def test_true_fisher_samples_labels_from_the_softmax_reproducibly():
    model, (x, y) = net(), data()
    first = kfac_factors(model, LAYERS, batches(x, y), generator=torch.Generator().manual_seed(3))
    again = kfac_factors(model, LAYERS, batches(x, y), generator=torch.Generator().manual_seed(3))
    for n in LAYERS:
        assert torch.equal(first[n].A, again[n].A) and torch.equal(first[n].S, again[n].S)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sampled = torch.cat([torch.multinomial(F.softmax(model(xb), dim=1), 1, generator=gen).squeeze(1)
                             for xb, _ in batches(x, y)])
    assert not torch.equal(sampled, y)  # otherwise this test could not tell the two apart
    assert_factors(first, brute_force(model, x, sampled), 6)


def test_kronecker_product_is_the_exact_single_example_fisher_of_a_linear_layer():
    model, (x, y) = net(), data()
    grads = per_example_gradients(model, ["4.weight", "4.bias"], x, y)
    for n in range(len(x)):
        f = kfac_factors(model, ["4"], [(x[n:n + 1], y[n:n + 1])], fisher="empirical")["4"]
        grad_w = torch.cat([grads["4.weight"][n], grads["4.bias"][n].unsqueeze(1)], dim=1)  # d_out, d_in
        col, row = grad_w.T.reshape(-1), grad_w.reshape(-1)  # column-stacking vec, PyTorch's flatten
        torch.testing.assert_close(torch.kron(f.A, f.S), torch.outer(col, col), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(torch.kron(f.S, f.A), torch.outer(row, row), rtol=1e-10, atol=1e-14)


def test_bad_layers_and_options_raise_and_hooks_are_removed():
    model, (x, y) = net(), data()
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(5))
    with pytest.raises(ValueError, match="'0'.*grouped"):
        kfac_factors(grouped, ["0"], batches(x, y))
    with pytest.raises(ValueError, match="'1'.*ReLU"):
        kfac_factors(model, ["1"], batches(x, y))
    reflect = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="'0'.*reflect"):
        kfac_factors(reflect, ["0"], batches(x, y))
    with pytest.raises(ValueError, match="fisher"):
        kfac_factors(model, LAYERS, batches(x, y), fisher="generalized")
    model.train()
    with pytest.raises(RuntimeError):  # fails inside the forward, after the hooks are in place
        kfac_factors(model, LAYERS, [(x[:, :1], y)])
    assert model.training
    kfac_factors(model, LAYERS, batches(x, y), fisher="empirical")
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
