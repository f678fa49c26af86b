"""A minimal safetensors reader and writer on the standard library alone (F32, F64, I64), for the
tests and examples that drive moe-run from Python without numpy or torch."""
import json
import struct

_FORMATS = {"F32": ("f", 4), "F64": ("d", 8), "I64": ("q", 8), "I32": ("i", 4)}


def write(path, tensors, metadata=None):
    """tensors: {name: (dtype, shape, flat list of values)}, written in the order given."""
    header, chunks, offset = {}, [], 0
    for name, (dtype, shape, values) in tensors.items():
        fmt, size = _FORMATS[dtype]
        count = 1
        for s in shape:
            count *= s
        if len(values) != count:
            raise ValueError(f"{name}: {len(values)} values for shape {shape}")
        data = struct.pack(f"<{count}{fmt}", *values)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def read(path):
    """Returns ({name: (dtype, shape, flat list of values)}, metadata)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    metadata = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, info in header.items():
        fmt, size = _FORMATS[info["dtype"]]
        begin, end = info["data_offsets"]
        values = list(struct.unpack(f"<{(end - begin) // size}{fmt}", blob[base + begin : base + end]))
        out[name] = (info["dtype"], info["shape"], values)
    return out, metadata


def f32(x):
    """x rounded to the nearest float32, as stored in an F32 tensor."""
    return struct.unpack("<f", struct.pack("<f", x))[0]
