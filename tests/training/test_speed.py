"""Frozen-LM steps, the frozen encoder and its feature cache, the speed switches, scripts/benchmark.py."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import json
import logging
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import PreTrainedModel

from frozen_prefix import FrozenPrefixCaptioner, fit, load_config
from frozen_prefix.data import TrainCollator, TrainExamples, build_train_source
from frozen_prefix.errors import ConfigError, FrozenPrefixError
from frozen_prefix.models import precision
from frozen_prefix.models.encoder import build_transform
from frozen_prefix.models.lm import TINY_ALIAS, load_lm
from frozen_prefix.models.packing import packing_supported, plan_packing
from frozen_prefix.models.precision import resolve_precision
from frozen_prefix.training.feature_cache import CachedExamples, FeatureCache, cache_identity
from frozen_prefix.training.optim import build_optimizer, fused_adamw_fits
from frozen_prefix.training.preflight import dry_run
from frozen_prefix.training.speedups import checkpoint_lm_layers, compile_model, compile_problem, resolve_num_workers

from ..conftest import ROOT, TINY

FROZEN = ["model.freeze_encoder=true", "data.train.size=16"]


def tiny(tmp_path, *overrides: str):
    """The tiny recipe, writing under tmp_path."""
    return load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", *overrides])


def collate_for(model: FrozenPrefixCaptioner) -> TrainCollator:
    """The training collate of a tiny model (no augmentation)."""
    c = model.config
    return TrainCollator(model.tokenizer, build_transform(model.image_config), model.prefix_length,
                         c.data.max_caption_tokens, model.start_ids)


def step(model: FrozenPrefixCaptioner, inputs: dict) -> torch.Tensor:
    """One optimizer step on inputs; returns the loss."""
    optimizer = build_optimizer(model, model.config)
    loss = model(**inputs)["loss"]
    loss.backward()
    optimizer.step()
    return loss


def first_batch(model: FrozenPrefixCaptioner, examples) -> object:
    """The collated first 8 examples."""
    return collate_for(model)([examples[(i, 0)] for i in range(8)])


def test_frozen_lm_step_computes_no_lm_weight_gradient(tiny_model):
    examples = TrainExamples(build_train_source(tiny_model.config.data.train), "error")
    step(tiny_model.train(), first_batch(tiny_model, examples).model_inputs(tiny_model.device))
    assert all(not p.requires_grad and p.grad is None for p in tiny_model.lm.parameters())
    assert any(p.grad is not None for p in tiny_model.projection.parameters())


def test_freeze_encoder_keeps_it_fixed_in_eval_mode_and_out_of_the_optimizer(tmp_path):
    model = FrozenPrefixCaptioner(tiny(tmp_path, *FROZEN)).train()
    assert not model.encoder.training and model.projection.training  # BatchNorm statistics stay fixed
    optimizer = build_optimizer(model, model.config)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.encoder.parameters()}
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    projection = [p.clone() for p in model.projection.parameters()]
    examples = TrainExamples(build_train_source(model.config.data.train), "error")
    step(model, first_batch(model, examples).model_inputs(model.device))
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(projection, model.projection.parameters()))
    assert any(k.startswith("encoder.") for k in model.trainable_state_dict())  # still saved


def test_encoder_weights_come_from_a_saved_model_folder(tmp_path):
    source = FrozenPrefixCaptioner(tiny(tmp_path))
    with torch.no_grad():
        for p in source.encoder.parameters():
            p.add_(1.0)
    folder = source.save_pretrained(tmp_path / "saved")
    model = FrozenPrefixCaptioner(tiny(tmp_path, *FROZEN, f"model.encoder_weights={folder}"))
    assert all(torch.equal(a, b) for a, b in zip(source.encoder.state_dict().values(),
                                                 model.encoder.state_dict().values()))


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_cached_features_give_the_same_loss_as_recomputing_them(tmp_path, kind):
    config = tiny(tmp_path, *FROZEN)
    model = FrozenPrefixCaptioner(config).train()
    transform = build_transform(model.image_config)
    cache = FeatureCache(kind, cache_identity(model, config, transform), tmp_path / "cache")
    examples = TrainExamples(build_train_source(config.data.train), "error")
    cached = CachedExamples(examples, cache)
    plain = first_batch(model, examples)
    expected = model(**plain.model_inputs(model.device))["loss"]
    miss = first_batch(model, cached)  # first sight: pixels, computed and stored by the step
    assert not any(miss.cached.hits) and miss.pixel_values is not None
    first = model(**cache.model_inputs(model, miss, model.device, torch.autocast("cpu", enabled=False)))["loss"]
    items = [cached[(i, 0)] for i in range(8)]
    assert all("features" in item and "image" not in item for item in items)  # no image drawn on a hit
    hit = collate_for(model)(items)
    assert all(hit.cached.hits) and hit.pixel_values is None
    second = model(**cache.model_inputs(model, hit, model.device, torch.autocast("cpu", enabled=False)))["loss"]
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    if kind == "disk":
        assert len(list(cache.folder.rglob("*.safetensors"))) == 8


def test_the_cache_key_changes_with_the_encoder_weights_and_the_transform(tmp_path):
    config = tiny(tmp_path, *FROZEN)
    model = FrozenPrefixCaptioner(config)
    transform = build_transform(model.image_config)

    def digest(m, c, t) -> str:
        return FeatureCache("memory", cache_identity(m, c, t)).digest

    same = digest(model, config, transform)
    assert digest(model, config, build_transform(model.image_config)) == same
    other = tiny(tmp_path, *FROZEN, "model.image_size=48")
    assert digest(model, other, build_transform({**model.image_config, "input_size": (3, 48, 48)})) != same
    with torch.no_grad():
        next(model.encoder.parameters()).add_(1e-3)
    assert digest(model, config, transform) != same


@pytest.mark.parametrize("overrides, words", [
    (["data.feature_cache=memory"], "model.freeze_encoder=true"),
    (["data.feature_cache=disk", "model.freeze_encoder=true", "data.augment=true"], "data.augment"),
])
def test_the_feature_cache_is_refused_where_it_would_be_stale(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words) as e:
        tiny(tmp_path, *overrides)
    assert "\n" not in str(e.value)


def test_training_with_the_feature_cache_reads_it_from_the_second_epoch(tmp_path):
    config = tiny(tmp_path, *FROZEN, "data.feature_cache=disk", "train.max_steps=4", "eval.splits=[]",
                  "data.val=null", "train.val_every=0", "train.checkpoint_every=0", "data.num_workers=auto")
    model = fit(config)
    assert len(list((tmp_path / "run" / "feature_cache").rglob("*.safetensors"))) == 16
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss") is None or torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert any("loss" in r for r in records)  # and some steps logged a loss: the check above did check something
    assert not model.encoder.training or not model.training


def test_lm_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    examples = TrainExamples(build_train_source(tiny_model.config.data.train), "error")
    inputs = first_batch(tiny_model, examples).model_inputs(tiny_model.device)
    tiny_model.train()

    def grads() -> list[torch.Tensor]:
        tiny_model.zero_grad(set_to_none=True)
        tiny_model(**inputs)["loss"].backward()
        return [p.grad.clone() for p in tiny_model.projection.parameters()]

    calls = collections.Counter()  # forward calls of every LM module in one forward + backward pass
    for module in tiny_model.lm.modules():
        module.register_forward_hook(lambda m, args, out: calls.update([m]))
    plain = grads()
    once, calls = calls, collections.Counter()
    assert (wrapped := checkpoint_lm_layers(tiny_model.lm)) > 0
    assert not tiny_model.lm.training  # the LM stays in eval mode: checkpointing needs no training mode
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)
    # and it checkpointed: the backward pass ran each decoder layer's insides again (as far as it needed their
    # activations), and nothing outside the layers
    layers = max((m for m in tiny_model.lm.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    inside = {m for layer in layers for m in layer.modules() if m is not layer}
    again = {m for m in tiny_model.lm.modules() if calls[m] > once[m]}
    assert wrapped == len(layers) and all(any(m in again for m in layer.modules()) for layer in layers)
    assert again <= inside and all(calls[m] in (once[m], 2 * once[m]) for m in tiny_model.lm.modules())


def test_the_fused_adamw_update_equals_the_per_tensor_one(tiny_model):
    examples = TrainExamples(build_train_source(tiny_model.config.data.train), "error")
    tiny_model.train()(**first_batch(tiny_model, examples).model_inputs(tiny_model.device))["loss"].backward()
    params = list(tiny_model.trainable_parameters())
    start = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]

    def weights_after_two_updates(fused: bool) -> list[torch.Tensor]:
        optimizer = build_optimizer(tiny_model, load_config(TINY, [f"train.fused_adamw={str(fused).lower()}"]))
        assert bool(optimizer.defaults["fused"]) is fused  # the switch picks the kernel (CPU has the fused one)
        with torch.no_grad():
            for p, w, g in zip(params, start, grads, strict=True):
                p.copy_(w)
                p.grad = g.clone()
        for _ in range(2):  # the same gradients twice: the moments and the step count matter from the second
            optimizer.step()
        return [p.detach().clone() for p in params]

    fused, per_tensor = weights_after_two_updates(True), weights_after_two_updates(False)
    assert any(not torch.equal(a, w) for a, w in zip(fused, start, strict=True))  # the updates moved the weights
    for a, b in zip(fused, per_tensor, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert fused_adamw_fits([torch.zeros(2, requires_grad=True)])
    assert not fused_adamw_fits([torch.zeros(2, dtype=torch.long)])  # integer weights: the per-tensor update


@pytest.mark.slow
@pytest.mark.skipif(compile_problem() is not None, reason="torch.compile cannot run here (no C++ compiler?)")
@pytest.mark.parametrize("what", ["layers", "step"])
def test_a_compiled_step_gives_the_loss_and_gradients_of_the_eager_one_with_the_lm_frozen(tiny_model, what):
    examples = TrainExamples(build_train_source(tiny_model.config.data.train), "error")
    inputs = first_batch(tiny_model, examples).model_inputs(tiny_model.device)
    tiny_model.train()

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        tiny_model.zero_grad(set_to_none=True)
        loss = tiny_model(**inputs)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tiny_model.trainable_parameters()]

    eager_loss, eager_grads = step()
    torch._dynamo.reset()  # count only this test's graphs
    counters.clear()
    assert compile_model(tiny_model, what) is True
    compiled_loss, compiled_grads = step()
    assert counters["stats"]["unique_graphs"] >= 1  # the step really ran compiled code
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert all(p.grad is None for p in tiny_model.lm.parameters())  # compiled, the LM is as frozen as before
    assert not any("_orig_mod" in key for key in tiny_model.trainable_state_dict())  # checkpoints keep their names
    with torch.no_grad():  # evaluation runs too (compiled layers run eager there: no graph for KV-cache decoding)
        torch.testing.assert_close(tiny_model(**inputs)["loss"], eager_loss, rtol=1e-4, atol=1e-4)


def test_compile_degrades_to_a_warning_where_it_cannot_run(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr("frozen_prefix.training.speedups.compile_problem", lambda: "RuntimeError: no C++ compiler")
    with caplog.at_level(logging.WARNING):
        assert compile_model(tiny_model, "step") is False
    assert "training without it" in caplog.text


def test_num_workers_auto_and_bf16_lm_weights(tmp_path):
    assert load_config(TINY, ["data.num_workers=auto"]).data.num_workers == "auto"
    assert resolve_num_workers("auto", torch.device("cpu")) >= 0 and resolve_num_workers(3, torch.device("cpu")) == 3
    model = FrozenPrefixCaptioner(tiny(tmp_path, "model.lm_dtype=bfloat16"))
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(("flags", "torch_says", "forced", "native"), [
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", False, None, True),  # Zen 4, Cooper Lake
    ("fpu avx2 amx_bf16 amx_tile", False, None, True),  # Sapphire Rapids
    ("fpu avx2 fma", False, None, False),  # older CPUs: bf16 emulated, hundreds of times slower
    ("fpu avx2 fma", True, None, True),  # torch's own check, where /proc/cpuinfo says nothing (or is absent)
    ("fpu avx2 fma", False, "1", True),
    ("fpu avx512_bf16", True, "0", False),
])
def test_auto_precision_picks_bf16_only_on_cpus_that_multiply_it_natively(tmp_path, monkeypatch, flags, torch_says,
                                                                          forced, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: none\n")
    monkeypatch.setattr(precision, "_cpu_flags", functools.partial(precision._cpu_flags.__wrapped__, cpuinfo))
    monkeypatch.setattr(precision, "_torch_reports_native_bf16", lambda: torch_says)
    if forced is None:
        monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)
    else:
        monkeypatch.setenv(precision.ENV_OVERRIDE, forced)
    cpu = torch.device("cpu")
    assert precision.cpu_has_native_bf16() is native
    assert resolve_precision(cpu, "auto") == ("bf16" if native else "fp32")
    assert resolve_precision(cpu, "fp32") == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    model = FrozenPrefixCaptioner(tiny(tmp_path, "model.lm_dtype=auto"))
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16 if native else torch.float32}


def test_cpu_flags_are_empty_where_the_system_does_not_report_them(tmp_path):
    assert precision._cpu_flags.__wrapped__(tmp_path / "missing") == frozenset()


def test_auto_stays_fp32_on_mps_and_for_a_fine_tuned_lm_and_a_bad_override_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ENV_OVERRIDE, "1")
    assert resolve_precision(torch.device("mps"), "auto") == "fp32"
    model = FrozenPrefixCaptioner(tiny(tmp_path, "model.lm_trainable=true"))
    assert {p.dtype for p in model.lm.parameters()} == {torch.float32}  # AdamW steps of 1e-5 vanish in bf16
    monkeypatch.setenv(precision.ENV_OVERRIDE, "yes")
    with pytest.raises(FrozenPrefixError, match="FROZEN_PREFIX_CPU_BF16='yes' is not 0 or 1"):
        precision.cpu_has_native_bf16()


def test_the_feature_cache_key_holds_the_precision_auto_chose(tmp_path, monkeypatch):
    model = FrozenPrefixCaptioner(tiny(tmp_path, *FROZEN))
    transform = build_transform(model.image_config)

    def key(setting: str) -> str:
        config = tiny(tmp_path, *FROZEN, f"train.precision={setting}")
        return FeatureCache("memory", cache_identity(model, config, transform)).digest

    assert key("auto") == key("fp32") != key("bf16")
    monkeypatch.setenv(precision.ENV_OVERRIDE, "1")
    assert key("auto") == key("bf16") != key("fp32")


@pytest.mark.slow
def test_benchmark_measures_every_part_and_writes_json(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "benchmark", benchmark)  # its dataclass looks its module up
    spec.loader.exec_module(benchmark)
    out = tmp_path / "bench.json"
    code = benchmark.main([
        "--config", str(TINY), "--out", str(out), "--steps", "1", "--warmup", "1", "--matmul-seconds", "0.01",
        "--decode-batch", "2", "--new-tokens", "2", "--loop-images", "1", "--cache-images", "8",
        "--cache-epochs", "2", "--data-batches", "2", "--model", "untrained", "--memory-here",
        "--compare", "train.channels_last=true", "train.batch_size=4",
    ])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(benchmark.PARTS) | {"compare"} <= set(results)
    assert results["step"]["lm_weight_grads"] == {"frozen": False, "trainable": True}
    assert 0 < results["flops"]["utilisation"] and results["flops"]["profile"]["top_ops"]
    assert results["flops"]["utilisation"] <= results["flops"]["utilisation_ceiling"]
    assert 0.5 < results["flops"]["frozen_over_trainable_flops"] < 1  # the trainable step counts LM weight grads
    assert results["cache"]["cache"][1]["image_s"] > 0 and results["memory"]["frozen"]["peak_mb"] > 0
    assert "step time, LM frozen" in capsys.readouterr().out


def test_plan_packing_lays_each_sequence_once_end_to_end_with_restarting_positions():
    mask = (torch.arange(5)[None] < torch.tensor([5, 2, 3, 1])[:, None]).long()
    plan = plan_packing(mask, row_tokens=6)
    assert plan.rows == 2 and plan.length == 6  # 11 tokens in rows of 6: [5, 1] and [3, 2], longest first
    placed = plan.source[plan.source >= 0]
    assert sorted(placed.tolist()) == mask.flatten().nonzero().flatten().tolist()
    assert plan.source.view(2, 6)[:, 0].tolist() == [0, 10]  # each row starts with the first token of a sequence
    assert plan.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 0]]  # the last 0: padding
    assert plan_packing(mask).rows == 1  # by default rows of 128 tokens: all four in one
    assert plan_packing(torch.ones(3, 4, dtype=torch.long)) is None  # nothing to save: the padded batch is kept


def test_padding_free_gives_the_same_loss_and_gradients(tiny_model):
    examples = TrainExamples(build_train_source(tiny_model.config.data.train), "error")
    collate = collate_for(tiny_model)
    keys = [(i, j) for i in range(8) for j in range(5)]  # every reference: the long ones name sizes and places
    keys.sort(key=lambda key: int(collate([examples[key]]).model_inputs("cpu")["attention_mask"].sum()))
    chosen = [keys[-1], keys[-2], *keys[:4]]  # the two longest sequences and the four shortest: room to pack
    inputs = collate([examples[key] for key in chosen]).model_inputs(tiny_model.device)
    plan = plan_packing(inputs["attention_mask"])
    assert plan is not None and plan.rows < inputs["input_ids"].shape[0]  # the batch really is packed
    tiny_model.train()

    def loss_and_grads(packed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tiny_model.zero_grad(set_to_none=True)
        loss = tiny_model(**inputs, packed=packed)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tiny_model.trainable_parameters()]

    (plain, plain_grads), (packed, packed_grads) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(packed, plain)
    for a, b in zip(plain_grads, packed_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_lm_attention_auto_is_eager_on_the_cpu_with_the_loss_and_gradients_of_sdpa(tmp_path):
    torch.manual_seed(0)  # the same draw of the tiny model's weights on every run
    models = {name: FrozenPrefixCaptioner(tiny(tmp_path, f"model.lm_attention={name}")).train()
              for name in ("auto", "sdpa")}
    assert models["auto"].lm.config._attn_implementation == "eager"
    assert models["sdpa"].lm.config._attn_implementation == "sdpa"
    models["sdpa"].lm.load_state_dict(models["auto"].lm.state_dict())
    models["sdpa"].load_trainable_state_dict(models["auto"].trainable_state_dict())
    examples = TrainExamples(build_train_source(models["auto"].config.data.train), "error")
    batch = collate_for(models["auto"])([examples[(i, i % 5)] for i in range(6)])  # references of mixed lengths
    inputs = batch.model_inputs("cpu")
    assert not bool(inputs["attention_mask"].all())  # some rows padded, as in training
    results = {}
    for name, model in models.items():
        loss = model(**inputs)["loss"]
        loss.backward()
        results[name] = (loss.detach(), [p.grad for p in model.trainable_parameters()])
    torch.testing.assert_close(results["auto"][0], results["sdpa"][0])
    # The two kernels sum in different orders: fp32 rounding, relative to the largest gradient (~1 here), of up to
    # 3e-6 was seen over 12 weight draws, so an absolute 1e-6 failed a quarter of the draws
    scale = max(float(g.abs().max()) for g in results["sdpa"][1])
    for a, b in zip(results["auto"][1], results["sdpa"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_auto_attention_is_chosen_for_the_device_the_lm_will_run_on_not_the_one_it_is_loaded_on():
    assert load_lm(TINY_ALIAS)[0].config._attn_implementation == "eager"  # loaded and run on the CPU
    lm, _ = load_lm(TINY_ALIAS, target="mps")  # loaded on the CPU for another device (as FSDP does for GPUs)
    assert lm.device.type == "cpu" and lm.config._attn_implementation != "eager"


def test_an_lm_that_cannot_switch_attention_is_refused_when_asked_and_kept_under_auto(monkeypatch, caplog):
    def refuse(self, implementation):
        raise ValueError(f"{type(self).__name__} does not support {implementation}\nmore detail")

    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", refuse)
    with pytest.raises(FrozenPrefixError, match="cannot use attention 'eager'.*set model.lm_attention=auto"):
        load_lm(TINY_ALIAS, attention="eager")
    with caplog.at_level(logging.WARNING):
        lm, _ = load_lm(TINY_ALIAS, attention="auto")
    assert "keeps its own attention" in caplog.text and lm.config._attn_implementation != "eager"


def test_padding_free_is_refused_for_an_lm_that_does_not_keep_packed_sequences_apart(tmp_path, monkeypatch):
    model = FrozenPrefixCaptioner(tiny(tmp_path, "train.padding_free=true"))
    examples = TrainExamples(build_train_source(model.config.data.train), "error")
    assert packing_supported(model.lm)
    assert dry_run(model, examples, collate_for(model), model.device, contextlib.nullcontext()) is not None
    forward = type(model.lm.base_model).forward
    # an LM that drops position ids attends across the packed sequences
    monkeypatch.setattr(type(model.lm.base_model), "forward",
                        lambda self, *a, position_ids=None, **k: forward(self, *a, **k))
    assert not packing_supported(model.lm)
    with pytest.raises(FrozenPrefixError, match="train.padding_free=false"):
        dry_run(model, examples, collate_for(model), model.device, contextlib.nullcontext())
