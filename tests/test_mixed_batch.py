"""Mixed-adapter batches: each row equals running it alone, matches PEFT's `adapter_names=`, works
with a KV cache (generate) and with backward (a row's gradient reaches only its own adapter)."""

import contextlib
import copy

import pytest
import torch
from fixtures import tiny_gpt2, tiny_llama

import lorakit
from lorakit.errors import AdapterStateError, ConfigError, ShapeMismatchError
from lorakit.generate import Row, Sampling, generate_tokens
from lorakit.layers import Routing
from lorakit.mixed import adapter_rows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_adapters(model, specs: dict[str, dict]):
    """Inject one adapter per spec with random (nonzero) A and B."""
    for i, (name, kw) in enumerate(specs.items()):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=TARGETS, **kw), name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in lorakit.io.adapter_state_dict(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


SPECS = {"a": {"r": 4, "lora_alpha": 8}, "b": {"r": 8, "lora_alpha": 4}, "c": {"r": 2, "lora_alpha": 2}}
ROWS = ["a", "b", None, "c", "a"]


def alone(model, name, ids):
    if name is None:
        with lorakit.disable_adapters(model):
            return model(ids).logits
    lorakit.set_adapter(model, name)
    return model(ids).logits


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("seq", [7, 1])
@pytest.mark.parametrize("rows", [ROWS, ROWS * 3], ids=["runs", "stacked"])
def test_each_row_equals_running_it_alone(seq, rows):
    # 4 runs of rows on one adapter: each run its own matmuls; 10 runs (more than max_runs): the
    # stacked paths (seq 7: per-row gather, seq 1: the dense decode step)
    model = with_adapters(tiny_llama(), SPECS)
    layer = model.model.layers[0].self_attn.q_proj
    ids = torch.randint(0, 128, (len(rows), seq), generator=torch.Generator().manual_seed(0))
    with adapter_rows(model, rows):
        mixed = model(ids).logits
        assert (layer._routed[1][2] is None) == (rows is not ROWS)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone(model, name, ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)
    # adapters differ, so rows really used different weights
    assert not torch.allclose(mixed[0], alone(model, "b", ids[:1])[0], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("rows", [None, ROWS, ROWS * 3], ids=["one adapter", "runs", "stacked"])
def test_inference_under_bf16_autocast_is_close_to_fp32(rows):
    # at inference the adapter is added in place; autocast casts only out-of-place ops, so the
    # bf16 activations met fp32 B weights ("mat1 and mat2 must have the same dtype")
    model = with_adapters(tiny_llama(), SPECS)
    lorakit.set_adapter(model, "a")
    ids = torch.randint(0, 128, (len(rows or ROWS), 6), generator=torch.Generator().manual_seed(0))
    with adapter_rows(model, rows) if rows else contextlib.nullcontext():
        want = model(ids).logits
        with torch.autocast("cpu", torch.bfloat16):
            got = model(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.05)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_matches_peft_adapter_names(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    reference = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(reference, cfg, adapter_name="a")
    pm.add_adapter(
        "b", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path)  # adapters not named "default" go to tmp_path/<name>
    pm.eval()
    for name in ("a", "b"):
        lorakit.load_adapter(base, tmp_path / name, name)
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(1))
    names = ["a", "b", "__base__", "b"]
    expected = pm(input_ids=ids, adapter_names=names).logits
    with adapter_rows(base, [None if n == "__base__" else n for n in names]):
        got = base(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_generate_with_kv_cache_per_row():
    model = with_adapters(tiny_llama(), SPECS)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    rows = ["a", "c", None]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with adapter_rows(model, rows):
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    for i, name in enumerate(rows):
        one = ids[i : i + 1]
        if name is None:
            with lorakit.disable_adapters(model):
                ref = model.generate(one, attention_mask=torch.ones_like(one), **kw)
        else:
            lorakit.set_adapter(model, name)
            ref = model.generate(one, attention_mask=torch.ones_like(one), **kw)
        assert mixed[i].tolist() == ref[0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("seq", [5, 1])  # 1: the decode-step form
def test_backward_reaches_only_each_rows_adapter(seq):
    model = with_adapters(tiny_llama(), SPECS)
    lorakit.set_adapter(model, ["a", "b", "c"])  # all trainable
    ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(3))
    with adapter_rows(model, ["a", "b"]):
        model(ids).logits[0].sum().backward()  # only row 0 ("a") in the loss
    state = {n: lorakit.io.adapter_state_dict(model, n) for n in ("a", "b", "c")}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in state["a"].values())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n in ("b", "c") for p in state[n].values())

    # the mixed gradient equals the sum of per-row gradients computed alone
    model.zero_grad()
    with adapter_rows(model, ["a", "b"]):
        model(ids).logits.pow(2).mean(dim=(1, 2)).sum().backward()
    mixed = {n: {k: p.grad.clone() for k, p in state[n].items()} for n in ("a", "b")}
    for i, name in enumerate(["a", "b"]):
        model.zero_grad()
        lorakit.set_adapter(model, ["a", "b", "c"])
        with adapter_rows(model, [name]):  # uniform batch of one: the plain single-adapter path
            model(ids[i : i + 1]).logits.pow(2).mean().backward()
        for k, p in state[name].items():
            torch.testing.assert_close(mixed[name][k], p.grad, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_uniform_batch_uses_plain_path_and_rows_reset():
    model = with_adapters(tiny_llama(), SPECS)
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(4))
    with adapter_rows(model, ["b", "b"]):
        got = model(ids).logits
    torch.testing.assert_close(got, alone(model, "b", ids))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.row_adapters is None and layer._routed is None


def _check_rows(model, rows, seq, seed):
    ids = torch.randint(0, 128, (len(rows), seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), adapter_rows(model, rows):
        mixed = model(ids).logits
    with torch.no_grad():
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i], alone(model, name, ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)
    return mixed


@pytest.mark.slow
@pytest.mark.parametrize("seq", [5, 1])
def test_stacks_survive_routing_changes_and_follow_weight_changes(seq):
    # inference keeps one stack of every adapter per linear layer across routings; it must be rebuilt
    # exactly when an adapter's weights change (in place, training step, merge of the base under
    # DoRA, delete, re-add) and never serve stale weights
    specs = {**SPECS, "d": {"r": 4, "lora_alpha": 8, "use_dora": True}}
    model = with_adapters(tiny_llama(), specs).eval()
    layer = model.model.layers[0].self_attn.q_proj
    _check_rows(model, ["a", "b", None, "d"], seq, 0)
    built = layer._stacks[3]
    _check_rows(model, ["d", "a", "a", "b", None], seq, 1)  # other rows, same weights: no rebuild
    assert layer._stacks[3] is built
    _check_rows(model, ["c", "b"], seq, 2)  # 5 slots for 2 rows: per-row gather, still the same stack
    assert layer._stacks[3] is built

    before = _check_rows(model, ["a", "b", "d"], seq, 3)
    with torch.no_grad():  # in place, as a load into existing tensors does
        for p in lorakit.io.adapter_state_dict(model, "b").values():
            p.mul_(-1.5)
    after = _check_rows(model, ["a", "b", "d"], seq, 3)
    assert not torch.allclose(before[1], after[1], atol=1e-3)
    torch.testing.assert_close(before[0], after[0])

    lorakit.set_adapter(model, ["a", "d"])  # one optimizer step on a and d (d: DoRA magnitude too)
    model.train()
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(5))
    with adapter_rows(model, ["a", "d"]):
        model(ids).logits.pow(2).mean().backward()
    params = [p for n in ("a", "d") for p in lorakit.io.adapter_state_dict(model, n).values()]
    torch.optim.SGD(params, lr=1.0).step()
    model.eval()
    _check_rows(model, ["a", "b", "d", None], seq, 4)

    lorakit.set_adapter(model, "a")  # merging a changes the base weight, so d's DoRA factor
    lorakit.merge(model)
    with torch.no_grad():
        for key, p in lorakit.io.adapter_state_dict(model, "a").items():
            if "lora_A" in key:
                p.zero_()
    lorakit.unmerge(model)  # the base is back (to rounding) but a's A is now zero: the stacks must see both
    _check_rows(model, ["a", "d", "b"], seq, 6)

    stacks = [t for t in layer._stacks[3] if t is not None]
    assert sum(t.nbytes for t in stacks) == layer.stack_nbytes()  # ranks 2-8 and DoRA: what is built

    lorakit.delete_adapter(model, "c")
    assert layer._stacks is None
    _check_rows(model, ["a", "b", None], seq, 7)
    with_adapters(model, {"c": {"r": 6, "lora_alpha": 3}})  # same name again, new weights and rank
    _check_rows(model, ["c", "a", "c", "d"], seq, 8)


