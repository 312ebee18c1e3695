"""One registry for everything chosen by name (criterion=, retrain=, model=, dataset=, schedule=).

    CRITERIA = Registry("criterion")

    @CRITERIA.register("magnitude")
    class Magnitude(Criterion): ...

A registry holds whatever the group builds from: classes (criteria, schedules) or functions
(retrain policies, model builders, dataset loaders). It imports no torch, so the config layer
can hold one too. The options classes stay in options.py (where the command line reads them
before torch loads), found by the group's key and the name.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Type, TypeVar

from . import check_choice
from .options import options_of

T = TypeVar("T")


class Registry:
    """The choices of one config group, by name; `group` is the key the command line uses."""

    def __init__(self, group: str):
        self.group = group
        self.entries: Dict[str, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make `obj` available as `<group>=<name>`; the object comes back unchanged,
        so one function may be registered under several names."""

        def wrap(obj: T) -> T:
            # a second file taking the name would silently replace the first
            if name in self.entries:
                raise ValueError(f"{self.group} {name!r} registered twice")
            self.entries[name] = obj
            return obj

        return wrap

    def get(self, name: str):
        """The object registered as `name`; a ConfigError naming the choices otherwise."""
        check_choice(self.group, name, self.entries)
        return self.entries[name]

    __getitem__ = get

    def options(self, name: str) -> Type:
        """The options class of `<group>=<name>` (options.py; the group's base class if it has none)."""
        self.get(name)
        return options_of(self.group, name)

    def names(self) -> List[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Registry({self.group!r}: {', '.join(self.names())})"
