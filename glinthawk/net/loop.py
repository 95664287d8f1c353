"""Event loops: uvloop when it is installed."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def install_event_loop_policy() -> bool:
    """Make new event loops uvloop ones when uvloop is installed; return whether it is."""
    if (uvloop := _uvloop()) is None:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a uvloop event loop when uvloop is installed."""
    uvloop = _uvloop()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        return runner.run(main)
