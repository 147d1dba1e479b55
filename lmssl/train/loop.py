"""The training loop on Accelerate. One function, :func:`fit`, readable top to bottom; features
are small helpers beside it (checkpoints, logging, evaluation, skipped steps). Pretraining
(:func:`train`) and fine-tuning (:mod:`lmssl.finetune`) each build their objective, data and
run directory, then hand them to it."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from lmssl import objectives
from lmssl.config import OptimConfig, RunConfig, TrainConfig
from lmssl.data import build_data
from lmssl.data.batches import to_device
from lmssl.data.tokenizer import resolve_tokenizer
from lmssl.errors import UserError
from lmssl.evaluate import evaluate_objective
from lmssl.models import set_activation_checkpointing
from lmssl.objectives import Objective
from lmssl.runs import checkpoint as ckpt
from lmssl.runs import prepare_run_dir
from lmssl.train.flops import device_peak_flops
from lmssl.train.log import JsonlLog, plot_loss_curve
from lmssl.train.optim import group_hyperparameters, lr_factor, make_optimizer, make_schedule, step_unless


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
        self.flag = torch.zeros((), device=device)  # 1.0 when the latest step was skipped (for after_step hooks)

    def update(self, health: torch.Tensor, step: int, grads_checked: bool = True) -> torch.Tensor:
        """``health (3,)``: loss, gradient norm, stop flag. Returns the 0-dim float flag
        (1.0: skip this step). ``grads_checked=False`` leaves the gradients to an fp16
        gradient scaler, which skips overflowing steps itself and is not an error."""
        values = health[:2] if grads_checked else health[:1]
        bad = (~torch.isfinite(values).all()).float()
        self.count += bad
        seen = torch.cat([health[:2], torch.full_like(health[:1], float(step))])
        self.last = torch.where(bad > 0, seen, self.last)
        self.flag = bad
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


class LoopConfig(Protocol):
    """What :func:`fit` reads of a run's settings. :class:`~lmssl.config.RunConfig` is one
    (pretraining); :class:`lmssl.finetune.FinetuneRun` is another (fine-tuning)."""

    objective: str  # the name shown in the log, the progress bar and the loss curve's title
    train: TrainConfig
    optim: OptimConfig

    def fingerprint(self) -> str: ...  # what makes two runs the same run (checkpoints record it)

    def to_dict(self) -> dict[str, Any]: ...  # every setting (trackers record it)


def make_accelerator(t: TrainConfig):
    """The Accelerator of a run. Without GPUs, a torchrun / `accelerate launch` world of
    several processes is Accelerate's multi-CPU mode."""
    from accelerate import Accelerator

    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=t.mixed_precision, log_with=t.trackers or None, project_dir=t.output_dir,
                       cpu=multi_cpu)


def console(accelerator) -> Callable[[str], None]:
    """Log lines on the main process (stderr, above the progress bar); other processes stay quiet."""
    return (lambda msg: tqdm.write(msg, file=sys.stderr)) if accelerator.is_main_process else (lambda msg: None)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Pretrain ``cfg.objective`` (``lmssl pretrain``): the run's data, run directory and
    objective, then :func:`fit`."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg.train)
    log = console(accelerator)
    kind = objectives.get(cfg.objective)
    tokenizer = resolve_tokenizer(cfg, Path(cfg.train.output_dir), log) if kind.modality != "images" else None
    if tokenizer is not None:
        complete_model_config(cfg, tokenizer)
    with accelerator.main_process_first():
        data = build_data(cfg, kind, tokenizer, log)  # first: it completes the config (image classes)
        resume = prepare_run_dir(cfg, accelerator.is_main_process, log)
    set_seed(cfg.train.seed)
    objective = objectives.build(cfg, tokenizer)
    result = fit(objective, data, cfg, accelerator, resume, tokenizer, log)
    if result.get("complete"):
        log(f"{cfg.train.output_dir} is already trained to step {result['step']}; raise train.max_steps to train further")
    return result


