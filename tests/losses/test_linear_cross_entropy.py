"""The fused, chunked vocabulary cross-entropy against the plain ``F.linear`` + ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmssl.losses.vocab import default_chunk_rows, linear_cross_entropy


def _inputs(n=37, d=16, v=50, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, b, t


def _plain(h, w, b, t, vocab_size=None):
    logits = F.linear(h, w, b)
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    return F.cross_entropy(logits.float(), t, ignore_index=-100)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


@pytest.mark.parametrize("chunk", [1, 5, 37, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_gradients_match_plain(chunk, bias):
    h, w, b, t = _inputs(bias=bias)
    t[[0, 7, 36]] = -100  # ignored rows, including the first and the last chunk's last row
    ours, correct, count = linear_cross_entropy(h, w, t, b, chunk_rows=chunk)
    ref = _plain(h, w, b, t)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(_grads(ours, h, w, b), _grads(ref, h, w, b)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
    keep = t != -100
    assert int(count) == int(keep.sum()) == 34
    expected_correct = (F.linear(h, w, b).argmax(-1) == t)[keep].sum()
    assert int(correct) == int(expected_correct)


def test_padded_vocabulary_rows_are_left_out():
    h, w, b, t = _inputs(v=64)
    t = t % 50  # targets only among the real 50 tokens; rows 50..63 pad the vocabulary
    ours, _, _ = linear_cross_entropy(h, w, t, vocab_size=50, chunk_rows=8)
    ref = _plain(h, w, None, t, vocab_size=50)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    gw = _grads(ours, w)[0]
    assert torch.all(gw[50:] == 0)
    torch.testing.assert_close(gw, _grads(ref, w)[0], rtol=1e-4, atol=1e-6)


def test_gradient_scales_with_the_incoming_gradient():
    h, w, _, t = _inputs()
    ours = linear_cross_entropy(h, w, t, chunk_rows=10)[0]
    (g_scaled,) = torch.autograd.grad(3.0 * ours, [h])
    (g_plain,) = torch.autograd.grad(3.0 * _plain(h, w, None, t), [h])
    torch.testing.assert_close(g_scaled, g_plain, rtol=1e-4, atol=1e-6)


def test_tied_weight_gets_both_gradients():
    """The head weight doubles as the embedding: its gradient is the sum of both uses."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 8)
    ids = torch.randint(0, 30, (4, 6))
    t = torch.randint(0, 30, (24,))
    h = torch.tanh(emb(ids)).flatten(0, 1)
    (ours,) = torch.autograd.grad(linear_cross_entropy(h, emb.weight, t, chunk_rows=7)[0], [emb.weight])
    h = torch.tanh(emb(ids)).flatten(0, 1)
    (ref,) = torch.autograd.grad(_plain(h, emb.weight, None, t), [emb.weight])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_no_grad_computes_only_the_loss():
    h, w, _, t = _inputs()
    with torch.no_grad():
        loss, _, _ = linear_cross_entropy(h, w, t, chunk_rows=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _plain(h, w, None, t).detach(), rtol=1e-5, atol=1e-6)


def test_no_scored_row_gives_zero_loss_and_zero_gradients():
    h, w, _, t = _inputs()
    loss, correct, count = linear_cross_entropy(h, w, torch.full_like(t, -100))
    assert float(loss.detach()) == 0.0 and int(correct) == 0 and int(count) == 0
    gh, gw = _grads(loss, h, w)
    assert torch.all(gh == 0) and torch.all(gw == 0)
    empty = linear_cross_entropy(h[:0], w, t[:0])[0]
    assert float(empty.detach()) == 0.0
    assert torch.all(_grads(empty, w)[0] == 0)


def test_bf16_autocast_stays_close_to_float32():
    h, w, b, t = _inputs(n=64, d=32, v=96, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, b, chunk_rows=16)[0]
    assert ours.dtype == torch.float32
    ref = _plain(h, w, b, t)
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
    gw_ours, gw_ref = _grads(ours, w)[0], _grads(ref, w)[0]
    assert gw_ours.dtype == torch.float32
    cos = F.cosine_similarity(gw_ours.flatten(), gw_ref.flatten(), dim=0)
    assert cos > 0.99


def test_chunk_rows_default_and_bad_shapes():
    assert default_chunk_rows(2048, 8192, torch.device("cpu")) == 512
    # large vocabularies keep 512 rows on a CPU (at 128 rows the chunk's products ran ~20% slower)
    assert default_chunk_rows(2048, 50257, torch.device("cpu")) == 512
    assert default_chunk_rows(2048, 256000, torch.device("cpu")) == 256
    assert default_chunk_rows(10, 8192, torch.device("cpu")) == 10
    h, w, _, t = _inputs()
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match=r"weight \(V, D\)"):
        linear_cross_entropy(h, w.t(), t)
    with pytest.raises(ValueError, match="vocab_size"):
        linear_cross_entropy(h, w, t, vocab_size=51)


def test_upstream_gradient_scales_the_in_place_buffers_once_and_a_second_backward_is_refused():
    torch.manual_seed(0)
    h, w, b = torch.randn(10, 8), torch.randn(20, 8), torch.randn(20)
    t = torch.randint(0, 20, (10,))
    ours = [x.clone().requires_grad_() for x in (h, w, b)]
    ref = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = linear_cross_entropy(ours[0], ours[1], t, ours[2], chunk_rows=3)[0]
    (loss * 3.0).backward(retain_graph=True)
    (F.cross_entropy(ref[0] @ ref[1].t() + ref[2], t) * 3.0).backward()
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
