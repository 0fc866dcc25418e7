"""One process of the two-process loss test; `tests/test_losses.py` launches it with

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_losses_worker.py OUT_DIR

Each rank takes its (deliberately unequal) share of a fixed global batch, computes the gathered
losses on features from a small shared-weight module, backpropagates, and writes
``OUT_DIR/rank{r}.pt``: its rank, world size, pid, and per scenario its loss and parameter
gradients. The test imports this file too and runs `run_scenarios` in one process on the whole
batch as the reference.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hgm_mm.losses import contrastive as losses
from hgm_mm.losses.grad_cache import grad_cache_step
from hgm_mm.losses.contrastive import (ContrastiveLoss, MultiPositiveContrastiveLoss, gather_with_grad,
                           pad_positive_ids, scene_loss)

IN_DIM, OUT_DIM = 6, 5
PAIR_SPLIT = (3, 5)  # pairs held by rank 0 and rank 1
ROOM_SPLIT = (2, 4)
PRODUCT_SPLIT = (6, 4)
PAIR_IDS = [0, 1, 0, 2, 3, 1, 4, 5]  # id 0 twice on rank 0, id 1 on both ranks
PRODUCT_IDS = [10, 11, 12, 13, 14, 15, 12, 16, 17, 18]  # 12 on both ranks; 14 in no room
ROOM_POSITIVES = [[10, 12, 16], [11, 99], [13], [12, 17], [50], [15, 18]]  # 16: across ranks; room 4: none here
SCENE_LABELS = [3, -100, -100, -100, 1, 4]  # 1 labelled room on rank 0, 2 on rank 1


class Tower(nn.Module):
    """Shared-weight features: one linear layer for every input, plus a learnable logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(IN_DIM, OUT_DIM)
        self.log_scale = nn.Parameter(torch.tensor(1.5))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)  # (B, OUT_DIM)


def make_tower() -> Tower:
    torch.manual_seed(0)
    return Tower().double()


def make_batch() -> dict[str, torch.Tensor]:
    """The fixed global batch, float64."""
    gen = torch.Generator().manual_seed(1)
    pairs, rooms, products = sum(PAIR_SPLIT), sum(ROOM_SPLIT), sum(PRODUCT_SPLIT)
    return {
        "xa": torch.randn(pairs, IN_DIM, generator=gen, dtype=torch.float64),
        "xb": torch.randn(pairs, IN_DIM, generator=gen, dtype=torch.float64),
        "pair_ids": torch.tensor(PAIR_IDS),
        "xr": torch.randn(rooms, IN_DIM, generator=gen, dtype=torch.float64),
        "xp": torch.randn(products, IN_DIM, generator=gen, dtype=torch.float64),
        "product_ids": torch.tensor(PRODUCT_IDS),
        "scene_labels": torch.tensor(SCENE_LABELS),
    }


