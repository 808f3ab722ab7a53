"""The worker mains the multi-process tests launch under torchrun (support.torchrun). Each takes
`--out DIR` and writes DIR/<case>.rank<r>.json per case and rank; the test that launches it asserts."""
from pathlib import Path

WORKERS = Path(__file__).resolve().parent
