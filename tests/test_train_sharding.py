"""lorakit.train.sharding: FSDP2 runs (`--fsdp`, 2 gloo processes) equal to 1 unsharded process, the
saved adapter loading in PEFT with the same logits, the adapter guard (directly, and through the
save path with a broken gather), checkpoints that resume at another world size (2 -> 1 after a
SIGKILL of one rank, 1 -> 2), and two torchrun "nodes" over loopback.

Tolerances: 2 processes sum gradients in another order than 1, and Adam divides by sqrt(v), so
adapter tensors agree to rtol 1e-3 / atol 5e-5 (measured: max |diff| ~2e-5 on values ~0.2) and the
per-step losses to rtol 1e-5 (measured: ~1e-7).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from fixtures import lm_examples, lora4, pad_right, tiny_run_folder, train_cfg
from fixtures import train_llama as tiny_llama
from safetensors.torch import load_file

import lorakit
from lorakit.errors import TrainingError
from lorakit.io import adapter_state_dict
from lorakit.train import sharding
from lorakit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
STEPS = ["--max-steps", "12", "--save-every", "3", "--warmup-steps", "2", "--log-every", "1"]


# ----------------------------------------------------------------------------- the adapter guard


def _gathered(model):
    return {"default": sharding.gather(adapter_state_dict(model))}


def test_the_guard_passes_the_models_own_adapter():
    model = lora4(tiny_llama())
    sharding.check_adapter(_gathered(model), model)


@pytest.mark.parametrize("broken", ["empty", "missing", "shape", "extra", "no adapter"])
def test_the_guard_refuses_a_broken_gather_naming_the_tensor(broken):
    model = lora4(tiny_llama())
    gathered = _gathered(model)
    tensors = gathered["default"]
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    if broken == "empty":  # what a shard gathered as nothing looks like
        tensors[key] = torch.empty(0)
    elif broken == "missing":
        del tensors[key]
    elif broken == "shape":  # one process's slice saved as if it were the whole tensor
        tensors[key] = tensors[key][: tensors[key].shape[0] // 2]
    elif broken == "extra":
        key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
        tensors[key] = torch.ones(2, 2)
    else:
        key = "'default' is missing"
        del gathered["default"]
    with pytest.raises(TrainingError, match="refusing to save") as e:
        sharding.check_adapter(gathered, model)
    assert key in str(e.value)


def test_a_broken_gather_fails_the_checkpoint_save_before_anything_is_written(tmp_path, monkeypatch):
    model = lora4(tiny_llama())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})
    real = sharding.gather
    # the gather of the adapter's tensors loses every lora_B (as if those shards never arrived)
    monkeypatch.setattr(
        sharding,
        "gather",
        lambda t: {k: torch.empty(0) if "lora_B" in k else v for k, v in real(t).items()},
    )
    with pytest.raises(TrainingError, match="empty"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000001"]  # no step-2, no temporary folder


# ----------------------------------------------------------------------------- sharded tensors, in process


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group, so FSDP2 (DTensor parameters) runs inside the test process."""
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def _one_step(model, examples):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(**pad_right(examples)).loss.backward()
    opt.step()
    sched.step()
    return opt, sched


def test_sharded_checkpoints_hold_whole_tensors_and_load_either_way(tmp_path, one_process_group):
    """A checkpoint of a fully_shard-ed model is the same file a plain model writes, and each loads
    into the other (DTensor gathered on save, cut again on load)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    examples = lm_examples(4)
    plain, sharded = lora4(tiny_llama()), lora4(tiny_llama())
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    assert isinstance(next(p for p in sharded.parameters() if p.requires_grad), DTensor)
    opt_p, sched_p = _one_step(plain, examples)
    opt_s, sched_s = _one_step(sharded, examples)
    save_checkpoint(tmp_path / "plain", 1, plain, opt_p, sched_p, {"step": 1})
    save_checkpoint(tmp_path / "sharded", 1, sharded, opt_s, sched_s, {"step": 1})
    a = load_file(str(latest_checkpoint(tmp_path / "plain") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "sharded") / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k])
    peft_a = load_file(str(latest_checkpoint(tmp_path / "sharded") / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in peft_a.items()} == {
        k: v.shape for k, v in adapter_state_dict(plain).items()
    }

    # the sharded checkpoint into a plain model, and the plain one into a sharded model
    other = lora4(tiny_llama(seed=1))
    opt_o, sched_o = _one_step(other, examples)
    load_checkpoint(latest_checkpoint(tmp_path / "sharded"), other, opt_o, sched_o)
    load_checkpoint(latest_checkpoint(tmp_path / "plain"), sharded, opt_s, sched_s)
    for (name, p), q, s in zip(
        ((n, p) for n, p in plain.named_parameters() if p.requires_grad),
        (p for p in other.parameters() if p.requires_grad),
        (p for p in sharded.parameters() if p.requires_grad),
    ):
        torch.testing.assert_close(q.detach(), p.detach(), msg=name)
        torch.testing.assert_close(s.full_tensor().detach(), p.detach(), msg=name)
    moments = [v for v in opt_s.state_dict()["state"][0].values() if v.dim() > 0]
    assert moments and all(isinstance(v, DTensor) for v in moments)
    torch.testing.assert_close(
        opt_s.state_dict()["state"][0]["exp_avg"].full_tensor(), opt_p.state_dict()["state"][0]["exp_avg"]
    )


def test_run_training_refuses_to_save_a_broken_gather(tmp_path, monkeypatch, tiny_folder):
    real = sharding.gather
    monkeypatch.setattr(
        sharding, "gather", lambda t: {k: v for k, v in real(t).items() if "layers.1." not in k}
    )
    cfg = train_cfg(
        tmp_path / "out",
        model=str(tiny_folder / "model"),
        data=str(tiny_folder / "data.jsonl"),
        max_steps=2,
        max_eval=0,
        eval_fraction=0.0,
    )
    with pytest.raises(TrainingError, match="missing"):
        lorakit.train.run_training(cfg)
    assert not (tmp_path / "out" / "adapter").exists()


# ----------------------------------------------------------------------------- processes (torchrun)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, and a small sentiment-like data file."""
    return tiny_run_folder(tmp_path_factory.mktemp("tiny"))


