"""Gathered contrastive losses and the scene cross-entropy (`grad_cache` embeds their batches in chunks).

Scaling convention (every loss here that averages over queries):
    Each process computes the loss of its OWN queries against the candidates of ALL processes
    and returns ``world_size * (sum of its query losses) / (number of queries in the global
    batch)``. Two facts follow, for equal or unequal local batches alike:

    * the mean over processes of the returned values is the mean loss over the global batch;
    * DistributedDataParallel averages gradients across processes, and that average equals the
      single-process gradient of the global-batch mean loss. Gathered embeddings keep their
      gradient (`gather_with_grad`): the gradient that rank s's loss sends to rank r's
      embeddings is summed back onto rank r, so no cross-process term is lost.

    With equal local batches and every query valid, the returned value is simply the mean over
    the local queries (open_clip's ``local_loss=True, gather_with_grad=True``). With
    ``world_size == 1`` every loss is the plain batch mean.

Ids are int64 tensors (e.g. row numbers in the catalogue), non-negative; the data layer maps its
string ids to them. Collectives run inside `forward` and its backward: every process must call
the same losses in the same order, as with any torch.distributed code.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

PAD_ID = -1  # fills the rows of a room -> product id table (see `pad_positive_ids`)


# --------------------------------------------------------------------------------------------
# Gathering across processes


def _distributed_world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _gather_ints(values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every process's `values` (same length on all), as a list indexed by rank."""
    local = torch.tensor(list(values), dtype=torch.long, device=device)  # (V,)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]


def _pad_rows(tensor: Tensor, rows: int, value: float | int = 0) -> Tensor:
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    pad = tensor.new_full((missing, *tensor.shape[1:]), value)  # (missing, ...)
    return torch.cat([tensor, pad])


def _gather(tensor: Tensor, sizes: Sequence[int], *, with_grad: bool) -> Tensor:
    """All ranks' `tensor` rows concatenated in rank order; `sizes[r]` is rank r's row count.

    all_gather needs equal shapes, so rows are padded to the largest local batch and the
    padding is dropped after the gather.
    """
    padded = _pad_rows(tensor, max(sizes))  # (n_max, ...)
    if with_grad:
        stacked = _AllGather.apply(padded)  # (W, n_max, ...)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        stacked = torch.stack(parts)  # (W, n_max, ...)
    return torch.cat([part[:n] for part, n in zip(stacked, sizes)])  # (sum(sizes), ...)


class _AllGather(torch.autograd.Function):
    """all_gather whose backward returns the SUM over ranks of the gradients for this rank's rows.

    Every rank's loss may depend on this rank's rows; summing those gradients back is what makes
    DDP's average the single-process gradient. open_clip's other option (gather without grad,
    put the local rows back) drops the cross-rank terms when each rank computes the loss of its
    own queries only. torch.distributed.nn.functional.all_gather has the same semantics but is
    deprecated in torch 2.14; this uses only public collectives, and an all_reduce in backward
    (gloo has no reduce-scatter), which for (batch, dim) embeddings costs little.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)  # (W, n_max, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # (W, n_max, ...), reduced in place below
        dist.all_reduce(grad)
        return grad[dist.get_rank()]  # (n_max, ...)


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenates `tensor` from every process along dim 0, keeping gradients.

    The local batches may differ in size. Gradients flowing into any rank's copy of this
    process's rows come back to this process summed, so that averaging parameter gradients
    across processes (what DDP does) gives the single-process gradient of a loss computed once
    on the gathered batch.

    Args:
        tensor: (n, ...) local rows; n may differ between processes.

    Returns:
        (N, ...) the rows of rank 0, then rank 1, ...; `tensor` itself when torch.distributed is
        not initialised or has one process.
    """
    if _distributed_world_size() == 1:
        return tensor
    sizes = [row[0] for row in _gather_ints([tensor.shape[0]], tensor.device)]
    return _gather(tensor, sizes, with_grad=True)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")


def _check_process_group(rank: int, world_size: int) -> None:
    actual = _distributed_world_size()
    if actual != world_size or (actual > 1 and dist.get_rank() != rank):
        got = f"world_size={actual}, rank={dist.get_rank()}" if actual > 1 else "one process"
        raise ValueError(f"loss built with rank={rank}, world_size={world_size} but the process group has {got}; "
                         "pass the launcher's rank and world size (e.g. accelerator.process_index, num_processes)")


def _check_ids(ids: Tensor, rows: int, name: str) -> None:
    if ids.dim() != 1 or ids.shape[0] != rows:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; expected ({rows},), one id per row")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {ids.dtype}; expected an integer tensor")
    if bool((ids < 0).any()):
        raise ValueError(f"{name} holds negative ids; ids must be >= 0 ({PAD_ID} is the padding value)")


