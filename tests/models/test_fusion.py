"""The queries projection, sum/product fusion, the joint loss, and the baselines that are not Frozen."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from frozen_prefix import FrozenPrefixCaptioner, fit, load_config
from frozen_prefix.errors import ConfigError, FrozenPrefixError
from frozen_prefix.generate import generate_ids, lay_out
from frozen_prefix.models.variants.fusion import TextFusion
from frozen_prefix.training.optim import build_optimizer
from frozen_prefix.training.step import joint_loss, objective_weights

from ..conftest import ROOT, TINY, batch_for, build

PROJECTIONS = ("linear", "mlp", "spatial", "queries")
FUSIONS = ("prefix", "sum", "product")
VISUAL = ("none", "infonce", "mse")


def train_step(model: FrozenPrefixCaptioner, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One optimisation step of the joint objective on one batch; its terms."""
    model.train()
    optimizer.zero_grad()
    loss, terms = joint_loss(model(**batch_for(model)), objective_weights(model, model.config.train), 1.0, 1.0)
    loss.backward()
    optimizer.step()
    return terms


def visual_overrides(kind: str) -> list[str]:
    return [] if kind == "none" else ["train.visual_loss_weight=0.5", f"train.visual_loss={kind}"]


# Every value of every option at least once, and mixed: the full 4 x 3 x 3 product adds time, not coverage.
OPTION_CASES = sorted(
    {(p, "prefix", "none") for p in PROJECTIONS}
    | {("spatial", f, "none") for f in FUSIONS}
    | {("linear", "prefix", v) for v in VISUAL}
    | {("queries", "sum", "infonce"), ("mlp", "product", "mse"), ("spatial", "product", "infonce")}
)


@pytest.mark.parametrize(("projection", "fusion", "visual"), OPTION_CASES)
def test_lm_stays_frozen_for_every_option(projection, fusion, visual, tmp_path):
    model = build(f"model.projection={projection}", f"model.fusion={fusion}", *visual_overrides(visual))
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    lm_ids = {id(p) for p in model.lm.parameters()}
    optimizer = build_optimizer(model, model.config)
    assert not lm_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    projection_before = [p.clone() for p in model.projection.parameters()]
    terms = train_step(model, optimizer)
    assert ("loss_visual" in terms) == (visual != "none")
    assert all(p.grad is None for p in model.lm.parameters())
    assert not model.lm.training
    assert all(torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(projection_before, model.projection.parameters(), strict=True))
    saved = load_file(str(model.save_pretrained(tmp_path / "m") / "model.safetensors"))
    assert not any(k.startswith("lm.") for k in saved)
    assert ("fusion.marker" in saved) == (fusion != "prefix")
    assert any(k.startswith("visual_head.") for k in saved) == (visual != "none")


def test_fine_tuned_lm_baseline_learns_and_saves_the_lm(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        model = build("model.lm_trainable=true", "train.lm_lr=1e-3")
    assert "BASELINE, not the Frozen recipe" in caplog.text
    optimizer = build_optimizer(model, model.config)
    lm_params = {id(p) for p in model.lm.parameters()}
    lm_groups = [g for g in optimizer.param_groups if any(id(p) in lm_params for p in g["params"])]
    assert lm_groups and all(g["lr"] == 1e-3 for g in lm_groups)
    before = model.lm.transformer.h[0].attn.c_attn.weight.clone()
    train_step(model, optimizer)
    assert not torch.equal(before, model.lm.transformer.h[0].attn.c_attn.weight)
    folder = model.save_pretrained(tmp_path / "m")
    assert json.loads((folder / "frozen_prefix.json").read_text())["lm_weights_included"] is True
    assert "A baseline, not the Frozen recipe" in (folder / "README.md").read_text()
    assert any(k.startswith("lm.") for k in load_file(str(folder / "model.safetensors")))
    loaded = FrozenPrefixCaptioner.from_pretrained(folder)
    assert torch.equal(loaded.lm.transformer.h[0].attn.c_attn.weight, model.lm.transformer.h[0].attn.c_attn.weight)
    model.eval()
    batch = batch_for(model)
    with torch.no_grad():
        assert torch.allclose(model(**batch)["logits"], loaded(**batch)["logits"], atol=1e-6)


def test_frozen_encoder_keeps_its_initialisation_and_is_saved(tmp_path):
    model = build("model.freeze_encoder=true")
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    optimizer = build_optimizer(model, model.config)
    assert not encoder_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}  # BatchNorm statistics too
    train_step(model, optimizer)
    assert not model.encoder.training
    assert all(torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())
    saved = load_file(str(model.save_pretrained(tmp_path / "m") / "model.safetensors"))
    assert any(k.startswith("encoder.") for k in saved)  # a random initialisation stays reproducible


