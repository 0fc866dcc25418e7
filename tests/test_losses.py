"""Losses: hand-checked cases, gradient caching against one large batch, and two real processes."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hgm_mm.losses.grad_cache import grad_cache_step
from hgm_mm.losses.contrastive import (PAD_ID, ContrastiveLoss, MultiPositiveContrastiveLoss, gather_with_grad,
                           pad_positive_ids, scene_loss)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "dist_losses_worker.py"


def unit(rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


# -- gather --------------------------------------------------------------------------------------

def test_gather_with_grad_is_identity_without_process_group():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


# -- ContrastiveLoss -----------------------------------------------------------------------------

def test_contrastive_equals_open_clip_clip_loss_without_duplicates():
    from open_clip.loss import ClipLoss

    gen = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    b = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    scale = torch.tensor(7.5)
    expected = ClipLoss()(a, b, scale)
    torch.testing.assert_close(ContrastiveLoss()(a, b, scale), expected)
    torch.testing.assert_close(ContrastiveLoss()(a, b, scale, ids=torch.arange(6) * 3), expected)  # distinct ids


def test_contrastive_duplicate_masking_hand_case():
    # a = b = identity: logits are s on the diagonal, 0 elsewhere. Rows 0 and 1 are the same product.
    a = b = torch.eye(3, dtype=torch.float64)
    s = 2.0
    # no masking: every row is -log(e^s / (e^s + 2))
    no_ids = ContrastiveLoss()(a, b, s)
    assert no_ids.item() == pytest.approx(math.log(1 + 2 * math.exp(-s)), abs=1e-12)
    # masked: rows 0, 1 lose each other as negatives; row 2 keeps both
    masked = ContrastiveLoss()(a, b, s, ids=torch.tensor([7, 7, 9]))
    expected = (2 * math.log(1 + math.exp(-s)) + math.log(1 + 2 * math.exp(-s))) / 3
    assert masked.item() == pytest.approx(expected, abs=1e-12)


def test_contrastive_duplicates_match_row_by_row_reference():
    gen = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(4, 5, generator=gen, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(4, 5, generator=gen, dtype=torch.float64), dim=-1)
    ids = [0, 1, 0, 2]
    s = 3.0
    logits = (s * a @ b.T).tolist()

    def direction(m):  # m[i][j]: query i, candidate j
        total = 0.0
        for i in range(4):
            denominator = sum(math.exp(m[i][j]) for j in range(4) if j == i or ids[j] != ids[i])
            total += -m[i][i] + math.log(denominator)
        return total / 4

    transposed = [list(col) for col in zip(*logits)]
    expected = (direction(logits) + direction(transposed)) / 2
    got = ContrastiveLoss()(a, b, s, ids=torch.tensor(ids))
    assert got.item() == pytest.approx(expected, abs=1e-12)


# -- MultiPositiveContrastiveLoss ----------------------------------------------------------------

# Rooms r0 = e0, r1 = e1; products p0 = e0, p1 = (e0 + e1)/sqrt(2), p2 = e1, p3 = e2.
# r0 owns p0 and p1, r1 owns p2, p3 belongs to no room. Logits: s * [[1, c, 0, 0], [0, c, 1, 0]].
ROOMS = unit([[1, 0, 0], [0, 1, 0]])
PRODUCTS = unit([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
POSITIVES = torch.tensor([[True, True, False, False], [False, False, True, False]])
S = 3.0
C = 1 / math.sqrt(2)


def hand_room_to_product() -> float:
    # room 0: for p0 the denominator is p0 + p2 + p3 (p1, its other positive, is left out)
    room0 = (math.log(1 + 2 * math.exp(-S)) + math.log(1 + 2 * math.exp(-S * C))) / 2
    room1 = math.log(1 + (2 + math.exp(S * C)) * math.exp(-S))  # p2 against p0, p1, p3
    return (room0 + room1) / 2


def hand_product_to_room() -> float:
    # p0 -> r0 vs r1; p1 -> r0 vs r1 (equal logits: log 2); p2 -> r1 vs r0; p3 has no room
    return (2 * math.log(1 + math.exp(-S)) + math.log(2)) / 3


def test_multi_positive_hand_case():
    loss = MultiPositiveContrastiveLoss()(ROOMS, PRODUCTS, S, positives=POSITIVES)
    assert loss.item() == pytest.approx((hand_room_to_product() + hand_product_to_room()) / 2, abs=1e-12)
    room_only = MultiPositiveContrastiveLoss(product_to_room=False)(ROOMS, PRODUCTS, S, positives=POSITIVES)
    assert room_only.item() == pytest.approx(hand_room_to_product(), abs=1e-12)


def test_multi_positive_ids_build_the_same_matrix():
    table = pad_positive_ids([[100, 101, 555], [102]])  # 555: a known positive not in this batch
    by_ids = MultiPositiveContrastiveLoss()(ROOMS, PRODUCTS, S, room_positive_ids=table,
                                            product_ids=torch.tensor([100, 101, 102, 103]))
    assert by_ids.item() == pytest.approx((hand_room_to_product() + hand_product_to_room()) / 2, abs=1e-12)


def test_multi_positive_drops_later_copies_of_a_product():
    loss_fn = MultiPositiveContrastiveLoss()
    table = pad_positive_ids([[100, 101], [102]])
    copy = unit([[0.3, 0.9, 0.1]]).requires_grad_(True)  # a second, different view of product 100
    products = torch.cat([PRODUCTS, copy])  # (5, 3)
    loss = loss_fn(ROOMS, products, S, room_positive_ids=table, product_ids=torch.tensor([100, 101, 102, 103, 100]))
    assert loss.item() == pytest.approx((hand_room_to_product() + hand_product_to_room()) / 2, abs=1e-12)
    loss.backward()
    assert torch.equal(copy.grad, torch.zeros_like(copy))
    # without ids the copy is a separate product (a negative of r0 here) and the loss changes
    positives = torch.cat([POSITIVES, torch.tensor([[False], [False]])], dim=1)
    assert loss_fn(ROOMS, products.detach(), S, positives=positives).item() != pytest.approx(loss.item())


def test_multi_positive_edge_rows_have_finite_gradients():
    rooms = ROOMS.clone().requires_grad_(True)
    products = PRODUCTS[:2].clone().requires_grad_(True)
    # room 0 owns every product (no negatives), room 1 none (no positive): only room 0's terms count
    positives = torch.tensor([[True, True], [False, False]])
    loss = MultiPositiveContrastiveLoss(product_to_room=False)(rooms, products, S, positives=positives)
    assert loss.item() == 0.0  # softplus(-inf): nothing to push away from
    loss.backward()
    assert torch.isfinite(rooms.grad).all() and torch.isfinite(products.grad).all()
    # no positive anywhere: zero loss, still attached to the graph, zero gradients
    rooms.grad = None
    empty = MultiPositiveContrastiveLoss()(rooms, products, S, positives=torch.zeros(2, 2, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(rooms.grad, torch.zeros_like(rooms))


@pytest.mark.parametrize("kwargs, message", [
    (dict(positives=POSITIVES, room_positive_ids=pad_positive_ids([[1], [2]])), "either"),
    (dict(room_positive_ids=pad_positive_ids([[1], [2]])), "needs product_ids"),
    (dict(positives=POSITIVES[:, :3]), "expected bool"),
    (dict(room_positive_ids=pad_positive_ids([[1], [2]]), product_ids=torch.tensor([1, 2, -1, 3])), "negative"),
    (dict(room_positive_ids=pad_positive_ids([[1]]), product_ids=torch.arange(4)), "room_positive_ids has shape"),
])
def test_multi_positive_rejects_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiPositiveContrastiveLoss()(ROOMS, PRODUCTS, S, **kwargs)


def test_distributed_losses_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="across processes"):
        MultiPositiveContrastiveLoss(rank=0, world_size=2)(ROOMS, PRODUCTS, S, positives=POSITIVES)
    with pytest.raises(ValueError, match="process group has one process"):
        ContrastiveLoss(rank=1, world_size=2)(ROOMS, ROOMS, S)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        ContrastiveLoss(rank=2, world_size=2)


def test_pad_positive_ids():
    table = pad_positive_ids([[4, 2], [], [7]])
    assert torch.equal(table, torch.tensor([[4, 2], [PAD_ID, PAD_ID], [7, PAD_ID]]))
    assert pad_positive_ids([]).shape == (0, 1)
    with pytest.raises(ValueError, match="negative"):
        pad_positive_ids([[3, -1]])


# -- scene_loss ----------------------------------------------------------------------------------

def test_scene_loss_ignores_unlabelled_rooms():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.tensor([2, -100, 0, -100])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(scene_loss(logits, labels), expected)
    none = scene_loss(logits, torch.full((4,), -100))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# -- grad_cache_step -----------------------------------------------------------------------------

class Towers(nn.Module):
    """Two little MLP towers with dropout and a learnable logit scale, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.rooms = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 8), nn.Dropout(0.2))
        self.products = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 8))
        self.scene_head = nn.Linear(8, 4)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def embed_rooms(self, x):
        features = self.rooms(x)  # (B, 8)
        return F.normalize(features, dim=-1), self.scene_head(features)

    def embed_products(self, batch):
        return F.normalize(self.products(batch["x"]), dim=-1)  # (B, 8)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def chunked_reference(streams, loss_fn, chunk_size, seed):
    """One large batch: the same chunks in the same order, all kept in one graph, one backward."""
    torch.manual_seed(seed)
    outputs = []
    for embed_fn, inputs in streams:
        keys = list(inputs) if isinstance(inputs, dict) else None
        n = len(inputs[keys[0]]) if keys else len(inputs)
        parts = []
        for i in range(0, n, chunk_size):
            chunk = {k: inputs[k][i:i + chunk_size] for k in keys} if keys else inputs[i:i + chunk_size]
            out = embed_fn(chunk)
            parts.append(out if isinstance(out, tuple) else (out,))
        joined = tuple(torch.cat(column) for column in zip(*parts))
        outputs.append(joined if len(joined) > 1 else joined[0])
    loss = loss_fn(*outputs)
    loss.backward()
    return loss.detach()


