"""The same tiny GPT trained as lmssl and as transformers.GPT2LMHeadModel, on the same
batches with the same optimizer and schedule, reaches the same held-out loss (within 2%)."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmssl.config import load_config
from lmssl.data.batches import build_text_data, micro_batch
from lmssl.data.tokenizer import load_tokenizer
from lmssl.objectives.causal_lm import CausalLM
from lmssl.train.optim import make_optimizer, make_schedule
from tests.conftest import TINY

STEPS = 120


def train_and_eval(model, loss_fn, cfg, data):
    opt = make_optimizer(model, cfg.optim)
    sched = make_schedule(opt, cfg.optim, STEPS)
    torch.manual_seed(0)
    for step in range(STEPS):
        batch, _ = micro_batch(data, cfg, step * cfg.train.micro_batch_size, 0, 0, 1)
        loss = loss_fn(model, batch["input_ids"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return sum(float(loss_fn(model, b["input_ids"])) for b in data.eval_batches) / len(data.eval_batches)


def test_lmssl_gpt_matches_gpt2lmheadmodel_heldout_loss():
    cfg = load_config(None, TINY + ["model.dropout=0.0"])
    tok = load_tokenizer("default")
    cfg.model.vocab_size = len(tok)
    data = build_text_data(cfg, tok)
    m = cfg.model
    torch.manual_seed(0)
    ours = CausalLM(m)
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_positions, n_embd=m.dim,
                                     n_layer=m.n_layers, n_head=m.n_heads, activation_function="gelu_new",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     layer_norm_epsilon=m.norm_eps, tie_word_embeddings=True,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id),
                          ).float()
    ref.config._attn_implementation = "sdpa"
    ours_params = sum(p.numel() for p in ours.parameters()) - (ours.backbone.tokens.weight.shape[0] - m.vocab_size) * m.dim
    assert ours_params == sum(p.numel() for p in ref.parameters())  # same shape, padding rows aside
    loss_ours = train_and_eval(ours, lambda mod, ids: mod({"input_ids": ids})[0], cfg, data)
    loss_ref = train_and_eval(ref, lambda mod, ids: mod(input_ids=ids, labels=ids).loss, cfg, data)
    print(f"held-out loss after {STEPS} steps: lmssl {loss_ours:.4f}, GPT2LMHeadModel {loss_ref:.4f}")
    assert loss_ours < 7.0 and loss_ref < 7.0  # both learned (from ~9.0)
    assert abs(loss_ours - loss_ref) / loss_ref < 0.02
