"""storyseek.serve: the story page and an OpenAI-compatible API over one continuously batched model.

engine.py (rows joining and leaving one decode batch on the latent cache) -> scheduler.py (the one
decode loop and its queue) -> protocol.py (the OpenAI wire format) -> app.py (routes, the command).
"""
