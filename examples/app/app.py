"""Upload-a-room-photo shopping guide: a small Flask app over an hgm_mm catalogue index.

A person uploads a photo of a room and may say in words what they want; the page names the
room in words when the model is confident of it (`MatchResult.scene_confident`) and says it is not
sure otherwise, then shows the ranked products and a suggested product set (the best product per
category) with their photos, titles, categories, prices and why each is there. The page shows no
model scores: those are for programs, in the JSON of ``POST /api/match``.

    python examples/app/app.py --index DIR [--host 127.0.0.1] [--port 8000]

DIR is a folder written by ``hgm-mm index``. The app is served by waitress, a multi-threaded
WSGI server: it keeps accepting connections while requests wait for the model.

Nothing a user sends reaches the file system by name: the app reads an upload into ``BytesIO``
and never uses the file name the browser sends (waitress itself holds a request body over 512 KB in
an anonymous temporary file while it arrives). Uploads are limited in bytes and decoded with Pillow
only when the header names an accepted format and a pixel count within the limit, by the same
checks as `hgm-mm serve` (`hgm_mm.apps.serving`). Product photos
are served by product id from the index's own metadata, never from a path in a request.
"""
from __future__ import annotations

import argparse
import base64
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Request, abort, jsonify, render_template, request, send_file, url_for
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from hgm_mm.ranking.matcher import Matcher, MatchResult, RankedProduct
from hgm_mm.data.scenes import scene_words
from hgm_mm.apps.serving import (ACCEPTED_MEDIA_TYPES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, MAX_TEXT_CHARS,
                            RequestRefused, read_room_photo, read_wish, result_document)

APP_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = 12
PREVIEW_SIDE = 480
SHOWN_SCENES = 3  # the top few scenes, as plain percentages
CARD_DETAILS = ("product_type", "color", "size")  # catalogue words shown under a product's title


