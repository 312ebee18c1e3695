"""How long `prunebench` takes to answer: --help, wrong options, and the default run's start.

Each command runs in a fresh interpreter, as a user's would (median of --repeats). The baseline,
measured in the same run, is a bare `python -c "import torch"`: what a command costs at least
when it imports torch before answering. "to first step" is the default run (Fashion-MNIST when
installed) from launch until its first training phase starts (train.fit is entered).

    python scripts/bench_cli.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

# stops the run when its first training phase begins, and prints the time since launch
FIRST_STEP_PROBE = r"""
import importlib.abc, importlib.util, os, sys, time
T0 = float(os.environ["BENCH_T0"])

class StopAtFit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "prunebench.training.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            def fit(*args, **kwargs):
                print(f"FIRST_STEP {time.time() - T0:.4f}", file=sys.stderr, flush=True)
                os._exit(0)
            module.fit = fit
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, StopAtFit())
sys.argv = ["prunebench", *sys.argv[1:]]
from prunebench.cli import main
main()
"""


def seconds(argv, env=None) -> float:
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {}), "BENCH_T0": str(t0)})
    elapsed = time.time() - t0
    for line in proc.stderr.splitlines():
        if line.startswith("FIRST_STEP "):
            return float(line.split()[1])
    if proc.returncode not in (0, 2):
        raise SystemExit(f"{argv} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    py = sys.executable
    out = tempfile.mkdtemp()
    cli = [py, "-c", "import sys; sys.argv[0] = 'prunebench'; from prunebench.cli import main; main()"]
    cases = {
        "import torch (baseline)": [py, "-c", "import torch"],
        "--help": [*cli, "--help"],
        "criterion=snipp": [*cli, "criterion=snipp"],
        "sparsity=1.5": [*cli, "sparsity=1.5"],
        "criterion=obd criterion.samples=0": [*cli, "criterion=obd", "criterion.samples=0"],
        "default run, to first step": [py, "-c", FIRST_STEP_PROBE, f"hydra.run.dir={out}/run"],
    }
    times = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits every case alike
        for name, argv in cases.items():
            times[name].append(seconds(argv))
    base = statistics.median(times["import torch (baseline)"])
    print(f"median of {args.repeats} runs, each in a fresh interpreter")
    for name, t in times.items():
        print(f"  {name:<36} {statistics.median(t):6.3f} s   / import torch {statistics.median(t) / base:5.2f}")


if __name__ == "__main__":
    main()
