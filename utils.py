"""Notebook entry point: ``from utils import ...`` re-exports the pipeline's public functions."""
from pipeline.data import (TASKS, GlueFormatError, get_task, load_examples, make_collator,  # noqa: F401
                           resolve_glue_dir, tokenize)
from pipeline.logs import load_curves, load_logs, read_log  # noqa: F401
from pipeline.models import resolve_model  # noqa: F401
from pipeline.plots import (curve_stats, final_results, plot_convergence, plot_curves,  # noqa: F401
                            plot_metric_vs, plot_task, results_table, steps_to_reach,
                            steps_to_reach_baseline, sweep_table, task_label, with_method)
from pipeline.sweep import grid, run_sweep, run_variants  # noqa: F401
from pipeline.train import RunConfig, compute_metrics, evaluate, run_experiment  # noqa: F401

__all__ = ["TASKS", "GlueFormatError", "RunConfig", "compute_metrics", "curve_stats", "evaluate",
           "final_results", "get_task", "grid", "load_curves", "load_examples", "load_logs",
           "make_collator", "plot_convergence", "plot_curves", "plot_metric_vs", "plot_task", "read_log",
           "resolve_glue_dir", "resolve_model", "results_table", "run_experiment", "run_sweep",
           "run_variants", "steps_to_reach", "steps_to_reach_baseline", "tokenize", "with_method"]
