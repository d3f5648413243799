"""svd-lorafa experiment pipeline: GLUE data, one accelerate train/eval loop, JSON run logs,
grid sweeps and plot helpers. Submodules import lazily-heavy libraries only where needed."""
from .data import GlueFormatError, TASKS, get_task, load_examples, make_collator, tokenize
from .analysis import load_curves, load_logs
from .logs import read_log
from .config import RunConfig
from .metrics import compute_metrics, evaluate
from .models import resolve_model
from .train import run_experiment

__all__ = ["GlueFormatError", "RunConfig", "TASKS", "compute_metrics", "evaluate", "get_task",
           "grid", "load_curves", "load_examples", "load_logs", "make_collator", "read_log",
           "resolve_model", "run_experiment", "run_sweep", "tokenize"]


def __getattr__(name):
    # sweep is imported lazily so `python -m pipeline.sweep` does not import it twice
    if name in ("grid", "run_sweep"):
        from . import sweep
        return getattr(sweep, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
