"""lorakit/train/lora_plus.py: LoRA+ parameter groups against PEFT's create_loraplus_optimizer, and
`train` with `lora_plus_ratio` against a plain PyTorch loop with those groups; the variant flags."""

import pytest
import torch
from fixtures import lm_examples, trainable_tensors
from fixtures import pad_right as collate
from fixtures import train_cfg as cfg_for
from fixtures import train_llama as tiny_llama

import lorakit
from lorakit.errors import ConfigError
from lorakit.train import TrainConfig, train
from lorakit.train.lora_plus import lora_plus_groups

KW = dict(
    r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"], use_dora=True, bias="lora_only"
)


def _lrs(optimizer, names):
    return {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_groups_equal_peft_create_loraplus_optimizer():
    import peft
    from peft.optimizers import create_loraplus_optimizer

    ours = lorakit.inject(tiny_llama(), lorakit.LoraConfig(**KW))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**KW))
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    ref_lrs = _lrs(ref, {id(p): n.removeprefix("base_model.model.") for n, p in theirs.named_parameters()})
    opt = torch.optim.AdamW(lora_plus_groups(ours, 1e-3, 16, 0.0))
    our_lrs = _lrs(opt, {id(p): n for n, p in ours.named_parameters()})
    peft_key = {
        n: n.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight") for n in our_lrs
    }
    assert {peft_key[n]: lr for n, lr in our_lrs.items()} == ref_lrs
    assert set(our_lrs.values()) == {1e-3, 1.6e-2, 1e-6}  # A, B (and magnitudes, biases), embedding


def test_train_with_lora_plus_equals_a_plain_loop_with_those_groups(tmp_path):
    examples = lm_examples(8)
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    constant = {"schedule": "constant", "warmup_steps": 0, "max_grad_norm": 0}  # a plain AdamW loop
    cfg = cfg_for(tmp_path, max_steps=3, batch_size=8, lora_plus_ratio=8.0, **constant)
    rows = train(model, examples, cfg, collate)
    ref = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    a = [p for n, p in ref.named_parameters() if p.requires_grad and "lora_A" in n]
    b = [p for n, p in ref.named_parameters() if p.requires_grad and "lora_B" in n]
    opt = torch.optim.AdamW([{"params": a, "lr": 1e-2}, {"params": b, "lr": 8e-2}], weight_decay=0.0)
    batch = collate(examples)
    losses = []
    for _ in range(3):
        loss = ref(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-4)
    ours = trainable_tensors(model)
    for name, value in trainable_tensors(ref).items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5)


def test_variant_flags_reach_the_lora_config():
    from lorakit.train.run import lora_config

    cfg = TrainConfig(data="x", dora=True, init="pissa_niter_4").validate()
    config = lora_config(cfg, tiny_llama())
    assert config.use_dora and config.init_lora_weights == "pissa_niter_4"
    assert not config.use_rslora
    rs = lora_config(TrainConfig(data="x", r=16, lora_alpha=32.0, use_rslora=True).validate(), tiny_llama())
    assert rs.use_rslora and rs.scaling_for("model.layers.0.self_attn.q_proj") == 32.0 / 4
    loftq = lora_config(TrainConfig(data="x", init="loftq", quantize="nf4").validate(), tiny_llama())
    assert loftq.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(init="loftq"), "add --quantize nf4"),
        (dict(init="pissa", quantize="nf4"), "cannot start from a 4-bit base"),
        (dict(init="kaiming"), "--init"),
        (dict(lora_plus_ratio=0.0), "lora_plus_ratio"),
    ],
)
def test_variant_flag_refusals(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(data="x", **kw).validate()


def test_head_lr_puts_the_new_head_in_its_own_group_and_is_not_mixed_with_lora_plus():
    from fixtures import tiny_bert_classifier

    from lorakit.train.lora_plus import group_lr, head_groups

    model = tiny_bert_classifier()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    groups = head_groups(model, 1e-4, 1e-3)
    head = {id(p) for p in model.classifier.modules_to_save["default"].parameters()}
    assert [g["lr"] for g in groups] == [1e-4, 1e-3] and {id(p) for p in groups[1]["params"]} == head
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable and head < trainable
    assert group_lr(groups[1], 2e-4) == pytest.approx(2e-3)  # a resume with a new --lr keeps the ratio
    with pytest.raises(ConfigError, match="use one of them"):
        TrainConfig(head_lr=1e-3, lora_plus_ratio=16).validate()
