"""What the dashboard looks like mid-run, frozen as SVG snapshots (pytest-textual-snapshot).

Regenerate after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs under tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

from metis_cli.tui.app import Dashboard
from tui_fake_run import write_hdpo_run, write_sft_run


async def settle(pilot) -> None:
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def test_hdpo_mid_run_80x24(snap_compare, tmp_path):
    # Step 120 of 200: tool use has fallen, the efficiency channel has switched on.
    write_hdpo_run(tmp_path / "demo", 120, 200)
    assert snap_compare(Dashboard(run_dir=tmp_path / "demo"), terminal_size=(80, 24), run_before=settle)


def test_hdpo_mid_run_120x40(snap_compare, tmp_path):
    write_hdpo_run(tmp_path / "demo", 120, 200)
    assert snap_compare(Dashboard(run_dir=tmp_path / "demo"), terminal_size=(120, 40), run_before=settle)


def test_sft_80x24(snap_compare, tmp_path):
    write_sft_run(tmp_path / "demo", 60, 100)
    assert snap_compare(Dashboard(run_dir=tmp_path / "demo"), terminal_size=(80, 24), run_before=settle)
