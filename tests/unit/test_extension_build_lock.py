"""A DeepSpeed op build lock left by a killed build is removed before ranks start; a fresh one is kept."""

import os

from ithaca.launcher.runtime.extension_build_lock import OP_NAME, STALE_AFTER_S, clear_stale_build_lock


def _lock(root, version, age_s, now):
    lock = root / version / OP_NAME / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (now - age_s, now - age_s))
    return lock


def test_only_a_lock_older_than_any_build_is_removed(tmp_path):
    now = 1_000_000.0
    stale = _lock(tmp_path, "py311_cpu", STALE_AFTER_S + 60, now)
    building = _lock(tmp_path, "py311_cu128", 30, now)
    assert clear_stale_build_lock(tmp_path, now=now) == [stale]
    assert not stale.exists() and building.exists()
    assert clear_stale_build_lock(tmp_path, now=now) == []


def test_no_build_folder_is_nothing_to_do(tmp_path):
    assert clear_stale_build_lock(tmp_path / "absent") == []
