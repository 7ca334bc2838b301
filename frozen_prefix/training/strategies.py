"""Data-parallel training over the trainable modules (DDP), and FSDP2 sharding of the frozen LM (and the encoder).

The frozen LM is never a trainable anywhere here: DDP wraps a module that holds only the encoder and the
projection, so the LM is neither broadcast nor synchronised; FSDP2 shards the LM's decoder layers to save memory
(it all-gathers their weights for each use, but they have no gradients to reduce). One process without a
process group gets `Parallel(model)`, which calls the model as it is.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
from torch import nn

from ..captioner import FrozenPrefixCaptioner
from ..config import Config
from ..errors import FrozenPrefixError
from ..models.lm import decoder_layers, load_lm, requested_dtype
from ..parallel.distributed import Dist
from ..parallel.sharding import full_optimizer_state, full_state, is_fsdp, is_sharded

log = logging.getLogger(__name__)


class TrainableCore(nn.Module):
    """The trainable modules (encoder, projection, ...) as one module whose forward runs the whole captioner.

    The captioner is a plain attribute, not a submodule, so DDP never sees the LM: it is not broadcast at the
    start, gets no gradient hooks and is never all-reduced. Backward still flows through the LM's activations.
    """

    def __init__(self, model: FrozenPrefixCaptioner) -> None:
        super().__init__()
        for name, module in model.trainable_modules().items():  # with model.lm_trainable the LM too, then synced
            self.add_module(name, module)
        self.__dict__["captioner"] = model  # not registered: see the class docstring

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        """The captioner's forward (loss and logits)."""
        return self.__dict__["captioner"](**inputs)


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks (the items of its Sequential/ModuleList children: ViT blocks, ResNet/ConvNeXt stages).

    Only modules that are called (module(x)) can be sharded: timm's forward_features calls its blocks, but the
    captioner calls forward_features itself, so the encoder's own parameters stay with the root.
    """
    blocks = []
    for child in encoder.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            blocks += [m for m in child if any(True for _ in m.parameters())]
    return blocks


def build_model(config: Config, ctx: Dist) -> FrozenPrefixCaptioner:
    """The captioner; with FSDP on CUDA the LM is loaded on the CPU first, and only its shards go to the GPU."""
    tc, mc = config.train, config.model
    if tc.fsdp == "none" or not ctx.active or ctx.device.type != "cuda":
        return FrozenPrefixCaptioner(config, device=ctx.device)
    # Loading an LM that does not fit on one GPU straight onto it would fail before sharding could help; its "auto"
    # dtype and attention are what suits the GPU it will run on, not the CPU it is loaded on.
    dtype = requested_dtype(mc.lm_dtype, mc.lm_trainable)
    lm, tokenizer = load_lm(mc.lm, dtype, "cpu", mc.trust_remote_code, mc.lm_attention, target=ctx.device)
    return FrozenPrefixCaptioner(config, lm=lm, tokenizer=tokenizer, device="cpu")


def prepare(model: FrozenPrefixCaptioner, config: Config, ctx: Dist) -> None:
    """SyncBatchNorm and FSDP2 sharding, in place: before an optimizer or a checkpoint reads the parameters."""
    tc = config.train
    if not ctx.active:
        if tc.fsdp != "none" or tc.sync_batchnorm:
            log.warning("train.fsdp / train.sync_batchnorm apply under torchrun only; one process runs without them")
        return
    if tc.sync_batchnorm:
        if ctx.device.type != "cuda":
            raise FrozenPrefixError(
                "train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on the CPU); "
                "set it to false"
            )
        model.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder)
        model.projection = nn.SyncBatchNorm.convert_sync_batchnorm(model.projection)
    if tc.fsdp == "all" and tc.precision == "fp16":
        raise FrozenPrefixError("train.precision=fp16 does not work with train.fsdp=all; use bf16 (the CUDA default)")
    if tc.fsdp != "none":
        shard(model, tc.fsdp, ctx)


def shard(model: FrozenPrefixCaptioner, mode: str, ctx: Dist) -> None:
    """FSDP2: each LM decoder layer (and with mode 'all' each encoder block) its own group, then the root.

    The LM's other weights (embeddings, final norm, head: often tied, used outside its forward) stay whole on
    every device, frozen; with mode 'lm' the trainable modules stay whole too and DDP keeps them in step.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    groups = list(decoder_layers(model.lm)) + (encoder_blocks(model.encoder) if mode == "all" else [])
    inside = {id(t) for m in groups for t in chain(m.parameters(), m.buffers())}
    with torch.no_grad():  # everything else moves now; fully_shard moves each group's shards itself
        for tensor in chain(model.parameters(), model.buffers()):
            if id(tensor) not in inside:
                tensor.data = tensor.data.to(ctx.device)
    for module in groups:
        fully_shard(module, mesh=mesh)
    ignored = {p for p in model.lm.parameters() if not is_sharded(p)}
    if mode == "lm":
        ignored |= set(model.trainable_parameters())
    # The root, too, goes back to its shards after every forward (FSDP keeps a root whole by default): a forward
    # without a backward (the dry run, the validation loss) would otherwise leave whole tensors registered where
    # the optimizer and the checkpoints expect the shards.
    fully_shard(model, mesh=mesh, ignored_params=ignored, reshard_after_forward=True)
    # HF generate reads this marker (fully_shard's own) to keep every rank stepping while any rank still decodes.
    model.lm._is_fsdp_managed_module = True
    log.info("FSDP2 (%s): %d groups over %d processes", mode, len(groups) + 1, ctx.world)


