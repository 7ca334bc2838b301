"""The deep prefix (model.deep_prefix): the image written into every layer of a frozen LM, on every path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix.data import ShapesDataset
from frozen_prefix.errors import ConfigError
from frozen_prefix.generate import ChatSession, lay_out, score_continuations
from frozen_prefix.models.packing import plan_packing
from frozen_prefix.training.optim import build_optimizer

from ..conftest import TINY, batch_for, build
from ..decoding.test_chat import from_scratch, turns_of
from .test_fusion import greedy_matches_forward


def perturbed(model: FrozenPrefixCaptioner, added: torch.nn.Module) -> FrozenPrefixCaptioner:
    """The model with its projection and an added module's weights perturbed, so both change what it says."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in [*model.projection.parameters(), *added.parameters()]:
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def strong_deep() -> FrozenPrefixCaptioner:
    """A tiny deep-prefix model whose projection and deep weights are perturbed."""
    model = build("model.deep_prefix=true")
    return perturbed(model, model.variants["deep"])


@pytest.fixture(scope="module")
def images():
    data = ShapesDataset("test", size=3)
    return [data[i]["image"] for i in range(3)]


def test_deep_prefix_starts_as_the_plain_model_and_learns_with_the_lm_frozen(tmp_path):
    plain, deep = build(), build("model.deep_prefix=true")
    deep.load_state_dict(plain.state_dict(), strict=False)  # the same encoder, projection and LM
    batch = batch_for(plain)
    plain.train(), deep.train()
    torch.testing.assert_close(deep(**batch)["loss"], plain(**batch)["loss"])  # W = 0: exactly the plain model
    lm_before = {k: v.clone() for k, v in deep.lm.state_dict().items()}
    optimizer = build_optimizer(deep, deep.config)
    for _ in range(2):
        optimizer.zero_grad()
        deep(**batch)["loss"].backward()
        assert deep.variants["deep"].proj.weight.grad.abs().sum() > 0  # gradients reach the deep weights through the LM
        optimizer.step()
    assert all(p.grad is None for p in deep.lm.parameters())
    assert all(torch.equal(v, lm_before[k]) for k, v in deep.lm.state_dict().items())
    assert deep.variants["deep"].proj.weight.abs().sum() > 0
    assert not torch.allclose(deep(**batch)["loss"], plain(**batch)["loss"])
    saved = load_file(str(deep.save_pretrained(tmp_path / "m") / "model.safetensors"))
    assert any(k.startswith("deep.") for k in saved) and not any(k.startswith("lm.") for k in saved)
    again = FrozenPrefixCaptioner.from_pretrained(tmp_path / "m").train()
    torch.testing.assert_close(again(**batch)["loss"], deep(**batch)["loss"])


def test_a_second_stage_starts_the_deep_prefix_at_zero_from_a_plain_model(tmp_path):
    plain = build()
    plain.save_pretrained(tmp_path / "stage1")
    deep = build("model.deep_prefix=true", f"model.init_from={tmp_path / 'stage1'}")
    ours = deep.trainable_state_dict()
    assert all(torch.equal(ours[k], v) for k, v in plain.trainable_state_dict().items())
    assert deep.variants["deep"].proj.weight.abs().sum() == 0
    batch = batch_for(plain)
    plain.eval(), deep.eval()
    torch.testing.assert_close(deep(**batch)["loss"], plain(**batch)["loss"])


def test_cached_decoding_and_scoring_equal_the_forward_pass():
    model = strong_deep()
    image = torch.randn(3, 64, 64)
    assert greedy_matches_forward(model, image)
    images = torch.randn(2, 3, 64, 64)
    with_deep = model.caption(images, max_new_tokens=6)
    assert len(model.caption(images, max_new_tokens=4, num_beams=2)) == 2  # beams: rows repeated per prompt
    # Scoring runs the prompt once with the cache: the same log-probability as one forward pass over it all
    prompt, candidate = [image, "a"], " shape"
    scored = score_continuations(model, prompt, [candidate])[0]["sum"]
    seq = lay_out(model, prompt)
    cand = model.tokenizer(candidate, add_special_tokens=False).input_ids
    ids = torch.tensor([seq.ids + cand])
    mask = torch.tensor([seq.image_mask + [False] * len(cand)])
    with torch.no_grad():
        logp = torch.log_softmax(model(image[None], ids, torch.ones_like(ids), mask)["logits"][0].float(), -1)
    start = len(seq.ids) - 1
    assert scored == pytest.approx(sum(logp[start + j, t].item() for j, t in enumerate(cand)), abs=1e-4)
    with torch.no_grad():
        model.variants["deep"].proj.weight.zero_()
        model.variants["deep"].proj.bias.zero_()
    assert model.caption(images, max_new_tokens=6) != with_deep  # the decoding path does use the deep terms


def session_replies_equal_chat_from_scratch(model: FrozenPrefixCaptioner, images: list) -> bool:
    """Whether a ChatSession's reply to every turn equals chat() from scratch, and the replies differ."""
    session = ChatSession(model, max_new_tokens=8)
    replies = []
    for turn in turns_of(images):  # images in the first and third turns: the second runs after a cached one
        history = list(session.messages)
        replies.append(session.send(turn))
        if replies[-1] != from_scratch(model, history, turn, max_new_tokens=8):
            return False
    return len(set(replies)) > 1


def test_chat_session_with_its_cache_equals_chat_from_scratch(images):
    assert session_replies_equal_chat_from_scratch(strong_deep(), images)


def test_padding_free_packing_gives_the_same_loss_and_gradients():
    model = strong_deep().train()
    batch = batch_for(model, n=6)
    assert plan_packing(batch["attention_mask"]) is not None  # the batch really is packed

    def loss_and_grads(packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model(**batch, packed=packed)["loss"]
        loss.backward()
        return loss.detach(), model.variants["deep"].proj.weight.grad.clone()

    (plain, plain_grad), (packed, packed_grad) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(packed, plain)
    torch.testing.assert_close(packed_grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_deep_prefix_refuses_a_text_fusion():
    with pytest.raises(ConfigError, match="model.fusion=prefix or model.deep_prefix=false"):
        load_config(TINY, ["model.deep_prefix=true", "model.fusion=sum"])
