"""Selection is fast, and its masks do not move: each is checked against the definition (remove
the lowest scores in (score, position) order), against torch.nn.utils.prune, and against
digests recorded before selection was made faster (tests/reference/masks.json; regenerate with
PRUNEBENCH_WRITE_REFERENCE=1 only for a change that moves masks on purpose)."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from prunebench import Masks, ScoreContext, get_criterion, select_by_rank
from prunebench.config import GranularityConfig
from prunebench.core.granularity import build_granularity
from prunebench.models import build_model, default_config
from prunebench.core.select import SelectOptions

PINS = Path(__file__).parent / "reference" / "masks.json"
SHAPE = (1, 28, 28)


def lenet(name="lenet300", quantize=None):
    torch.manual_seed(0)
    model = build_model(default_config(name), SHAPE, 10)
    if quantize:  # coarse weights: many exact ties
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.round(p * quantize) / quantize)
    return model


def magnitudes(model, masks):
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs() for n in masks}


def by_definition(scores, masks, target):
    """Remove the round(target·N) lowest of all alive weights (dead ones first), in (score,
    position) order: a stable sort, as slow as it is plain."""
    flat = torch.cat([torch.where(masks[n] != 0, s, torch.full_like(s, -torch.inf)).reshape(-1).double()
                      for n, s in scores.items()])
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:round(target * flat.numel())]] = False
    parts = torch.split(keep, [s.numel() for s in scores.values()])
    return {n: k.reshape(masks[n].shape) for n, k in zip(scores, parts)}


def digest(masks: Masks) -> str:
    h = hashlib.sha256()
    for n in masks.names():
        h.update(n.encode() + masks[n].bool().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["magnitude", "random", "snip", "grasp", "synflow"])
def test_every_criterions_selection_is_the_definition(name):
    model = lenet()
    masks = Masks.ones(model)
    criterion = get_criterion(name, **({"iterations": 1} if name == "synflow" else {}))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn((100,) + SHAPE, generator=gen), torch.arange(100) % 10
    ctx = ScoreContext(model, masks, batches=lambda: iter([(x, y)]), generator=gen, input_shape=SHAPE,
                       num_classes=10)
    scores = criterion.score(ctx)
    got = criterion.prune(ctx, 0.9) if name != "random" else criterion.rank(scores, masks, 0.9)
    if name == "random":
        expected = by_definition(scores, masks, 0.9)
    else:  # prune scores again: same scores (deterministic), so compare with the definition on them
        expected = by_definition(criterion.score(ctx), masks, 0.9)
    for n in masks:
        assert torch.equal(got[n].bool(), expected[n]), n


def test_global_magnitude_equals_torch_prune_global_unstructured():
    """(Without ties: torch's top-k chooses among tied weights in its own order.)"""
    model = lenet()
    masks = Masks.ones(model)
    ours = select_by_rank(magnitudes(model, masks), masks, 0.9)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=0.9)
    theirs = [m.weight_mask for m, _ in layers]
    assert all(torch.equal(ours[n], t) for n, t in zip(masks.names(), theirs))


def pinned_cases():
    """name -> the masks of a selection whose result must not move."""
    model = lenet()
    masks = Masks.ones(model)
    scores = magnitudes(model, masks)
    rand = {n: torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) for n, m in masks.items()}
    first = select_by_rank(scores, masks, 0.8, SelectOptions(min_density=0.05))
    tied_model = lenet(quantize=20)
    five = lenet("lenet5")
    five_masks = Masks.ones(five)
    filters = build_granularity(GranularityConfig(name="filter", reduce="l1"))
    filters.bind(five, SHAPE)
    return {
        "magnitude_global_90": select_by_rank(scores, masks, 0.9),
        "magnitude_layer_70": select_by_rank(scores, masks, 0.7, SelectOptions(scope="layer")),
        "random_global_98": select_by_rank(rand, masks, 0.98),
        "magnitude_min_density_second_round": select_by_rank(magnitudes(model, first), first, 0.94,
                                                             SelectOptions(min_density=0.05)),
        "magnitude_ties_90": select_by_rank(magnitudes(tied_model, masks), masks, 0.9),
        "magnitude_exclude_last_layer_80": select_by_rank(scores, masks, 0.8, SelectOptions(exclude_last=True)),
        "l1_filters_lenet5_50": select_by_rank(magnitudes(five, five_masks), five_masks, 0.5,
                                               SelectOptions(scope="layer"), filters),
    }


def test_masks_equal_the_ones_recorded_before_selection_was_made_faster():
    got = {name: digest(m) for name, m in pinned_cases().items()}
    if os.environ.get("PRUNEBENCH_WRITE_REFERENCE"):
        PINS.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(PINS.read_text())


def test_synflow_rescoring_in_place_equals_a_fresh_copy_each_iteration():
    """SynFlow keeps one float64 |θ| copy and masks it further each iteration; the paper's loop
    with a fresh copy of the masked network every time gives the same masks."""
    import copy

    def fresh_scores(model, masks):
        net = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
                t.abs_()
            params = dict(net.named_parameters())
            for n, m in masks.items():
                params[n].mul_(m.to(params[n]))
        weights = [params[n] for n in masks]
        grads = torch.autograd.grad(net(torch.ones((1,) + SHAPE, dtype=torch.float64)).sum(), weights)
        return {n: (w.detach() * g).abs().float() for n, w, g in zip(masks.names(), weights, grads)}

    model = lenet("lenet5")
    masks = Masks.ones(model)
    criterion = get_criterion("synflow", iterations=10)
    got = criterion.prune(ScoreContext(model, masks, input_shape=SHAPE), 0.95)
    expected = masks
    for k in range(1, 11):
        target = 0.95 if k == 10 else 1 - 0.05 ** (k / 10)
        expected = criterion.rank(fresh_scores(model, expected), expected, target)
    assert all(torch.equal(got[n], expected[n]) for n in masks)
