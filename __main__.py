"""`python -m ithaca ...` is the `ithaca` command; torchrun starts workers this way."""

from ithaca.launcher.cli import main

raise SystemExit(main())
