"""A JSON response rendered by orjson: numpy arrays and scalars go out without a Python-list detour."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class FastJSON(JSONResponse):  # a JSONResponse, so the OpenAPI document calls its body JSON
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=OPTIONS)
