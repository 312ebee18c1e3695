"""Measured speed of a LLaMA-architecture model with grouped-query attention (--arch mixtral: a
mixture of experts), dense against physically smaller versions of it (prunebench.lm.speed), on
random weights (speed does not depend on what the weights are):

    python scripts/bench_lm_speed.py --threads 1 --repeats 5 --out lm_speed.json
    python scripts/bench_lm_speed.py --device cuda --batch-sizes 1 8 32 --prompt-tokens 512

The variants remove 20%, 35% and 50% of the blocks' parameters by width (query heads inside each
KV group, or whole KV groups with their query heads, and MLP channels: the heads' share is the
nearest one GQA allows, the channels make up the rest) and 1 or 2 blocks by depth. They are cut
from the dense model with prunebench.lm.structure where that module exists; where it does not,
they are built from smaller transformers configs of the same architecture (fewer heads and KV
heads with the same explicit head_dim, a smaller intermediate_size, fewer layers), which gives
the same shapes and so the same timing (--from-configs asks for those anyway). The dense model
is timed twice in every round, first and last: the "speedup" of the second against the first is
the noise floor of this machine. Each of the --repeats rounds times every model once, and each
model's result is its median over the rounds.

--arch mixtral times a mixture of experts instead (MIXTRAL: 8 routed experts, top-2, GQA), and
--arch deepseek_v3 a DeepSeek-V3 (DEEPSEEK_V3: latent attention, a dense first block, a shared
expert and 16 routed experts in 4 groups, top-4 from the best 2 groups), against copies with 25%
and 50% of every MoE block's experts removed by prunebench's own expert removal
(prunebench.lm.experts, as granularity=experts does it: router rows and correction biases, expert
slices, the expert counts, as many from every group of a grouped router; each copy checked against
the dense model with a router that never chooses those experts). Which experts go is a seeded draw
per block. Every token still goes to top-k experts, so the
arithmetic per token stays the same: what removal can save is the per-expert work of the experts
implementation (transformers' `experts_implementation`, --experts-implementation) and weight
memory, which is what this measures:

    python scripts/bench_lm_speed.py --arch mixtral --threads 2 --repeats 5
    python scripts/bench_lm_speed.py --arch deepseek_v3 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from prunebench.lm import experts, hub, moe, speed

try:  # written at the same time as this script; without it, variants come from smaller configs
    from prunebench.lm import structure
except ImportError:
    structure = None

DENSE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             intermediate_size=1536, num_hidden_layers=8, vocab_size=2000, max_position_embeddings=1024)
MIXTRAL = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
               intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=8,
               vocab_size=2000, max_position_embeddings=1024)
DEEPSEEK_V3 = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=128,
                   qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, intermediate_size=1536,
                   moe_intermediate_size=512, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                   n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, num_hidden_layers=8,
                   vocab_size=2000, max_position_embeddings=1024)
EXPERTS_REMOVED = (0.25, 0.5)  # fractions of every MoE block's experts (--arch mixtral, deepseek_v3)


@dataclass
class Shape:
    """What a variant keeps: KV groups, query heads per group, MLP channels, blocks."""
    kv_heads: int
    heads_per_group: int
    channels: int
    layers: int


def block_params(shape: Shape, hidden: int, head_dim: int) -> int:
    """Weights of one block's linear layers (q, k, v, o; gate, up, down)."""
    attention = hidden * head_dim * shape.kv_heads * (2 * shape.heads_per_group + 2)
    return attention + 3 * hidden * shape.channels


def width_shape(removed: float) -> Shape:
    """The shape that keeps (1 - removed) of the block parameters: the attention keeps the GQA
    shape (whole groups, the same number of query heads in each) nearest that share of its own
    parameters, and MLP channels (a multiple of 8) make up the rest."""
    hidden, head_dim = DENSE["hidden_size"], DENSE["head_dim"]
    groups, per_group = DENSE["num_key_value_heads"], DENSE["num_attention_heads"] // DENSE["num_key_value_heads"]
    full = Shape(groups, per_group, DENSE["intermediate_size"], DENSE["num_hidden_layers"])
    target = (1 - removed) * block_params(full, hidden, head_dim)
    attention_target = (1 - removed) * block_params(Shape(groups, per_group, 0, 0), hidden, head_dim)
    options = [Shape(g, r, 0, full.layers) for g in range(1, groups + 1) for r in range(1, per_group + 1)]
    best = min(options, key=lambda s: abs(block_params(s, hidden, head_dim) - attention_target))
    channels = round((target - block_params(best, hidden, head_dim)) / (3 * hidden) / 8) * 8
    return Shape(best.kv_heads, best.heads_per_group, channels, full.layers)


def dense_model(dtype: torch.dtype, seed: int = 0):
    return model_of(Shape(DENSE["num_key_value_heads"], DENSE["num_attention_heads"] // DENSE["num_key_value_heads"],
                          DENSE["intermediate_size"], DENSE["num_hidden_layers"]), dtype, seed)


