"""`python -m sia` is the same as the `sia` command."""

from __future__ import annotations

from sia.cli import main

raise SystemExit(main())
