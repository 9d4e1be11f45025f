"""The seed's name for train_lowrank.py: the same flags, the same outputs (docs/lowrank.md)."""
import sys

from lowrank.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
