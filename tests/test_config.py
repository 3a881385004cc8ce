import json

import pytest

from leanmoe import PRESETS, ModelConfig
from leanmoe.model import Transformer
from tests.util import micro_config


def test_deepseek_v3_counts_match_published_figures():
    n = ModelConfig.from_preset("deepseek-v3").num_params()
    # DeepSeek-V3 technical report: 671B total, 37B activated; MTP module ~11.5B without the
    # shared embedding and head (14B with them).
    assert 0.995 * 671e9 < n.total < 1.005 * 671e9
    assert 36e9 < n.activated < 38e9
    assert 11.2e9 < n.mtp < 11.8e9
    assert 13.2e9 < n.mtp + n.embedding < 14.2e9


def test_deepseek_v2_lite_is_16b_shape():
    n = ModelConfig.from_preset("deepseek-v2-lite").num_params()
    assert 15.5e9 < n.total < 16e9
    assert n.mtp == 0


def test_tiny_preset_is_trainable_on_cpu():
    cfg = ModelConfig.from_preset("tiny")
    n = cfg.num_params()
    assert 10e6 <= n.total <= 30e6
    assert cfg.n_routed_experts >= 8 and cfg.has_moe
    assert n.activated < n.total


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_counts_equal_built_model(name):
    cfg = ModelConfig.from_preset(name)
    if name == "small":
        import torch
        with torch.device("meta"):
            model = Transformer(cfg)
    else:
        model = Transformer(cfg)
    n = cfg.num_params()
    assert model.num_parameters() == n.total + n.mtp


@pytest.mark.parametrize("tie", [False, True])
def test_counts_equal_built_micro_model(tie):
    cfg = micro_config(tie_word_embeddings=tie, q_lora_rank=None if tie else 16)
    n = cfg.num_params()
    assert Transformer(cfg).num_parameters() == n.total + n.mtp
    assert n.embedding == cfg.vocab_size * cfg.hidden_size * (1 if tie else 2)


def test_flops_per_token():
    cfg = ModelConfig.from_preset("deepseek-v3")
    f = cfg.flops_per_token(4096, include_mtp=False)
    n = cfg.num_params()
    # 6 * activated matmul params (~36.6B without the embedding lookup) + causal attention
    attn = 3 * 61 * 128 * (192 + 128) * 4096
    assert 6 * 36.0e9 + attn < f < 6 * 37.0e9 + attn
    assert cfg.flops_per_token(4096) > f  # MTP adds work
    assert cfg.flops_per_token(8192) > cfg.flops_per_token(4096)
    assert f < 6 * n.activated + attn
    with pytest.raises(ValueError):
        cfg.flops_per_token(0)


DEEPSEEK_CONFIG = {  # as deepseek-ai/DeepSeek-V3 ships it
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_from_pretrained_deepseek_release_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_CONFIG))
    cfg = ModelConfig.from_pretrained(tmp_path)
    ref = ModelConfig.from_preset("deepseek-v3")
    assert cfg.num_params() == ref.num_params()
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_scaling["type"] == "yarn"
    assert cfg.aux_loss_alpha == 0.001 and cfg.scoring_func == "sigmoid"


def test_from_pretrained_transformers_v5_config(tmp_path):
    v5 = {k: v for k, v in DEEPSEEK_CONFIG.items() if k not in ("rope_scaling", "rope_theta", "num_nextn_predict_layers")}
    v5["rope_parameters"] = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096, "rope_type": "yarn", "rope_theta": 50000.0}
    v5["num_mtp_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(v5))
    cfg = ModelConfig.from_pretrained(tmp_path / "config.json")
    assert cfg.rope_theta == 50000.0
    assert cfg.yarn["factor"] == 40 and cfg.yarn["original_max_position_embeddings"] == 4096
    assert cfg.num_nextn_predict_layers == 2


def test_hf_dict_round_trip(tmp_path):
    cfg = micro_config()
    cfg.save(tmp_path / "config.json")
    again = ModelConfig.from_pretrained(tmp_path)
    assert again == cfg
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "deepseek_v3" and d["rope_parameters"]["rope_type"] == "yarn"
    assert d["num_key_value_heads"] == cfg.num_attention_heads


def test_presets_and_errors():
    assert {"tiny", "small", "deepseek-v2-lite", "deepseek-v3"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("gpt-5")
    with pytest.raises(ValueError, match="n_group"):
        micro_config(n_group=3)
    with pytest.raises(ValueError, match="topk_group"):
        micro_config(topk_group=5)
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        micro_config(qk_rope_head_dim=5)
    with pytest.raises(ValueError, match="scoring_func"):
        micro_config(scoring_func="relu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained("/nonexistent/dir")
