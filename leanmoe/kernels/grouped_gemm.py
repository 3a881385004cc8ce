"""Grouped GEMM for MoE experts: rows sorted by expert, one weight matrix per expert.

Shape legend: M rows (token-expert pairs, sorted by expert), K in features, N out features,
G groups (experts).

    y[offs[g-1]:offs[g]] = x[offs[g-1]:offs[g]] @ w[g]        (offs[-1] = 0)

`grouped_mm` is the one dispatch point. It is a `torch.library` custom op (with its own fake
kernel and backward), so `torch.compile` treats it as one opaque node on every device. Inside,
it runs `torch._grouped_mm` when that kernel supports the device, dtype and strides (probed once
per device and dtype; it needs 16-byte-aligned strides); else, on a GPU in bf16/fp16, leanmoe's
Triton grouped GEMM (leanmoe.kernels.fp8_gemm, no host sync); else a padded `bmm`, which needs
one host sync to learn the largest group. `grouped_mm_reference` is the plain per-group
loop the tests hold both to.

`expert_mlp` is the routed experts' whole SwiGLU MLP (two grouped GEMMs around silu * up). At
inference on CPUs with a few token copies per expert it runs a C kernel (leanmoe/kernels/cpu_moe.c,
`expert_mlp_cpu`) that reads each used expert's weights once; `expert_mlp_reference` is the grouped
GEMM path it is tested against, and what training runs.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["grouped_mm", "grouped_mm_reference", "grouped_mm_backend", "expert_mlp", "expert_mlp_cpu",
           "expert_mlp_reference", "expert_row_alignment"]


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K], w [G, K, N], offs [G] (inclusive cumulative row counts) -> y [M, N]. A loop."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    out = [x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))]
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-1])


@functools.lru_cache(maxsize=None)
def _torch_grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs (forward and weight-gradient forms) and is right here."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        dev = torch.device(device_type)
        x = torch.randn(32, 16, device=dev, dtype=dtype)
        w = torch.randn(2, 16, 16, device=dev, dtype=dtype)
        offs = torch.tensor([8, 32], device=dev, dtype=torch.int32)
        y = torch._grouped_mm(x, w.transpose(-2, -1).contiguous().transpose(-2, -1), offs=offs)
        dw = torch._grouped_mm(x.t(), y, offs=offs)
        ref_y = torch.cat([x[:8] @ w[0], x[8:] @ w[1]])
        ref_dw = torch.stack([x[:8].T @ ref_y[:8], x[8:].T @ ref_y[8:]])
        return bool(torch.allclose(y.float(), ref_y.float(), atol=0.5, rtol=0.05)
                    and torch.allclose(dw.float(), ref_dw.float(), atol=2.0, rtol=0.05))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


# NOTE: torch's CPU GEMM in bf16/fp16 is oneDNN's, which builds (JIT-compiles) a kernel for every new
# shape and caches it: ~0.55 ms for a new shape against 0.11 ms for a cached one at 575 x 256 x 128 on
# the 2-core AVX512-BF16 CPU. Experts' row counts change every step, so unpadded grouped GEMMs paid
# the build on nearly every call: bf16 training of `tiny` spent 634 ms a step in expert GEMMs against
# 236 in fp32 (MKL, no per-shape build). Rows padded to a multiple of this keep the shapes few. A
# bf16 training step of `tiny` (16 x 256 tokens, 2026-11-30): 2.04 s unpadded; 1.43 s at a multiple
# of 8, 1.35 at 16, 1.29-1.31 at 32, 1.45 at 64 and 128 (more padding rows to compute).
CPU_ONEDNN_ROW_ALIGN = 32


def expert_row_alignment(x: torch.Tensor) -> int:
    """The row multiple each expert's group should be padded to before the grouped GEMMs on x's
    device at the dtype they will run in (autocast's, if on): CPU_ONEDNN_ROW_ALIGN for bf16/fp16
    on a CPU, else 1 (no padding)."""
    if x.device.type != "cpu":
        return 1
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return CPU_ONEDNN_ROW_ALIGN if dtype in (torch.bfloat16, torch.float16) else 1


def _aligned(*ts: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte-aligned base pointers and non-unit strides."""
    for t in ts:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def grouped_mm_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """'torch._grouped_mm' or 'padded_bmm': what `grouped_mm` uses for aligned shapes here."""
    return "torch._grouped_mm" if _torch_grouped_mm_works(torch.device(device).type, dtype) else "padded_bmm"


def _group_layout(offs: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per row: its group and its index inside the group; and the largest group size."""
    ends = offs.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    group = torch.repeat_interleave(torch.arange(len(ends), device=offs.device), counts, output_size=m)
    row = torch.arange(m, device=offs.device) - (ends - counts)[group]
    cap = int(counts.max()) if m else 0  # host sync: the padded size
    return group, row, max(cap, 1)


def _pad(x: torch.Tensor, group: torch.Tensor, row: torch.Tensor, n_groups: int, cap: int) -> torch.Tensor:
    out = x.new_zeros(n_groups, cap, x.shape[1])
    out[group, row] = x
    return out


def _use_triton(x: torch.Tensor) -> bool:
    """A GPU without a working torch._grouped_mm: leanmoe's Triton grouped GEMM (no host sync)."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    from leanmoe.kernels.dispatch import use_triton  # lazy: imports triton

    return use_triton(x)


def _grouped_mm_impl(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if _torch_grouped_mm_works(x.device.type, x.dtype) and _aligned(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    if _use_triton(x):
        from leanmoe.kernels.fp8_gemm import grouped_mm_contiguous

        return grouped_mm_contiguous(x, w, offs)
    group, row, cap = _group_layout(offs, x.shape[0])
    return torch.bmm(_pad(x, group, row, w.shape[0], cap), w)[group, row]


@torch.library.custom_op("leanmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_impl(x, w, offs)


@_grouped_mm_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("leanmoe::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_wgrad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, n_groups: int) -> torch.Tensor:
    """dw[g] = x[rows of g]^T @ dy[rows of g]: [G, K, N] (zero for empty groups)."""
    if _torch_grouped_mm_works(x.device.type, x.dtype) and _aligned(x.t(), dy):
        return torch._grouped_mm(x.t(), dy, offs=offs)
    if _use_triton(x):
        from leanmoe.kernels.fp8_gemm import grouped_mm_wgrad_contiguous

        return grouped_mm_wgrad_contiguous(x, dy, offs)
    group, row, cap = _group_layout(offs, x.shape[0])
    return torch.bmm(_pad(x, group, row, n_groups, cap).transpose(1, 2), _pad(dy, group, row, n_groups, cap))


@_grouped_mm_wgrad.register_fake
def _(x, dy, offs, n_groups):
    return x.new_empty(n_groups, x.shape[1], dy.shape[1])


def _setup_context(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dy = dy.contiguous()
    dx = _grouped_mm_op(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_wgrad(x, dy, offs, w.shape[0]) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K], w [G, K, N] (any strides; a transposed [G, N, K] view is fine), offs [G] int32
    inclusive row offsets (offs[-1] == M) -> y [M, N]. Differentiable in x and w."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: expected x [M, K] and w [G, K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    if offs.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: offs must have one entry per group ({w.shape[0]}), got {tuple(offs.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm: x is {x.dtype} but w is {w.dtype}")
    offs = offs.to(torch.int32)
    if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and not torch.compiler.is_compiling():
        # nothing to differentiate, nothing traced: the custom op's dispatch (tens of microseconds
        # a call, a tenth of a batch-1 decode step's MoE) buys nothing
        return _grouped_mm_impl(x, w, offs)
    return _grouped_mm_op(x, w, offs)


# ---------------------------------------------------------------------- the experts' whole MLP
# NOTE: the C kernel beat the grouped GEMMs up to this many rows (token copies) per expert on
# average (bench/kernels.py --only experts-cpu, 2-core AVX-512 CPU: 2.1-2.8x at 0.25-4 rows,
# 1.30x at 8, 0.91-0.93x at 16; docs/benchmarks.md)
CPU_EXPERTS_MAX_ROWS = 8


def expert_mlp_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert: x [M, D], w1 [E, 2F, D] (gate rows, then up rows),
    w2 [E, D, F], offs [E] inclusive row ends -> y [M, D]. Grouped GEMMs, differentiable."""
    gate, up = grouped_mm(x, w1.transpose(1, 2), offs).chunk(2, dim=-1)
    return grouped_mm(torch.nn.functional.silu(gate) * up, w2.transpose(1, 2), offs)


def expert_mlp_cpu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`expert_mlp_reference` by the C kernel (leanmoe/kernels/cpu_moe.c): fp32 CPU tensors, no
    gradient. Each used expert's weights are read once for all its rows."""
    from leanmoe.kernels.cpu_kernels import library
    from leanmoe.kernels.dispatch import use_cpu_kernel

    if not use_cpu_kernel(x, w1, w2):
        raise RuntimeError("expert_mlp_cpu needs fp32 CPU tensors and the built C kernels "
                           "(leanmoe.kernels.cpu_kernels.status() says why they are not)")
    (m, d), (e, f2, d1), (e2, d2, f) = x.shape, w1.shape, w2.shape
    if d1 != d or d2 != d or e2 != e or f2 != 2 * f or offs.shape != (e,):
        raise ValueError(f"expert_mlp_cpu: expected x [M, D], w1 [E, 2F, D], w2 [E, D, F], offs [E]; got "
                         f"{tuple(x.shape)}, {tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(offs.shape)}")
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    offs = offs.to(torch.int32).contiguous()
    h = x.new_empty(m, 2 * f)
    y = x.new_empty(m, d)
    lib = library()  # built: use_cpu_kernel said so
    rc = lib.leanmoe_expert_mlp_f32(x.data_ptr(), offs.data_ptr(), w1.data_ptr(), w2.data_ptr(), h.data_ptr(),
                                    y.data_ptr(), m, e, d, f, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"expert_mlp_cpu: offs {offs.tolist()} must be nondecreasing row ends with offs[-1] == {m}")
    return y


def _use_cpu_experts(x: torch.Tensor, w1: torch.Tensor) -> bool:
    from leanmoe.kernels.dispatch import use_cpu_kernel

    return x.shape[0] <= CPU_EXPERTS_MAX_ROWS * w1.shape[0] and use_cpu_kernel(x, w1)


@torch.library.custom_op("leanmoe::expert_mlp", mutates_args=())
def _expert_mlp_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if _use_cpu_experts(x, w1):
        return expert_mlp_cpu(x, w1, w2, offs)
    return expert_mlp_reference(x, w1, w2, offs)


@_expert_mlp_op.register_fake
def _(x, w1, w2, offs):
    return x.new_empty(x.shape)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The routed experts' SwiGLU MLP (see `expert_mlp_reference` for the shapes). With a gradient
    to compute: grouped GEMMs. Without (inference): the C kernel for fp32 CPU tensors with at most
    CPU_EXPERTS_MAX_ROWS rows per expert on average, decided at call time (under torch.compile too:
    the choice is one opaque op, so the traced graph holds for any row count)."""
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad):
        return expert_mlp_reference(x, w1, w2, offs)
    if torch.compiler.is_compiling():
        return _expert_mlp_op(x, w1, w2, offs)
    if _use_cpu_experts(x, w1):
        return expert_mlp_cpu(x, w1, w2, offs)
    return expert_mlp_reference(x, w1, w2, offs)
