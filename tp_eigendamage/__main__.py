"""``python -m tp_eigendamage`` — same as the ``tp-eigendamage`` command."""
from .cli import main

raise SystemExit(main())