def test_errors():
    model = with_adapters(tiny_llama(), SPECS)
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        with adapter_rows(model, ["a", "nope"]):
            pass
    with pytest.raises(ShapeMismatchError, match="one adapter name"):
        with torch.no_grad(), adapter_rows(model, ["a", "b"]):
            model(torch.zeros(3, 4, dtype=torch.long))
    lorakit.merge(model, "a")
    with pytest.raises(AdapterStateError, match="unmerge"):
        with adapter_rows(model, ["a", "b"]):
            pass
    lorakit.unmerge(model)
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["embed_tokens"]), "emb")
    with adapter_rows(model, ["a", None]):  # the embedding adapter is not used: fine
        pass


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_add_weighted_adapter_matches_peft(tmp_path, combination):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
        "x",
    )
    second = {"r": 4 if combination == "linear" else 8, "lora_alpha": 3, "init_lora_weights": False}
    pm.add_adapter("y", peft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **second))
    pm.save_pretrained(tmp_path)
    for name in ("x", "y"):
        lorakit.load_adapter(base, tmp_path / name, name)
    weights = [0.7, -1.3]
    pm.add_weighted_adapter(["x", "y"], weights, "mix", combination_type=combination)
    lorakit.add_weighted_adapter(base, ["x", "y"], weights, "mix", combination_type=combination)
    pm.set_adapter("mix")
    lorakit.set_adapter(base, "mix")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    layer = base.model.layers[1].mlp.down_proj
    if combination == "cat":  # exact: the delta is the weighted sum of the deltas
        expected = sum(w * layer.delta_weight(a) for a, w in zip(["x", "y"], weights))
        torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-6, rtol=1e-5)
    lorakit.save_adapter(base, tmp_path / "out", "mix")  # round-trips as a normal adapter
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # one adapter: the folder named


