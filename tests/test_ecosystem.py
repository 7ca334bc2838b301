"""The ecosystem around the model: HF-style folders and the Hub, one command, the config reference, logging sinks,
plots and the quickstart notebook."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from frozen_prefix import FrozenPrefixCaptioner, FrozenPrefixError, commands, config_doc, fit, load_config
from frozen_prefix.data import ShapesDataset
from frozen_prefix.models import hub
from frozen_prefix.models.model_card import flatten_metrics, model_card
from frozen_prefix.models.precision import resolve_precision
from frozen_prefix.training import plots, sinks

from .conftest import ROOT, TINY

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
MODEL_FILES = {"config.yaml", "config.json", "model.safetensors", "frozen_prefix.json", "README.md"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny training run (6 steps, TensorBoard on when installed), shared by the tests that read its outputs."""
    run = tmp_path_factory.mktemp("eco") / "run"
    fit(TINY, [
        f"train.output_dir={run}", "train.max_steps=6", "train.log_every=2", "train.val_every=2",
        f"train.tensorboard={str(HAS_TENSORBOARD).lower()}",
    ])
    return run


def _image():
    return ShapesDataset("test", size=1)[0]["image"]


def _one_line(message: str) -> bool:
    return len(str(message).strip().splitlines()) == 1


# ---------------------------------------------------------------------------- the saved folder and its model card


def test_saved_folder_is_hugging_face_style(trained_run):
    folder = trained_run / "model"
    assert MODEL_FILES <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text()) == yaml.safe_load((folder / "config.yaml").read_text())
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: frozen_prefix\npipeline_tag: image-to-text\n")
    for text in ("tiny-gpt2", "`test_resnet`", "`spatial`", "| prefix length k | 4 |", "split `train` (256 images",
                 "| steps x batch | 6 x 8 |", "## Metrics", "(step 6)", "| val_loss |", "val/shapes_exact",
                 'FrozenPrefixCaptioner.from_pretrained("path/to/this/folder")', "frozen-prefix caption --model"):
        assert text in card, text
    assert "val/images" not in card  # counts are not metrics
    assert f"| precision, seed | auto ({resolve_precision(torch.device('cpu'), 'auto')}), 0 |" in card


def test_save_pretrained_takes_metrics_for_the_card(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "a", metrics={"test": {"cider": 1.2345, "images": 5}, "flag": True})
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| test/cider | 1.234 |" in card and "test/images" not in card and "flag" not in card
    assert "pycocoevalcap" in card
    tiny_model.save_pretrained(tmp_path / "b", repo_id="someone/tiny-captioner")
    card = (tmp_path / "b" / "README.md").read_text()
    assert "## Metrics" not in card and 'from_pretrained("someone/tiny-captioner")' in card
    assert flatten_metrics({"a": {"b": 1, "skipped": 2}, "c": float("nan"), "d": "x"}) == {"a/b": 1.0}


def test_the_card_records_what_auto_precision_chose(tiny_model):
    config = copy.deepcopy(tiny_model.config)
    config.train.precision = "auto"
    assert f"| precision, seed | auto (bf16), {config.train.seed} |" in model_card(config, precision="bf16")
    assert f"| precision, seed | auto, {config.train.seed} |" in model_card(config)  # not trained here: unknown
    config.train.precision = "fp32"
    assert f"| precision, seed | fp32, {config.train.seed} |" in model_card(config, precision="fp32")


def test_a_folder_with_only_config_json_loads(trained_run, tmp_path):
    folder = tmp_path / "json_only"
    shutil.copytree(trained_run / "model", folder)
    (folder / "config.yaml").unlink()
    model = FrozenPrefixCaptioner.from_pretrained(folder)
    assert model.config == FrozenPrefixCaptioner.from_pretrained(trained_run / "model").config
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(FrozenPrefixError, match="must hold a mapping"):
        FrozenPrefixCaptioner.from_pretrained(folder)


@pytest.mark.slow
def test_a_local_folder_loads_in_a_fresh_process(trained_run, tmp_path):
    image = tmp_path / "shape.png"
    _image().save(image)
    expected = FrozenPrefixCaptioner.from_pretrained(trained_run / "model").caption([str(image)])[0]
    code = (
        "from frozen_prefix import FrozenPrefixCaptioner; "
        f"m = FrozenPrefixCaptioner.from_pretrained({str(trained_run / 'model')!r}); "
        f"print(m.caption([{str(image)!r}])[0])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == expected


# ---------------------------------------------------------------------------- the Hub (unreachable in tests)


@pytest.mark.parametrize(("name", "expected"), [
    ("someone/captioner", True), ("Org-1/model.v2_x", True), ("runs/shapes/model", False), ("./model", False),
    ("/abs/model", False), ("model", False), ("a/b.gguf", False), ("a/../b", False), ("-a/b", False),
])
def test_repo_id_shape(name, expected):
    assert hub.looks_like_repo_id(name) is expected


def test_from_pretrained_hub_offline_is_one_line(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FrozenPrefixError) as info:
        FrozenPrefixCaptioner.from_pretrained("someone/no-such-captioner")
    message = str(info.value)
    assert message.startswith("cannot reach the Hugging Face Hub for 'someone/no-such-captioner' (offline mode")
    assert message.endswith("give a local folder or connect") and _one_line(message)
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)  # what huggingface_hub raises offline


