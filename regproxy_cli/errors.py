"""The one exception type the CLI turns into a single line on stderr and a non-zero exit, and message helpers."""

import importlib
import re
from types import ModuleType


class RegproxyError(Exception):
    """An error whose message is written for the user: one line, saying what went wrong and what to do."""


def listed(items: list[str], limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` items joined, and how many more there are: error messages stay one short line."""
    return sep.join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line, or its type name when it has none."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def unpickling_reason(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, as whole sentences: the one naming the refused global
    (``Unsupported global: GLOBAL os.system ...``) when there is one, else the first. Never cut mid-word."""
    sentences = [s.strip().rstrip(".") for s in re.split(r"\.\s+|\n+", str(error)) if s.strip()]
    if not sentences:
        return type(error).__name__
    named = [s for s in sentences if "GLOBAL" in s]
    text = " ".join((named[0] if named else sentences[0]).split())
    return text if len(text) <= 300 else " ".join(text[:300].split()[:-1]) + " ..."


def missing_extra(extra: str, purpose: str) -> str:
    """The one line for an optional dependency that is not installed: what needs it and the pip command."""
    return f"{purpose} needs the '{extra}' extra: pip install 'regproxy[{extra}]'"


def require_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """``module`` imported, or a :class:`RegproxyError` of :func:`missing_extra` when it is not installed. Every
    optional dependency (matplotlib, gradio, onnx, PyAV, pycocotools, OpenCV, ray) is reached through this."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RegproxyError(missing_extra(extra, purpose)) from None
