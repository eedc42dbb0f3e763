"""vitserve: a Vision Transformer inference service. The engine is importable on its own:

    import app
    model = app.load_model(SPEC)

The names are resolved on first use, so `python -m app` can set up the process (threads) before torch loads.
"""

from typing import TYPE_CHECKING

__all__ = ["Model", "Output", "load_model"]

if TYPE_CHECKING:
    from app.engine import Model, Output, load_model


def __getattr__(name: str):  # PEP 562: resolved on first use
    if name in __all__:
        from app import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'app' has no attribute {name!r}")
