"""`pefc demo` runs end to end: loss falls, reload is identical."""

from __future__ import annotations

from pefc.demo import run_demo


def test_demo_trains_saves_and_reloads(tmp_path):
    result = run_demo(steps=60, out_dir=tmp_path / "adapters", quiet=True)
    assert result.final_loss < result.first_loss - 0.05
    assert result.reload_max_diff == 0.0
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()
