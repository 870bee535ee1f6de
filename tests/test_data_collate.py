"""lorakit.data.collate: split, pack and collate; a packed forward equals each example alone."""

from __future__ import annotations

import pytest
import torch

from lorakit.data import (
    IGNORE_INDEX,
    collate,
    pack,
    split,
)
from lorakit.errors import ConfigError, DataError

# ---------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_sized():
    data = list(range(100))
    train, evals = split(data, 0.1, seed=0)
    assert len(evals) == 10 and len(train) == 90
    assert sorted(train + evals) == data and train == sorted(train)
    assert split(data, 0.1, seed=0) == (train, evals)
    assert split(data, 0.1, seed=1)[1] != evals
    assert len(split(list(range(5)), 0.1)[1]) == 1  # at least one held out


def test_split_bad_inputs():
    with pytest.raises(ConfigError, match="eval_fraction"):
        split([1, 2, 3], 0)
    with pytest.raises(ConfigError, match="eval_fraction"):
        split([1, 2, 3], 1.5)
    with pytest.raises(DataError, match="too few"):
        split([1], 0.5)


# ---------------------------------------------------------------- pack and collate


def _examples():
    # token values are arbitrary ids < 128; labels mask the first two tokens like a prompt would
    lens = [5, 7, 3, 9, 2]
    out, start = [], 3
    for n in lens:
        tokens = list(range(start, start + n))
        out.append({"input_ids": tokens, "labels": [IGNORE_INDEX] * 2 + tokens[2:]})
        start += n
    return out


def test_pack_concatenates_with_restarting_positions():
    exs = _examples()
    packed = pack(exs, 16)
    assert [len(p["input_ids"]) for p in packed] == [15, 11]
    assert packed[0]["input_ids"] == exs[0]["input_ids"] + exs[1]["input_ids"] + exs[2]["input_ids"]
    assert packed[0]["position_ids"] == list(range(5)) + list(range(7)) + list(range(3))
    assert (
        packed[1]["labels"]
        == [IGNORE_INDEX] * 2 + exs[3]["labels"][2:] + [IGNORE_INDEX] + exs[4]["labels"][1:]
    )
    with pytest.raises(DataError, match="example 3 has 9 tokens, more than max_length=8"):
        pack(exs, 8)
    with pytest.raises(DataError, match="only causal-lm examples"):
        pack([{"input_ids": [1], "label": 0}], 8)


def test_pack_first_label_of_each_segment_is_ignored():
    packed = pack([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4], "labels": [3, 4]}], 8)
    assert packed == [
        {
            "input_ids": [1, 2, 3, 4],
            "labels": [IGNORE_INDEX, 2, IGNORE_INDEX, 4],
            "position_ids": [0, 1, 0, 1],
        }
    ]


def test_collate_pads_right():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = collate([{"input_ids": [5, 6], "label": 1}, {"input_ids": [7], "label": 0}], pad_token_id=2)
    assert cls["input_ids"].tolist() == [[5, 6], [7, 2]] and cls["labels"].tolist() == [1, 0]


def test_collate_bad_inputs():
    with pytest.raises(DataError, match="empty batch"):
        collate([], 0)
    with pytest.raises(ConfigError, match="pad_token_id is None"):
        collate([{"input_ids": [1], "labels": [1]}], None)
    with pytest.raises(DataError, match="mixes kinds of example"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "label": 0}], 0)
    with pytest.raises(ConfigError, match="mask_dtype"):
        collate(pack([{"input_ids": [1], "labels": [1]}], 4), 0, mask_dtype=torch.int64)


def test_packed_mask_is_block_diagonal_causal():
    examples = pack([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}], 8)
    examples.append({"input_ids": [4], "labels": [4], "position_ids": [0]})
    batch = collate(examples, 0, mask_dtype=torch.bool)
    allowed = batch["attention_mask"][:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert allowed[1] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # padding attends only to padding
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    additive = collate(examples, 0, mask_dtype=torch.float16)["attention_mask"]
    assert additive.dtype == torch.float16
    expected = torch.where(batch["attention_mask"], 0.0, torch.finfo(torch.float16).min).half()
    assert torch.equal(additive, expected)


def _tiny_llama(attn: str = "sdpa", dtype=torch.float32, head: str = "LlamaForCausalLM", **config):
    import transformers
    from fixtures import tiny_llama

    shape = dict(intermediate_size=128, num_hidden_layers=2, max_position_embeddings=2048)
    model = tiny_llama(0, getattr(transformers, head), attn_implementation=attn, **shape, **config)
    return model.to(dtype)


@pytest.mark.parametrize(
    "attn,dtype,mask_dtype,tol",
    [
        ("sdpa", torch.float32, torch.float32, 1e-5),
        ("eager", torch.float32, torch.float32, 1e-5),
        ("sdpa", torch.float32, torch.bool, 1e-5),
        ("eager", torch.bfloat16, torch.bfloat16, 3e-2),  # a bf16 model takes a bf16 additive mask
        ("sdpa", torch.bfloat16, torch.float32, 3e-2),  # ... or the default float32 one
    ],
)
def test_packed_forward_equals_each_example_alone(attn, dtype, mask_dtype, tol):
    model = _tiny_llama(attn, dtype)
    exs = _examples()
    packed = pack(exs, 16)
    batch = collate(packed, pad_token_id=0, mask_dtype=mask_dtype)
    with torch.no_grad():
        logits = model(**batch).logits
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in exs]
    rows = [(0, 0), (0, 5), (0, 12), (1, 0), (1, 9)]  # (packed row, offset) of each example
    for (row, off), ref in zip(rows, alone):
        torch.testing.assert_close(logits[row, off : off + len(ref)], ref, atol=tol, rtol=tol)
    # the packed loss sums to the same per-token losses as the examples one by one
    with torch.no_grad():
        n_packed = sum((torch.tensor(p["labels"][1:]) != IGNORE_INDEX).sum() for p in packed)
        packed_sum = model(**batch).loss * n_packed
        alone_sum = 0
        for e in exs:
            n = (torch.tensor(e["labels"][1:]) != IGNORE_INDEX).sum()
            if n:  # an example with nothing to learn has a NaN mean loss alone
                alone_sum += (
                    model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
                    * n
                )
    torch.testing.assert_close(packed_sum, alone_sum, atol=tol * 10, rtol=tol)


def test_packed_mask_under_autocast():
    model = _tiny_llama("sdpa")
    exs = _examples()[:2]
    batch = collate(pack(exs, 16), pad_token_id=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**batch).logits
        ref = model(input_ids=torch.tensor([exs[1]["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[0, 5:12], ref, atol=3e-2, rtol=3e-2)


def test_padded_batch_matches_unpadded_forward():
    model = _tiny_llama("sdpa")
    exs = _examples()[:2]
    batch = collate(exs, pad_token_id=0)
    with torch.no_grad():
        logits = model(**batch).logits
        ref = model(input_ids=torch.tensor([exs[0]["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[0, :5], ref, atol=1e-5, rtol=1e-5)  # row 0 is the padded one
    assert torch.isfinite(model(**batch).loss)


def test_classification_batch_feeds_a_sequence_classifier():
    model = _tiny_llama(head="LlamaForSequenceClassification", num_labels=2, pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8, 9], "label": 0}], pad_token_id=0)
    with torch.no_grad():
        out = model(**batch)
        alone = model(input_ids=torch.tensor([[8, 9]])).logits[0]
    torch.testing.assert_close(out.logits[1], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.loss)
