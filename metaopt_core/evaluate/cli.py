"""The command line: ``python -m metaopt_core.evaluate --config FILE [--json OUT] [--markdown OUT]``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from metaopt_core.config import ConfigError
from metaopt_core.evaluate.compare import count_runs, evaluate
from metaopt_core.evaluate.config import EvaluationConfig


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m metaopt_core.evaluate --config FILE [--json OUT] [--markdown OUT]``."""
    import argparse
    import sys

    from metaopt_core.config import read_config, validate

    parser = argparse.ArgumentParser(prog="python -m metaopt_core.evaluate", description=main.__doc__)
    parser.add_argument("--config", required=True, help="YAML with algorithm: evaluate")
    parser.add_argument("--json", help="write the full result (settings, per-cell summaries, ranks, runs) here")
    parser.add_argument("--markdown", help="write the Markdown tables here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's choice); 1 is fastest for the small demo models on a shared 2-core machine"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: got {args.threads}; allowed: an integer >= 1")
        torch.set_num_threads(args.threads)
    try:  # an ``algorithm:`` other than evaluate is refused, naming the field
        config = validate(EvaluationConfig, read_config(args.config, algorithm="evaluate"), source=args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=count_runs(config), unit="run", dynamic_ncols=True)

    def progress(event: dict) -> None:
        if bar is not None:
            if event["total"] != bar.total:
                bar.total = event["total"]
            bar.set_postfix_str(f"{event['loss']} | {event['dataset']} {event['condition']} | {event['architecture']}")
            bar.update(1)

    started = time.perf_counter()
    result = evaluate(config, progress=progress)
    if bar is not None:
        bar.close()
    markdown = result.to_markdown()
    if args.json:
        result.to_json(args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n")
    print(markdown)
    print(f"{len(result.runs)} runs in {time.perf_counter() - started:.0f} s")
    return 0
