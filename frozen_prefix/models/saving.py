"""The model folder: save_pretrained / from_pretrained / the Hub, and the weights encoder_weights / init_from name.

A folder holds the resolved config (config.yaml, and config.json for Hugging Face style tools), the trainable
weights in safetensors, a small frozen_prefix.json and the model card; never the frozen LM's weights (but for the
fine-tuned-LM baseline), only a reference to the LM. Loading reads data only: nothing in a folder runs.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import Config, load_config, save_config
from ..errors import FrozenPrefixError
from . import hub
from .encoder_weights import checked_state, load_timm_checkpoint
from .lm import SMOLLM2_ALIASES, TINY_ALIAS
from .model_card import CARD_NAME, write_model_card
from .weights import DamagedFileError, load_weights, short_reason

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
FILE_READING_TIMM_ARGS = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"}
CONFIG_NAME = "config.yaml"
CONFIG_JSON = "config.json"  # the same resolved config, for tools that expect a Hugging Face style folder
INFO_NAME = "frozen_prefix.json"
HUB_FILES = (CONFIG_NAME, CONFIG_JSON, WEIGHTS_NAME, INFO_NAME, CARD_NAME)  # all a Hub download fetches: no code


def save_pretrained(
    model: Any, path: str | Path, metrics: dict[str, Any] | None = None, repo_id: str | None = None,
    weights: dict[str, torch.Tensor] | None = None, precision: str | None = None,
) -> Path:
    """Write the config (YAML and JSON), the trainable weights (the LM's only if fine-tuned) and a model card.

    metrics (flat or {split: {name: value}}) are listed in the card; repo_id is the name its usage lines show;
    weights, when given, are written instead of trainable_state_dict() (FSDP: the shards gathered whole);
    precision is what train.precision resolved to in training, for the card.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    save_config(config, path / CONFIG_NAME)
    (path / CONFIG_JSON).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tmp = path / (WEIGHTS_NAME + ".tmp")
    weights = model.trainable_state_dict() if weights is None else weights
    save_file(weights, str(tmp), metadata={"format": "pt", "lm": config.model.lm})
    tmp.replace(path / WEIGHTS_NAME)
    (path / INFO_NAME).write_text(
        json.dumps(
            {"lm": config.model.lm, "weights": WEIGHTS_NAME, "lm_weights_included": config.model.lm_trainable,
             "variants": list(model.variants)}, indent=2,
        )
    )
    write_model_card(path, config, metrics, repo_id, precision=precision)
    return path


def push_to_hub(
    model: Any, repo_id: str, private: bool = False, token: str | None = None, metrics: dict[str, Any] | None = None
) -> str:
    """Upload the saved folder (config, trainable weights, model card) to a Hub model repo; return its URL."""
    if not hub.looks_like_repo_id(repo_id):
        raise FrozenPrefixError(f"{repo_id!r} is not a Hub repo id; use the form 'user/name'")
    lm = model.config.model.lm
    if not hub.looks_like_repo_id(lm) and lm.lower() not in (*SMOLLM2_ALIASES, TINY_ALIAS):
        log.warning("the LM reference %r is a local path: whoever loads this model needs their own copy", lm)
    with tempfile.TemporaryDirectory(prefix="frozen-prefix-push-") as folder:
        save_pretrained(model, folder, metrics=metrics, repo_id=repo_id)
        return hub.upload_folder(folder, repo_id, private=private, token=token)


def from_pretrained(
    cls: type, path: str | Path, device: torch.device | str = "cpu", trust_remote_code: bool = False, **kwargs: Any
) -> Any:
    """Rebuild a saved model of class cls: the config, the LM it references, and the trained weights.

    Code shipped with the referenced LM runs only when the caller passes trust_remote_code=True: a model
    folder's own config cannot ask for it (it names the LM, so it could name one with any code in it).
    """
    name = str(path)
    path = Path(path).expanduser()
    if not path.exists() and hub.looks_like_repo_id(name):  # 'user/repo': its data files from the Hub
        path = hub.download_model(name, HUB_FILES)
        if not _is_model_folder(path):
            raise FrozenPrefixError(
                f"Hub repo {name!r} holds no frozen_prefix model (needs {CONFIG_NAME} or {CONFIG_JSON}, and "
                f"{WEIGHTS_NAME}); check the repo id"
            )
    if not _is_model_folder(path):
        raise FrozenPrefixError(
            f"{path} is not a saved model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "give the model/ folder of a run"
        )
    config = _load_saved_config(path)
    if config.model.trust_remote_code and not trust_remote_code:
        log.warning(
            "%s asks to run the LM's own code (model.trust_remote_code: true); not done: pass "
            "trust_remote_code=True (or --trust-remote-code) if you trust %s", path, config.model.lm,
        )
    config.model.trust_remote_code = trust_remote_code
    # the folder's own weights hold the encoder and the rest; never read a path it names
    config.model.encoder_weights = config.model.init_from = None
    # timm arguments that read files: a folder someone else wrote must not point the loader at local paths
    reads_files = sorted(set(config.model.encoder_kwargs) & FILE_READING_TIMM_ARGS)
    if reads_files:
        log.warning("%s: ignoring model.encoder_kwargs %s (they read files)", path, ", ".join(reads_files))
        config.model.encoder_kwargs = {k: v for k, v in config.model.encoder_kwargs.items() if k not in reads_files}
    weights = load_weights(path / WEIGHTS_NAME)  # read (and checked) before the minute the LM may take
    model = cls(config, device=device, pretrained_encoder=False, **kwargs)
    model.load_trainable_state_dict({k: v.to(model.device) for k, v in weights.items()})
    return model.eval()


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """The encoder's weights from a run's model folder, a .safetensors of ours, or a timm checkpoint file.

    A file with encoder.* keys is one of ours (a run's weights: those keys are the encoder's); any other
    .safetensors, .pth or .bin (a folder's model.safetensors included) is read as a timm checkpoint, strictly.
    """
    option = "model.encoder_weights"
    path = Path(path).expanduser()
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if file.suffix.lower() != ".safetensors" or not _is_ours(file):
        load_timm_checkpoint(encoder, file, option)
        return
    weights = load_weights(file)
    own = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    encoder.load_state_dict(checked_state(own, encoder, file, option), strict=True)  # checked: nothing half-loaded
    log.info("%s: weights loaded from %s", option, file)


def _is_ours(file: Path) -> bool:
    """A .safetensors written by this library (a run's weights: encoder.* keys); its header is all that is read."""
    if not file.is_file():
        return False  # load_timm_checkpoint says it is missing
    try:
        with safe_open(str(file), "pt") as f:
            return any(k.startswith("encoder.") for k in f.keys())
    except (SafetensorError, OSError) as e:
        raise DamagedFileError(file, short_reason(e), "give a complete weights file") from e


def load_initial_weights(modules: nn.ModuleDict, path: str | Path, fresh: tuple[str, ...] = ()) -> None:
    """Every trainable weight from a run's model folder or .safetensors file: a second stage starts where one ended.

    The modules named in `fresh` (variants that start as a no-op) may be missing there: they keep their initial
    weights.
    """
    weights, file = _weights_file(path, "model.init_from")
    kept = {k: v for k, v in modules.state_dict().items() if k.split(".", 1)[0] in fresh and k not in weights}
    for name in sorted({k.split(".", 1)[0] for k in kept}):
        log.info("model.init_from: %s has no %s; it starts as a no-op", file, name)
    _load_strict(modules, {**weights, **kept}, file, "model.init_from",
                 "train the second stage with the first's model settings")


def _weights_file(path: str | Path, option: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a model folder's weights or of a .safetensors file, and that file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FrozenPrefixError(f"{option}: {path} does not exist; train that run first or give another model folder")
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if file.suffix != ".safetensors":
        raise FrozenPrefixError(f"{option}: {path} is neither a model folder nor a .safetensors file; give one of them")
    return load_weights(file), file


def _load_strict(module: nn.Module, weights: dict[str, torch.Tensor], file: Path, option: str, fix: str) -> None:
    """load_state_dict(strict=True), a mismatch reported in one line."""
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        why = str(e).splitlines()[1].strip()[:120]
        raise FrozenPrefixError(f"{option}: {file} does not fit this model ({why}); {fix}") from e
    log.info("%s: weights loaded from %s", option, file)


def _is_model_folder(path: Path) -> bool:
    """A save_pretrained folder: a config (YAML, or JSON alone) and the trainable weights."""
    has_config = (path / CONFIG_NAME).is_file() or (path / CONFIG_JSON).is_file()
    return path.is_dir() and has_config and (path / WEIGHTS_NAME).is_file()


def _load_saved_config(path: Path) -> Config:
    """config.yaml, or config.json where only that exists (both are data: nothing in them runs)."""
    if (path / CONFIG_NAME).is_file():
        return load_config(path / CONFIG_NAME)
    try:
        values = json.loads((path / CONFIG_JSON).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FrozenPrefixError(f"{path / CONFIG_JSON} is not valid JSON ({e}); save the model again") from e
    if not isinstance(values, dict):
        raise FrozenPrefixError(f"{path / CONFIG_JSON} must hold a mapping of config sections; save the model again")
    return load_config(values)
