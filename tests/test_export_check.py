"""lorakit.export.check: the logit report after an export (merged fp32 and the GGUF file read back)."""

from fixtures import random_lora, tiny_family

from lorakit.export import export_gguf, logit_gaps
from lorakit.export.check import PROMPTS, format_gaps


def test_gaps_grow_with_the_rounding_of_the_file(tmp_path):
    model = random_lora(tiny_family("mistral"))
    exact = logit_gaps(model, None, export_gguf(model, None, tmp_path / "f32.gguf", type="f32"))
    rounded = logit_gaps(model, None, export_gguf(model, None, tmp_path / "q4.gguf", type="q4_0"))
    assert exact["merged fp32"]["max_abs_diff"] < 1e-5 and exact["gguf file"]["max_abs_diff"] < 1e-5
    assert exact["gguf file"]["same_argmax"]
    assert rounded["gguf file"]["max_abs_diff"] > 100 * exact["gguf file"]["max_abs_diff"]
    assert rounded["gguf file"]["mean_abs_diff"] > 0
    text = format_gaps({"gguf q4_0": rounded["gguf file"]})
    assert text.splitlines()[0] == f"logits vs the adapter model on {len(PROMPTS)} fixed prompts:"
    assert text.splitlines()[1].split()[:4] == ["gguf", "q4_0", "max", "|diff|"]
