"""Sparse execution and export: the same function as the dense network, and a smaller file."""

import io

import pytest
import torch
from torch import nn

from prunebench.core.csr import SparseConv2d, SparseLinear, sparse_state_dict, sparsify


def pruned(layer, sparsity=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.mul_((torch.rand(layer.weight.shape, generator=g) >= sparsity).float())
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_computes_the_dense_layer(bias):
    layer = pruned(nn.Linear(30, 7, bias=bias))
    x = torch.randn(4, 5, 30)  # any leading dimensions
    assert torch.allclose(SparseLinear(layer)(x), layer(x), atol=1e-6)


@pytest.mark.parametrize("options", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2, bias=False),
                                     dict(padding="same"), dict(stride=(1, 2), padding=(0, 1))])
def test_sparse_conv_computes_the_dense_layer(options):
    layer = pruned(nn.Conv2d(3, 5, 3, **options))
    x = torch.randn(2, 3, 9, 8)
    assert torch.allclose(SparseConv2d(layer)(x), layer(x), atol=1e-5)


def test_a_grouped_convolution_is_refused():
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))


def test_sparsify_keeps_the_function_and_reports_every_pruned_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    pruned(model[0], 0.5), pruned(model[3], 0.98)
    x = torch.randn(16, 1, 8, 8)
    net, report = sparsify(model, x, repeats=3, warmup=1)
    assert set(report) == {"0", "3"} and all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in report.values())
    assert abs(report["3"]["density"] - float((model[3].weight != 0).float().mean())) < 1e-9
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)
    for name, r in report.items():  # the chosen ones, and only they, run as CSR
        assert isinstance(net.get_submodule(name), (SparseLinear, SparseConv2d)) == r["sparse"]


def test_the_sparse_state_dict_loads_with_torch_alone_and_is_smaller():
    torch.manual_seed(0)
    model = nn.Sequential(pruned(nn.Conv2d(3, 16, 3)), nn.Flatten(), pruned(nn.Linear(16 * 6 * 6, 64)))
    dense_file, sparse_file = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), dense_file)
    torch.save(sparse_state_dict(model), sparse_file)
    assert sparse_file.getbuffer().nbytes < 0.3 * dense_file.getbuffer().nbytes  # 90% zeros
    sparse_file.seek(0)
    saved = torch.load(sparse_file, weights_only=True)
    state = {k: v.to_dense().reshape(saved["shapes"][k]) if k in saved["shapes"] else v
             for k, v in saved["state_dict"].items()}
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def tf32(t):
    """t rounded to TensorFloat-32 (10 mantissa bits, to nearest): what an Ampere/Hopper GPU
    multiplies when TF32 is allowed."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.fixture
def tf32_emulated(monkeypatch):
    """Dense Linear and Conv2d layers compute in TF32 while torch's TF32 switches are on, as on a
    GPU (the CSR kernels, like cuSPARSE, stay in full fp32); the switches on, as the default
    train.tf32=true sets them."""
    linear, conv = nn.Linear.forward, nn.Conv2d._conv_forward

    def tf32_linear(self, x):
        if not torch.backends.cuda.matmul.allow_tf32:
            return linear(self, x)
        return torch.nn.functional.linear(tf32(x), tf32(self.weight), self.bias)

    def tf32_conv(self, x, weight, bias):
        return conv(self, tf32(x), tf32(weight), bias) if torch.backends.cudnn.allow_tf32 else conv(self, x, weight,
                                                                                                     bias)

    monkeypatch.setattr(nn.Linear, "forward", tf32_linear)
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", tf32_conv)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_sparse_latency_checks_its_layers_in_full_fp32_when_tf32_is_on(tf32_emulated):
    from prunebench.core.csr import sparse_latency

    torch.manual_seed(0)
    net = nn.Sequential(pruned(nn.Conv2d(3, 16, 3, padding=1)), nn.ReLU(), nn.Flatten(),
                        pruned(nn.Linear(16 * 8 * 8, 300)), nn.ReLU(), pruned(nn.Linear(300, 10)))
    with torch.no_grad():  # the emulation is real: TF32 moves a dense layer's outputs beyond the check's tolerance
        h = net[2](net[1](net[0](torch.randn(8, 3, 8, 8))))
        assert not torch.allclose(net[3](h), SparseLinear(net[3])(h), rtol=1e-4, atol=1e-6)
    out = sparse_latency(net, (3, 8, 8), [8], repeats=1, warmup=0)
    assert out["batch_8"]["dense_ms"] > 0
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored afterwards
