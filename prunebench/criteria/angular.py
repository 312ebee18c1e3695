"""Gromov, Tirumala, Shapourian, Glorioso & Roberts 2024 ("The unreasonable ineffectiveness of
the deeper layers"): to remove n blocks, find the start l whose input x^l is closest in angle to
the input of block l+n, d(l, n) = arccos(cos(x^l_T, x^(l+n)_T)) / π at each window's last token T,
averaged over the calibration windows; blocks l..l+n−1 go together. x^L is the last block's
output (before the final norm).
"""

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from . import DepthCriterion, register


@register("angular")
class Angular(DepthCriterion):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.last_tokens: Dict[int, Tensor] = {}  # boundary l -> (windows, hidden) in float32, on the CPU

    def observe(self, index: int, inputs: List[Tensor], outputs: List[Tensor]) -> None:
        self.last_tokens[index] = torch.cat([x[:, -1].float().cpu() for x in inputs])
        self.last_tokens[index + 1] = torch.cat([x[:, -1].float().cpu() for x in outputs])

    def distances(self, n: int, blocks: int) -> Tensor:
        """d(l, n) for l = 0 .. blocks − n."""
        out = []
        for start in range(blocks - n + 1):
            cos = F.cosine_similarity(self.last_tokens[start].double(), self.last_tokens[start + n].double(), dim=-1)
            out.append(torch.arccos(cos.clamp(-1.0, 1.0)).mean() / torch.pi)
        return torch.stack(out)

    def blocks_to_remove(self, n: int, blocks: int) -> List[int]:
        start = int(torch.argmin(self.distances(n, blocks)))
        return list(range(start, start + n))
