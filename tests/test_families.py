"""Every model family people fine-tune, each a tiny random model, checked against PEFT.

For each family: `"all-linear"` wraps exactly the modules PEFT wraps; lorakit's adapter loaded in
PEFT, and PEFT's loaded in lorakit, give the same logits (< 1e-5 in fp32; adapters with random
nonzero A and B); merging keeps the logits; `unload` gives back the original model (class and
logits); one training step changes the adapter.
"""

import peft
import pytest
import torch
import transformers as T

import lorakit
from lorakit.inject import lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

LM, CLS, S2S, IMAGE = "lm", "cls", "s2s", "image"
VOCAB = 64
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)
ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=32,
    num_labels=3,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# family -> (model class, config class, config kwargs, input kind)
FAMILIES = {
    "llama": (T.LlamaForCausalLM, T.LlamaConfig, DECODER, LM),
    "mistral": (T.MistralForCausalLM, T.MistralConfig, DECODER, LM),
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, DECODER, LM),
    "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config, {**DECODER, "head_dim": 8}, LM),
    "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config, {**DECODER, "head_dim": 8}, LM),
    "gemma3-text": (T.Gemma3ForCausalLM, T.Gemma3TextConfig, {**DECODER, "head_dim": 8}, LM),
    "phi3": (T.Phi3ForCausalLM, T.Phi3Config, {**DECODER, "pad_token_id": 0}, LM),
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config, dict(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2), LM),
    "gpt-neox": (
        T.GPTNeoXForCausalLM,
        T.GPTNeoXConfig,
        {**DECODER, "num_key_value_heads": None},
        LM,
    ),
    "opt": (
        T.OPTForCausalLM,
        T.OPTConfig,
        dict(vocab_size=VOCAB, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2),
        LM,
    ),
    "falcon": (
        T.FalconForCausalLM,
        T.FalconConfig,
        dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        LM,
    ),
    "bert": (T.BertForSequenceClassification, T.BertConfig, ENCODER, CLS),
    "roberta": (T.RobertaForSequenceClassification, T.RobertaConfig, {**ENCODER, "pad_token_id": 1}, CLS),
    "deberta-v2": (T.DebertaV2ForSequenceClassification, T.DebertaV2Config, ENCODER, CLS),
    "t5": (
        T.T5ForConditionalGeneration,
        T.T5Config,
        dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2),
        S2S,
    ),
    "bart": (
        T.BartForConditionalGeneration,
        T.BartConfig,
        dict(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=24,
            decoder_ffn_dim=24,
            max_position_embeddings=32,
        ),
        S2S,
    ),
    "mixtral": (T.MixtralForCausalLM, T.MixtralConfig, {**DECODER, **MOE}, LM),
    "qwen3-moe": (
        T.Qwen3MoeForCausalLM,
        T.Qwen3MoeConfig,
        {**DECODER, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 12},
        LM,
    ),
    "vit": (
        T.ViTForImageClassification,
        T.ViTConfig,
        dict(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
            num_labels=3,
        ),
        IMAGE,
    ),
}


def make(family: str) -> torch.nn.Module:
    cls, config_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return cls(config_cls(**kwargs)).eval()


def config_kwargs(family: str) -> dict:
    kw = dict(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    if FAMILIES[family][3] in (CLS, IMAGE):  # PEFT trains the new head as a full copy
        kw |= dict(task_type="SEQ_CLS", modules_to_save=["classifier"])
    return kw


def inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    kind = FAMILIES[family][3]
    if kind == IMAGE:
        return dict(pixel_values=torch.randn(2, 3, 8, 8, generator=g))
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    if kind == S2S:
        return dict(input_ids=ids, decoder_input_ids=torch.randint(2, VOCAB, (2, 5), generator=g))
    return dict(input_ids=ids)


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def peft_wrapped(model) -> set[str]:
    return {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }


def perturb_heads(model) -> None:
    """Make the trained head copies differ from the base heads, so saving or loading them counts."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def test_all_linear_wraps_what_peft_wraps(family):
    ours = {
        n for n, _ in lora_layers(lorakit.inject(make(family), lorakit.LoraConfig(**config_kwargs(family))))
    }
    theirs = peft_wrapped(peft.get_peft_model(make(family), peft.LoraConfig(**config_kwargs(family))))
    assert ours == theirs and ours


def test_lorakit_adapter_in_peft_and_back(family, tmp_path):
    x = inputs(family)
    model = lorakit.inject(make(family), lorakit.LoraConfig(**config_kwargs(family)))
    perturb_heads(model)
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(make(family), x), atol=1e-4)  # the adapter does something
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(family), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, x), expected, atol=1e-5, rtol=0)

    reference = peft.get_peft_model(make(family), peft.LoraConfig(**config_kwargs(family))).eval()
    perturb_heads(reference)
    reference.save_pretrained(tmp_path / "peft")
    loaded = lorakit.load_adapter(make(family), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, x), logits(reference, x), atol=1e-5, rtol=0)


def test_merge_keeps_logits_and_unload_gives_back_the_model(family):
    x = inputs(family)
    base = logits(make(family), x)
    model = lorakit.inject(make(family), lorakit.LoraConfig(**config_kwargs(family)))
    adapted = logits(model, x)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    plain = lorakit.unload(model, merge=False)
    assert type(plain) is FAMILIES[family][0] and not list(lora_layers(plain))
    assert [type(m) for m in plain.modules()] == [type(m) for m in make(family).modules()]
    torch.testing.assert_close(logits(plain, x), base, atol=1e-5, rtol=1e-5)


def test_one_training_step_moves_the_adapter(family):
    model = lorakit.inject(make(family), lorakit.LoraConfig(**config_kwargs(family))).train()
    x = inputs(family)
    kind = FAMILIES[family][3]
    if kind in (CLS, IMAGE):
        labels = torch.tensor([0, 2])
    else:
        labels = x["decoder_input_ids"] if kind == S2S else x["input_ids"]
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**x, labels=labels).loss
    loss.backward()
    optim.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert torch.isfinite(loss) and any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
