"""pyproject.toml's package list is the tree's: a subpackage left out of it is left out of the wheel,
and a non-editable install then fails to import it (kernels/causal_conv1d was, once)."""

from __future__ import annotations

import tomllib

from conftest import ROOT

NOT_SHIPPED = {"tests", "runs", "build"}


def test_every_folder_with_an_init_is_a_listed_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    in_tree = {".".join(("ithaca", *init.parent.relative_to(ROOT).parts))
               for init in ROOT.rglob("__init__.py")
               if not any(part.startswith(".") or part.endswith(".egg-info") for part in init.relative_to(ROOT).parts)
               and init.relative_to(ROOT).parts[0] not in NOT_SHIPPED}
    assert listed == in_tree, f"missing from pyproject.toml: {sorted(in_tree - listed)}; listed but absent: {sorted(listed - in_tree)}"