def model_of(shape: Shape, dtype: torch.dtype, seed: int = 0):
    """A seeded random-init LLaMA of `shape` (head_dim explicit: fewer heads must not widen them)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**DENSE, "intermediate_size": shape.channels, "num_hidden_layers": shape.layers},
                         tie_word_embeddings=False)
    # set after validation, which wants hidden_size divisible by the heads even with head_dim given
    config.num_attention_heads = shape.kv_heads * shape.heads_per_group
    config.num_key_value_heads = shape.kv_heads
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def cut(dense, shape: Shape, drop: List[int]):
    """A copy of `dense` made physically smaller with prunebench.lm.structure: in every block the
    first `heads_per_group` query heads of the first `kv_heads` groups and the first `channels`
    MLP channels (which ones does not change the timing), then without the blocks in `drop`."""
    model = copy.deepcopy(dense)
    for block in structure.layout(model):
        attention, mlp = block.attention, block.mlp
        per_group = attention.heads // attention.kv_heads
        keep = torch.tensor([h // per_group < shape.kv_heads and h % per_group < shape.heads_per_group
                             for h in range(attention.heads)])
        if not keep.all():
            structure.keep_heads(block, keep)
        if shape.channels < mlp.channels:
            structure.keep_channels(block, torch.arange(mlp.channels) < shape.channels)
    if drop:
        structure.remove_blocks(model, drop)
    return model


def variants(dense_shape: Shape) -> List[Tuple[str, Shape, List[int]]]:
    """(name, shape, dropped blocks): width pruning of 20/35/50% of the block parameters, depth of 1 and 2
    blocks (late ones, which depth-pruning criteria usually pick; which ones does not change the timing)."""
    rows = [(f"width -{round(100 * f)}%", width_shape(f), []) for f in (0.2, 0.35, 0.5)]
    last = dense_shape.layers - 1
    for n in (1, 2):
        drop = list(range(last - n, last))
        rows.append((f"depth -{n} block{'s' * (n > 1)}",
                     Shape(dense_shape.kv_heads, dense_shape.heads_per_group, dense_shape.channels,
                           dense_shape.layers - n), drop))
    return rows


def describe(shape: Shape) -> str:
    return f"{shape.kv_heads} KV x {shape.heads_per_group} q, {shape.channels} ch, {shape.layers} blocks"


def llama_plan(args, dtype: torch.dtype) -> Tuple[str, List[Tuple[str, str, object]]]:
    """(where the variants come from, [(name, shape, model)]): the dense LLaMA, then its width and depth cuts."""
    dense = dense_model(dtype)
    dense_shape = Shape(DENSE["num_key_value_heads"], DENSE["num_attention_heads"] // DENSE["num_key_value_heads"],
                        DENSE["intermediate_size"], DENSE["num_hidden_layers"])
    cutting = structure is not None and not args.from_configs
    source = "prunebench.lm.structure" if cutting else "smaller transformers configs"
    plan = [("dense", describe(dense_shape), dense)]
    plan += [(name, describe(shape), cut(dense, shape, drop) if cutting else model_of(shape, dtype))
             for name, shape, drop in variants(dense_shape)]
    return source, plan


def moe_model(arch: str, dtype: torch.dtype, implementation: Optional[str], seed: int = 0):
    """A seeded random-init MoE of MIXTRAL's or DEEPSEEK_V3's shape (experts_implementation None:
    transformers' default)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, MixtralConfig

    config = (MixtralConfig(**MIXTRAL, tie_word_embeddings=False) if arch == "mixtral"
              else DeepseekV3Config(**DEEPSEEK_V3, tie_word_embeddings=False))
    torch.manual_seed(seed)
    chosen = {} if implementation is None else {"experts_implementation": implementation}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **chosen).eval()
    for stack in moe.expert_stacks(model):  # a trained router's correction biases are not all zero
        if hasattr(stack.router, "e_score_correction_bias"):
            stack.router.e_score_correction_bias.normal_(0, 0.01)
    return model


def without_experts(dense, removed: float, seed: int = 0) -> Tuple[object, float]:
    """A copy of `dense` without round(removed * experts) experts of every MoE block (a seeded draw per
    block, as many from every group of a grouped router), removed by prunebench.lm.experts; and the
    largest |logit difference| its check found against the dense model whose router never chooses them."""
    model = copy.deepcopy(dense)
    stacks = moe.expert_stacks(model)
    generator = torch.Generator().manual_seed(seed)
    kept = {}
    for stack in stacks:
        groups = moe.routing_groups(stack.router)
        stay = stack.count - experts.experts_to_remove(removed, stack.count, stack.top_k, groups)
        kept[stack.block] = experts.best(torch.rand(stack.count, generator=generator), stay, groups[0] if groups else 1)
    difference = experts.remove_checked(model, stacks, kept, None, torch.device("cpu"))
    return model, difference


def describe_moe(model) -> str:
    count, config = moe.expert_count(model.config), model.config
    return f"{count} experts, top-{config.num_experts_per_tok}, {config.num_hidden_layers} blocks"


