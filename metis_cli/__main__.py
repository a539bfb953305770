"""`python -m metis_cli` == `metis` (the TUI launcher runs training this way in a child process)."""

from metis_cli.cli.main import main

if __name__ == "__main__":
    main()
