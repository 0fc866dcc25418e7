"""Training throughput: one hgm_mm training step against a plain open_clip `ClipLoss` step.

Both steps use the same towers (hgm-lite-en: EfficientNet-Lite0 + all-MiniLM-L6-v2, with the
recipe's locked layers), the same batch of product photos and texts, and the same AdamW; the
reference is the loop a person would write by hand with open_clip's loss. Runs alternate
between the two so that machine noise hits both alike. Reports samples/s and the ratio.

    python benchmarks/bench_train_step.py [--batch-size 32] [--steps 10] [--out benchmarks/results/train_step.json]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, record_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hgm-lite-en")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_step.json")
    args = parser.parse_args(argv)

    import open_clip

    import hgm_mm
    from hgm_mm.training import TrainConfig
    from hgm_mm.training.freezing import lock_image_tower, lock_text_tower
    from hgm_mm.training.objective import RetrievalObjective, StepOutputs
    from hgm_mm.training.optim import trainable_parameter_groups

    torch.manual_seed(0)
    recipe = TrainConfig(room_loss_weight=0.0, scene_loss_weight=0.0)  # the product photo <-> text objective
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hgm_model = hgm_mm.create_model(args.model)
    for model in (hgm_model,):
        lock_image_tower(model.image_tower, recipe.unlocked_image_groups, freeze_norm_stats=False)
        lock_text_tower(model.text_tower, recipe.unlocked_text_layers)
    plain_model = copy.deepcopy(hgm_model)  # same towers and weights for the hand-written loop

    size = hgm_model.config.image_tower.image_size
    pixels = torch.randn(args.batch_size, 3, size, size)
    texts = [f"product {i}: a grey fabric three-seat sofa with cushions" for i in range(args.batch_size)]
    tokens = hgm_model.tokenizer(texts)
    ids = torch.arange(args.batch_size)

    hgm_optimizer = torch.optim.AdamW(trainable_parameter_groups(hgm_model, lr=1e-4, tower_lr=1e-5,
                                                                 weight_decay=0.05))
    plain_optimizer = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=1e-4)
    objective = RetrievalObjective.from_config(recipe, hgm_model)
    clip_loss = open_clip.loss.ClipLoss()
    inputs = {"product_ids": ids}

    def hgm_step():
        out = hgm_model(product_pixels=pixels, product_tokens=tokens)
        loss = objective(StepOutputs.from_model(hgm_model, out), inputs)["loss"]
        loss.backward()
        hgm_optimizer.step()
        hgm_optimizer.zero_grad(set_to_none=True)

    def plain_step():
        image = F.normalize(plain_model.image_proj(plain_model.image_tower(pixels)), dim=-1)
        text = F.normalize(plain_model.text_proj(plain_model.text_tower(tokens["input_ids"],
                                                                        tokens["attention_mask"])), dim=-1)
        loss = clip_loss(image, text, plain_model.logit_scale.exp())
        loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    hgm_model.train()
    plain_model.train()
    for step in (hgm_step, plain_step):  # warm-up: allocator, lazy init
        step()
        step()
    rates = {"hgm_mm": [], "open_clip_loop": []}
    for _ in range(args.rounds):
        for name, step in (("hgm_mm", hgm_step), ("open_clip_loop", plain_step)):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.batch_size * args.steps / (time.perf_counter() - start))
    hgm_rate, plain_rate = statistics.median(rates["hgm_mm"]), statistics.median(rates["open_clip_loop"])
    overhead = plain_rate / hgm_rate - 1.0
    result = {
        "benchmark": "train_step", "model": args.model, "batch_size": args.batch_size,
        "steps_per_round": args.steps, "rounds": args.rounds,
        "hgm_mm_samples_per_s": hgm_rate, "reference_samples_per_s": plain_rate,
        "ratio_hgm_to_reference": hgm_rate / plain_rate, "hgm_overhead": overhead,
        "all_rates": rates, "machine": describe_machine(),
    }
    line = (f"| training step ({args.model}, batch {args.batch_size}) | {hgm_rate:.1f} samples/s | "
            f"open_clip ClipLoss loop {plain_rate:.1f} samples/s | {hgm_rate / plain_rate:.3f}× "
            f"(overhead {overhead * 100:+.1f}%) |")
    record_result(args.out, result, "train_step", line)
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
