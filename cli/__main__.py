"""`python -m cli COMMAND [args]`: see cli/commands.py."""

from cli.commands import main

raise SystemExit(main())
