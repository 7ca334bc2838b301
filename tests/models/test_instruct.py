"""The instruction-aware prefix (model.instruction_aware): the text after an image conditions its prefix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix.data import ShapesDataset
from frozen_prefix.data.layout import IGNORE
from frozen_prefix.errors import ConfigError
from frozen_prefix.generate import generate_ids, lay_out
from frozen_prefix.models.variants.instruct import instruction_vectors
from frozen_prefix.training.optim import build_optimizer

from ..conftest import TINY, batch_for, build
from .test_deep import perturbed, session_replies_equal_chat_from_scratch


def strong_instruct() -> FrozenPrefixCaptioner:
    """A tiny instruction-aware model whose projection and mixer are perturbed, so the instruction matters."""
    model = build("model.instruction_aware=true")
    return perturbed(model, model.variants["instruct"])


def test_an_image_reads_the_text_after_it_up_to_a_label_an_image_or_padding():
    k = 2
    # row 0: start, image A, two instruction tokens, a labelled reply, padding
    # row 1: image B right before image C (B has none), C's one instruction token, then the end
    image_mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    labels = torch.full((2, 7), IGNORE)
    labels[0, 5] = 7
    embeds = torch.arange(14, dtype=torch.float32).view(2, 7, 1).expand(2, 7, 3)
    vectors = instruction_vectors(embeds, image_mask, k, attention, labels)
    torch.testing.assert_close(vectors[:, 0], torch.tensor([3.5, 0.0, 11.0]))  # mean(3, 4); none; position 4 of row 1
    # Without the labels the reply reads as instruction too (what the labels are there to prevent)
    assert instruction_vectors(embeds, image_mask, k, attention)[0, 0] == pytest.approx(4.0)


def test_it_starts_as_the_plain_model_and_learns_with_the_lm_frozen(tmp_path):
    plain, instruct = build(), build("model.instruction_aware=true")
    instruct.load_state_dict(plain.state_dict(), strict=False)
    batch = batch_for(plain)
    plain.train(), instruct.train()
    torch.testing.assert_close(instruct(**batch)["loss"], plain(**batch)["loss"])  # zero map: the plain model
    lm_before = {k: v.clone() for k, v in instruct.lm.state_dict().items()}
    optimizer = build_optimizer(instruct, instruct.config)
    for _ in range(2):
        optimizer.zero_grad()
        instruct(**batch)["loss"].backward()
        assert instruct.variants["instruct"].out[1].weight.grad.abs().sum() > 0
        optimizer.step()
    assert all(p.grad is None for p in instruct.lm.parameters())
    assert all(torch.equal(v, lm_before[k]) for k, v in instruct.lm.state_dict().items())
    assert not torch.allclose(instruct(**batch)["loss"], plain(**batch)["loss"])
    saved = load_file(str(instruct.save_pretrained(tmp_path / "m") / "model.safetensors"))
    assert any(k.startswith("instruct.") for k in saved) and not any(k.startswith("lm.") for k in saved)
    again = FrozenPrefixCaptioner.from_pretrained(tmp_path / "m").train()
    torch.testing.assert_close(again(**batch)["loss"], instruct(**batch)["loss"])
    # a second stage from a plain model starts the mixer as a no-op
    plain.save_pretrained(tmp_path / "stage1")
    second = build("model.instruction_aware=true", f"model.init_from={tmp_path / 'stage1'}").train()
    torch.testing.assert_close(second(**batch)["loss"], plain(**batch)["loss"])


def test_the_question_changes_the_prefix_and_the_reply_does_not():
    model = strong_instruct()
    image = torch.randn(3, 64, 64)
    prefix = model.prefix_for(image[None])

    def slots(text: str, reply: str) -> torch.Tensor:
        seq = lay_out(model, [image, text])
        answer = model.tokenizer(reply, add_special_tokens=False).input_ids
        ids = torch.tensor([seq.ids + answer])
        mask = torch.tensor([seq.image_mask + [False] * len(answer)])
        labels = torch.tensor([[IGNORE] * len(seq.ids) + answer])
        with torch.no_grad():
            return model.input_embeddings(ids, mask, prefix, torch.ones_like(ids), labels)[mask]

    q1, q2 = "Question: what colour? Answer:", "Question: what shape? Answer:"
    assert not torch.allclose(slots(q1, " red"), slots(q2, " red"))
    torch.testing.assert_close(slots(q1, " red"), slots(q1, " a big blue square"))


def test_cached_decoding_equals_the_forward_pass_it_was_trained_with():
    model = strong_instruct()
    image, question = torch.randn(3, 64, 64), "Question: what is it? Answer:"
    new = generate_ids(model, [[image, question]], max_new_tokens=8, min_new_tokens=8)[0].tolist()
    seq = lay_out(model, [image, question])
    ids = torch.tensor([seq.ids + new])
    mask = torch.tensor([seq.image_mask + [False] * len(new)])
    labels = torch.tensor([[IGNORE] * len(seq.ids) + new])  # as in training: the reply is not the instruction
    with torch.no_grad():
        logits = model(image[None], ids, torch.ones_like(ids), mask, labels)["logits"]
    assert logits.argmax(-1).tolist() == new  # the positions that predict each new token, the prompt's last first


def test_chat_session_with_its_cache_equals_chat_from_scratch():
    data = ShapesDataset("test", size=2)
    images = [data[i]["image"] for i in range(2)]
    # the replies of earlier turns end their images' instructions: a session and chat from scratch agree
    assert session_replies_equal_chat_from_scratch(strong_instruct(), images)


def test_padding_free_packing_gives_the_same_loss():
    model = strong_instruct().train()
    batch = batch_for(model, n=6)
    losses = []
    for packed in (False, True):
        losses.append(model(**batch, packed=packed)["loss"].detach())
    torch.testing.assert_close(losses[1], losses[0])


@pytest.mark.parametrize("other", ["model.fusion=sum", "model.deep_prefix=true"])
def test_instruction_aware_refuses_what_replaces_or_reuses_the_plain_prefix(other):
    with pytest.raises(ConfigError, match="model.instruction_aware"):
        load_config(TINY, ["model.instruction_aware=true", other])
