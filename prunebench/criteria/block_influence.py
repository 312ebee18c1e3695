"""ShortGPT's Block Influence (Men et al. 2024, "ShortGPT: layers in large language models are
more redundant than you expect"): BI_i = 1 − E[cos(x_i,t, x_i+1,t)], the cosine between what
enters block i and what leaves it, averaged over every calibration token t; the blocks that change
their input least (lowest BI) are removed. The last block's output is taken before the final norm
(the authors' code reads transformers' hidden_states, whose last entry is after it).
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from . import DepthCriterion, register


@register("block_influence")
class BlockInfluence(DepthCriterion):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.influence: dict = {}

    def observe(self, index: int, inputs: List[Tensor], outputs: List[Tensor]) -> None:
        total, tokens = 0.0, 0
        for x_in, x_out in zip(inputs, outputs):
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            total += float((1 - cos).sum())
            tokens += cos.numel()
        self.influence[index] = total / tokens

    def blocks_to_remove(self, n: int, blocks: int) -> List[int]:
        scores = torch.tensor([self.influence[i] for i in range(blocks)], dtype=torch.float64)
        return sorted(torch.argsort(scores, stable=True)[:n].tolist())
