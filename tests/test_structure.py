"""Package structure: an acyclic import graph, the fit/train names, fp16 on the CPU, no LM code without consent."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import frozen_prefix
from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix.errors import FrozenPrefixError
from frozen_prefix.evaluate import main as evaluate_main
from frozen_prefix.models.lm import build_tiny_tokenizer

from .conftest import ROOT, TINY

# ---------------------------------------------------------------------------- the import graph


def module_name(path: Path, root: Path, package: str) -> str:
    """frozen_prefix/data/base.py -> frozen_prefix.data.base; a package's __init__.py -> the package."""
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports, at module level or inside functions."""
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against this module's package
                    base_parts = name.split(".") if is_package else name.split(".")[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from . import generate`: the name may be a submodule, else it is a name in the package
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files and "." in target:  # a name inside a module
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_cycle_finder_sees_function_level_and_submodule_imports(tmp_path):
    """The checker itself: a cycle closed by `from . import b` inside a function is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from .sub.c import C\nA = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("def f():\n    from .. import b\n")
    (pkg / "b.py").write_text("import pkg.a\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.sub.c"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.c", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("import pkg.sub\n")
    assert find_cycle(import_graph(pkg, "pkg")) is None


def test_package_import_graph_is_acyclic():
    """No module of frozen_prefix imports, directly or through others, one that imports it back."""
    root = Path(frozen_prefix.__file__).parent
    graph = import_graph(root, "frozen_prefix")
    assert "frozen_prefix.train" in graph["frozen_prefix"]  # the function-level import in fit is seen
    assert "frozen_prefix.generate" in graph["frozen_prefix.captioner"]  # `from . import generate`
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_frozen_core_imports_no_variant_no_data_and_no_decoding():
    """models/captioner.py knows the plug-in interface only: the variants register themselves from their own files."""
    graph = import_graph(Path(frozen_prefix.__file__).parent, "frozen_prefix")
    core = graph["frozen_prefix.models.captioner"]
    assert "frozen_prefix.models.variants.base" in core  # the interface is read (the graph can see it)
    variants = {m for m in graph if m.startswith("frozen_prefix.models.variants.")}
    variants.discard("frozen_prefix.models.variants.base")
    assert variants >= {"frozen_prefix.models.variants.fusion", "frozen_prefix.models.variants.deep"}
    assert not core & variants
    assert not {m for m in core if m.startswith(("frozen_prefix.data", "frozen_prefix.generate"))}


# ---------------------------------------------------------------------------- fit and the train module


def test_fit_is_a_function_and_train_is_the_module(monkeypatch):
    """`frozen_prefix.fit` stays a function after `import frozen_prefix.train`, and calls train.fit."""
    import frozen_prefix.train as t

    assert inspect.ismodule(t) and frozen_prefix.train is t
    assert inspect.isfunction(frozen_prefix.fit) and inspect.isfunction(t.fit)
    assert list(inspect.signature(frozen_prefix.fit).parameters) == list(inspect.signature(t.fit).parameters)
    calls = []
    monkeypatch.setattr(t, "fit", lambda config, overrides=None: calls.append((config, overrides)) or "trained")
    assert frozen_prefix.fit("x.yaml", ["a.b=1"]) == "trained" and calls == [("x.yaml", ["a.b=1"])]


@pytest.mark.slow
def test_python_m_train_help_is_clean():
    """`python -m frozen_prefix.train --help` exits 0 with no RuntimeWarning about the module."""
    result = subprocess.run(
        [sys.executable, "-W", "default", "-m", "frozen_prefix.train", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m frozen_prefix.train" in result.stdout and "--config" in result.stdout
    assert "RuntimeWarning" not in result.stderr and "found in sys.modules" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------- fp16 on the CPU


def test_fp16_trains_on_cpu(tmp_path):
    """train.precision=fp16 runs on the CPU: a gradient scaler, its state checkpointed, no bad steps."""
    run = tmp_path / "run"
    overrides = [f"train.output_dir={run}", "train.precision=fp16", "train.max_steps=2", "train.log_every=1",
                 "train.batch_size=4", "eval.splits=[]", "data.val=null", "train.device=cpu"]
    model = frozen_prefix.fit(TINY, overrides)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["bad_steps"] == 0 for r in steps)
    state = torch.load(run / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    assert state["trainer"]["scaler"] is not None and state["trainer"]["scaler"]["scale"] > 0
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.trainable_parameters())


# ---------------------------------------------------------------------------- no LM code without consent


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies trusted remote code into a modules cache: keep it in tmp_path and out of sys.modules."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def evil_lm(folder: Path, marker: Path) -> Path:
    """A local LM folder whose config.json maps the Auto classes to its own module, which writes marker on import."""
    folder.mkdir(parents=True)
    build_tiny_tokenizer().save_pretrained(folder)  # a tokenizer that loads: the model's code is what is asked for
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"auto_map": auto_map, "architectures": ["EvilModel"]}))
    (folder / "modeling_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('this code ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n\n\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n\n\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
    )
    return folder