def _args(tiny_folder, output, *extra: str) -> list[str]:
    return [
        "-m",
        "lorakit",
        "train",
        "--model",
        str(tiny_folder / "model"),
        "--data",
        str(tiny_folder / "data.jsonl"),
        "--output",
        str(output),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--lora-dropout",
        "0",
        "--threads",
        "1",
        "--no-eval-base",
        "--max-eval",
        "0",
        *STEPS,
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(*launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_run(got: Path, want: Path) -> None:
    """The adapter and the loss curve of run `got` equal run `want`'s to the module's tolerances."""
    a = load_file(str(want / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(got / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert b[name].numel() > 0 and b[name].shape == value.shape, name
        torch.testing.assert_close(b[name], value, rtol=1e-3, atol=5e-5)
    losses = [_losses(f) for f in (want, got)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == list(range(1, 13))
    torch.testing.assert_close(
        torch.tensor([x for _, x in losses[1]]), torch.tensor([x for _, x in losses[0]]), rtol=1e-5, atol=0
    )


def _losses(folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    """One process, no sharding: the run every sharded one must equal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _run([sys.executable, *_args(tiny_folder, out)])
    return out


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_load_in_peft(tiny_folder, reference, tmp_path):
    """2 processes, FSDP2 with gradient checkpointing == 1 process without either; PEFT reads the
    adapter and gives lorakit's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two = tmp_path / "two"
    # evaluation (generation included) runs on both processes in step: each forward is a collective
    cmd = _args(tiny_folder, two, "--fsdp", "--gradient-checkpointing", "--eval-base", "--max-eval", "2")
    _run(_torchrun("--standalone", "--nproc_per_node", "2", *cmd))
    _assert_same_run(two, reference)
    evals = [json.loads(r) for r in (two / "metrics.jsonl").read_text().splitlines() if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 12]

    ids = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_folder / "model").eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, two / "adapter").eval()(input_ids=ids).logits
        ours, _ = lorakit.hf.load_model(tiny_folder / "model")
        lorakit.load_adapter(ours, two / "adapter")
        mine = ours.eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mine, plain)  # the adapter is not a no-op


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the worker of `rank` under a torchrun process (found by its RANK variable)."""
    for child in _children(torchrun_pid):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return child
    return None


@pytest.mark.slow
def test_sigkill_of_one_rank_then_resume_with_one_process(tiny_folder, reference, tmp_path):
    """2 -> 1: a 2-process FSDP run loses rank 1 to SIGKILL after its first checkpoint; resumed by
    one unsharded process, it ends as the uninterrupted run."""
    out = tmp_path / "run"
    cmd = _torchrun("--standalone", "--nproc_per_node", "2", *_args(tiny_folder, out, "--fsdp"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-0000003" / "complete.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
        time.sleep(0.01)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0  # torchrun stops the other rank and fails
    assert not (out / "adapter").exists() and not (out / "checkpoints" / "step-0000012").exists()
    done = _run([sys.executable, *_args(tiny_folder, out, "--resume")])
    assert "resuming from" in done.stderr
    _assert_same_run(out, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_over_loopback_resume_a_one_process_run(tiny_folder, reference, tmp_path):
    """1 -> 2: the reference run's step-9 checkpoint, resumed by two torchrun "nodes" on this machine
    (--nnodes 2, one FSDP process each, c10d rendezvous on localhost), ends as the reference."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "step-0000012")
    endpoint = f"localhost:{_free_port()}"
    nodes = [
        subprocess.Popen(
            _torchrun(
                "--nnodes",
                "2",
                "--node-rank",
                str(k),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "lorakit-test",
                *_args(tiny_folder, out, "--fsdp", "--resume"),
            ),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (0, 1)
    ]
    logs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][1][-2000:] + logs[1][1][-2000:]
    assert "resuming from" in logs[0][1] and "step-0000009" in logs[0][1]
    _assert_same_run(out, reference)


def test_qlora_under_fully_shard_shards_the_4bit_codes_and_trains_as_unsharded(one_process_group):
    """The packed NF4 codes are a frozen uint8 parameter, so FSDP2 shards them with their layer (the
    block scales, buffers, stay whole); training equals the unsharded model's."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lorakit.quant import quantize_model
    from lorakit.quant.linear4bit import Linear4bit

    examples = lm_examples(4)
    plain, sharded = (lora4(quantize_model(tiny_llama())) for _ in range(2))
    packed = {n: m.weight.clone() for n, m in sharded.named_modules() if isinstance(m, Linear4bit)}
    assert packed
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    _one_step(plain, examples)
    _one_step(sharded, examples)
    for name, module in sharded.named_modules():
        if isinstance(module, Linear4bit):
            assert isinstance(module.weight, DTensor) and torch.equal(
                module.weight.full_tensor(), packed[name]
            )
    sharded_params = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert isinstance(sharded_params[name], DTensor)
            torch.testing.assert_close(sharded_params[name].full_tensor().detach(), p.detach(), msg=name)
