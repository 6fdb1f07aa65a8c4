"""Checkpoint formats, below train/, generate/ and export/ (all three read or write them).

    pt.py   our `.pt` file: save atomically, load with weights_only, rebuild the model, the run
            directory's file names (latest.pt, best_model.pt, training_log.csv, ...)
    hf.py   the transformers DeepseekV3 layout both ways: tensor names, config.json, and reading an
            exported (or `save_pretrained`) directory into the same dict a `.pt` file gives

`load_checkpoint(path)` takes either, so `generate --model`, `export --model` and `--init-from`
accept a training checkpoint and an exported model directory alike.
"""

from .pt import load_checkpoint, load_pretrained, model_from_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "load_pretrained", "model_from_checkpoint", "save_checkpoint"]
