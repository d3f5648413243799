"""Properties of the lora/ package: numerics against references, memory, round trips, errors."""
import copy
import pickle
import re

import pytest
import torch
import torch.nn as nn
from transformers import RobertaConfig
from transformers.models.roberta.modeling_roberta import RobertaLayer

import lora
from lora import inits

INITS = ["kaiming", "orthogonal", "svd", "svd_minor"]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def train_steps(model, batch, n=3, lr=1e-2, extra_loss=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    labels = torch.tensor([0, 1, 1, 0])
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(**batch).logits, labels)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- SVD init numerics

@pytest.mark.parametrize("split", ["sqrt", "b"])
def test_svd_init_is_the_rank_r_truncation_float64(split):
    w = torch.randn(40, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r, s = 5, 2.0
    a, b, w_res = inits.svd(w, r, s, svd_split=split)
    u, sig, vh = torch.linalg.svd(w, full_matrices=False)
    truncation = u[:, :r] @ torch.diag(sig[:r]) @ vh[:r]
    torch.testing.assert_close(s * b @ a, truncation, atol=1e-12, rtol=0)
    # Eckart-Young: the residual holds exactly the discarded energy
    torch.testing.assert_close(w_res.pow(2).sum(), sig[r:].pow(2).sum(), atol=1e-10, rtol=0)
    torch.testing.assert_close(w_res + s * b @ a, w, atol=1e-12, rtol=0)
    if split == "b":  # all of S in B: A has orthonormal rows
        torch.testing.assert_close(a @ a.T, torch.eye(r, dtype=w.dtype), atol=1e-12, rtol=0)
    else:  # PiSSA split: A and B carry equal norms
        torch.testing.assert_close(a.norm(), b.norm(), atol=1e-10, rtol=0)


def test_sqrt_split_is_the_b_split_with_a_per_direction_lr_float64():
    """The README's claim: with A frozen and Adam, the PiSSA (sqrt) split moves B exactly as
    the S-in-B split does (Adam divides out B's column scale D = sqrt(S/s)), so the output
    moves by dB D V^T instead of dB V^T: direction i's lr is multiplied by D_i."""
    torch.manual_seed(0)
    w = torch.randn(12, 10, dtype=torch.float64)
    x, target = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, 12, dtype=torch.float64)
    r, s, lr = 3, 2.0, 1e-2
    deltas = {}
    for split in ("sqrt", "b"):
        a, b, w_res = inits.svd(w, r, s, svd_split=split)
        b = b.clone().requires_grad_()
        opt = torch.optim.Adam([b], lr=lr, eps=1e-30)
        (((x @ (w_res + s * b @ a).T) - target) ** 2).mean().backward()
        b0 = b.detach().clone()
        opt.step()
        deltas[split] = (b.detach() - b0, a)
    (db_q, a_q), (db_b, a_b) = deltas["sqrt"], deltas["b"]
    torch.testing.assert_close(db_q, db_b, atol=1e-15, rtol=1e-12)  # same step on B
    d = torch.linalg.svdvals(w)[:r].div(s).sqrt()
    torch.testing.assert_close(a_q, d[:, None] * a_b, atol=1e-12, rtol=0)  # A_sqrt = D V^T
    assert not torch.allclose(s * db_q @ a_q, s * db_b @ a_b)  # so the output moves differently


def test_svd_minor_takes_the_smallest_components_float64():
    w = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a, b, w_res = inits.svd_minor(w, 4, 0.5)
    sig = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(0.5 * b @ a)[:4], sig[-4:], atol=1e-12, rtol=0)
    torch.testing.assert_close(w_res.pow(2).sum(), sig[:-4].pow(2).sum(), atol=1e-10, rtol=0)


