"""The routed experts' SwiGLU MLP for bf16 training on CPUs with AVX512-BF16: forward and backward
in one parallel C kernel each (leanmoe/kernels/cpu_experts.c).

Shape legend: P rows (token copies sorted by expert), E experts, D hidden, F expert width.

    expert_mlp_bf16(x [P, D] bf16, w1 [E, 2F, D] fp32, w2 [E, D, F] fp32, offs [E] int32) -> bf16 [P, D]

It computes what `leanmoe.kernels.grouped_gemm.expert_mlp_reference` computes on x and the weights
rounded to bf16 (autocast's cast), and is differentiable in x, w1 and w2. The weights' gradients come
back in fp32, summed in fp32 over the expert's rows (the torch path rounds them to bf16 first).

Why: torch's CPU grouped GEMM runs one oneDNN call per expert, too small at the `tiny` preset's
shapes to keep two cores busy; the C kernel shares (expert, row block) tasks between the threads.
`python bench/kernels.py --only experts-bf16` compares the two; tests/kernels/test_experts_bf16.py
holds them equal.
"""

from __future__ import annotations

import torch

__all__ = ["experts_kernel_applies", "expert_mlp_bf16"]


def _lib():
    from leanmoe.kernels.cpu_kernels import library

    lib = library()
    return lib if lib is not None and lib.leanmoe_experts_bf16_available() else None


def experts_kernel_applies(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether expert_mlp_bf16 runs here: bf16 rows and fp32 weights on a CPU, D and F multiples of
    16, no torch.compile tracing, and the C kernels built with AVX512-BF16."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or torch.compiler.is_compiling():
        return False
    if w1.dtype != torch.float32 or w2.dtype != torch.float32 or w1.device.type != "cpu":
        return False
    d, f = x.shape[-1], w2.shape[-1]
    return d % 16 == 0 and f % 16 == 0 and _lib() is not None


def _check(rc: int, offs: torch.Tensor, p: int) -> None:
    if rc == -2:
        raise ValueError(f"expert_mlp_bf16: offs {offs.tolist()} must be nondecreasing row ends with offs[-1] == {p}")
    if rc == -3:
        raise RuntimeError("expert_mlp_bf16: this build of the C kernels has no AVX512-BF16")
    if rc == -4:
        raise ValueError("expert_mlp_bf16: D and F must be positive multiples of 16")
    if rc != 0:
        raise MemoryError(f"expert_mlp_bf16: the C kernel could not allocate its scratch memory ({rc})")


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, offs):
        x, w1, w2 = x.detach().contiguous(), w1.detach().contiguous(), w2.detach().contiguous()
        (p, d), (e, f) = x.shape, (w2.shape[0], w2.shape[2])
        h = torch.empty(p, 2 * f, dtype=torch.bfloat16)
        y = torch.empty(p, d, dtype=torch.bfloat16)
        rc = _lib().leanmoe_experts_bf16_forward(x.data_ptr(), offs.data_ptr(), e, p, d, f, w1.data_ptr(),
                                                 w2.data_ptr(), h.data_ptr(), y.data_ptr(), torch.get_num_threads())
        _check(rc, offs, p)
        ctx.save_for_backward(x, w1, w2, offs, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, offs, h = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous()
        (p, d), (e, f) = x.shape, (w2.shape[0], w2.shape[2])
        dx = torch.empty(p, d, dtype=torch.bfloat16) if ctx.needs_input_grad[0] else None
        dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        rc = _lib().leanmoe_experts_bf16_backward(x.data_ptr(), offs.data_ptr(), e, p, d, f, w1.data_ptr(),
                                                  w2.data_ptr(), h.data_ptr(), dy.data_ptr(),
                                                  None if dx is None else dx.data_ptr(), dw1.data_ptr(),
                                                  dw2.data_ptr(), torch.get_num_threads())
        _check(rc, offs, p)
        return dx, dw1, dw2, None


def expert_mlp_bf16(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [P, D] bf16 rows sorted by expert, w1 [E, 2F, D] and w2 [E, D, F] fp32, offs [E] inclusive
    row ends -> bf16 [P, D]. See the module's docstring; experts_kernel_applies says when it runs."""
    (_, d), (e, f2, d1), (e2, d2, f) = x.shape, w1.shape, w2.shape
    if x.dim() != 2 or d1 != d or d2 != d or e2 != e or f2 != 2 * f or offs.shape != (e,):
        raise ValueError(f"expert_mlp_bf16: expected x [P, D], w1 [E, 2F, D], w2 [E, D, F], offs [E]; got "
                         f"{tuple(x.shape)}, {tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(offs.shape)}")
    if not experts_kernel_applies(x, w1, w2):
        raise ValueError("expert_mlp_bf16 needs bf16 x and fp32 weights on a CPU with D and F multiples of 16, "
                         "and the C kernels built with AVX512-BF16 (experts_kernel_applies)")
    return _ExpertMLP.apply(x, w1, w2, offs.to(torch.int32).contiguous())
