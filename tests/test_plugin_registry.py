"""Plugins load through entry points; bad plugins are isolated and named; users can disable them."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from typing import Literal

import pytest
from conftest import MethodsPlugin, make_spec

import pefc
from pefc.registry import build_registry
from pefc.spec import parse_spec


class _Echo(pefc.AdapterConfig):
    method: Literal["echo"] = "echo"


class _Exploding(pefc.Method):
    name = "echo"
    config = _Echo

    def rewrite(self, ctx, config, sites):
        raise RuntimeError("kaboom")

    def param_count(self, config, site):
        return 0


def test_builtins_come_from_the_entry_point_group(registry):
    assert {"lora", "dora", "ia3", "adapter", "prefix", "prompt"} <= set(registry.methods)
    assert registry.method_sources["lora"].distribution == "pefc"
    assert registry.method_sources["lora"].module == "pefc_plugins.lora"


def test_a_plugin_that_fails_to_import_is_skipped_and_named():
    broken = EntryPoint(name="broken", value="no_such_module_for_pefc", group="pefc")
    with pytest.warns(UserWarning, match="plugin 'broken'.*No module named"):
        registry = build_registry(extra_plugins=[("broken", broken)])
    info = next(p for p in registry.plugins if p.name == "broken")
    assert "No module named" in info.error
    assert "lora" in registry.methods  # the others keep working


def test_a_taken_method_name_is_refused():
    class Lora2(_Exploding):
        name = "lora"

    class Cfg(pefc.AdapterConfig):
        method: Literal["lora"] = "lora"

    Lora2.config = Cfg
    with pytest.warns(UserWarning, match="already provided by plugin 'lora' \\(pefc\\)"):
        registry = build_registry(extra_plugins=[("dup", MethodsPlugin(Lora2()))])
    assert registry.method_sources["lora"].name == "lora"


def test_a_malformed_config_model_is_refused():
    class NotAConfig(_Exploding):
        config = dict

    with pytest.warns(UserWarning, match="not a subclass of pefc.AdapterConfig"):
        registry = build_registry(extra_plugins=[("bad", MethodsPlugin(NotAConfig()))])
    assert "echo" not in registry.methods


def test_an_error_inside_rewrite_names_the_plugin():
    registry = build_registry(extra_plugins=[("echo-plugin", MethodsPlugin(_Exploding()))])
    spec = parse_spec(make_spec([{"name": "e", "method": "echo", "target": ["@attn.q"]}]), registry=registry)
    with pytest.raises(pefc.PluginError, match="method 'echo' \\(plugin 'echo-plugin'\\) failed while inserting "
                                               "adapter 'e': RuntimeError: kaboom"):
        pefc.compile(spec, registry=registry)


def test_disable_plugins_env():
    env = {**os.environ, "PEFC_DISABLE_PLUGINS": "ia3,dora"}
    result = subprocess.run([sys.executable, "-m", "pefc.cli", "plugins"], capture_output=True, text=True, env=env,
                            timeout=120)
    methods = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert "ia3" not in methods and "dora" not in methods and "lora" in methods
