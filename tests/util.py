"""Helpers shared by the tests."""

import pytest
import torch

from leanmoe import ModelConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Autouse in a test module (or conftest) that imports it: torch on one thread for each test.
    NOTE: kernel and FP8 tests run many small ops; on a shared 2-core machine OpenMP's spin-waiting
    made 2 threads ~2x slower overall (20x for the FP8 training run). One thread is also
    deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def micro_config(**overrides) -> ModelConfig:
    """A few-thousand-parameter model exercising every feature: q_lora, groups, YaRN, MTP."""
    base = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        max_position_embeddings=128, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=3, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=1.5,
        num_nextn_predict_layers=1, initializer_range=0.1,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    )
    base.update(overrides)
    return ModelConfig(**base)


# A trainer-sized micro model (as a config.json dict) and a small English-like corpus, shared by
# the single-process and distributed trainer tests.
MICRO_TRAIN = {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
               "qk_rope_head_dim": 8, "v_head_dim": 16, "max_position_embeddings": 128,
               "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
               "topk_group": 1, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
               "bias_update_speed": 0.01}


def write_corpus(folder, n_docs: int = 30, lines: int = 50) -> None:
    """n_docs deterministic text files of random sentences over a 26-word vocabulary."""
    import random
    from pathlib import Path

    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while small birds sing in green trees and "
             "children play near old houses by the river").split()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) + "." for _ in range(lines)]
        (folder / f"doc{i}.txt").write_text("\n".join(text))


def free_port() -> int:
    """A loopback TCP port free right now, for a server started in another process (torch.distributed's
    rendezvous, `leanmoe serve`); the tests and the bench scripts share this one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_local_tasks(root):
    """lm-eval task YAMLs over small local JSON files (no download): leanmoe_ll (multiple choice,
    loglikelihood), leanmoe_gen (generate_until), leanmoe_rolling (loglikelihood_rolling)."""
    import json

    mc = [{"question": "The engine keeps a paged", "choices": [" cache", " river", " dog"], "answer": 0},
          {"question": "Each block holds sixty-four", "choices": [" tokens", " trees"], "answer": 0},
          {"question": "one two three four", "choices": [" five", " green"], "answer": 0}]
    gen = [{"prompt": "one two three", "target": " four"}, {"prompt": "def fib(n):", "target": "\n"}]
    text = [{"text": "Requests join and leave the running batch at every step."}]
    for name, rows in (("mc", mc), ("gen", gen), ("text", text)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "ll.yaml").write_text(
        f"task: leanmoe_ll\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        f"task: leanmoe_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (root / "rolling.yaml").write_text(
        f"task: leanmoe_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return root
