"""``python -m curvop``: the same as the ``curvop`` command."""

from curvop.cli import main

raise SystemExit(main())
