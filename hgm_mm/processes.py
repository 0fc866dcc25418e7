"""Catalogue jobs across processes: the torch.distributed group `accelerate launch` (or torchrun) starts,
read without accelerate, so that embedding and indexing also run in a plain process."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .files import atomic_write


def process_share(rank: int | None, world_size: int | None) -> tuple[int, int, Callable[[], None] | None]:
    """(rank, world_size, barrier or None) from the arguments or the torch.distributed process group."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None:
        if group:
            return dist.get_rank(), dist.get_world_size(), dist.barrier
        return 0, 1, None
    if rank is None or world_size is None:
        raise ValueError(f"rank={rank}, world_size={world_size}: give both or neither")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside 0..{world_size - 1} (world_size={world_size})")
    same_group = group and dist.get_world_size() == world_size and dist.get_rank() == rank
    return rank, world_size, dist.barrier if same_group else None


class ProcessGroup:
    """The torch.distributed group a catalogue job runs in (one process when there is none): process 0
    does the work that must be done once, and the others wait for it or read what it computed."""

    def __init__(self) -> None:
        self.rank, self.world_size, self._barrier = process_share(None, None)

    def barrier(self) -> None:
        if self._barrier is not None:
            self._barrier()

    def first(self, work: Callable[[], Any]) -> Any:
        """`work()` on process 0, whose failure every process raises (none waits for a process that gave up)."""
        if self._barrier is None:
            return work()
        import torch.distributed as dist

        result, error, failure = None, None, [None]
        if self.rank == 0:
            try:
                result = work()
            except (ValueError, OSError, LookupError, ImportError) as err:
                error, failure = err, [(type(err).__name__, str(err))]
        dist.broadcast_object_list(failure, src=0)
        if error is not None:
            raise error
        if failure[0] is not None:
            kind = {"FileNotFoundError": FileNotFoundError, "ConnectionError": ConnectionError}.get(failure[0][0],
                                                                                                  ValueError)
            raise kind(failure[0][1])
        return result

    def first_shared(self, work: Callable[[], tuple[list[str], np.ndarray, dict[str, str]] | None], path: Path):
        """`work()`'s (ids, vectors, keys) computed by process 0 and handed to the others through `path`."""
        if self._barrier is None:
            return work()
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        if self.rank == 0:
            previous = work()
            ids, vectors, keys = previous if previous is not None else ([], np.zeros((0, 1), np.float32), None)
            atomic_write(path, lambda tmp: save_file({"vectors": np.ascontiguousarray(vectors)}, str(tmp),
                                                     metadata={"ids": json.dumps(ids), "keys": json.dumps(keys)}))
        self.barrier()
        if self.rank != 0:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata()
            keys = json.loads(meta["keys"])
            previous = None if keys is None else (json.loads(meta["ids"]), load_file(str(path))["vectors"], keys)
        self.barrier()
        if self.rank == 0:
            path.unlink(missing_ok=True)
        return previous
