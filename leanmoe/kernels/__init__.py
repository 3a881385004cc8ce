"""Kernels: one module per op, each a torch reference, a fast path and one dispatch point.

    fp8           per_token_cast_to_fp8, per_block_cast_to_fp8 (+ dequant): fine-grained E4M3 casts
    fp8_gemm      fp8_gemm_nt, m_grouped_* / k_grouped_* GEMMs (DeepGEMM's semantics), contiguous_layout
    fp8_linear    fp8_linear / Fp8Linear / fp8_grouped_linear: FP8 training ops (all three GEMMs)
    grouped_gemm  grouped_mm: the bf16/fp32 expert GEMM the model calls (differentiable)
    mla_decode    mla_decode: paged latent-cache MLA decode (FlashMLA's semantics)
    deep_gemm     DeepGEMM's API and calling conventions, as a drop-in module
    flash_mla     FlashMLA's API and calling conventions, as a drop-in module

The names below load their module on first use (PEP 562), so `import leanmoe.kernels` stays
free of triton (an import that costs seconds); leanmoe.kernels.dispatch is where it is imported.
`mla_decode` and `fp8_linear` name a module and its main function alike: as attributes of this
package they are the modules (Python binds a submodule there once it is imported), so import the
functions from them: `from leanmoe.kernels.mla_decode import mla_decode`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "fp8": ("per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_token_dequant", "per_block_dequant",
            "FP8_DTYPE", "FP8_MAX"),
    "fp8_gemm": ("fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
                 "k_grouped_fp8_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_contiguous",
                 "k_grouped_gemm_nt_contiguous", "get_m_alignment_for_contiguous_layout", "contiguous_layout",
                 "calc_diff"),
    "fp8_linear": ("Fp8Linear", "fp8_grouped_linear"),
    "grouped_gemm": ("grouped_mm", "grouped_mm_reference", "grouped_mm_backend"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'leanmoe.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"leanmoe.kernels.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
