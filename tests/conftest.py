import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# One kernel family on every x86 CPU: AVX-512 kernels sum in another order than AVX2 ones, and
# after a few epochs a loss differs in the 4th digit (tests/test_reference.py). Set before torch
# loads them (and inherited by the CLI subprocesses).
if platform.machine() in ("x86_64", "AMD64"):
    for var, isa in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
                     ("ONEDNN_MAX_CPU_ISA", "AVX2")):
        os.environ.setdefault(var, isa)

import pytest  # noqa: E402
import torch  # noqa: E402

import prunebench

# small and fast: synthetic data, few epochs
FAST = ["dataset=synthetic", "train.pretrain_epochs=1", "train.finetune_epochs=1",
        "train.eval_every_epoch=false", "latency.repeats=0"]


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)
    yield


def make_config(*overrides, fast=True):
    """The composed, validated Config, as the CLI would build it."""
    return prunebench.compose(*(FAST if fast else []), *overrides)


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """transformers and datasets offline (no hub here), with a cache of the test's own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory):
    """{arch: directory with model/ and corpus.txt}: a tiny LLaMA and OPT trained once per session
    (prunebench.lm.tiny), shared by the language-model test files."""
    import torch

    from prunebench.lm import tiny

    root = tmp_path_factory.mktemp("tiny_lm")
    out = {}
    for arch in ("llama", "opt"):
        torch.set_num_threads(2)
        tiny.build(root / arch, arch, sentences=3000, steps=150, width=32)
        out[arch] = root / arch
    return out


def tiny_lm_config(path, tmp_path, *extra):
    """A language-model run on the model and corpus that prunebench.lm.tiny built in `path`."""
    return make_config("model=hf_causal_lm", f"model.name={path / 'model'}", "dataset=text",
                       f"dataset.path={path / 'corpus.txt'}", f"data_dir={tmp_path / 'data'}", "latency.repeats=1",
                       *extra, fast=False)


def run_cli(*args, cwd=None, env=None):
    """`prunebench ARGS` in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    exe = Path(sys.executable).with_name("prunebench")
    # an environment where the package is importable but not installed (the GPU machine's) has no command
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "prunebench"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)


def refused_before_weights_load(monkeypatch, path, tmp_path, args, message):
    """A language-model run on the tiny LM in `path` with `args` is refused (ConfigError matching
    `message`) while it builds, before any weights load."""
    from prunebench.config import ConfigError
    from prunebench.lm import hub
    from prunebench.lm.recipe import build

    monkeypatch.setattr(hub, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(ConfigError, match=message):
        build(tiny_lm_config(path, tmp_path, *args))


def refused_in_one_line(path, tmp_path, args, message):
    """`prunebench` on the tiny LM in `path` with `args` exits non-zero with one line saying
    `message`, and writes no summary."""
    result = run_cli("model=hf_causal_lm", f"model.name={path / 'model'}", "dataset=text",
                     f"dataset.path={path / 'corpus.txt'}", *args, f"hydra.run.dir={tmp_path / 'run'}",
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "summary.json").exists()


def read_summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def without_timings(obj):
    """summary.json without wall-clock fields (they differ between identical runs): durations,
    latencies and speedups, and which layers ran sparse (chosen by timing)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items()
                if not any(t in k for t in ("seconds", "latency", "speedup", "tokens_per_s"))}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj
