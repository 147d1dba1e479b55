"""DINO: centring and sharpening against a direct formulation, the teacher's EMA, the centre's
EMA (one process and two), the teacher-temperature schedule, the last-layer freeze through a real
optimizer step, and the attention maps. The trainer, resume, export and host-read checks are the
conformance tests (``tests/objectives/test_conformance.py -k dino``)."""

from __future__ import annotations

import math

import pytest
import torch

from lmssl import objectives
from lmssl.config import load_config
from lmssl.objectives.dino import (cls_attention, dino_loss, teacher_collapse_metrics, teacher_log_probs,
                                   teacher_temperature)
from lmssl.train.optim import make_optimizer
from tests.conftest import ROOT

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core host every op of a
    2-thread pool waits for a time slice (10-100x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "dino.out_dim=64", "dino.hidden_dim=32",
         "dino.bottleneck_dim=16", "dino.n_local=2", "train.max_steps=10"]


def small_dino(*extra: str):
    cfg = load_config(ROOT / "recipes" / "dino_tiny.yaml", SMALL + list(extra))
    objectives.get("dino").validate_config(cfg)
    torch.manual_seed(0)
    return objectives.build(cfg, None), cfg


def image_batch(model, n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    index = torch.arange(n) + 1000 * seed
    return {"images": images, "index": index, "views": model.views.draw(index, (28, 28))}


# ----------------------------------------------------------------------------- the math


def test_centring_sharpening_and_cross_entropy_match_explicit_loops():
    g = torch.Generator().manual_seed(3)
    V, G, B, K = 4, 2, 3, 5
    student = torch.randn(V, B, K, generator=g, dtype=torch.float64)
    teacher = torch.randn(G, B, K, generator=g, dtype=torch.float64)
    center = torch.randn(K, generator=g, dtype=torch.float64)
    ts, tt = 0.1, 0.04
    log_p = teacher_log_probs(teacher, center.float(), tt)
    # direct: P_t[g, b, k] = exp((t - c) / tt) / sum_j exp((t_j - c_j) / tt)
    for gi in range(G):
        for b in range(B):
            z = [math.exp((teacher[gi, b, k] - center[k]) / tt) for k in range(K)]
            for k in range(K):
                assert math.isclose(float(log_p[gi, b, k].exp()), z[k] / sum(z), rel_tol=1e-5, abs_tol=1e-12)
    total, pairs = 0.0, 0
    for gi in range(G):
        for v in range(V):
            if v == gi:
                continue
            for b in range(B):
                z = [math.exp(student[v, b, k] / ts) for k in range(K)]
                total += sum(-float(log_p[gi, b, k].exp()) * math.log(z[k] / sum(z)) for k in range(K)) / B
            pairs += 1
    assert pairs == G * V - G
    loss = dino_loss(student.float(), log_p.exp(), ts)
    assert math.isclose(float(loss), total / pairs, rel_tol=1e-5)


def test_collapse_metrics_of_uniform_one_hot_and_varied_teachers():
    K = 8
    uniform = torch.full((2, 4, K), -math.log(K))
    m = teacher_collapse_metrics(uniform)
    assert math.isclose(float(m["teacher_entropy"]), math.log(K), rel_tol=1e-6) and abs(float(m["teacher_kl"])) < 1e-6
    same_one_hot = torch.log_softmax(torch.tensor([50.0] + [0.0] * (K - 1)).expand(2, 4, K), -1)
    m = teacher_collapse_metrics(same_one_hot)
    assert float(m["teacher_entropy"]) < 1e-6 and abs(float(m["teacher_kl"])) < 1e-6  # collapsed: KL 0
    distinct = torch.log_softmax(50.0 * torch.eye(K)[None, :4].expand(2, 4, K), -1)  # 4 images, 4 prototypes
    m = teacher_collapse_metrics(distinct)
    assert math.isclose(float(m["teacher_kl"]), math.log(4), rel_tol=1e-4)  # healthy: KL log(4)


def test_teacher_temperature_schedule_values():
    assert teacher_temperature(0, 0.04, 0.07, 10) == 0.04
    assert math.isclose(teacher_temperature(5, 0.04, 0.07, 10), 0.055)
    assert teacher_temperature(10, 0.04, 0.07, 10) == 0.07 and teacher_temperature(500, 0.04, 0.07, 10) == 0.07
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07  # no warm-up
    model, _ = small_dino("dino.warmup_teacher_temp=0.04", "dino.teacher_temp=0.07", "dino.warmup_teacher_temp_steps=4")
    for step, expected in ((0, 0.04), (1, 0.0475), (2, 0.055), (4, 0.07), (9, 0.07)):
        model.steps_done.fill_(step)
        assert math.isclose(float(model.teacher_temp()), expected, rel_tol=1e-6)  # the device-side value


# ----------------------------------------------------------------------------- teacher and centre


def test_teacher_gets_no_gradient_and_follows_the_ema_rule_except_after_a_skipped_step():
    model, _ = small_dino("dino.freeze_last_layer_steps=0")
    teacher = list(model.teacher.parameters()) + list(model.teacher_head.parameters())
    student = list(model.student.parameters()) + list(model.head.parameters())
    assert all(not p.requires_grad for p in teacher)
    loss, _ = model(image_batch(model))
    loss.backward()
    assert all(p.grad is None for p in teacher) and all(p.grad is not None for p in student)
    with torch.no_grad():  # move the student so that the EMA has something to follow
        for p in student:
            p.add_(0.01 * torch.randn_like(p))
    before = [p.detach().clone() for p in teacher]
    m = model.momentum(3)
    assert 0.99 < m < 1.0  # the recipe's base momentum 0.99, cosine to 1
    model.after_step(3, torch.ones(()))  # skipped: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, teacher))
    model.after_step(3, torch.zeros(()))
    for old, new, s in zip(before, teacher, student):
        torch.testing.assert_close(new, m * old + (1 - m) * s.detach(), rtol=1e-5, atol=1e-7)


def test_centre_follows_its_ema_over_the_step_s_micro_batches_and_not_after_a_skipped_step():
    model, cfg = small_dino()
    c0 = torch.randn(cfg.dino.out_dim)
    model.center.copy_(c0)
    batches = [image_batch(model, 6, seed=1), image_batch(model, 6, seed=2)]
    with torch.no_grad():
        outputs = []
        for b in batches:
            views = model.view_images(b)
            outputs.append(model.teacher_head(model.teacher.pooled(torch.cat(views[:2]), "cls")))
        expected = 0.9 * c0 + 0.1 * torch.cat(outputs).mean(dim=0)  # both global crops of both micro-batches
    for b in batches:  # two micro-batches of one step (gradient accumulation)
        model(b)
    model.after_step(0, torch.ones(()))  # a skipped step leaves the centre where it was
    assert torch.equal(model.center, c0)
    for b in batches:
        model(b)
    model.after_step(0, torch.zeros(()))
    torch.testing.assert_close(model.center, expected, rtol=1e-5, atol=1e-6)
    model.eval()
    model(batches[0])  # evaluation does not move the centre
    model.after_step(1, torch.zeros(()))
    torch.testing.assert_close(model.center, expected, rtol=1e-5, atol=1e-6)


def test_centre_update_is_over_the_global_batch_with_two_processes(tmp_path):
    from tests.losses._dist_util import run_workers

    sums = torch.randn(2, 64, dtype=torch.float64).float()  # each rank's sum of teacher outputs, 12 rows each
    torch.save({"sums": sums, "rows": 12}, tmp_path / "inputs.pt")
    out = run_workers(ROOT / "tests" / "objectives" / "_dino_center_worker.py", tmp_path, 2)
    expected = 0.1 * sums.sum(dim=0) / 24  # centre starts at 0, momentum 0.9
    for rank in out:
        torch.testing.assert_close(rank["center"], expected)


# ----------------------------------------------------------------------------- last-layer freeze


def test_prototypes_are_frozen_for_the_first_steps_through_a_real_optimizer_step():
    model, cfg = small_dino("dino.freeze_last_layer_steps=2", "optim.weight_decay=0.1")
    optimizer = make_optimizer(model.param_groups(cfg.optim), cfg.optim)
    protos = model.head.prototypes
    mlp = model.head.mlp[0].weight
    history = [(protos.detach().clone(), mlp.detach().clone())]
    for step in range(4):
        loss, _ = model(image_batch(model, 6, seed=step))
        loss.backward()
        optimizer.step()
        model.after_step(step, torch.zeros(()))
        optimizer.zero_grad(set_to_none=True)
        history.append((protos.detach().clone(), mlp.detach().clone()))
    assert torch.equal(history[0][0], history[1][0]) and torch.equal(history[1][0], history[2][0])  # frozen
    assert not torch.equal(history[2][0], history[3][0]) and not torch.equal(history[3][0], history[4][0])
    assert not torch.equal(history[0][1], history[1][1])  # the rest of the head trains from step 0


# ----------------------------------------------------------------------------- picture


def test_cls_attention_maps_are_the_last_block_s_probabilities(tmp_path):
    model, _ = small_dino()
    images = model.plain_images(image_batch(model, 3))
    maps = cls_attention(model.backbone, images)  # (B, heads, 7, 7)
    assert maps.shape == (3, 4, 7, 7) and bool((maps >= 0).all()) and bool((maps.sum((-1, -2)) < 1).all())
    # against attention computed with the fused projection split by hand and an explicit softmax
    block, captured = model.backbone.core.blocks[-1], {}
    hook = block.attn.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    model.backbone(images)
    hook.remove()
    x = captured["x"]
    q, k = block.attn.qkv(x)[..., :32], block.attn.qkv(x)[..., 32:64]
    for h in range(4):  # head h: channels 8h..8h+7 of the queries and of the keys
        for b in range(3):
            s = (q[b, 0, 8 * h:8 * h + 8] * k[b, :, 8 * h:8 * h + 8]).sum(-1) / math.sqrt(8)  # (T,) class token's scores
            torch.testing.assert_close(maps[b, h].flatten(), torch.softmax(s, 0)[1:], rtol=1e-4, atol=1e-6)
    text = model.report(None, [{"images": torch.randint(0, 256, (9, 1, 28, 28), dtype=torch.uint8)}], None, tmp_path)
    assert (tmp_path / "attention.png").stat().st_size > 0 and "attention" in text
