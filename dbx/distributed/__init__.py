"""Training one spec on several processes with PyTorch's own engine: torch.distributed, DDP and
torchrun (``torch.distributed.run``). Nothing here replaces them; these small modules connect
them to dbx:

- ``group``: the process group from torchrun's environment (gloo for CPU tensors, nccl for CUDA
  ones, one GPU per local rank), and who this process is (``rank``, ``world_size``);
- ``reduce``: ``sum_across_ranks`` and ``global_units`` (what a step's loss is divided by);
- ``ddp``: ``distributed_parts`` wraps the model in DDP (SyncBatchNorm on request) so that the
  summed gradient is the one a single process computes; ``accumulating`` skips the all-reduce of
  all but the last micro-batch;
- ``ranks``: ``rank0_only`` and the stand-in run that the other ranks log to (nothing);
- ``failures``: a failing rank leaves its message in torchrun's store for rank 0 to record;
- ``launch``: ``dbx run --nproc N`` as a ``torch.distributed.run`` command line.

In one process (no torchrun) every function here is a no-op or the identity.
"""
from dbx.distributed.group import is_distributed, local_rank, rank, rank_device, setup, world_size
from dbx.distributed.reduce import global_units, sum_across_ranks

__all__ = ["is_distributed", "local_rank", "rank", "rank_device", "setup", "world_size", "global_units", "sum_across_ranks"]
