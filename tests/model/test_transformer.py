import pytest
import torch
import torch.nn.functional as F

from leanmoe import Transformer
from tests.util import micro_config


def test_forward_shapes_and_sequence_length_one():
    cfg = micro_config()
    model = Transformer(cfg)
    assert model(torch.randint(0, cfg.vocab_size, (3, 10))).shape == (3, 10, cfg.vocab_size)
    assert model(torch.randint(0, cfg.vocab_size, (1, 1))).shape == (1, 1, cfg.vocab_size)


def test_causality():
    cfg = micro_config()
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    ids2 = ids.clone()
    ids2[0, 7] = (ids[0, 7] + 1) % cfg.vocab_size
    a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_mtp_loss_shapes_and_gradient_flow():
    cfg = micro_config(num_nextn_predict_layers=2, mtp_loss_weight=0.5)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    inp, tgt = ids[:, :-1], ids[:, 1:]
    out = model.compute_loss(inp, tgt, return_logits=True)
    assert len(out.mtp_losses) == 2 and out.logits.shape == (2, 8, cfg.vocab_size)
    torch.testing.assert_close(out.mtp_loss, 0.5 * (out.mtp_losses[0] + out.mtp_losses[1]) / 2)
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss + out.aux_loss)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(out.logits.flatten(0, 1), tgt.flatten()))
    out.loss.backward()
    for k, layer in enumerate(model.mtp_layers):
        assert layer.eh_proj.weight.grad is not None and layer.eh_proj.weight.grad.abs().sum() > 0, k
        assert layer.shared_head.norm.weight.grad.abs().sum() > 0
    # the main trunk gets gradient from the MTP loss too: through h_prev
    model.zero_grad()
    model.compute_loss(inp, tgt).mtp_loss.backward()
    assert model.model.layers[0].self_attn.o_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_mtp_depth_predicts_the_right_target():
    """MTP depth 1 at position i sees token i+1 and is scored on token i+2."""
    cfg = micro_config(aux_loss_alpha=0.0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    inp, tgt = ids[:, :-1], ids[:, 1:]
    out = model.compute_loss(inp, tgt)
    h, _ = model.hidden_states(inp)
    _, logits1, _ = model.mtp_step(1, h[:, :-1], inp[:, 1:], torch.arange(6)[None])
    torch.testing.assert_close(out.mtp_losses[0], F.cross_entropy(logits1[0], ids[0, 2:]))


def test_ignore_index_and_shape_errors():
    cfg = micro_config()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    tgt = ids.clone()
    tgt[:, :3] = -100
    out = model.compute_loss(ids, tgt, return_logits=True)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(out.logits[:, 3:].flatten(0, 1), ids[:, 3:].flatten()))
    with pytest.raises(ValueError, match="differ"):
        model.compute_loss(ids, ids[:, :3])


def test_tied_embeddings_share_storage():
    cfg = micro_config(tie_word_embeddings=True)
    model = Transformer(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_init_is_stable():
    cfg = micro_config(initializer_range=0.02)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = model.compute_loss(ids, ids).lm_loss.item()
    # near-uniform predictions at init: loss close to ln(vocab)
    assert abs(loss - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 0.5


@pytest.mark.slow
def test_torch_compile_matches_eager():
    cfg = micro_config()
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    eager = model.compute_loss(ids, ids)
    eager.loss.backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
    compiled = torch.compile(model.compute_loss, fullgraph=True)
    out = compiled(ids, ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if n in g_eager:
            torch.testing.assert_close(p.grad, g_eager[n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")
    assert model.expert_load().sum() > 0  # the compiled graph still counts tokens per expert
