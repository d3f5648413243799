"""Adapters always round-trip: save_lora -> load_lora into a fresh base, and export_peft ->
PeftModel.from_pretrained(fresh base), for every way a user trains (tiny models, so the
whole matrix runs in seconds). And load_lora trusts nothing: each bad folder is refused with
one line naming it, before any module is touched."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

import lora

INIT_CASES = {  # name -> add_lora kwargs
    "kaiming": dict(init="kaiming"),
    "orthogonal": dict(init="orthogonal"),
    "svd-sqrt": dict(init="svd", svd_split="sqrt"),
    "svd-b": dict(init="svd", svd_split="b"),
    "svd_minor": dict(init="svd_minor"),
    "gradient": dict(init="gradient"),
    "gradient-step": dict(init="gradient", gradient_step=0.1),
}
PRESETS = ["attention", "qv", "all-linear"]
LABELS = torch.tensor([0, 1, 1, 0])


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(**batch).logits, LABELS)


@pytest.fixture
def make_base(tiny_roberta, tiny_bert_dir):
    """kind, head_seed -> the same base weights with a head drawn from head_seed (a 'fresh'
    base as from_pretrained gives one: the head is new and random)."""
    def make(kind, head_seed=0):
        if kind == "roberta":
            model = tiny_roberta()
            torch.manual_seed(head_seed)
            for p in model.classifier.parameters():
                p.data.normal_(0, 0.2)
            return model
        torch.manual_seed(head_seed)
        return BertForSequenceClassification.from_pretrained(tiny_bert_dir(dropout=0.0),
                                                             num_labels=2).eval()
    return make


def trained(base, batch, *, init, targets, freeze_a, head, **kw):
    """add_lora + a few AdamW steps, as a user would train."""
    gradients = None
    if init == "gradient":
        gradients = lora.estimate_gradients(base, loss_fn, [batch], targets)
    lora.add_lora(base, rank=4, alpha=8, init=init, targets=targets, freeze_a=freeze_a,
                  gradients=gradients, **kw)
    lora.mark_only_lora_as_trainable(base, head=head)
    opt = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(base, batch).backward()
        opt.step()
    return base.eval()


# model x init x plain/FA as parameters; the preset and whether the head trains cycle so that
# each init meets every preset and both head settings; both task_types are exported each time
CASES = [(kind, init, freeze_a) for kind in ("roberta", "bert") for init in INIT_CASES
         for freeze_a in (True, False)]


@pytest.mark.parametrize("kind,init,freeze_a", CASES)
def test_save_load_and_peft_export_reproduce_the_trained_logits(make_base, token_batch, tmp_path,
                                                                 kind, init, freeze_a):
    from peft import PeftModel
    k, i = ("roberta", "bert").index(kind), list(INIT_CASES).index(init)
    preset, head = PRESETS[(i + k + (not freeze_a)) % 3], (k + (not freeze_a)) % 2 == 0
    model = trained(make_base(kind), token_batch, targets=preset, freeze_a=freeze_a, head=head,
                    **INIT_CASES[init])
    ours = logits(model, token_batch)

    lora.save_lora(model, tmp_path / "ad")
    fresh = make_base(kind, head_seed=1)
    assert not torch.allclose(logits(fresh, token_batch), ours)  # its head differs
    lora.load_lora(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, token_batch), ours), (preset, head)

    for task_type in ("SEQ_CLS", None):
        lora.export_peft(model, tmp_path / f"peft-{task_type}", task_type=task_type)
        peft_model = PeftModel.from_pretrained(make_base(kind, head_seed=2),
                                               tmp_path / f"peft-{task_type}").eval()
        diff = (logits(peft_model, token_batch) - ours).abs().max()
        assert diff <= 1e-5, (preset, head, task_type, diff)


def test_plain_lora_svd_remove_restores_w_after_a_moved(make_base, token_batch):
    """Plain LoRA moves A, so W = W_res + s B0 A0 needs the A at init (kept as lora_A0)."""
    original = {k: v.clone() for k, v in make_base("roberta").state_dict().items()}
    model = trained(make_base("roberta"), token_batch, init="svd", targets="attention",
                    freeze_a=False, head=False)
    lora.remove_lora(model)
    for k, v in model.state_dict().items():
        if not k.startswith("classifier"):
            assert (v - original[k]).abs().max() <= 1e-6, k


def test_trained_biases_round_trip_and_export_refuses_them(make_base, token_batch, tmp_path):
    model = make_base("roberta")
    lora.add_lora(model, rank=4, init="svd")
    lora.mark_only_lora_as_trainable(model, bias="all")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss_fn(model, token_batch).backward()
    opt.step()
    lora.save_lora(model.eval(), tmp_path / "ad")
    fresh = make_base("roberta", head_seed=1)
    lora.load_lora(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, token_batch), logits(model, token_batch))
    with pytest.raises(ValueError, match="biases were trained"):
        lora.export_peft(model, tmp_path / "peft")


# ---------------------------------------------------------------- load_lora trusts nothing

@pytest.fixture
def saved(make_base, token_batch, tmp_path):
    model = trained(make_base("roberta"), token_batch, init="svd", targets="attention",
                    freeze_a=True, head=True)
    return lora.save_lora(model, tmp_path / "ad")


def edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(folder, fn):
    tensors = load_file(folder / "adapter.safetensors")
    fn(tensors)
    save_file(tensors, folder / "adapter.safetensors")


def flip_a_byte(folder):
    path = folder / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))


def truncate(folder, end=-100):
    path = folder / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:end])


def drop_last_target(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    edit_config(folder, targets=cfg["targets"][:-1])


def drop_a_tensor(folder):
    key = "roberta.encoder.layer.1.attention.output.dense.lora_B"
    edit_tensors(folder, lambda t: t.pop(key))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["sha256"].pop(key)
    edit_config(folder, sha256=cfg["sha256"])


BAD_FOLDERS = [  # (how the folder is damaged, what the one-line error must say)
    (lambda f: edit_config(f, rank=8), "scale"),
    (lambda f: edit_config(f, rank=8, alpha=16), "shapes A"),
    (lambda f: edit_config(f, alpha=4), "scale"),
    (lambda f: edit_config(f, alpha=0), "alpha must be"),
    (lambda f: edit_config(f, init="kaiming"), "call for other tensors"),
    (lambda f: edit_config(f, init="gradient"), "call for other tensors"),
    (lambda f: edit_config(f, init="nope"), "unknown init"),
    (lambda f: edit_config(f, freeze_a=False), "call for other tensors"),
    (drop_last_target, "disagree with its shapes"),
    (lambda f: edit_config(f, format_version=1), "format_version"),
    (lambda f: edit_config(f, sha256=None), "sha256"),
    (lambda f: (f / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (flip_a_byte, "checksum mismatch"),
    (lambda f: edit_tensors(f, lambda t: t["head.classifier.out_proj.bias"].add_(1)),
     "checksum mismatch"),
    (drop_a_tensor, "call for other tensors"),
    (lambda f: edit_tensors(f, lambda t: t.pop("head.classifier.out_proj.bias")),
     "does not hold the tensors"),
    (truncate, "truncated or corrupt"),
    (lambda f: truncate(f, 20), r"is not safetensors \(or truncated\)"),  # inside the header
]


def unchanged(model, before):
    after = model.state_dict()
    return (not lora.lora_modules(model) and set(after) == set(before)
            and all(torch.equal(after[k], before[k]) for k in before))


@pytest.mark.parametrize("damage,msg", BAD_FOLDERS)
def test_load_refuses_a_damaged_folder_before_touching_the_model(make_base, saved, damage, msg):
    damage(saved)
    model = make_base("roberta", head_seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=msg) as err:
        lora.load_lora(model, saved)
    assert str(saved) in str(err.value) and "\n" not in str(err.value)
    assert unchanged(model, before)


def test_load_refuses_a_head_of_another_shape_and_leaves_no_adapter(tiny_roberta, saved):
    model = tiny_roberta()
    model.classifier.out_proj = nn.Linear(32, 3)  # num_labels=3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"head tensor .classifier\.out_proj\.\w+. has shape"):
        lora.load_lora(model, saved)
    assert unchanged(model, before)


def test_load_refuses_a_model_that_already_has_adapters(make_base, saved):
    model = make_base("roberta")
    lora.add_lora(model, rank=2)
    with pytest.raises(RuntimeError, match="already has LoRA"):
        lora.load_lora(model, saved)
