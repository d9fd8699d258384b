"""Fuzzed specs never raise anything but pefc's own SpecError; big specs validate fast."""

from __future__ import annotations

import contextlib
import copy
import json
import time

import pytest
from conftest import make_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pefc
from pefc.spec import parse_spec
from pefc.yamlio import load_yaml

VALID = make_spec([{"name": "qv", "method": "lora", "target": ["@attn.q"], "r": 4},
                   {"name": "ff", "method": "ia3"}, {"name": "ad", "method": "adapter", "preset": "pfeiffer"}])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
trees = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)), max_leaves=20)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _paths(value, (*prefix, index))


ALL_PATHS = [p for p in _paths(VALID) if p]


def _set(tree, path, value):
    tree = copy.deepcopy(tree)
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return tree


def _parse_or_spec_error(data):
    with contextlib.suppress(pefc.SpecError):
        parse_spec(data)


@FUZZ
@given(st.sampled_from(ALL_PATHS), trees)
def test_mutated_specs_raise_only_spec_errors(path, value):
    _parse_or_spec_error(_set(VALID, path, value))


@FUZZ
@given(trees)
def test_random_trees_raise_only_spec_errors(tree):
    _parse_or_spec_error(tree)


@FUZZ
@given(st.sampled_from([p for p in ALL_PATHS if isinstance(p[-1], str)]), st.text(min_size=1, max_size=12), trees)
def test_unknown_keys_raise_only_spec_errors(path, key, value):
    parent = path[:-1]
    data = copy.deepcopy(VALID)
    node = data
    for part in parent:
        node = node[part]
    if isinstance(node, dict):
        node[key] = value
    _parse_or_spec_error(data)


@FUZZ
@given(st.text(max_size=200))
def test_random_yaml_text_raises_only_spec_errors(text):
    with contextlib.suppress(pefc.SpecError):
        _parse_or_spec_error(load_yaml(text, source="fuzz.yaml"))


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_nesting_is_a_spec_error_not_a_crash(tmp_path, depth):
    (tmp_path / "deep.json").write_text("[" * depth + "]" * depth)
    (tmp_path / "deep.yaml").write_text("a: " + "[" * depth + "]" * depth)
    for name in ("deep.json", "deep.yaml"):
        with pytest.raises(pefc.SpecError):
            pefc.load_spec(tmp_path / name)


def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 12)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(pefc.SpecError, match="aliases expand to more than"):
        pefc.load_spec(tmp_path / "bomb.yaml")
    assert time.perf_counter() - started < 2


def test_unicode_and_huge_numbers_are_reported(tmp_path):
    data = _set(_set(VALID, ("adapters", 0, "r"), 10**40), ("adapters", 0, "name"), "ünïcødé☃")
    with pytest.raises(pefc.SpecError) as info:
        parse_spec(data)
    assert "adapters.0.r" in str(info.value) and "adapters.0.name" in str(info.value)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_one_megabyte_spec_validates_in_under_a_second(tmp_path, suffix):
    data = copy.deepcopy(VALID)
    data["model"]["hf"]["config"]["padding"] = ["x" * 60] * 16000  # ~1 MB of config payload
    data["adapters"] += [{"name": f"a{i}", "method": "lora", "target": ["@attn.q"], "r": 0} for i in range(300)]
    path = tmp_path / f"big{suffix}"
    text = json.dumps(data) if suffix == ".json" else __import__("yaml").safe_dump(data)
    path.write_text(text)
    assert path.stat().st_size > 1_000_000
    timings = []
    for _ in range(3):  # best of 3: the time it takes, not the machine's load at one moment
        started = time.perf_counter()
        with pytest.raises(pefc.SpecError) as info:
            pefc.load_spec(path)
        timings.append(time.perf_counter() - started)
        assert "adapters.302.r" in str(info.value)
    elapsed = min(timings)
    assert elapsed < 1.0, f"validating a {path.stat().st_size:,}-byte spec took {elapsed:.2f}s"
