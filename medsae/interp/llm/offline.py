"""The offline ``medsae/<name>`` litellm provider: deterministic Python functions posing as LLMs.

Why: the pipeline must run, and be tested, with no network and no API key, through exactly the
same path as a real model (gateway -> ``litellm.acompletion`` -> provider). This module registers a
litellm custom provider named ``medsae`` (``litellm.custom_provider_map`` + a ``litellm.CustomLLM``
subclass), so that ``litellm.acompletion(model="medsae/<name>", ...)`` calls the handler registered
under ``<name>``.

A handler is ``handler(messages, params) -> str``: it receives the OpenAI-style messages and the
sampling parameters (temperature, max_tokens, seed, logprobs, ...) and returns the answer text.
It should be deterministic. Token counts are rough (whitespace-separated words).

Built in: ``medsae/echo`` (answers the text of the last user message). The explainer/simulator
rules (``medsae/baseline``, :mod:`medsae.interp.llm.rule_model`) register themselves with
:func:`register_offline_model`.

A handler's version (:func:`handler_version`, the sha256 of its module's source) enters the hash of
every request to it, so editing its rules invalidates the cached answers instead of serving old ones.
"""

from __future__ import annotations

import importlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from medsae.errors import MedsaeError

PROVIDER = "medsae"
OFFLINE_PREFIX = PROVIDER + "/"
OfflineHandler = Callable[[list[dict], dict], str]

# Modules that register offline models when imported; tried (and skipped if absent) on first use.
PLUGIN_MODULES: tuple[str, ...] = ("medsae.interp.llm.rule_model",)

_HANDLERS: dict[str, OfflineHandler] = {}
_VERSIONS: dict[int, str] = {}  # id(handler) -> sha256 of its module source
_LOCK = threading.Lock()
_PROVIDER_INSTANCE: Any = None
_PLUGINS_LOADED = False


def register_offline_model(name: str, handler: OfflineHandler) -> None:
    """Make ``medsae/<name>`` answer with ``handler(messages, params)``; re-registering replaces it."""
    if not name or "/" in name:
        raise MedsaeError(f"offline model name {name!r} must be non-empty and contain no '/'")
    with _LOCK:
        _HANDLERS[name] = handler


def offline_model_names() -> list[str]:
    """Names registered so far (after loading the plugin modules), sorted."""
    _load_plugins()
    with _LOCK:
        return sorted(_HANDLERS)


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the plugin exists but one of its imports is missing: a real bug
                raise


def handler_version(model: str) -> str | None:
    """sha256 of the source of the module implementing an offline model (None for other models).

    It enters the LLM cache key, so editing the rules of ``medsae/baseline`` invalidates its cached
    answers instead of silently serving the old ones.
    """
    if not model.startswith(OFFLINE_PREFIX):
        return None
    import hashlib
    import inspect

    _load_plugins()
    handler = _HANDLERS.get(model.split("/", 1)[1])
    if handler is None:
        return None
    cached = _VERSIONS.get(id(handler))
    if cached is not None:
        return cached
    module = inspect.getmodule(handler)
    try:
        source = inspect.getsource(module) if module else handler.__qualname__
    except (OSError, TypeError):
        source = handler.__qualname__
    digest = hashlib.sha256(source.encode()).hexdigest()
    _VERSIONS[id(handler)] = digest
    return digest


def message_text(message: dict) -> str:
    """The text parts of one chat message (image parts are skipped)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _echo(messages: list[dict], params: dict) -> str:
    """Built-in test model: the text of the last user message."""
    users = [m for m in messages if m.get("role") == "user"]
    return message_text(users[-1]) if users else ""


register_offline_model("echo", _echo)


def _answer(model: str, messages: list[dict], optional_params: dict, model_response: Any) -> Any:
    """Run the handler of ``model`` and dress its text as a litellm ``ModelResponse``."""
    from litellm.llms.custom_llm import CustomLLMError
    from litellm.types.utils import Usage

    name = model.split("/", 1)[1] if model.startswith(OFFLINE_PREFIX) else model
    _load_plugins()
    with _LOCK:
        handler = _HANDLERS.get(name)
    if handler is None:
        raise CustomLLMError(status_code=404, message=f"no offline model medsae/{name} is registered")
    try:
        text = handler(messages, dict(optional_params or {}))
    except Exception as exc:  # a handler bug is not worth retrying: report it as a client error
        message = f"offline model medsae/{name}: {type(exc).__name__}: {exc}"
        raise CustomLLMError(status_code=400, message=message) from exc
    if not isinstance(text, str):
        message = f"offline model medsae/{name} returned {type(text).__name__}, not str"
        raise CustomLLMError(status_code=400, message=message)
    prompt_tokens = sum(len(message_text(m).split()) for m in messages)
    completion_tokens = len(text.split())
    model_response.id = f"medsae-{uuid.uuid4().hex[:12]}"
    model_response.created = int(time.time())
    model_response.model = f"{PROVIDER}/{name}"
    model_response.choices[0].message.content = text
    model_response.choices[0].finish_reason = "stop"
    model_response.usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    return model_response


def _provider_class() -> type:
    """The ``CustomLLM`` subclass, built on first use so importing this module stays cheap."""
    import litellm

    class OfflineProvider(litellm.CustomLLM):
        """litellm custom provider that dispatches ``medsae/<name>`` to registered Python handlers."""

        def completion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> Any:
            return _answer(model, messages, kwargs.get("optional_params") or {}, kwargs["model_response"])

        async def acompletion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> Any:
            return _answer(model, messages, kwargs.get("optional_params") or {}, kwargs["model_response"])

    return OfflineProvider


def ensure_offline_provider() -> None:
    """Register the ``medsae`` provider with litellm (idempotent, thread-safe)."""
    global _PROVIDER_INSTANCE
    import litellm

    with _LOCK:
        if _PROVIDER_INSTANCE is None:
            _PROVIDER_INSTANCE = _provider_class()()
        present = any(item.get("provider") == PROVIDER for item in litellm.custom_provider_map)
        if not present:
            litellm.custom_provider_map = [
                *litellm.custom_provider_map,
                {"provider": PROVIDER, "custom_handler": _PROVIDER_INSTANCE},
            ]
    _load_plugins()


__all__ = [
    "OFFLINE_PREFIX",
    "OfflineHandler",
    "ensure_offline_provider",
    "message_text",
    "offline_model_names",
    "register_offline_model",
]
