"""Decoding: HF generate with the KV cache equals a plain full-rerun argmax loop; options, prompts, stops, batching."""

from __future__ import annotations

import argparse

import pytest
import torch

from frozen_prefix import FrozenPrefixCaptioner, FrozenPrefixError
from frozen_prefix.cli import add_generation_args, apply_generation_args
from frozen_prefix.data import ShapesDataset
from frozen_prefix.generate import clean_caption, generate_captions, generate_ids, resolve_stops

PROMPTS = ["", "a picture of", "there is", "", "a", "the shapes are"]  # different lengths: left padding in a batch


@pytest.fixture(scope="module")
def model():
    """A tiny captioner with seeded, perturbed weights, so that different images give different captions."""
    from frozen_prefix import load_config

    from ..conftest import TINY

    torch.manual_seed(0)
    model = FrozenPrefixCaptioner(load_config(TINY))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def pixels(model):
    data = ShapesDataset("val", size=len(PROMPTS))
    return model.pixel_values([data[i]["image"] for i in range(len(PROMPTS))])


def argmax_loop(model, pixel_values, prompt, max_new_tokens, min_new_tokens=0):
    """The reference: one image, no padding, no cache; the whole sequence is re-run for every new token."""
    embed = model.lm.get_input_embeddings()
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        prompt_ids = model.tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
        prompt = embed(torch.tensor([prompt_ids], dtype=torch.long))
        start = embed(torch.tensor([model.start_ids], dtype=torch.long))  # [BOS]
        sequence = torch.cat([start, model.embed_images(pixel_values[None]), prompt], 1)
        new = []
        for step in range(max_new_tokens):
            logits = model.lm(inputs_embeds=sequence, use_cache=False).logits[0, -1]
            if step < min_new_tokens:
                logits[eos] = -float("inf")
            token = int(logits.argmax())
            if token == eos:
                break
            new.append(token)
            sequence = torch.cat([sequence, embed(torch.tensor([[token]]))], 1)
    return new


def new_ids(model, pixels, prompts, **kwargs):
    """The new token ids for [image, prompt] rows, straight from the decoding module (no cleaning)."""
    prompts = prompts if prompts is not None else [""] * len(pixels)
    return generate_ids(model, [[pixels[i], p] for i, p in enumerate(prompts)], **kwargs)


def strip(ids, eos):
    ids = ids.tolist()
    return ids[: ids.index(eos)] if eos in ids else ids


def test_greedy_with_kv_cache_equals_full_rerun_argmax_loop(model, pixels):
    eos = model.tokenizer.eos_token_id
    batched = new_ids(model, pixels, PROMPTS, max_new_tokens=12)  # one batch: rows left-padded to different lengths
    expected = [argmax_loop(model, pixels[i], PROMPTS[i], 12) for i in range(len(PROMPTS))]
    got = [strip(row, eos) for row in batched]
    assert got == expected
    assert sum(map(len, expected)) > 3 * len(expected) and len({tuple(e) for e in expected}) > 2  # not a trivial case
    captions = generate_captions(model, pixels, prompt=PROMPTS, max_new_tokens=12)
    assert captions == [model.tokenizer.decode(e).strip() for e in expected]


def test_decoding_never_reruns_the_sequence(model, pixels):
    lengths = []

    def record(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        lengths.append((embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)).shape[1])

    hook = model.lm.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        new_ids(model, pixels[:2], ["a picture of", ""], max_new_tokens=6, min_new_tokens=6)
    finally:
        hook.remove()
    k = model.prefix_length
    first = len(model.start_ids) + k + 3
    assert lengths[0] == first and lengths[1:] == [1] * (len(lengths) - 1)  # the prompt once, then one token a step
    assert 5 <= len(lengths) <= 7


