"""The training loop on Accelerate. One function, readable top to bottom; features are
small helpers beside it (run directory, checkpoints, logging, evaluation)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmssl import objectives
from lmssl.config import VISION_OBJECTIVES, RunConfig, config_from_dict
from lmssl.data.batches import build_text_data, micro_batch, to_device
from lmssl.data.images import build_image_data
from lmssl.data.tokenizer import load_tokenizer
from lmssl.errors import UserError
from lmssl.evaluate import evaluate_objective, language_metrics
from lmssl.models import set_activation_checkpointing
from lmssl.models.flops import transformer_flops_per_token
from lmssl.train import checkpoint as ckpt
from lmssl.train.flops import device_peak_flops
from lmssl.train.log import JsonlLog, plot_loss_curve
from lmssl.train.optim import lr_factor, make_optimizer, make_schedule, step_unless


class TrainingDiverged(UserError):
    """Loss or gradient became NaN/inf more often than allowed."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken, the skipped ones (non-finite loss or gradient) included
    cursor: int = 0  # global sample cursor (see lmssl.data.batches)
    tokens_seen: int = 0  # tokens (text) or images (vision objectives) trained on
    bad_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteGuard:
    """Flags, on the device, the steps whose loss or gradient norm is not finite, and counts
    them there, so that checking a step never makes the host wait for the accelerator.
    :meth:`settle` reads the count (a synchronisation): the loop calls it when it logs,
    saves or stops."""

    def __init__(self, device: torch.device) -> None:
        self.count = torch.zeros((), device=device)  # flagged steps since the last settle
        self.last = torch.zeros(3, device=device)  # (loss, grad norm, step) of the latest flagged step

    def update(self, health: torch.Tensor, step: int, grads_checked: bool = True) -> torch.Tensor:
        """``health (3,)``: loss, gradient norm, stop flag. Returns the 0-dim float flag
        (1.0: skip this step). ``grads_checked=False`` leaves the gradients to an fp16
        gradient scaler, which skips overflowing steps itself and is not an error."""
        values = health[:2] if grads_checked else health[:1]
        bad = (~torch.isfinite(values).all()).float()
        self.count += bad
        seen = torch.cat([health[:2], torch.full_like(health[:1], float(step))])
        self.last = torch.where(bad > 0, seen, self.last)
        return bad

    def settle(self) -> tuple[int, list[float]]:
        """``(flagged steps since the last call, [loss, grad norm, step] of the latest)``."""
        n = int(self.count)
        self.count.zero_()
        return n, self.last.tolist()


class LateRead:
    """Reads a device scalar one step after it was computed: the copy to the host starts at
    once, and by the next step it has landed without the host waiting on the step in flight."""

    def __init__(self) -> None:
        self.pending: tuple[torch.Tensor, Any] | None = None

    def swap(self, value: torch.Tensor) -> bool:
        """Start reading ``value``; return whether the previous value was non-zero."""
        previous = self.pending
        if value.device.type == "cuda":
            event = torch.cuda.Event()
            self.pending = (value.to("cpu", non_blocking=True), event)  # into pinned memory
            event.record()
        else:
            self.pending = (value, None)
        if previous is None:
            return False
        host, event = previous
        if event is not None:
            event.synchronize()
        return bool(host != 0)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNGs for one step of one process: resuming at any step replays
    exactly the same dropout and sampling draws."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def complete_model_config(cfg: RunConfig, tokenizer) -> None:
    """Take the vocabulary size from the tokenizer; refuse a mismatch."""
    n = len(tokenizer)
    if cfg.model.vocab_size and cfg.model.vocab_size != n:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} does not match the tokenizer's {n} tokens "
                        f"({cfg.data.tokenizer}); set model.vocab_size=0 to take it from the tokenizer")
    cfg.model.vocab_size = n


