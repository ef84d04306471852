"""settle_heap: garbage from loading is collected, the living are frozen, and a second call (a new
span loaded) lets what died since the first be collected instead of keeping it frozen forever."""
from __future__ import annotations

import gc
import weakref

import pytest

from petals_protocol.heap import settle_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _unfrozen():
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


def test_garbage_before_settling_is_collected_and_the_living_are_frozen() -> None:
    dead, alive = Node(), Node()
    dead_ref, alive_ref = weakref.ref(dead), weakref.ref(alive)
    del dead
    frozen = settle_heap()
    assert dead_ref() is None
    assert frozen == gc.get_freeze_count() > 0
    assert alive_ref() is alive
    assert not any(obj is alive for generation in range(3) for obj in gc.get_objects(generation))  # frozen


def test_settling_again_frees_what_died_while_frozen() -> None:
    old = Node()
    old_ref = weakref.ref(old)
    settle_heap()
    del old
    gc.collect()
    assert old_ref() is not None  # frozen: full collections skip it
    settle_heap()
    assert old_ref() is None