def minilm_weights(minilm, k=6):
    model = minilm()
    names = lora.find_targets(model, "all-linear")[:: max(1, len(lora.find_targets(model, "all-linear")) // k)]
    return [model.get_submodule(n).weight.detach() for n in names]


def test_eckart_young_on_real_minilm_weights(minilm):
    for w in minilm_weights(minilm):
        _, _, w_res = inits.svd(w, 8, 2.0)
        optimum = torch.linalg.svdvals(w.double())[8:].pow(2).sum()
        assert abs(w_res.double().pow(2).sum() / optimum - 1) < 1e-4


def test_randomized_svd_niter4_within_one_percent_of_optimum(minilm):
    g = torch.Generator().manual_seed(0)
    for w in minilm_weights(minilm):
        _, _, w_res = inits.svd(w, 8, 2.0, svd_solver="randomized", niter=4, generator=g)
        optimum = torch.linalg.svdvals(w.double())[8:].pow(2).sum()
        assert w_res.double().pow(2).sum() <= 1.01 * optimum


def test_svd_in_low_precision_model_is_computed_in_float32():
    w32 = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    w16 = w32.to(torch.bfloat16)
    a, b, w_res = inits.svd(w16, 6, 1.0)
    assert a.dtype == b.dtype == w_res.dtype == torch.bfloat16
    a_ref, b_ref, _ = inits.svd(w16.float(), 6, 1.0)  # the same SVD done by hand in float32
    torch.testing.assert_close(a, a_ref.to(torch.bfloat16))
    torch.testing.assert_close(b, b_ref.to(torch.bfloat16))


def test_inits_are_deterministic_for_a_seed(minilm):
    def adapters(init, seed, **kw):
        m = minilm()
        lora.add_lora(m, rank=4, init=init, seed=seed, **kw)
        return lora.lora_state_dict(m)
    for init, kw in [("kaiming", {}), ("orthogonal", {}), ("svd", {"svd_solver": "randomized"})]:
        one, two, other = adapters(init, 0, **kw), adapters(init, 0, **kw), adapters(init, 1, **kw)
        assert all(torch.equal(one[k], two[k]) for k in one)
        assert any(not torch.equal(one[k], other[k]) for k in one if k.endswith("lora_A"))


def test_orthogonal_init_has_orthonormal_rows_and_zero_b():
    w = torch.randn(32, 48)
    a, b, w_res = inits.orthogonal(w, 8, 1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a @ a.T, torch.eye(8), atol=1e-5, rtol=0)
    assert w_res is None and not b.any()


def test_kaiming_init_matches_nn_linear_bounds():
    a, b, _ = inits.kaiming(torch.randn(16, 100), 8, 1.0, generator=torch.Generator().manual_seed(0))
    assert a.abs().max() <= 0.1 and a.abs().max() > 0.09 and not b.any()


# ---------------------------------------------------------------- the model at step 0

@pytest.mark.parametrize("init", INITS)
def test_logits_unchanged_at_step0_minilm(minilm, token_batch, init):
    model = minilm()
    ref = logits(model, token_batch)
    lora.add_lora(model, rank=8, init=init)
    assert (logits(model, token_batch) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("init", ["svd", "svd_minor"])
def test_logits_unchanged_at_step0_tiny_roberta(tiny_roberta, token_batch, init):
    model = tiny_roberta()
    ref = logits(model, token_batch)
    names = lora.add_lora(model, rank=4, init=init, targets="all-linear")
    assert len(names) == 2 * 6
    assert (logits(model, token_batch) - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------- training touches only B

@pytest.mark.parametrize("init", ["svd", "orthogonal"])
def test_only_b_and_head_change_after_optimizer_steps(minilm, token_batch, init):
    model = minilm()
    lora.add_lora(model, rank=8, init=init)
    lora.mark_only_lora_as_trainable(model, head=True)
    before = snapshot(model)
    model.train()
    train_steps(model, token_batch)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if k.endswith("lora_B") or k.startswith("classifier.")}
    assert changed == expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("base.weight"))


def test_bias_option_trains_biases_too(minilm, token_batch):
    model = minilm()
    lora.add_lora(model, rank=4, init="svd")
    lora.mark_only_lora_as_trainable(model, head=False, bias="lora_only")
    before = snapshot(model)
    train_steps(model, token_batch)
    changed = {k for k in before if not torch.equal(before[k], snapshot(model)[k])}
    assert changed == {k for k in before if k.endswith("lora_B") or k.endswith("base.bias")}


def test_plain_lora_trains_a_as_well(minilm, token_batch):
    model = minilm()
    lora.add_lora(model, rank=4, init="kaiming", freeze_a=False)
    lora.mark_only_lora_as_trainable(model, head=False)
    a0 = {k: v for k, v in snapshot(model).items() if k.endswith("lora_A")}
    assert all(isinstance(m.lora_A, nn.Parameter) for _, m in lora.lora_modules(model))
    train_steps(model, token_batch)
    assert all(not torch.equal(a0[k], model.state_dict()[k]) for k in a0)


def test_frozen_a_is_a_buffer_not_a_parameter(minilm):
    model = minilm()
    lora.add_lora(model, rank=4, init="svd")
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("lora_A") for n in names)
    assert any(n.endswith("lora_A") for n in model.state_dict())


# ---------------------------------------------------------------- memory

def roberta_layer():
    torch.manual_seed(0)
    layer = RobertaLayer(RobertaConfig())  # RoBERTa-base shape: 768 hidden, 12 heads, 3072 FFN
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer.train()


def layer_saved_bytes(layer, x):
    def step():
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out
    return lora.saved_activation_bytes(step, layer)


def test_lorafa_saves_no_more_activations_than_the_frozen_layer():
    x = torch.randn(4, 64, 768, requires_grad=True)  # input requires grad, as deep inside a model
    base = layer_saved_bytes(roberta_layer(), x)

    fa = roberta_layer()
    lora.add_lora(fa, rank=8, init="svd", targets="attention")
    lora.mark_only_lora_as_trainable(fa, head=False)
    fa_bytes = layer_saved_bytes(fa, x)

    plain = roberta_layer()
    lora.add_lora(plain, rank=8, init="kaiming", targets="attention", freeze_a=False)
    lora.mark_only_lora_as_trainable(plain, head=False)
    plain_bytes = layer_saved_bytes(plain, x)

    assert base > 0
    assert fa_bytes <= 1.02 * base, (fa_bytes, base)
    x_bytes = x.numel() * x.element_size()
    assert plain_bytes >= fa_bytes + x_bytes, (plain_bytes, fa_bytes)  # plain LoRA saves x


def test_adapter_dropout_costs_an_input_sized_mask():
    x = torch.randn(2, 32, 768, requires_grad=True)
    no_drop = roberta_layer()
    lora.add_lora(no_drop, rank=8, init="svd", targets=["attention.output.dense"])
    drop = roberta_layer()
    lora.add_lora(drop, rank=8, init="svd", targets=["attention.output.dense"], dropout=0.1)
    extra = layer_saved_bytes(drop, x) - layer_saved_bytes(no_drop, x)
    assert extra >= x.numel()  # at least a byte per element (a bool mask), at most a float copy
    assert extra <= 2 * x.numel() * x.element_size()


# ---------------------------------------------------------------- merge / disable / remove

def trained_svd_model(minilm, token_batch, init="svd"):
    model = minilm()
    lora.add_lora(model, rank=8, init=init)
    lora.mark_only_lora_as_trainable(model)
    train_steps(model, token_batch)
    return model.eval()


def test_merged_forward_equals_unmerged(minilm, token_batch):
    model = trained_svd_model(minilm, token_batch)
    unmerged = logits(model, token_batch)
    lora.merge_lora(model)
    assert not lora.lora_modules(model)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, nn.Linear)
    assert (logits(model, token_batch) - unmerged).abs().max() <= 1e-5


