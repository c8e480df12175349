"""Stage 01: decode audio through ffmpeg, run the frozen encoder once, write the embedding store.

Usage: uv run stages/01_precompute.py --help   (the same command as `mellow precompute`)
"""

from mellow.cli import run_stage

if __name__ == "__main__":
    run_stage("precompute")
