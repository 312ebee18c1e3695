"""Rewind the survivors to θ0, or to the weights after epoch k of pretraining (Frankle & Carbin
2019; Frankle et al. 2020)."""

from dataclasses import dataclass

from ..config import RetrainConfig, check
from . import register


@dataclass
class RewindConfig(RetrainConfig):
    # reset survivors to the weights after this many pretraining epochs (0 = θ0)
    rewind_epoch: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.rewind_epoch >= 0, f"retrain.rewind_epoch must be >= 0, got {self.rewind_epoch}")

    def keeps_epoch(self) -> int:
        return self.rewind_epoch

    def check_with(self, cfg) -> None:
        check(self.rewind_epoch <= cfg.train.pretrain_epochs,
              f"retrain.rewind_epoch={self.rewind_epoch} is beyond the pretraining "
              f"(train.pretrain_epochs={cfg.train.pretrain_epochs}); use 0..{cfg.train.pretrain_epochs}")


@register("rewind", RewindConfig)
def rewind(model, masks, cfg, *, init_state, rewind_state, fresh_model) -> None:
    """Reset every parameter and buffer to the rewind point."""
    model.load_state_dict(rewind_state)