def test_grad_cache_matches_one_large_batch_with_dropout():
    torch.manual_seed(0)
    towers = Towers().double().train()
    gen = torch.Generator().manual_seed(1)
    rooms = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    products = {"x": torch.randn(9, 6, generator=gen, dtype=torch.float64), "ids": list(range(9))}
    table = pad_positive_ids([[0, 1], [2], [3, 4, 5], [6], [7], [8, 0], [40]])
    labels = torch.tensor([0, 1, -100, 3, 2, -100, 1])
    multi = MultiPositiveContrastiveLoss()

    def loss_fn(room_out, product_embeds):
        room_embeds, scene_logits = room_out
        return (multi(room_embeds, product_embeds, towers.log_scale.exp(), room_positive_ids=table,
                      product_ids=torch.arange(9))
                + scene_loss(scene_logits, labels))

    streams = [(towers.embed_rooms, rooms), (towers.embed_products, products)]
    expected_loss = chunked_reference(streams, loss_fn, chunk_size=3, seed=5)
    expected, rng_after = grads(towers), torch.get_rng_state()

    towers.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = grad_cache_step(streams, loss_fn, chunk_size=3)  # 7 and 9 rows: a short last chunk
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-12)
    got = grads(towers)
    assert got.keys() == expected.keys() == dict(towers.named_parameters()).keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(torch.get_rng_state(), rng_after)  # replays do not disturb the caller's RNG stream

    # dropout really matters here: other masks give other gradients
    towers.zero_grad(set_to_none=True)
    chunked_reference(streams, loss_fn, chunk_size=3, seed=6)
    assert not torch.allclose(grads(towers)["rooms.0.weight"], expected["rooms.0.weight"])


