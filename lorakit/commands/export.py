"""`lorakit export` (alias `lorakit merge`): write a model with its adapters for another tool.

`--format hf` (the default) writes a merged Hugging Face folder (`--dtype`), `gguf` one GGUF file
(`--type`), `gguf-lora` the adapter alone as a llama.cpp LoRA GGUF, `ollama` a folder with the GGUF
and a Modelfile (`lorakit.export`). `--quantize nf4` loads the base in 4-bit, as QLoRA trained it;
it is merged into the dequantized weights. Afterwards the command prints how far the exported
model's logits are from the adapter model's on a few fixed prompts (`--no-check` skips that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..export import FORMATS
from ..export.gguf import LORA_TYPES, TYPES, check_file_output
from ..export.hf import DTYPES, check_output
from ..hf import DEFAULT_MODEL

DEFAULT_TYPES = {"gguf": "f16", "gguf-lora": "f32", "ollama": "q8_0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lorakit export`."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"HF folder, .gguf file, Hub ID (org/name) or {DEFAULT_MODEL}"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter folder or Hub ID (repeatable; several are summed). Without one the base model is exported",
    )
    parser.add_argument(
        "--output", required=True, help="the folder (hf, ollama) or .gguf file (gguf, gguf-lora)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: a merged Hugging Face folder (default); gguf: one GGUF file; gguf-lora: the adapter as a "
        "llama.cpp LoRA; ollama: a folder with the GGUF and a Modelfile",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="hf only; default: the model's dtype"
    )
    parser.add_argument(
        "--type",
        choices=list(TYPES),
        default=None,
        help=f"gguf/ollama tensor type (default {DEFAULT_TYPES['gguf']} / {DEFAULT_TYPES['ollama']}); "
        f"gguf-lora: one of {', '.join(LORA_TYPES)} (default f32)",
    )
    parser.add_argument(
        "--quantize", choices=["nf4"], default=None, help="load the base in 4-bit (a QLoRA adapter)"
    )
    parser.add_argument("--max-shard-size", default="2GB", help="hf only")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--no-check", action="store_true", help="skip the logit comparison after writing")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations that mean nothing, and an --output that exists, before the model load."""
    output = Path(args.output)
    if args.format == "hf":
        if args.type is not None:
            raise ConfigError("--type is for the GGUF formats; --format hf takes --dtype")
        check_output(output, args.overwrite)
        return
    if args.dtype is not None:
        raise ConfigError(
            f"--dtype is for --format hf; --format {args.format} takes --type ({', '.join(TYPES)})"
        )
    if args.format == "gguf-lora":
        if args.type not in (None, *LORA_TYPES):
            raise ConfigError(f"--type for gguf-lora must be one of {list(LORA_TYPES)}, got {args.type!r}")
        if not args.adapter:
            raise ConfigError("--format gguf-lora writes an adapter: pass --adapter DIR")
    if args.format == "ollama":
        check_output(output, args.overwrite)
    else:
        check_file_output(output, args.overwrite)


def run(args: argparse.Namespace) -> int:
    """Load the model and adapters, write `--output`, print what the export cost and how to use it."""
    from ..adapters import set_adapter
    from ..export import check, export_gguf, export_gguf_lora, export_hf, export_ollama
    from ..generate import load_for_inference

    _check_args(args)
    output = Path(args.output)
    model, tokenizer, adapter = load_for_inference(args.model, args.adapter, quantize=args.quantize)
    if adapter is not None:
        set_adapter(model, adapter)
    kind = args.type or DEFAULT_TYPES.get(args.format)
    if args.format == "hf":
        batches, reference = (None, None) if args.no_check else check.adapter_logits(model, tokenizer)
        export_hf(model, tokenizer, output, args.dtype, args.max_shard_size, args.overwrite)
        if not args.no_check:
            label = f"merged hf {args.dtype or ''}".strip()
            print(check.format_gaps({label: check.gap(model, batches, reference)}))
        print(
            f"wrote {output}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(output)!r})"
        )
        return 0
    if args.format == "gguf-lora":
        export_gguf_lora(model, output, kind, args.overwrite)
        print(
            f"wrote {output}: apply it on a GGUF of the base model, e.g. llama-cli -m base.gguf --lora {output}"
        )
        return 0
    if args.format == "ollama":
        export_ollama(model, tokenizer, output, kind, args.overwrite)
        written, hint = output / "model.gguf", f"ollama create NAME -f {output / 'Modelfile'}"
    else:
        export_gguf(model, tokenizer, output, kind, args.overwrite)
        written, hint = output, f"llama-cli -m {output}"
    if not args.no_check:
        gaps = check.logit_gaps(model, tokenizer, written)
        gaps[f"gguf {kind}"] = gaps.pop("gguf file")
        print(check.format_gaps(gaps))
    print(f"wrote {output}: run it with {hint}")
    return 0
