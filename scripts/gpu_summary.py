"""One line of figures from a run's summary.json, and whether the check passed (scripts/gpu_check.sh).

    python scripts/gpu_summary.py KIND RUN_DIR [--ref RUN_DIR] [--sparsity S] [--processes N]

KIND: image (test accuracy and sparsity), sparse (the unstructured run's sparse latency on its
device), lm (dense and pruned perplexity; with --ref, against that run's), structured (lm, and
the removal's check, the checkpoint and the speedups), moe (lm, and every expert's sparsity),
experts (lm, and the experts removed with the removal's check), finetune (the perplexity before
and after fine-tuning; with --ref, the drop against that run's). Prints the
figures; the exit status is 0 when the run passed, 1 when it did not (the line says why), 2 when
there is no summary to read (a reference without one is left out, and the line says so).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional, Tuple

LM_REL_TOLERANCE = 0.10  # a half-precision run's pruned perplexity within 10% of the fp32 run's
FINETUNE_SHARE = 0.5  # fine-tuning in bf16 lowers the perplexity by at least half of what fp32 does


def load(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def common(s: dict, sparsity: Optional[float], processes: Optional[int]) -> List[str]:
    """Why the run did not pass, from what every run records."""
    problems = []
    if s.get("status") != "completed":
        problems.append(f"status {s.get('status')}")
    final = s.get("final") or {}
    if sparsity is not None and not abs(final.get("sparsity", -1) - sparsity) < 1e-3:
        problems.append(f"sparsity {final.get('sparsity')} instead of {sparsity}")
    if processes is not None and s.get("processes") != processes:
        problems.append(f"{s.get('processes')} process(es) instead of {processes}")
    return problems


def image(s: dict) -> Tuple[str, List[str]]:
    f = s["final"]
    return (f"test acc {f['test_acc']:.4f} (dense {s['dense_test_acc']:.4f}), sparsity {f['sparsity']:.4f}, "
            f"{s['seconds_total']:.0f} s on {s['device']}"), []


def sparse(s: dict) -> Tuple[str, List[str]]:
    lat = (s["final"] or {}).get("sparse_latency")
    if not lat:
        return "no sparse_latency in the final round", ["sparse latency missing"]
    parts = []
    for key in sorted(lat, key=lambda k: int(k.split("_")[-1])):
        b = lat[key]
        layers = ",".join(b["sparse_layers"]) or "none"
        parts.append(f"b{key.split('_')[-1]}: {b['dense_ms']:.3f}->{b['sparse_ms']:.3f} ms ({b['speedup']:.2f}x, "
                     f"sparse: {layers})")
    return f"{'; '.join(parts)}; {s['device']}", []


def lm(s: dict, ref: Optional[dict]) -> Tuple[str, List[str]]:
    f = s["final"]
    pruned, dense = f["test_ppl_pruned"], s["dense_test_ppl"]
    text = f"ppl dense {dense:.3f} -> pruned {pruned:.3f}, {s.get('dtype')} on {s['device']}"
    problems = [] if math.isfinite(pruned) and math.isfinite(dense) else ["perplexity not finite"]
    if ref is not None and not problems:
        r = ref["final"]["test_ppl_pruned"]
        text += f" (fp32 on {ref['device']}: {r:.3f}, {pruned / r - 1:+.1%})"
        if abs(pruned / r - 1) > LM_REL_TOLERANCE:
            problems.append(f"pruned perplexity {pruned / r - 1:+.1%} off the fp32 run's")
    return text, problems


def structured(s: dict, ref: Optional[dict]) -> Tuple[str, List[str]]:
    """Heads and channels removed: the perplexity (against the fp32 run's), the removal's check,
    the checkpoint's layout and the measured speedups."""
    text, problems = lm(s, ref)
    f = s["final"]
    speed = f.get("speedup") or {}
    ratios = ", ".join(f"{k}: prefill {v['prefill_speedup']:.2f}x decode {v['decode_speedup']:.2f}x"
                       for k, v in speed.items() if k.startswith("batch_"))
    text += (f"; {f['sparsity']:.3f} of block weights, max |dlogit| {f['check_max_abs_difference']:.2g}, "
             f"{s['structure']['layout']} checkpoint, params {speed.get('params_ratio', float('nan')):.2f}x, {ratios}")
    return text, problems


def moe(s: dict, ref: Optional[dict]) -> Tuple[str, List[str]]:
    """A mixture of experts pruned weight by weight: every expert's matrices at the run's sparsity."""
    text, problems = lm(s, ref)
    f = s["final"]
    each = [v for fused in f["expert_sparsity"].values() for v in fused]
    text += (f"; {len(each)} expert matrices at sparsity {min(each):.3f}-{max(each):.3f}, "
             f"{len(f.get('uncalibrated_experts', []))} uncalibrated")
    if any(abs(v - f["sparsity"]) > 0.02 for v in each):
        problems.append("an expert's sparsity is off the run's")
    return text, problems


def experts(s: dict, ref: Optional[dict]) -> Tuple[str, List[str]]:
    """Whole experts removed: the perplexity, the experts removed, the removal's check."""
    text, problems = lm(s, ref)
    f = s["final"]
    removed = f["experts_removed"]
    text += (f"; {f['units_removed']:.2f} of the experts removed (block 0: {removed[min(removed, key=int)]}), "
             f"max |dlogit| {f['check_max_abs_difference']:.2g}")
    if ref is not None and ref["final"]["experts_removed"] != removed:
        text += " (other experts than fp32's)"
    return text, problems


def finetune(s: dict, ref: Optional[dict]) -> Tuple[str, List[str]]:
    f = s["final"]
    drop = f["test_ppl_pruned"] - f["test_ppl"]
    text = f"ppl pruned {f['test_ppl_pruned']:.3f} -> fine-tuned {f['test_ppl']:.3f}, {s.get('dtype')} on {s['device']}"
    problems = [] if math.isfinite(f["test_ppl"]) and drop > 0 else ["fine-tuning did not lower the perplexity"]
    if ref is not None:
        rf = ref["final"]
        ref_drop = rf["test_ppl_pruned"] - rf["test_ppl"]
        text += f" (fp32 on {ref['device']}: {rf['test_ppl_pruned']:.3f} -> {rf['test_ppl']:.3f})"
        if ref_drop > 0 and not drop >= FINETUNE_SHARE * ref_drop:
            problems.append(f"it lowered the perplexity by {drop:.3f}, under {FINETUNE_SHARE:.0%} of fp32's "
                            f"{ref_drop:.3f}")
    return text, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["image", "sparse", "lm", "structured", "moe", "experts", "finetune"])
    parser.add_argument("run_dir")
    parser.add_argument("--ref", help="a reference run's directory (lm, finetune)")
    parser.add_argument("--sparsity", type=float)
    parser.add_argument("--processes", type=int)
    args = parser.parse_args()
    try:
        s = load(args.run_dir)
    except (OSError, ValueError) as e:
        print(f"no summary to read ({e})")
        return 2
    ref, no_ref = None, ""
    if args.ref:
        try:
            ref = load(args.ref)
        except (OSError, ValueError):  # the reference run failed: its own row says so
            no_ref = " (no reference run to compare with)"
    try:
        if args.kind in ("lm", "structured", "moe", "experts", "finetune"):
            text, problems = {"lm": lm, "structured": structured, "moe": moe, "experts": experts,
                              "finetune": finetune}[args.kind](s, ref)
        else:
            text, problems = (image if args.kind == "image" else sparse)(s)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        print(f"summary.json lacks what this check reads ({type(e).__name__}: {e})")
        return 1
    if args.processes:
        text += f", {s.get('processes')} processes"
    problems = common(s, args.sparsity, args.processes) + problems
    print(text + no_ref + (f"; {'; '.join(problems)}" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
