"""lorakit.export.hf (`lorakit export --format hf`, alias `merge`): a plain HF folder whose logits equal the
unmerged model's, loadable without lorakit; written atomically."""

import json
import subprocess
import sys

import pytest
import torch
from fixtures import make_adapter, tiny_chat_model
from transformers import AutoModelForCausalLM

import lorakit
import lorakit.hf
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.export import export_hf

IDS = torch.tensor([[1, 50, 300, 7000, 12, 9]])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    folder = tiny_chat_model(d / "model")
    return folder, make_adapter(folder, d / "a1", 1), make_adapter(folder, d / "a2", 2, r=2)


def unmerged_logits(folder, *adapters):
    model, _ = lorakit.hf.load_model(folder)
    for i, a in enumerate(adapters):
        lorakit.load_adapter(model, a, f"a{i}")
    lorakit.set_adapter(model, [f"a{i}" for i in range(len(adapters))])
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.slow
def test_cli_merge_fp32_loads_without_lorakit_and_matches(setup, tmp_path):
    folder, a1, _ = setup
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(a1), "--output", str(out)]) == 0
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    code = (
        "import sys, json, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"logits = m(torch.tensor({IDS.tolist()})).logits\n"
        "assert 'lorakit' not in sys.modules and 'peft' not in sys.modules\n"
        "print(json.dumps(logits.tolist()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    expected = unmerged_logits(folder, a1)
    torch.testing.assert_close(plain, expected, atol=1e-4, rtol=1e-4)
    with lorakit.disable_adapters(lorakit.hf.load_model(folder)[0]) as base, torch.no_grad():
        assert not torch.allclose(base(IDS).logits, expected, atol=1e-2)  # the adapter mattered


@pytest.mark.parametrize(
    "dtype,torch_dtype,tol", [("bf16", torch.bfloat16, 0.25), ("fp16", torch.float16, 0.03)]
)
def test_dtype_cast(setup, tmp_path, dtype, torch_dtype, tol):
    folder, a1, a2 = setup
    model, tok = lorakit.hf.load_model(folder)
    for i, a in enumerate((a1, a2)):  # two adapters, both merged
        lorakit.load_adapter(model, a, f"a{i}")
    lorakit.set_adapter(model, ["a0", "a1"])
    export_hf(model, tok, tmp_path / "m", dtype=dtype)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch_dtype
    with torch.no_grad():
        got = loaded.float()(IDS).logits
    expected = unmerged_logits(folder, a1, a2)
    # rounding of ~13-sized logits: measured max error 0.10 (bf16), 0.008 (fp16)
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)


def test_adapter_on_tied_embedding_is_untied(setup, tmp_path):
    folder, _, _ = setup
    model, tok = lorakit.hf.load_model(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        expected = model(IDS).logits
    export_hf(model, tok, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_refuses_to_overwrite_and_bad_dtype(setup, tmp_path, capsys):
    folder, a1, _ = setup
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["merge", "--model", str(folder), "--adapter", str(a1), "--output", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    model, tok = lorakit.hf.load_model(folder)
    with pytest.raises(ConfigError, match="dtype"):
        export_hf(model, tok, tmp_path / "x", dtype="int3")
    assert (
        main(
            [
                "merge",
                "--model",
                str(folder),
                "--adapter",
                str(tmp_path / "nope"),
                "--output",
                str(tmp_path / "y"),
            ]
        )
        == 1
    )
    assert "not an adapter folder" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_output_that_is_a_file_is_refused_before_loading(setup, tmp_path, capsys):
    folder, a1, _ = setup
    f = tmp_path / "file"
    f.write_text("x")
    argv = ["export", "--model", str(folder), "--adapter", str(a1), "--output", str(f), "--overwrite"]
    assert main(argv) == 1
    assert "is a file; remove it or choose another --output" in capsys.readouterr().err


def test_a_failed_export_leaves_the_old_folder_and_no_temporary_one(setup, tmp_path, monkeypatch):
    import errno

    from lorakit.errors import StorageError

    folder, a1, _ = setup
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("the previous export")
    model, tok = lorakit.hf.load_model(folder)
    lorakit.load_adapter(model, a1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", full)
    with pytest.raises(StorageError, match=r"cannot write .*m: no space left on device"):
        export_hf(model, tok, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (out / "old.txt").read_text() == "the previous export"


def test_export_format_hf_and_the_merge_alias_are_one_command():
    from lorakit.cli import build_parser

    for argv in (["export", "--format", "hf"], ["merge"]):
        args = build_parser(argv[0]).parse_args([*argv, "--adapter", "a", "--output", "o"])
        assert (args._module, args.format) == ("lorakit.commands.export", "hf")


def test_demo_is_a_hidden_alias_of_tour(monkeypatch, capsys):
    import lorakit.commands.tour as tour
    from lorakit.cli import build_parser

    seen = []
    monkeypatch.setattr(tour, "run", lambda args: seen.append(args.steps) or 0)
    assert main(["demo", "--steps", "3"]) == 0 and seen == [3]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "tour" in text and "demo" not in text
