"""Writing initializers' bytes to an ONNX external-data file, one tensor at a time, never the whole model at once.

Why not onnx's own helpers: `onnx.save_model(..., save_as_external_data=True)` needs every tensor's bytes in the
proto first (and the python protobuf's arena keeps cleared bytes until the whole model is freed), and
`set_external_data` refuses a tensor whose bytes are not in it. Here a tensor's bytes come from wherever they are (a
torch tensor, the proto, another external-data file) and go straight to the file.
"""

from __future__ import annotations

from pathlib import Path

ALIGN = 64  # every tensor starts at a multiple of this in the file
CHUNK = 64 << 20  # bytes copied at a time from another file


def point_at(tensor, location: str, offset: int, length: int) -> None:
    """Make `tensor` an external-data reference (its inline bytes, if any, must be cleared by the caller)."""
    import onnx

    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def external_location(tensor) -> tuple[str, int, int] | None:
    """(location, offset, length) of an external-data tensor, else None."""
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


class ExternalDataWriter:
    """Appends tensors to `path` (created if absent) and points their protos at it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "ab")
        self.offset = self.file.tell()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def _start(self) -> int:
        pad = -self.offset % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        return self.offset

    def add(self, tensor, data) -> None:
        """Write `data` (bytes or a buffer, e.g. a numpy array's) as `tensor`'s value."""
        start, length = self.write([data])
        point_at(tensor, self.path.name, start, length)

    def write(self, pieces) -> tuple[int, int]:
        """Write one tensor's bytes given in pieces (buffers, written as they come, so a tensor made block by block
        is never whole in memory); (offset, length) of the tensor in the file."""
        start = self._start()
        for piece in pieces:
            view = memoryview(piece).cast("B")
            self.file.write(view)
            self.offset += view.nbytes
            del piece, view  # before the next piece is made: one piece in memory at a time
        return start, self.offset - start

    def move_inline(self, tensor) -> None:
        """Move an inline tensor's raw bytes to the file."""
        self.add(tensor, tensor.raw_data)
        tensor.ClearField("raw_data")

    def copy_external(self, tensor, source_dir: Path) -> None:
        """Copy an external tensor's bytes from its file under source_dir, in chunks, and point it here."""
        location, offset, length = external_location(tensor)
        start = self._start()
        with open(Path(source_dir) / location, "rb") as source:
            source.seek(offset)
            left = length
            while left:
                chunk = source.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{Path(source_dir) / location} ends before {tensor.name}'s {length} bytes")
                self.file.write(chunk)
                left -= len(chunk)
        self.offset += length
        point_at(tensor, self.path.name, start, length)
