"""``python -m metaopt_core.evaluate --config FILE``: see :mod:`metaopt_core.evaluate.cli`."""

from metaopt_core.evaluate.cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
