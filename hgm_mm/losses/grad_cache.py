"""Gradient caching (GradCache, Gao et al. 2021): a large contrastive batch in several small forward passes.

`grad_cache_step` embeds every chunk without a graph, computes the loss and its gradient with
respect to the embeddings of the whole batch, then re-embeds each chunk with its graph (dropout
replayed) and backpropagates that chunk's share; the parameters receive the gradient one big
pass would give them, with the memory of one chunk.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor


class _RngState:
    """The CPU and CUDA generator states at one moment, to replay dropout masks (GradCache's RandContext)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):  # the caller's generators resume untouched afterwards
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _split(inputs: Any, chunk_size: int) -> list[Any]:
    """Splits a tensor, a mapping of tensors/sequences, or a sequence into chunks along dim 0."""
    if isinstance(inputs, Tensor):
        return list(inputs.split(chunk_size))
    if isinstance(inputs, Mapping):
        lengths = {key: len(value) for key, value in inputs.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the inputs of one stream must have equal lengths; got {lengths}")
        n = next(iter(lengths.values()))
        return [{key: value[i:i + chunk_size] for key, value in inputs.items()} for i in range(0, n, chunk_size)]
    if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        return [inputs[i:i + chunk_size] for i in range(0, len(inputs), chunk_size)]
    raise TypeError(f"cannot split inputs of type {type(inputs).__name__}; give a tensor, a dict of tensors "
                    "or a sequence")


def _as_tuple(output: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(output, Tensor):
        return (output,)
    if isinstance(output, Sequence) and output and all(isinstance(t, Tensor) for t in output):
        return tuple(output)
    raise TypeError(f"an embedding function must return a tensor or a tuple of tensors, not {type(output).__name__}")


EmbedFn = Callable[[Any], "Tensor | Sequence[Tensor]"]


def grad_cache_step(streams: Sequence[tuple[EmbedFn, Any]], loss_fn: Callable[..., Tensor], *,
                    chunk_size: int) -> Tensor:
    """Backpropagates a loss over a whole contrastive batch while embedding it in small chunks.

    The GradCache method (Gao et al., 2021): the contrastive loss needs every embedding of the
    batch at once, but the towers' activations need only live for one chunk.

    1. Embed every chunk of every stream without grad, saving the RNG state before each chunk.
    2. Concatenate, compute ``loss_fn`` on the full batch and backpropagate it to the
       embeddings (and to parameters `loss_fn` uses directly, such as a learnable logit scale).
    3. Re-embed each chunk with grad, replaying its RNG state so dropout draws the same masks,
       and backpropagate the cached embedding gradients into the towers.

    Parameter gradients are ACCUMULATED into `.grad`: the same as calling ``backward()`` on the
    loss of one forward pass that embedded the chunks in this order. BatchNorm is the
    exception: it normalises per chunk and updates running statistics twice.

    With several processes, use gathered losses in `loss_fn`: their collectives run in step 2.
    Under DistributedDataParallel run this step inside ``no_sync`` (e.g.
    ``accelerator.no_sync(model)``) and average the gradients across processes afterwards: the
    step runs several backward passes, each over part of the model, which DDP's per-backward
    synchronisation does not expect.

    Args:
        streams: ``(embed_fn, inputs)`` per embedding stream, e.g. rooms and products.
            ``inputs`` is a tensor, a dict of tensors (e.g. tokenizer output) or a sequence,
            split along its first dimension; ``embed_fn(chunk)`` returns a tensor or a tuple of
            tensors with one row per input row (e.g. room embeddings and scene logits).
        loss_fn: called with one argument per stream, the concatenated output of its
            ``embed_fn`` (a tensor, or a tuple when ``embed_fn`` returns one); returns a scalar.
        chunk_size: rows per forward pass.

    Returns:
        The loss, detached.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected >= 1")
    if not streams:
        raise ValueError("give at least one (embed_fn, inputs) stream")
    chunked = [_split(inputs, chunk_size) for _, inputs in streams]
    for i, chunks in enumerate(chunked):
        if not chunks:
            raise ValueError(f"stream {i} has no inputs")

    # 1. embeddings of every chunk, without activations
    rng_states: list[list[_RngState]] = []
    cached: list[tuple[Tensor, ...]] = []
    rows: list[list[int]] = []
    returns_tensor: list[bool] = []  # hand loss_fn a tensor where embed_fn returned one, else a tuple
    with torch.no_grad():
        for (embed_fn, _), chunks in zip(streams, chunked):
            states, outputs = [], []
            for chunk in chunks:
                states.append(_RngState())
                output = embed_fn(chunk)
                outputs.append(_as_tuple(output))
            returns_tensor.append(isinstance(output, Tensor))
            rng_states.append(states)
            rows.append([out[0].shape[0] for out in outputs])
            cached.append(tuple(
                torch.cat(column).requires_grad_(column[0].is_floating_point()) for column in zip(*outputs)))

    # 2. loss on the full batch; gradients land on the cached embeddings
    loss = loss_fn(*[outs[0] if bare else outs for outs, bare in zip(cached, returns_tensor)])
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a scalar tensor")
    loss.backward()

    # 3. replay each chunk with grad and push its slice of the cached gradients through the towers
    for (embed_fn, _), chunks, states, outs, sizes in zip(streams, chunked, rng_states, cached, rows):
        grads = [out.grad.split(sizes) if out.grad is not None else [None] * len(sizes) for out in outs]
        for k, (chunk, state) in enumerate(zip(chunks, states)):
            with state.replay():
                outputs = _as_tuple(embed_fn(chunk))
            pairs = [(out, grad[k]) for out, grad in zip(outputs, grads)
                     if grad[k] is not None and out.requires_grad]
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    return loss.detach()
