"""train.ema_decay: an exponential moving average of the trainable weights, the model that is evaluated and saved."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..captioner import FrozenPrefixCaptioner


class WeightAverage:
    """An fp32 copy of the captioner's trainable_state_dict() (parameters and buffers), moved towards the live one."""

    def __init__(self, model: FrozenPrefixCaptioner, decay: float) -> None:
        self.decay = decay
        self.average: dict[str, torch.Tensor] = {}
        self.reset(model)

    def reset(self, model: FrozenPrefixCaptioner) -> None:
        """Start the average from the model's weights as they are now."""
        # fp32 whatever the weights' dtype: in bf16, (1 - decay) x a small update would round away to nothing
        self.average = {
            key: value.to(torch.float32, copy=True) if value.is_floating_point() else value.clone()
            for key, value in model.trainable_state_dict().items()
        }

    def decay_at(self, step: int) -> float:
        """The decay after optimizer step `step` (1-based): TF's warmup, so early averages are not the random init."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: FrozenPrefixCaptioner, step: int) -> None:
        """average = d * average + (1 - d) * weights, after an applied optimizer step; integer buffers copied."""
        d = self.decay_at(step)
        for key, value in model.trainable_state_dict().items():
            average = self.average[key]
            if average.is_floating_point():
                average.lerp_(value.to(torch.float32), 1 - d)
            else:  # counters such as BatchNorm's num_batches_tracked: an average of them means nothing
                average.copy_(value)

    def copy_to(self, model: FrozenPrefixCaptioner) -> None:
        """Load the average into the model for good (the end of training: what is saved and evaluated)."""
        model.load_trainable_state_dict(self.average)

    @contextlib.contextmanager
    def swapped_in(self, model: FrozenPrefixCaptioner) -> Iterator[None]:
        """The average in the model while the block runs (validation, evaluation); the live weights back after."""
        live = {key: value.clone() for key, value in model.trainable_state_dict().items()}
        self.copy_to(model)
        try:
            yield
        finally:
            model.load_trainable_state_dict(live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors, keyed like trainable_state_dict(): what a checkpoint stores (safetensors)."""
        return self.average

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take a checkpoint's average (its keys and shapes checked by the caller), bit for bit."""
        for key, average in self.average.items():
            average.copy_(state[key])


@contextlib.contextmanager
def averaged(ema: WeightAverage | None, model: FrozenPrefixCaptioner) -> Iterator[None]:
    """The average swapped in when there is one (train.ema_decay > 0); the model as it is otherwise."""
    if ema is None:
        yield
        return
    with ema.swapped_in(model):
        yield
