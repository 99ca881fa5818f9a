"""Per-model patches on shared classes: one class-level dispatcher per (class, attribute), owned by no handle.

transformers' attention runs through class attributes (``Qwen2_5_VLVisionAttention.forward``), but a patch belongs
to a model: two models of one class in one process (an RL policy and its reference, a model under evaluation next
to one in training) may run different arch policies, and either may be reverted first. So:

- ``OWNERS`` maps each patched module *instance* to its handle's ``AttentionState``; a module belongs to at most
  one live handle (patching it again is an error, see ``owner_reasons``).
- ``acquire`` installs a dispatcher on the class once, the first time any handle needs it, and counts holders.
  The dispatcher looks ``self`` up in ``OWNERS``: an owned module runs portvlm's code with its owner's state, any
  other module runs what the class had before (``Hook.fallback``) — upstream's forward, or whatever someone else
  put there.
- ``release`` drops a holder; the last one puts the class attribute back exactly as it was (deleted again if the
  class did not own it), so reverting in any order leaves the other live patches working and the last revert
  leaves the class as it found it.

A forward that is not transformers' own when portvlm first hooks it (a user's port, another library's monkey
patch) is *foreign*: ``foreign_origin`` names where its code comes from, and the caller warns or refuses.
"""

from __future__ import annotations

import functools
import os
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from portvlm.errors import UnsupportedError

_ABSENT = object()

# module instance -> AttentionState of the live handle that owns it
OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
FOREIGN_POLICIES = ("warn", "refuse")


@dataclass(eq=False)  # compared by identity (holders is a set of handles)
class Hook:
    """One class attribute replaced by a dispatcher, and what to put back when its last holder lets go."""

    cls: object  # a class, or a modeling module (its functions are looked up at call time)
    attr: str
    saved: object  # the class's own __dict__ entry before, or _ABSENT (inherited)
    fallback: Callable  # what unowned instances run: the attribute as the class resolved it before
    dispatcher: Callable
    foreign: str | None  # where a non-transformers fallback comes from, or None
    holders: set = field(default_factory=set)

    @property
    def target(self) -> str:
        return f"{owner_name(self.cls)}.{self.attr}"


def owner_name(owner) -> str:
    """``module.Class`` for a class, ``module`` for a module (a modeling module's function is hooked the same way)."""
    if isinstance(owner, types.ModuleType):
        return owner.__name__
    return f"{owner.__module__}.{owner.__qualname__}"


HOOKS: dict[tuple[type, str], Hook] = {}


def _package_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.realpath(path)) + os.sep if path else None


def code_origin(fn) -> str:
    """Where ``fn``'s code lives: ``module.qualname (file)``; the file wins over ``__module__``, which wraps copies."""
    code = getattr(fn, "__code__", None)
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    if code is None:
        return f"{type(fn).__module__}.{qualname} (no Python code: {type(fn).__name__})"
    filename = os.path.realpath(code.co_filename)
    module = next((name for name, m in list(sys.modules.items())
                   if getattr(m, "__file__", None) and os.path.realpath(m.__file__) == filename), None)
    return f"{module or getattr(fn, '__module__', '?')}.{qualname} ({code.co_filename})"


def foreign_origin(fn) -> str | None:
    """``None`` if ``fn`` is transformers' own code, else where it comes from (its code's module and file)."""
    root = _package_dir("transformers")
    code = getattr(fn, "__code__", None)
    if root is not None and code is not None and os.path.realpath(code.co_filename).startswith(root):
        return None
    return code_origin(fn)


def owner_reasons(modules) -> list[str]:
    """Why these modules cannot be patched now (empty: none is owned by a live patch)."""
    owned = [m for m in modules if m in OWNERS]
    if not owned:
        return []
    return [f"{len(owned)} of its modules ({type(owned[0]).__name__}, …) belong to a live portvlm patch: revert that "
            "handle first (or keep using it); portvlm never layers a second patch over the first"]


def acquire(cls, attr: str, make: Callable[[Callable], Callable], token, foreign: str = "warn") -> Hook:
    """Install (once) the dispatcher ``make(fallback)`` as ``cls.attr`` and count ``token`` as a holder.

    ``cls`` is a class, or a module whose function the class's forward looks up at call time."""
    key = (cls, attr)
    current = vars(cls).get(attr, _ABSENT)
    hook = HOOKS.get(key)
    if hook is not None:
        if current is not hook.dispatcher:
            by = "deleted" if current is _ABSENT else f"replaced by {code_origin(current)}"
            raise UnsupportedError(
                f"{hook.target} was {by} after portvlm patched another model of this class; portvlm cannot layer "
                "over it: revert the live portvlm patches first, or apply the other change before portvlm")
        hook.holders.add(token)
        return hook
    fallback = getattr(cls, attr)
    origin = foreign_origin(fallback)
    if origin is not None and foreign == "refuse":
        raise UnsupportedError(
            f"{owner_name(cls)}.{attr} is not transformers' own: it was replaced by {origin}; "
            "portvlm refuses to replace it (foreign='refuse'). Remove that patch, or pass foreign='warn' to let "
            "portvlm run in its place for this model (revert puts it back)")
    dispatcher = make(fallback)
    dispatcher.__portvlm__ = getattr(dispatcher, "__portvlm__", "dispatch")
    hook = Hook(cls, attr, current, fallback, dispatcher, origin, {token})
    setattr(cls, attr, dispatcher)
    HOOKS[key] = hook
    return hook


def release(hook: Hook, token) -> list[str]:
    """Drop ``token``; the last holder restores the class attribute. Returns warnings (empty: restored cleanly)."""
    hook.holders.discard(token)
    if hook.holders or HOOKS.get((hook.cls, hook.attr)) is not hook:
        return []
    del HOOKS[(hook.cls, hook.attr)]
    current = vars(hook.cls).get(hook.attr, _ABSENT)
    if current is not hook.dispatcher:
        by = "deleted" if current is _ABSENT else f"replaced by {code_origin(current)}"
        return [f"{hook.target} was {by} while portvlm's patch was live; left as it is now"]
    if hook.saved is _ABSENT:
        delattr(hook.cls, hook.attr)
    else:
        setattr(hook.cls, hook.attr, hook.saved)
    return []


def by_owner(impl: Callable, fallback: Callable, name: str) -> Callable:
    """``impl(state, fallback, self, ...)`` for modules a live patch owns, ``fallback(self, ...)`` for the rest."""

    @functools.wraps(fallback)
    def dispatch(self, *args, **kwargs):
        state = OWNERS.get(self)
        if state is None:
            return fallback(self, *args, **kwargs)
        return impl(state, fallback, self, *args, **kwargs)

    dispatch.__portvlm__ = name
    dispatch.__wrapped__ = fallback
    return dispatch
