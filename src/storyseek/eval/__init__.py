"""How good is a model: held-out loss, perplexity and bits per byte (score.py) on prepared data,
local files or a Hub dataset (sources.py), and cheap story checks on sampled stories (stories.py)."""
