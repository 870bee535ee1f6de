"""lorakit.commands.train: flags generated from TrainConfig, errors without a traceback."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.train import TrainConfig
from lorakit.train.config import FLAG_ALIASES

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_help_documents_every_setting(capsys):
    from lorakit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "--config" in text


def _train_flags() -> list[list[str]]:
    """Each `lorakit train` option as a user passes it (with a value where it takes one)."""
    from lorakit.cli import build_parser

    parser = build_parser("train")
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["train"]
    argvs = []
    for action in sub._actions:
        for option in action.option_strings:
            if option in ("-h", "--help") or option in FLAG_ALIASES.get(action.dest, ()):
                continue
            argvs.append([option] if action.nargs == 0 else [option, "8"])
    return argvs


@pytest.mark.parametrize("argv", _train_flags(), ids=lambda a: a[0])
def test_every_train_flag_passes_through_torchrun_unchanged(argv):
    """torchrun's parser takes a flag that abbreviates one of its own (`--r` for `--rdzv-*`) as its
    own; every flag `lorakit train --help` lists (its aliases aside) must reach lorakit as given."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "lorakit", "train", *argv])
    assert args.module and args.training_script == "lorakit"
    assert args.training_script_args == ["train", *argv]


def test_the_rank_flag_and_its_alias_set_r():
    from lorakit.cli import build_parser

    for flag in ("--lora-rank", "--r"):
        assert build_parser("train").parse_args(["train", flag, "4"]).r == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "/nonexistent/run.yaml"], "--config /nonexistent/run.yaml: cannot read it"),
        (["--task", "regression"], "task must be one of"),
        (["--batch-size", "6", "--grad-accum", "4"], "multiple of grad_accum"),
        (["--lr", "nan"], "lr (--lr) must be a finite number > 0, got nan"),
        (["--max-minutes", "-1"], "max_minutes (--max-minutes) must be a finite number > 0"),
        (["--layers", "5-2"], "the range '5-2' is reversed"),
        (["--config", "sentiment", "--pack", "--resume", "--overwrite"], "exclude each other"),
    ],
)
def test_cli_reports_bad_settings_without_a_traceback(capsys, tmp_path, argv, message):
    from lorakit.cli import main

    assert main(["train", "--output", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error:") and message in err
    assert not (tmp_path / "out").exists()


def _resolve(*argv: str):
    from lorakit.cli import build_parser
    from lorakit.commands.train import resolve_args

    return resolve_args(build_parser("train").parse_args(["train", *argv]))


# the settings `lorakit train` ran with no arguments before the demo became a config file (the old
# TrainConfig's defaults overridden by its DEMO_PRESET), written out; data came from demo_train=2400
# and demo_test=200 (see the next test); changes since: lr 1e-3 -> 2e-3 (0.845 -> 0.875 exact match),
# then LoRA on layers 15-29 only, 100 steps, save_every 50, max_minutes 5.5 (0.875 -> 0.915)
OLD_DEMO = dict(
    model="smollm2-135m",
    task="causal-lm",
    output="lorakit-output",
    max_steps=100,
    epochs=1.0,
    max_minutes=5.5,
    batch_size=16,
    grad_accum=1,
    lr=2e-3,
    weight_decay=0.0,
    schedule="cosine",
    warmup_steps=10,
    max_grad_norm=1.0,
    max_length=96,
    pack=False,
    r=16,
    lora_alpha=32.0,
    lora_dropout=0.0,
    target_modules="all-linear",
    layers="15-29",
    quantize=None,
    precision="auto",
    gradient_checkpointing=False,
    trim_heap=False,
    eval_every=0,
    eval_fraction=0.1,
    max_eval=None,
    eval_base=True,
    eval_batch_size=16,
    save_every=50,
    keep_checkpoints=2,
    log_every=5,
    seed=0,
    threads=None,
    resume=False,
)


def test_no_arguments_reads_the_packaged_sentiment_config_equal_to_the_old_preset():
    cfg = _resolve()
    assert cfg.max_steps == 100  # no data: the demo's settings
    assert _resolve("--data", "x").max_steps is None
    new = cfg.to_dict()
    assert (new.pop("data"), new.pop("eval_data")) == (
        "rotten_tomatoes_chat:train[:2400]",
        "rotten_tomatoes_chat:test[:200]",
    )
    assert new.pop("overwrite") is False  # the one new field
    for name in [n for n in new if n not in OLD_DEMO]:  # settings added since (variants, preference,
        assert new.pop(name) == getattr(TrainConfig(), name), name  # tasks, strategy): at their defaults
    for name, value in OLD_DEMO.items():  # field by field, so a difference names itself
        assert (name, new[name]) == (name, value)
    assert new.keys() == OLD_DEMO.keys()
    assert _resolve("--config", "sentiment", "--lr", "5e-4").to_dict() == {**cfg.to_dict(), "lr": 5e-4}


def test_demo_data_reference_gives_the_old_demo_records():
    """The old demo_records(): rotten_tomatoes(2400, 200, seed) as chats with the system question,
    reviews cut at 400 characters."""
    from lorakit.data import read_dataset, rotten_tomatoes

    cfg = _resolve()
    train, test = rotten_tomatoes(2400, 200, seed=cfg.seed)

    def chat(r):
        return {
            "messages": [
                {"role": "system", "content": "Is this movie review positive or negative?"},
                {"role": "user", "content": r["text"][:400]},
                {"role": "assistant", "content": r["label"]},
            ]
        }

    assert read_dataset(cfg.data, seed=cfg.seed).records == [chat(r) for r in train]
    assert read_dataset(cfg.eval_data, seed=cfg.seed).records == [chat(r) for r in test]


def test_resume_of_a_run_shorter_than_the_default_warmup_is_not_refused(tmp_path):
    """The saved train_config.yaml records warmup_steps=10 for a 6-step run (the default, cut to the
    run's length); reading it back on --resume must not count as the user setting it."""
    from lorakit.train.config import resolve_config, save_resolved

    run = resolve_config({}, {"data": "d.jsonl", "max_steps": 6, "output": str(tmp_path)})
    save_resolved(run, tmp_path)
    cfg = _resolve("--output", str(tmp_path), "--resume")
    assert (cfg.max_steps, cfg.warmup_steps, cfg.resume) == (6, 10, True)
    with pytest.raises(ConfigError, match="warmup_steps"):  # a warmup given now is still checked
        _resolve("--output", str(tmp_path), "--resume", "--warmup-steps", "20")
