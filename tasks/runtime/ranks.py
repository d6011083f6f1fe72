"""The ranks of one `accelerate launch` (tasks/runtime/dispatch.py) act as one run of a stage.

Rank 0 holds the stage folder's lock, decides reuse for all (``agree``), tracks, evaluates and writes the folder;
the other ranks train their shard of each batch, take part in the collective calls (the trainer's
``save_model`` gathers ZeRO-3 / FSDP shards on every rank) and wait for rank 0 (``barrier``). One process
(``WORLD_SIZE`` unset or 1) is its own rank 0 and every call here is a no-op.

The process group is accelerate's ``PartialState`` (gloo on CPU, NCCL on GPU, from the launcher's environment):
the trainer built later reuses the same one, so initialising it here before the trainer exists changes nothing.
"""

from __future__ import annotations

import contextlib
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _group() -> None:
    from accelerate import PartialState

    PartialState()


def agree(value):
    """Rank 0's ``value`` on every rank (pickled through the process group)."""
    if world_size() <= 1:
        return value
    import torch.distributed as dist

    _group()
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        _group()
        dist.barrier()


def main_only(cm):
    """``cm`` on rank 0, nothing on the others (e.g. the stage lock: one holder per run, not per rank)."""
    return cm if is_main() else contextlib.nullcontext()
