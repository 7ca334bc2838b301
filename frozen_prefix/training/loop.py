"""fit: the training loop, on one screen. Its parts: setup.py builds the run, step.py makes each optimizer step,
validation.py measures, run_folder.py and checkpoint.py write; the strategy (one process, DDP, FSDP) is set up once."""

from __future__ import annotations

import signal
import time
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import cli
from ..captioner import FrozenPrefixCaptioner
from ..config import Config, load_config
from ..evaluation.captions import evaluate_and_write, format_metrics, split_source
from ..models.model_card import write_model_card
from ..parallel import distributed
from . import strategies
from .ema import averaged
from .plots import save_curves
from .setup import Run, build_run
from .signals import SignalGuard
from .step import TrainingStopped
from .validation import periodic_evaluation, validation_loss


def fit(config: Config | str | Path | dict, overrides: list[str] | None = None) -> FrozenPrefixCaptioner:
    """Train the encoder and projection against the frozen LM; return the trained captioner.

    Under torchrun this process is one rank of the group: it trains on its share of each global batch, and
    rank 0 alone writes the run folder. Without torchrun it is the whole run, exactly as it always was.
    """
    config = load_config(config, overrides)
    ctx = distributed.setup(cli.resolve_device(config.train.device, "train.device"))
    try:
        model = train(build_run(config, ctx))
    except BaseException as e:
        if ctx.active:
            # The DDP wrapper lives on in the frames the traceback keeps: free it before the group ends.
            traceback.clear_frames(e.__traceback__)
            # A signal or the non-finite guard stops every rank at the same step; after other errors the other
            # ranks may never reach a barrier.
            distributed.teardown(ctx, clean=isinstance(e, TrainingStopped))
        raise
    distributed.teardown(ctx)  # the run, and the DDP wrapper in it, are gone: collected before the barrier
    return model


def train(run: Run) -> FrozenPrefixCaptioner:
    """The loop: step, log, validate, evaluate, checkpoint, stop on a signal; then finish the run."""
    t = run.trainer
    tc, ec, state, model = t.config.train, t.config.eval, t.state, t.model
    bar = tqdm(total=tc.max_steps, initial=state.step, disable=not tc.progress or not t.ctx.main, desc="training",
               dynamic_ncols=True)
    last_log = time.perf_counter()
    with SignalGuard(relay_grace=t.ctx.signal_relay_grace) as guard:
        while state.step < tc.max_steps:
            result = t.step()
            step = state.step
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}")
            if step % tc.log_every == 0 or step == tc.max_steps:
                now = time.perf_counter()
                record = {
                    "step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                    "tokens": result.tokens, "sec_per_step": (now - last_log) / tc.log_every, "epoch": state.epoch,
                    "bad_steps": state.bad_total, "skipped_examples": state.skipped,
                }
                last_log = now
                if len(t.weights) > 1 or t.weights["loss"] != 1:  # a joint objective: each term apart
                    record.update(result.terms)
                if run.val_batches and tc.val_every and step % tc.val_every == 0:
                    with averaged(t.ema, model):  # train.ema_decay: the average is judged, the live weights train
                        record["val_loss"] = validation_loss(model, run.val_batches, t.ctx.device, t.amp, t.ctx)
                t.metrics.write(record)
            if ec.every and step % ec.every == 0:  # before the checkpoint: it saves state.best
                with averaged(t.ema, model):  # RUN/best/ too holds the average
                    record, state.best = periodic_evaluation(
                        model, t.config, step, run.folder, state.best, run.precision
                    )
                t.metrics.write(record)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and not state.bad_streak:
                run.checkpoint()
            stop = t.ctx.agreed_signal(guard.received)  # a signal up to the end of the step, the same on every rank
            if stop:
                run.checkpoint()
                bar.close()
                raise TrainingStopped(
                    f"stopped by {stop} at step {step}; checkpoint written, "
                    f"continue with train.resume=auto train.output_dir={run.folder}",
                    exit_code=128 + signal.Signals[stop].value,
                )
    bar.close()
    return finish(run)


def finish(run: Run) -> FrozenPrefixCaptioner:
    """The end of a run: the last checkpoint, the average swapped in, RUN/model/, the final evaluation and report."""
    t = run.trainer
    config, model, ctx, state = t.config, t.model, t.ctx, t.state
    # A finished run resumed: keep its checkpoint (rank 0 looks, every rank follows: saving may be a collective).
    if ctx.broadcast(not (run.folder / "checkpoints" / f"step_{state.step:08d}").is_dir()):
        run.checkpoint()
    if t.ema is not None:  # from here on the model is the average: what is validated, saved, evaluated and returned
        t.ema.copy_to(model)
    final: dict[str, Any] = {"step": state.step, "final": True}
    strategies.share_buffers(model)  # under torchrun: every rank evaluates the model rank 0 saves
    if run.val_batches:
        final["val_loss"] = validation_loss(model, run.val_batches, ctx.device, t.amp, ctx)
    model.eval()
    weights, _ = strategies.checkpoint_state(model)  # FSDP: the shards gathered whole, by every rank
    if ctx.main:  # before the final evaluation: a run whose evaluation fails still has its model
        model.save_pretrained(run.folder / "model", weights=weights, precision=run.precision)
    say = print if ctx.main else (lambda *a, **k: None)  # the other ranks caption their share; rank 0 reports
    for split in config.eval.splits:
        source = split_source(config, split) if split != "val" or config.data.val is not None else None
        if source is None:
            continue
        scores, rows = evaluate_and_write(
            model, split, source, config, run.folder / "eval", progress=config.train.progress
        )
        final.update({f"{split}/{k}": v for k, v in scores.items()})
        say(f"{split}: {format_metrics(scores)}")
        for row in rows[: config.eval.samples]:
            say(f"  {row['image_id']}: {row['caption']!r}   reference: {row['references'][0]!r}")
    t.metrics.write(final)
    if ctx.main:  # after the final evaluation: the model card its metrics, the sinks its samples, the curves
        write_model_card(run.folder / "model", model.config, final, precision=run.precision)
        t.metrics.sinks.finish(run.folder / "eval", config.eval.splits, config.eval.samples, state.step)
        save_curves([run.folder], run.folder / "curves.png")
    return model
