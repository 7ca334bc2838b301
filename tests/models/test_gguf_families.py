"""`model.lm=/path/to/model.gguf` beyond Llama and Gemma-3: tiny GGUF files of other families, written here.

Each file is written from a seeded random transformers model the way llama.cpp's converter lays it out (its tensor
names from the `gguf` package's own name map, its metadata keys, a byte-level BPE vocabulary with merges), in F32 and
in Q8_0. Loading it through `load_lm` (converted once into the cache) must give back that very model: the weights
the file holds, de-quantized, and the logits of the original with those weights.
"""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from frozen_prefix import FrozenPrefixCaptioner, load_config
from frozen_prefix.models.lm import load_lm

from ..conftest import TINY, batch_for

# each writes GGUF files and converts them as a real LM is converted: with the real-LM tests, in make test only
pytestmark = pytest.mark.slow

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 128}
# What each family brings that Llama and Gemma-3 do not. The norm epsilons (and rope bases where transformers reads
# them from the file) are off their defaults, so that metadata read wrong, or not at all, changes the logits.
FAMILIES = {
    # an untied head, q/k/v biases, grouped-query attention, the qwen2 pre-tokenizer split
    "qwen2": {"config": {**SHAPE, "rms_norm_eps": 1e-3, "rope_theta": 5000.0}, "pre": "qwen2"},
    # Conv1D weights llama.cpp stores transposed, learned positions, LayerNorm, a tied head. n_positions stays 1024:
    # transformers reads gpt2.context_length into n_ctx, not n_positions, so a file of another length cannot load.
    "gpt2": {"config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 1024, "layer_norm_epsilon": 1e-3}},
    # fused qkv and gate_up projections; a padding id in the file (its config's default, 32000, is past this vocab)
    "phi3": {"config": {**SHAPE, "rms_norm_eps": 1e-3, "rope_theta": 5000.0}, "pad": True},
    # LayerNorm and biases everywhere, a GELU MLP, a tied head
    "starcoder2": {"config": {**SHAPE, "norm_epsilon": 1e-3}},
    # partial rotary; transformers tells qkv bias and the parallel residual from the tensor names
    "stablelm": {"config": {**SHAPE, "layer_norm_eps": 1e-3, "use_qkv_bias": True}},
}
TRANSPOSED = {"gpt2": (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")}
EPS_KEYS = {"rms_norm_eps": "add_layer_norm_rms_eps", "layer_norm_eps": "add_layer_norm_eps",
            "layer_norm_epsilon": "add_layer_norm_eps", "norm_epsilon": "add_layer_norm_eps"}
EOS = "<|endoftext|>"
WORDS = "a an the red green blue circle square triangle on left right of picture shows".split()
TEXT = " a red circle on the left of the picture"


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A GPT-2-style byte-level BPE: the 256 byte symbols, merges spelling out WORDS with their leading space, EOS."""
    spelling = bytes_to_unicode()
    tokens, merges = list(spelling.values()), []
    for word in WORDS:
        pieces = [spelling[b] for b in f" {word}".encode()]
        while len(pieces) > 1:
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
                tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return [*tokens, EOS], merges


def stored(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(what to write, what the file then holds de-quantized, one quantization step per element)."""
    if qtype == F32 or array.ndim == 1:  # llama.cpp keeps norms and biases in F32 in quantized files too
        return array, array, np.zeros_like(array)
    assert qtype == Q8_0  # a block of 32 values as int8 times one fp16 scale, max|block| / 127
    packed = gguf.quants.quantize(array, qtype)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    step = np.repeat(np.abs(array.reshape(-1, block)).max(axis=1) / 127, block).reshape(array.shape)
    return packed, gguf.quants.dequantize(packed, qtype), step


def write_gguf(family: str, path, qtype: gguf.GGMLQuantizationType):
    """A seeded random LM of the family, written as a GGUF file; returns it with the weights the file holds."""
    spec = FAMILIES[family]
    tokens, merges = byte_level_vocab()
    eos = len(tokens) - 1
    config = AutoConfig.for_model(family, vocab_size=len(tokens), bos_token_id=eos, eos_token_id=eos,
                                  pad_token_id=eos if spec.get("pad") else None, **spec["config"])
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    c = lm.config
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(f"tiny-{family}")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(getattr(c, "intermediate_size", None) or 4 * c.hidden_size)
    writer.add_head_count(c.num_attention_heads)
    if getattr(c, "num_key_value_heads", None):
        writer.add_head_count_kv(c.num_key_value_heads)
    for key, add in EPS_KEYS.items():
        if key in spec["config"]:
            getattr(writer, add)(getattr(c, key))
    if "rope_theta" in spec["config"]:
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    if spec.get("pre"):
        writer.add_tokenizer_pre(spec["pre"])
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.NORMAL] * eos + [gguf.TokenType.CONTROL])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    if spec.get("pad"):
        writer.add_pad_token_id(eos)

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == family)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    held, steps, head, embedding = {}, {}, None, None
    for hf_name, tensor in lm.state_dict().items():
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        if name == "token_embd.weight":
            embedding = hf_name
        if name == "output.weight" and tied:  # llama.cpp writes the head only when it is not the embedding
            head = hf_name
            continue
        array = tensor.numpy().astype(np.float32)
        transposed = name.endswith(TRANSPOSED.get(family, ()))
        if transposed:
            array = np.ascontiguousarray(array.T)
        data, back, step = stored(array, qtype)
        writer.add_tensor(name, data, raw_dtype=None if data is array else qtype)
        held[hf_name] = torch.from_numpy(np.ascontiguousarray(back.T if transposed else back))
        steps[hf_name] = torch.from_numpy(np.ascontiguousarray(step.T if transposed else step))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if head is not None:
        held[head], steps[head] = held[embedding], steps[embedding]
    return lm, held, steps


