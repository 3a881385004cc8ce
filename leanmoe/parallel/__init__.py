"""Distributed training on torch.distributed (NCCL on GPUs, gloo on CPU), applied after the model
is built: expert parallelism with DeepEP's dispatch/combine contract, FSDP2, activation
checkpointing, and full-state checkpoints that resume with any world size.

    groups.py       ParallelConfig, ParallelDims (the (dp, ep) DeviceMesh), torchrun environment
    ep.py           dispatch / combine (all_to_all_single with autograd), FP8 payloads, ExpertParallel
    parallelize.py  parallelize(model, dims): EP sharding of experts, FSDP2, checkpointing, clipping
    full_state.py   full state of a parallelized model (gather to rank 0, slice on load)
    launch.py       `leanmoe train --nproc N`: re-run the command under torchrun

See docs/distributed.md. Importing this package starts nothing (and loads no Triton: the FP8
cast is imported when an FP8 dispatch first runs).
"""

from leanmoe.parallel.ep import ExpertParallel, combine_allgather, dispatch_allgather, get_dispatch_layout
from leanmoe.parallel.config import ParallelConfig
from leanmoe.parallel.groups import ParallelDims, init_process_group
from leanmoe.parallel.parallelize import clip_grad_norm_, parallelize

__all__ = ["ExpertParallel", "ParallelConfig", "ParallelDims", "init_process_group", "parallelize",
           "clip_grad_norm_", "get_dispatch_layout", "dispatch_allgather", "combine_allgather"]
