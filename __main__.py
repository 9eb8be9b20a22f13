"""`python -m ithaca ...` is the `ithaca` command; torchrun starts workers this way."""

import sys
from pathlib import Path

# `python -m` puts the working directory first on sys.path. Started in a checkout, that is this
# package's own folder, whose kernels/, data/ and models/ would then shadow installed packages of
# those names (transformers imports one called `kernels`). PYTHONSAFEPATH=1 (or -P) keeps it off.
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from ithaca.launcher.cli.main import main  # noqa: E402  (after the sys.path repair above)

raise SystemExit(main())
