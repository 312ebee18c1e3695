"""A round's row: the one place that says what every schedule and model kind records per round.

Every row has the same keys: the round and its target, the size figures counted in the weights
(zeros are what is pruned), the metric right after pruning (`<metric>_pruned`) and at the end of
the round, and what the round took; a schedule adds its own figures after those (an OBS update's
predicted loss, SET/RigL's mask updates, a compacted network's latency).

A new per-round figure is one line here (every schedule records it) or one `extra` where it is
measured (one schedule records it).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

from ..core.metrics import WeightStats
from ..core.select import Target

log = logging.getLogger("prunebench")


def round_row(r: int, target: Optional[Target], stats: WeightStats, pruned: Dict[str, float], final: Dict[str, float],
              score_seconds: Optional[float], train_seconds: float, flops: Optional[int], **extra) -> Dict:
    """Round r's row. `pruned` and `final`: the evaluation's figures right after pruning and at
    the end of the round ({"test_acc", "test_loss"} for classifiers, {"test_ppl", "test_loss"}
    for language models, plus "val_acc" where there is a validation split); `flops`: the dense
    network's MACs per example (None where not counted)."""
    return {"round": r, **target_fields(target),
            "sparsity": stats.sparsity, "compression": stats.compression, "params_remaining": stats.params_nonzero,
            "prunable_remaining": stats.prunable_nonzero, "flops": flops,
            "flops_remaining": stats.flops_remaining if flops is not None else None,
            **{f"{k}_pruned": v for k, v in pruned.items() if k.startswith("test_")},
            **final, "score_seconds": score_seconds, "train_seconds": train_seconds,
            "empty_layers": empty_layers(r, stats), **extra}


def accuracy(result) -> Dict[str, float]:
    """A classifier's evaluation (training.evaluate's EvalResult) as a row's figures."""
    return {"test_acc": result.accuracy, "test_loss": result.loss}


def target_fields(target: Optional[Target]) -> Dict:
    return {"target_sparsity": target if isinstance(target, float) else None,
            **({"target_stage_ratios": list(target)} if isinstance(target, tuple) else {}),
            **({"target_layer_sparsity": target} if isinstance(target, dict) else {})}


def empty_layers(r: int, stats: WeightStats) -> list:
    """The layers pruning left without a weight (warned: the network may compute a constant)."""
    empty = [s.layer for s in stats.layers if s.nonzero == 0]
    if empty:
        log.warning(f"round {r}: layers emptied by pruning: {', '.join(empty)} "
                    f"(set criterion.min_density to prevent it)")
    return empty
