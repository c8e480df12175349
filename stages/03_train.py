"""Stage 03: train the audio projector and decoder from the store (plain or under torchrun).

Usage: uv run stages/03_train.py --help   (the same command as `mellow train`)
"""

from mellow.cli import run_stage

if __name__ == "__main__":
    run_stage("train")
