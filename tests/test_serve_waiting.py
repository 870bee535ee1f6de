"""lorakit.serve.waiting: the bounded wait queue, arrival order, round-robin by adapter, 429/503."""

import threading
import time
from types import SimpleNamespace

import pytest

from lorakit.serve.waiting import Overloaded, Waiting


def req(adapter, tag=None):
    return SimpleNamespace(row=SimpleNamespace(adapter=adapter), tag=tag)


def test_round_robin_by_adapter_and_arrival_order():
    w = Waiting(limit=20)
    flood = [req("a", i) for i in range(5)]
    for r in flood:
        w.put(r)
    late_b, late_base = req("b"), req(None)
    w.put(late_b)
    w.put(late_base)
    taken = [w.take(lambda r: True) for _ in range(7)]
    # a flood on "a" does not starve "b" or the base model: each gets a turn after one "a"
    assert taken == [flood[0], late_b, late_base, *flood[1:]]
    assert w.take(lambda r: True) is None and len(w) == 0
    for r in flood[:2] + [late_b]:
        w.put(r)
    assert [w.first(0) for _ in range(3)] == [flood[0], flood[1], late_b]  # static: arrival order


def test_take_keeps_the_turn_of_a_request_that_does_not_fit():
    w = Waiting(limit=5)
    big, small = req("a"), req("b")
    w.put(big)
    w.put(small)
    assert w.take(lambda r: r is not big) is None  # "b" does not overtake "a" for ever
    assert w.take(lambda r: True) is big and w.take(lambda r: True) is small


def test_limits_answer_503_and_429_and_front_goes_first():
    w = Waiting(limit=3, per_adapter=2)
    w.put(req("a"))
    w.put(req("a"))
    with pytest.raises(Overloaded) as e:
        w.put(req("a"))
    assert e.value.status == 429
    w.put(req("b"))
    with pytest.raises(Overloaded) as e:
        w.put(req("c"))
    assert e.value.status == 503
    back = req("c")
    w.put(back, front=True)  # a request taken before goes back beyond the limits, first in line
    assert w.first(0) is back
    w.refuse_new()
    with pytest.raises(Overloaded, match="shutting down"):
        w.put(req("d"))
    assert len(w.close()) == 3 and len(w) == 0


def test_first_waits_for_a_request_and_wait_wakes():
    w = Waiting(limit=2)
    r = req(None)
    threading.Timer(0.1, w.put, (r,)).start()
    start = time.monotonic()
    assert w.first(5) is r and time.monotonic() - start < 4
    assert w.first(0.01) is None
    threading.Timer(0.1, w.wake).start()
    start = time.monotonic()
    w.wait(5, idle=True)
    assert time.monotonic() - start < 4
