"""`python -m busway` is the `busway` command."""

from busway._cli.main import main

raise SystemExit(main())
