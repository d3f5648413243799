"""RunConfig: the one list of run settings. Every field documented, alpha resolved once, every
bad value refused with one line naming the setting, stored schema-1 configs read as the pilot
protocol, run ids stable for the committed logs."""
from dataclasses import fields

import numpy as np
import pytest
import torch

from pipeline.config import RunConfig, fmt_float

# (overrides, the message the refusal must contain). Each is the exact first words of the error.
REFUSED = [
    (dict(task="mrpcc"), "unknown task 'mrpcc'"),
    (dict(variant="qlora"), "unknown variant 'qlora'"),
    (dict(init="pissa"), "unknown init 'pissa'"),
    (dict(rank=0), "rank must be a positive int, got 0"),
    (dict(rank=2.5), "rank must be an int, got 2.5"),
    (dict(alpha=0), "alpha must be a finite number > 0, got 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0, got nan"),
    (dict(targets="ffn"), "unknown targets preset 'ffn'"),
    (dict(targets=[]), "targets []: give a preset name or a non-empty list"),
    (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1), got 1.0"),
    (dict(svd_split="a"), "unknown svd_split 'a'"),
    (dict(svd_solver="lanczos"), "unknown svd_solver 'lanczos'"),
    (dict(niter=-1), "niter (randomized SVD power iterations) must be an int >= 0, got -1"),
    (dict(init="svd_minor", svd_solver="randomized"), "init='svd_minor' needs svd_solver='exact'"),
    (dict(variant="full", svd_solver="lanczos"), "unknown svd_solver 'lanczos'"),
    (dict(gradient_step=0.1), "gradient_step only applies to init='gradient' (got init='svd')"),
    (dict(init="gradient", gradient_step=-1), "gradient_step must be a finite number >= 0"),
    (dict(gradient_batches=0), "gradient_batches must be an int >= 1, got 0"),
    (dict(reg_coeff=-0.1), "reg_coeff must be >= 0, got -0.1"),
    (dict(variant="full", reg_coeff=0.1), "reg_coeff penalises ||B - B0|| of adapters"),
    (dict(lr=None), "lr must be a number, got None"),
    (dict(warmup_ratio="0.1"), "warmup_ratio must be a number, got '0.1'"),
    (dict(head_lr="x"), "head_lr must be a number or None, got 'x'"),
    (dict(subsample_train=2.5), "subsample_train must be an int or None, got 2.5"),
    (dict(lr=0), "lr must be a finite number > 0, got 0"),
    (dict(lr=-1e-3), "lr must be a finite number > 0, got -0.001"),
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(head_lr=0.0), "head_lr must be a finite number > 0, got 0.0"),
    (dict(epochs=0), "epochs must be an int >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(eval_batch_size=0), "eval_batch_size must be an int >= 1, got 0"),
    (dict(max_length=0), "max_length must be an int >= 1, got 0"),
    (dict(max_length=-5), "max_length must be an int >= 1, got -5"),
    (dict(warmup_ratio=1.0), "warmup_ratio must be in [0, 1), got 1.0"),
    (dict(warmup_ratio=-0.1), "warmup_ratio must be in [0, 1), got -0.1"),
    (dict(weight_decay=-1), "weight_decay must be >= 0, got -1"),
    (dict(grad_clip=0), "grad_clip must be a finite number > 0, got 0"),
    (dict(mixed_precision="fp8"), "unknown mixed_precision 'fp8'"),
    (dict(subsample_train=0), "subsample_train must be an int >= 1 or None, got 0"),
    (dict(subsample_train=-3), "subsample_train must be an int >= 1 or None, got -3"),
    (dict(subsample_dev=0), "subsample_dev must be an int >= 1 or None, got 0"),
    (dict(eval_every_steps=0), "eval_every_steps must be an int >= 1 or None, got 0"),
    (dict(patience=0), "patience must be an int >= 1 or None, got 0"),
    (dict(dev_split="test"), "task 'mrpc' has no split 'test'"),
    (dict(dev_split="train"), "dev_split='train' would test on the training rows"),
    (dict(val_fraction=1.0), "val_fraction must be in [0, 1), got 1.0"),
    (dict(val_fraction=-0.1), "val_fraction must be in [0, 1), got -0.1"),
    (dict(val_max=0), "val_max must be an int >= 1, got 0"),
    (dict(split_seed=-1), "split_seed must be an int >= 0, got -1"),
    (dict(seed=-1), "seed must be an int >= 0, got -1"),
    (dict(val_fraction=0, patience=2), "patience stops on the selection split"),
    (dict(tag="a/b"), "tag 'a/b' must be a string without"),
    (dict(rslora="false"), "rslora must be True or False, got 'false'"),
    (dict(length_grouped=1), "length_grouped must be True or False, got 1"),
    (dict(model=""), "model must be 'minilm', 'mpnet', a hub id or a folder, got ''"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[m[:30] for _, m in REFUSED])
def test_every_bad_setting_is_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError) as e:
        RunConfig(**overrides)
    text = str(e.value)
    assert text.startswith(message) and "\n" not in text