def test_remove_restores_the_original_weights(minilm, token_batch):
    original = snapshot(minilm())
    model = trained_svd_model(minilm, token_batch)
    lora.remove_lora(model)
    restored = snapshot(model)
    assert set(restored) == set(original)
    for k in original:
        if not k.startswith("classifier"):
            assert (restored[k] - original[k]).abs().max() <= 1e-6, k


def test_disable_gives_the_residual_model_and_enable_restores(minilm, token_batch):
    model = trained_svd_model(minilm, token_batch, init="orthogonal")
    on = logits(model, token_batch)
    with lora.lora_disabled(model):
        off = logits(model, token_batch)
    assert not torch.allclose(on, off)
    torch.testing.assert_close(logits(model, token_batch), on)
    lora.remove_lora(model)  # random init: W_res == W, so "off" is the base model + trained head
    torch.testing.assert_close(logits(model, token_batch), off)


# ---------------------------------------------------------------- save / load / export

def test_save_load_round_trip_reproduces_logits(minilm, token_batch, tmp_path):
    model = trained_svd_model(minilm, token_batch)
    lora.save_lora(model, tmp_path / "ad", base_model="minilm")
    fresh = minilm()
    lora.load_lora(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, token_batch), logits(model, token_batch))


def test_load_refuses_a_different_base(minilm, tiny_roberta, token_batch, tmp_path):
    model = trained_svd_model(minilm, token_batch)
    lora.save_lora(model, tmp_path / "ad")
    other = minilm()
    with torch.no_grad():
        other.bert.encoder.layer[3].attention.self.key.weight[0, 0] += 1e-3
    untouched = snapshot(other)
    with pytest.raises(ValueError, match="fingerprint"):
        lora.load_lora(other, tmp_path / "ad")
    assert not lora.lora_modules(other)
    assert all(torch.equal(v, untouched[k]) for k, v in snapshot(other).items())
    with pytest.raises(ValueError, match="lacks|shape"):
        lora.load_lora(tiny_roberta(), tmp_path / "ad")