def test_commands_report_an_unreachable_hub_in_one_line(capsys):
    from frozen_prefix import evaluate

    assert evaluate.main(["--model", "someone/no-such-captioner"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach the Hugging Face Hub for 'someone/no-such-captioner'" in err and _one_line(err)
    assert evaluate.main(["--model", "no/such/model"]) == 2  # a path (two slashes) is never sent to the Hub
    assert "no/such/model is not a saved model folder" in capsys.readouterr().err


def test_hub_download_fetches_data_files_only(trained_run, monkeypatch):
    import huggingface_hub

    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(trained_run / "model")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = FrozenPrefixCaptioner.from_pretrained("someone/captioner")
    assert asked["repo_id"] == "someone/captioner" and set(asked["allow_patterns"]) == MODEL_FILES
    assert model.config.model.lm == "tiny-gpt2"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(trained_run / "eval"))
    with pytest.raises(FrozenPrefixError, match="'someone/captioner' holds no frozen_prefix model"):
        FrozenPrefixCaptioner.from_pretrained("someone/captioner")


def test_push_to_hub_offline_is_one_line(tiny_model, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FrozenPrefixError) as info:
        tiny_model.push_to_hub("someone/tiny-captioner")
    assert str(info.value).startswith("cannot reach the Hugging Face Hub to push to 'someone/tiny-captioner'")
    assert _one_line(info.value) and isinstance(info.value.__cause__, OfflineModeIsEnabled)
    with pytest.raises(FrozenPrefixError, match="is not a Hub repo id"):
        tiny_model.push_to_hub("not a repo")


def test_push_to_hub_uploads_the_saved_folder(tiny_model, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            files = {p.name: p.read_text() if p.suffix == ".md" else None for p in Path(folder_path).iterdir()}
            calls.append(("upload", repo_id, files))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = tiny_model.push_to_hub("someone/tiny-captioner", private=True, token="hf_test")
    assert url == "https://huggingface.co/someone/tiny-captioner"
    assert calls[0] == ("token", "hf_test") and calls[1] == ("create", "someone/tiny-captioner", True, True)
    _, repo_id, files = calls[2]
    assert set(files) == MODEL_FILES
    assert 'from_pretrained("someone/tiny-captioner")' in files["README.md"]


# ---------------------------------------------------------------------------- one command


def test_frozen_prefix_help_lists_the_commands(capsys):
    assert commands.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "caption", "config", "plot"):
        assert f"\n  {name} " in out
    assert commands.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["train", "evaluate", "caption", "config", "plot"])
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        commands.main([name, "--help"])
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_console_scripts_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["frozen-prefix"] == "frozen_prefix.commands:main"
    assert {"frozen-prefix-train", "frozen-prefix-evaluate", "frozen-prefix-caption"} <= set(scripts)