@pytest.mark.parametrize("encoder", ["test_resnet", "test_vit"])
def test_queries_read_a_cnn_grid_and_a_vit_token_grid(encoder):
    model = build(f"model.encoder={encoder}", "model.projection=queries", "model.query_heads=4")
    images = torch.randn(2, *model.image_config["input_size"])
    prefix = model.embed_images(images)
    assert prefix.shape == (2, model.prefix_length, model.lm.config.n_embd)
    assert not torch.allclose(prefix[0], prefix[1])  # the queries read the images
    # Every cell matters: changing one corner of the image changes the prefix.
    shifted = images.clone()
    shifted[:, :, :8, :8] += 3
    assert not torch.allclose(model.embed_images(shifted), prefix)
    assert len(model.caption(images, max_new_tokens=3)) == 2  # and decode


def test_query_heads_must_divide_the_width():
    with pytest.raises(ConfigError, match="model.query_heads=5"):
        build("model.projection=queries", "model.query_heads=5")


def strong_fusion(kind: str) -> FrozenPrefixCaptioner:
    """A tiny model whose fusion changes what the LM says (the fusion starts as the identity)."""
    model = build(f"model.fusion={kind}")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.variants["fusion"].parameters():
            p.copy_(torch.randn_like(p) * (2.0 if kind == "sum" else 0.5))
    return model.eval()


def greedy_matches_forward(model: FrozenPrefixCaptioner, image: torch.Tensor) -> bool:
    """Whether cached greedy decoding picks, at every step, the argmax of a full forward pass over its tokens."""
    new = generate_ids(model, [[image, ""]], max_new_tokens=8, min_new_tokens=8)[0].tolist()
    seq = lay_out(model, [image, ""])
    ids = torch.tensor([seq.ids + new])
    mask = torch.tensor([seq.image_mask + [False] * len(new)])
    with torch.no_grad():
        logits = model(image[None], ids, torch.ones_like(ids), mask)["logits"][0]
    start = len(seq.ids) - 1  # the position that predicts the first new token
    return logits[start : start + len(new)].argmax(-1).tolist() == new


@pytest.mark.parametrize("kind", ["sum", "product"])
def test_fused_cached_decoding_equals_the_forward_pass(kind, monkeypatch):
    model = strong_fusion(kind)
    image = torch.randn(3, 64, 64)
    assert greedy_matches_forward(model, image)
    # Without fusing the new tokens (what HF generate alone would do) the check fails: it can tell.
    monkeypatch.setattr(TextFusion, "lm_context", lambda self, call: contextlib.nullcontext())
    assert not greedy_matches_forward(model, image)


@pytest.mark.parametrize("kind", ["sum", "product"])
def test_fusion_decodes_through_the_library(kind):
    model = strong_fusion(kind)
    images = torch.randn(2, 3, 64, 64)
    assert len(model.caption(images, max_new_tokens=4)) == 2
    assert len(model.caption(images, max_new_tokens=4, num_beams=2)) == 2  # beams: rows repeated per prompt
    # The image reaches the LM only through the fused text tokens (its slots hold a fixed marker): a dark and a
    # light image get two captions, each as it is alone, so the fusion reached every decoded token, each row its own
    # image; with beams too (each beam fused with its own row's image)
    distinct = torch.stack([torch.full((3, 64, 64), -2.0), torch.full((3, 64, 64), 2.0)])
    captions = model.caption(distinct, max_new_tokens=4)
    assert captions[0] != captions[1], captions
    assert captions == [model.caption(distinct[i : i + 1], max_new_tokens=4)[0] for i in range(2)]
    beams = model.caption(distinct, max_new_tokens=4, num_beams=2)
    assert beams == [model.caption(distinct[i : i + 1], max_new_tokens=4, num_beams=2)[0] for i in range(2)]
    completed = model.complete([[images[0], "a"], ["a picture of"]], max_new_tokens=3)
    assert len(completed) == 2  # a text-only row
    assert completed == [model.complete([images[0], "a"], max_new_tokens=3)[0],
                         model.complete(["a picture of"], max_new_tokens=3)[0]]  # no image fused into the text row


