"""The peers vitserve is measured against, each the way its documentation shows it, on our weights.

    python -m bench.peer_apps fastapi  --weights W.safetensors --shape s16 --port P [--device cpu --dtype float32]
    python -m bench.peer_apps litserve --weights W.safetensors --shape s16 --port P [--max-batch-size 8]

Both serve transformers' ViTForImageClassification (SDPA attention) holding the weights of a vitserve native
checkpoint, preprocess with transformers' ViTImageProcessor, and answer POST /predict (multipart `images`
files) with the top-5 classes and their softmax scores, as vitserve's /v1/classify does. Loopback only.

(No `from __future__ import annotations` here: FastAPI must see the real `list[UploadFile]` annotation.)
"""

import argparse
import io

import torch

from bench import common


def load_peer_model(weights: str, shape: str, device: str, dtype: str):
    from safetensors.torch import load_file
    from transformers import ViTImageProcessor

    model = common.hf_model(shape, load_file(weights)).to(device=device, dtype=getattr(torch, dtype))
    processor = ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, processor


def top5(logits: torch.Tensor, labels: dict) -> list[list[dict]]:
    probs = logits.float().softmax(-1)
    scores, idx = probs.topk(5, dim=-1)
    return [
        [{"index": int(i), "label": labels[int(i)], "score": float(s)} for s, i in zip(srow, irow, strict=True)]
        for srow, irow in zip(scores.tolist(), idx.tolist(), strict=True)
    ]


def fastapi_app(args: argparse.Namespace):
    """A plain FastAPI endpoint: decode, preprocess and run the model in the request, one request at a time."""
    from fastapi import FastAPI, File, UploadFile
    from PIL import Image

    model, processor = load_peer_model(args.weights, args.shape, args.device, args.dtype)
    labels = model.config.id2label
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(images: list[UploadFile] = File(...)) -> dict:  # noqa: B008 - FastAPI's own idiom
        pil = [Image.open(io.BytesIO(f.file.read())).convert("RGB") for f in images]
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(args.device, getattr(torch, args.dtype))
        with torch.inference_mode():
            logits = model(pixel_values=pixels).logits
        return {"results": [{"predictions": p} for p in top5(logits, labels)]}

    return app


def _litserve_api_class():
    import litserve as ls
    from fastapi import Request
    from PIL import Image

    class ViTAPI(ls.LitAPI):
        """LitServe's contract: decode one request, batch, predict, unbatch, encode one response."""

        def __init__(self, weights: str, shape: str, dtype: str, **kwargs):
            super().__init__(**kwargs)
            self.weights, self.shape, self.dtype_name = weights, shape, dtype

        def setup(self, device):
            self.model, self.processor = load_peer_model(self.weights, self.shape, device, self.dtype_name)
            self.labels = self.model.config.id2label
            self.dev = device

        def decode_request(self, request: Request):
            upload = request["images"]
            data = upload.file.read() if hasattr(upload, "file") else upload
            image = Image.open(io.BytesIO(data)).convert("RGB")
            return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

        def batch(self, inputs):
            return torch.stack(inputs)

        def predict(self, x):
            with torch.inference_mode():
                return self.model(pixel_values=x.to(self.dev, getattr(torch, self.dtype_name))).logits

        def unbatch(self, output):
            return list(output)

        def encode_response(self, output):
            return {"results": [{"predictions": top5(output[None], self.labels)[0]}]}

    return ViTAPI


# LitServe starts its inference worker as a new process, which unpickles the API object by its class's name:
# the class must live at module level (it is built lazily so that importing this module needs no litserve).
def __getattr__(name: str):
    if name == "ViTAPI":
        cls = _litserve_api_class()
        cls.__module__, cls.__qualname__ = "bench.peer_apps", "ViTAPI"
        globals()["ViTAPI"] = cls
        return cls
    raise AttributeError(name)


def litserve_server(args: argparse.Namespace):
    """LitServe with its own dynamic batching (max_batch_size, batch_timeout)."""
    import importlib

    import litserve as ls

    api_cls = importlib.import_module("bench.peer_apps").ViTAPI  # by its importable name, even under -m
    api = api_cls(
        args.weights, args.shape, args.dtype, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
    )
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    return ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peer_apps")
    p.add_argument("kind", choices=["fastapi", "litserve"])
    p.add_argument("--weights", required=True, help="a vitserve native .safetensors (timm key names)")
    p.add_argument("--shape", default="s16")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-timeout", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kind == "fastapi":
        import uvicorn

        uvicorn.run(fastapi_app(args), host="127.0.0.1", port=args.port, log_level="warning")
    else:
        litserve_server(args).run(host="127.0.0.1", port=args.port, generate_client_file=False, num_api_servers=1)


if __name__ == "__main__":
    main()
