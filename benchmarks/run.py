"""Run every benchmark, write benchmarks/results.json, print the markdown report the README quotes.

    python benchmarks/run.py            # sizes that finish in a few minutes on a CPU
    python benchmarks/run.py --full     # the sizes the README's figures come from
    python benchmarks/run.py --only train generate

Each `bench_<name>.py` beside this file has `run(quick: bool) -> dict` and `markdown(results) -> str`;
every ratio in a report is measured side by side within one run, on one machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("prepare", "train", "generate", "sampling", "export", "serve")


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the README's sizes (slower)")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    ap.add_argument("--out", default=str(HERE / "results.json"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    m = machine()
    results: dict = {"machine": m, "quick": not args.full}
    sections = [f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores)"
                + (f" + {m['gpu']}" if m["gpu"] else ", no GPU") + f", torch {m['torch']}, Python {m['python']}."]
    for name in args.only:
        module = importlib.import_module(f"bench_{name}")
        print(f"running bench_{name} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        res = module.run(quick=not args.full)
        res["wall_s"] = round(time.time() - t0, 1)
        results[name] = res
        sections.append(f"### {name}\n\n{module.markdown(res)}")
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
