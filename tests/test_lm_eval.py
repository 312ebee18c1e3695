"""Zero-shot task accuracy through lm-evaluation-harness (prunebench/lm/evaluation.py), on tiny
local tasks in lm-eval's own YAML format: sentences of prunebench.lm.tiny's toy grammar, drawn
with another seed than the corpus the tiny model trained on."""

import csv
import json
import random
import signal

import pytest
import torch
from conftest import read_summary, tiny_lm_config

pytest.importorskip("lm_eval")

from prunebench.config import ConfigError, EvalConfig  # noqa: E402
from prunebench.lm import evaluation, hub, tiny  # noqa: E402
from prunebench.lm.resume import LMCheckpoints  # noqa: E402
from prunebench.pipeline import run  # noqa: E402
from prunebench.report import report  # noqa: E402
from prunebench.runs.checkpoint import Interrupted  # noqa: E402

YESNO = """task: toy_grammatical
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{sentence}}}}\\nQuestion: is this sentence grammatical?\\nAnswer:"
doc_to_choice: ["no", "yes"]
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

AGREEMENT = """task: toy_agreement
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 2.0
"""

TASKS = ["toy_grammatical", "toy_agreement"]


@pytest.fixture(autouse=True)
def _offline(hf_offline, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_llama")
    torch.set_num_threads(2)
    tiny.build(out, "llama", sentences=1500, steps=20, width=32)  # any model will do: no accuracy is asserted
    return out


def agreement_docs(rng: random.Random, count: int):
    """A subject and two continuations: the verb agreeing with it, and the one that does not."""
    docs = []
    for _ in range(count):
        plural = rng.random() < 0.5
        subject = tiny.noun_phrase(rng, plural)
        verb = rng.choice(tiny.INTRANSITIVE)
        place = rng.choice(tiny.PLACES)
        right, wrong = f"{verb[plural]} {place}.", f"{verb[not plural]} {place}."
        gold = rng.randint(0, 1)
        docs.append({"context": subject[0].upper() + subject[1:], "choices": [right, wrong][::1 - 2 * gold],
                     "gold": gold})
    return docs


def yesno_docs(rng: random.Random, count: int):
    """Grammatical sentences (yes) and the same with the verb's number flipped (no)."""
    docs = []
    for doc in agreement_docs(rng, count):
        label = rng.randint(0, 1)
        verb = doc["choices"][doc["gold"] if label else 1 - doc["gold"]]
        docs.append({"sentence": f"{doc['context']} {verb}", "label": label})
    return docs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Both tasks as YAML files and JSON-lines data (seed 1234: not the corpus's seed 0)."""
    out = tmp_path_factory.mktemp("tasks")
    rng = random.Random(1234)
    for name, template, docs in (("toy_grammatical", YESNO, yesno_docs(rng, 24)),
                                 ("toy_agreement", AGREEMENT, agreement_docs(rng, 24))):
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (out / f"{name}.yaml").write_text(template.format(data=data))
    return out


def load(tiny_llama):
    return (hub.load_model(str(tiny_llama / "model"), None, False, torch.float32, True),
            hub.load_tokenizer(str(tiny_llama / "model"), None, False, True))


# ------------------------------------------------------------------------------ the numbers
def test_the_figures_are_lm_evals_own_on_the_model_loaded_by_lm_eval(tiny_llama, task_dir):
    from lm_eval import simple_evaluate

    model, tokenizer = load(tiny_llama)
    cfg = EvalConfig(tasks=TASKS, include_path=str(task_dir), batch_size=4)
    ours = evaluation.evaluate(model, tokenizer, cfg, torch.device("cpu"), "dense")
    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(tiny_llama / "model"), "device": "cpu"},
                             tasks=TASKS, num_fewshot=0, task_manager=evaluation.task_manager(str(task_dir)),
                             log_samples=False)["results"]
    for name in TASKS:
        assert ours["tasks"][name]["acc"] == pytest.approx(theirs[name]["acc,none"], abs=1e-12)
        assert ours["tasks"][name]["samples"] == 24
    assert ours["tasks"]["toy_agreement"]["acc_norm"] == pytest.approx(theirs["toy_agreement"]["acc_norm,none"])
    assert "acc_norm" not in ours["tasks"]["toy_grammatical"]
    assert ours["mean_acc"] == pytest.approx((ours["tasks"][TASKS[0]]["acc"] + ours["tasks"][TASKS[1]]["acc"]) / 2)
    assert ours["tasks"]["toy_agreement"]["version"] == 2.0 and ours["harness"].startswith("0.4")


