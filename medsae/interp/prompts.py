"""Prompt templates: jinja2 files in ``prompts/``, rendered into chat messages, versioned by hash.

A template is one ``.j2`` file whose rendered text is split into chat messages by marker lines
``[[system]]``, ``[[user]]`` and ``[[assistant]]`` (few-shot examples are user/assistant turns).
Rendering uses ``StrictUndefined`` (a missing variable is an error, never an empty string), and
templates contain no clock or randomness, so the same inputs give the same messages.

The template hash is sha256 over the template's source and the source of every file it includes,
imports or extends (recursively, in a fixed order): editing a few-shot fixture changes the hash,
and with it every explanation id and LLM cache key that depends on it.

Templates are looked up by name in ``$MEDSAE_PROMPTS`` (if set), then the repository's
``prompts/`` folder; a path to a ``.j2`` file works too (its folder is searched first for includes).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from medsae.errors import MissingInputError

MARKER = re.compile(r"^\[\[(system|user|assistant)\]\]\s*$", re.MULTILINE)


def prompts_dir() -> Path:
    """The prompts folder: ``$MEDSAE_PROMPTS`` if set (your own templates), else the packaged ones."""
    env = os.environ.get("MEDSAE_PROMPTS")
    if env:
        return Path(env)
    from medsae.resources import prompts_dir as packaged_prompts_dir

    return packaged_prompts_dir()


@dataclass(frozen=True)
class Template:
    """A loaded prompt template."""

    name: str
    hash: str
    source: str  # the template and every file it pulls in, concatenated (what the hash covers)
    path: Path

    def render(self, **context: Any) -> list[dict[str, Any]]:
        """Chat messages from the template with ``context`` (StrictUndefined)."""
        text = _environment(tuple(self._search_path())).get_template(self.path.name).render(**context)
        return split_messages(text, self.name)

    def _search_path(self) -> list[str]:
        return [str(self.path.parent), str(prompts_dir())]

    def prompt_row(self) -> dict[str, str]:
        """A row of registry table ``prompts``."""
        return {"template_hash": self.hash, "name": self.name, "text": self.source}


@lru_cache(maxsize=8)
def _environment(search_path: tuple[str, ...]) -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(list(dict.fromkeys(search_path))),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def split_messages(text: str, name: str = "template") -> list[dict[str, Any]]:
    """Cut rendered text at ``[[role]]`` marker lines into OpenAI-style messages."""
    parts = MARKER.split(text)
    if parts[0].strip():
        raise MissingInputError(f"prompt {name}: text before the first [[system]]/[[user]] marker")
    messages = []
    for role, body in zip(parts[1::2], parts[2::2], strict=True):
        body = body.strip("\n")
        if body.strip():
            messages.append({"role": role, "content": body.rstrip()})
    if not messages or messages[-1]["role"] != "user":
        raise MissingInputError(f"prompt {name}: the last message must be a [[user]] message")
    return messages


def _resolve(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".j2" and candidate.is_file():
        return candidate.resolve()
    for base in (prompts_dir(),):
        path = base / (name_or_path if name_or_path.endswith(".j2") else f"{name_or_path}.j2")
        if path.is_file():
            return path.resolve()
    raise MissingInputError(f"prompt template '{name_or_path}' not found (looked in {prompts_dir()})")


def _referenced(env: Any, path: Path) -> list[str]:
    import jinja2.meta

    ast = env.parse(path.read_text())
    return sorted(n for n in jinja2.meta.find_referenced_templates(ast) if n)


def load_template(name_or_path: str) -> Template:
    """Load a template by name (``prompts/<name>.j2``) or by path, with its content hash."""
    path = _resolve(name_or_path)
    search = (str(path.parent), str(prompts_dir()))
    env = _environment(tuple(search))
    seen: dict[str, str] = {}
    pending = [path.name]
    while pending:
        ref = pending.pop(0)
        if ref in seen:
            continue
        try:
            source, filename, _ = env.loader.get_source(env, ref)
        except Exception:
            raise MissingInputError(f"prompt {path}: included template '{ref}' not found") from None
        seen[ref] = source
        pending.extend(_referenced(env, Path(filename)))
    # the main file is labelled by role, not name: a renamed copy of a template keeps its hash
    chunks = [f"=== (template)\n{seen[path.name]}"]
    chunks += [f"=== {ref}\n{seen[ref]}" for ref in sorted(k for k in seen if k != path.name)]
    source = "\n".join(chunks)
    digest = hashlib.sha256(source.encode()).hexdigest()
    name = path.stem if path.parent == prompts_dir().resolve() else str(path)
    return Template(name=name, hash=digest, source=source, path=path)
