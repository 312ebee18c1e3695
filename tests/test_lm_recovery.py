"""Recovery of pruned language models (lm/recovery.py): LoRA through peft, kept apart from sparse
weights or merged into dense ones; distillation from the dense model's logits; the windows it
trains on (the training split or the calibration text, a seeded draw of at most N)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_lm_config

from prunebench.config import ConfigError
from prunebench.config.options import TextDatasetConfig
from prunebench.lm import recipe, recovery, tiny
from prunebench.lm.text import load_text
from prunebench.pipeline import run
from prunebench.runs.checkpoint import StopSignals
from prunebench.runs.record import Recorder

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llama_recovery")
    torch.set_num_threads(1)  # (2 threads on a busy 2-core machine: 5x slower, measured)
    tiny.build(root, "llama", sentences=1500, steps=60, width=32)
    return root


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    pass


def lm_config(path, tmp_path, *extra):
    return tiny_lm_config(path, tmp_path, "dataset.seq_len=32", "criterion=magnitude", "latency.repeats=0",
                          "recovery.windows=64", *extra)


def test_the_loss_is_cross_entropy_plus_t_squared_kl_to_the_teacher():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [9.0, 9.0, 9.0]]])
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [2.0, -1.0, 1.0], [-9.0, 0.0, 9.0]]])
    ids = torch.tensor([[0, 2, 1]])

    def softmax(row, t):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    # positions 0 and 1 predict tokens 2 and 1; the last position predicts nothing
    ce = -(math.log(softmax([1.0, 0.0, -1.0], 1)[2]) + math.log(softmax([0.5, 2.0, 0.0], 1)[1])) / 2
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(t, 2), softmax(s, 2)))
             for s, t in [([1.0, 0.0, -1.0], [0.0, 1.0, 0.0]), ([0.5, 2.0, 0.0], [2.0, -1.0, 1.0])]) / 2
    loss, got_ce, got_kl = recovery.recovery_loss(student, ids, teacher, distill=0.0, temperature=2.0)
    assert float(loss) == pytest.approx(ce, rel=1e-6) and float(got_ce) == pytest.approx(ce, rel=1e-6)
    loss, _, got_kl = recovery.recovery_loss(student, ids, teacher, distill=1.0, temperature=2.0)
    assert float(got_kl) == pytest.approx(kl, rel=1e-6) and float(loss) == pytest.approx(4 * kl, rel=1e-6)
    loss, _, _ = recovery.recovery_loss(student, ids, teacher, distill=0.25, temperature=1.0)
    kl1 = float(recovery.recovery_loss(student, ids, teacher, 1.0, 1.0)[0])
    assert float(loss) == pytest.approx(0.75 * ce + 0.25 * kl1, rel=1e-6)


def test_lora_on_sparse_weights_keeps_the_adapter_apart_and_the_zeros_intact(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = lm_config(tiny_llama, tmp_path, "sparsity=0.5", "recovery=lora", "recovery.lr=3e-3")
    s = run(cfg, tmp_path / "run")["final"]
    assert s["test_ppl"] < s["test_ppl_pruned"]
    assert s["recovery_merged"] is False and s["recovery_windows"] == 64 and s["recovery_rank"] == 8
    assert s["recovery_trainable_params"] > 0 and s["recovery_adapted_layers"] == 14  # 7 Linear × 2 blocks
    model_dir = tmp_path / "run" / "model"
    pruned = recipe.build(cfg)
    recipe.prune(pruned, StopSignals())
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    saved = dict(base.named_parameters())
    assert all(torch.equal(saved[n], p) for n, p in pruned.model.named_parameters())  # frozen: zeros and all
    windows = pruned.data.eval_windows("test", pruned.seq_len, cfg.dataset.last_window)
    adapted = PeftModel.from_pretrained(base, model_dir / "adapter")
    measured = recipe.perplexity(adapted, windows, cfg.train.eval_batch_size, torch.device("cpu"))
    assert measured.ppl == pytest.approx(s["test_ppl"], rel=1e-6)


def test_merging_into_unstructured_sparse_weights_is_refused_before_any_work(tiny_llama, tmp_path):
    r = run_cli("model=hf_causal_lm", f"model.name={tiny_llama / 'model'}", "dataset=text",
                f"dataset.path={tiny_llama / 'corpus.txt'}", "sparsity=0.5", "recovery=lora", "recovery.merge=true",
                f"hydra.run.dir={tmp_path / 'out'}", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0 and "fill their zeros" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "summary.json").exists()


def test_lora_merges_into_dense_weights_and_the_saved_model_needs_no_peft(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    exp = recipe.build(lm_config(tiny_llama, tmp_path, "sparsity=0", "recovery=lora", "recovery.lr=3e-3",
                                 "recovery.targets=[q_proj,down_proj]"))
    dense = {n: p.detach().clone() for n, p in exp.model.named_parameters()}
    figures = recovery.recover(exp, Recorder(tmp_path / "rec", metric="ppl"), StopSignals())
    assert figures["recovery_merged"] is True and figures["recovery_adapted_layers"] == 4
    params = dict(exp.model.named_parameters())
    assert params.keys() == dense.keys()  # plain transformers again
    changed = {n for n in dense if not torch.equal(dense[n], params[n])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}
    recipe.save_pretrained(exp, tmp_path)
    assert not (tmp_path / "model" / "adapter").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = exp.data.eval_windows("test", exp.seq_len, "drop")[0][None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, exp.model(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="nope name no Linear layer"):
        recovery.lora_targets(loaded, ["q_proj", "nope"])


def test_lora_merges_after_structured_pruning_into_a_checkpoint_transformers_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = lm_config(tiny_llama, tmp_path, "granularity=mlp", "sparsity=0.3", "recovery=lora", "recovery.lr=3e-3")
    s = run(cfg, tmp_path / "run")["final"]
    assert s["recovery_merged"] is True and s["test_ppl"] < s["test_ppl_pruned"]
    assert not (tmp_path / "run" / "model" / "adapter").exists()
    exp = recipe.build(cfg)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    windows = exp.data.eval_windows("test", exp.seq_len, cfg.dataset.last_window)
    measured = recipe.perplexity(loaded, windows, cfg.train.eval_batch_size, torch.device("cpu"))
    assert measured.ppl == pytest.approx(s["test_ppl"], rel=1e-5)


def test_distillation_lowers_the_kl_to_the_dense_model_and_records_its_parts(tiny_llama, tmp_path):
    exp = recipe.build(lm_config(tiny_llama, tmp_path, "sparsity=0.6", "recovery=full", "recovery.lr=1e-3",
                                 "recovery.distill=1", "recovery.temperature=2", "recovery.epochs=2"))
    teacher = recovery.dense_teacher(exp)
    recipe.prune(exp, StopSignals())
    ids = torch.stack(exp.data.eval_windows("test", exp.seq_len, "drop")[:8])

    def kl_to_teacher():
        with torch.no_grad():
            student, target = exp.model(input_ids=ids).logits, teacher(input_ids=ids).logits
        return float(F.kl_div(F.log_softmax(student, -1), F.log_softmax(target, -1), log_target=True,
                              reduction="batchmean")) / ids.shape[1]

    before = kl_to_teacher()
    figures = recovery.recover(exp, Recorder(tmp_path / "rec", metric="ppl"), StopSignals(), teacher)
    assert kl_to_teacher() < 0.8 * before and figures["recovery_distill"] == 1.0
    events = [json.loads(line) for line in (tmp_path / "rec" / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert len(epochs) == 2 and epochs[1]["train_kl"] < epochs[0]["train_kl"]
    assert all(e["train_loss"] == pytest.approx(4 * e["train_kl"]) and e["train_ce"] > 0 for e in epochs)
    teacher_weights = dict(teacher.named_parameters())
    assert not any(bool((teacher_weights[n] == 0).any()) for n in exp.masks)  # still the dense model


def test_recovery_on_the_calibration_text_takes_its_windows_at_most_n(tiny_llama, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text(tiny.corpus(300, seed=7))
    args = ("recovery=full", "recovery.data=calibration", f"calibration.dataset={text}")
    capped = recipe.build(lm_config(tiny_llama, tmp_path, *args, "recovery.windows=5"))
    windows, about = recovery.recovery_windows(capped, torch.Generator().manual_seed(0))
    assert windows.shape == (5, 32) and about["recovery_windows"] == 5 and about["recovery_dataset"] == "text"
    tokens = load_text(TextDatasetConfig(name="text", path=str(text)), capped.tokenizer, str(tmp_path / "data"),
                       ["train"]).splits["train"]
    whole = tokens[:tokens.numel() // 32 * 32].view(-1, 32)
    assert all(any(torch.equal(w, row) for row in whole) for w in windows)
    every = recipe.build(lm_config(tiny_llama, tmp_path, *args, "recovery.windows=null"))
    assert torch.equal(recovery.recovery_windows(every, torch.Generator())[0], whole)
    assert "train" not in every.data.splits  # the run's own training split is not read
    with pytest.raises(ConfigError, match="recovery.windows"):
        lm_config(tiny_llama, tmp_path, "recovery=full", "recovery.data=calibration", "calibration.dataset=c4",
                  "recovery.windows=null")