def sequence_logprob(model, pixel_values, prompt, new):
    """The summed log-probability of the new tokens (up to and with EOS) after [BOS][image][prompt], unpadded."""
    embed = model.lm.get_input_embeddings()
    eos = model.tokenizer.eos_token_id
    new = new[: new.index(eos) + 1] if eos in new else new
    prompt_ids = model.tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    with torch.no_grad():
        start = embed(torch.tensor([model.start_ids], dtype=torch.long))
        rest = embed(torch.tensor([prompt_ids + new], dtype=torch.long))
        sequence = torch.cat([start, model.embed_images(pixel_values[None]), rest], 1)
        logp = torch.log_softmax(model.lm(inputs_embeds=sequence, use_cache=False).logits[0].float(), -1)
    first = sequence.shape[1] - len(new) - 1  # the position that predicts the first new token
    return sum(logp[first + j, token].item() for j, token in enumerate(new))


def test_beam_search_with_one_beam_equals_greedy(model, pixels):
    greedy = generate_captions(model, pixels, prompt=PROMPTS)
    assert generate_captions(model, pixels, prompt=PROMPTS, num_beams=1, length_penalty=3.0) == greedy
    # more beams find a sequence at least as likely as greedy's (length_penalty=0: beams rank by summed log-prob)
    greedy_ids = new_ids(model, pixels, PROMPTS, max_new_tokens=8).tolist()
    beam_ids = new_ids(model, pixels, PROMPTS, max_new_tokens=8, num_beams=4, length_penalty=0.0).tolist()
    scores = [(sequence_logprob(model, pixels[i], p, beam_ids[i]), sequence_logprob(model, pixels[i], p, greedy_ids[i]))
              for i, p in enumerate(PROMPTS)]
    assert all(beam >= greedy - 1e-4 for beam, greedy in scores), scores
    assert any(beam > greedy + 1e-3 for beam, greedy in scores), scores  # the beams searched: not greedy again


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "length_penalty": 0.5}, {"repetition_penalty": 1.3}])
def test_batch_with_different_prompt_lengths_equals_one_at_a_time(model, pixels, options):
    batched = generate_captions(model, pixels, prompt=PROMPTS, **options)
    single = [generate_captions(model, pixels[i : i + 1], prompt=PROMPTS[i], **options)[0] for i in range(len(PROMPTS))]
    assert batched == single
    # and split across several generate calls
    assert generate_captions(model, pixels, prompt=PROMPTS, batch_size=4, **options) == batched


def test_prompt_tokens_are_not_part_of_the_caption(model, pixels):
    new = new_ids(model, pixels[:3], ["a picture of"] * 3, max_new_tokens=1, min_new_tokens=1)
    assert new.shape == (3, 1)
    captions = generate_captions(model, pixels[:3], prompt="a picture of", max_new_tokens=1, min_new_tokens=1)
    assert all(len(c.split()) == 1 for c in captions), captions  # one new word each; the three prompt words are gone
    # a trailing space in the prompt changes nothing
    assert generate_captions(model, pixels[:3], prompt="a picture of ") == generate_captions(
        model, pixels[:3], prompt="a picture of"
    )


class ForceToken:
    """Forward hook on the LM head: from decoding step `step` on, rows in `rows` emit `token`."""

    def __init__(self, model, token, step, rows):
        self.token, self.step, self.rows, self.calls = token, step, rows, 0
        self.handle = model.lm.lm_head.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.calls >= self.step:
            output = output.clone()
            output[self.rows, -1, self.token] = 1e4
        self.calls += 1
        return output


