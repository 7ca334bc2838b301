"""Captions per second: batched, KV-cached greedy decoding next to one image at a time without a cache.

    python scripts/benchmark_generate.py [--model RUN/model] [--config configs/shapes.yaml]
        [--batch-size 32] [--new-tokens 20] [--batches 1] [--loop-images 4]

Both run in one process, on the same model and the same images (pixel values prepared beforehand, so image
loading is in neither number). The fast path is the library's own: `generate_captions`, i.e. HF `generate`
with inputs_embeds and the KV cache, a batch at a time. The slow path decodes the way ClipCap does: one image
at a time, re-running the whole sequence [prefix; tokens so far] through the LM for every new token. Both
make exactly --new-tokens tokens per image (EOS is held back in both), so they do the same decoding work;
the captions of the images both paths decode are compared token for token.

Without --model it uses runs/shapes/model when that exists, else an untrained captioner built from --config
(random prefix weights, the same frozen LM: the same compute).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from frozen_prefix.cli import resolve_device  # noqa: E402
from frozen_prefix.config import load_config  # noqa: E402
from frozen_prefix.data import EvalExamples, build_source  # noqa: E402
from frozen_prefix.errors import FrozenPrefixError  # noqa: E402
from frozen_prefix.generate import generate_captions  # noqa: E402
from frozen_prefix.models.captioner import FrozenPrefixCaptioner  # noqa: E402

DEFAULT_RUN_MODEL = ROOT / "runs" / "shapes" / "model"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def full_rerun_loop(model: FrozenPrefixCaptioner, pixel_values: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """ClipCap-style greedy decoding: one image at a time, the whole sequence re-run for every token, no cache."""
    embed = model.lm.get_input_embeddings()
    eos = model.tokenizer.eos_token_id
    captions = []
    for image in pixel_values:
        start = embed(torch.tensor([model.start_ids], dtype=torch.long, device=image.device))
        sequence = torch.cat([start, model.embed_images(image[None]).to(embed.weight.dtype)], dim=1)
        tokens: list[int] = []
        for _ in range(new_tokens):
            logits = model.lm(inputs_embeds=sequence, use_cache=False).logits[0, -1].float()
            logits[eos] = -float("inf")  # as min_new_tokens does on the batched side: both make new_tokens tokens
            token = int(logits.argmax())
            tokens.append(token)
            next_embedding = embed(torch.tensor([[token]], device=sequence.device))
            sequence = torch.cat([sequence, next_embedding], dim=1)
        captions.append(tokens)
    return captions


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[FrozenPrefixCaptioner, str]:
    """The model to time, and a line saying which it is."""
    path = Path(args.model) if args.model else DEFAULT_RUN_MODEL
    if args.model or path.is_dir():
        return FrozenPrefixCaptioner.from_pretrained(path, device=device), f"trained model {path}"
    torch.manual_seed(0)
    config = load_config(args.config, args.overrides)
    model = FrozenPrefixCaptioner(config, device=device, pretrained_encoder=False).eval()
    return model, f"untrained captioner from {args.config} (no {path.relative_to(ROOT)}; same compute)"


def main(argv: list[str] | None = None) -> int:
    """Time both decoders and print captions/s side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved model folder (default: runs/shapes/model if present)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"), help="recipe for the fallback model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batches", type=int, default=1, help="batches timed on the batched path")
    parser.add_argument("--loop-images", type=int, default=4, help="images timed on the one-at-a-time path")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("overrides", nargs="*", help="config overrides for the fallback model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "timm", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        device = resolve_device(args.device)
        started = time.perf_counter()
        model, which = load_model(args, device)
        load_sec = time.perf_counter() - started
        n = args.batch_size * args.batches
        source = model.config.data.val or model.config.data.test or load_config(args.config).data.val
        examples = EvalExamples(build_source(source), "skip")
        images = [examples[i]["image"] for i in range(min(n, len(examples)))]
        images = (images * (-(-n // len(images))))[:n]  # repeat a small split up to n images
        pixels = model.pixel_values(images)
        options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=1, do_sample=False,
                       prompt="", stop_at=[], batch_size=args.batch_size)

        generate_captions(model, pixels[:2], **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        full_rerun_loop(model, pixels[:1], 2)
        sync(device)
        start = time.perf_counter()
        batched = generate_captions(model, pixels, **options)
        sync(device)
        batched_sec = time.perf_counter() - start

        loop_images = min(args.loop_images, n)
        start = time.perf_counter()
        looped = full_rerun_loop(model, pixels[:loop_images], args.new_tokens)
        sync(device)
        loop_sec = time.perf_counter() - start
    except FrozenPrefixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    same = sum(model.tokenizer.decode(t, skip_special_tokens=True).strip() == c for t, c in zip(looped, batched))
    batched_rate, loop_rate = n / batched_sec, loop_images / loop_sec
    lm = model.config.model.lm
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"model: {which}; LM {lm}; loaded in {load_sec:.1f} s; device {device}{threads}")
    print(f"{args.new_tokens} new tokens per caption, greedy")
    fast = f"batched + KV cache (HF generate, batch {args.batch_size}):"
    slow = "one at a time, no cache (ClipCap-style):"
    width = max(len(fast), len(slow))
    print(f"  {fast:<{width}} {batched_rate:8.2f} captions/s   ({n} captions in {batched_sec:.2f} s)")
    print(f"  {slow:<{width}} {loop_rate:8.2f} captions/s   ({loop_images} captions in {loop_sec:.2f} s)")
    print(f"  speed-up: {batched_rate / loop_rate:.1f}x   (same caption on {same}/{loop_images} images decoded both)")
    print(f"  e.g. {batched[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