@torch.no_grad()
def _zero_grads(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def unused_parameters(model: FrozenPrefixCaptioner, inputs: dict[str, Any]) -> list[str]:
    """Names of trainable parameters that get no gradient (e.g. a timm head's norm when the feature map is used).

    DDP would wait for their gradients forever; they never change in one process either, so DDP ignores them.
    Found with one forward and backward in eval mode: no normalisation statistics move, no randomness is drawn.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(**inputs)
        sum(v for k, v in out.items() if k.startswith("loss")).backward()  # every term reaches its parameters
        return [name for name, p in model.trainable_modules().named_parameters() if p.grad is None]
    finally:
        _zero_grads(model.trainable_parameters())
        model.train(was_training)


class Parallel:
    """How the loop calls the model: through DDP or FSDP when a process group is up, directly otherwise."""

    def __init__(self, model: FrozenPrefixCaptioner, ctx: Dist | None = None, ddp: nn.Module | None = None) -> None:
        self.model, self.ctx, self.ddp = model, ctx or Dist(), ddp

    def __call__(self, **inputs: Any) -> dict[str, torch.Tensor]:
        """A training forward pass (the gradients it leads to are averaged over ranks at the last micro-batch)."""
        return (self.ddp or self.model)(**inputs)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """Gradient accumulation: reduce gradients across ranks only in the last micro-batch's backward."""
        if self.ddp is not None and not last:
            with self.ddp.no_sync():
                yield
            return
        if is_fsdp(self.model) and any(is_sharded(p) for p in self.model.trainable_parameters()):
            self.model.set_requires_gradient_sync(last)
        yield

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the gradients' global norm (over all shards) and return it."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if is_sharded(norm) else norm)


def wrap(model: FrozenPrefixCaptioner, ctx: Dist, inputs: dict[str, Any] | None) -> Parallel:
    """DDP over the trainable modules (unless FSDP already shards them); `inputs` find parameters without gradients.

    Drop the returned object (and collect it) before the process group ends: see distributed.teardown.
    """
    if not ctx.active:
        return Parallel(model)
    if any(is_sharded(p) for p in model.trainable_parameters()):  # train.fsdp=all: FSDP reduces their gradients
        return Parallel(model, ctx)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    # A depthwise conv's (C, 1, k, k) weight has an ambiguous stride on its size-1 dim: DDP warns that the layouts
    # differ when they are the same.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    core = TrainableCore(model)
    unused = unused_parameters(model, inputs) if inputs is not None else []
    if unused:
        log.info("no gradient reaches %d trainable parameters (e.g. %s); DDP leaves them out", len(unused), unused[0])
        DDP._set_params_and_buffers_to_ignore_for_model(core, unused)
    # Under FSDP the sharded LM layers use the default group during backward; DDP's own group keeps the two apart.
    group = dist.new_group() if is_fsdp(model) else None
    ddp = DDP(
        core, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, process_group=group,
        find_unused_parameters=inputs is None,  # no example to look with (its records were bad): DDP looks each step
        gradient_as_bucket_view=True,  # the gradients live in the reduction buckets: no second copy
    )
    return Parallel(model, ctx, ddp)


def share_buffers(model: FrozenPrefixCaptioner) -> None:
    """Rank 0's normalisation statistics on every rank, before evaluating: the model rank 0 saves is the one judged.

    DDP sends rank 0's buffers at the start of each forward, but every rank then moves its own with its own batch.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in model.trainable_modules().buffers():
        dist.broadcast(buffer, src=0)


def checkpoint_state(
    model: FrozenPrefixCaptioner, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Whole trainable weights and optimizer state when they are sharded (every rank calls it); (None, None) if not."""
    if not any(is_sharded(p) for p in model.trainable_parameters()):
        return None, None
    weights = full_state(model.trainable_state_dict())
    return weights, (full_optimizer_state(optimizer) if optimizer is not None else None)
