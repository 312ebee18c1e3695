"""OWL (allocation=owl): outlier ratios by hand, the blocks' sparsities, and a run on a tiny LLaMA."""

import pytest
import torch
from conftest import make_config, tiny_lm_config
from torch import nn

from prunebench.config import ConfigError
from prunebench.lm import hub
from prunebench.lm.owl import block_outlier_ratio, block_sparsities

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from prunebench.lm import tiny

    root = tmp_path_factory.mktemp("owl_lm")
    torch.set_num_threads(2)
    tiny.build(root, "llama", sentences=1500, steps=80, width=32, layers=4)
    return root


class TwoLayers(nn.Module):
    """A 'block' whose two Linear layers read the same input."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor(a)), self.b.weight.copy_(torch.tensor(b))

    def forward(self, hidden):
        return self.a(hidden) + self.b(hidden)


@pytest.mark.parametrize("m, share", [(2.0, 2 / 8), (1.0, 3 / 8)])
def test_the_outlier_ratio_is_the_share_of_the_blocks_scores_above_m_times_their_mean(m, share):
    block = TwoLayers([[1.0, 1.0], [1.0, 1.0]], [[0.2, 2.0], [0.0, 0.0]])
    tokens = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # ‖X_0‖ = 5, ‖X_1‖ = 1
    # scores |W|·‖X‖: a → 5 1 5 1, b → 1 2 0 0; one mean over the block, 15/8 (per layer, m=1 would give 4/8)
    inputs = [(tokens[None], {})]
    modules = {"a.weight": block.a, "b.weight": block.b}
    weights = {"a.weight": block.a.weight, "b.weight": block.b.weight}
    assert block_outlier_ratio(block, modules, weights, inputs, m) == pytest.approx(share)


def test_block_sparsities_spread_over_two_lam_around_the_target():
    ratios, sizes = [0.010, 0.030, 0.020, 0.011, 0.05], [10] * 5
    s = block_sparsities(ratios, sizes, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s.index(min(s)) == ratios.index(max(ratios)) and s.index(max(s)) == ratios.index(min(ratios))
    assert all(0.7 - 0.16 <= x <= 0.7 + 0.16 for x in s)
    assert block_sparsities(ratios, sizes, 0.7, 0.0) == [0.7] * 5  # exactly uniform
    assert block_sparsities([0.02] * 3, [1, 2, 3], 0.6, 0.08) == [0.6] * 3
    uneven = block_sparsities([0.01, 0.03], [1, 3], 0.5, 0.1)  # the mean weighted by each block's weights
    assert (uneven[0] + 3 * uneven[1]) / 4 == pytest.approx(0.5) and uneven[0] - uneven[1] == pytest.approx(0.2)


def test_wanda_with_owl_prunes_the_blocks_to_different_sparsities_at_the_target(tiny_llama, tmp_path, hf_offline):
    from prunebench.pipeline import run

    cfg = tiny_lm_config(tiny_llama, tmp_path, "criterion=wanda", "allocation=owl", "sparsity=0.7",
                         "dataset.seq_len=64", "calibration.samples=8")
    final = run(cfg, tmp_path / "run")["final"]
    owl = final["owl"]
    assert sorted(owl) == ["0", "1", "2", "3"]
    sparsities = [owl[b]["sparsity"] for b in sorted(owl)]
    assert sum(sparsities) / 4 == pytest.approx(0.7) and max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert all(0 < owl[b]["outlier_ratio"] < 1 for b in owl)
    # every layer of block l: round(s_l · row length) of each row pruned (Wanda's per-row comparison)
    model = hub.load_model(str(tmp_path / "run" / "model"), None, False, torch.float32, True)
    zeros = total = 0
    for name, layer in hub.block_linears(model).items():
        rows, cols = layer.weight.shape
        block = name.split("layers.")[1].split(".")[0]
        assert int((layer.weight == 0).sum()) == rows * round(owl[block]["sparsity"] * cols), name
        zeros, total = zeros + rows * round(owl[block]["sparsity"] * cols), total + rows * cols
    assert final["sparsity"] == pytest.approx(zeros / total) and final["sparsity"] == pytest.approx(0.7, abs=1 / 32)


def test_data_free_magnitude_with_owl_loads_the_calibration_windows(tiny_llama, tmp_path, hf_offline):
    from prunebench.lm.recipe import build
    from prunebench.pipeline import run

    args = ("criterion=magnitude", "criterion.scope=layer", "sparsity=0.7", "dataset.seq_len=64",
            "calibration.samples=4")
    assert build(tiny_lm_config(tiny_llama, tmp_path, *args)).calibration is None
    cfg = tiny_lm_config(tiny_llama, tmp_path, *args, "allocation=owl")
    assert build(cfg).calibration.shape == (4, 64)
    final = run(cfg, tmp_path / "run")["final"]
    assert final["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert len(set(b["sparsity"] for b in final["owl"].values())) > 1


@pytest.mark.parametrize("extra, says", [
    (("allocation.lam=0.2",), "use lam < 0.15"),
    (("allocation.m=0",), "allocation.m must be > 0"),
    (("granularity=nm", "granularity.n=2", "granularity.m=4", "sparsity=0.5"), "granularity=nm is not supported"),
    (("granularity=width", "criterion=flap"), "granularity=width is not supported"),
    (("criterion=magnitude", "criterion.scope=global"), "needs criterion.scope=layer"),
])
def test_bad_owl_settings_are_one_line(extra, says):
    lm = ("model=hf_causal_lm", "model.name=some/lm", "dataset=text", "dataset.path=x.txt", "criterion=wanda",
          "sparsity=0.7", "allocation=owl")
    with pytest.raises(ConfigError, match=says) as err:
        make_config(*lm, *extra, fast=False)
    assert "\n" not in str(err.value)


def test_owl_on_a_classifier_is_refused():
    with pytest.raises(ConfigError, match="is a classifier") as err:
        make_config("allocation=owl", "criterion.scope=layer", "sparsity=0.5")
    assert "\n" not in str(err.value)
