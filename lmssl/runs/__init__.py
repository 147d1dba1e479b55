"""Run I/O below every command: run folders (``run.json``, claiming, rebuilding a run),
crash-safe checkpoints, the shipped recipes and labelled tasks. ``train/``, ``export/``,
``probe`` and ``finetune`` all read runs through here."""

from lmssl.runs.run import load_run, prepare_run_dir, read_run_config, run_objective

__all__ = ["load_run", "prepare_run_dir", "read_run_config", "run_objective"]
