"""`lorakit plan`: parameter counts against the LoRA paper's formula, byte counts against real
tensors (inject on a real model, AdamW state, bitsandbytes' NF4), the meta activation trace against
a real CPU forward, the step simulation against hand-computed values, the budget search, the CLI."""

import contextlib
import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError, TargetNotFoundError
from lorakit.inject import lora_layers
from lorakit.plan import PlanSetup, compare, estimate, nf4_bytes, parse_size, recommend
from lorakit.plan.estimate import activation_trace
from lorakit.plan.memory import optimizer_state_bytes, step_memory
from lorakit.plan.trace import ActivationTrace

LLAMA = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def llama_json(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    LlamaConfig(**LLAMA).save_pretrained(folder)
    return str(folder / "config.json")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    # no attention dropout: with it PyTorch's CPU SDPA falls back to the math kernel, which keeps the
    # probabilities (a GPU's fused kernels do not)
    GPT2Config(
        n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=32, attn_pdrop=0.0
    ).save_pretrained(folder)
    return str(folder)


def _real_model(path: str, method: str, r: int = 4, targets="all-linear", dtype=torch.float32):
    torch.manual_seed(0)
    config = lorakit.plan.models.load_config(path)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).train()
    if method != "full":
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=r, target_modules=targets))
    return model


# --- the LoRA paper (GPT-3 175B) ------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt3():
    def run(r, **kw):
        setup = PlanSetup(
            model="gpt3-175b", method="lora", r=r, target_modules=("q_proj", "v_proj"), seq_len=8,
            dtype="float16", adapter_dtype="float16", **kw,
        )  # fmt: skip
        return estimate(setup, memory=False)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("r, paper", [(1, "4.7M"), (4, "18.9M"), (8, "37.7M")])
def test_gpt3_trainable_parameters_match_the_paper(gpt3, r, paper):
    est = gpt3(r)
    formula = 96 * 2 * r * (12288 + 12288)  # layers x (W_q, W_v) x r x (d_in + d_out)
    assert est.trainable_params == formula
    assert f"{est.trainable_params / 1e6:.1f}M" == paper
    assert len(est.targets) == 192


@pytest.mark.slow
def test_gpt3_sizes_and_the_10000x_reductions(gpt3):
    est = gpt3(4)
    base = est.total_params - est.trainable_params
    assert abs(base - 175e9) / 175e9 < 0.003  # 174.58B: GPT-3's learned positions are not modelled
    assert 37.7e6 < est.adapter_bytes < 38.0e6  # ~38 MB (18,874,368 x 2 bytes + header)
    assert 349e9 < est.checkpoint_bytes < 350e9  # ~350 GB in fp16
    assert 9000 < est.checkpoint_bytes / est.adapter_bytes < 10000
    assert 9000 < base / est.trainable_params < 10000


# --- counts and bytes against real tensors -----------------------------------------------------


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
def test_parameter_counts_equal_inject_on_a_real_model(llama_json, targets):
    est = estimate(PlanSetup(model=llama_json, r=4, target_modules=targets, seq_len=8, dtype="float32"))
    real = _real_model(llama_json, "lora", 4, list(targets) if isinstance(targets, tuple) else targets)
    assert (est.trainable_params, est.total_params) == lorakit.trainable_parameters(real)
    assert est.targets == [n for n, _ in lora_layers(real)]


def test_gradient_and_adamw_state_bytes_equal_a_real_step(llama_json):
    setup = PlanSetup(model=llama_json, method="full", batch_size=2, seq_len=8, dtype="float32", device="cpu")
    est = estimate(setup)
    model = _real_model(llama_json, "full")
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert est.memory.gradients == grads
    assert est.memory.optimizer == state
    assert est.memory.weights == sum(p.numel() * p.element_size() for p in model.parameters())


def test_qlora_nf4_bytes_are_what_lorakit_quant_stores(llama_json):
    """plan asks quant what gets quantized: its NF4 bytes are the buffers quantize_model makes."""
    from lorakit.quant import Linear4bit, quantize_model

    est = estimate(PlanSetup(model=llama_json, method="qlora", seq_len=8, dtype="float32"), memory=False)
    model = quantize_model(_real_model(llama_json, "full"))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    buffers = [b for m in layers for b in (m.weight, m.absmax, m.nested_absmax) if b is not None]
    offsets = 4 * sum(m.double_quant for m in layers)  # the fp32 offset of each layer's nested scales
    stored = sum(b.numel() * b.element_size() for b in buffers) + offsets
    assert est.weights_by_dtype["nf4 (with scales)"] == stored