def local_batch(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict:
    """This rank's rows (all of them when world_size == 1)."""
    def part(split, values):
        if world_size == 1:
            return values
        start = sum(split[:rank])
        return values[start:start + split[rank]]

    out = {key: part(PAIR_SPLIT, batch[key]) for key in ("xa", "xb", "pair_ids")}
    out.update({key: part(ROOM_SPLIT, batch[key]) for key in ("xr", "scene_labels")})
    out.update({key: part(PRODUCT_SPLIT, batch[key]) for key in ("xp", "product_ids")})
    # Built per rank, so the table widths differ (3 on rank 0, 2 on rank 1) as they would in training.
    out["room_positive_ids"] = pad_positive_ids(part(ROOM_SPLIT, ROOM_POSITIVES))
    return out


@contextlib.contextmanager
def open_clip_style_gather():
    """Swaps in open_clip's gather without grad (local rows put back): loses cross-rank terms."""
    original = losses._gather

    def gather(tensor, sizes, *, with_grad):
        full = original(tensor.detach(), sizes, with_grad=False)
        if not with_grad:
            return full
        start = sum(sizes[: torch.distributed.get_rank()])
        return torch.cat([full[:start], tensor, full[start + tensor.shape[0]:]])

    losses._gather = gather
    try:
        yield
    finally:
        losses._gather = original


def run_scenarios(rank: int, world_size: int, *, grad_cache: bool = True) -> dict[str, dict]:
    """Loss value and parameter gradients of each scenario, on this rank's share of the batch.

    Args:
        rank: this process's rank.
        world_size: 1 for the single-process reference on the whole batch.
        grad_cache: run the "grad_cache" scenario through `grad_cache_step`; the reference
            computes the same loss in one plain pass.
    """
    tower = make_tower()
    b = local_batch(make_batch(), rank, world_size)
    contrastive = ContrastiveLoss(rank=rank, world_size=world_size)
    multi = MultiPositiveContrastiveLoss(rank=rank, world_size=world_size)
    room_only = MultiPositiveContrastiveLoss(product_to_room=False, rank=rank, world_size=world_size)

    def pairs(ids):
        return lambda: contrastive(tower.embed(b["xa"]), tower.embed(b["xb"]), tower.log_scale.exp(), ids=ids)

    def multi_positive(loss):
        return lambda: loss(tower.embed(b["xr"]), tower.embed(b["xp"]), tower.log_scale.exp(),
                            room_positive_ids=b["room_positive_ids"], product_ids=b["product_ids"])

    def joint_loss(rooms, products):
        room_embeds, scene_logits = rooms
        return (multi(room_embeds, products, tower.log_scale.exp(), room_positive_ids=b["room_positive_ids"],
                      product_ids=b["product_ids"])
                + scene_loss(scene_logits, b["scene_labels"], world_size=world_size))

    def rooms_fn(x):
        return tower.embed(x), tower.linear(x)  # room embeddings, 5 "scene" logits

    def joint():
        if grad_cache:
            return grad_cache_step([(rooms_fn, b["xr"]), (tower.embed, b["xp"])], joint_loss, chunk_size=1)
        loss = joint_loss(rooms_fn(b["xr"]), tower.embed(b["xp"]))
        loss.backward()
        return loss

    def gathered():
        local = tower.embed(b["xr"])  # (R, OUT_DIM)
        everyone = gather_with_grad(local)  # (R_global, OUT_DIM); the batch itself in one process
        return world_size * (local @ everyone.T).pow(2).sum() / sum(ROOM_SPLIT)

    scenarios = {
        "gather_with_grad": gathered,
        "contrastive": pairs(b["pair_ids"]),
        "contrastive_no_ids": pairs(None),
        "multi_positive": multi_positive(multi),
        "multi_positive_room_only": multi_positive(room_only),
        "scene": lambda: scene_loss(tower.linear(b["xr"]), b["scene_labels"], world_size=world_size),
    }
    results = {}
    for name, compute in scenarios.items():
        tower.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        results[name] = _record(tower, loss)
    tower.zero_grad(set_to_none=True)
    results["grad_cache"] = _record(tower, joint())  # backward already done
    if world_size > 1:
        tower.zero_grad(set_to_none=True)
        with open_clip_style_gather():
            loss = pairs(b["pair_ids"])()
            loss.backward()
        results["contrastive_open_clip_gather"] = _record(tower, loss)
    return results


def _record(tower: nn.Module, loss: torch.Tensor) -> dict:
    return {"loss": loss.detach().clone(),
            "grads": {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for name, p in tower.named_parameters()}}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0])
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world_size != 2 or int(os.environ["WORLD_SIZE"]) != 2:
        raise SystemExit(f"expected 2 processes, got world_size={world_size}")
    try:
        results = run_scenarios(rank, world_size)
        torch.save({"rank": rank, "world_size": world_size, "pid": os.getpid(), "results": results},
                   out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
