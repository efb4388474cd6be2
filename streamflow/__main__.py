"""``python -m streamflow``: the ``streamflow`` command."""

from ._cli import main

raise SystemExit(main())
