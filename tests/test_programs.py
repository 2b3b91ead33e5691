"""The one cache of built programs shared by the trainer, the sampler and the image generator."""

import jax
import jax.numpy as jnp
import pytest

from sfd_jax.programs import ProgramCache


def test_builds_once_per_key_and_evicts_the_least_recently_used():
    cache, built = ProgramCache(size=2), []

    def get(key):
        return cache.get(key, lambda: built.append(key) or f"program {key}")

    assert get("a") == "program a" and get("b") == "program b" and get("a") == "program a"
    assert built == ["a", "b"]
    get("c")  # over the bound: "b" was used longest ago ("a" was just used)
    assert "a" in cache and "b" not in cache and "c" in cache and len(cache) == 2
    get("b")
    assert built == ["a", "b", "c", "b"]


def test_counts_traces_of_its_jitted_programs():
    cache = ProgramCache(size=4)

    def build(scale):
        def program(x):
            cache.note_trace()
            return x * scale

        return jax.jit(program)

    for scale in (2.0, 3.0, 2.0):
        assert float(cache.get(scale, lambda: build(scale))(jnp.ones(()))) == scale
    assert cache.trace_count() == 2  # the third call reused the first program
    cache.get(2.0, lambda: build(2.0))(jnp.ones((3,)))  # a new shape retraces the same program
    assert cache.trace_count(reset=True) == 3 and cache.trace_count() == 0
    cache.get(2.0, lambda: build(2.0))(jnp.ones(()))
    assert cache.trace_count() == 0
    cache.clear()
    assert len(cache) == 0
    cache.get(2.0, lambda: build(2.0))(jnp.ones(()))
    assert cache.trace_count() == 1  # cleared: the program is built and compiled again


@pytest.mark.parametrize("size", [0, -1, 2.5])
def test_size_must_be_a_positive_int(size):
    with pytest.raises(ValueError, match="ProgramCache size must be a positive int"):
        ProgramCache(size=size)
