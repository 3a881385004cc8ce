import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import leanmoe
from leanmoe import Transformer
from leanmoe.weights import dequantize_fp8_blocks, hf_state_dict
from tests.util import micro_config

transformers = pytest.importorskip("transformers")


def _hf_config(cfg):
    return transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "rope_scaling"})


def _randomize(model, std=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std)
            else:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)


def _ids(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 24))


def test_transformers_saves_leanmoe_loads(tmp_path):
    cfg = micro_config(num_nextn_predict_layers=0)
    hf = transformers.DeepseekV3ForCausalLM(_hf_config(cfg)).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    model = leanmoe.from_pretrained(tmp_path).eval()
    ids = _ids(cfg)
    with torch.no_grad():
        ref, out = hf(ids).logits, model(ids)
    assert ref.abs().max() > 1.0  # weights large enough that routing and attention matter
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_leanmoe_saves_transformers_loads(tmp_path):
    cfg = micro_config(num_nextn_predict_layers=0)
    model = Transformer(cfg).eval()
    _randomize(model)
    leanmoe.save_pretrained(model, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_checkpoint_with_mtp_loads_in_transformers_and_round_trips(tmp_path):
    cfg = micro_config()
    model = Transformer(cfg).eval()
    _randomize(model)
    leanmoe.save_pretrained(model, tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    j = cfg.num_hidden_layers
    for n in (f"model.layers.{j}.eh_proj.weight", f"model.layers.{j}.enorm.weight", f"model.layers.{j}.hnorm.weight",
              f"model.layers.{j}.shared_head.norm.weight", f"model.layers.{j}.shared_head.head.weight",
              f"model.layers.{j}.embed_tokens.weight", f"model.layers.{j}.mlp.experts.7.down_proj.weight",
              "model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
              "model.layers.2.self_attn.kv_a_proj_with_mqa.weight", "lm_head.weight"):
        assert n in names, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    again = leanmoe.from_pretrained(tmp_path).eval()
    ids = _ids(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        a, b = model.compute_loss(ids, ids), again.compute_loss(ids, ids)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(a.mtp_loss, b.mtp_loss)


def test_sharded_save_and_load(tmp_path):
    cfg = micro_config()
    model = Transformer(cfg)
    leanmoe.save_pretrained(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    again = leanmoe.from_pretrained(tmp_path)
    ids = _ids(cfg)
    torch.testing.assert_close(again(ids), model(ids))
    # saving again as one file removes the stale shards and index
    leanmoe.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_tied_embeddings_round_trip(tmp_path):
    cfg = micro_config(tie_word_embeddings=True)
    model = Transformer(cfg)
    leanmoe.save_pretrained(model, tmp_path)
    # written although tied: vLLM and SGLang build lm_head whatever the config says and read it
    torch.testing.assert_close(load_file(tmp_path / "model.safetensors")["lm_head.weight"],
                               model.model.embed_tokens.weight.detach(), rtol=0, atol=0)
    again = leanmoe.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = _ids(cfg)
    torch.testing.assert_close(again(ids), model(ids))


def test_fp8_trained_checkpoint_loads_as_a_plain_model(tmp_path):
    # config.json files written while ModelConfig had an `fp8` field say "fp8": true; FP8 is now
    # applied by the trainer (leanmoe.train.fp8), so the key is ignored and the model is plain
    cfg = micro_config()
    model = Transformer(cfg)
    leanmoe.save_pretrained(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "fp8": True}))
    assert leanmoe.ModelConfig.from_pretrained(tmp_path) == cfg
    again = leanmoe.from_pretrained(tmp_path)
    linears = [m for m in again.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    assert all(type(m.experts).__name__ == "Experts" for m in again.moe_layers())
    ids = _ids(cfg)
    torch.testing.assert_close(again(ids), model(ids))


def test_loads_transformers_v5_fused_experts(tmp_path):
    cfg = micro_config()
    model = Transformer(cfg)
    _randomize(model)
    tensors = hf_state_dict(model)
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            fused[name] = t.clone()
    save_file(fused, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg.save(tmp_path / "config.json")
    ids = _ids(cfg)
    torch.testing.assert_close(leanmoe.from_pretrained(tmp_path)(ids), model(ids))


def test_loads_fp8_block_quantized_weights(tmp_path):
    cfg = micro_config(hidden_size=160, q_lora_rank=136)  # shapes not multiples of 128
    model = Transformer(cfg)
    tensors = hf_state_dict(model)
    quant = {}
    for name, t in tensors.items():
        if name.endswith("proj.weight") and t.dim() == 2:
            n, k = t.shape
            bn, bk = -(-n // 128), -(-k // 128)
            padded = torch.zeros(bn * 128, bk * 128)
            padded[:n, :k] = t
            blocks = padded.view(bn, 128, bk, 128)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(bn * 128, bk * 128)[:n, :k]
            quant[name], quant[name + "_scale_inv"] = q.contiguous(), scale
        else:
            quant[name] = t
    save_file(quant, str(tmp_path / "model.safetensors"))
    cfg.save(tmp_path / "config.json")
    loaded = leanmoe.from_pretrained(tmp_path)
    w = loaded.model.layers[0].self_attn.q_a_proj.weight
    ref = model.model.layers[0].self_attn.q_a_proj.weight
    assert w.dtype == torch.float32
    rel = (w - ref).norm() / ref.norm()
    assert 0 < rel < 0.05, rel  # e4m3 has a 3-bit mantissa: a few percent error, not zero
    s = torch.tensor([[2.0, 4.0]])
    torch.testing.assert_close(dequantize_fp8_blocks(torch.ones(3, 130).to(torch.float8_e4m3fn), s)[:, [0, 127, 128]],
                               torch.tensor([[2.0, 2.0, 4.0]] * 3))


def test_errors_name_the_tensor(tmp_path):
    cfg = micro_config()
    model = Transformer(cfg)
    tensors = hf_state_dict(model)
    bad = dict(tensors)
    del bad["model.layers.1.self_attn.o_proj.weight"]
    bad["model.layers.1.mlp.experts.0.up_proj.weight"] = torch.zeros(3, 3)
    bad["model.layers.0.mystery.weight"] = torch.zeros(2)
    del bad["model.layers.2.mlp.experts.5.down_proj.weight"]
    save_file(bad, str(tmp_path / "model.safetensors"))
    cfg.save(tmp_path / "config.json")
    with pytest.raises(ValueError) as e:
        leanmoe.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing tensor model.layers.1.self_attn.o_proj.weight (expected shape [32, 24])" in msg
    assert "unexpected tensor model.layers.0.mystery.weight" in msg
    assert "missing tensor model.layers.2.mlp.experts.5.down_proj.weight" in msg
    assert "model.layers.1.mlp.experts" in msg and "inconsistent shapes" in msg
    # a wrong shape names both shapes
    bad = dict(tensors)
    bad["model.norm.weight"] = torch.ones(31)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \[31\], the config expects \[32\]"):
        leanmoe.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        leanmoe.from_pretrained(tmp_path / "nope")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        leanmoe.from_pretrained(tmp_path)


def test_bf16_load_keeps_router_fp32(tmp_path):
    cfg = micro_config()
    leanmoe.save_pretrained(Transformer(cfg), tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.o_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    model = leanmoe.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model(_ids(cfg)).dtype == torch.bfloat16


def test_checkpoint_reader_reads_one_tensor_from_shards_and_dequantises(tmp_path):
    from leanmoe.weights import CheckpointReader

    model = Transformer(micro_config())
    leanmoe.save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    want = hf_state_dict(model)
    with CheckpointReader(tmp_path / "sharded") as reader:
        for name in ("model.layers.1.mlp.experts.5.down_proj.weight", "model.norm.weight", "lm_head.weight"):
            torch.testing.assert_close(reader.get(name), want[name], rtol=0, atol=0)
        with pytest.raises(KeyError, match="no tensor model.nope"):
            reader.get("model.nope")
    w = torch.randn(130, 260)
    q, s = w.to(torch.float8_e4m3fn), torch.tensor([[2.0, 4.0, 8.0], [1.0, 0.5, 0.25]])
    save_file({"a.weight": q, "a.weight_scale_inv": s}, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        torch.testing.assert_close(reader.get("a.weight"), dequantize_fp8_blocks(q, s), rtol=0, atol=0)


# ---------------------------------------------------------------------------- damaged checkpoints
# Each damage: (what to do to a saved folder, text the one-line error must hold besides the file).
# Every loader must answer with a ValueError / FileNotFoundError (what the CLI prints as one line
# and exits 2 on), never a traceback from safetensors, json or torch.
def _set_config(**fields):
    def damage(folder):
        d = json.loads((folder / "config.json").read_text())
        d.update(fields)
        (folder / "config.json").write_text(json.dumps(d))
    return damage


def _write(name, data):
    return lambda folder: (folder / name).write_bytes(data(folder / name) if callable(data) else data)


def _header_len(path):
    return int.from_bytes(path.read_bytes()[:8], "little")


def _retensor(name, t):
    def damage(folder):
        tensors = load_file(folder / "model.safetensors")
        tensors[name] = t
        save_file(tensors, str(folder / "model.safetensors"))
    return damage


def _shard(folder):
    return sorted(folder.glob("model-*-of-*.safetensors"))[1]


DAMAGES = {  # name: (sharded?, damage, file named, what the message says)
    "weights_empty": (False, _write("model.safetensors", b""), "model.safetensors", "too short"),
    "weights_truncated": (False, _write("model.safetensors", lambda p: p.read_bytes()[: p.stat().st_size // 2]),
                          "model.safetensors", "does not match the tensors"),
    "weights_bytes_appended": (False, _write("model.safetensors", lambda p: p.read_bytes() + b"junk"),
                               "model.safetensors", "does not match the tensors"),
    "weights_header_too_large": (False, _write("model.safetensors", lambda p: (2**62).to_bytes(8, "little")
                                               + p.read_bytes()[8:]), "model.safetensors", "impossibly large"),
    "weights_header_past_end": (False, _write("model.safetensors", lambda p: p.stat().st_size.to_bytes(8, "little")
                                              + p.read_bytes()[8:]), "model.safetensors", "past the end"),
    "weights_header_garbage": (False, _write("model.safetensors", lambda p: p.read_bytes()[:8] + b"{" * _header_len(p)
                                             + p.read_bytes()[8 + _header_len(p):]),
                               "model.safetensors", "not valid JSON"),
    "weights_not_safetensors": (False, _write("model.safetensors", b"version https://git-lfs.github.com/spec/v1\n"),
                                "model.safetensors", "damaged safetensors file"),
    "weights_wrong_shape": (False, _retensor("model.norm.weight", torch.ones(31)), "model.norm.weight",
                            "has shape [31]"),
    "weights_integer_tensor": (False, _retensor("model.norm.weight", torch.ones(32, dtype=torch.int32)),
                               "model.norm.weight", "not floating point"),
    "index_not_json": (True, _write("model.safetensors.index.json", b'{"weight_map": {"a'),
                       "model.safetensors.index.json", "not valid JSON"),
    "index_a_list": (True, _write("model.safetensors.index.json", b"[]"), "model.safetensors.index.json",
                     "JSON object"),
    "index_without_weight_map": (True, _write("model.safetensors.index.json", b'{"metadata": {}}'),
                                 "model.safetensors.index.json", "weight_map"),
    "index_names_a_missing_shard": (True, lambda f: _shard(f).unlink(), "model.safetensors.index.json",
                                    "do not exist"),
    "shard_truncated": (True, lambda f: _shard(f).write_bytes(_shard(f).read_bytes()[:-100]), "-of-",
                        "does not match the tensors"),
    "config_a_list": (False, _write("config.json", b"[1, 2]"), "config.json", "JSON object"),
    "config_not_json": (False, _write("config.json", b'{"vocab_size": 97,'), "config.json", "not valid JSON"),
    "config_empty": (False, _write("config.json", b""), "config.json", "not valid JSON"),
    "config_binary": (False, _write("config.json", b"\xff\xfe\x00\x81" * 8), "config.json", "not UTF-8"),
    "config_vocab_size_string": (False, _set_config(vocab_size="abc"), "config.json",
                                 "vocab_size must be an integer, got 'abc'"),
    "config_rope_theta_string": (False, _set_config(rope_theta="x"), "config.json", "rope_theta must be a finite"),
    "config_hidden_size_1e12": (False, _set_config(hidden_size=1e12), "config.json", "hidden_size=1000000000000"),
    "config_hidden_size_fraction": (False, _set_config(hidden_size=32.5), "config.json",
                                    "hidden_size must be an integer"),
    "config_layers_negative": (False, _set_config(num_hidden_layers=-1), "config.json", "num_hidden_layers must be"),
    "config_bool_as_string": (False, _set_config(tie_word_embeddings="false"), "config.json",
                              "tie_word_embeddings must be true or false"),
    "config_rope_scaling_string": (False, _set_config(rope_scaling="yarn"), "config.json", "rope_scaling must be"),
    "config_sizes_too_large_together": (False, _set_config(hidden_size=2**16, moe_intermediate_size=2**20,
                                                           n_routed_experts=2**16, n_group=1, topk_group=1),
                                        "config.json", "parameters"),
}


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("intact")
    model = Transformer(micro_config())
    leanmoe.save_pretrained(model, root / "single")
    leanmoe.save_pretrained(model, root / "sharded", max_shard_size="20KB")
    return root


def _damaged(saved_folders, tmp_path, kind):
    import shutil

    sharded, damage, _, _ = DAMAGES[kind]
    folder = tmp_path / kind
    shutil.copytree(saved_folders / ("sharded" if sharded else "single"), folder)
    damage(folder)
    return folder


def _load_with(loader, folder):
    if loader == "from_pretrained":
        return leanmoe.from_pretrained(folder)
    from leanmoe.infer import LLM

    return LLM(folder, device="cpu")


@pytest.mark.parametrize("loader", ["from_pretrained", "LLM"])
@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_checkpoint_is_a_one_line_error(saved_folders, tmp_path, kind, loader):
    folder = _damaged(saved_folders, tmp_path, kind)
    _, _, names, says = DAMAGES[kind]
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        _load_with(loader, folder)
    msg = str(e.value)
    assert "\n" not in msg and names in msg and says in msg, msg
    assert str(folder) in msg, msg  # the path, so a user knows which checkpoint


@pytest.mark.parametrize("kind", ["weights_truncated", "config_vocab_size_string"])
def test_cli_generate_on_a_damaged_checkpoint_exits_2_with_one_line(saved_folders, tmp_path, kind):
    import subprocess
    import sys

    folder = _damaged(saved_folders, tmp_path, kind)
    done = subprocess.run([sys.executable, "-m", "leanmoe", "generate", str(folder), "hello", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("leanmoe generate: error: ") and DAMAGES[kind][3] in err, err
