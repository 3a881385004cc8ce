"""Decode throughput and KV-cache size: leanmoe's engine vs transformers' `generate`, same weights.

Both run greedy decoding of the same random prompts on one checkpoint (random weights from a
preset, or --checkpoint), at each batch size, timed alternately in one process so machine noise
hits both; each figure is the best of --repeats runs (on a shared machine the best run is the
one least disturbed by other processes). Decode tokens/s excludes the prompt: each side's
prefill time (a 1-token generation) is subtracted from the full generation's time. Also checks
that both produce the same tokens, and reports KV-cache bytes per token: leanmoe's paged latent
cache, transformers' cache as it is after generate, and the expanded per-head K/V a non-MLA
cache would hold, with the same arithmetic for the DeepSeek-V3 shape.

    python bench/decode.py                             # tiny preset, batch 1 and 16, CPU
    python bench/decode.py --batch-sizes 1 4 16 64 --new-tokens 128
    python bench/decode.py --checkpoint runs/mtp --speculative    # trained with --mtp-layers 1: MTP drafts
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings

import torch

import leanmoe
from leanmoe import ModelConfig, Transformer
from leanmoe.infer import LLM, SamplingParams


def load_transformers(path):
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.DeepseekV3ForCausalLM.from_pretrained(path).eval()


def hf_generate(hf, ids: torch.Tensor, new: int):
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, return_dict_in_generate=True)


def hf_cache_bytes_per_token(out, batch: int) -> float:
    cache = out.past_key_values
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total / (batch * (out.sequences.shape[1] - 1))


def expanded_kv_bytes(cfg: ModelConfig, elem: int) -> int:
    """A per-head K/V cache (no MLA absorption): H * (d_qk + d_v) values per token per layer."""
    return cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", help="an HF-layout folder or run folder instead of random weights")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--speculative", action="store_true", help="draft with the MTP module (useful on trained weights)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: both models run there")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    if args.checkpoint:
        path = leanmoe.weights.resolve_checkpoint(args.checkpoint)
        model = leanmoe.from_pretrained(path)
    else:
        model = Transformer(ModelConfig.from_preset(args.preset)).eval()
        path = leanmoe.save_pretrained(model, tmp.name)
    cfg = model.config
    model = model.to(args.device, dtype)
    llm = LLM(model, speculative=args.speculative, max_num_seqs=max(args.batch_sizes))
    if llm.config.compile_decode:  # as `leanmoe serve` does before it takes requests
        print(f"# leanmoe decode step: {llm.runner.compile_decode(warmup=True)}")
    hf = None if args.no_transformers else load_transformers(path).to(args.device, dtype)
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} CPU threads")
    print(f"# decode benchmark: {args.checkpoint or args.preset}, {cfg.num_hidden_layers} layers, "
          f"{where}, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"speculative={llm.config.speculative}")

    rows = []
    hf_bytes = None
    for b in args.batch_sizes:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(10, cfg.vocab_size, (b, args.prompt_len), generator=g)
        prompts = ids.tolist()
        ids = ids.to(args.device)
        full = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def run_leanmoe(params):
            sync()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            return time.perf_counter() - t0, [o.token_ids for o in outs]

        def run_hf(new):
            sync()
            t0 = time.perf_counter()
            out = hf_generate(hf, ids, new)
            sync()
            return time.perf_counter() - t0, out

        run_leanmoe(one)  # warm-up
        if hf is not None:
            run_hf(2)
        lm_full, lm_pre, hf_full, hf_pre = [], [], [], []
        lm_tokens = hf_out = None
        for _ in range(args.repeats):
            t, lm_tokens = run_leanmoe(full)
            lm_full.append(t)
            lm_pre.append(run_leanmoe(one)[0])
            if hf is not None:
                t, hf_out = run_hf(args.new_tokens)
                hf_full.append(t)
                hf_pre.append(run_hf(1)[0])
        new_decoded = b * (args.new_tokens - 1)
        lm_tps = new_decoded / max(min(lm_full) - min(lm_pre), 1e-9)
        row = {"batch": b, "leanmoe": lm_tps}
        if hf is not None:
            hf_tps = new_decoded / max(min(hf_full) - min(hf_pre), 1e-9)
            hf_seq = hf_out.sequences[:, args.prompt_len:].tolist()
            same = sum(a == h for a, h in zip(lm_tokens, hf_seq)) / b
            row.update(transformers=hf_tps, ratio=lm_tps / hf_tps, same=same)
            hf_bytes = hf_cache_bytes_per_token(hf_out, b)
        rows.append(row)

    print("\n| batch | leanmoe decode tok/s | transformers decode tok/s | ratio | same greedy tokens |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        if "transformers" in r:
            print(f"| {r['batch']} | {r['leanmoe']:,.0f} | {r['transformers']:,.0f} | {r['ratio']:.2f}x | "
                  f"{r['same']:.0%} |")
        else:
            print(f"| {r['batch']} | {r['leanmoe']:,.0f} | - | - | - |")
    stats = llm.stats()
    if llm.config.speculative:
        print(f"\nMTP draft acceptance rate: {stats['acceptance_rate']:.2%}")

    elem = torch.empty(0, dtype=llm.config.torch_cache_dtype).element_size()
    main_layers = cfg.num_hidden_layers * cfg.latent_dim * elem
    print("\n| KV cache, bytes per token | value |")
    print("|---|---:|")
    print(f"| leanmoe paged latent cache, all {llm.runner.cache.num_layers} layers (MTP included) | "
          f"{stats['cache_bytes_per_token']:,} |")
    print(f"| leanmoe, the {cfg.num_hidden_layers} main layers | {main_layers:,} |")
    if hf_bytes is not None:
        print(f"| transformers {__import__('transformers').__version__} cache after generate | {hf_bytes:,.0f} |")
    print(f"| expanded per-head K/V (H x (d_qk + d_v)), main layers | {expanded_kv_bytes(cfg, elem):,} |")
    print(f"| ratio expanded / latent, this model | {expanded_kv_bytes(cfg, elem) / main_layers:.1f}x |")
    v3 = ModelConfig.from_preset("deepseek-v3")
    print(f"| ratio expanded / latent, deepseek-v3 shape (arithmetic) | "
          f"{expanded_kv_bytes(v3, 2) / (v3.num_hidden_layers * v3.latent_dim * 2):.1f}x |")
    if hf_bytes is not None:
        print(f"| ratio transformers / leanmoe (all layers) | {hf_bytes / stats['cache_bytes_per_token']:.2f}x |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
