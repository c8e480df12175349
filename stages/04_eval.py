"""Stage 04: generate answers for a split from the store and score every task.

Usage: uv run stages/04_eval.py --help   (the same command as `mellow eval`)
"""

from mellow.cli import run_stage

if __name__ == "__main__":
    run_stage("eval")
