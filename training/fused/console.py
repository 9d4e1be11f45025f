"""Console output of a fused group: each line a cell's thread prints starts with the cell's label."""
import threading
from typing import Dict


class CellStream:
    """sys.stdout / sys.stderr for the cells' threads: each line a cell writes starts with `[label] `."""

    def __init__(self, stream, labels: Dict[int, str]):
        self.stream, self.labels, self.at_line_start = stream, labels, True

    def write(self, text: str) -> int:
        label = self.labels.get(threading.get_ident())
        if label is not None and text:
            lines = text.split("\n")
            text = "\n".join(f"[{label}] {line}" if line and (k or self.at_line_start) else line
                             for k, line in enumerate(lines))
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)
