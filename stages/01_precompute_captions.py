"""Stage 01 for text: embed every caption of a dataset once (for 02_align), into a store like the audio one.

Usage: uv run stages/01_precompute_captions.py --help   (the same command as `mellow precompute-captions`)
"""

from mellow.cli import run_stage

if __name__ == "__main__":
    run_stage("precompute-captions")