def test_grad_cache_on_the_tiny_model_in_train_mode():
    import hgm_mm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init warning
        model = hgm_mm.create_model("hgm-tiny")
    model.train()
    room_tokens = model.scene_tokenizer(["a nordic living room", "bedroom with oak floor", "small kitchen",
                                         "home office, warm light", "bathroom"])
    product_tokens = model.tokenizer(["grey sofa", "oak bed", "desk lamp", "bar stool", "towel rail", "rug"])
    table = pad_positive_ids([[0, 5], [1], [3], [2], [4]])
    labels = torch.tensor([9, 1, 7, -100, 0])
    multi = MultiPositiveContrastiveLoss()

    def rooms_fn(tokens):
        out = model(room_tokens=tokens)
        return out.room_embeds, out.scene_logits

    def products_fn(tokens):
        return model(product_tokens=tokens).product_embeds

    def loss_fn(room_out, product_embeds):
        return (multi(room_out[0], product_embeds, model.logit_scale.exp(), room_positive_ids=table,
                      product_ids=torch.arange(6))
                + scene_loss(room_out[1], labels))

    streams = [(rooms_fn, dict(room_tokens)), (products_fn, dict(product_tokens))]
    expected_loss = chunked_reference(streams, loss_fn, chunk_size=2, seed=0)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = grad_cache_step(streams, loss_fn, chunk_size=2)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    got = grads(model)
    assert got.keys() == expected.keys() and "logit_scale" in got and "scene_head.weight" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grad_cache_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_step([(lambda x: x, torch.ones(2, 2))], lambda e: e.sum(), chunk_size=0)
    with pytest.raises(ValueError, match="equal lengths"):
        grad_cache_step([(lambda x: x, {"a": torch.ones(2), "b": torch.ones(3)})], lambda e: e.sum(), chunk_size=1)
    with pytest.raises(TypeError, match="tensor or a tuple"):
        grad_cache_step([(lambda x: {"e": x}, torch.ones(2, 2))], lambda e: e.sum(), chunk_size=1)