def test_fusion_refuses_several_images_and_chat():
    model = strong_fusion("sum")
    image = torch.randn(3, 64, 64)
    with pytest.raises(FrozenPrefixError, match="model.fusion=sum fuses one image"):
        model.complete([image, "this is a dax.", image, "this is a"], max_new_tokens=2)
    with pytest.raises(FrozenPrefixError, match="chat is not supported with model.fusion=sum"):
        model.chat([{"role": "user", "content": [image, "what is this?"]}])
    with pytest.raises(ConfigError, match="model.fusion=product needs one image per sequence"):
        load_config(TINY, ["model.fusion=product", "data.images_per_sequence=2"])
    with pytest.raises(ConfigError, match="train.visual_loss_weight>0 needs one image per sequence"):
        load_config(TINY, ["train.visual_loss_weight=1", "data.images_per_sequence=2"])
    with pytest.raises(ConfigError, match="model.lm_trainable=true does not work with train.fsdp"):
        load_config(TINY, ["model.lm_trainable=true", "train.fsdp=lm"])
    with pytest.raises(ConfigError, match="both 0"):
        load_config(TINY, ["train.text_loss_weight=0"])


def test_visual_loss_refuses_rows_without_their_own_image():
    model = build("train.visual_loss_weight=1")
    batch = batch_for(model, n=2)
    batch["image_mask"][1] = False  # the second row loses its image slots: a text-only row
    with pytest.raises(FrozenPrefixError, match="train.visual_loss_weight>0 pairs each image"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:1]})


@pytest.mark.parametrize("kind", ["infonce", "mse"])
def test_visual_loss_alone_trains_the_encoder_and_never_the_lm(kind):
    model = build("train.visual_loss_weight=1", "train.text_loss_weight=0", f"train.visual_loss={kind}")
    model.train()
    loss, terms = joint_loss(model(**batch_for(model)), objective_weights(model, model.config.train), 1.0, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(terms["loss_visual"])
    assert all(p.grad is None for p in model.lm.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    if kind == "infonce":
        assert model.variants["visual_head"].log_temperature.grad is not None  # the temperature learns


def test_joint_terms_are_logged(tmp_path):
    config = load_config(TINY, [
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.log_every=1", "train.batch_size=4",
        "train.checkpoint_every=0", "data.train.size=8", "data.val=null", "eval.splits=[]",
        "train.visual_loss_weight=0.5", "train.text_loss_weight=2",
    ])
    fit(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss_visual" in r]
    assert len(logged) == 2
    for r in logged:
        assert r["loss"] == pytest.approx(2 * r["loss_text"] + 0.5 * r["loss_visual"], rel=1e-5)


@pytest.mark.slow
def test_ablate_runs_a_variant_and_writes_the_table(tmp_path):
    out = tmp_path / "grid"
    (out / "base").mkdir(parents=True)  # a variant finished before: kept, not run again (each run is 3 processes)
    (out / "base" / "result.json").write_text(json.dumps({"variant": "base", "overrides": "", "status": "ok"}))
    command = [
        sys.executable, str(ROOT / "scripts" / "ablate.py"), "--config", str(TINY), "--out", str(out),
        "--variant", "base=", "--variant", "sum=model.fusion=sum train.visual_loss_weight=0.1", "--eval-images", "2",
        "train.max_steps=1", "train.batch_size=4", "data.train.size=8", "data.val.size=4", "train.val_batches=1",
        "train.checkpoint_every=0",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["base", "sum"] and done.stdout.count("done before, kept") == 1
    row = rows[1]
    assert row["status"] == "ok" and row["steps"] == 1 and row["val_loss"] is not None
    assert all(row[key] is not None for key in ("test_exact", "compositional_exact", "blind_test_exact"))
    table = (out / "results.md").read_text()
    assert "| sum | model.fusion=sum train.visual_loss_weight=0.1 | ok |" in table
