"""gridserve: an LLM serving engine (paged KV cache, radix prefix cache, continuous batching)."""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import gridserve` light: torch loads only when the Engine is used
    if name == "Engine":
        from gridserve.entrypoints.engine import Engine

        return Engine
    raise AttributeError(name)