def test_eos_stops_generation_per_row_and_for_the_batch(model, pixels):
    eos = model.tokenizer.eos_token_id
    force = ForceToken(model, eos, step=3, rows=[0])
    try:
        new = new_ids(model, pixels[:2], None, max_new_tokens=10, min_new_tokens=0)
    finally:
        force.handle.remove()
    assert new[0, 3] == eos and len(strip(new[0], eos)) == 3
    if eos not in new[1].tolist():
        assert new.shape[1] == 10  # the other row went on to max_new_tokens
    force = ForceToken(model, eos, step=2, rows=[0, 1])
    try:
        new = new_ids(model, pixels[:2], None, max_new_tokens=10)
        captions = generate_captions(model, pixels[:2], max_new_tokens=10)
    finally:
        force.handle.remove()
    assert new.shape[1] <= 3  # every row ended: no further steps were run
    assert all(len(c.split()) <= 2 for c in captions)


def test_min_new_tokens_holds_eos_back(model, pixels):
    eos = model.tokenizer.eos_token_id
    force = ForceToken(model, eos, step=1, rows=[0, 1])
    try:
        captions = generate_captions(model, pixels[:2], max_new_tokens=8, min_new_tokens=5)
    finally:
        force.handle.remove()
    assert all(len(c.split()) == 5 for c in captions), captions


def test_stop_at_period_keeps_it_and_stops(model, pixels):
    period = model.tokenizer.convert_tokens_to_ids(".")
    force = ForceToken(model, period, step=2, rows=[0, 1])
    try:
        new = new_ids(model, pixels[:2], None, max_new_tokens=10, min_new_tokens=0)
        force.calls = 0
        captions = generate_captions(model, pixels[:2], max_new_tokens=10, stop_at=["period"])
    finally:
        force.handle.remove()
    assert new.shape[1] == 10  # without stop_at the rows run on past the period
    assert all(c.endswith(".") and len(c.split()) == 2 for c in captions), captions  # 'w1 w2.'


def test_stop_strings_and_cleaning():
    assert resolve_stops(["newline", "period", "###"]) == ["\n", ".", "###"]
    assert resolve_stops("newline") == ["\n"]
    assert clean_caption(" a red circle\nA blue one", ["\n"]) == "a red circle"
    assert clean_caption("a red circle. and more", ["."]) == "a red circle."
    assert clean_caption("a red circle### x", ["###"]) == "a red circle"


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, pixels):
    before = torch.get_rng_state()
    first = generate_captions(model, pixels, do_sample=True, temperature=1.5, top_k=20, top_p=0.95, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert generate_captions(model, pixels, do_sample=True, temperature=1.5, top_k=20, top_p=0.95, seed=3) == first
    # top_k=1 sampling can only pick the argmax: it must equal greedy (so the options really reach HF generate)
    assert generate_captions(model, pixels, do_sample=True, top_k=1, seed=5) == generate_captions(model, pixels)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"temperature": 0}, "temperature: must be > 0"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens (9) exceeds max_new_tokens (4)"),
        ({"beams": 2}, "unknown decoding option(s) beams"),
        ({"prompt": ["a", "b"]}, "got 2 prompts for 6 images"),
    ],
)
def test_bad_options_give_one_line(model, pixels, options, message):
    with pytest.raises(FrozenPrefixError) as info:
        generate_captions(model, pixels, **options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_flags_write_the_eval_section(tiny_config):
    parser = argparse.ArgumentParser()
    add_generation_args(parser)
    args = parser.parse_args(
        ["--num-beams", "3", "--length-penalty", "0.5", "--stop-at", "period", "--stop-at", "newline", "--sample",
         "--top-k", "5", "--prompt", "A picture of", "--max-new-tokens", "9"]
    )
    ec = apply_generation_args(tiny_config, args).eval
    assert (ec.num_beams, ec.length_penalty, ec.stop_at, ec.do_sample, ec.top_k, ec.prompt, ec.max_new_tokens) == (
        3, 0.5, ["period", "newline"], True, 5, "A picture of", 9
    )
    assert ec.batch_size == tiny_config.eval.batch_size  # flags not given keep the config's values
    with pytest.raises(FrozenPrefixError, match="eval.top_p"):
        apply_generation_args(tiny_config, parser.parse_args(["--top-p", "2"]))
