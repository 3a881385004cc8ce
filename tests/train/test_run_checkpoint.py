import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import leanmoe
from leanmoe import Transformer
from leanmoe.train import TrainConfig, Trainer
from leanmoe.train import run_checkpoint as rc
from leanmoe.train.optim import build_optimizer
from leanmoe.weights import CheckpointError
from tests.util import MICRO_TRAIN, micro_config, write_corpus

HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
STATE_FILES = {"optimizer.safetensors", "rng.safetensors", "trainer_state.json"}

# What the loaders read from a DeepseekV3 config.json (read from their sources):
#   transformers DeepseekV3Config.__init__: every architecture field, rope_parameters, rope_interleave,
#     attention_bias/dropout, pretraining_tp, bos/eos/pad ids
#   vLLM models/deepseek_v2.py + deepseek_mtp.py: model_type, architectures, topk_method ("noaux_tc":
#     builds e_score_correction_bias), scoring_func, n_group, topk_group, norm_topk_prob,
#     routed_scaling_factor, first_k_dense_replace, moe_layer_freq, num_nextn_predict_layers, and
#     rope_parameters (through transformers)
#   SGLang models/deepseek_v2.py: rope_theta and rope_scaling (older releases), pad_token_id,
#     topk_method, torch_dtype; DeepSeek's own remote code: ep_size
LOADER_FIELDS = {
    "architectures", "model_type", "torch_dtype", "vocab_size", "hidden_size", "intermediate_size",
    "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_shared_experts",
    "n_routed_experts", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
    "qk_nope_head_dim", "topk_method", "scoring_func", "n_group", "topk_group", "num_experts_per_tok",
    "norm_topk_prob", "first_k_dense_replace", "moe_layer_freq", "ep_size", "num_nextn_predict_layers",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "rope_interleave", "attention_bias", "attention_dropout", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "pretraining_tp", "use_cache",
}
# present, these switch loaders to other architectures (vLLM: DeepSeek-V3.2 sparse attention, Llama-4
# scaling, RSWA) or to quantized weights
ABSENT_FIELDS = {"index_topk", "llama_4_scaling", "rswa_window", "quantization_config"}


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LEANMOE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    write_corpus(folder, n_docs=12)
    (tmp_path / "micro.json").write_text(json.dumps(MICRO_TRAIN))
    return folder


