"""The HTTP service: `create_app(settings)` builds the FastAPI app (see factory.py)."""

from app.http.factory import create_app

__all__ = ["create_app"]
