"""FP8 training applied to a built model (DeepSeek-V3 section 3.3), as torchtitan applies it.

    model = Transformer(cfg)           # a plain fp32/bf16 model, also on the meta device
    convert_to_fp8(model)              # before parallelize(...): FSDP wraps the converted classes
    parallelize(model, dims, ...)

`convert_to_fp8(model)` switches a model over in place: every nn.Linear becomes an `Fp8Linear`
(leanmoe.kernels.fp8_linear) and every `Experts` an `Fp8Experts`; parameters, their names and any
optimizer state are untouched, so checkpoints are the same files and load as a plain model. As in
DeepSeek-V3 (section 3.3.1), the embedding, the output head (`lm_head`), the router (`mlp.gate`),
norms and the attention core itself stay in high precision.

NOTE: the kernels are imported when a converted model first runs or is converted, not when this
module is: `import leanmoe.train` stays triton-free.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from leanmoe.model.moe import Experts

__all__ = ["Fp8Experts", "convert_to_fp8", "fp8_loss_curves", "HIGH_PRECISION"]

# module names kept in high precision (DeepSeek-V3 section 3.3.1)
HIGH_PRECISION = ("lm_head", "gate")


class Fp8Experts(Experts):
    """`Experts` whose six GEMMs (forward, dgrad, wgrad of gate_up and down) run in FP8. Token
    copies are scattered into DeepGEMM's 128-aligned contiguous layout (a static-size buffer, no
    host sync), run through the m-grouped / k-grouped FP8 GEMMs and gathered back."""

    def forward(self, x_MD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        from leanmoe.kernels.fp8_gemm import contiguous_layout
        from leanmoe.kernels.fp8_linear import fp8_grouped_linear

        m = x_MD.shape[0]
        pos_M, m_indices, k_ends = contiguous_layout(offs_E, m)
        x_pad = x_MD.new_zeros(m_indices.shape[0], x_MD.shape[1]).index_copy(0, pos_M, x_MD)
        # outputs in x's dtype, or the autocast dtype when autocast is on (fp8_grouped_linear's default)
        gate, up = fp8_grouped_linear(x_pad, self.gate_up_proj, m_indices, k_ends).chunk(2, dim=-1)
        y_pad = fp8_grouped_linear(F.silu(gate) * up, self.down_proj, m_indices, k_ends)
        return y_pad[pos_M]


def convert_to_fp8(model: nn.Module, keep: tuple[str, ...] = HIGH_PRECISION) -> nn.Module:
    """Train `model` in FP8 from now on: every nn.Linear -> Fp8Linear, every Experts ->
    Fp8Experts, except modules whose own name is in `keep`. In place; returns the model. Call it
    on the built model, before `leanmoe.parallel.parallelize` (which wraps these classes)."""
    from leanmoe.kernels.fp8_linear import Fp8Linear

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            continue
        if type(module) is nn.Linear:
            module.__class__ = Fp8Linear
        elif type(module) is Experts:
            module.__class__ = Fp8Experts
    return model


def fp8_loss_curves(model: nn.Module, batches, lr: float = 1e-3,
                    autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a copy of `model` (a leanmoe Transformer) as it is and an FP8 copy on the same
    batches [(input_ids, targets), ...] with AdamW and the router-bias update, under autocast to
    `autocast_dtype` if given: per-step lm losses (baseline, fp8). How to check that FP8 training
    tracks the high-precision run on a model and data of your own."""
    curves = []
    for m in (copy.deepcopy(model), convert_to_fp8(copy.deepcopy(model))):
        opt = torch.optim.AdamW(m.parameters(), lr=lr)
        losses = []
        for x, y in batches:
            with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = m.compute_loss(x, y)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            m.update_router_bias()
            losses.append(out.lm_loss.item())
        curves.append(torch.tensor(losses))
    return curves[0], curves[1]
