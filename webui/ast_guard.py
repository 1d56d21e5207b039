"""One `ast.parse` at a time in this process, on CPython before 3.13.

There, the AST-to-Python converter keeps its recursion depth per interpreter, not per thread
(CPython gh-106905), so two threads parsing at once can fail with "SystemError: AST constructor
recursion depth mismatch". The app does exactly that: Streamlit parses each page script (for
its magic) in the session's thread while the loading thread opens the collection, where torch's
JIT overloads, `inspect.signature` and numpy's `.npy` header reader all call `ast.parse`. A
page then failed at random with that error. Importing this module (webui.state does) wraps
`ast.parse` (which `ast.literal_eval` calls too) in a process-wide lock.
"""

from __future__ import annotations

import ast
import sys
import threading
from typing import Any

_LOCK = threading.RLock()  # re-entrant: a parse can run a finalizer that parses
_PARSE = ast.parse


def locked_parse(*args: Any, **kwargs: Any) -> ast.AST:
    """`ast.parse`, serialised across threads."""
    with _LOCK:
        return _PARSE(*args, **kwargs)


if sys.version_info < (3, 13) and ast.parse is _PARSE:
    ast.parse = locked_parse
