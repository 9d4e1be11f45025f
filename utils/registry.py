"""Name -> factory registries; an unknown name lists the valid ones."""
from typing import Callable, Dict, Generic, TypeVar

from utils.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, flag: str):
        self.kind, self.flag = kind, flag
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = item
            return item
        return add

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise UsageError(f"{self.flag}: unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")
        return self._items[name]

    def names(self):
        return sorted(self._items)
