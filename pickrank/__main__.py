"""`python -m pickrank`."""

from pickrank.cli.app import main

main()