def test_qlora_weights_are_nf4_except_embeddings_norms_and_head(llama_json):
    est = estimate(PlanSetup(model=llama_json, method="qlora", seq_len=8, dtype="bfloat16"))
    model = _real_model(llama_json, "full")
    linears = [
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    assert est.weights_by_dtype["nf4 (with scales)"] == sum(nf4_bytes(n) for n in linears)
    rest = sum(p.numel() for p in model.parameters()) - sum(linears)
    assert est.weights_by_dtype["bfloat16"] == 2 * rest
    assert est.adapter_bytes is not None and est.memory.peak < compare(est.setup)["lora"].memory.peak


def test_adapter_file_size_matches_save_adapter(llama_json, tmp_path):
    est = estimate(
        PlanSetup(model=llama_json, r=4, target_modules=("q_proj", "v_proj"), seq_len=8, dtype="float32")
    )
    model = _real_model(llama_json, "lora", 4, ["q_proj", "v_proj"])
    lorakit.save_adapter(model, tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert abs(est.adapter_bytes - size) < 200  # tensor bytes exact; the header's metadata may differ


# --- activations: the meta trace against a real forward ------------------------------------------


def _real_saved_bytes(model, batch, seq):
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 100, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    return sum(seen.values()), out.logits


@pytest.mark.parametrize(
    "which, method, dtype",
    [
        ("llama", "full", "float32"),
        ("llama", "lora", "float32"),
        ("gpt2", "full", "float32"),
        ("gpt2", "lora", "float32"),
        ("llama", "full", "bfloat16"),
        ("llama", "lora", "bfloat16"),  # fp32 adapters: each target keeps an fp32 copy of its input
    ],
)
def test_meta_trace_equals_what_a_real_cpu_forward_keeps(llama_json, gpt2_dir, which, method, dtype):
    path = llama_json if which == "llama" else gpt2_dir
    setup = PlanSetup(model=path, method=method, r=4, batch_size=2, seq_len=16, dtype=dtype)
    trace = activation_trace(setup)
    model = _real_model(path, method, dtype=getattr(torch, dtype))
    saved, logits = _real_saved_bytes(model, 2, 16)
    assert trace.total == saved
    assert trace.logits == logits.numel() * logits.element_size()


def test_eager_attention_keeps_the_probability_matrices(llama_json):
    kw = dict(model=llama_json, batch_size=2, seq_len=16, dtype="float32")
    sdpa, eager = activation_trace(PlanSetup(**kw)), activation_trace(PlanSetup(**kw, attention="eager"))
    probs = 2 * 4 * 16 * 16 * 4  # batch x heads x seq x seq, fp32, per layer
    assert eager.total - sdpa.total >= 3 * probs


def test_checkpointing_lowers_the_peak_and_batch_raises_it(llama_json):
    kw = dict(model=llama_json, method="lora", seq_len=32, dtype="float32")
    base = estimate(PlanSetup(**kw, batch_size=2)).memory
    ckpt = estimate(PlanSetup(**kw, batch_size=2, gradient_checkpointing=True)).memory
    big = estimate(PlanSetup(**kw, batch_size=4)).memory
    assert ckpt.activations < base.activations and ckpt.peak < base.peak
    assert big.peak > base.peak and big.weights == base.weights


# --- the step simulation, by hand ---------------------------------------------------------------


def _trace():
    return ActivationTrace(layers=[100, 100], before=10, after=50, layer_input=20, logits=40, loss_grad=40,
                           largest_layer_tensor=30)  # fmt: skip


def test_step_memory_lora_peaks_at_the_loss_backward():
    m = step_memory(weights=1000, layer_grads=[1, 1], other_grads=0, optimizer=4, largest_trainable=1,
                    trace=_trace(), gradient_checkpointing=False, logits_upcast=False, device="cpu")  # fmt: skip
    # kept = 10 + 200 + 50; start of backward: + 2 x 40 loss gradients
    assert (m.activations, m.peak, m.peak_phase) == (260, 1000 + 4 + 260 + 80, "backward")
    ck = step_memory(weights=1000, layer_grads=[1, 1], other_grads=0, optimizer=4, largest_trainable=1,
                     trace=_trace(), gradient_checkpointing=True, logits_upcast=False, device="cpu")  # fmt: skip
    # kept = 10 + 2 x 20 + 50; the peak is the last layer's recompute: the inputs kept before it
    # (10 + 20), the layer again (100) with its own input (20), its gradients (1) and the backward
    # workspace (2 x 20 + 2 x 30), above the loss backward (1004 + 100 + 80)
    assert (ck.activations, ck.peak) == (100, 1004 + 10 + 20 + 100 + 20 + 1 + 100)


def test_step_memory_full_peaks_at_the_update():
    m = step_memory(weights=1000, layer_grads=[400, 400], other_grads=200, optimizer=2000, largest_trainable=300,
                    trace=_trace(), gradient_checkpointing=False, logits_upcast=False, device="cuda")  # fmt: skip
    assert (m.peak_phase, m.peak) == ("optimizer step", 1000 + 2000 + 1000 + 1000)
    cpu = step_memory(weights=1000, layer_grads=[400, 400], other_grads=200, optimizer=2000, largest_trainable=300,
                      trace=_trace(), gradient_checkpointing=False, logits_upcast=False, device="cpu")  # fmt: skip
    assert cpu.peak == 1000 + 2000 + 1000 + 2 * 300


def test_optimizer_state_bytes():
    assert optimizer_state_bytes("adamw", 1000, 4000) == 8000
    assert optimizer_state_bytes("adamw8bit", 1024, 4096) == 2048 + 8 * 4
    assert optimizer_state_bytes("sgd", 1000, 4000) == 0


# --- budget ----------------------------------------------------------------------------------------


def test_parse_size():
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5 MiB") == 3 * 2**19
    for bad in ("lots", "8 parsecs", "-1GB", ""):
        with pytest.raises(ConfigError, match="not a size"):
            parse_size(bad)
    for huge in ("9" * 400, "99999999999TiB"):  # was a raw OverflowError (int of inf)
        with pytest.raises(ConfigError, match="too large"):
            parse_size(huge)


def test_recommend_keeps_what_fits_and_changes_what_must(llama_json):
    setup = PlanSetup(model=llama_json, method="full", batch_size=4, seq_len=32, dtype="float32")
    est = compare(setup)
    roomy = recommend(setup, est["full"].memory.peak)
    assert roomy.setup == setup and roomy.reason == "the setup as asked fits"
    tight = recommend(setup, est["full"].memory.peak - 1)
    assert tight.setup != setup and tight.estimate.memory.peak < est["full"].memory.peak
    assert "changed" in tight.reason


def test_recommend_says_why_nothing_fits(llama_json):
    setup = PlanSetup(model=llama_json, method="lora", batch_size=2, seq_len=32, dtype="float32")
    rec = recommend(setup, 1000)
    assert rec.setup is None
    assert "nothing fits" in rec.reason and "qlora" in rec.reason and "weights alone" in rec.reason


# --- bad input --------------------------------------------------------------------------------------


def test_bad_inputs_raise_lorakit_errors(tmp_path, llama_json):
    with pytest.raises(ConfigError, match="not found"):
        estimate(PlanSetup(model=str(tmp_path / "nope")))
    (tmp_path / "c.json").write_text('{"hidden_size": 3}')
    with pytest.raises(ConfigError, match="model_type"):
        estimate(PlanSetup(model=str(tmp_path / "c.json")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        estimate(PlanSetup(model=str(tmp_path / "bad.json")))
    with pytest.raises(TargetNotFoundError, match="q_proj"):
        estimate(PlanSetup(model=llama_json, target_modules=("query",), seq_len=8))
    for bad in (
        dict(method="dora"),
        dict(r=0),
        dict(dtype="int8"),
        dict(batch_size=-1),
        dict(optimizer="lion"),
        dict(task="translation"),
    ):
        with pytest.raises(ConfigError):
            PlanSetup(model=llama_json, **bad)


# --- CLI -----------------------------------------------------------------------------------------


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_table_and_json(llama_json):
    argv = [
        "plan",
        "--model",
        llama_json,
        "--r",
        "4",
        "--target-modules",
        "q_proj",
        "v_proj",
        "--seq-len",
        "16",
    ]
    rc, out, _ = _cli(argv)
    assert rc == 0
    assert (
        "predicted peak" in out and "trainable: 2,688" in out
    )  # 3 layers x (q: 4x64 + 64x4, v: 4x64 + 32x4)
    rc, out, _ = _cli([*argv, "--json", "--budget", "1GiB"])
    data = json.loads(out)
    assert rc == 0 and data["plan"]["setup"]["target_modules"] == ["q_proj", "v_proj"]
    assert set(data["methods"]) == {"full", "lora", "qlora"}
    assert data["recommendation"]["fits"] is True
    assert "--trim-heap" not in _cli(argv)[1]  # the CPU note only on CPU
    rc, out, _ = _cli([*argv, "--device", "cpu", "--budget", "1GiB"])
    assert rc == 0 and "lorakit train --trim-heap" in out and "train with --trim-heap to stay near" in out
    assert (
        data["plan"]["trainable_params"]
        == estimate(
            PlanSetup(model=llama_json, r=4, target_modules=("q_proj", "v_proj"), seq_len=16)
        ).trainable_params
    )


def test_cli_errors(llama_json, tmp_path):
    rc, _, err = _cli(["plan", "--model", str(tmp_path / "missing")])
    assert rc == 1 and "not found" in err
    rc, _, err = _cli(["plan", "--model", llama_json, "--budget", "many"])
    assert rc == 1 and "not a size" in err
    rc, out, _ = _cli(["plan", "--model", llama_json, "--seq-len", "16", "--budget", "1KiB"])
    assert rc == 3 and "nothing fits" in out


# --- MoE experts (target_parameters) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "params", [(), ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")]
)
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_moe_trainable_counts_match_peft(tmp_path, params, targets):
    import peft
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(config.to_json_string())
    plan = estimate(
        PlanSetup(model=str(tmp_path / "config.json"), r=2, target_modules=targets, target_parameters=params),
        memory=False,
    )
    kw = dict(r=2, target_modules=list(targets) if isinstance(targets, tuple) else targets)
    reference = peft.get_peft_model(
        MixtralForCausalLM(config), peft.LoraConfig(**kw, target_parameters=params or None)
    )
    assert (plan.trainable_params, plan.total_params) == reference.get_nb_trainable_parameters()
    with_experts = bool(params) or targets == "all-linear"
    assert any(".experts." in t for t in plan.targets) == with_experts


def test_dora_counts_its_magnitude_vectors_as_peft_does(llama_json, tmp_path):
    import peft

    setup = PlanSetup(model=llama_json, r=4, use_dora=True, seq_len=8)
    est = estimate(setup, memory=False)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert est.trainable_params == theirs.get_nb_trainable_parameters()[0]
    plain = estimate(PlanSetup(model=llama_json, r=4, seq_len=8), memory=False)
    magnitudes = sum(
        m.out_features
        for _, m in lora_layers(
            lorakit.inject(
                AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA)),
                lorakit.LoraConfig(target_modules="all-linear"),
            )
        )
    )
    assert est.trainable_params - plain.trainable_params == magnitudes
    assert est.adapter_bytes - plain.adapter_bytes >= 4 * magnitudes


def test_fsdp_divides_what_fully_shard_shards_by_hand(llama_json):
    """`--fsdp 2` per process: half of every weight, gradient and AdamW moment, plus half (the part
    not already local) of what FSDP2 gathers whole for compute: the root group and two decoder
    layers. Counted by hand on a real model with the same LoRA; NF4 codes shard, their scales (buffers) do not."""
    from lorakit.quant import quantized_weights

    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    total = nbytes(model.parameters())
    layers = sorted(nbytes(layer.parameters()) for layer in model.model.layers)
    root = total - sum(layers)
    kw = dict(model=llama_json, r=4, seq_len=8, dtype="float32")
    one, two = estimate(PlanSetup(**kw)).memory, estimate(PlanSetup(**kw, fsdp=2)).memory
    assert one.weights == total
    assert two.weights == -(-total // 2) + (root + layers[-1] + layers[-2]) // 2
    assert two.gradients == -(-one.gradients // 2) and two.optimizer == one.optimizer // 2
    assert two.activations == one.activations and two.peak < one.peak
    # QLoRA: the packed codes (a uint8 parameter) shard, the block scales (buffers) stay whole
    q, q1 = (estimate(PlanSetup(**{**kw, "method": "qlora"}, fsdp=f)) for f in (2, 1))
    sizes = [model.get_submodule(name).weight.numel() for name in quantized_weights(model)]
    scales = sum(nf4_bytes(n) - (n + 1) // 2 for n in sizes)
    assert q1.weights_by_dtype["nf4 (with scales)"] == scales + sum((n + 1) // 2 for n in sizes)
    assert q1.memory.weights > q.memory.weights > scales + (q1.memory.weights - scales) // 2
    with pytest.raises(ConfigError, match="fsdp"):
        PlanSetup(**kw, fsdp=0)


# --- the other tasks: seq2seq, token classification, new tokens ------------------------------------


def _t5_and_bert(tmp_path, name):
    from transformers import BertConfig, T5Config

    if name == "t5":
        config = T5Config(
            vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
        )  # fmt: skip
    else:
        config = BertConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            num_labels=7,
        )  # fmt: skip
    (tmp_path / "config.json").write_text(config.to_json_string())
    return config, str(tmp_path / "config.json")


@pytest.mark.parametrize(
    "case, task, peft_task",
    [("t5", "seq2seq", "SEQ_2_SEQ_LM"), ("bert", "token-classification", "TOKEN_CLS")],
)
def test_plan_counts_seq2seq_and_token_classification_as_peft_and_train_do(tmp_path, case, task, peft_task):
    import peft

    from lorakit.tasks import auto_model_class
    from lorakit.train import TrainConfig
    from lorakit.train.run import lora_config

    config, path = _t5_and_bert(tmp_path, case)
    plan = estimate(PlanSetup(model=path, r=2, task=task, seq_len=8, dtype="float32"))
    assert plan.memory.peak > 0  # the trace runs the task's own forward (decoder labels, tags)
    ours = auto_model_class(task).from_config(config)  # what `lorakit train --task` trains
    lorakit.inject(ours, lora_config(TrainConfig(task=task, r=2, lora_alpha=4), ours))
    assert (plan.trainable_params, plan.total_params) == lorakit.trainable_parameters(ours)
    # PEFT: the same modules (its "all-linear" would adapt the tagger's head too, so they are named),
    # and TOKEN_CLS trains the new `classifier` head in full as lorakit does
    targets = "all-linear" if case == "t5" else ["query", "key", "value", "dense"]
    theirs = peft.get_peft_model(
        auto_model_class(task).from_config(config),
        peft.LoraConfig(r=2, target_modules=targets, task_type=peft_task),
    )
    assert (plan.trainable_params, plan.total_params) == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("tie", [True, False])
def test_plan_new_tokens_resize_and_train_only_their_rows(llama_json, tmp_path, tie):
    import peft

    data = {**json.loads(open(llama_json).read()), "tie_word_embeddings": tie}
    (tmp_path / "config.json").write_text(json.dumps(data))
    plan = estimate(PlanSetup(model=str(tmp_path / "config.json"), r=2, new_tokens=3, seq_len=8))
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA, tie_word_embeddings=tie))
    model.resize_token_embeddings(131)  # what --add-tokens does for three new tokens
    rows = [128, 129, 130]
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear", trainable_token_indices=rows))
    assert (plan.trainable_params, plan.total_params) == lorakit.trainable_parameters(model)
    reference = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA, tie_word_embeddings=tie))
    reference.resize_token_embeddings(131)
    theirs = peft.get_peft_model(
        reference, peft.LoraConfig(r=2, target_modules="all-linear", trainable_token_indices=rows)
    )
    assert plan.trainable_params == theirs.get_nb_trainable_parameters()[0]
    assert (
        plan.trainable_params - estimate(PlanSetup(model=llama_json, r=2, seq_len=8)).trainable_params
        == 3 * 64
    )
    with pytest.raises(ConfigError, match="new_tokens"):
        PlanSetup(model=llama_json, new_tokens=-1)
    rc, out, _ = _cli(
        ["plan", "--model", str(tmp_path / "config.json"), "--r", "2", "--new-tokens", "3", "--json"]
    )
    assert rc == 0 and json.loads(out)["plan"]["trainable_params"] == plan.trainable_params
