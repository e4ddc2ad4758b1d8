"""`python -m rnnc.cli_entry ...` runs the command line (for subprocess tests and scripts)."""

from .cli import entry

if __name__ == "__main__":
    entry()
