"""The browser client, served at /web/ (`serve --web DIR`): a static page that obfuscates in the browser.

The page runs the exported obfuscator (DIR/obfuscator.onnx, written by `privoffload export RUN --format onnx`)
in ONNX Runtime Web (WebAssembly, served from here: nothing from another site), uploads only the 8-bit
O(x) to this service's /v2 inference route with the token the user types, and shows the picture, the upload,
the top-5 answer and, when DIR holds attack.onnx (an attack run's decoder, exported alike), what that
attacker rebuilds from the upload. The page and its files are public, like the obfuscator every device
holds; inference still needs the token. Every file is named here: nothing else under /web/ is served.
The runtime (ort.wasm.bundle.min.mjs, ort-wasm-simd-threaded.wasm) is copied into static/ort/ from npm by
`make web` (web/package.json pins its version).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from ..errors import UserError
from .schemas import ApiError

STATIC = Path(__file__).parent / "static"
PAGE = {"": "index.html", "app.js": "app.js", "style.css": "style.css"}
RUNTIME = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm")
MODELS = {"obfuscator": "obfuscator.onnx", "attack": "attack.onnx"}  # attack.onnx is optional
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".wasm": "application/wasm",
         ".onnx": "application/octet-stream"}
# the page may run scripts and WebAssembly from here and talk to here, nothing else
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; "
                               "img-src 'self' blob: data:; style-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
}


def describe(folder: str | Path) -> tuple[dict[str, Path], dict]:
    """(name under /web/ -> file, models.json) for a web folder; a one-line error if the page could not work."""
    folder = Path(folder)
    missing = [name for name in RUNTIME if not (STATIC / "ort" / name).is_file()]
    if missing:
        raise UserError(f"the browser runtime is not installed ({missing[0]} is missing): run `make web` "
                        f"(npm ci in web/, then copies ONNX Runtime Web into the package)")
    if not (folder / MODELS["obfuscator"]).is_file():
        raise UserError(f"--web {folder} must hold obfuscator.onnx: privoffload export RUN --format onnx "
                        f"--out {folder}/obfuscator.onnx")
    files = {name: STATIC / page for name, page in PAGE.items()}
    files.update({f"ort/{name}": STATIC / "ort" / name for name in RUNTIME})
    models: dict = {}
    for role, name in MODELS.items():
        if not (folder / name).is_file():
            models[role] = None
            continue
        meta = _sidecar(folder / name)
        models[role] = {"url": name, "image": [int(v) for v in meta["image"].split("x")], "sha256": meta["sha256"],
                        "arch": meta.get("arch", ""), "width": meta.get("width", "")}
        files[name] = folder / name
    if models["attack"] and models["attack"]["image"] != models["obfuscator"]["image"]:
        raise UserError(f"{folder}/attack.onnx takes {models['attack']['image']} images, the obfuscator makes "
                        f"{models['obfuscator']['image']}: export the attack on this obfuscator")
    return files, models


def _sidecar(path: Path) -> dict:
    """The exporter's FILE.json: the format and the image shape the page needs."""
    meta_path = path.with_name(path.name + ".json")
    try:
        meta = json.loads(meta_path.read_text())
        c, h, w = (int(v) for v in meta["image"].split("x"))
        ok = meta["format"] == "onnx" and c in (1, 3) and h > 0 and w > 0 and isinstance(meta["sha256"], str)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read {meta_path} ({type(e).__name__}); export {path} again with "
                        f"privoffload export") from None
    if not ok:
        raise UserError(f"{meta_path} does not describe an ONNX export; export {path} again with --format onnx")
    return meta


def router(folder: str | Path) -> APIRouter:
    files, models = describe(folder)
    web = APIRouter(tags=["web"], include_in_schema=False)

    @web.get("/web")
    def root():
        return RedirectResponse("/web/")

    @web.get("/web/models.json")
    def models_json():
        return JSONResponse(models, headers=HEADERS)

    @web.get("/web/{name:path}")
    def asset(name: str):
        if name not in files:
            raise ApiError(404, f"no file /web/{name[:64]}")
        path = files[name]
        return FileResponse(path, media_type=TYPES[path.suffix], headers=HEADERS)

    return web