def prepare_run_dir(cfg: RunConfig, is_main: bool, log) -> ckpt.Checkpoint | None:
    """Claim the output directory; return the checkpoint to resume from, if any."""
    out = Path(cfg.train.output_dir)
    run_file = out / "run.json"
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except ValueError:
            previous = {}
        if previous.get("fingerprint") != cfg.fingerprint():
            if not cfg.train.overwrite:
                raise UserError(f"{out} holds a different run (its model, data or objective differ); choose another "
                                "train.output_dir, or pass train.overwrite=true to start over there")
            if is_main:
                log(f"overwriting the run in {out} (train.overwrite=true)")
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                (out / "log.jsonl").unlink(missing_ok=True)
        elif cfg.train.overwrite and is_main:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) and not cfg.train.overwrite:
        raise UserError(f"{out} holds checkpoints but no run.json; choose another train.output_dir or pass "
                        "train.overwrite=true")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_file, json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}, indent=1))
    return ckpt.find_resumable(out, log) if not cfg.train.overwrite or run_file.is_file() else None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild ``(objective, cfg, tokenizer)`` from a run directory's latest good checkpoint."""
    run_dir = Path(run_dir)
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise UserError(f"{run_dir} is not an lmssl run directory (no run.json); pass the train.output_dir of a run")
    cfg = config_from_dict(json.loads(run_file.read_text())["config"])
    c = ckpt.find_resumable(run_dir)
    if c is None:
        raise UserError(f"{run_dir} has no usable checkpoint yet; train it first (lmssl pretrain ...)")
    tokenizer = None if cfg.objective in VISION_OBJECTIVES else load_tokenizer(cfg.data.tokenizer)
    model = objectives.build(cfg, tokenizer)
    ckpt.load_weights(model, c.path / "model.safetensors")
    return model.to(device).eval(), cfg, tokenizer