def fit(objective: Objective, data, cfg: LoopConfig, accelerator, resume: ckpt.Checkpoint | None, tokenizer=None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``objective`` on ``data`` (``stream``, ``eval_batches``, ``unit``,
    ``units_per_sample``: :class:`~lmssl.data.batches.TextData` and the like) with
    ``cfg.train`` and ``cfg.optim``, from ``resume`` (a checkpoint of this run, or None):
    steps seeded by :func:`step_seed`, non-finite steps skipped on the device, log lines,
    evaluations (the objective's ``eval_metrics``), atomic checkpoints and a clean stop on
    SIGINT/SIGTERM. The run ends at ``train.max_steps``, or at an evaluation after which
    ``objective.should_stop()`` (early stopping). ``{"complete": True}`` when it had
    already ended."""
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    out = Path(cfg.train.output_dir)
    if world > 1 and accelerator.device.type == "cuda":
        # batch norm (ResNets, projector heads) normalises over the global batch, as SimCLR, BYOL and
        # VICReg do; the conversion keeps every parameter and name (CPU processes cannot sync: no-op)
        objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    n_params = sum(p.numel() for p in objective.parameters())
    optimizer = make_optimizer(objective.param_groups(cfg.optim), cfg.optim, accelerator.device.type)
    schedule = make_schedule(optimizer, cfg.optim, cfg.train.max_steps)
    state = TrainState()
    if resume is not None:
        state = _resume(resume, objective, optimizer, schedule, cfg, log)
    if state.step >= cfg.train.max_steps or objective.should_stop():
        return {"step": state.step, "tokens_seen": state.tokens_seen, "complete": True}
    if cfg.train.activation_checkpointing:
        set_activation_checkpointing(objective)
    objective.to(accelerator.device)
    model = torch.compile(objective) if cfg.train.compile else objective
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.trackers:
        accelerator.init_trackers(out.name, config=_flat(cfg.to_dict()))
    if is_main and resume is None:
        picture = objective.begin(data, out)
        if picture:
            log(picture)

    accum, global_batch = cfg.train.grad_accum, cfg.train.micro_batch_size * cfg.train.grad_accum * world
    unit, per_sample = data.unit, data.units_per_sample  # what throughput counts: tokens of text, or images
    flops_per_unit = objective.flops_per_sample() / per_sample
    peak, peak_source = device_peak_flops(accelerator.device)
    jsonl = JsonlLog(out / "log.jsonl", state.step if resume is not None else None, enabled=is_main)
    shape = f"{global_batch} x {per_sample} {unit}" if per_sample > 1 else f"{global_batch} {unit}"
    log(f"{cfg.objective} | {n_params / 1e6:.2f}M parameters | {world} process(es) on {accelerator.device} | "
        f"global batch {shape} | peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")

    stop = _StopSignal()
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not (is_main and cfg.train.progress),
               desc=cfg.objective, unit="step", dynamic_ncols=True)
    window = MetricWindow()
    guard, stop_flag = NonFiniteGuard(accelerator.device), LateRead()
    stream = data.stream(cfg, state.cursor, rank, world)
    model.train()
    while state.step < cfg.train.max_steps:
        torch.manual_seed(step_seed(cfg.train.seed, state.step, rank))
        step_metrics: dict[str, torch.Tensor] = {}
        for a in range(accum):
            batch, first = next(stream)
            batch = objective.prepare_batch(batch, torch.Generator().manual_seed(step_seed(cfg.train.seed, first, 0)))
            batch = to_device(batch, accelerator.device)
            with nullcontext() if a == accum - 1 else accelerator.no_sync(model):
                loss, metrics = model(batch)
                accelerator.backward(loss / accum)
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0) + v.float() / accum
        health, grad_norm = _checked_step(accelerator, model, optimizer, guard, cfg, step_metrics["loss"],
                                          state.step + 1, stop.requested)
        objective.after_step(state.step, guard.flag)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.cursor += global_batch
        state.tokens_seen += global_batch * per_sample
        window.add(step_metrics, health, grad_norm if cfg.train.grad_clip > 0 else None, global_batch * per_sample)
        bar.update(1)

        last_step = state.step == cfg.train.max_steps
        logging = state.step % cfg.train.log_every == 0 or last_step
        evaluating = (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or last_step
        saving = (cfg.train.save_every and state.step % cfg.train.save_every == 0) or last_step
        # one process alone reads its own flag; several read the agreed one a step late, when it is ready
        stopping = stop.requested if world == 1 else stop_flag.swap(health[2])
        if logging or evaluating or saving or stopping:
            _settle_bad_steps(guard, state, cfg, out, log, stop)
        if logging:
            _log_window(window, accelerator, state, schedule, unit, flops_per_unit, peak, jsonl, bar, cfg)
        if evaluating:
            _evaluate_and_log(objective, data, cfg, accelerator, state, jsonl, log)
        done = last_step or (evaluating and objective.should_stop())  # early stopping ends a run at an evaluation
        if saving or stopping or done:
            _save(accelerator, model, optimizer, schedule, state, cfg)
        if stopping:
            bar.close()
            stop.restore()
            log(f"stopped by signal at step {state.step}; checkpoint saved. Run the same command again to resume.")
            accelerator.end_training()
            return {"stopped": True, "step": state.step, **state.metrics}
        if done:
            break
    bar.close()
    stop.restore()
    accelerator.end_training()
    return _finish(objective, data, cfg, accelerator, state, tokenizer, n_params, unit)


def _log_window(window: MetricWindow, accelerator, state: TrainState, schedule, unit: str, flops_per_unit: float,
                peak: float, jsonl: JsonlLog, bar, cfg: LoopConfig) -> None:
    """One log line: the window's averages to ``log.jsonl``, the trackers, the progress bar and the state."""
    record = window.record(accelerator, state, schedule, unit, flops_per_unit, peak)
    jsonl.write(record)
    if cfg.train.trackers:
        accelerator.log(record, step=state.step)
    bar.set_postfix({"loss": f"{record['loss']:.3f}", f"{unit[:3]}/s": f"{record[f'{unit}_per_s']:,.0f}",
                     "mfu": f"{record['mfu']:.1%}"})
    state.metrics = record


class MetricWindow:
    """Metric sums over the steps since the last log line, kept on the device (read at log
    time only); steps that were skipped (or fp16 overflows) are left out of the averages."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.units, self.t0 = 0, time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], health: torch.Tensor, grad_norm: torch.Tensor | None,
            units: int) -> None:
        counted = torch.isfinite(health[:2]).all()
        if grad_norm is not None:
            metrics = {**metrics, "grad_norm": grad_norm}
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(counted, v, 0.0)
        self.sums["good_steps"] = self.sums.get("good_steps", 0.0) + counted.float()
        self.units += units

    def record(self, accelerator, state: TrainState, schedule, unit: str, flops_per_unit: float,
               peak: float) -> dict[str, float]:
        """The log line's values (averaged over processes), and a fresh window."""
        elapsed = time.perf_counter() - self.t0
        good = float(self.sums.pop("good_steps"))
        record = {k: float(v) / good if good else float("nan") for k, v in self.sums.items()}
        if accelerator.num_processes > 1:
            record = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                      for k, v in record.items()}
        per_s = self.units / max(elapsed, 1e-9)
        record.update({"step": state.step, "lr": schedule.get_last_lr()[0], f"{unit}_per_s": per_s,
                       "tflops": per_s * flops_per_unit / 1e12, f"{unit}_seen": state.tokens_seen})
        record["mfu"] = per_s * flops_per_unit / (peak * accelerator.num_processes) if peak else 0.0
        self.__init__()
        return record


def _resume(resume: ckpt.Checkpoint, objective, optimizer, schedule, cfg: LoopConfig, log) -> TrainState:
    ckpt.load_weights(objective, resume.path / "model.safetensors")
    optimizer.load_state_dict(ckpt.load_optimizer_state(resume.path))
    saved = ckpt.load_trainer_state(resume.path)
    schedule.load_state_dict(saved["schedule"])
    # the recipe, not the checkpoint, sets hyper-parameters
    group_hyperparameters(optimizer, objective.param_groups(cfg.optim), cfg.optim)
    o, steps = cfg.optim, cfg.train.max_steps
    schedule.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    schedule.lr_lambdas = [lambda s: lr_factor(s, o, steps) for _ in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, schedule.base_lrs):
        group["lr"] = base * lr_factor(schedule.last_epoch, o, steps)
    log(f"resuming from {resume.path} (step {saved['step']})")
    return TrainState(saved["step"], saved["cursor"], saved["tokens_seen"], saved.get("bad_steps", 0))


def _evaluate_and_log(objective, data, cfg: LoopConfig, accelerator, state: TrainState, jsonl, log) -> None:
    """Held-out metrics (the objective's loss and metrics on the fixed batches, then its own
    extras: perplexity, k-NN, collapse); logged, kept in the state, and the loss curve redrawn."""
    batches = [objective.prepare_batch(dict(b), torch.Generator().manual_seed(10_007 + i))
               for i, b in enumerate(data.eval_batches)]
    ev = evaluate_objective(objective, batches, accelerator.device, accelerator.autocast)
    ev.update(objective.eval_metrics(ev, data, log))
    jsonl.write({"step": state.step, "kind": "eval", **{f"eval_{k}": v for k, v in ev.items()}})
    log(f"step {state.step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in ev.items()))
    state.metrics.update({f"eval_{k}": v for k, v in ev.items()})
    if accelerator.is_main_process:
        out = Path(cfg.train.output_dir)
        plot_loss_curve(out / "log.jsonl", out / "loss_curve.png", f"{cfg.objective}: {out.name}",
                        objective.loss_label)


def _finish(objective, data, cfg: LoopConfig, accelerator, state: TrainState, tokenizer, n_params: int,
            unit: str) -> dict[str, Any]:
    """The run's result, the end-of-run report and ``final_metrics.json`` (main process)."""
    out = Path(cfg.train.output_dir)
    is_main = accelerator.is_main_process
    result = {"step": state.step, f"{unit}_seen": state.tokens_seen, "params": n_params, "main_process": is_main,
              **state.metrics}
    if is_main:
        result["loss_curve"] = str(out / "loss_curve.png") if (out / "loss_curve.png").exists() else None
        if not math.isfinite(state.metrics.get("eval_loss", 0.0)):
            tqdm.write("no end-of-run report: the held-out loss is not finite (see the warnings above)", file=sys.stderr)
        else:
            with accelerator.autocast():
                result["report"] = objective.report(tokenizer, data.eval_batches, cfg, out)
        (out / "final_metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=1))
    return result


def _checked_step(accelerator, model, optimizer, guard: NonFiniteGuard, cfg: LoopConfig, loss: torch.Tensor,
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


def _settle_bad_steps(guard: NonFiniteGuard, state: TrainState, cfg: LoopConfig, out: Path, log, stop) -> None:
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


def _save(accelerator, model, optimizer, schedule, state: TrainState, cfg: LoopConfig) -> None:
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

