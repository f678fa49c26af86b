#!/usr/bin/env python3
"""Writes the seed corpus of the safetensors fuzz target (safetensors_fuzz.cpp) to
corpus/safetensors/ next to this script: small files, valid ones (every dtype, metadata, shape [],
zero-size tensors, unaligned offsets, values that fail a read) and invalid ones (one for each
kind of validation error). Deterministic; rerun after changing it and commit the result. It
overwrites only its own seeds: inputs that `scripts/fuzz --merge` added (named by their SHA-1) stay."""

import json
import pathlib
import struct

OUT = pathlib.Path(__file__).resolve().parent / "corpus" / "safetensors"


def pad(header: bytes) -> bytes:
    return header + b" " * (-len(header) % 8)


def raw(header: bytes, data: bytes = b"", length=None) -> bytes:
    """The file: the header's length (or `length`) as 8 little-endian bytes, the header, the data."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def valid(tensors, metadata=None) -> bytes:
    """A well-formed file: tensors is a list of (name, dtype, shape, data bytes), laid out in order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    return raw(pad(json.dumps(header, separators=(",", ":")).encode()), data)


def entry(name, dtype, shape, begin, end) -> str:
    return f'"{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{begin},{end}]}}'


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    f32 = struct.pack("<6f", 1.0, -2.5, 0.0, -0.0, 3e38, 1e-40)
    seeds = {
        # Valid files.
        "valid_f32": valid([("w", "F32", [2, 3], f32)]),
        "valid_every_dtype": valid([
            ("bool", "BOOL", [2], bytes([0, 1])),
            ("u8", "U8", [2], bytes([0, 255])),
            ("i8", "I8", [2], struct.pack("<2b", -128, 127)),
            ("i16", "I16", [1], struct.pack("<h", -300)),
            ("u16", "U16", [1], struct.pack("<H", 65535)),
            ("i32", "I32", [1], struct.pack("<i", -70000)),
            ("u32", "U32", [1], struct.pack("<I", 4000000000)),
            ("i64", "I64", [2], struct.pack("<2q", -2**63, 2**63 - 1)),
            ("u64", "U64", [1], struct.pack("<Q", 12345)),
            ("f16", "F16", [3], struct.pack("<3H", 0x3C00, 0x7BFF, 0x0001)),
            ("bf16", "BF16", [2], struct.pack("<2H", 0x3F80, 0xC020)),
            ("f64", "F64", [1], struct.pack("<d", 3.141592653589793)),
        ]),
        "valid_metadata_scalar_empty": valid(
            [("empty", "F32", [0, 4], b""), ("scalar", "F64", [], struct.pack("<d", 2.0)),
             ("empty2", "I64", [3, 0], b"")],
            metadata={"format": "pt", "config": '{"k": 2}'}),
        "valid_unaligned": valid([
            ("a", "U8", [3], bytes([1, 2, 3])), ("b", "F32", [2], struct.pack("<2f", 1.5, 2.5)),
            ("c", "F16", [1], struct.pack("<H", 0x4000)), ("d", "I64", [1], struct.pack("<q", -1))]),
        "valid_empty": valid([]),
        "valid_hand_written": raw(
            ' { "b" : { "shape" : [ 1 ] , "data_offsets" : [ 2 , 6 ] , "dtype" : "F32" } ,\n'
            ' "a" : {"data_offsets": [0, 2], "dtype": "BF16", "shape": [1]}, "__metadata__": {"n": "caf\\u00e9"} }'
            .encode(), struct.pack("<H", 0x4049) + struct.pack("<f", 7.0)),
        # Valid files whose reads fail: not finite, out of int64's range, a BOOL byte of 2, F64 past float.
        "read_nan_inf": valid([("w", "F32", [3], struct.pack("<3f", 1.0, float("nan"), float("inf"))),
                               ("h", "F16", [1], struct.pack("<H", 0x7E00))]),
        "read_out_of_range": valid([("u", "U64", [1], struct.pack("<Q", 2**64 - 1)),
                                    ("b", "BOOL", [1], bytes([2])), ("d", "F64", [1], struct.pack("<d", 1e300))]),
        # Invalid files, one for each validation.
        "bad_short": b"\x05\x00\x00\x00\x00",
        "bad_header_length_zero": raw(b"", length=0),
        "bad_header_length_huge": raw(b"{}", length=2**63),
        "bad_header_past_end": raw(b"{}", length=64),
        "bad_json": raw(pad(b'{"w":{"dtype":"F32",')),
        "bad_utf8": raw(pad(b'{"\xff\xfe":{}}')),
        "bad_nul": raw(b'{}\x00{"w":1}'),
        "bad_not_object": raw(pad(b"[1,2,3]")),
        "bad_duplicate_keys": raw(pad(("{" + entry("w", "F32", [1], 0, 4) + "," + entry("w", "F32", [1], 4, 8) + "}")
                                      .encode()), bytes(8)),
        "bad_entry_keys": raw(pad(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1},'
                                  b'"v":{"dtype":"F32","shape":[1]}}'), bytes(4)),
        "bad_dtype": raw(pad(("{" + entry("w", "F8_E4M3", [4], 0, 4) + "}").encode()), bytes(4)),
        "bad_shape": raw(pad(("{" + entry("w", "F32", "[-1,2.5,1e30]", 0, 4) + "}").encode()), bytes(4)),
        "bad_shape_overflow": raw(pad(("{" + entry("w", "U8", [2**32, 2**32, 0], 0, 0) + "}").encode())),
        "bad_size_mismatch": raw(pad(("{" + entry("w", "F32", [3], 0, 8) + "}").encode()), bytes(8)),
        "bad_offsets": raw(pad(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]},'
                               b'"v":{"dtype":"F32","shape":[1],"data_offsets":[0,40]}}'), bytes(8)),
        "bad_overlap": raw(pad(("{" + entry("a", "F32", [2], 0, 8) + "," + entry("b", "F32", [2], 4, 12) + ","
                                + entry("z", "F32", [0], 2, 2) + "}").encode()), bytes(12)),
        "bad_hole_and_trailing": raw(pad(("{" + entry("a", "F32", [1], 4, 8) + "}").encode()), bytes(12)),
        "bad_metadata": raw(pad(b'{"__metadata__":{"k":1,"j":["x"]}}')),
    }
    for name, data in seeds.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(seeds)} seeds to {OUT}")


if __name__ == "__main__":
    main()
