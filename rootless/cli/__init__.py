"""The command line: argparse, dispatch, and the only code that prints."""
