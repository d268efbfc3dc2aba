"""kill -9 at random moments during extraction, reduction and classification, then resume.

Each round starts the pipeline on a fresh store, kills it with SIGKILL after a random delay
(anywhere from decoding to writing the report), runs it again to completion and compares the
store and results with an uninterrupted reference run: features equal within float32 rounding
(tests/floats.py), reduction within 1e-5, same accuracies, no half-written model accepted.
The loop is benchmarks/kill_loop.py, the same one `make test` runs 20 rounds of
(tests/flows/test_kill_resume.py).

    .venv/bin/python -m benchmarks.kill_resume --rounds 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.kill_loop import run_kill_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fp-kill-") as work:
        result = run_kill_loop(Path(work), args.rounds, args.seed)
    print(f"wall time {time.perf_counter() - began:.0f} s")
    raise SystemExit(0 if result.n_same == len(result.rounds) else 1)


if __name__ == "__main__":
    main()
