"""Interleaved prompts, likelihood scoring with a shared KV cache, few-shot VQA and binding, and their controls."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from frozen_prefix import load_config
from frozen_prefix.data import CaptionCollator, ShapesDataset, ShapesVQA
from frozen_prefix.data.layout import IGNORE
from frozen_prefix.evaluate import main as evaluate_main
from frozen_prefix.evaluation.fewshot import apply_control, blank_image, evaluate_binding, evaluate_vqa, render
from frozen_prefix.generate import encode, score_continuations

from ..conftest import TINY, perturbed_tiny_model


@pytest.fixture(scope="module")
def model():
    """A tiny captioner with perturbed projection weights, so that images change what the LM says."""
    return perturbed_tiny_model()


@pytest.fixture(scope="module")
def images():
    data = ShapesDataset("test", size=6)
    return [data[i]["image"] for i in range(6)]


def test_one_image_prompt_equals_caption(model, images):
    assert model.complete([[im] for im in images], max_new_tokens=8) == model.caption(images, max_new_tokens=8)
    assert model.complete([images[0], "a picture of"], max_new_tokens=5) == model.caption(
        images[:1], prompt="a picture of", max_new_tokens=5
    )


def test_batch_of_prompts_with_different_image_counts_equals_each_alone(model, images):
    prompts = [
        [images[0], "a red circle.", images[1], "there is"],
        [images[2]],
        ["the shapes are", images[3], "a", images[4], "and", images[5], "a"],
        ["no image at all:"],
    ]
    batched = model.complete(prompts, max_new_tokens=6)
    alone = [model.complete(p, max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert len(set(batched)) > 1  # not a trivial case
    # each image lands at its own place: the layout has k slots per image, in reading order
    embeds, layout = encode(model, prompts)
    assert layout.image_mask.sum(1).tolist() == [2 * model.prefix_length, model.prefix_length,
                                                 3 * model.prefix_length, 0]


def test_image_order_matters(model, images):
    e1, _ = encode(model, [[images[0], "a", images[1], "a"]])
    e2, _ = encode(model, [[images[1], "a", images[0], "a"]])
    assert not torch.allclose(e1, e2)


def test_likelihood_scores_equal_a_full_forward_pass(model, images):
    prompt = [images[0], "a red circle.", images[1], "this is a"]
    candidates = [" red circle.", " blue", " green square and a star"]
    scores = score_continuations(model, prompt, candidates)
    for candidate, got in zip(candidates, scores, strict=True):
        ids = model.tokenizer(candidate, add_special_tokens=False).input_ids
        embeds, layout = encode(model, [prompt + [candidate]])  # the whole sequence at once, no cache
        with torch.no_grad():
            logits = model.lm(inputs_embeds=embeds, attention_mask=layout.attention_mask).logits[0].float()
        n = len(ids)
        logp = F.log_softmax(logits[-n - 1 : -1], dim=-1)
        expected = sum(logp[j, t].item() for j, t in enumerate(ids))
        assert got["tokens"] == n
        assert got["sum"] == pytest.approx(expected, abs=1e-4)
        assert got["mean"] == pytest.approx(expected / n, abs=1e-4)


def test_the_prompt_runs_once_for_all_candidates(model, images):
    lengths = []
    hook = model.lm.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(
            (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape
        ),
        with_kwargs=True,
    )
    try:
        score_continuations(model, [images[0], "this is a"], [" red", " blue circle", " star"])
    finally:
        hook.remove()
    assert len(lengths) == 2  # the prompt once (batch 1), then every candidate in one batch on its cache
    assert lengths[0][0] == 1 and lengths[1][0] == 3


def test_controls(images):
    prompts = [[images[0], "q1 a1\n", images[1], "q"], [images[2], "q2 a2\n", images[3], "q"]]
    blind = apply_control(prompts, "blind")
    assert all(im.getextrema() == ((0, 0), (0, 0), (0, 0)) for p in blind for im in p if not isinstance(im, str))
    text_only = apply_control(prompts, "text_only")
    assert [render(p) for p in text_only] == ["q1 a1\n<image>q", "q2 a2\n<image>q"]
    assert text_only[0][1] is images[1]
    shuffled = apply_control(prompts, "shuffled")
    assert shuffled[0][2] is images[3] and shuffled[1][2] is images[1] and shuffled[0][0] is images[0]
    assert apply_control(prompts, "real") is prompts
    assert blank_image(images[0]).size == images[0].size


def test_fewshot_vqa_reports_shots_trials_and_controls(model):
    config = load_config(TINY, ["eval.vqa.shots=[0,2]", "eval.vqa.trials=2", "eval.vqa.controls=[blind,text_only]"])
    results, rows = evaluate_vqa(model, ShapesVQA("test", 6), ShapesVQA("train", 20), config.eval.vqa)
    assert set(results) == {"0", "2"}
    assert set(results["0"]) == {"real", "blind", "real_minus_blind"}  # text-only is real at 0 shots
    assert set(results["2"]) == {"real", "blind", "text_only", "real_minus_blind", "real_minus_text_only"}
    assert len(results["2"]["real"]["vqa_accuracy"]["trials"]) == 2
    assert len(results["0"]["real"]["vqa_accuracy"]["trials"]) == 1  # 0 shots do not depend on the draw
    real = results["2"]["real"]["vqa_accuracy"]["mean"]
    assert results["2"]["real_minus_blind"] == pytest.approx(real - results["2"]["blind"]["vqa_accuracy"]["mean"])
    two_shot = [r for r in rows if r["shots"] == 2 and r["control"] == "real"]
    assert len(two_shot) == 12 and all(r["prompt"].count("<image>") == 3 for r in two_shot)
    assert all(r["prompt"].count("Question:") == 3 and "Answer:" in r["prompt"] for r in two_shot)
    assert {"prediction", "normalized", "score", "answers", "raw", "family"} <= set(two_shot[0])
    # different trials draw different demonstrations
    by_trial = {t: [r["prompt"] for r in two_shot if r["trial"] == t] for t in (0, 1)}
    assert by_trial[0] != by_trial[1]


def test_binding_open_and_closed_with_blind(model):
    config = load_config(TINY, ["eval.binding.ways=[2]", "eval.binding.shots=[1]", "eval.binding.episodes=4"])
    results, rows = evaluate_binding(model, config.eval.binding)
    cell = results["2way_1shot"]
    assert set(cell) == {"open", "closed"}
    for mode in ("open", "closed"):
        assert 0 <= cell[mode]["real"]["binding_accuracy"]["mean"] <= 1 and cell[mode]["real"]["chance"] == 0.5
    closed = [r for r in rows if r["mode"] == "closed" and r["control"] == "real"]
    assert len(closed) == 4 and all(len(r["candidate_scores"]) == 2 for r in closed)
    assert all(r["prompt"].startswith("Answer with ") and r["prompt"].count("<image>") == 3 for r in closed)


@pytest.mark.parametrize("task", ["vqa", "binding"])
def test_evaluate_cli_tasks_write_metrics_and_examples(model, tmp_path, task, capsys):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    out = tmp_path / "eval"
    argv = ["--model", str(folder), "--task", task, "--shots", "1", "--split", "test", "--out", str(out),
            "--no-progress", "eval.vqa.max_questions=4", "eval.vqa.trials=1", "eval.binding.ways=[2]",
            "eval.binding.episodes=3", "eval.binding.modes=[closed]", "data.test=shapes:test"]
    assert evaluate_main(argv) == 0
    metrics = json.loads((out / f"test_{task}_metrics.json").read_text())
    lines = (out / f"test_{task}_examples.jsonl").read_text().splitlines()
    assert metrics and lines and "real_minus_blind" in json.dumps(metrics)
    assert "| " in capsys.readouterr().out  # the table is printed


def test_multi_image_sequences_place_each_caption_after_its_image(model):
    tok = model.tokenizer
    collate = CaptionCollator(tok, lambda im: torch.zeros(3, 8, 8), 2, 16, [tok.bos_token_id], images_per_sequence=2)
    items = [{"image": None, "caption": c, "captions": [c], "image_id": str(i)}
             for i, c in enumerate(["a red circle.", "a blue square.", "a star.", "a big green star."])]
    batch = collate(items)
    assert batch.pixel_values.shape[0] == 4 and batch.size == 2  # four images in two sequences
    row = batch.layout
    ids = [tok("a red circle.", add_special_tokens=False).input_ids + [tok.eos_token_id],
           tok("a blue square.", add_special_tokens=False).input_ids + [tok.eos_token_id]]
    expected_mask = [False] + [True] * 2 + [False] * len(ids[0]) + [True] * 2 + [False] * len(ids[1])
    assert row.image_mask[0, : len(expected_mask)].tolist() == expected_mask
    labels = row.labels[0].tolist()
    assert labels[3 : 3 + len(ids[0])] == ids[0] and labels[3 + len(ids[0]) + 2 : len(expected_mask)] == ids[1]
    assert labels[1:3] == [IGNORE, IGNORE]


def test_train_blind_and_packed_training_run(tmp_path, monkeypatch):
    from frozen_prefix import FrozenPrefixCaptioner, fit

    seen = []  # the pixels the encoder's first layer reads in every training forward pass (grad on)
    built = FrozenPrefixCaptioner.__init__

    def init(self, *args, **kwargs):
        built(self, *args, **kwargs)
        for layer in self.encoder.modules():
            if isinstance(layer, torch.nn.Conv2d) and layer.in_channels == 3:
                layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone())
                                                if torch.is_grad_enabled() else None)

    monkeypatch.setattr(FrozenPrefixCaptioner, "__init__", init)
    model = fit(TINY, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "data.images_per_sequence=2",
                       "data.blank_images=true", "eval.splits=[]"])
    assert model.config.data.blank_images and model.config.data.images_per_sequence == 2
    black = model.pixel_values([Image.new("RGB", (64, 64))])[0]
    assert sum(len(x) for x in seen) >= 2 * model.config.train.batch_size  # two steps' images reached the encoder
    assert all(torch.allclose(x, black.expand_as(x).to(x.dtype), atol=1e-5) for x in seen)  # and all were black
    with pytest.raises(Exception, match="not a multiple of data.images_per_sequence"):
        load_config(TINY, ["train.batch_size=7", "data.images_per_sequence=2"])


def test_answer_extraction_and_rescoring_saved_rows(model):
    from frozen_prefix.evaluation.fewshot import answer_text, score_vqa_rows

    assert answer_text(" red.\nQuestion: what") == "red" and answer_text("two circles Question: x") == "two circles"
    assert answer_text("yes!") == "yes" and answer_text("1.5") == "1.5"  # inner periods stay
    config = load_config(TINY, ["eval.vqa.shots=[0,1]", "eval.vqa.trials=2", "eval.vqa.controls=[blind]"])
    results, rows = evaluate_vqa(model, ShapesVQA("test", 4), ShapesVQA("train", 10), config.eval.vqa)
    saved = [json.loads(json.dumps(r)) for r in rows]  # as written to and read back from the examples file
    assert score_vqa_rows(saved)[0] == results
    forced = [{**r, "raw": r["answers"][0] + "."} for r in saved]  # every answer right, with a full stop
    rescored, _ = score_vqa_rows(forced)
    assert all(by["real"]["vqa_accuracy"]["mean"] == 1.0 for by in rescored.values())