def train(cfg: RunConfig) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Without GPUs, a torchrun / `accelerate launch` world of several processes is Accelerate's multi-CPU mode.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=cfg.train.trackers or None,
                              project_dir=cfg.train.output_dir, cpu=multi_cpu)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if is_main else (lambda msg: None)
    out = Path(cfg.train.output_dir)

    images = cfg.objective in VISION_OBJECTIVES
    tokenizer = None if images else load_tokenizer(cfg.data.tokenizer)
    if tokenizer is not None:
        complete_model_config(cfg, tokenizer)
    with accelerator.main_process_first():
        resume = prepare_run_dir(cfg, is_main, log)
        data = build_image_data(cfg, log) if images else build_text_data(cfg, tokenizer, log)

    set_seed(cfg.train.seed)
    objective = objectives.build(cfg, tokenizer)
    n_params = sum(p.numel() for p in objective.parameters())
    optimizer = make_optimizer(objective, cfg.optim, accelerator.device.type)
    schedule = make_schedule(optimizer, cfg.optim, cfg.train.max_steps)
    state = TrainState()
    if resume is not None:
        ckpt.load_weights(objective, resume.path / "model.safetensors")
        optimizer.load_state_dict(ckpt.load_optimizer_state(resume.path))
        saved = ckpt.load_trainer_state(resume.path)
        schedule.load_state_dict(saved["schedule"])
        _apply_optim_config(optimizer, schedule, cfg)  # the recipe, not the checkpoint, sets hyper-parameters
        state = TrainState(saved["step"], saved["cursor"], saved["tokens_seen"], saved.get("bad_steps", 0))
        log(f"resuming from {resume.path} (step {state.step})")
    if state.step >= cfg.train.max_steps:
        log(f"{out} is already trained to step {state.step}; raise train.max_steps to train further")
        return {"step": state.step, "tokens_seen": state.tokens_seen, "complete": True}
    if cfg.train.activation_checkpointing:
        set_activation_checkpointing(objective)
    model = torch.compile(objective) if cfg.train.compile else objective
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.trackers:
        accelerator.init_trackers(out.name, config=_flat(cfg.to_dict()))

    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    global_batch = micro * accum * world
    seq = cfg.data.block_size
    # what throughput counts: tokens of text, or images
    unit, per_sample = ("images", 1) if images else ("tokens", seq)
    if images:
        flops_per_unit = objective.flops_per_image()
    elif hasattr(objective, "flops_per_token"):
        flops_per_unit = objective.flops_per_token(seq)
    else:
        flops_per_unit = transformer_flops_per_token(cfg.model, n_params, seq)
    peak, peak_source = device_peak_flops(accelerator.device)
    jsonl = JsonlLog(out / "log.jsonl", state.step if resume is not None else None, enabled=is_main)
    shape = f"{global_batch} images" if images else f"{global_batch} x {seq} tokens"
    log(f"{cfg.objective} | {n_params / 1e6:.2f}M parameters | {world} process(es) on {accelerator.device} | "
        f"global batch {shape} | peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")

    stop = _StopSignal()
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not (is_main and cfg.train.progress),
               desc=cfg.objective, unit="step", dynamic_ncols=True)
    window: dict[str, torch.Tensor] = {}  # metric sums over the steps since the last log line, on the device
    window_units, t_window = 0, time.perf_counter()
    guard, stop_flag = NonFiniteGuard(accelerator.device), LateRead()
    model.train()
    while state.step < cfg.train.max_steps:
        torch.manual_seed(step_seed(cfg.train.seed, state.step, rank))
        step_metrics: dict[str, torch.Tensor] = {}
        for a in range(accum):
            batch, first = micro_batch(data, cfg, state.cursor, a, rank, world)
            if hasattr(objective, "prepare_batch"):
                batch = objective.prepare_batch(batch, torch.Generator().manual_seed(step_seed(cfg.train.seed, first, 0)))
            batch = to_device(batch, accelerator.device)
            sync = a == accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                loss, metrics = model(batch)
                accelerator.backward(loss / accum)
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0) + v.float() / accum
        health, grad_norm = _checked_step(accelerator, model, optimizer, guard, cfg, step_metrics["loss"],
                                          state.step + 1, stop.requested)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.cursor += global_batch
        state.tokens_seen += global_batch * per_sample
        window_units += global_batch * per_sample
        # log averages over the steps that updated the weights (and, under fp16, were not overflows)
        counted = torch.isfinite(health[:2]).all()
        for k, v in step_metrics.items():
            window[k] = window.get(k, 0.0) + torch.where(counted, v, 0.0)  # tensors: read at log time only
        if cfg.train.grad_clip > 0:
            window["grad_norm"] = window.get("grad_norm", 0.0) + torch.where(counted, grad_norm, 0.0)
        window["good_steps"] = window.get("good_steps", 0.0) + counted.float()
        bar.update(1)

        last_step = state.step == cfg.train.max_steps
        logging = state.step % cfg.train.log_every == 0 or last_step
        saving = (cfg.train.save_every and state.step % cfg.train.save_every == 0) or last_step
        # one process alone reads its own flag; several read the agreed one a step late, when it is ready
        stopping = stop.requested if world == 1 else stop_flag.swap(health[2])
        if logging or saving or stopping:
            _settle_bad_steps(guard, state, cfg, out, log, stop)

        if logging:
            elapsed = time.perf_counter() - t_window
            good_steps = float(window.pop("good_steps"))
            record = {k: float(v) / good_steps if good_steps else float("nan") for k, v in window.items()}
            if world > 1:
                record = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                          for k, v in record.items()}
            per_s = window_units / max(elapsed, 1e-9)
            record.update({"step": state.step, "lr": schedule.get_last_lr()[0], f"{unit}_per_s": per_s,
                           "tflops": per_s * flops_per_unit / 1e12, f"{unit}_seen": state.tokens_seen})
            record["mfu"] = per_s * flops_per_unit / (peak * world) if peak else 0.0
            jsonl.write(record)
            if cfg.train.trackers:
                accelerator.log(record, step=state.step)
            bar.set_postfix({"loss": f"{record['loss']:.3f}", f"{unit[:3]}/s": f"{per_s:,.0f}",
                             "mfu": f"{record['mfu']:.1%}"})
            state.metrics = record
            window, window_units, t_window = {}, 0, time.perf_counter()

        if (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or last_step:
            ev = _evaluate(objective, data, cfg, accelerator)
            jsonl.write({"step": state.step, "kind": "eval", **{f"eval_{k}": v for k, v in ev.items()}})
            log(f"step {state.step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in ev.items()))
            state.metrics.update({f"eval_{k}": v for k, v in ev.items()})
            if is_main:
                plot_loss_curve(out / "log.jsonl", out / "loss_curve.png", f"{cfg.objective}: {out.name}",
                                "loss (pixel MSE)" if images else "loss (nats/token)")

        if saving or stopping:
            _save(accelerator, model, optimizer, schedule, state, cfg)
        if stopping:
            bar.close()
            stop.restore()
            log(f"stopped by signal at step {state.step}; checkpoint saved. Run the same command again to resume.")
            accelerator.end_training()
            return {"stopped": True, "step": state.step, **state.metrics}
    bar.close()
    stop.restore()
    accelerator.end_training()
    result = {"step": state.step, f"{unit}_seen": state.tokens_seen, "params": n_params, "main_process": is_main,
              **state.metrics}
    if is_main:
        result["loss_curve"] = str(out / "loss_curve.png") if (out / "loss_curve.png").exists() else None
        if not math.isfinite(state.metrics.get("eval_loss", 0.0)):
            log("no end-of-run report: the held-out loss is not finite (see the warnings above)")
        elif hasattr(objective, "report"):
            with accelerator.autocast():
                result["report"] = objective.report(tokenizer, data.eval_batches, cfg, out)
        (out / "final_metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=1))
    return result


def _checked_step(accelerator, model, optimizer, guard: NonFiniteGuard, cfg: RunConfig, loss: torch.Tensor,
                  step: int, stop_requested: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip (or just measure) the gradients and take the optimizer step, or skip it when the
    loss or gradient norm is not finite, without reading a device value on the host: the
    skip happens on the device and ``guard`` counts it until the loop next logs or saves.
    Returns ``health (3,)`` (loss, gradient norm, stop flag, summed over processes) and
    this process's gradient norm."""
    if cfg.train.grad_clip > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    else:  # not clipped, still checked: a NaN gradient under a finite loss must not reach the weights
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    grad_norm = _device_scalar(grad_norm, loss)
    # (torch.full writes a host value with a kernel: no copy, so no wait either)
    health = torch.stack([loss.float(), grad_norm, torch.full_like(grad_norm, float(stop_requested))])
    if accelerator.num_processes > 1:
        health = accelerator.reduce(health, "sum")  # every process skips, and stops, alike
    fp16 = accelerator.scaler is not None
    bad = guard.update(health, step, grads_checked=not fp16)
    if fp16:  # the gradient scaler skips the steps whose gradients overflow; it must see every step
        optimizer.step()
    else:
        step_unless(optimizer, bad)
    return health, grad_norm


def _device_scalar(value, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 tensor on ``like``'s device: from a tensor, a DTensor (FSDP2's
    gradient norm), a Python number (DeepSpeed's), or None (0)."""
    if value is None:
        return torch.zeros_like(like, dtype=torch.float32)
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=torch.float32)
    return torch.full_like(like, float(value), dtype=torch.float32)


def _settle_bad_steps(guard: NonFiniteGuard, state: TrainState, cfg: RunConfig, out: Path, log, stop) -> None:
    """Count the steps skipped since the last call; stop the run once more than
    ``train.max_bad_steps`` have been."""
    n, (loss, grad_norm, step) = guard.settle()
    if not n:
        return
    state.bad_steps += n
    log(f"warning: {n} step(s) with a non-finite loss or gradient skipped, the latest at step {int(step)} "
        f"({state.bad_steps} so far); weights and optimizer state are as before each")
    if state.bad_steps > cfg.train.max_bad_steps:
        stop.restore()
        last = ckpt.find_resumable(out)
        raise TrainingDiverged(
            f"loss became {loss:.4g} (grad norm {grad_norm:.4g}) at step {int(step)}; training stopped. "
            f"Last good checkpoint: {last.path if last else 'none'}. Lower optim.lr, raise optim.warmup_steps, "
            "or allow train.max_bad_steps")


def _evaluate(objective, data, cfg: RunConfig, accelerator) -> dict[str, float]:
    batches = data.eval_batches
    if hasattr(objective, "prepare_batch"):
        batches = [objective.prepare_batch(dict(b), torch.Generator().manual_seed(10_007 + i)) for i, b in enumerate(batches)]
    ev = evaluate_objective(objective, batches, accelerator.device, accelerator.autocast)
    if cfg.objective == "clm":
        ev.update(language_metrics(ev["loss"], data.bytes_per_token))
    return ev


def _apply_optim_config(optimizer, schedule, cfg: RunConfig) -> None:
    o = cfg.optim
    for group, decays in zip(optimizer.param_groups, (True, False)):
        group.update(initial_lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay if decays else 0.0)
    schedule.base_lrs = [o.lr for _ in optimizer.param_groups]
    schedule.lr_lambdas = [lambda s: lr_factor(s, o, cfg.train.max_steps) for _ in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, schedule.base_lrs):
        group["lr"] = base * lr_factor(schedule.last_epoch, o, cfg.train.max_steps)


def _save(accelerator, model, optimizer, schedule, state: TrainState, cfg: RunConfig) -> None:
    model_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
        trainer_state = {"step": state.step, "cursor": state.cursor, "tokens_seen": state.tokens_seen,
                         "bad_steps": state.bad_steps, "schedule": schedule.state_dict(),
                         "fingerprint": cfg.fingerprint(), "metrics": state.metrics, "time": time.time()}
        ckpt.save_checkpoint(Path(cfg.train.output_dir), state.step, model_state, optimizer.state_dict(),
                             trainer_state, cfg.train.keep_last)
    accelerator.wait_for_everyone()


class _StopSignal:
    """SIGINT/SIGTERM ask the loop to finish the current step, save and exit; a second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out

