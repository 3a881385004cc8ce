"""DeepSeekMoE: a router, routed experts computed by grouped GEMM, shared experts, and balancing.

Shape legend: B batch, T tokens per sequence, N = B*T tokens, D hidden, E routed experts,
K experts per token (top-k), F expert width (moe_intermediate_size), G groups, M = N*K.

Routing (DeepSeek-V3 section 2.1.2):
    s = sigmoid(x W_g^T)                 (softmax for V2-style configs)
    choice = s + b                       (b: e_score_correction_bias, selection only)
    groups: keep the `topk_group` groups with the best score (sum of their top-2 choices for
            sigmoid, max for softmax); experts elsewhere cannot be picked
    idx = top-K of choice;  w = s[idx] (bias-free), normalised to sum 1 if norm_topk_prob,
    times routed_scaling_factor.
Balancing without an auxiliary loss: each step, b_i += gamma * sign(mean load - load_i). An
optional sequence-wise balance loss (eq. 17-20) with a small alpha guards single sequences.

Expert parallelism is applied from outside (leanmoe.parallel): it sets `MoE.dispatcher` and
leaves only this rank's experts in `MoE.experts`; the routed path then becomes dispatch ->
local grouped GEMM -> combine. This file never calls torch.distributed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanmoe.config import ModelConfig
from leanmoe.kernels import experts_bf16, moe_rows
from leanmoe.kernels.grouped_gemm import expert_mlp, expert_row_alignment
from leanmoe.model.layers import MLP


def expert_counts(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many token copies each expert receives: topk_idx [..., K] -> [E] int32 (static shape)."""
    flat = topk_idx.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