def test_fp16_on_cpu_is_refused_before_the_run(monkeypatch):
    # accelerate 1.15 runs fp16 on CPU as plain float32 (while the log said fp16): refused
    RunConfig(mixed_precision="fp16")  # a config may be built anywhere (read, dry-run) ...
    with pytest.raises(ValueError, match=r"^mixed_precision='fp16' needs a GPU"):
        RunConfig(mixed_precision="fp16", cpu=True).check_device()  # ... but not run on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a GPU"):
        RunConfig(mixed_precision="fp16").check_device()
    RunConfig(mixed_precision="bf16", cpu=True).check_device()  # CPU autocast is real bf16
    RunConfig(mixed_precision="no").check_device()


def test_bf16_on_cpu_really_computes_in_bfloat16():
    """The measured fact check_device relies on: accelerate's CPU autocast honours bf16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps one state per process
    try:
        acc = Accelerator(mixed_precision="bf16", cpu=True)
        with acc.autocast():
            y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
        assert y.dtype == torch.bfloat16
    finally:
        AcceleratorState._reset_state(True)


def test_every_field_has_help_text():
    missing = [f.name for f in fields(RunConfig) if not f.metadata.get("help")]
    assert missing == []


def test_alpha_defaults_to_twice_the_rank_everywhere():
    assert RunConfig(rank=4).alpha == 8 and RunConfig().alpha == 16
    assert RunConfig(rank=4, alpha=4).alpha == 4
    assert RunConfig(rank=4).run_id == "mrpc-lorafa-svd-r4-lr5e-04-s0"  # default scale: no 'a'
    assert "-a4-" in RunConfig(rank=4, alpha=4).run_id


def test_numpy_numbers_and_paths_become_plain_python(tmp_path):
    cfg = RunConfig(rank=np.int64(4), lr=np.float32(1e-3), epochs=np.int32(2),
                    logs_dir=tmp_path, glue_dir=tmp_path, rslora=np.bool_(True))
    assert type(cfg.rank) is int and type(cfg.lr) is float and type(cfg.epochs) is int
    assert cfg.logs_dir == cfg.glue_dir == str(tmp_path) and cfg.rslora is True
    import json
    from dataclasses import asdict
    json.dumps(asdict(cfg))  # the log's config is JSON


def test_schema1_config_reads_as_the_pilot_protocol():
    """A stored config without the protocol fields is the pilot (selected on GLUE dev, no
    predictions), never a run of the new protocol."""
    old = {"task": "mrpc", "variant": "lorafa", "init": "svd", "rank": 8, "alpha": 16,
           "lr": 0.00375, "epochs": 1, "seed": 2, "logs_dir": "logs", "gone_field": 1}
    cfg = RunConfig.from_dict(old)
    assert cfg.val_fraction == 0.0 and cfg.save_predictions is False
    assert cfg.run_id == "mrpc-lorafa-svd-r8-lr3.75e-03-s2"  # the committed log's file name
    new = RunConfig(**{k: v for k, v in old.items() if k != "gone_field"})
    assert new.differs_from(old) == "val_fraction: 0.0 -> 0.1"
    assert RunConfig.from_dict({**old, "val_fraction": 0.2}).val_fraction == 0.2


def test_round_trip_and_semantic():
    cfg = RunConfig(task="rte", init="gradient", targets=["query", "value"], patience=3,
                    length_grouped=True, logs_dir="elsewhere", quiet=True)
    from dataclasses import asdict
    assert RunConfig.from_dict(asdict(cfg)) == cfg
    assert cfg.differs_from(asdict(RunConfig(**{**asdict(cfg), "logs_dir": "x"}))) == ""
    assert cfg.run_id == "rte-lorafa-gradient-r8-lr5e-04-tquery+value-pat3-lg-s0"


def test_run_ids_of_protocol_settings():
    assert RunConfig(val_fraction=0).run_id == RunConfig().run_id  # pilot ids unchanged
    assert RunConfig(val_fraction=0.2, split_seed=1).run_id.endswith("-val0.2-ss1-s0")
    assert RunConfig(init="gradient", gradient_batches=4).run_id.endswith("-gb4-s0")
    assert RunConfig(init="gradient", gradient_step=0.5).run_id.endswith("-gs5e-01-s0")
    # settings an init does not read leave its run id alone
    assert RunConfig(init="orthogonal", svd_split="b", svd_solver="randomized").run_id == \
        "mrpc-lorafa-orthogonal-r8-lr5e-04-s0"
    assert RunConfig(init="svd_minor", svd_split="b").run_id.endswith(
        "svd_minor-r8-lr5e-04-splitb-s0")
    assert RunConfig(variant="full", init="gradient").init == "none"


def test_full_runs_ignore_adapter_settings():
    a, b = RunConfig(variant="full", rank=4), RunConfig(variant="full", rank=16, alpha=3,
                                                        init="kaiming", lora_dropout=0.1)
    assert a.semantic() == b.semantic() and a.run_id == b.run_id == "mrpc-full-lr5e-04-s0"
    assert RunConfig(rank=4).semantic() != RunConfig(rank=16).semantic()


def test_fmt_float_is_exact():
    assert fmt_float(3e-4) == "3e-04" and fmt_float(1.5e-4) == "1.5e-04"
    assert float(fmt_float(0.00375)) == 0.00375
