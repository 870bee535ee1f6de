"""JSON mode: the incremental checker against Python's json module, and the token choice."""

import json
import random

import torch

from lorakit.generate import Sampling
from lorakit.serve.json_mode import START, JsonRow, advance, complete

DOCS = [
    "{}",
    '{ "a" : 1 } ',
    '{"a": [1, -2.5e+3, 0, 0.25, 1E9, true, false, null, "x\\n\\u00e9\\"", {}], "b": {"c": []}}',
    '{"nested": [[[]], [{"k": "v"}]], "": -0}',
]


def _strict(text: str):
    def refuse(name):
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([0, -7, 123456789, 3.25, -1e-7, 2.5e300])
    if kind == 2:
        return "".join(rng.choice('ab "\\/\n\té€😀') for _ in range(rng.randrange(6)))
    if kind == 3:
        return rng.randrange(-100, 100)
    if kind in (4, 5):
        return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_every_prefix_of_a_json_object_is_accepted_and_only_the_whole_is_complete():
    rng = random.Random(0)
    docs = DOCS + [
        json.dumps({"x": _random_value(rng)}, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
        for _ in range(100)
    ]
    for doc in docs:
        for cut in range(len(doc) + 1):
            state = advance(START, doc[:cut])
            assert state is not None, (doc, cut)
            assert complete(state) == (doc[:cut].rstrip() == doc.rstrip()), (doc, cut)


def test_random_texts_agree_with_json_loads():
    # whatever the checker calls a whole object, json.loads parses to a dict; whatever it refuses
    # (not None -> None) has no completion json.loads accepts
    rng = random.Random(1)
    alphabet = '{}[]:,"\\ 01-.eE+tfnrulsa'
    whole = 0
    for _ in range(6000):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 9)))
        text = rng.choice(["{", '{"', ""]) + body + rng.choice(["", "}", '"}', "]}", ":1}"])
        state = advance(START, text)
        try:
            parsed = _strict(text)
        except ValueError:
            parsed = None
        if complete(state):
            whole += 1
            assert isinstance(parsed, dict), text
        elif isinstance(parsed, dict) and text == text.lstrip():  # the reply opens with "{"
            raise AssertionError(f"{text!r} is JSON but the checker says {state}")
        if state is None and text == text.lstrip():  # no continuation can help: try a few closings
            for tail in ("}", '"}', "]}", '""}', "0}", '":0}', "1]}", '"]}'):
                try:
                    assert not isinstance(_strict(text + tail), dict), text + tail
                except ValueError:
                    pass
    assert whole > 40


def test_top_level_must_be_an_object():
    for text in (
        " {}",
        "[1]",
        '"x"',
        "1",
        "true",
        "{}x",
        "{} {}",
        "{'a': 1}",
        '{"a": 01}',
        '{"a": NaN}',
        '{"a":1,}',
    ):
        state = advance(START, text)
        assert not complete(state), text


VOCAB = ["<eos>", "{", "}", '"', "a", ":", " ", "1", "hello", ',"', '{"', "]"]


def _row():
    return JsonRow(lambda t: "" if t == 0 else VOCAB[t], {0})


def test_greedy_choice_is_the_most_likely_valid_token():
    row = _row()
    logits = torch.tensor([9.0, 1.0, 8.0, 0.0, 7.0, 0, 0, 0, 6.0, 0, 2.0, 5.0])
    # eos, "}", "a", "hello", "]" do not fit before "{"; '{"' (2.0) beats "{" (1.0)
    assert row.choose(logits, Sampling(temperature=0), None, int(logits.argmax())) == 10
    assert row.state is not None and not row.done
    logits = torch.zeros(12)
    logits[3] = -5.0  # only '"' closes the key; "a" and "hello" continue it
    logits[4] = 3.0
    assert row.choose(logits, Sampling(temperature=0), None, 4) == 4
    for token in (3, 5, 7, 2):  # '"', ':', '1', '}'
        assert (
            row.choose(torch.nn.functional.one_hot(torch.tensor(token), 12).float(), Sampling(), None, token)
            == token
        )
    assert row.done
    assert row.valid(1) is None and row.valid(0) is None  # nothing after the object (the reply ends there)


def test_sampled_choice_draws_only_valid_tokens_in_proportion():
    logits = torch.log(torch.tensor([0.3, 0.05, 0.3, 0.05, 0.1, 0.0, 0.0, 0.0, 0.1, 0.0, 0.1, 0.0]) + 1e-12)
    s = Sampling(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = {1: 0, 10: 0, 6: 0}
    for _ in range(2000):
        row = _row()
        first = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        counts[row.choose(logits, s, g, first)] += 1
    # valid before "{": "{" (0.05), '{"' (0.1), " " (~0): renormalised 1/3 and 2/3
    assert counts[6] == 0
    assert abs(counts[1] / 2000 - 1 / 3) < 0.05 and abs(counts[10] / 2000 - 2 / 3) < 0.05
