"""`python -m busway` is the `busway` command."""

from busway._cli import main

raise SystemExit(main())
