"""A language-model run stopped between blocks (SIGTERM, as SLURM sends before preempting)
resumes from its last finished block: the same weights and numbers, bit for bit, as a run never
stopped, and neither the dense perplexity nor a finished block computed again."""

import signal

import pytest
import torch
from conftest import tiny_lm_config, without_timings

from prunebench.runs.checkpoint import CheckpointError, Interrupted
from prunebench.lm import blockwise, recipe, resume, tiny
from prunebench.pipeline import run

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    """Three-block models: LLaMA with grouped-query attention (2 key/value heads for 4), OPT, a
    Mixtral (8 experts, top-2: fused 3-D expert weights in the block checkpoints) and a DeepSeek-V3
    (latent attention, a dense block, then two MoE blocks with shared experts)."""
    root = tmp_path_factory.mktemp("tiny_lm_resume")
    torch.set_num_threads(2)
    for arch in ("llama", "opt", "mixtral", "deepseek_v3"):
        tiny.build(root / arch, arch, sentences=1500, steps=60, width=32, layers=3, kv_heads=2)
    return root


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    pass


def lm_config(path, tmp_path, *extra):
    return tiny_lm_config(path, tmp_path, "dataset.seq_len=32", "calibration.samples=8", "sparsity=0.5", *extra)


class Counts:
    """How often the run measures a perplexity and prunes a block."""

    def __init__(self, monkeypatch):
        self.perplexity = self.blocks = 0
        ppl, block = recipe.perplexity, blockwise.prune_block

        def counted_ppl(*a, **k):
            self.perplexity += 1
            return ppl(*a, **k)

        def counted_block(*a, **k):
            self.blocks += 1
            return block(*a, **k)

        monkeypatch.setattr(recipe, "perplexity", counted_ppl)
        monkeypatch.setattr(blockwise, "prune_block", counted_block)


def sigterm_after(monkeypatch, method: str, when=lambda *a: True):
    """SIGTERM to this process right after LMCheckpoints.<method> (the run's own handler catches it)."""
    original = getattr(resume.LMCheckpoints, method)

    def then_stop(self, *args):
        original(self, *args)
        if when(*args):
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(resume.LMCheckpoints, method, then_stop)


def saved_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


def comparable(summary):
    s = without_timings(summary)
    s["final"].pop("peak_rss_gib"), s["rounds"][0].pop("peak_rss_gib")
    return s


@pytest.mark.parametrize("arch,criterion", [("llama", "sparsegpt"), ("opt", "wanda"), ("mixtral", "sparsegpt"),
                                            ("deepseek_v3", "wanda")])
def test_a_run_stopped_after_a_block_resumes_to_the_same_weights_and_numbers(tiny_lms, tmp_path, monkeypatch,
                                                                             arch, criterion):
    cfg = lm_config(tiny_lms / arch, tmp_path, f"criterion={criterion}")
    whole = run(cfg, tmp_path / "whole")
    with monkeypatch.context() as m:
        sigterm_after(m, "block_done", lambda index, *rest: index == 1)
        with pytest.raises(Interrupted):
            run(cfg, tmp_path / "stopped")
    stopped = tmp_path / "stopped"
    assert (stopped / "checkpoint.pt").exists() and not (stopped / "summary.json").exists()
    assert sorted(p.name for p in (stopped / "checkpoint_blocks").iterdir()) == ["block_0.pt", "block_1.pt",
                                                                                "inputs_2.pt"]
    counts = Counts(monkeypatch)
    resumed = run(cfg, stopped)
    assert (counts.perplexity, counts.blocks) == (1, 1)  # the pruned perplexity; the third block
    assert comparable(resumed) == comparable(whole)
    a, b = saved_weights(tmp_path / "whole"), saved_weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (stopped / "checkpoint.pt").exists() and not (stopped / "checkpoint_blocks").exists()


def test_a_run_stopped_while_fine_tuning_prunes_and_measures_nothing_again(tiny_lms, tmp_path, monkeypatch):
    cfg = lm_config(tiny_lms / "llama", tmp_path, "criterion=wanda", "recovery=full", "recovery.epochs=1",
                    "recovery.lr=1e-4", "checkpoint.keep=true")
    with monkeypatch.context() as m:
        sigterm_after(m, "pruned")
        with pytest.raises(Interrupted):
            run(cfg, tmp_path / "run")
    counts = Counts(monkeypatch)
    s = run(cfg, tmp_path / "run")
    assert (counts.perplexity, counts.blocks) == (1, 0)  # the fine-tuned perplexity only
    assert s["final"]["test_ppl"] != s["final"]["test_ppl_pruned"] and s["final"]["sparsity"] == pytest.approx(0.5)
    assert (tmp_path / "run" / "checkpoint.pt").exists()  # checkpoint.keep=true
    # the finished run, asked again without keep: reported as it is, its checkpoint files removed
    again = run(lm_config(tiny_lms / "llama", tmp_path, "criterion=wanda", "recovery=full", "recovery.epochs=1",
                          "recovery.lr=1e-4"), tmp_path / "run")
    assert again["final"] == s["final"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "checkpoint_blocks").exists()


def stopped_after_the_first_block(cfg, run_dir, monkeypatch) -> None:
    with monkeypatch.context() as m:
        sigterm_after(m, "block_done", lambda index, *rest: index == 0)
        with pytest.raises(Interrupted):
            run(cfg, run_dir)


def test_a_corrupt_block_file_is_refused_in_one_line(tiny_lms, tmp_path, monkeypatch):
    cfg = lm_config(tiny_lms / "opt", tmp_path, "criterion=wanda")
    stopped_after_the_first_block(cfg, tmp_path / "run", monkeypatch)
    block = tmp_path / "run" / "checkpoint_blocks" / "block_0.pt"
    data = bytearray(block.read_bytes())
    data[-100] ^= 0xFF
    block.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="block_0.pt is corrupt"):
        run(cfg, tmp_path / "run")
    s = run(lm_config(tiny_lms / "opt", tmp_path, "criterion=wanda", "checkpoint.resume=false"), tmp_path / "run")
    assert s["status"] == "completed" and not (tmp_path / "run" / "checkpoint_blocks").exists()


def test_a_checkpoint_of_another_dtype_is_refused(tiny_lms, tmp_path, monkeypatch):
    cfg = lm_config(tiny_lms / "opt", tmp_path, "criterion=wanda")
    stopped_after_the_first_block(cfg, tmp_path / "run", monkeypatch)
    with pytest.raises(CheckpointError, match="written with float32 weights and this run loads bfloat16"):
        resume.saved_run(tmp_path / "run", run_config(cfg), torch.device("cpu"), torch.bfloat16, True)


def run_config(cfg):
    from prunebench.pipeline import to_plain

    return to_plain(cfg)
