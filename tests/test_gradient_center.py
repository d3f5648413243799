"""estimate_gradients(center=True) and RunConfig.gradient_center: the gradient with centred
layer inputs, G_c = sum_t delta_t (x_t - mu)^T, which has no component along the mean input."""
import pytest
import torch
import torch.nn as nn

import lora
from pipeline.config import RunConfig


class Tokens(nn.Module):
    """A token-wise linear layer with a bias, fed (batch, tokens, d_in) inputs."""

    def __init__(self, d_in=6, d_out=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d_in, d_out)


def loss_fn(model, batch):
    return masked_loss(model.proj(batch["x"]), batch)


def masked_loss(out, batch):
    m = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return 0.5 * ((out - batch["y"]).pow(2) * m).sum() / m.sum()


def make_batch(seed, offset, b=3, t=5, d_in=6, d_out=4, pad=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d_in, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - pad:] = 0  # padding tokens: their inputs are garbage
    real = mask.bool()
    x[..., 1:][real] -= x[..., 1:][real].mean(0)  # the varying part has mean 0 ...
    x[..., 0] = offset  # ... and coordinate 0 is constant: the mean input direction
    x[0, t - pad:] = 100.0
    return {"x": x, "y": torch.randn(b, t, d_out, generator=g, dtype=torch.float64),
            "attention_mask": mask}


def by_hand(model, batches):
    """mean over batches of sum_t delta_t (x_t - mu_b)^T, mu_b over the real tokens."""
    total = 0
    for batch in batches:
        x = batch["x"]
        out = model.proj(x)
        delta, = torch.autograd.grad(masked_loss(out, batch), out)
        real = batch["attention_mask"].bool()
        mu = x[real].mean(0)
        total = total + torch.einsum("bto,bti->oi", delta, x - mu)
    return total / len(batches)


def test_centred_gradient_matches_the_formula_and_drops_the_mean_direction():
    model = Tokens().double()
    batches = [make_batch(1, 3.0), make_batch(2, 3.0)]
    plain = lora.estimate_gradients(model, loss_fn, batches, targets=["proj"])["proj"]
    centred = lora.estimate_gradients(model, loss_fn, batches, targets=["proj"],
                                      center=True)["proj"]
    torch.testing.assert_close(centred, by_hand(model, batches), atol=1e-10, rtol=0)
    e0 = torch.zeros(6, dtype=torch.float64)
    e0[0] = 1
    # the real tokens all sit at x_0 = 3: centred, nothing of G points along e0 ...
    assert centred @ e0 == pytest.approx(torch.zeros(4, dtype=torch.float64), abs=1e-10)
    # ... while the plain gradient's top right singular vector is that very direction
    v1 = torch.linalg.svd(plain)[2][0]
    assert abs(v1 @ e0) > 0.9
    # and off the mean direction nothing changes: the varying part of G is the same
    torch.testing.assert_close(centred[:, 1:], plain[:, 1:], atol=1e-10, rtol=0)


def test_centred_pass_leaves_no_hooks_and_the_weights_alone():
    model = Tokens().double()
    w = model.proj.weight.detach().clone()
    lora.estimate_gradients(model, loss_fn, [make_batch(3, 1.0)], targets=["proj"], center=True)
    assert not model.proj._forward_hooks
    assert torch.equal(model.proj.weight, w) and model.proj.weight.grad is None


def test_centred_gradient_without_a_mask_averages_every_row():
    model = Tokens().double()
    batch = make_batch(4, 2.0, pad=0)
    tuple_loss = lambda m, b: loss_fn(m, {**b[0]})  # noqa: E731  (not a mapping: no mask read)
    got = lora.estimate_gradients(model, tuple_loss, [(batch,)], targets=["proj"],
                                  center=True)["proj"]
    torch.testing.assert_close(got, by_hand(model, [batch]), atol=1e-10, rtol=0)


def test_run_config_gradient_center():
    assert RunConfig(init="gradient", gradient_center=True).run_id.endswith("-gc-s0")
    assert "-gc" not in RunConfig(init="gradient").run_id
    assert "-gc" not in RunConfig(init="orthogonal", gradient_center=True).run_id
    stored = {k: v for k, v in RunConfig(init="gradient").semantic().items()
              if k != "gradient_center"}
    assert RunConfig.from_dict(stored).gradient_center is False  # logs from before the field
    with pytest.raises(ValueError, match="gradient_center must be True or False"):
        RunConfig(init="gradient", gradient_center="yes")


def test_pipeline_passes_gradient_center_to_the_gradient_pass(glue_dir, tmp_path, tiny_bert_dir):
    """add_adapters(cfg) with gradient_center=True: A spans the top right singular vectors of
    the centred gradient of the run's first batches (not of the plain one)."""
    from functools import partial

    from pipeline import train as T
    from pipeline.data import make_collator

    cfg = RunConfig(task="mrpc", model=tiny_bert_dir(0.0), init="gradient", rank=2,
                    gradient_center=True, batch_size=8, subsample_train=40, subsample_dev=16,
                    gradient_batches=2, logs_dir=str(tmp_path), glue_dir=str(glue_dir),
                    quiet=True)
    torch.manual_seed(0)
    model, tok, _ = T.load_model(cfg, 2)
    train, *_ = T.load_splits(cfg, tok)
    coll = make_collator(tok)
    batches = [coll([train[i] for i in b]) for b in T.epoch_batches(cfg, train, 0)[:2]]
    loss = partial(T.batch_loss, regression=False)
    name = "bert.encoder.layer.0.attention.output.dense"
    grads = {c: lora.estimate_gradients(model, loss, batches, center=c)[name]
             for c in (False, True)}
    T.add_adapters(cfg, model, batches)
    a = model.get_submodule(name).lora_A.detach()

    def alignment(g):  # cosines of the principal angles between A's rows and V_2(G)
        return torch.linalg.svdvals(a @ torch.linalg.svd(g)[2][:2].T).min()

    assert alignment(grads[True]) > 1 - 1e-4
    assert alignment(grads[False]) < 0.99