@pytest.mark.slow
def test_python_m_frozen_prefix_dispatches(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "frozen_prefix", "config", "--markdown"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == config_doc.markdown_table()


# ---------------------------------------------------------------------------- the config reference


def test_every_config_key_has_a_meaning():
    assert config_doc.undocumented_keys() == []  # a new field in config.py needs a trailing # comment
    keys = [doc.key for doc in config_doc.config_keys()]
    assert len(keys) == len(set(keys))
    for key in ("model.encoder", "data.train", "train.tensorboard", "train.wandb", "eval.vqa.shots",
                "eval.binding.ways", "SOURCE.kind"):
        assert key in keys


def test_config_command_prints_every_key(capsys):
    assert commands.main(["config"]) == 0
    out = capsys.readouterr().out
    for doc in config_doc.config_keys():
        assert f"{doc.key} = {doc.default}" in out and doc.meaning in out
    assert "model.prefix_length = 2    (int)\n    k: prefix embeddings per image" in out
    assert commands.main(["config", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| key | type | default | meaning |")
    assert "| `model.fusion` | prefix \\| sum \\| product" in table


def test_docs_config_reference_is_the_generated_table():
    page = (ROOT / config_doc.REFERENCE_PAGE).read_text(encoding="utf-8")
    assert config_doc.reference_block(page) == config_doc.markdown_table(), (
        f"{config_doc.REFERENCE_PAGE}'s configuration reference is stale: run "
        f"`frozen-prefix config --write {config_doc.REFERENCE_PAGE}`"
    )


def test_write_reference_refreshes_only_the_block(tmp_path, capsys):
    page = tmp_path / "config.md"
    page.write_text(f"# x\n\nbefore\n{config_doc.REFERENCE_START}\nold table\n{config_doc.REFERENCE_END}\nafter\n")
    assert commands.main(["config", "--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{config_doc.REFERENCE_END}\nafter\n")
    assert config_doc.reference_block(text) == config_doc.markdown_table()
    assert config_doc.write_reference(page) is False  # already up to date
    page.write_text("# no markers\n")
    assert commands.main(["config", "--write", str(page)]) == 2
    assert "markers" in capsys.readouterr().err


def test_readme_and_docs_link_only_to_files_in_the_repository():
    # every relative link of README.md and docs/*.md names a file or folder that exists (anchors aside)
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not path.startswith("mailto:"):
                if not (page.parent / path).exists():
                    missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert missing == []


# ---------------------------------------------------------------------------- logging sinks


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the tensorboard package")
def test_tensorboard_gets_scalars_samples_and_pictures(trained_run):
    from tensorboard.backend.event_processing import event_accumulator

    files = list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    acc = event_accumulator.EventAccumulator(
        str(trained_run / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "val_loss", "val/shapes_exact"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6]
    assert tags["images"] == ["val/samples"]
    assert {"config/text_summary", "val/samples/text_summary"} <= set(tags["tensors"])


def test_a_missing_sink_package_is_one_line(tmp_path, monkeypatch, capsys):
    from frozen_prefix import train

    monkeypatch.setattr(sinks, "_installed", lambda package: False)
    for key in ("tensorboard", "wandb"):
        run = tmp_path / key
        assert train.main(["--config", str(TINY), f"train.output_dir={run}", f"train.{key}=true"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: train.{key}=true needs the {key} package: pip install {key}"
        assert not run.exists()  # checked before the run folder is touched


def test_wandb_sink_logs_offline_by_default(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")

    class FakeRun:
        id = "abc123"

        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    fake.Image = lambda path: ("image", Path(path).name)
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(sinks, "_installed", lambda package: True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = load_config(TINY, ["train.wandb=true", "train.wandb_project=proj"])
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "val_per_image.jsonl").write_text(
        json.dumps({"image_id": "i0", "caption": "a red circle.", "references": ["a red circle."]}) + "\n"
    )
    (run / "eval" / "val_samples.png").write_bytes(b"png")
    log = sinks.open_sinks(config, run, None)
    log.log({"step": 2, "loss": 1.5, "final": True, "best_metric": "cider"})
    log.finish(run / "eval", ["val"], 5, 2)
    init = calls[0][1]
    assert init["mode"] == "offline" and init["project"] == "proj" and init["config"] == config.to_dict()
    assert calls[1] == ("log", {"loss": 1.5}, 2)
    assert calls[2][1]["val/samples"] == ("image", "val_samples.png") and calls[2][1]["val/captions"][2] == [
        ["i0", "a red circle.", "a red circle."]
    ]
    assert calls[-1] == ("finish",) and (run / "wandb_id.txt").read_text().strip() == "abc123"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sinks.open_sinks(config, run, 2)
    assert calls[-1][1]["mode"] == "disabled" and calls[-1][1]["id"] == "abc123"  # a resumed run continues its own


# ---------------------------------------------------------------------------- plots


def test_training_writes_curves_and_plot_draws_several_runs(trained_run, tmp_path, capsys):
    assert (trained_run / "curves.png").stat().st_size > 0
    other = tmp_path / "other"
    other.mkdir()
    lines = [{"step": 5, "loss": 2.0, "lr": 1e-3}, {"step": 10, "loss": 1.0, "lr": 5e-4, "val/cider": 0.5}]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 1')  # torn line
    out = tmp_path / "plots" / "curves.png"
    assert commands.main(["plot", str(trained_run), str(other), "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and str(out) in capsys.readouterr().out
    names = plots.curve_names([plots.read_metrics(trained_run), plots.read_metrics(other)])
    assert names[:3] == ["loss", "lr", "val_loss"] and "val/cider" in names and "val/shapes_exact" in names
    assert "val/images" not in names
    assert commands.main(["plot", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing not found; give run folders" in err and _one_line(err)


# ---------------------------------------------------------------------------- the quickstart notebook


@pytest.mark.slow
def test_quickstart_notebook_runs_offline(trained_run, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The last cell loads a trained model when there is one: point it at the tiny run so it runs too.
    monkeypatch.setenv("FROZEN_PREFIX_QUICKSTART_MODEL", str(trained_run / "model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    assert (tmp_path / "runs" / "quickstart" / "model" / "model.safetensors").is_file()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 3  # curves, tiny captions, loaded model
    assert not any("not found" in o.get("text", "") for o in outputs)
