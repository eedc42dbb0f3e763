"""vitserve: a Vision Transformer inference service. The engine is importable on its own."""

from app.engine import Model, Output, load_model

__all__ = ["Model", "Output", "load_model"]
