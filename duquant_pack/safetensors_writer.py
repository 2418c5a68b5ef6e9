"""Write a safetensors file tensor by tensor, without holding the whole model in memory.

The header (offsets of every tensor) is computed from the declared shapes first; the data of
each tensor is then produced by a callback in row chunks and appended. The file is written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch

from duquant_runtime.atomic import atomic_file

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_streaming(path, specs: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                    produce: Callable[[str, tuple[int, ...]], Iterator[torch.Tensor]],
                    metadata: dict | None = None) -> int:
    """Write tensors `specs` [(name, shape)] of one `dtype`; `produce(name, shape)` yields row chunks.

    Returns the file size in bytes.
    """
    path = Path(path)
    item = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n * item]}
        offset += n * item
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_file(path) as t, open(t.tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            written = 0
            for chunk in produce(name, shape):
                b = chunk.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
                f.write(b)
                written += len(b)
            expect = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != expect:
                raise RuntimeError(f"producer wrote {written} bytes for {name}, expected {expect}")
    return path.stat().st_size
