"""Stage 00: make a dataset folder (audio + manifests) from a source.

Usage: uv run stages/00_prepare.py --help   (the same command as `mellow prepare`)
"""

from mellow.cli import run_stage

if __name__ == "__main__":
    run_stage("prepare")
