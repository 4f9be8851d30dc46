"""Allow ``python -m nanomsg``."""

from nanomsg.cli import main

raise SystemExit(main())
