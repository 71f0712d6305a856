"""Chat templates rendered the way transformers renders them, with jinja2 alone.

A model's chat template is a Jinja program from its tokenizer config. transformers runs it in a sandboxed
environment with `trim_blocks` and `lstrip_blocks`, the loop-control extension, a `{% generation %}` block tag,
its own `tojson` filter (no HTML escaping) and the globals `raise_exception` and `strftime_now`, and passes the
messages, `tools`, `documents`, `add_generation_prompt`, the named special tokens and any extra keyword
arguments. This module does the same, so the front end need not import transformers (seconds of start-up).
`tests/test_tokenizer.py` checks the output against transformers' on the embedded and Qwen3 templates.
"""

import functools
import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Older names for a message's reasoning: a template that reads one of them sees it under each (as transformers 5 does)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's part (training masks); rendering keeps it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict[str, str],
                tools: list[dict] | None = None, documents: list[dict] | None = None, **kwargs) -> str:
    """The conversation as the model's prompt text. Raises jinja2's TemplateError for a conversation the template
    rejects (its raise_exception) and TypeError for a message that is not a dict."""
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages must be dicts, got {m!r}")
    return _compile(template).render(messages=[_alias_reasoning(m) for m in messages], tools=tools,
                                     documents=documents, add_generation_prompt=add_generation_prompt,
                                     **{**special_tokens, **kwargs})


def pick_template(templates: str | list | dict | None, tools: list | None = None) -> str | None:
    """The template of a tokenizer config's `chat_template` to render with: a string, or named templates (a list of
    {"name", "template"} in the config file, a dict once loaded), of which "tool_use" when tools are given and it
    exists, else "default"."""
    if isinstance(templates, list):
        templates = {t["name"]: t["template"] for t in templates}
    if isinstance(templates, dict):
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" not in templates:
            raise ValueError(f"this model has several chat templates and none named default: {sorted(templates)}")
        return templates["default"]
    return templates
