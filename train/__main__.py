"""`python -m train --help`: train an OmniMoE language model (see train/cli.py)."""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    # The stored help text, printed before anything imports jax (seconds); train/help.py renders it.
    from train.help import print_help

    print_help()
    raise SystemExit(0)

from train.cli import main  # after the help, which must not wait for jax

raise SystemExit(main())