def _upcast(logits: Tensor) -> Tensor:
    """float32 for half-precision logits (softmax over many candidates), others unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _first_occurrence(ids: Tensor) -> Tensor:
    """(N,) bool: True where an id appears for the first time in `ids`."""
    same = ids[:, None] == ids[None, :]  # (N, N)
    earlier = torch.ones_like(same).tril(diagonal=-1)  # (N, N) column before row
    return ~(same & earlier).any(dim=1)  # (N,)


# --------------------------------------------------------------------------------------------
# Losses


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between paired embeddings (e.g. product photo <-> product text).

    Row i of `a` and row i of `b` are a positive pair; every other row of the global batch is a
    negative, except rows sharing row i's id (the same product twice), which are masked out of
    the softmax: neither positive nor negative. The loss is (CE(a->b) + CE(b->a)) / 2, the same
    as open_clip's `ClipLoss` when no ids repeat. See the module docstring for the scaling across
    processes.
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1):
        """Builds the loss.

        Args:
            rank: this process's rank.
            world_size: number of processes; > 1 gathers embeddings and ids from all of them.
        """
        super().__init__()
        _check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size

    def forward(self, a: Tensor, b: Tensor, logit_scale: Tensor | float, ids: Tensor | None = None) -> Tensor:
        """Computes the loss of this process's pairs against the global batch.

        Args:
            a: (n, D) unit-norm embeddings.
            b: (n, D) unit-norm embeddings, row i paired with row i of `a`.
            logit_scale: scalar multiplier of the cosine similarities (already exponentiated).
            ids: (n,) int ids; rows of the global batch with equal ids are not negatives of each
                other. None: every row is distinct.

        Returns:
            Scalar loss (see the scaling convention).
        """
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must both be (n, D)")
        n = a.shape[0]
        if ids is not None:
            _check_ids(ids, n, "ids")
        if self.world_size > 1:
            _check_process_group(self.rank, self.world_size)
            sizes = [row[0] for row in _gather_ints([n], a.device)]
            all_a = _gather(a, sizes, with_grad=True)  # (N, D)
            all_b = _gather(b, sizes, with_grad=True)  # (N, D)
            all_ids = _gather(ids, sizes, with_grad=False) if ids is not None else None  # (N,)
            offset, total = sum(sizes[: self.rank]), sum(sizes)
        else:
            all_a, all_b, all_ids, offset, total = a, b, ids, 0, n

        targets = torch.arange(offset, offset + n, device=a.device)  # (n,) global column of each pair
        logits_ab = _upcast(logit_scale * a @ all_b.T)  # (n, N)
        logits_ba = _upcast(logit_scale * b @ all_a.T)  # (n, N)
        if all_ids is not None:
            duplicate = ids[:, None] == all_ids[None, :]  # (n, N)
            duplicate[torch.arange(n, device=a.device), targets] = False  # the pair itself stays
            logits_ab = logits_ab.masked_fill(duplicate, float("-inf"))
            logits_ba = logits_ba.masked_fill(duplicate, float("-inf"))
        summed = (F.cross_entropy(logits_ab, targets, reduction="sum")
                  + F.cross_entropy(logits_ba, targets, reduction="sum")) / 2
        return summed * self.world_size / total


def pad_positive_ids(positive_ids: Sequence[Sequence[int]], *, device: torch.device | str | None = None) -> Tensor:
    """Packs each room's known positive product ids into a (R, K) table padded with `PAD_ID`.

    Args:
        positive_ids: per room, the ids of all products known to belong to it (not only those in
            the batch).
        device: where to put the table.

    Returns:
        (R, K) int64, K the longest list (at least 1).
    """
    width = max([len(row) for row in positive_ids] + [1])
    table = torch.full((len(positive_ids), width), PAD_ID, dtype=torch.long)  # (R, K)
    for i, row in enumerate(positive_ids):
        if any(int(pid) < 0 for pid in row):
            raise ValueError(f"room {i} lists a negative product id {list(row)}; ids must be >= 0")
        table[i, : len(row)] = torch.tensor([int(pid) for pid in row], dtype=torch.long)
    return table.to(device) if device is not None else table


def _multi_positive_terms(logits: Tensor, positive: Tensor, candidate: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over each query's positives of -log softmax over {that positive} + the negatives.

    Args:
        logits: (q, C) float.
        positive: (q, C) bool, the query's positives among the candidates.
        candidate: (C,) bool, columns taking part at all.

    Returns:
        (q,) loss per query (0 where it has no positive) and (q,) bool, the queries with one.
    """
    positive = positive & candidate[None, :]  # (q, C)
    negative = ~positive & candidate[None, :]  # (q, C)
    has_negative = negative.any(dim=1, keepdim=True)  # (q, 1)
    # A row without negatives takes its logsumexp over all columns and then discards it: a
    # logsumexp over only -inf has a NaN gradient even when multiplied by zero afterwards.
    lse_input = logits.masked_fill(~(negative | ~has_negative), float("-inf"))  # (q, C)
    negative_lse = torch.logsumexp(lse_input, dim=1, keepdim=True)  # (q, 1)
    negative_lse = torch.where(has_negative, negative_lse, torch.full_like(negative_lse, float("-inf")))
    # -log(e^l_p / (e^l_p + sum_neg e^l_n)) = softplus(lse_neg - l_p)
    terms = F.softplus(negative_lse - logits) * positive  # (q, C)
    count = positive.sum(dim=1)  # (q,)
    return terms.sum(dim=1) / count.clamp_min(1), count > 0


