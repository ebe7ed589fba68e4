"""The inputs the handlers refuse, and the message each gets.

One catalogue for two readers: the tests send every case to a real TorchServe and require
exactly the message computed here, and docs/serving.md's table of refusals is written from
it, so neither can drift from the code:

    python -m serving.bad_input            # print the table
    python -m serving.bad_input --write    # replace it in docs/serving.md

A message is computed in-process, through the handler's own decoding (handlers/
image_classifier.py ``decode``), from the row TorchServe 0.12 hands a handler for the
request: a body's bytes under "body" (a str for text/* content types, parsed JSON for
application/json), a multipart form's fields under their names.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DOCS = Path(__file__).resolve().parent.parent / "docs" / "serving.md"
BEGIN = "<!-- refusals: written by python -m serving.bad_input --write -->"
END = "<!-- end of refusals -->"


@dataclass(frozen=True)
class Case:
    """One bad request: ``what`` as the docs' table names it; ``data`` a raw body (with
    ``content_type``) or ``files`` a multipart form (name -> (filename or None, bytes))."""

    name: str
    what: str
    data: bytes | None = None
    content_type: str | None = None
    files: dict = field(default_factory=dict)

    def request(self) -> dict:
        """The keyword arguments of ``requests.post`` that send this case."""
        if self.files:
            return {"files": self.files}
        return {"data": self.data, "content_type": self.content_type}

    def row(self) -> dict:
        """What TorchServe hands the handler for this request."""
        if self.files:
            return {k: v[1].encode() if isinstance(v[1], str) else v[1] for k, v in self.files.items()}
        kind = (self.content_type or "").split(";")[0]
        if kind == "application/json":
            return {"body": json.loads(self.data)}
        if kind.startswith("text/"):
            return {"body": self.data.decode()}
        return {"body": self.data}


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int) -> bytes:
    """A PNG of a few bytes that declares ``width`` x ``height`` grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def sample_jpeg() -> bytes:
    """A small JPEG, the same bytes on every machine (Pillow's encoder is pinned)."""
    ramp = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8) * 2
    return _encoded(Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1)), "JPEG")


def cases() -> list[Case]:
    jpeg = sample_jpeg()

    def array(values, fmt):
        return _encoded(Image.fromarray(np.full((4, 4), values[0], values[1])), fmt)

    return [
        Case("empty body", "an empty body", data=b""),
        Case(
            "plain text",
            "plain text or HTML (not base64)",
            data=b"hello, I am not an image",
            content_type="text/plain",
        ),
        Case("html", "", data=b"<!doctype html><html><body>hi</body></html>", content_type="text/html"),
        Case("json body", "a JSON body", data=b'{"image": "cat.jpg"}', content_type="application/json"),
        Case("truncated jpeg", "a truncated JPEG", data=jpeg[: len(jpeg) // 3]),
        Case(
            "corrupt jpeg header",
            "a JPEG with a corrupt header",
            data=jpeg[:2] + bytes(range(200, 240)) + jpeg[42:],
        ),
        Case("not an image", "bytes of no image format", data=b"%PDF-1.4 not a photo"),
        Case(
            "image extension, other content",
            "a form file `photo.jpg` holding something else",
            files={"data": ("photo.jpg", b"%PDF-1.4 not a photo", "image/jpeg")},
        ),
        Case("multipart without a file", "a form with a text field only", files={"note": (None, "hello")}),
        Case(
            "two files",
            "a form with two files",
            files={"a": ("a.jpg", jpeg, "image/jpeg"), "b": ("b.jpg", jpeg, "image/jpeg")},
        ),
        Case(
            "over the pixel limit",
            "a PNG that declares 10000×10000 pixels (Pillow's limit: "
            "89,478,485), refused before any pixel is decoded",
            data=declared_png(10000, 10000),
        ),
        Case("pixel bomb", "a PNG that declares 30000×30000 pixels", data=declared_png(30000, 30000)),
        Case("float tiff outside 0..1", "a float TIFF outside 0..1", data=array((2.0, np.float32), "TIFF")),
        Case("signed tiff", "a TIFF of signed integers", data=array((-3, np.int32), "TIFF")),
        Case("pfm", "a PFM (linear light)", data=array((0.5, np.float32), "PPM")),
        Case(
            "32-bit integer",
            "a 32-bit integer image without a white level",
            data=array((70000, np.int32), "IM"),
        ),
    ]


def message(case: Case) -> str:
    """The message the handler answers ``case`` with (its 400's ``message``)."""
    from handlers.decode import BadImage
    from handlers.image_classifier import decode

    try:
        decode(case.row())
    except BadImage as e:
        return str(e)
    raise AssertionError(f"{case.name}: decoded, not refused")


def table() -> str:
    """The markdown table of refusals: what was sent, what the 400's message says."""
    rows = ["| input | HTTP 400 `message` |", "|---|---|"]
    for case in cases():
        if case.what:
            rows.append(f"| {case.what} | `{message(case)}` |")
    return "\n".join(rows)


def written(text: str) -> str:
    """``text`` (docs/serving.md) with the table between its markers replaced."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise ValueError(f"{DOCS.name} lacks the markers {BEGIN!r} ... {END!r}")
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"replace the table in {DOCS}")
    a = p.parse_args(argv)
    if not a.write:
        print(table())
        return 0
    DOCS.write_text(written(DOCS.read_text()))
    print(f"Wrote the table of refusals in {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
