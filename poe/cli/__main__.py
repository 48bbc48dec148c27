"""`python -m poe.cli`: the same as the `poe` command."""

from poe.cli.main import main

raise SystemExit(main())