@pytest.mark.parametrize("qtype", [F32, Q8_0], ids=["F32", "Q8_0"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_gguf_loads_as_the_model_it_was_written_from(family, qtype, tmp_path, monkeypatch):
    monkeypatch.setenv("FROZEN_PREFIX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{family}.{qtype.name}.gguf"
    original, held, steps = write_gguf(family, path, qtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert {types[n] for n in types if not n.endswith(("norm.weight", "bias"))} == {qtype}  # the file is quantized

    lm, tokenizer = load_lm(str(path), "float32")

    assert type(lm) is type(original) and lm.dtype == torch.float32
    assert lm.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert getattr(lm, "hf_quantizer", None) is None and "quantization_config" not in lm.config.to_dict()
    # the weights: the file's, exactly (F32: the original's), and within one quantization step of the original's
    weights = lm.state_dict()
    assert set(weights) == set(held)
    for name, tensor in original.state_dict().items():
        assert torch.equal(weights[name], held[name]), name
        assert ((weights[name] - tensor).abs() <= steps[name]).all(), name
    if qtype != F32:
        assert not torch.equal(weights["lm_head.weight"], original.state_dict()["lm_head.weight"])
    # the logits: the original's with the file's weights (F32: the original's own), to the last bit
    reference = copy.deepcopy(original)
    reference.load_state_dict(held)
    reference.set_attn_implementation(lm.config._attn_implementation)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # the tokenizer: the file's vocabulary and merges, its EOS; no pad id in the file means EOS pads
    assert tokenizer.tokenize(TEXT) == ["Ġ" + word for word in TEXT.split()]
    assert tokenizer.decode(ids[0]) == TEXT and len(tokenizer) == original.config.vocab_size
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == EOS


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_quantized_gguf_lm_is_frozen_under_the_captioner(family, tmp_path, monkeypatch):
    monkeypatch.setenv("FROZEN_PREFIX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{family}.gguf"
    write_gguf(family, path, Q8_0)
    torch.manual_seed(0)
    model = FrozenPrefixCaptioner(load_config(TINY, [f"model.lm={path}", "model.lm_dtype=float32"]))
    assert model.lm.config.model_type == family

    loss = model(**batch_for(model))["loss"]
    loss.backward()

    assert torch.isfinite(loss)
    assert not any(p.requires_grad for p in model.lm.parameters())
    assert all(p.grad is None for p in model.lm.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projection.parameters())
