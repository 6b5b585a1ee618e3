"""`python -m pickrank`."""

from .cli import run

run()
