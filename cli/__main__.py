"""``python -m dynas.cli``: the same as the ``dynas`` command."""

from dynas.cli import main

raise SystemExit(main())
