"""`python -m pickrank`."""

from pickrank.cli.app import run

run()
