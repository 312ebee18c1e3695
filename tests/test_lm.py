"""Language models: tiny LLaMA- and OPT-architecture causal LMs trained here on a generated corpus
(prunebench.lm.tiny), pruned through the whole CLI and through the block-by-block pass."""

import copy
import gzip
import json
import math

import pytest
import torch
from conftest import make_config, read_summary, run_cli

import prunebench
from prunebench.config import ConfigError
from prunebench.core.layerwise import layer_by_layer, layer_modules
from prunebench.lm import hub, tiny
from prunebench.lm.blockwise import prune_block_by_block
from prunebench.lm.recipe import batches_of_equal_length, build, perplexity
from prunebench.lm.text import document_windows, load_text
from prunebench.core.masks import Masks
from prunebench.config.options import TextDatasetConfig
from prunebench.pipeline import run

pytest.importorskip("transformers")


def lm_config(*overrides):
    return make_config(*overrides, fast=False)


def lm_args(path, *extra):
    return ["model=hf_causal_lm", f"model.name={path / 'model'}", "dataset=text", f"dataset.path={path / 'corpus.txt'}",
            "dataset.seq_len=64", "calibration.samples=16", "latency.repeats=1", *extra]


@pytest.fixture(autouse=True)
def _hf_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # the datasets cache too


# ------------------------------------------------------------------------------ perplexity
def test_perplexity_is_exp_of_the_mean_token_loss_over_every_window(tiny_lms):
    model = hub.load_model(str(tiny_lms["llama"] / "model"), None, False, torch.float32, True)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 300, (16,), generator=g) for _ in range(5)] + [torch.randint(0, 300, (7,), generator=g)]
    result = perplexity(model, windows, batch_size=4, device=torch.device("cpu"))
    with torch.no_grad():  # transformers' own shifted loss, weighted by each window's predicted tokens
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) * (w.numel() - 1) for w in windows]
    assert result.tokens == 5 * 15 + 6
    assert result.loss == pytest.approx(sum(losses) / result.tokens, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.loss), rel=1e-12)


def test_batches_keep_windows_of_one_length_together():
    windows = [torch.zeros(4)] * 5 + [torch.zeros(2)]
    assert [b.shape for b in batches_of_equal_length(windows, 2)] == [(2, 4), (2, 4), (1, 4), (1, 2)]


# ------------------------------------------------------------------------------ text
def test_a_text_file_splits_by_lines_and_the_last_window_is_kept_or_dropped(tiny_lms, tmp_path):
    tok = hub.load_tokenizer(str(tiny_lms["llama"] / "model"), None, False, True)
    cfg = TextDatasetConfig(name="text", path=str(tiny_lms["llama"] / "corpus.txt"))
    data = load_text(cfg, tok, str(tmp_path), ["train", "test"])
    lines = (tiny_lms["llama"] / "corpus.txt").read_text().splitlines(keepends=True)
    test_text = "".join(lines[len(lines) - round(0.1 * len(lines)):])
    assert data.splits["test"].tolist() == tok(test_text)["input_ids"]
    n = data.num_tokens("test")
    kept, dropped = data.eval_windows("test", 64, "keep"), data.eval_windows("test", 64, "drop")
    assert sum(w.numel() for w in kept) == n and len(dropped) == n // 64
    assert all(w.numel() == 64 for w in dropped)


