"""Where in a nested value a problem is, spelled as a client or an operator reads it.

Shared by the request bodies (a 400's `param`) and the config file (`<file>: <key>`),
so both name places the same way. Pure standard library: the config imports it before
Django is set up."""

from __future__ import annotations


def dotted_key(loc: tuple[str | int, ...], below: str = "") -> str:
    """`("messages", 0, "role")` → `messages[0].role`; `below` (`"[2]"`, `"a.b"`) names a
    part further down that a validator pointed at; "" for the value itself."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    if below:
        key += below if below.startswith("[") or not key else f".{below}"
    return key