# -- two processes -------------------------------------------------------------------------------

def load_worker():
    spec = importlib.util.spec_from_file_location("dist_losses_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    # --standalone: the rendezvous takes a free port, so parallel runs do not collide
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two real processes

    reference = load_worker().run_scenarios(rank=0, world_size=1, grad_cache=False)
    for name, expected in reference.items():
        per_rank = [r["results"][name] for r in ranks]
        loss = (per_rank[0]["loss"] + per_rank[1]["loss"]) / 2  # what a mean over ranks logs
        torch.testing.assert_close(loss, expected["loss"], rtol=1e-10, atol=1e-10, msg=name)
        for param, grad in expected["grads"].items():
            averaged = (per_rank[0]["grads"][param] + per_rank[1]["grads"][param]) / 2  # what DDP applies
            torch.testing.assert_close(averaged, grad, rtol=1e-9, atol=1e-10, msg=f"{name} {param}")
        assert not torch.equal(per_rank[0]["loss"], per_rank[1]["loss"]), name  # each rank has its own queries

    # the same check catches a gather that drops cross-rank gradients (open_clip's no-grad gather)
    trick = [r["results"]["contrastive_open_clip_gather"] for r in ranks]
    averaged = (trick[0]["grads"]["linear.weight"] + trick[1]["grads"]["linear.weight"]) / 2
    assert not torch.allclose(averaged, reference["contrastive"]["grads"]["linear.weight"], atol=1e-3)
