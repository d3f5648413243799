"""The gradient-aligned frozen A (init="gradient") and the gradient pass that feeds it."""
import pytest
import torch
import torch.nn as nn

import lora

LABELS = torch.tensor([0, 1, 1, 0])


def ce_loss(model, batch):
    return nn.functional.cross_entropy(model(**batch).logits, LABELS)


class Regression(nn.Module):
    """y = W x, loss 0.5 ||W x - y||^2 averaged over the batch."""

    def __init__(self, w):
        super().__init__()
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.proj.weight.data = w.clone()
        self.unused = nn.Linear(w.shape[1], 2)


def regression_loss(model, batch):
    x, y = batch
    return 0.5 * (model.proj(x) - y).pow(2).sum(1).mean()


def regression_with_gradient(g_true, w):
    """Batches whose mean loss gradient at W is exactly ``g_true``: inputs sqrt(d) e_i (so
    mean x x^T = I) and targets y_i = sqrt(d) (W - G)[:, i], giving dL/dW = W - Y^T X / n = G.
    Two equal batches, so the mean over batches is the mean over rows."""
    d = w.shape[1]
    x = d ** 0.5 * torch.eye(d, dtype=w.dtype)
    y = d ** 0.5 * (w - g_true).T
    return [(x[: d // 2], y[: d // 2]), (x[d // 2:], y[d // 2:])]


def known_spectrum(d_out, d_in, sigmas, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(sigmas), generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(sigmas), generator=g))
    return u @ torch.diag(torch.tensor(sigmas)) @ v.T, v


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_a_spans_the_top_r_right_singular_subspace_of_the_gradient(solver):
    g_true, v = known_spectrum(12, 16, [8.0, 6.0, 4.0, 1.0, 0.5, 0.25])
    w = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    model = Regression(w)
    grads = lora.estimate_gradients(model, regression_loss, regression_with_gradient(g_true, w),
                                    targets=["proj"])
    assert list(grads) == ["proj"] and grads["proj"].dtype == torch.float32
    torch.testing.assert_close(grads["proj"], g_true, atol=1e-5, rtol=0)

    lora.add_lora(model, rank=3, init="gradient", targets=["proj"], gradients=grads,
                  svd_solver=solver)
    m = model.proj
    torch.testing.assert_close(m.lora_A @ m.lora_A.T, torch.eye(3), atol=1e-5, rtol=0)
    cosines = torch.linalg.svdvals(m.lora_A @ v[:, :3])  # cosines of the principal angles
    assert cosines.min() >= 1 - 1e-5, cosines
    assert not m.lora_B.any() and torch.equal(m.base.weight, w)  # B = 0, W unchanged


def test_gradient_step_starts_one_rank_r_gradient_step_in():
    """LoRA-One's variant: s B A = -eta G_r, with B0 = 0 so remove_lora gives W back."""
    g_true, _ = known_spectrum(12, 16, [8.0, 6.0, 4.0, 1.0], seed=2)
    g_true = g_true.double()
    w = torch.randn(12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = Regression(w)
    batches = regression_with_gradient(g_true, w)
    grads = lora.estimate_gradients(model.double(), regression_loss, batches, targets=["proj"])
    lora.add_lora(model, rank=2, alpha=3, init="gradient", targets=["proj"], gradients=grads,
                  gradient_step=0.1)
    u, sig, vh = torch.linalg.svd(g_true)
    g_r = u[:, :2] @ torch.diag(sig[:2]) @ vh[:2]
    torch.testing.assert_close(model.proj.delta(), -0.1 * g_r, atol=1e-10, rtol=0)
    assert not model.proj.lora_B0.any() and torch.equal(model.proj.base.weight, w)
    lora.remove_lora(model)
    assert torch.equal(model.proj.weight, w)


def test_step0_logits_equal_the_base_model(tiny_roberta, token_batch):
    model = tiny_roberta()
    with torch.no_grad():
        ref = model(**token_batch).logits
    grads = lora.estimate_gradients(model, ce_loss, [token_batch], targets="all-linear")
    lora.add_lora(model, rank=4, init="gradient", targets="all-linear", gradients=grads)
    with torch.no_grad():
        assert torch.equal(model(**token_batch).logits, ref)


def one_sgd_step_drop(model, batch, lr):
    lora.mark_only_lora_as_trainable(model, head=False)
    opt = torch.optim.SGD(list(lora.lora_parameters(model)), lr=lr)
    loss0 = ce_loss(model, batch)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        return (loss0 - ce_loss(model, batch)).item()


def test_one_sgd_step_on_b_drops_the_loss_more_than_any_of_20_random_orthonormal_a(
        tiny_roberta, token_batch):
    """First order, one step on B lowers the loss by lr s^2 sum_l ||G_l A_l^T||_F^2, which
    A = V_r(G)^T maximises over orthonormal A: the best fixed A for LoRA-FA."""
    lr = 0.5
    base = tiny_roberta().double()  # float64: the drops are small, their order must be exact
    grads = lora.estimate_gradients(base, ce_loss, [token_batch])
    lora.add_lora(base, rank=4, init="gradient", gradients=grads)
    aligned = one_sgd_step_drop(base, token_batch, lr)
    random = []
    for seed in range(20):
        model = tiny_roberta().double()
        lora.add_lora(model, rank=4, init="orthogonal", seed=seed)
        random.append(one_sgd_step_drop(model, token_batch, lr))
    assert aligned > 0 and aligned >= max(random), (aligned, sorted(random)[-3:])


def test_the_gradient_pass_leaves_the_model_as_it_was(tiny_roberta, token_batch):
    model = tiny_roberta().train()
    model.roberta.embeddings.requires_grad_(False)  # a mix of flags to restore
    kept_grad = torch.ones_like(model.classifier.out_proj.bias)
    model.classifier.out_proj.bias.grad = kept_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    grads = lora.estimate_gradients(model, ce_loss, [token_batch, token_batch])
    assert len(grads) == 2 * 4 and all(g.dtype == torch.float32 and g.any() for g in grads.values())
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # eval pass: no dropout draws
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-identical
        assert p.requires_grad == flags[n], n
        assert p.grad is (kept_grad if n == "classifier.out_proj.bias" else None), n


def test_gradient_is_the_mean_over_batches(tiny_roberta, token_batch):
    other = {k: v.flip(0) for k, v in token_batch.items()}
    model = tiny_roberta()
    one = lora.estimate_gradients(model, ce_loss, [token_batch])
    two = lora.estimate_gradients(model, ce_loss, [other])
    both = lora.estimate_gradients(model, ce_loss, [token_batch, other])
    for n in both:
        torch.testing.assert_close(both[n], (one[n] + two[n]) / 2, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- bad inputs

def bad_gradients(model, how):
    names = lora.find_targets(model, "attention")
    grads = {n: torch.randn(model.get_submodule(n).weight.shape) for n in names}
    if how == "missing":
        grads.pop(names[-1])
    elif how == "shape":
        grads[names[0]] = torch.randn(32, 16)
    elif how == "zeros":
        grads[names[1]].zero_()
    elif how == "nan":
        grads[names[2]][0, 0] = float("nan")
    elif how == "tensor":
        return grads[names[0]]
    return grads


@pytest.mark.parametrize("how,msg", [
    ("missing", "gradients has no entry for target"),
    ("shape", r"gradient of '.*' must have shape \[32, 32\], got \[32, 16\]"),
    ("zeros", "is all zeros"),
    ("nan", "contains NaN or Inf"),
    ("tensor", r"init='gradient' needs gradients=\{module name: dL/dW\}"),
])
def test_bad_gradients_are_refused_before_the_model_changes(tiny_roberta, how, msg):
    model = tiny_roberta()
    grads = bad_gradients(model, how)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=msg):
        lora.add_lora(model, rank=4, init="gradient", gradients=grads)
    assert not lora.lora_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_estimate_gradients_refuses_bad_calls_and_still_restores_the_model(tiny_roberta,
                                                                           token_batch):
    model = tiny_roberta()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="batches is empty"):
        lora.estimate_gradients(model, ce_loss, [])
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        lora.estimate_gradients(model, lambda m, b: 1.0, [token_batch])
    with pytest.raises(ValueError, match="loss_fn returned nan on batch 1"):
        lora.estimate_gradients(model, lambda m, b: ce_loss(m, b) * float("nan"), [token_batch])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    reg = Regression(torch.randn(4, 6))
    with pytest.raises(ValueError, match="'unused' got no gradient"):
        lora.estimate_gradients(reg, regression_loss, [(torch.randn(3, 6), torch.randn(3, 4))],
                                targets=["proj", "unused"])
    lora.add_lora(model, rank=2)
    with pytest.raises(RuntimeError, match="needs the model without adapters"):
        lora.estimate_gradients(model, ce_loss, [token_batch])