def test_add_weighted_adapter_errors():
    model = with_adapters(tiny_llama(), SPECS)
    add = lorakit.add_weighted_adapter
    with pytest.raises(ConfigError, match="equal rank"):
        add(model, ["a", "b"], [1.0, 1.0], "m")
    with pytest.raises(ConfigError, match="one weight per adapter"):
        add(model, ["a", "b"], [1.0], "m", "cat")
    with pytest.raises(ConfigError, match="combination_type"):
        add(model, ["a", "b"], [1.0, 1.0], "m", "svd")
    with pytest.raises(AdapterStateError, match="already has"):
        add(model, ["a", "b"], [1.0, 1.0], "c", "cat")
    with pytest.raises(AdapterStateError, match="unknown"):
        add(model, ["a", "zz"], [1.0, 1.0], "m", "cat")
    assert lorakit.list_adapters(model) == ["a", "b", "c"]  # nothing half-added


@torch.no_grad()
def test_embedding_adapters_work_in_mixed_batches_and_generation():
    """Issue 11: an adapter on embed_tokens failed in `lorakit generate` ("linear layers only")."""
    model = tiny_llama()
    for name, targets in {"emb": ["embed_tokens", "q_proj"], "e2": ["embed_tokens"]}.items():
        lorakit.inject(model, lorakit.LoraConfig(target_modules=targets, init_lora_weights=False), name)
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(6))
    rows = ["emb", None, "e2", "emb"]
    with adapter_rows(model, rows):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone(model, name, ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)
    rows_of = [Row(ids[i].tolist(), name, Sampling(max_tokens=4)) for i, name in enumerate(rows)]
    batch = [[t for _, t, _ in generate_tokens(model, [r], eos=set()) if t is not None] for r in rows_of]
    together: dict[int, list[int]] = {}
    for i, token, _ in generate_tokens(model, rows_of, eos=set()):
        if token is not None:
            together.setdefault(i, []).append(token)
    assert [together[i] for i in range(4)] == batch