def _tc(tmp_path, corpus, name="run", **kw) -> TrainConfig:
    # a constant schedule: the learning rate does not depend on the budget, so runs cut short and
    # resumed match uninterrupted ones exactly
    base = dict(config=str(tmp_path / "micro.json"), data=[str(corpus)], out=str(tmp_path / name), seq_len=32,
                batch_size=4, lr=3e-3, warmup_steps=1, schedule="constant", eval_interval=100, eval_batches=1,
                sample_tokens=4, save_interval=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    cfg = micro_config()
    model = Transformer(cfg)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model.compute_loss(ids, ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _state():
    return {"tokens": 0, "elapsed": 0.0}


# ---------------------------------------------------------------------------- layout
def test_checkpoint_folder_is_exactly_an_hf_model_folder(tmp_path, corpus):
    result = Trainer(_tc(tmp_path, corpus, max_steps=2)).train()
    ckpt = rc.latest_checkpoint(result.run_dir)
    assert {p.name for p in ckpt.iterdir()} == HF_FILES | {"trainer_state"}
    assert {p.name for p in (ckpt / "trainer_state").iterdir()} == STATE_FILES
    assert [p.name for p in ckpt.glob("*.safetensors")] == ["model.safetensors"]  # what weight loaders glob
    tok = leanmoe.data.tokenizer.load_tokenizer(ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["bos_token_id"] == tok.bos_id and gen["pad_token_id"] == tok.pad_id
    assert gen["eos_token_id"] == [tok.eos_id, tok.id_of("<|end|>")]
    # transformers loads the folder as it is: model (same logits), generation config, tokenizer
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt).eval()
    assert transformers.GenerationConfig.from_pretrained(ckpt).eos_token_id == gen["eos_token_id"]
    assert transformers.AutoTokenizer.from_pretrained(ckpt).encode("the dog") == tok.encode("the dog")
    ours = leanmoe.from_pretrained(ckpt).eval()
    ids = torch.randint(0, MICRO_TRAIN["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_config_json_carries_every_field_vllm_sglang_and_transformers_read(tmp_path):
    leanmoe.save_pretrained(Transformer(micro_config()), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert LOADER_FIELDS <= set(d), sorted(LOADER_FIELDS - set(d))
    assert not ABSENT_FIELDS & set(d)
    assert d["architectures"] == ["DeepseekV3ForCausalLM"] and d["model_type"] == "deepseek_v3"
    assert d["topk_method"] == "noaux_tc" and d["scoring_func"] == "sigmoid" and d["moe_layer_freq"] == 1
    assert d["torch_dtype"] == "float32" and d["rope_interleave"] is True
    assert d["rope_scaling"]["type"] == "yarn" and d["rope_parameters"]["rope_type"] == "yarn"
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen == {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1}


def test_old_layout_still_resumes_exactly(tmp_path, corpus):
    full = Trainer(_tc(tmp_path, corpus, "full", max_steps=4)).train()
    part = Trainer(_tc(tmp_path, corpus, "part", max_steps=2)).train()
    ckpt = rc.latest_checkpoint(part.run_dir)
    for f in (ckpt / "trainer_state").iterdir():  # rewrite into the layout of earlier leanmoe versions
        f.rename(ckpt / f.name)
    (ckpt / "trainer_state").rmdir()
    (ckpt / "generation_config.json").unlink()
    assert rc.list_checkpoints(part.run_dir) == [ckpt] and rc.trainer_state_folder(ckpt) == ckpt
    rc.check_checkpoint(ckpt)
    leanmoe.from_pretrained(part.run_dir)  # the weights loader passes over optimizer / rng files
    resumed = Trainer(TrainConfig(out=str(part.run_dir), resume=True, max_steps=4, progress=False)).train()
    assert resumed.steps == 4 and _losses(part.run_dir) == _losses(full.run_dir)
    assert (rc.latest_checkpoint(part.run_dir) / "trainer_state" / "trainer_state.json").is_file()


# ---------------------------------------------------------------------------- damaged checkpoints
def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, corpus):
    full = Trainer(_tc(tmp_path, corpus, "full", max_steps=4)).train()
    part = Trainer(_tc(tmp_path, corpus, "part", max_steps=4)).train()
    run = Path(part.run_dir)
    weights = run / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a crash mid-copy, a full disk, ...
    said = []
    assert rc.latest_intact_checkpoint(run, said.append).name == "step-2"
    assert len(said) == 2 and "step-4 is damaged" in said[0] and "model.safetensors" in said[0]
    assert "resuming from step-2" in said[1]
    resumed = Trainer(TrainConfig(out=str(run), resume=True, progress=False)).train()
    assert resumed.steps == 4 and _losses(run) == _losses(full.run_dir)
    assert rc.latest_checkpoint(run).name == "step-4"
    rc.check_checkpoint(run / "checkpoints" / "step-4")  # saved again, intact


def _saved_run(tmp_path, steps=(1, 2)) -> Path:
    model, opt = _model_and_optimizer()
    run = tmp_path / "run"
    for s in steps:
        rc.save_checkpoint(run, s, model, opt, {**_state(), "tokens": s})
    return run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


STATE_DAMAGES = {  # damage to the newest checkpoint -> the file the message names
    "trainer_state_truncated": (lambda c: _truncate(c / "trainer_state" / "trainer_state.json"), "trainer_state.json"),
    "trainer_state_lacks_rng": (lambda c: (c / "trainer_state" / "trainer_state.json").write_text('{"step": 2}'),
                                "trainer_state.json"),
    "optimizer_truncated": (lambda c: _truncate(c / "trainer_state" / "optimizer.safetensors"),
                            "optimizer.safetensors"),
    "optimizer_missing": (lambda c: (c / "trainer_state" / "optimizer.safetensors").unlink(), "optimizer"),
    "rng_truncated": (lambda c: _truncate(c / "trainer_state" / "rng.safetensors"), "rng.safetensors"),
    "weights_truncated": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors"),
    "weights_wrong_shape": (lambda c: _reshape_norm(c), "model.norm.weight"),
    "config_damaged": (lambda c: (c / "config.json").write_text('{"hidden_size": "big"}'), "config.json"),
}


def _reshape_norm(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(5)
    save_file(tensors, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("kind", sorted(STATE_DAMAGES))
def test_each_kind_of_damage_is_found_and_passed_over(tmp_path, kind):
    run = _saved_run(tmp_path)
    damage, names = STATE_DAMAGES[kind]
    damage(run / "checkpoints" / "step-2")
    with pytest.raises((CheckpointError, ValueError, FileNotFoundError), match=names):
        rc.check_checkpoint(run / "checkpoints" / "step-2")
    said = []
    chosen = rc.latest_intact_checkpoint(run, said.append)
    assert chosen.name == "step-1" and names in said[0] and "\n" not in said[0]
    model, opt = _model_and_optimizer(seed=1)
    assert rc.load_checkpoint(chosen, model, opt)["tokens"] == 1


def test_no_intact_checkpoint_is_one_line_and_cli_exit_2(tmp_path):
    run = _saved_run(tmp_path)
    for s in (1, 2):
        _truncate(run / "checkpoints" / f"step-{s}" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        rc.latest_intact_checkpoint(run, lambda _: None)
    assert "\n" not in str(e.value) and "step-1" in str(e.value) and "step-2" in str(e.value)
    assert rc.latest_intact_checkpoint(tmp_path / "empty", print) is None
    done = subprocess.run([sys.executable, "-m", "leanmoe", "train", "--resume", "--out", str(run), "--quiet"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LEANMOE_CACHE": str(tmp_path / "cache")})
    # each damaged checkpoint is a warning line (shown even with --quiet), then the one error line
    lines = done.stderr.strip().splitlines()
    warnings = [x for x in lines if x.startswith("[leanmoe] warning: checkpoint step-")]
    errors = [x for x in lines if x not in warnings]
    assert done.returncode == 2 and len(warnings) == 2 and len(errors) == 1, lines
    assert "Traceback" not in done.stderr and "no intact checkpoint" in errors[0]


def test_saving_an_earlier_step_removes_the_abandoned_later_ones(tmp_path):
    run = _saved_run(tmp_path, steps=(1, 3))
    model, opt = _model_and_optimizer()
    rc.save_checkpoint(run, 2, model, opt, _state())  # a run resumed from step-1 past a damaged step-3
    assert [p.name for p in rc.list_checkpoints(run)] == ["step-1", "step-2"]
    assert rc.latest_checkpoint(run).name == "step-2"


# ---------------------------------------------------------------------------- durability
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsync'ed descriptors")
def test_every_published_file_and_folder_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    model, opt = _model_and_optimizer()
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = rc.save_checkpoint(tmp_path / "run", 1, model, opt, _state())
    root = final.parent
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = Path(events[publish][1])
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    published = [p.relative_to(final) for p in final.rglob("*")]
    assert {str(p) for p in published} == {"config.json", "generation_config.json", "model.safetensors",
                                          "trainer_state", *(f"trainer_state/{f}" for f in STATE_FILES)}
    for rel in published + [Path(".")]:
        assert str(tmp / rel) in synced_before, f"{rel} was not fsync'ed before the folder was published"
    assert ("fsync", str(root)) in events[publish + 1:], "the parent folder was not fsync'ed after the rename"
    latest = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / "latest"))
    assert ("fsync", str(root)) in events[latest + 1:]

    # a plain save_pretrained: each file fsync'ed before the rename that gives it its name
    events.clear()
    leanmoe.save_pretrained(model, tmp_path / "hf", max_shard_size="20KB")
    renames = [(i, e) for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renames) > 3
    for i, (_, src, dst) in renames:
        assert ("fsync", src) in events[:i], f"{dst} published before its data was fsync'ed"
    assert events[-1] == ("fsync", str(tmp_path / "hf"))
    shutil.rmtree(tmp_path / "hf")