class InMemoryUploadRequest(Request):
    """A request whose uploaded files are held in memory, bounded by ``MAX_CONTENT_LENGTH``.

    Werkzeug's default spills files over 500 KB to temporary files; this app never lets an
    upload reach the file system.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def preview_data_uri(photo: Image.Image) -> str:
    """A small JPEG of the uploaded photo as a data: URI, so it is shown without being stored."""
    preview = photo.copy()
    preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    preview.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _capitalised(words: str) -> str:
    return words[:1].upper() + words[1:]


def _with_article(words: str) -> str:
    return ("an " if words[:1].lower() in ("a", "e", "i", "o", "u") else "a ") + words


def scene_headline(result: MatchResult) -> str:
    """The headline for a result: the scene in words when the model is confident of it ("Living
    room"), else that it is not sure, naming the two likeliest scenes ("Not sure which room this is
    — maybe a living room or a bedroom")."""
    if result.scene_confident:
        return _capitalised(scene_words(result.scene))
    likeliest = [_with_article(scene_words(label)) for label in list(result.scene_probabilities)[:2]]
    if not likeliest:
        return "Not sure which room this is"
    return "Not sure which room this is — maybe " + " or ".join(likeliest)


def scene_percentages(result: MatchResult, count: int = SHOWN_SCENES) -> list[tuple[str, str, int, str]]:
    """The ``count`` likeliest scenes as (label, words, whole percent, percent text), likeliest first;
    a scene under half a percent reads "<1%" rather than a misleading "0%"."""
    rows = []
    for label, probability in list(result.scene_probabilities.items())[:count]:
        percent = round(float(probability) * 100)
        text = f"{percent}%" if percent >= 1 or probability <= 0 else "<1%"
        rows.append((label, _capitalised(scene_words(label)), percent, text))
    return rows


def category_words(category: Any) -> str:
    """A catalogue category in words ("tableware" -> "Tableware"); empty when there is none."""
    if not isinstance(category, str) or not category.strip():
        return ""
    return _capitalised(category.strip().replace("_", " "))


def format_price(metadata: dict[str, Any]) -> str | None:
    """A product's price for people, or None when the catalogue gives none.

    A number is shown with 2 decimals ("1,299.00"), text as the catalogue gives it ("from 49 kr").
    A ``currency`` field is added: a one-character symbol before the number ("$12.50"), a code or
    word after it ("12.50 SEK"), and not at all when the price text already holds it.
    """
    price = metadata.get("price")
    if isinstance(price, bool):  # JSON true/false is not a price
        return None
    if isinstance(price, (int, float)):
        if not math.isfinite(price):
            return None
        text = f"{price:,.2f}"
    elif isinstance(price, str) and price.strip():
        text = price.strip()
    else:
        return None
    currency = metadata.get("currency")
    if not isinstance(currency, str) or not currency.strip() or currency.strip() in text:
        return text
    currency = currency.strip()
    if len(currency) == 1 and not currency.isalnum():
        return currency + text
    return f"{text} {currency}"


@dataclass
class ProductCard:
    """What a product tile shows: words and a photo, no model scores."""

    product_id: str
    title: str
    category: str  # in words, "" when the catalogue has none
    photo_url: str
    details: list[str]  # the product type, colour and size the catalogue gives
    price: str | None  # formatted by `format_price`
    why: str  # why the product is there, "" when the result does not say


def product_card(product: RankedProduct) -> ProductCard:
    """The tile for one ranked product; needs a Flask request context (for the photo's URL).

    A result from before `RankedProduct.why` existed, or one that leaves it empty, gives a tile
    without that sentence.
    """
    meta = product.metadata or {}
    details = [str(meta[key]).strip() for key in CARD_DETAILS
               if isinstance(meta.get(key), (str, int)) and not isinstance(meta.get(key), bool)
               and str(meta[key]).strip()]
    return ProductCard(
        product_id=product.product_id,
        title=str(meta.get("title") or product.product_id),
        category=category_words(meta.get("category")),
        photo_url=url_for("product_photo", product_id=product.product_id),
        details=details,
        price=format_price(meta),
        why=str(getattr(product, "why", "") or "").strip(),
    )


def create_app(matcher: Matcher, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, results: int = DEFAULT_RESULTS) -> Flask:
    """The Flask app serving one catalogue.

    Args:
        matcher: The catalogue and model (``Matcher.load(index_dir)``); called from several
            request threads at once, which the Matcher allows.
        max_upload_bytes: Largest request body accepted (the photo and the words).
        max_pixels: Largest photo accepted, in width * height.
        results: How many ranked products to show.

    Routes:
        ``GET /``: the upload form.
        ``POST /match``: the form's results page (fields ``photo`` and ``text``), in words only.
        ``POST /api/match``: the same for programs as JSON, ``MatchResult.to_dict()`` (scores,
        reasons and ``why`` included) with each product's image path replaced by its ``photo_url``.
        ``GET /products/<product_id>/photo``: a product photo named by the index's metadata.
    """
    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels), ("results", results)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive int")
    app = Flask(__name__, root_path=str(APP_DIR))
    app.request_class = InMemoryUploadRequest
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.json.sort_keys = False  # scene probabilities and products keep their order, most likely first
    limits = {"max_upload_mb": f"{max_upload_bytes / 2**20:g}", "max_megapixels": f"{max_pixels / 1e6:g}",
              "max_text_chars": MAX_TEXT_CHARS, "accept": ",".join(ACCEPTED_MEDIA_TYPES)}

    def run_match() -> tuple[MatchResult, Image.Image, str | None]:
        upload = request.files.get("photo")
        photo = read_room_photo(upload.stream.read() if upload is not None else b"", max_pixels=max_pixels)
        wish = read_wish(request.form.get("text"))
        return matcher.match(image=photo, text=wish, k=results), photo, wish

    def page(status: int = 200, **context: Any):
        return render_template("index.html", limits=limits, **context), status

    @app.get("/")
    def home():
        return page()

    @app.post("/match")
    def match_page():
        try:
            result, photo, wish = run_match()
        except RequestRefused as refusal:
            return page(refusal.status, error=refusal.message, wish=request.form.get("text", ""))
        return page(result=result, headline=scene_headline(result), scenes=scene_percentages(result),
                    wish=wish or "", preview=preview_data_uri(photo),
                    products=[product_card(p) for p in result.products],
                    product_set=[product_card(p) for p in result.product_set])

    @app.post("/api/match")
    def match_api():
        try:
            result, _, _ = run_match()
        except RequestRefused as refusal:
            return jsonify(error=refusal.message), refusal.status
        return jsonify(result_document(result, lambda product_id: url_for("product_photo", product_id=product_id)))

    @app.get("/products/<path:product_id>/photo")
    def product_photo(product_id: str):
        if product_id not in matcher.index:
            abort(404)
        image = matcher.index.metadata(product_id).get("image")
        if not isinstance(image, str) or not Path(image).is_file():
            abort(404)
        return send_file(image, max_age=24 * 3600)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_error):
        message = (f"This upload is larger than {limits['max_upload_mb']} MB. Choose a smaller photo "
                   "or save it at a lower quality and upload it again.")
        if request.path.startswith("/api/"):
            return jsonify(error=message), 413
        return page(413, error=message)

    @app.after_request
    def security_headers(response):
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                       "style-src 'self'; form-action 'self'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Upload a room photo, see the scene and the products that fit it.")
    parser.add_argument("--index", required=True, type=Path, help="a folder written by `hgm-mm index`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    parser.add_argument("--threads", type=int, default=8, help="request threads (default: 8)")
    parser.add_argument("--results", type=int, default=DEFAULT_RESULTS, help="ranked products shown (default: 12)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                        help="largest upload in MiB (default: 16)")
    parser.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6,
                        help="largest photo in megapixels (default: 25)")
    parser.add_argument("--device", default=None, help="torch device for the model (default: the Matcher's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Loads the index and serves the app until interrupted."""
    import waitress

    args = parse_args(argv)
    try:
        matcher = Matcher.load(args.index, device=args.device).warm_up()
    except (FileNotFoundError, ValueError) as error:
        print(f"error: --index {args.index}: {error}", file=sys.stderr)
        return 2
    max_upload_bytes = int(args.max_upload_mb * 2**20)
    app = create_app(matcher, max_upload_bytes=max_upload_bytes, max_pixels=int(args.max_megapixels * 1e6),
                     results=args.results)
    # waitress refuses bodies far over the app's limit itself; the app answers the rest with a page.
    server = waitress.create_server(app, host=args.host, port=args.port, threads=args.threads,
                                    max_request_body_size=2 * max_upload_bytes + 2**20)
    print(f"Serving on http://{server.effective_host}:{server.effective_port}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