class MultiPositiveContrastiveLoss(nn.Module):
    """Room -> products InfoNCE with several positives per room (the SupCon / UniCL form).

    For a room with positives P and negatives N among the candidates of the global batch, the
    room's loss is ``mean over p in P of -log(e^{s_p} / (e^{s_p} + sum_{n in N} e^{s_n}))``: a
    room's other positives are neither negatives nor in the denominator. Rooms without a
    positive in the global batch contribute nothing. With `product_to_room`, products are also
    queries against the rooms, in the same form (a product's positives are the rooms it belongs
    to; products belonging to no room in the batch, e.g. extra negatives, contribute nothing),
    and the loss is the mean of both directions. Each direction averages over its valid queries
    of the global batch, with the scaling of the module docstring.

    Duplicate products: when `product_ids` is given, only the FIRST occurrence of each id in the
    global batch (rank 0's rows first) takes part; later copies are neither candidates nor
    queries and receive zero gradient, so a product sampled twice weighs as one. A room given
    twice is two queries; as both copies list the same positives they are never negatives of
    each other in the product -> room direction.

    Positives come from ids (required across processes, so that every process builds the same
    global matrix from gathered ids) or, in one process only, from a boolean matrix.
    """

    def __init__(self, *, product_to_room: bool = True, rank: int = 0, world_size: int = 1,
                 similarity: Callable[[Tensor, Tensor], Tensor] | None = None):
        """Builds the loss.

        Args:
            product_to_room: add the product -> room direction.
            rank: this process's rank.
            world_size: number of processes; > 1 gathers embeddings and ids from all of them.
            similarity: maps rooms (R, ...) and products (P, D) to (R, P) similarities, for rooms
                made of several vectors (e.g. views pooled by `HGMModel.packed_room_scores`);
                default: the dot product of (R, D) room vectors.
        """
        super().__init__()
        _check_rank(rank, world_size)
        self.product_to_room = product_to_room
        self.rank, self.world_size = rank, world_size
        self.similarity = similarity or (lambda rooms, products: rooms @ products.T)

    def forward(self, room_embeds: Tensor, product_embeds: Tensor, logit_scale: Tensor | float, *,
                room_positive_ids: Tensor | None = None, product_ids: Tensor | None = None,
                positives: Tensor | None = None) -> Tensor:
        """Computes the loss of this process's rooms (and products) against the global batch.

        Give either `room_positive_ids` and `product_ids`, or `positives` (one process only,
        optionally with `product_ids` to drop duplicates).

        Args:
            room_embeds: (R, D) unit-norm room embeddings, or (R, ...) rooms that `similarity` reads.
            product_embeds: (P, D) unit-norm product embeddings.
            logit_scale: scalar multiplier of the cosine similarities (already exponentiated).
            room_positive_ids: (R, K) int, each room's known positive product ids padded with
                `PAD_ID` (see `pad_positive_ids`).
            product_ids: (P,) int, the id of each product row.
            positives: (R, P) bool, True where the product belongs to the room.

        Returns:
            Scalar loss (see the scaling convention).
        """
        if room_embeds.dim() < 2 or product_embeds.dim() != 2 or room_embeds.shape[-1] != product_embeds.shape[1]:
            raise ValueError(f"room_embeds {tuple(room_embeds.shape)} and product_embeds "
                             f"{tuple(product_embeds.shape)} must be (R, ..., D) and (P, D)")
        n_rooms, n_products = room_embeds.shape[0], product_embeds.shape[0]
        if (positives is None) == (room_positive_ids is None):
            raise ValueError("give either room_positive_ids (with product_ids) or positives")
        if product_ids is not None:
            _check_ids(product_ids, n_products, "product_ids")
        if positives is not None:
            if self.world_size > 1:
                raise ValueError("a positives matrix cannot describe pairs across processes; pass "
                                 "room_positive_ids and product_ids when world_size > 1")
            if positives.shape != (n_rooms, n_products) or positives.dtype != torch.bool:
                raise ValueError(f"positives is {positives.dtype} {tuple(positives.shape)}; expected bool "
                                 f"({n_rooms}, {n_products})")
        else:
            if product_ids is None:
                raise ValueError("room_positive_ids needs product_ids to match against")
            if (room_positive_ids.dim() != 2 or room_positive_ids.shape[0] != n_rooms
                    or room_positive_ids.dtype.is_floating_point):
                raise ValueError(f"room_positive_ids has shape {tuple(room_positive_ids.shape)} and dtype "
                                 f"{room_positive_ids.dtype}; expected int ({n_rooms}, K) padded with {PAD_ID}")

        if self.world_size > 1:
            _check_process_group(self.rank, self.world_size)
            sizes = _gather_ints([n_rooms, n_products, room_positive_ids.shape[1]], room_embeds.device)
            room_sizes, product_sizes = [s[0] for s in sizes], [s[1] for s in sizes]
            width = max(s[2] for s in sizes)
            table = torch.cat([room_positive_ids, room_positive_ids.new_full(
                (n_rooms, width - room_positive_ids.shape[1]), PAD_ID)], dim=1)  # (R, K_max)
            all_rooms = _gather(room_embeds, room_sizes, with_grad=True)  # (R_g, D)
            all_products = _gather(product_embeds, product_sizes, with_grad=True)  # (P_g, D)
            all_table = _gather(table, room_sizes, with_grad=False)  # (R_g, K_max)
            all_product_ids = _gather(product_ids, product_sizes, with_grad=False)  # (P_g,)
            room_offset, product_offset = sum(room_sizes[: self.rank]), sum(product_sizes[: self.rank])
        else:
            all_rooms, all_products, all_table, all_product_ids = (
                room_embeds, product_embeds, room_positive_ids, product_ids)
            room_offset = product_offset = 0

        if positives is not None:
            global_positive = positives  # (R_g, P_g), one process
        else:
            # A padding slot never matches: product ids are checked to be >= 0.
            global_positive = (all_table[:, :, None] == all_product_ids[None, None, :]).any(dim=1)  # (R_g, P_g)
        if all_product_ids is not None:
            keep = _first_occurrence(all_product_ids)  # (P_g,)
        else:
            keep = torch.ones(global_positive.shape[1], dtype=torch.bool, device=global_positive.device)
        every_room = torch.ones(global_positive.shape[0], dtype=torch.bool, device=global_positive.device)

        room_rows = slice(room_offset, room_offset + n_rooms)
        product_rows = slice(product_offset, product_offset + n_products)
        logits = _upcast(logit_scale * self.similarity(room_embeds, all_products))  # (R, P_g)
        room_loss, room_valid = _multi_positive_terms(logits, global_positive[room_rows], keep)
        room_queries = (global_positive & keep[None, :]).any(dim=1).sum()  # rooms with a positive, globally
        loss = (room_loss * room_valid).sum() * self.world_size / room_queries.clamp_min(1)
        if not self.product_to_room:
            return loss

        logits = _upcast(logit_scale * self.similarity(all_rooms, product_embeds).T)  # (P, R_g)
        product_loss, product_valid = _multi_positive_terms(logits, global_positive.T[product_rows], every_room)
        product_valid = product_valid & keep[product_rows]  # later copies of a product are not queries
        product_queries = (global_positive.any(dim=0) & keep).sum()
        product_side = (product_loss * product_valid).sum() * self.world_size / product_queries.clamp_min(1)
        return (loss + product_side) / 2


def scene_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, *, world_size: int = 1) -> Tensor:
    """Cross-entropy of the scene head over the rooms that have a scene label.

    Args:
        logits: (R, S) scene logits.
        labels: (R,) int class indices; `ignore_index` marks rooms without a scene label.
        ignore_index: the label value to skip.
        world_size: with > 1, the number of labelled rooms is summed over processes (one
            all_reduce) and the loss scaled as in the module docstring, so that DDP's averaged
            gradient is that of the mean over all labelled rooms even when processes hold
            different numbers of them.

    Returns:
        Scalar loss; 0 (still attached to `logits`) when no room is labelled.
    """
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be (R, S) and (R,)")
    summed = F.cross_entropy(_upcast(logits), labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()  # stays a tensor: no host sync
    if world_size > 1:
        if _distributed_world_size() != world_size:
            raise ValueError(f"scene_loss(world_size={world_size}) but the process group has "
                             f"{_distributed_world_size()} process(es)")
        count = count.clone()
        dist.all_reduce(count)
    return summed * world_size / count.clamp_min(1)
