"""A variant and a projection of one's own, in a file outside the package: trained, decoded, saved, loaded."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from frozen_prefix import FrozenPrefixCaptioner, fit, load_config
from frozen_prefix.errors import ConfigError

from ..conftest import ROOT, TINY

PLUGIN = textwrap.dedent('''
    """A variant and a projection of a user's own: nothing in frozen_prefix names them."""
    import torch
    from torch import nn

    from frozen_prefix import Projection, Variant, register_projection, register_variant
    from frozen_prefix.errors import ConfigError


    @register_variant("scaled_prefix")
    class ScaledPrefix(Variant):
        """Multiplies each image's prefix by a learned scalar (starts at model.variant_options.scaled_prefix.init)."""

        def __init__(self, config, lm_info):
            super().__init__(config, lm_info)
            self.scale = nn.Parameter(torch.tensor(float(self.options(config).get("init", 1.0))))

        @classmethod
        def check(cls, config):
            if set(cls.options(config)) - {"init"}:
                raise ConfigError("model.variant_options.scaled_prefix: the only option is init")

        def condition_prefix(self, prefix, inputs):
            return prefix * self.scale


    @register_projection("pooled_pair")
    class PooledPair(Projection):
        """The pooled vector through two Linear maps, one per half of the prefix."""

        def __init__(self, config, feature_dim, lm_dim):
            super().__init__(config, feature_dim, lm_dim)
            self.first = nn.Linear(feature_dim, (self.k // 2) * lm_dim)
            self.second = nn.Linear(feature_dim, (self.k - self.k // 2) * lm_dim)

        def forward(self, features):
            b = features.shape[0]
            return torch.cat([self.first(features).view(b, -1, self.lm_dim),
                              self.second(features).view(b, -1, self.lm_dim)], dim=1)
''')

OVERRIDES = ["model.variants=[scaled_prefix]", "model.variant_options.scaled_prefix.init=0.5",
             "model.projection=pooled_pair", "train.max_steps=4", "train.val_every=0", "train.checkpoint_every=0",
             "data.train.size=16", "eval.splits=[]"]


def import_plugin(path):
    """Import the plugin file as a user's notebook would (it registers itself)."""
    spec = importlib.util.spec_from_file_location("user_plugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plugin(tmp_path):
    """The plugin written to a file outside the package, and imported."""
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    import_plugin(path)
    return path


def test_a_variant_of_ones_own_trains_decodes_saves_and_loads(plugin, tmp_path):
    model = fit(TINY, [f"train.output_dir={tmp_path / 'run'}", *OVERRIDES])
    assert list(model.variants) == ["scaled_prefix"]
    assert type(model.projection).__name__ == "PooledPair"
    scale = model.variants["scaled_prefix"].scale
    assert scale.item() != 0.5  # it trained: the optimizer moved it from its initial value
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert "scaled_prefix.scale" in saved and any(k.startswith("projection.first.") for k in saved)
    assert not any(k.startswith("lm.") for k in saved)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "variants (trained) | `scaled_prefix`" in card
    info = json.loads((tmp_path / "run" / "model" / "frozen_prefix.json").read_text())
    assert info["variants"] == ["scaled_prefix"]
    loaded = FrozenPrefixCaptioner.from_pretrained(tmp_path / "run" / "model")
    assert loaded.variants["scaled_prefix"].scale.item() == scale.item()
    images = torch.randn(2, *model.image_config["input_size"])
    model.eval()
    assert loaded.caption(images, max_new_tokens=5) == model.caption(images, max_new_tokens=5)
    # the hook is really on the image's way in: another scale, another prefix in the LM's input
    ids, mask = torch.tensor([[0, 0, 0, 0, 0, 3]]), torch.tensor([[False, True, True, True, True, False]])
    with torch.no_grad():
        before = loaded.input_embeddings(ids, mask, loaded.embed_images(images[:1]))
        loaded.variants["scaled_prefix"].scale.mul_(2)
        after = loaded.input_embeddings(ids, mask, loaded.embed_images(images[:1]))
    torch.testing.assert_close(after[mask], before[mask] * 2)
    torch.testing.assert_close(after[~mask], before[~mask])


def test_an_unregistered_variant_or_its_stray_options_are_one_line_errors(plugin):
    with pytest.raises(ConfigError, match="no variant named 'scaled_prefx' is registered; did you mean 'scaled_pref"):
        load_config(TINY, ["model.variants=[scaled_prefx]"])
    with pytest.raises(ConfigError, match="model.variant_options.scaled_prefix: that variant is not on"):
        load_config(TINY, ["model.variant_options.scaled_prefix.init=2"])
    with pytest.raises(ConfigError, match="the only option is init"):  # the variant checks its own options
        load_config(TINY, ["model.variants=[scaled_prefix]", "model.variant_options.scaled_prefix.nope=1"])
    with pytest.raises(ConfigError, match="model.projection: 'pooled_pie' is not one of: .*did you mean 'pooled_pair'"):
        load_config(TINY, ["model.projection=pooled_pie"])


@pytest.mark.slow
def test_the_commands_train_and_caption_with_a_plugin_file(tmp_path):
    path = tmp_path / "elsewhere" / "my_plugin.py"
    path.parent.mkdir()
    path.write_text(PLUGIN)
    run = tmp_path / "run"
    train = [sys.executable, "-m", "frozen_prefix.train", "--config", str(TINY), "--plugin", str(path),
             f"train.output_dir={run}", *OVERRIDES]
    done = subprocess.run(train, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    image = ROOT / "tests" / "fixtures" / "red_square.png"
    if not image.is_file():
        from frozen_prefix.data import ShapesDataset

        image = tmp_path / "shape.png"
        ShapesDataset("test", size=1)[0]["image"].save(image)
    caption = [sys.executable, "-m", "frozen_prefix.caption", "--model", str(run / "model"), "--plain",
               "--max-new-tokens", "4", str(image)]
    refused = subprocess.run(caption, capture_output=True, text=True, cwd=ROOT, timeout=600)
    # without the plugin the saved model's variant is unknown: nothing named in a folder is imported by itself
    assert refused.returncode == 2 and "no variant named 'scaled_prefix' is registered" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    done = subprocess.run([*caption, "--plugin", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1