def test_load_refuses_a_pickle(minilm, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    with open(folder / "adapter.safetensors", "wb") as f:
        pickle.dump({"lora_A": torch.zeros(2)}, f)
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="pickle"):
        lora.load_lora(minilm(), folder)
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter.bin")
    with pytest.raises(ValueError, match="pickle|safetensors"):
        lora.load_lora(minilm(), tmp_path / "adapter.bin")


@pytest.mark.parametrize("init", ["svd", "kaiming"])
def test_peft_export_loads_in_peft_and_matches_logits(minilm, minilm_path, token_batch, tmp_path, init):
    from peft import PeftModel
    model = trained_svd_model(minilm, token_batch, init=init)
    lora.export_peft(model, tmp_path / "peft", base_model=minilm_path)
    torch.manual_seed(123)  # PEFT must overwrite the freshly initialised head with ours
    peft_model = PeftModel.from_pretrained(minilm(), tmp_path / "peft").eval()
    assert peft_model.peft_config["default"].r == 8  # rank preserved, not doubled
    assert (logits(peft_model, token_batch) - logits(model, token_batch)).abs().max() <= 1e-5


# ---------------------------------------------------------------- penalty

def test_penalty_is_zero_at_init_and_counts_b_drift(minilm, token_batch):
    model = minilm()
    lora.add_lora(model, rank=4, init="svd")
    lora.mark_only_lora_as_trainable(model)
    assert lora.lora_penalty(model, 0.5).item() == 0.0
    assert lora.lora_penalty(model, 0.5, reference="zero").item() > 0
    train_steps(model, token_batch)
    manual = sum((m.lora_B - m.lora_B0).pow(2).sum() for _, m in lora.lora_modules(model))
    torch.testing.assert_close(lora.lora_penalty(model, 0.5), 0.5 * manual)


def test_penalty_pulls_b_towards_b0(minilm, token_batch):
    def drift(coeff):
        model = minilm()
        lora.add_lora(model, rank=4, init="svd")
        lora.mark_only_lora_as_trainable(model)
        train_steps(model, token_batch, n=5, extra_loss=lambda: lora.lora_penalty(model, coeff))
        return lora.lora_penalty(model, 1.0).item()
    assert drift(100.0) < drift(0.0)


# ---------------------------------------------------------------- targets and bad inputs

def test_target_presets_pick_the_expected_linears(minilm):
    model = minilm()
    assert len(lora.find_targets(model, "attention")) == 6 * 4
    qv = lora.find_targets(model, "qv")
    assert len(qv) == 12 and all(re.search(r"(query|value)$", n) for n in qv)
    all_linear = lora.find_targets(model, "all-linear")
    assert len(all_linear) == 6 * 6 and "bert.encoder.layer.0.output.dense" in all_linear
    assert "bert.encoder.layer.0.output.dense" not in lora.find_targets(model, "attention")
    assert lora.find_targets(model, ["layer.2.attention.self.query"]) == ["bert.encoder.layer.2.attention.self.query"]
    assert len(lora.find_targets(model, re.compile(r"layer\.[01]\..*key$"))) == 2


def test_mpnet_names_are_matched():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
    model = nn.ModuleDict({"layer": nn.ModuleList([nn.ModuleDict({"attention": nn.ModuleDict({"attn": Attn()})})])})
    assert len(lora.find_targets(model, "mpnet")) == 4
    assert len(lora.find_targets(model, "attention")) == 4
    assert len(lora.find_targets(model, "all-linear")) == 4