def moe_plan(args, dtype: torch.dtype) -> Tuple[str, List[Tuple[str, str, object]]]:
    """(where the variants come from, [(name, shape, model)]): the dense MoE, then it without
    EXPERTS_REMOVED of its experts."""
    dense = moe_model(args.arch, dtype, args.experts_implementation)
    plan = [("dense", describe_moe(dense), dense)]
    for removed in EXPERTS_REMOVED:
        model, difference = without_experts(dense, removed)
        name = f"experts -{round(100 * removed)}%"
        print(f"{name}: {describe_moe(model)}, largest |logit difference| against masked routing {difference:.2e}",
              flush=True)
        plan.append((name, describe_moe(model), model))
    return f"prunebench.lm.experts (experts_implementation {dense.config._experts_implementation})", plan


def table(rows: List[Dict], batch_sizes: List[int]) -> str:
    """One line per variant: parameters (dense / variant), tokens/s and speedups at each batch size."""
    head = f"{'variant':<16} {'shape':<30} {'params':>15}"
    for b in batch_sizes:
        head += f" {f'prefill b{b} tok/s':>18} {f'decode b{b} tok/s':>17}"
    lines = [head, "-" * len(head)]
    for row in rows:
        m, c = row["measurement"], row["compare"]
        line = f"{row['variant']:<16} {row['shape']:<30} {m['params'] / 1e6:>6.2f}M ({c['params_ratio']:.2f}x)"
        for b in batch_sizes:
            r, s = m[f"batch_{b}"], c[f"batch_{b}"]
            line += (f" {r['prefill_tokens_per_s']:>10.0f} ({s['prefill_speedup']:.2f}x)"
                     f" {r['decode_tokens_per_s']:>9.0f} ({s['decode_speedup']:.2f}x)")
        lines.append(line)
    return "\n".join(lines)


def median_of(runs: List[Dict]) -> Dict:
    """One measurement from several single-repeat ones of the same model: median seconds per batch size."""
    out = {**runs[0], "repeats": len(runs)}
    for key in (k for k in runs[0] if k.startswith("batch_")):
        rows = [run[key] for run in runs]
        row = {**rows[-1], **{f"{phase}_seconds": statistics.median(r[f"{phase}_seconds"] for r in rows)
                              for phase in ("prefill", "decode")}}
        batch = int(key.split("_")[1])
        row["prefill_tokens_per_s"] = batch * out["prompt_tokens"] / row["prefill_seconds"]
        row["decode_tokens_per_s"] = batch * out["new_tokens"] / row["decode_seconds"]
        out[key] = row
    return out


def measure_in_rounds(models: List[Tuple[str, object]], device: torch.device, rounds: int, **settings) -> List[Dict]:
    """Each round times every model once, so a machine's load changing during the run (other jobs)
    falls on all of them alike rather than on whichever was being timed then."""
    runs: Dict[str, List[Dict]] = {name: [] for name, _ in models}
    for r in range(rounds):
        for name, model in models:
            runs[name].append(speed.measure(model, device, repeats=1, warmup=1 if r == 0 else 0, **settings))
        print(f"  round {r + 1} of {rounds}", flush=True)
    return [median_of(runs[name]) for name, _ in models]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["llama", "mixtral", "deepseek_v3"], default="llama",
                        help="llama: width and depth cuts of a GQA LLaMA | "
                             "mixtral, deepseek_v3: experts removed from a mixture of experts")
    parser.add_argument("--experts-implementation", default=None,
                        help="MoE archs: transformers' experts_implementation (eager, grouped_mm, batched_mm; "
                             "default: transformers' choice)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(hub.DTYPES), default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each timing every model once")
    parser.add_argument("--out", default=None, help="a JSON file for the measurements and comparisons")
    parser.add_argument("--from-configs", action="store_true",
                        help="build the variants from smaller configs even where prunebench.lm.structure exists")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), hub.DTYPES[args.dtype]
    source, plan = (llama_plan if args.arch == "llama" else moe_plan)(args, dtype)
    print(f"device {device} ({speed.device_name(device)}), {torch.get_num_threads()} threads, {args.dtype}; "
          f"variants from {source}", flush=True)
    plan.append(("dense (again)", *plan[0][1:]))  # the same model timed twice a round: the noise floor
    measured = measure_in_rounds([(name, model) for name, _, model in plan], device, args.repeats,
                                 prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                 batch_sizes=tuple(args.batch_sizes))
    rows = [{"variant": name, "shape": shape, "measurement": m, "compare": speed.compare(measured[0], m)}
            for (name, shape, _), m in zip(plan, measured)]
    print(table(rows, args.batch_sizes))
    drift = max(abs(math.log(v)) for key, row in rows[-1]["compare"].items() if key.startswith("batch_")
                for name, v in row.items() if name.endswith("speedup"))
    if drift > math.log(1.1):  # the same model timed twice: other loads on this machine
        print(f"warning: the dense model re-measured moved by up to {math.exp(drift):.2f}x; speedups this close "
              "to 1 are noise (a busy machine? fewer --threads than free cores, or more --repeats)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"arch": args.arch, "source": source, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
