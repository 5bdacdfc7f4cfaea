"""`python -m ray_jobs COMMAND [args]`: see ray_jobs/cli.py."""

from ray_jobs.cli import main

raise SystemExit(main())
