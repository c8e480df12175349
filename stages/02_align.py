"""Stage 02 (optional): warm-start the audio projector, CLAP-style, against the caption store; retrieval scores.

Usage: uv run stages/02_align.py --help   (the same command as `mellow align`)
"""

from mellow.cli import run_stage

if __name__ == "__main__":
    run_stage("align")