BAD_INPUTS = [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-2), ValueError, "rank"),
    (dict(rank=2.0), ValueError, "rank"),
    (dict(rank=385), ValueError, "exceeds"),
    (dict(alpha=0), ValueError, "alpha must be a finite number > 0"),  # was an all-NaN model
    (dict(alpha=-16), ValueError, "alpha must be"),
    (dict(alpha=float("nan")), ValueError, "alpha must be"),
    (dict(alpha=float("inf")), ValueError, "alpha must be"),
    (dict(alpha="16"), ValueError, "alpha must be"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=float("nan")), ValueError, "dropout"),
    (dict(freeze_a="yes"), ValueError, "freeze_a must be True or False"),
    (dict(rslora=1), ValueError, "rslora must be True or False"),
    (dict(seed=1.5), ValueError, "seed must be an int"),
    (dict(init="gaussian"), ValueError, "unknown init"),
    (dict(targets="everything"), ValueError, "unknown targets preset"),
    (dict(targets=["no_such_module"]), ValueError, "matched no module"),
    (dict(targets=["attention.self"]), TypeError, "not an nn.Linear"),
    (dict(init="svd_minor", svd_solver="randomized"), ValueError, "exact"),
    (dict(init="svd", svd_solver="magic"), ValueError, "svd_solver"),
    # the SVD settings are checked whatever the init (a typo must not wait for init="svd")
    (dict(init="kaiming", svd_solver="magic"), ValueError, "unknown svd_solver"),
    (dict(init="orthogonal", svd_split="a"), ValueError, "unknown svd_split"),
    (dict(init="kaiming", niter=-1), ValueError, "niter"),
    (dict(init="kaiming", niter=2.5), ValueError, "niter"),
    (dict(init="gradient"), ValueError, "init='gradient' needs gradients"),
    (dict(init="svd", gradients={}), ValueError, "gradients are only used by init='gradient'"),
    (dict(init="svd", gradient_step=0.1), ValueError, "gradient_step only applies"),
    (dict(init="gradient", gradient_step=-1.0), ValueError, "gradient_step must be"),
    (dict(init="gradient", gradient_step=float("nan")), ValueError, "gradient_step must be"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_INPUTS)
def test_bad_inputs_raise_and_leave_the_model_untouched(minilm, kwargs, exc, msg):
    model = minilm()
    before = snapshot(model)
    with pytest.raises(exc, match=msg) as err:
        lora.add_lora(model, **{"rank": 8, "init": "svd", **kwargs})
    assert "\n" not in str(err.value)
    assert not lora.lora_modules(model)
    after = snapshot(model)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_nan_weight_is_refused_before_anything_changes(minilm):
    model = minilm()
    with torch.no_grad():
        model.bert.encoder.layer[5].attention.output.dense.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        lora.add_lora(model, rank=8, init="svd")
    assert not lora.lora_modules(model)
    after = snapshot(model)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


def test_adding_adapters_twice_is_refused(minilm, token_batch):
    model = minilm()
    lora.add_lora(model, rank=4, init="svd")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="already has LoRA"):
        lora.add_lora(model, rank=4, init="svd")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_peft_export_of_a_roberta_head_with_two_linears(tiny_roberta, token_batch, tmp_path):
    from peft import PeftModel
    model = tiny_roberta()
    lora.add_lora(model, rank=4, init="svd", targets="all-linear")
    lora.mark_only_lora_as_trainable(model, head=True)  # classifier.dense + classifier.out_proj
    train_steps(model, token_batch)
    model.eval()
    lora.export_peft(model, tmp_path / "peft")
    base = tiny_roberta()  # the same base weights; scramble its head so PEFT must load ours
    with torch.no_grad():
        for p in base.classifier.parameters():
            p.normal_()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert (logits(peft_model, token_batch) - logits(model, token_batch)).abs().max() <= 1e-5


def test_counting_saved_tensors_does_not_leak_them():
    import gc
    import weakref
    x = torch.randn(32, 32, requires_grad=True)
    refs = []

    def forward():
        y = torch.softmax(x @ x, -1)  # softmax saves its own output for backward
        refs.append(weakref.ref(y))
        return y.sum()
    assert lora.saved_activation_bytes(forward) >= 2 * 32 * 32 * 4
    gc.collect()
    assert refs[0]() is None


# ---------------------------------------------------------------- settings, plan, registry

