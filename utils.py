"""Notebook entry point: ``from utils import ...`` re-exports the pipeline's public functions."""
from pipeline.data import (TASKS, GlueFormatError, get_task, load_examples, make_collator,  # noqa: F401
                           resolve_glue_dir, tokenize)
from pipeline.analysis import (curve_stats, final_results, load_curves, load_logs,  # noqa: F401
                               results_table, steps_to_reach, sweep_table, task_label,
                               with_method)
from pipeline.logs import read_log  # noqa: F401
from pipeline.models import resolve_model  # noqa: F401
from pipeline.plots import plot_convergence, plot_curves, plot_metric_vs, plot_task  # noqa: F401
from pipeline.study import run_task  # noqa: F401
from pipeline.sweep import grid, run_sweep, run_variants  # noqa: F401
from pipeline.config import RunConfig  # noqa: F401
from pipeline.metrics import compute_metrics, evaluate  # noqa: F401
from pipeline.train import run_experiment  # noqa: F401

__all__ = ["TASKS", "GlueFormatError", "RunConfig", "compute_metrics", "curve_stats", "evaluate",
           "final_results", "get_task", "grid", "load_curves", "load_examples", "load_logs",
           "make_collator", "plot_convergence", "plot_curves", "plot_metric_vs", "plot_task", "read_log",
           "resolve_glue_dir", "resolve_model", "results_table", "run_experiment", "run_sweep",
           "run_task", "run_variants", "steps_to_reach", "sweep_table", "task_label", "tokenize", "with_method"]
