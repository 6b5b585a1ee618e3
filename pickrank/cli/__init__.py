"""The command line: the Typer app, the one command lifecycle, and one module per command or command family."""