@torch.no_grad()
def test_modules_to_save_copies_serve_mixed_batches_row_by_row():
    model = lorakit.inject(
        tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "h"
    )
    lorakit.inject(
        model, lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), "e"
    )
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]), "p")
    model.lm_head.modules_to_save["h"].weight.mul_(2)
    model.model.embed_tokens.modules_to_save["e"].weight.add_(0.5)
    ids = torch.randint(0, 128, (5, 4), generator=torch.Generator().manual_seed(8))
    rows = ["h", "p", None, "e", "h"]
    with adapter_rows(model, rows):
        got = model(ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], alone(model, name, ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)
    with adapter_rows(model, ["h", "h"]):  # uniform: the copy itself, the plain path
        torch.testing.assert_close(model(ids[:2]).logits, alone(model, "h", ids[:2]))
    lorakit.set_adapter(model, "h")
    assert model.lm_head.current() is model.lm_head.modules_to_save["h"]  # routing undone


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["conv", "gpt2-conv1d"])
def test_conv_and_gpt2_models_in_mixed_batches_equal_each_row_alone(kind):
    model = _ConvNet() if kind == "conv" else tiny_gpt2()
    targets = ["conv1", "conv2"] if kind == "conv" else ["c_attn", "c_fc", "wte"]
    for name, r in (("p", 2), ("q", 3)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, target_modules=targets, init_lora_weights=False), name)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 10, generator=g) if kind == "conv" else torch.randint(0, 100, (4, 6), generator=g)
    run = (lambda m, x: m(x)) if kind == "conv" else (lambda m, x: m(input_ids=x).logits)
    rows = ["q", None, "p", "q"]
    with adapter_rows(model, rows):
        mixed = run(model, x)
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                ref = run(model, x[i : i + 1])
        else:
            lorakit.set_adapter(model, name)
            ref = run(model, x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tokens_of_one_sequence_routed_like_rows_of_one_token():
    """`tokens=True`: token i of a [1, N, ...] input gets adapter i, exactly as row i of the same
    tokens laid out as [N, 1, ...]; linear (plain, DoRA), embedding and per-token modules_to_save."""
    model = with_adapters(tiny_llama(), SPECS)
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "o_proj"], use_dora=False), "e"
    )
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "d")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["norm"]), "m")
    g = torch.Generator().manual_seed(7)
    for name in ("e", "d", "m"):
        for p in lorakit.io.adapter_state_dict(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    names = ["a", "a", "e", None, "d", "m", "c", "c"]
    wrappers = dict(lorakit._state.named_wrappers(model))
    assert lorakit.mixed.per_token_blocker(model) is None
    for path in (
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.norm",
    ):
        layer = wrappers[path]
        dim = getattr(layer, "in_features", model.config.hidden_size)
        x = (
            torch.randint(0, 128, (1, 8), generator=g)
            if "embed" in path
            else torch.randn(1, 8, dim, generator=g)
        )
        layer.route_rows(Routing(names, tokens=True))
        packed = layer(x)
        layer.route_rows(Routing(names))
        rows = layer(x.reshape(8, 1, *x.shape[2:]))
        layer.route_rows(None)
        torch.testing.assert_close(packed, rows.reshape(packed.shape), atol=1e-6, rtol=1e-6)
    with adapter_rows(model, names, tokens=True), pytest.raises(ShapeMismatchError, match="per token"):
        model(torch.zeros(2, 4, dtype=torch.long))  # two sequences: not a packed one


@torch.no_grad()
def test_layers_that_mix_tokens_refuse_per_token_routing():
    model = _ConvNet()
    for name in ("a", "b"):
        lorakit.inject(
            model, lorakit.LoraConfig(r=2, target_modules=["conv1"], init_lora_weights=False), name
        )
    assert lorakit.mixed.per_token_blocker(model) == "conv1 (LoraConv)"
    with adapter_rows(model, ["a", "b", "a"], tokens=True), pytest.raises(ConfigError, match="per token"):
        model.conv1(torch.randn(1, 3, 3))
    with adapter_rows(model, ["a", "a", "a"], tokens=True):  # one adapter for all: fine
        model.conv1(torch.randn(1, 3, 3))
