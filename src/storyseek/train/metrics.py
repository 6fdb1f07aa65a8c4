"""What training reports: the console line, OUT/training_log.csv, TensorBoard/W&B, the plot, MFU.

Console, per evaluation (the original project's format, then a second line of details):

    iter 1000: train_loss 2.3456, val_loss 2.1234, val_bpb 0.9876, lr 6.00e-04, time 45.23s
    GPU memory: 2.34 GB | 5,432 tokens/s | mtp_loss 2.9876 | balance_loss 0.0002 | max_expert_load 0.31
"""

from __future__ import annotations

import csv
import math
import os
import resource
import sys
from pathlib import Path

import torch

from ..checkpoint.pt import METRICS_CSV, METRICS_PLOT
from ..errors import StoryseekError
from ..files import atomic_write
from ..model import ModelConfig

CSV_COLUMNS = ("iteration", "train_loss", "val_loss", "learning_rate", "elapsed_time", "gpu_memory_gb",
               "tokens_per_sec", "mtp_loss", "balance_loss", "max_expert_load", "grad_norm", "mfu", "ram_gb", "val_bpb")

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; fp32 runs are measured against the same peak.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def flops_per_token(cfg: ModelConfig, seq_len: int, active_params: int, mtp_params: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), nanoGPT's estimate_mfu / PaLM app. B:
    6 N for the matmul weights a token passes through (active experts only; the lm_head once per
    prediction: 1 + mtp_depth times) + 6 * layers * n_head * (d_qk + d_v) * T for attention scores."""
    idle = cfg.n_routed_experts - cfg.n_activated_experts
    expert = 3 * cfg.n_embd * cfg.moe_inter_dim
    mtp_active = mtp_params - cfg.mtp_depth * idle * expert
    head = cfg.vocab_size * cfg.n_embd * (1 + cfg.mtp_depth)
    attn = 6 * (cfg.n_layer + cfg.mtp_depth) * cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6 * (active_params + mtp_active + head) + attn


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)


def ram_gb() -> float:
    """This process's resident memory now (Linux), else its peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1e9 if sys.platform == "darwin" else 1e6)


def gpu_memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0


def console_line(it: int, train_loss: float, val_loss: float, lr: float, elapsed: float,
                 val_bpb: float | None = None) -> str:
    bpb = f", val_bpb {val_bpb:.4f}" if val_bpb is not None else ""
    return f"iter {it}: train_loss {train_loss:.4f}, val_loss {val_loss:.4f}{bpb}, lr {lr:.2e}, time {elapsed:.2f}s"


def detail_line(row: dict, device: torch.device) -> str:
    mem = f"GPU memory: {row['gpu_memory_gb']:.2f} GB" if device.type == "cuda" else f"RAM: {row['ram_gb']:.2f} GB"
    parts = [mem]
    if row.get("tokens_per_sec"):
        parts.append(f"{row['tokens_per_sec']:,.0f} tokens/s")
    for key in ("mtp_loss", "balance_loss", "max_expert_load", "grad_norm"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.4f}")
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    return " | ".join(parts)


class MetricsLog:
    """Rank 0's sinks: the CSV (and TensorBoard / W&B when asked). On resume the CSV keeps the rows
    up to the checkpoint and drops the ones a killed run logged after it."""

    def __init__(self, out: Path, resume_iter: int | None, tensorboard: bool, wandb: bool,
                 wandb_project: str, run_config: dict):
        self.path = out / METRICS_CSV
        rows = _read_rows(self.path) if resume_iter is not None and self.path.is_file() else []
        kept = [r for r in rows if int(r["iteration"]) <= resume_iter] if resume_iter is not None else []
        with atomic_write(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise StoryseekError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise StoryseekError("--wandb needs the wandb package: pip install wandb") from None
            # Offline unless the user configured W&B: a run never fails for lack of a network or login.
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wb.init(project=wandb_project, dir=str(out), config=run_config, mode=mode,
                                 resume="allow")

    def log(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(
                {k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
            f.flush()
        scalars = {k: v for k, v in row.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["iteration"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["iteration"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_metrics(csv_path: str | Path, png_path: str | Path | None = None) -> Path:
    """training_metrics.png beside the CSV: losses, learning rate, and MTP / balance loss when logged."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise StoryseekError(f"training log not found: {csv_path}")
    try:
        rows = _read_rows(csv_path)
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise StoryseekError(f"{csv_path}: unreadable training log ({e})") from None
    if not rows or list(rows[0])[: len(CSV_COLUMNS[:6])] != list(CSV_COLUMNS[:6]):
        raise StoryseekError(f"{csv_path} is not a storyseek training log (no rows, or not its columns)")

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["iteration"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        pts = [(i, v) for i, v in pts if math.isfinite(v)]
        return [i for i, _ in pts], [v for _, v in pts]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", ["train_loss", "val_loss"])]
    panels += [("val bits per byte", ["val_bpb"])] * bool(series("val_bpb")[0])
    panels += [("learning rate", ["learning_rate"])]
    panels += [(k.replace("_", " "), [k]) for k in ("mtp_loss", "balance_loss") if series(k)[0]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            xs, ys = series(key)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key.replace("_", " "))
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    axes[-1, 0].set_xlabel("iteration")
    fig.suptitle(f"storyseek training: {csv_path.parent.name}")
    fig.tight_layout()
    png = Path(png_path) if png_path else csv_path.with_name(METRICS_PLOT)
    with atomic_write(png) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return png
