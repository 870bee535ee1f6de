"""lorakit.serve.packed: several sequences' new tokens in one forward give what each gives alone
(prompt chunks after earlier chunks, decode tokens, different adapters per token, GQA, sliding
windows); forwards without a pack are the model's own; models whose attention it cannot pack are
refused by name."""

import pytest
import torch
from fixtures import TINY_FAMILY_SHAPE, tiny_family, tiny_llama

import lorakit
from lorakit.errors import ConfigError
from lorakit.mixed import adapter_rows
from lorakit.serve import packed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_adapters(model, names=("a", "b")):
    for i, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(r=4 + 2 * i, lora_alpha=8, target_modules=TARGETS), name)
        g = torch.Generator().manual_seed(50 + i)
        with torch.no_grad():
            for p in lorakit.io.adapter_state_dict(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def alone(model, ids, adapter):
    """Last-position logits of `ids` run alone with `adapter` (None: the base)."""
    with adapter_rows(model, [adapter]):
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]


def packed_step(model, kv, seqs):
    """One packed forward; `seqs`: (slot, past, new tokens, adapter). Logits at each part's last token."""
    ids, positions, names, parts = [], [], [], []
    for slot, past, tokens, adapter in seqs:
        parts.append(packed.Part(slot, len(ids), len(tokens), past))
        ids += tokens
        positions += range(past, past + len(tokens))
        names += [adapter] * len(tokens)
    keep = torch.tensor([p.start + p.length - 1 for p in parts])
    with adapter_rows(model, names, tokens=True):
        out = model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.tensor([positions]),
            use_cache=False,
            logits_to_keep=keep,
            **{packed.PACK: packed.Pack(kv, parts)},
        )
    return out.logits[0]


@torch.no_grad()
@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 5)])
def test_packed_steps_equal_each_sequence_alone(family, window):
    model = with_adapters(tiny_family(family, **({"sliding_window": window} if window else {})))
    packed.use_packed(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (11, 4, 7)]
    adapters = ["a", None, "b"]
    kv = packed.KvSlots(4)
    slots = [kv.take() for _ in prompts]
    # step 1: the first prompt's first chunk (6 tokens), the second prompt whole
    got = packed_step(model, kv, [(slots[0], 0, prompts[0][:6], "a"), (slots[1], 0, prompts[1], None)])
    torch.testing.assert_close(got[1], alone(model, prompts[1], None), atol=1e-5, rtol=1e-5)
    # step 2: the first prompt's rest (past 6: chunk attends to the earlier chunk), a decode token
    # for the second, the third prompt whole
    seqs = [prompts[0], prompts[1] + [9], prompts[2]]
    got = packed_step(
        model,
        kv,
        [(slots[0], 6, prompts[0][6:], "a"), (slots[1], 4, [9], None), (slots[2], 0, prompts[2], "b")],
    )
    for i in range(3):
        torch.testing.assert_close(got[i], alone(model, seqs[i], adapters[i]), atol=1e-5, rtol=1e-5)
    # step 3: a decode token for each, longer than the window now
    got = packed_step(model, kv, [(slots[i], len(seqs[i]), [3 + i], adapters[i]) for i in range(3)])
    for i in range(3):
        want = alone(model, seqs[i] + [3 + i], adapters[i])
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], alone(model, seqs[0] + [3], "b"), atol=1e-3)  # adapters differ


def test_mask_is_causal_after_the_past_and_inside_the_window():
    assert packed._mask(0, 5, None) is None  # SDPA's own
    m = packed._mask(3, 2, None)
    assert m.tolist() == [[True] * 4 + [False], [True] * 5]
    w = packed._mask(3, 2, 2)  # query at position 3 sees 2..3, at 4 sees 3..4
    assert w.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_unpacked_forwards_unchanged_padding_included(implementation):
    model = tiny_llama(attn_implementation=implementation)
    assert model.config._attn_implementation == implementation
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    before = model(input_ids=ids, attention_mask=mask).logits
    packed.use_packed(model)  # (its check: packed steps equal this implementation's forwards)
    assert model.config._attn_implementation == f"lorakit_packed_{implementation}"
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)
    packed.use_packed(model)  # a second engine on the same model: still the one wrapper
    assert model.config._attn_implementation == f"lorakit_packed_{implementation}"


def test_attention_it_cannot_pack_is_refused():
    import transformers

    config = transformers.Gemma2Config(**TINY_FAMILY_SHAPE, attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(config).eval()  # attention logit soft-capping
    with pytest.raises(ConfigError, match="--batching static"):
        packed.use_packed(model)
    assert model.config._attn_implementation == "eager"  # refused: the model keeps its attention
    falcon = transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96
    )
    model = transformers.FalconForCausalLM(falcon).eval()  # attention outside the interface
    with pytest.raises(ConfigError, match="differs from its plain one"):
        packed.use_packed(model)
    assert model.config._attn_implementation == "sdpa"


def test_slots_lowest_first_grow_keeping_keys_and_free_when_empty():
    kv = packed.KvSlots(3)
    assert [kv.take(), kv.take()] == [0, 1]
    kv.reserve(10)
    keys, values = kv.buffers(0, torch.zeros(1, 2, 1, 4))
    assert keys.shape == (3, 2, 64, 4)  # at least 64 tokens
    keys[1, :, 63] = 7.0
    kv.reserve(65)  # doubles, keeping what was written
    grown, _ = kv.buffers(0, torch.zeros(1, 2, 1, 4))
    assert grown.shape == (3, 2, 128, 4) and bool((grown[1, :, 63] == 7).all())
    kv.give(0)
    assert kv.take() == 0  # the lowest free slot: busy slots stay at the front
    kv.give(0)
    kv.give(1)
    assert kv.capacity == 0 and not kv.layers  # all free: the memory goes too


TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3", "gpt_neox", "opt", "gpt2"]
)
def test_families_run_packed(family):
    """Every family whose attention goes through transformers' attention functions passes the
    check `use_packed` makes (packed steps equal to the plain model, logits within 1e-3)."""
    import transformers

    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        model = tiny_family(family)
    elif family == "gemma3":  # sliding-window and global layers
        model = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(**TINY_FAMILY_SHAPE, sliding_window=4)
        )
    elif family == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY, pad_token_id=0))
    elif family == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**TINY))
    elif family == "opt":
        config = transformers.OPTConfig(
            hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=96
        )
        model = transformers.OPTForCausalLM(config)
    else:
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96)
        )
    packed.use_packed(model.eval())
    assert model.config._attn_implementation.startswith("lorakit_packed_")
