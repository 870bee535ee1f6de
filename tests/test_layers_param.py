"""lorakit.layers.param: LoRA on nn.Parameters (PEFT's `target_parameters`), checked against PEFT on
tiny Mixtral and Qwen3-MoE models (experts as 3-D parameters, the router's weight), a module with a
plain 2-D parameter and one with transposed experts, against the formula by hand, and for merge,
unload and the refusals."""

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import lorakit
from lorakit.errors import AdapterStateError, ConfigError, TargetNotFoundError
from lorakit.inject import lora_layers
from lorakit.layers import LoraParam, param_delta
from lorakit.mixed import adapter_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

SHAPE = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


def mixtral():
    torch.manual_seed(0)
    return T.MixtralForCausalLM(T.MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2)).eval()


def qwen3_moe():
    torch.manual_seed(0)
    config = T.Qwen3MoeConfig(
        **SHAPE, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12
    )
    return T.Qwen3MoeForCausalLM(config).eval()


MODELS = {"mixtral": mixtral, "qwen3-moe": qwen3_moe}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CASES = {
    "experts": dict(target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS),
    "experts+router": dict(target_modules=["o_proj"], target_parameters=[*EXPERTS, "mlp.gate.weight"]),
    "parameters only": dict(
        target_modules=[], target_parameters=["down_proj"], rank_pattern={"layers.1.*": 3}
    ),
}


def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


def kwargs(case):
    return dict(r=2, lora_alpha=5, init_lora_weights=False, **CASES[case])


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("case", CASES)
def test_crosses_with_peft_both_ways(family, case, tmp_path):
    make = MODELS[family]
    ours = lorakit.inject(make(), lorakit.LoraConfig(**kwargs(case)))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kwargs(case))).eval()
    assert lorakit.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    expected = logits(ours)
    assert not torch.allclose(expected, logits(make()), atol=1e-4)
    lorakit.save_adapter(ours, tmp_path / "ours")
    saved = lorakit.io.read_adapter_tensors(tmp_path / "ours")
    assert set(saved) == set(peft.get_peft_model_state_dict(theirs))  # PEFT's names and nesting
    in_peft = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(in_peft), expected, atol=1e-5, rtol=0)

    theirs.save_pretrained(tmp_path / "peft")
    loaded = lorakit.load_adapter(make(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(theirs), atol=1e-5, rtol=0)


def test_merge_unmerge_unload_and_one_training_step():
    model = lorakit.inject(mixtral(), lorakit.LoraConfig(**kwargs("experts+router")))
    base = logits(mixtral())
    adapted = logits(model)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(input_ids=ids(), labels=ids()).loss.backward()
    grads = {
        n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.any()
    }
    assert {n for n in before if ".experts." in n} <= grads and any(".gate." in n for n in grads)
    plain = lorakit.unload(model.eval(), merge=False)
    assert (
        not list(lora_layers(plain)) and type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    )
    torch.testing.assert_close(logits(plain), base, atol=1e-6, rtol=0)


def test_delta_is_each_experts_b_times_a_in_peft_packing():
    g = torch.Generator().manual_seed(0)
    experts, r, out, inp = 3, 2, 5, 4
    a, b = torch.randn(experts * r, inp, generator=g), torch.randn(out, experts * r, generator=g)
    delta = param_delta(a, b, 0.5, experts, transposed=False)
    for e in range(experts):
        a_e = a[e * r : (e + 1) * r]  # rows of expert e
        b_e = b[:, [k * experts + e for k in range(r)]]  # columns e, e+E, ...
        torch.testing.assert_close(delta[e], 0.5 * b_e @ a_e)
    torch.testing.assert_close(param_delta(a, b, 0.5, experts, transposed=True), delta.transpose(1, 2))
    torch.testing.assert_close(param_delta(a[:r], b[:, :r], 2.0, 1, False), 2.0 * b[:, :r] @ a[:r])


class Transposed(nn.Module):
    """Experts stored [E, in, out] (`is_transposed`), a plain 2-D weight, and a bias parameter."""

    is_transposed = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.experts = nn.Parameter(torch.randn(3, 6, 5))
        self.proj = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        h = torch.einsum("bi,eio->beo", x, self.experts).sum(1)
        return F.linear(h, self.proj)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Transposed()

    def forward(self, x):
        return self.block(x)


def test_any_parameter_and_transposed_experts_match_peft(tmp_path):
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    kw = dict(
        r=2,
        lora_alpha=3,
        target_modules=[],
        target_parameters=["block.experts", "proj"],
        init_lora_weights=False,
    )
    ours = lorakit.inject(Net(), lorakit.LoraConfig(**kw))
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**kw))
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs.load_adapter(tmp_path / "ours", "x")
    theirs.set_adapter("x")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=0)
        assert not torch.allclose(ours(x), Net()(x), atol=1e-3)
    layers = dict(lora_layers(ours))
    assert layers["block"].parameter_name == "proj" and layers["block.base_layer"].parameter_name == "experts"


def test_refusals():
    with pytest.raises(ConfigError, match="lora_dropout"):
        lorakit.inject(mixtral(), lorakit.LoraConfig(target_parameters=EXPERTS, lora_dropout=0.1))
    with pytest.raises(TargetNotFoundError, match="gate_up_proj"):
        lorakit.inject(mixtral(), lorakit.LoraConfig(target_parameters=["nope"]))
    with pytest.raises(ConfigError, match="target_modules adapts too"):
        lorakit.inject(
            mixtral(), lorakit.LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"])
        )
    with pytest.raises(ConfigError, match="the model itself"):
        lorakit.inject(Transposed(), lorakit.LoraConfig(target_parameters=["proj"]))
    model = lorakit.inject(mixtral(), lorakit.LoraConfig(target_parameters=EXPERTS))
    with pytest.raises(ConfigError, match="same ones"):
        lorakit.inject(model, lorakit.LoraConfig(target_parameters=EXPERTS[:1]), "other")
    lorakit.inject(model, lorakit.LoraConfig(target_parameters=EXPERTS, r=3), "second")  # same set: fine
    assert sorted(model.model.layers[0].mlp.experts.r) == ["default", "second"]
    assert isinstance(model.model.layers[0].mlp.experts.base_layer, LoraParam)  # no third nesting level
    with pytest.raises(AdapterStateError, match="mixed-adapter batch"):
        with adapter_rows(model, ["default", "second"]):
            model(input_ids=ids())