def test_tokens_are_cached_and_tokenised_again_when_the_file_changes(tiny_lms, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((tiny_lms["llama"] / "corpus.txt").read_text())
    tok = hub.load_tokenizer(str(tiny_lms["llama"] / "model"), None, False, True)
    cfg = TextDatasetConfig(name="text", path=str(corpus))
    first = load_text(cfg, tok, str(tmp_path), ["test"]).splits["test"]
    assert len(list((tmp_path / "tokens").iterdir())) == 1

    class NoTokenizer:  # the cache answers: nothing is tokenised
        backend_tokenizer = tok.backend_tokenizer

        def __call__(self, *a, **k):
            raise AssertionError("tokenised again")

    assert torch.equal(load_text(cfg, NoTokenizer(), str(tmp_path), ["test"]).splits["test"], first)
    corpus.write_text(corpus.read_text() + "The cat sleeps.\n")
    assert not torch.equal(load_text(cfg, tok, str(tmp_path), ["test"]).splits["test"], first)


def test_calibration_windows_are_seeded_and_come_from_the_training_split(tiny_lms, tmp_path):
    cfg = lm_config(*lm_args(tiny_lms["llama"], "criterion=wanda", f"data_dir={tmp_path}"))
    a, b = build(cfg), build(cfg)
    assert torch.equal(a.calibration, b.calibration) and a.calibration.shape == (16, 64)
    other = build(lm_config(*lm_args(tiny_lms["llama"], "criterion=wanda", "calibration.seed=5",
                                       f"data_dir={tmp_path}")))
    assert not torch.equal(a.calibration, other.calibration)
    assert a.calibration_about["sha256"] == b.calibration_about["sha256"] != other.calibration_about["sha256"]
    train = load_text(cfg.dataset, a.tokenizer, str(tmp_path), ["train"]).splits["train"].tolist()
    text = " " + " ".join(map(str, train)) + " "
    assert all(" " + " ".join(map(str, w.tolist())) + " " in text for w in a.calibration)


def test_c4_windows_lie_inside_one_document_longer_than_seq_len(tiny_lms):
    tok = hub.load_tokenizer(str(tiny_lms["llama"] / "model"), None, False, True)
    docs = ["The cat sleeps.", "The dog runs. " * 30, "The king sings."]
    windows = document_windows(docs, tok, 8, 20, torch.Generator().manual_seed(0))
    long_doc = " ".join(map(str, tok(docs[1])["input_ids"]))
    assert windows.shape == (8, 20) and all(" ".join(map(str, w.tolist())) in long_doc for w in windows)


def fake_hub_copies(root, lines):
    """Local copies laid out as Salesforce/wikitext (parquet per config, README configs) and allenai/c4."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wiki = root / "wikitext" / "wikitext-2-raw-v1"
    wiki.mkdir(parents=True)
    for split, part in (("train", lines[:600]), ("validation", lines[600:700]), ("test", lines[700:])):
        pq.write_table(pa.table({"text": [line + "\n" for line in part]}), wiki / f"{split}-00000-of-00001.parquet")
    (root / "wikitext" / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n" + "".join(
            f"  - split: {s}\n    path: wikitext-2-raw-v1/{s}-*\n" for s in ("train", "validation", "test")) + "---\n")
    (root / "c4" / "en").mkdir(parents=True)
    for name, part in (("c4-train.00000-of-01024.json.gz", lines[:600]),
                       ("c4-validation.00000-of-00008.json.gz", lines[600:])):
        with gzip.open(root / "c4" / "en" / name, "wt") as f:
            f.writelines(json.dumps({"text": line, "url": "u"}) + "\n" for line in part if line.strip())


def test_wikitext2_and_c4_load_through_datasets_from_local_copies(tiny_lms, tmp_path):
    lines = (tiny_lms["llama"] / "corpus.txt").read_text().splitlines()
    fake_hub_copies(tmp_path, lines)
    overrides = ["model=hf_causal_lm", f"model.name={tiny_lms['llama'] / 'model'}", "dataset=wikitext2",
                 f"dataset.hub_name={tmp_path / 'wikitext'}", "dataset.seq_len=32", "criterion=wanda",
                 "calibration.dataset=c4", f"calibration.hub_name={tmp_path / 'c4'}", "calibration.samples=4",
                 f"data_dir={tmp_path / 'data'}"]
    exp = build(lm_config(*overrides))
    test_text = "\n\n".join(line + "\n" for line in lines[700:])
    assert exp.data.splits["test"].tolist() == exp.tokenizer(test_text)["input_ids"]
    assert exp.calibration.shape == (4, 32) and exp.calibration_about["dataset"] == "c4"
    c4 = build(lm_config(*overrides[:2], "dataset=c4", f"dataset.hub_name={tmp_path / 'c4'}", "dataset.seq_len=32",
                           "dataset.eval_documents=50", f"data_dir={tmp_path / 'data'}"))
    docs = [line for line in lines[600:] if line.strip()][:50]
    assert c4.data.splits["test"].tolist() == c4.tokenizer(" ".join(docs))["input_ids"]


# ------------------------------------------------------------------------------ block by block
def whole_model_pass(model, criterion, masks, fractions, windows):
    """The same criterion through layerwise.layer_by_layer on the whole model (no blocks)."""
    params, new = dict(model.named_parameters()), dict(masks.items())

    def prune(name, stat):
        new[name] = criterion.prune_layer(params[name], stat, new[name], fractions[name], prunebench_unstructured())

    modules = layer_modules(model, list(fractions), criterion.name)
    layer_by_layer(model, modules, list(windows.split(4)), criterion.cfg.sequential, criterion.layer_stat, prune,
                   criterion.cfg.sequential_unit, call=lambda m, x: m(input_ids=x))
    return Masks(new)


def prunebench_unstructured():
    from prunebench.core.granularity import Unstructured

    return Unstructured()


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("criterion,options", [("wanda", {"sequential_unit": "layer"}),
                                               ("sparsegpt", {"sequential_unit": "layer"}),
                                               ("sparsegpt", {"sequential_unit": "block"}),
                                               ("wanda", {"sequential": False, "sequential_unit": "layer"})])
def test_block_by_block_equals_the_whole_model_layer_by_layer(tiny_lms, arch, criterion, options):
    """Caught block inputs (hidden states, masks, positions) give each layer exactly the inputs
    the whole model would: the same masks and weights as the whole-model pass."""
    model = hub.load_model(str(tiny_lms[arch] / "model"), None, False, torch.float32, True)
    twin = copy.deepcopy(model)
    masks = Masks({n: torch.ones_like(m.weight) for n, m in hub.block_linears(model).items()})
    fractions = dict.fromkeys(masks, 0.5)
    windows = torch.randint(0, 300, (8, 24), generator=torch.Generator().manual_seed(1))
    crit = prunebench.get_criterion(criterion, scope="layer", **options)
    prune_block_by_block(model, fractions, crit, prunebench_unstructured(), windows, 4, torch.device("cpu"))
    whole = whole_model_pass(twin, crit, masks, fractions, windows)
    params = dict(model.named_parameters())
    for name in masks:
        assert torch.equal((params[name] != 0).float(), whole[name]), name
        torch.testing.assert_close(dict(model.named_parameters())[name], dict(twin.named_parameters())[name],
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the CLI
def test_the_cli_prunes_a_causal_lm_and_saves_a_checkpoint_transformers_loads(tiny_lms, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*lm_args(tiny_lms["llama"], "criterion=wanda", "sparsity=0.5", f"hydra.run.dir={out}",
                         f"data_dir={tmp_path / 'data'}"), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    s = read_summary(out)
    assert s["status"] == "completed" and s["final"]["sparsity"] == pytest.approx(0.5)
    assert s["dense_test_ppl"] < s["final"]["test_ppl_pruned"] < 50
    assert s["data"]["seq_len"] == 64 and s["calibration"]["samples"] == 16
    assert {"transformers", "datasets", "tokenizers"} <= set(s["versions"])
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "model")  # transformers alone, no prunebench
    layers = hub.block_linears(saved)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    assert zeros / sum(m.weight.numel() for m in layers.values()) == pytest.approx(s["final"]["sparsity"])
    assert (out / "curve.png").exists() and not (out / "masks.pt").exists()  # the zeros are the masks
    assert "ppl pruned" in r.stdout


def test_sparsegpt_and_wanda_beat_magnitude_at_2_4(tiny_lms, tmp_path):
    ppl = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        cfg = lm_config(*lm_args(tiny_lms["llama"], f"criterion={criterion}", "criterion.scope=layer",
                                   "granularity=nm", "sparsity=0.5", f"data_dir={tmp_path / 'data'}"))
        ppl[criterion] = run(cfg, tmp_path / criterion)["final"]["test_ppl_pruned"]
    assert ppl["sparsegpt"] < ppl["magnitude"] and ppl["wanda"] < ppl["magnitude"], ppl


def test_fine_tuning_holds_the_masks_and_changes_the_perplexity(tiny_lms, tmp_path):
    cfg = lm_config(*lm_args(tiny_lms["opt"], "criterion=magnitude", "sparsity=0.7", "recovery=full",
                             "recovery.epochs=1", "recovery.lr=1e-3", f"data_dir={tmp_path / 'data'}"))
    s = run(cfg, tmp_path / "ft")
    assert s["final"]["sparsity"] == pytest.approx(0.7, abs=1e-4)
    assert s["final"]["test_ppl"] < s["final"]["test_ppl_pruned"]
    events = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in events if e["event"] == "epoch"] == ["finetune"]


def test_the_report_shows_perplexity_for_language_model_runs(tiny_lms, tmp_path):
    from prunebench.report import report

    for criterion in ("magnitude", "wanda"):
        run(lm_config(*lm_args(tiny_lms["llama"], f"criterion={criterion}", "criterion.scope=layer", "sparsity=0.3",
                               f"data_dir={tmp_path / 'data'}")), tmp_path / "sweep" / criterion)
    report([tmp_path / "sweep"])
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "test_ppl_pruned" in md and "dense_test_ppl" in md and "test_acc" not in md
    classifier = tmp_path / "classifier"
    run(make_config("train.finetune_epochs=0", "train.pretrain_epochs=0"), classifier)
    with pytest.raises(SystemExit, match="mix language models"):
        report([tmp_path / "sweep", classifier])
    shorter = run(lm_config(*lm_args(tiny_lms["llama"], "criterion=magnitude", "criterion.scope=layer", "sparsity=0.3",
                                     "dataset.seq_len=32", f"data_dir={tmp_path / 'data'}")), tmp_path / "short")
    assert shorter["protocol"]["seq_len"] == 32 and shorter["protocol"]["name"] == "none"
    with pytest.raises(SystemExit, match="different evaluation protocols"):  # 64- and 32-token windows
        report([tmp_path / "sweep", tmp_path / "short"])


def test_a_protocol_is_its_settings_exactly():
    wanda = make_config("model=hf_causal_lm", "model.name=m", "dataset=wikitext2", "criterion=wanda", "protocol=wanda",
                        fast=False)
    assert (wanda.dataset.seq_len, wanda.calibration.dataset, wanda.calibration.samples, len(wanda.eval.tasks)) == \
        (None, "c4", 128, 7)
    with pytest.raises(ConfigError, match="is a classifier"):
        make_config("eval.tasks=[boolq]", fast=False)
    with pytest.raises(ConfigError, match="would not be llm_pruner's protocol"):
        make_config("model=hf_causal_lm", "model.name=m", "dataset=wikitext2", "criterion=wanda",
                    "protocol=llm_pruner", "dataset.seq_len=256", fast=False)


def test_the_same_seed_gives_the_same_numbers(tiny_lms, tmp_path):
    from conftest import without_timings

    cfg = lm_config(*lm_args(tiny_lms["opt"], "criterion=sparsegpt", "sparsity=0.6", f"data_dir={tmp_path}"))
    first, second = (without_timings(run(cfg, tmp_path / name)) for name in ("a", "b"))
    for s in (first, second):
        s["final"].pop("peak_rss_gib"), s["rounds"][0].pop("peak_rss_gib"), s.pop("file_bytes")
    assert first == second


def test_random_pruning_of_a_language_model_reaches_its_sparsity(tiny_lms, tmp_path):
    s = run(lm_config(*lm_args(tiny_lms["llama"], "criterion=random", "sparsity=0.8", f"data_dir={tmp_path}")),
            tmp_path / "run")
    assert s["final"]["sparsity"] == pytest.approx(0.8, abs=1e-4) and s["calibration"] is None
    assert s["final"]["test_ppl_pruned"] > 2 * s["dense_test_ppl"]


def test_gpt2_conv1d_layers_are_refused_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny.train_tokenizer(tiny.corpus(200))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "corpus.txt").write_text(tiny.corpus(300))
    with pytest.raises(ConfigError, match="Conv1D"):
        build(lm_config("model=hf_causal_lm", f"model.name={tmp_path / 'gpt2'}", "dataset=text",
                        f"dataset.path={tmp_path / 'corpus.txt'}", "criterion=wanda", f"data_dir={tmp_path}"))


# ------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("preset,criterion,model,seq_len", [("sparsegpt_opt", "sparsegpt", "facebook/opt-125m", 2048),
                                                            ("wanda_llama", "wanda", "meta-llama/Llama-2-7b-hf", None)])
def test_presets_carry_the_papers_settings(preset, criterion, model, seq_len):
    cfg = lm_config(f"experiment={preset}")
    assert (cfg.criterion.name, cfg.model.name, cfg.dataset.name, cfg.sparsity) == (criterion, model, "wikitext2", 0.5)
    assert cfg.dataset.seq_len == seq_len and cfg.dataset.last_window == "drop"
    assert (cfg.calibration.dataset, cfg.calibration.samples, cfg.calibration.seed) == ("c4", 128, 0)
    assert cfg.criterion.sequential_unit == "block" and cfg.criterion.scope == "layer"
    assert lm_config(f"experiment={preset}", "criterion=magnitude").criterion.scope == "layer"


def test_a_preset_runs_on_a_local_model_and_text(tiny_lms, tmp_path):
    path = tiny_lms["opt"]
    cfg = lm_config("experiment=wanda_llama", f"model.name={path / 'model'}", "dataset=text",
                    f"dataset.path={path / 'corpus.txt'}", f"calibration.dataset={path / 'corpus.txt'}",
                    "calibration.samples=8", "granularity=nm", f"data_dir={tmp_path}")
    s = run(cfg, tmp_path / "run")
    assert s["data"]["seq_len"] == 256 and s["calibration"]["dataset"] == "text"  # the model's context
    assert s["granularity"]["sparsity_in_layers"] == 0.5 and s["final"]["test_ppl_pruned"] > s["dense_test_ppl"]


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("extra,message", [
    (["dataset.seq_len=1000"], "beyond the model's context of 256 tokens"),
    (["criterion=sparsegpt", "calibration.samples=100000"], "calibration.samples=100000 is more than the"),
    (["criterion=wanda", "criterion.scope=global", "criterion.compare=layer", "criterion.sequential=false"],
     "needs criterion.scope=layer"),
])
def test_bad_language_model_options_are_refused_before_any_work(tiny_lms, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        build(lm_config(*lm_args(tiny_lms["llama"], *extra, f"data_dir={tmp_path}")))


@pytest.mark.parametrize("args,message", [
    (["model=hf_causal_lm"], "is a causal language model; dataset=fashion_mnist holds labelled examples"),
    (["dataset=wikitext2"], "dataset=wikitext2 is text for causal language models"),
    (["model=hf_causal_lm", "dataset=wikitext2", "criterion=snip"], "criterion=snip is not available for language"),
    (["model=hf_causal_lm", "dataset=wikitext2", "model.name=nobody/no-such-model"],
     "neither a local directory nor in the Hugging Face cache"),
    (["model=hf_causal_lm", "dataset=wikitext2", "calibration.dataset=nowhere.txt"],
     "calibration.dataset=nowhere.txt is neither one of"),
])
def test_the_cli_answers_wrong_combinations_in_one_line(tmp_path, args, message):
    out = tmp_path / "run"
    r = run_cli(*args, f"hydra.run.dir={out}", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (out / "summary.json").exists()