def continuation_tokens(tokenizer, context: str, continuation: str) -> int:
    """How lm-eval splits a choice off its context: the whole encoded, minus the context's tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    return len(whole) - len(tokenizer(context, add_special_tokens=False)["input_ids"])


def test_a_model_with_uniform_logits_scores_what_its_ties_decide(tiny_llama, task_dir):
    """Zero output weights: every token has log-probability -log V, so a choice scores
    -n·log V (n: its tokens), acc picks the fewest tokens (the first on a tie) and acc_norm,
    per byte, the most bytes per token. The expected accuracies follow exactly from the labels."""
    model, tokenizer = load(tiny_llama)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    cfg = EvalConfig(tasks=["toy_agreement"], include_path=str(task_dir))
    result = evaluation.evaluate(model, tokenizer, cfg, torch.device("cpu"), "uniform")["tasks"]["toy_agreement"]
    docs = [json.loads(line) for line in (task_dir / "toy_agreement.jsonl").read_text().splitlines()]
    hits, norm_hits = 0, 0
    for doc in docs:
        counts = [continuation_tokens(tokenizer, doc["context"], " " + c) for c in doc["choices"]]
        scores = [-n for n in counts]
        per_byte = [-n / len(" " + c) for n, c in zip(counts, doc["choices"])]
        hits += scores.index(max(scores)) == doc["gold"]
        norm_hits += per_byte.index(max(per_byte)) == doc["gold"]
    assert result["acc"] == pytest.approx(hits / len(docs), abs=1e-12)
    assert result["acc_norm"] == pytest.approx(norm_hits / len(docs), abs=1e-12)


def test_no_tasks_no_evaluation(tiny_llama):
    model, tokenizer = load(tiny_llama)
    assert evaluation.evaluate(model, tokenizer, EvalConfig(), torch.device("cpu"), "dense") is None


# ------------------------------------------------------------------------------ runs
def test_a_run_records_dense_pruned_figures_and_versions(tiny_llama, task_dir, tmp_path):
    cfg = tiny_lm_config(tiny_llama, tmp_path, "criterion=magnitude", "criterion.scope=layer", "sparsity=0.5",
                         "eval.tasks=[toy_grammatical,toy_agreement]", f"eval.include_path={task_dir}",
                         "eval.limit=12", "eval.batch_size=8")
    s = run(cfg, tmp_path / "run")
    dense, pruned, final = s["dense_zeroshot"], s["final"]["zeroshot_pruned"], s["final"]["zeroshot"]
    assert set(dense["tasks"]) == set(TASKS) and dense["limit"] == 12
    assert all(t["samples"] == 12 and t["version"] is not None for t in dense["tasks"].values())
    assert final == pruned  # recovery=none: the final model is the pruned one
    assert dense["harness"] == pruned["harness"] and dense["mean_acc"] is not None
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["event"] == "dense")["zeroshot"] == dense
    assert read_summary(tmp_path / "run")["dense_zeroshot"] == dense
    report([tmp_path / "run"], tmp_path / "report")  # prunebench-report: zero-shot columns beside perplexity
    row = next(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert float(row["zeroshot_pruned"]) == pytest.approx(pruned["mean_acc"])
    assert float(row["dense_zeroshot"]) == pytest.approx(dense["mean_acc"])
    assert float(row["zeroshot_toy_agreement"]) == pytest.approx(final["tasks"]["toy_agreement"]["acc"])


def zeroshot_args(task_dir):
    return ["criterion=magnitude", "criterion.scope=layer", "sparsity=0.5", "latency.repeats=0",
            "eval.tasks=[toy_agreement]", f"eval.include_path={task_dir}", "eval.limit=8", "eval.batch_size=8"]


def counted_stages(monkeypatch) -> list:
    """The stages zero-shot evaluation runs at, in order."""
    stages, original = [], evaluation.evaluate

    def counted(*args):
        stages.append(args[-1])
        return original(*args)

    monkeypatch.setattr(evaluation, "evaluate", counted)
    return stages


def test_after_recovery_the_adapted_model_is_evaluated_again(tiny_llama, task_dir, tmp_path, monkeypatch):
    stages = counted_stages(monkeypatch)
    cfg = tiny_lm_config(tiny_llama, tmp_path, *zeroshot_args(task_dir), "dataset.seq_len=32", "recovery=lora",
                         "recovery.windows=16", "recovery.lr=3e-3")
    final = run(cfg, tmp_path / "run")["final"]
    assert stages == ["dense", "pruned", "recovered"]  # LoRA adapters on: the model lm-eval sees is peft's
    assert final["zeroshot"]["tasks"]["toy_agreement"]["samples"] == 8 and final["zeroshot"] is not None


def test_a_resumed_run_keeps_the_dense_figures_it_recorded(tiny_llama, task_dir, tmp_path, monkeypatch):
    cfg = tiny_lm_config(tiny_llama, tmp_path, *zeroshot_args(task_dir))
    original = LMCheckpoints.save

    def stop_after_dense(self, where):
        original(self, where)
        signal.raise_signal(signal.SIGTERM)  # the run's own handler stops it

    with monkeypatch.context() as m:
        m.setattr(LMCheckpoints, "save", stop_after_dense)
        with pytest.raises(Interrupted):
            run(cfg, tmp_path / "run")
    dense = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["zeroshot"]
    stages = counted_stages(monkeypatch)
    s = run(cfg, tmp_path / "run")
    assert stages == ["pruned"] and s["dense_zeroshot"] == dense


def test_unknown_task_is_refused_with_close_matches(tiny_llama, task_dir, tmp_path):
    cfg = tiny_lm_config(tiny_llama, tmp_path, "eval.tasks=[toy_agreemnt]", f"eval.include_path={task_dir}")
    with pytest.raises(ConfigError, match="no task 'toy_agreemnt'.*close matches: toy_agreement"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow  # lm-eval indexes its ~15k task files and datasets retries offline: half a minute
def test_a_hub_task_missing_from_the_cache_offline_says_where_it_looked():
    with pytest.raises(ConfigError, match=r"task 'boolq' could not be loaded: looked for aps/super_glue \(boolq\) "
                                          r"in the Hugging Face datasets cache .*, offline"):
        evaluation.check_tasks(EvalConfig(tasks=["boolq"]))


def test_a_task_without_its_data_is_refused_before_pruning(tiny_llama, task_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "toy_missing.yaml").write_text(
        YESNO.replace("toy_grammatical", "toy_missing").format(data=tmp_path / "absent.jsonl"))
    cfg = tiny_lm_config(tiny_llama, tmp_path, "eval.tasks=[toy_missing]", f"eval.include_path={broken}")
    with pytest.raises(ConfigError, match="data of task 'toy_missing' could not be loaded: looked for json"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_console_table_shows_the_zero_shot_means(tmp_path):
    from prunebench.runs.record import CONSOLE, Recorder

    rec = Recorder(tmp_path / "rec", metric="ppl")
    rec.dense = {"test_ppl": 3.0, "zeroshot": {"mean_acc": 0.8}}
    rec.rounds = [{"round": 1, "target_sparsity": 0.5, "sparsity": 0.5, "compression": 2.0, "test_ppl_pruned": 3.5,
                   "test_ppl": 3.25, "train_seconds": 0.0, "zeroshot_pruned": {"mean_acc": 0.75},
                   "zeroshot": {"mean_acc": 0.7625}}]
    with CONSOLE.capture() as captured:
        rec.print_table()
    text = captured.get()
    assert "0-shot final" in text and "0.8000" in text and "0.7500" in text and "0.7625" in text
    rec.dense.pop("zeroshot")
    with CONSOLE.capture() as captured:
        rec.print_table()
    assert "0-shot" not in captured.get()  # no tasks, no columns
