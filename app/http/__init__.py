"""The HTTP service: `app.http.factory.create_app(settings)` builds the FastAPI app.

This package imports nothing itself: the processes that parse large request bodies (`app.http.pipeline`'s parsers,
run by `app.decode.Decoder.isolated`) import only what parsing needs, never the engine or torch.
"""
