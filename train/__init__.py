"""Training OmniMoE language models: `python -m train` (see train/__main__.py, train/loop.py, train/steps.py)."""
