"""Models converted to SyncBatchNorm (train.sync_bn=true under torchrun): their batch norms are
batch norms everywhere prunebench asks (prunable norm parameters, the units structured pruning
removes, MAC counts), and GraSP's double backward scores them as plain batch norm."""

import copy

import torch
from torch import nn

from prunebench import Masks, ScoreContext, get_criterion
from prunebench.config import GranularityConfig
from prunebench.core.curvature import without_sync_batchnorm
from prunebench.core.granularity import build_granularity
from prunebench.core.metrics import compute_in_layers, count_macs
from prunebench.models import build_model, default_config
from prunebench.schedules.steps import with_coupled
from prunebench.core.select import SelectOptions, select_by_rank

SHAPE = (3, 16, 16)


def resnet20(seed=0):
    torch.manual_seed(seed)
    model = build_model(default_config("resnet20"), SHAPE, 10)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():  # statistics that are not the identity, so the norms matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def test_norm_parameters_of_sync_batchnorm_are_prunable():
    plain = resnet20()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    names = Masks.ones(plain, norm=True).names()
    assert any(n.endswith("bn1.weight") for n in names)
    assert Masks.ones(synced, norm=True).names() == names


def test_filter_pruning_of_a_sync_batchnorm_model_removes_its_norm_entries_and_compacts():
    plain = resnet20()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    kept = {}
    for name, model in (("plain", plain), ("synced", synced)):
        g = build_granularity(GranularityConfig(name="filter", reduce="l1"))
        g.bind(model, SHAPE)
        masks = Masks.ones(model)
        gen = torch.Generator().manual_seed(0)
        scores = {n: torch.rand(m.shape, generator=gen) for n, m in masks.items()}
        masks = select_by_rank(scores, masks, 0.5, SelectOptions(scope="layer"), g)
        enforced = with_coupled(masks, g, model)
        kept[name] = {n: m.clone() for n, m in enforced.items()}
        enforced.apply(model)
        model.eval()
        x = torch.randn((4,) + SHAPE, generator=torch.Generator().manual_seed(2))
        small = g.structure.compact(model, masks, SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(small.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    assert kept["plain"].keys() == kept["synced"].keys()
    assert any(n.endswith("bn1.weight") for n in kept["synced"])  # the removed units' norm entries go too
    assert all(torch.equal(kept["plain"][n], kept["synced"][n]) for n in kept["plain"])


def test_macs_of_a_sync_batchnorm_model_are_counted_by_hooks_and_equal_the_plain_ones():
    plain = resnet20()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert compute_in_layers(synced)
    assert count_macs(synced, SHAPE).total == count_macs(plain, SHAPE).total


def test_without_sync_batchnorm_computes_the_same_with_the_same_parameters():
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(resnet20())
    local = without_sync_batchnorm(copy.deepcopy(synced))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in local.modules())
    assert [n for n, _ in local.named_parameters()] == [n for n, _ in synced.named_parameters()]
    x = torch.randn((4,) + SHAPE)
    for mode in (True, False):
        synced.train(mode), local.train(mode)
        torch.testing.assert_close(local(x), synced(x))
    # in training mode both moved their running statistics alike
    torch.testing.assert_close(dict(local.named_buffers()), dict(synced.named_buffers()))


def test_grasp_scores_a_sync_batchnorm_model_on_a_copy_with_plain_batch_norm(monkeypatch):
    """SyncBatchNorm has no second derivative (batch_norm_backward_reduce) on GPUs: GraSP's Hg
    must go through plain batch norm, which computes the same on the one batch every rank holds."""
    import prunebench.criteria.grasp as grasp

    seen = []
    original = grasp.hessian_gradient_product
    monkeypatch.setattr(grasp, "hessian_gradient_product",
                        lambda net, *a: seen.append({type(m) for m in net.modules()}) or original(net, *a))
    plain = resnet20()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn((40,) + SHAPE, generator=gen), torch.arange(40) % 10
    scores = {}
    for name, model in (("plain", plain), ("synced", synced)):
        ctx = ScoreContext(model, Masks.ones(model), batches=lambda: iter([(x, y)]), num_classes=10)
        scores[name] = get_criterion("grasp", samples_per_class=2).score(ctx)
    assert nn.SyncBatchNorm not in seen[1]
    for n in scores["plain"]:
        torch.testing.assert_close(scores["synced"][n], scores["plain"][n], rtol=1e-4, atol=1e-7)
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(isinstance(m, nn.SyncBatchNorm) for m in norms)  # the model itself is untouched
