"""The command line: Typer commands that parse, call one use case, and render with rich. No logic here."""
