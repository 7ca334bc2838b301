"""Any Hugging Face causal LM, exactly: the training loss and the scores use the logits the LM's own forward gives."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix.models.lm import build_tiny_tokenizer, own_head, plain_head

from ..conftest import TINY, batch_for

# Tiny random members of the decoder families transformers ships: each with what its own forward does to the logits
# set to something visible (softcapping, a scale, a division) where the family has it.
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 8}, "olmo": {}, "olmo2": {}, "stablelm": {},
    "starcoder2": {}, "phi": {}, "gemma": {"head_dim": 8}, "gpt_neox": {}, "falcon": {},
    "mixtral": {"num_local_experts": 2, "num_experts_per_tok": 1},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4},
    "gptj": {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4},
    "bloom": {"n_layer": 2, "n_head": 4}, "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 0.5},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 0.5},
    "cohere": {"logit_scale": 3.0}, "granite": {"logits_scaling": 0.25},
}
TRANSFORMED = {"gemma2", "gemma3_text", "cohere", "granite"}  # their own forward changes the head's logits
COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 64, "max_position_embeddings": 128}


def save_family(name: str, folder) -> None:
    """A seeded random LM of the family with the tiny word-level tokenizer, saved as a model folder."""
    tokenizer = build_tiny_tokenizer()
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(name, vocab_size=len(tokenizer), **ids, **{**COMMON, **FAMILIES[name]})
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # trained-size logits: softcapping at 0.5 and the scales act on every one of them
        lm.get_output_embeddings().weight.mul_(50)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_loss_is_the_lms_own_loss(family, tmp_path, caplog):
    save_family(family, tmp_path / family)
    with caplog.at_level(logging.INFO, logger="frozen_prefix"):
        model = FrozenPrefixCaptioner(load_config(TINY, [f"model.lm={tmp_path / family}", "model.lm_dtype=float32"]))
    transformed = any("its own forward changes the head's logits" in r.getMessage() for r in caplog.records)
    assert transformed == (family in TRANSFORMED)  # decided by a probe, not by the family's name
    model.eval()
    batch = batch_for(model)
    with torch.no_grad():
        ours = model(**batch)["loss"]
        embeds = model.input_embeddings(
            batch["input_ids"], batch["image_mask"], model.prefix_for(batch["pixel_values"]), batch["attention_mask"]
        )
        theirs = model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        probe = torch.randn(2, 5, embeds.shape[-1]) * 3
        whole = model.lm(inputs_embeds=probe).logits  # the LM's own forward, all the way
        hidden = model.lm.base_model(inputs_embeds=probe)[0]
        ours_logits = model.lm_logits(hidden)  # what scoring and chat read
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_logits, whole, rtol=1e-5, atol=1e-4)
    if family in TRANSFORMED:  # the plain head would have trained against another distribution
        assert not torch.allclose(plain_head(model.lm, hidden), whole, atol=1e-3)


def test_the_lms_own_head_is_its_forward_after_the_base_model():
    """own_head runs the family's own code on given hidden states: the same as the whole forward's last step."""
    for family in ("gemma2", "cohere", "gpt2"):
        config = AutoConfig.for_model(family, vocab_size=64, **{**COMMON, **FAMILIES[family]})
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(config).eval()
        embeds = torch.randn(2, 5, lm.get_input_embeddings().weight.shape[1])
        with torch.no_grad():
            hidden = lm.base_model(inputs_embeds=embeds)[0]
            torch.testing.assert_close(own_head(lm, hidden.reshape(-1, hidden.shape[-1])).view(2, 5, -1),
                                       lm(inputs_embeds=embeds).logits)