@pytest.fixture
def evil_model_dir(tmp_path):
    """A saved tiny model whose config.yaml names the evil LM and asks for model.trust_remote_code: true."""
    marker = tmp_path / "marker"
    lm = evil_lm(tmp_path / "evil_lm", marker)
    saved = FrozenPrefixCaptioner(load_config(TINY)).save_pretrained(tmp_path / "model")
    config = yaml.safe_load((saved / "config.yaml").read_text())
    config["model"].update(lm=str(lm), trust_remote_code=True)
    (saved / "config.yaml").write_text(yaml.safe_dump(config))
    return saved, marker


def test_saved_folder_cannot_turn_on_remote_code(evil_model_dir, modules_cache, caplog):
    """from_pretrained(dir) never imports the LM's own code, whatever its config.yaml says; the caller can."""
    saved, marker = evil_model_dir
    with caplog.at_level(logging.WARNING, logger="frozen_prefix"), pytest.raises(Exception):  # noqa: B017
        FrozenPrefixCaptioner.from_pretrained(saved)  # the LM cannot load without its code
    assert not marker.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("trust_remote_code" in w and str(saved) in w for w in warnings), warnings
    # The check above means something: the caller's own consent does run the folder's code.
    with pytest.raises(Exception):  # noqa: B017  (the evil "model" has no weights)
        FrozenPrefixCaptioner.from_pretrained(saved, trust_remote_code=True)
    assert marker.read_text() == "this code ran"


def test_remote_code_refusal_is_a_one_line_error(evil_model_dir):
    """Refusing the LM's code is a FrozenPrefixError that says how to allow it."""
    saved, marker = evil_model_dir
    with pytest.raises(FrozenPrefixError, match="trust.remote.code"):
        FrozenPrefixCaptioner.from_pretrained(saved)
    assert not marker.exists()


def test_evaluate_cli_runs_no_lm_code_without_the_flag(evil_model_dir, capsys):
    """`python -m frozen_prefix.evaluate --model DIR` without --trust-remote-code never imports the LM's code."""
    saved, marker = evil_model_dir
    evaluate_main(["--model", str(saved), "--no-progress"])
    assert not marker.exists()


def test_evaluate_cli_refusal_exits_2(evil_model_dir, capsys):
    """Without --trust-remote-code the evaluate command refuses with one line and exit code 2."""
    saved, marker = evil_model_dir
    assert evaluate_main(["--model", str(saved), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if ln.startswith("error:")]) == 1 and "trust" in err[-1], err
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted((ROOT / "docs" / "scripts").glob("*.py")), ids=lambda p: p.stem)
def test_the_research_records_scripts_still_run(script):
    """The diagnostics the research record cites still import the library and parse their flags."""
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=99)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-1500:]
