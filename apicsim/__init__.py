"""User-facing tools: the ``apicsim`` command, the scenario runner, the real-KVM backend."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apicsim.session import Session

__all__ = ["Session"]


def __getattr__(name: str) -> Any:
    # ``apicsim.Session`` without importing the model for ``apicsim --help``.
    if name == "Session":
        from apicsim.session import Session

        return Session
    raise AttributeError(f"module 'apicsim' has no attribute {name!r}")
