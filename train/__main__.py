"""`python -m train --help`: train an OmniMoE language model (see train/cli.py)."""

from train.cli import main

raise SystemExit(main())