def padded_layout(flat_M: torch.Tensor, order_M: torch.Tensor, counts_E: torch.Tensor, k: int,
                  align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows for token copies sorted by expert with each expert's group padded to a multiple of
    `align`. flat_M [N*K]: each copy's expert (copy j is token j // k's slot j % k); order_M: the
    copies by expert (a stable argsort of flat_M); counts_E [E]: copies per expert. Returns src_P
    [P], the token each row reads (padding rows read token 0); ends_pad [E] int64, each expert's
    inclusive row end; row_M [N*K], each copy's row, in token order."""
    counts = counts_E.long()
    padded = (counts + align - 1) // align * align
    ends_pad = padded.cumsum(0)
    shift_E = (ends_pad - padded) - (counts.cumsum(0) - counts)  # padded start - packed start
    pos_M = torch.arange(flat_M.numel(), device=flat_M.device) + shift_E[flat_M[order_M]]
    m_pad = int(ends_pad[-1])  # host sync: the padded size
    src_P = torch.zeros(m_pad, dtype=torch.long, device=flat_M.device).index_copy_(0, pos_M, order_M // k)
    row_M = torch.empty_like(pos_M).index_copy_(0, order_M, pos_M)
    return src_P, ends_pad, row_M


def combine(y_MD: torch.Tensor, order_M: torch.Tensor, topk_w_NK: torch.Tensor, partial: bool = False) -> torch.Tensor:
    """Un-sort the experts' outputs y [M, D] (row i is token copy order[i]) and sum each token's
    copies weighted by its routing weights [N, K] -> [N, D]. partial: some copies are missing
    (expert parallelism); they count as zero.

    The un-sort writes in place into a fresh buffer: deterministic, unlike index_add on GPU, and
    its backward is a gather."""
    n, k = topk_w_NK.shape
    y_buf = y_MD.new_zeros(n * k, y_MD.shape[-1]) if partial else torch.empty_like(y_MD)
    return weighted_sum(y_buf.index_copy_(0, order_M, y_MD).view(n, k, y_MD.shape[-1]), topk_w_NK)


def weighted_sum(y_NKD: torch.Tensor, topk_w_NK: torch.Tensor) -> torch.Tensor:
    """Each token's K expert outputs [N, K, D], in token order, summed with its routing weights
    [N, K] -> [N, D]. NOTE: an einsum here becomes N batched [1, K] x [K, D] products, which took
    2.5x this multiply-and-sum (backward included) on CPU."""
    return (y_NKD * topk_w_NK.to(y_NKD.dtype)[..., None]).sum(dim=1)


class Router(nn.Module):
    """The gate (`mlp.gate` in HF names): weight [E, D] and e_score_correction_bias [E], both fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.norm_topk_prob = cfg.scoring_func, cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> topk_idx [N, K] int64, topk_weight [N, K] fp32, scores [N, E] fp32."""
        with torch.autocast(x_ND.device.type, enabled=False):  # routing stays fp32 under autocast
            logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = logits_NE.sigmoid() if self.scoring_func == "sigmoid" else logits_NE.softmax(dim=-1)
        choice_NE = scores_NE + self.e_score_correction_bias.float()
        if self.n_group > 1:
            n = choice_NE.shape[0]
            grouped_NGe = choice_NE.view(n, self.n_group, -1)
            if self.scoring_func == "sigmoid":
                group_score_NG = grouped_NGe.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_score_NG = grouped_NGe.amax(dim=-1)
            keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
            keep_NG.scatter_(1, group_score_NG.topk(self.topk_group, dim=-1).indices, True)
            choice_NE = grouped_NGe.masked_fill(~keep_NG[..., None], float("-inf")).view(n, -1)
        topk_idx_NK = choice_NE.topk(self.top_k, dim=-1).indices
        topk_w_NK = scores_NE.gather(1, topk_idx_NK)
        if self.norm_topk_prob and self.top_k > 1:
            topk_w_NK = topk_w_NK / (topk_w_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx_NK, topk_w_NK * self.routed_scaling_factor, scores_NE


class Experts(nn.Module):
    """E SwiGLU experts held as stacked weights: gate_up_proj [E, 2F, D] (gate rows first, as
    transformers v5 stores it) and down_proj [E, D, F]. Saved per expert in HF files. Under
    expert parallelism (leanmoe.parallel) a rank's Experts holds only its E / ep experts."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x_MD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, offs [E] inclusive row offsets -> [M, D]. bf16 rows with fp32
        weights on a CPU with AVX512-BF16 (bf16 training: MoE.gather_rows's padded rows) run the C
        kernel leanmoe.kernels.experts_bf16; the rest the grouped GEMMs."""
        w1, w2 = self.gate_up_proj, self.down_proj
        if experts_bf16.experts_kernel_applies(x_MD, w1, w2):  # bf16 rows, fp32 weights, AVX512-BF16 CPU
            return experts_bf16.expert_mlp_bf16(x_MD, w1, w2, offs_E)
        if torch.is_autocast_enabled(x_MD.device.type):  # custom ops are not autocast: cast here
            dtype = torch.get_autocast_dtype(x_MD.device.type)
            x_MD, w1, w2 = x_MD.to(dtype), w1.to(dtype), w2.to(dtype)
        return expert_mlp(x_MD, w1, w2, offs_E)

    def forward_reference(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, topk_w_NK: torch.Tensor) -> torch.Tensor:
        """The obvious per-expert loop the grouped path is tested against: x [N, D] -> [N, D]."""
        out = torch.zeros_like(x_ND)
        for e in range(self.n_experts):
            tok, slot = torch.where(topk_idx_NK == e)
            if tok.numel() == 0:
                continue
            gate, up = (x_ND[tok] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.down_proj[e].T
            out = out.index_add(0, tok, y * topk_w_NK[tok, slot, None].to(y.dtype))
        return out


class MoE(nn.Module):
    """Routed + shared experts for one layer (HF: `mlp.gate`, `mlp.experts`, `mlp.shared_experts`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)
        # tokens routed to each expert since the last update_router_bias() (training only)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        # expert parallelism: an object with DeepEP's dispatch(x, topk_idx, topk_weights) ->
        # (x, local topk_idx, topk_weights, per-local-expert counts, handle) and combine(y, handle),
        # set by leanmoe.parallel (None: every expert is here)
        self.dispatcher = None

    def routed(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, topk_w_NK: torch.Tensor,
               counts_E: torch.Tensor, n_copies: int | None = None) -> torch.Tensor:
        """Sort token copies by expert, run the grouped GEMMs, weight and sum back: [N, D].
        counts_E [E] int32: how many token copies each expert receives.

        Under expert parallelism, ids of -1 name experts held by other ranks: they are skipped,
        and n_copies (a host int, the number of ids >= 0, known from the dispatch) must be given."""
        x_PD, offs_E, order_M, row_M = self.gather_rows(x_ND, topk_idx_NK, counts_E, n_copies)
        return self.combine_rows(self.experts(x_PD, offs_E), order_M, row_M, topk_w_NK, partial=n_copies is not None)

    def gather_rows(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, counts_E: torch.Tensor,
                    n_copies: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The experts' input, token copies sorted by expert: (x_PD, offs_E [E] int32 inclusive row
        ends, order_M, row_M). Copy j is token j // K's slot j % K; order_M lists the copies by expert.

        Packed (row_M None): row i of x_PD is copy order_M[i]. On a CPU in bf16/fp16 each expert's
        rows are padded to a multiple of expert_row_alignment instead (DeepGEMM's aligned contiguous
        layout: the grouped GEMMs then see few distinct shapes), and row_M [N*K] is each copy's row.
        Padding rows read token 0 and their outputs are never read back: their gradients are exact
        zeros, so they add nothing to the weights' or the input's gradients. In bf16 the padded gather
        and combine_rows run C kernels (leanmoe.kernels.moe_rows) where they are built."""
        k = topk_idx_NK.shape[1]
        flat_M = topk_idx_NK.reshape(-1)
        if n_copies is None:
            order_M = flat_M.argsort(stable=True)  # token copies grouped by expert
        else:  # ids of -1 sort last and are cut off
            order_M = torch.where(flat_M < 0, self.experts.n_experts, flat_M).argsort(stable=True)[:n_copies]
        align = expert_row_alignment(x_ND) if n_copies is None else 1
        if align == 1:
            return x_ND.index_select(0, order_M // k), counts_E.cumsum(0, dtype=torch.int32), order_M, None
        src_P, ends_pad, row_M = padded_layout(flat_M, order_M, counts_E, k, align)
        if moe_rows.rows_kernels_apply(x_ND):  # bf16: cast and gather in one pass, a gather-sum backward
            x_PD = moe_rows.gather_rows(x_ND, src_P, row_M, k)
        else:
            x_PD = x_ND.index_select(0, src_P)
        return x_PD, ends_pad.to(torch.int32), order_M, row_M

    @staticmethod
    def combine_rows(y_PD: torch.Tensor, order_M: torch.Tensor, row_M: torch.Tensor | None,
                     topk_w_NK: torch.Tensor, partial: bool = False) -> torch.Tensor:
        """The experts' output rows, in gather_rows's layout, back to their tokens: each token's
        copies summed with its routing weights [N, K] -> [N, D]. partial: see `combine`."""
        if row_M is None:
            return combine(y_PD, order_M, topk_w_NK, partial=partial)
        assert not partial, "gather_rows pads only when every copy is here"
        if y_PD.dtype == torch.bfloat16 and moe_rows.rows_kernels_apply(y_PD):
            return moe_rows.combine_rows(y_PD, row_M, topk_w_NK)
        n, k = topk_w_NK.shape
        return weighted_sum(y_PD.index_select(0, row_M).view(n, k, -1), topk_w_NK)

    def routed_parallel(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, topk_w_NK: torch.Tensor) -> torch.Tensor:
        """Expert parallelism (DeepEP's contract): tokens travel to the ranks holding their
        experts, the local experts run, the outputs travel back and are summed: [N, D]."""
        recv_x, recv_idx, recv_w, recv_counts, handle = self.dispatcher.dispatch(x_ND, topk_idx_NK, topk_w_NK)
        counts = torch.tensor(recv_counts, dtype=torch.int32, device=x_ND.device)
        y_RD = self.routed(recv_x, recv_idx, recv_w, counts, n_copies=sum(recv_counts))
        return self.dispatcher.combine(y_RD, handle)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] -> (y [B, T, D], sequence-wise balance loss or None)."""
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(-1, d)
        topk_idx_NK, topk_w_NK, scores_NE = self.gate(x_ND)
        counts_E = expert_counts(topk_idx_NK, self.n_experts)
        if self.dispatcher is None:
            y_ND = self.routed(x_ND, topk_idx_NK, topk_w_NK, counts_E)
        else:
            y_ND = self.routed_parallel(x_ND, topk_idx_NK, topk_w_NK)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        aux = None
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += counts_E
            if self.aux_loss_alpha > 0:
                aux = self.sequence_balance_loss(scores_NE.view(b, t, -1), topk_idx_NK.view(b, t, -1))
        return y_ND.view(b, t, d), aux

    def sequence_balance_loss(self, scores_BTE: torch.Tensor, topk_idx_BTK: torch.Tensor) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged over the batch (V3 eq. 17-20):
        f_i = E / (K T) * #tokens choosing i,  P_i = mean_t s_i,t / sum_j s_j,t."""
        b, t, e = scores_BTE.shape
        counts_BE = torch.zeros(b, e, device=scores_BTE.device, dtype=scores_BTE.dtype)
        counts_BE.scatter_add_(1, topk_idx_BTK.reshape(b, -1), torch.ones_like(topk_idx_BTK.reshape(b, -1), dtype=scores_BTE.dtype))
        f_BE = counts_BE * (e / (self.top_k * t))
        p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(dim=1)
        return self.aux_loss_alpha * (f_BE * p_BE).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, speed: float) -> None:
        """b_i += speed * sign(mean load - load_i): under-loaded experts become more attractive."""
        load = load_E.to(self.gate.e_score_correction_bias)
        self.gate.e_score_correction_bias += speed * torch.sign(load.mean() - load)