def test_settings_live_on_the_adapters_and_lora_config_reads_them_back(tiny_roberta):
    model = tiny_roberta()
    names = lora.add_lora(model, rank=4, alpha=6, init="svd", targets="qv", svd_split="b",
                          rslora=True, seed=3)
    assert not hasattr(model, "_lora_config")
    cfg = lora.lora_config(model)
    assert cfg == dict(rank=4, alpha=6, init="svd", freeze_a=True, dropout=0.0, seed=3,
                       rslora=True, svd_solver="exact", niter=4, svd_split="b",
                       gradient_step=0.0, targets=names)
    m = lora.lora_modules(model)[0][1]
    assert (m.rank, m.alpha, m.init, m.freeze_a, m.scale) == (4, 6, "svd", True, 6 / 2)


def test_lora_config_refuses_adapters_that_disagree(tiny_roberta):
    import dataclasses
    model = tiny_roberta()
    lora.add_lora(model, rank=4, init="orthogonal")
    name, m = lora.lora_modules(model)[-1]
    m.settings = dataclasses.replace(m.settings, alpha=32)
    with pytest.raises(ValueError, match=f"adapters disagree on alpha: 16 at .*, 32 at '{name}'"):
        lora.lora_config(model)


def test_plan_touches_nothing_and_apply_gives_add_lora(tiny_roberta, token_batch):
    model = tiny_roberta()
    before = snapshot(model)
    settings = lora.LoRASettings(rank=4, alpha=8, init="svd", freeze_a=True, dropout=0.0,
                                 seed=0, rslora=False, svd_solver="exact", niter=4,
                                 svd_split="sqrt", gradient_step=0.0)
    plan = lora.plan_lora(model, settings, "attention")
    assert not lora.lora_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    lora.apply_lora(model, plan)
    reference = tiny_roberta()
    lora.add_lora(reference, rank=4, alpha=8, init="svd")
    assert lora.lora_config(model) == lora.lora_config(reference)
    assert all(torch.equal(v, snapshot(reference)[k]) for k, v in snapshot(model).items())
    with pytest.raises(ValueError, match="no longer the linear"):  # a stale plan
        lora.apply_lora(tiny_roberta(), plan._replace(adapters=[
            plan.adapters[0]._replace(a=torch.zeros(4, 5))]))


@pytest.mark.parametrize("init", ["kaiming", "orthogonal", "svd", "svd_minor", "gradient"])
def test_each_init_declares_whether_it_changes_w(tiny_roberta, init):
    model = tiny_roberta()
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(model.get_submodule(n).weight.shape, generator=g)
             for n in lora.find_targets(model, "attention")}
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in grads}
    lora.add_lora(model, rank=4, init=init, gradients=grads if init == "gradient" else None)
    for name, m in lora.lora_modules(model):
        moved = not torch.equal(m.base.weight, weights[name])
        assert moved == bool(m.lora_B0.any()) == lora.INITS[init].changes_w


def test_compute_dtype_is_float32_except_for_float64():
    for dtype, expected in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        assert lora.compute_dtype(torch.zeros(1, dtype=dtype)) == expected


def test_atomic_write_replaces_whole_files_with_a_readable_mode(tmp_path):
    import os
    import stat
    path = tmp_path / "sub" / "f.txt"
    lora.atomic_write(path, lambda tmp: open(tmp, "w").write("one"))
    assert path.read_text() == "one" and stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o600)
    lora.atomic_write(path, lambda tmp: open(tmp, "w").write("two"))
    assert path.read_text() == "two" and stat.S_IMODE(path.stat().st_mode) == 0o600

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        lora.atomic_write(path, fail)
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


@pytest.mark.parametrize("init", ["kaiming", "orthogonal", "svd", "svd_minor", "gradient"])
def test_an_init_ignores_the_settings_it_does_not_declare(tiny_roberta, init):
    """INITS[init].uses lists what the init reads; anything else cannot change the adapters,
    so a run id or a table may leave it out for that init."""
    g = torch.Generator().manual_seed(0)
    model = tiny_roberta()
    grads = {n: torch.randn(model.get_submodule(n).weight.shape, generator=g)
             for n in lora.find_targets(model, "attention")}

    def adapters(**kw):
        m = tiny_roberta()
        lora.add_lora(m, rank=4, init=init, gradients=grads if init == "gradient" else None, **kw)
        return snapshot(m)
    reference = adapters()
    others = {"svd_solver": "randomized", "niter": 1, "svd_split": "b"}
    for key, value in others.items():
        if key not in lora.INITS[init].uses and not (init == "svd_minor" and key == "svd_solver"):
            assert all(torch.equal(v, reference[k]) for k, v in adapters(**{key: value}).items()), key
