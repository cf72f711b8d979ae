"""Training OmniMoE language models: `python -m train` (see train/__main__.py and train/loop.py)."""
