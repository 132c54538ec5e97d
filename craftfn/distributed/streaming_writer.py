"""A distributed-checkpoint storage writer that streams each rank's safetensors file from its tensors.

torch's ``HuggingFaceStorageWriter`` builds every file in memory first (``safetensors.torch.save``
returns the whole file as bytes, after copying each tensor into bytes of its own), so a rank holds
two more copies of its shards while it saves (measured: a rise of 2.0x the rank's state,
``benchmarks/ckpt_rss_bench.py``). This writer produces the same files (the same names, the same
safetensors header with distributed checkpoint's ``DCP_SHARDING_INFO``, so
``HuggingFaceStorageReader`` and any safetensors reader load them) by writing the header and
then each tensor's bytes straight from the tensor's memory: nothing is copied but the header.
The sha256 of each file is computed as it is written (``written``), so it is not read back.

Imported lazily by :mod:`craftfn.distributed.sharded_checkpoint` (distributed checkpoint takes ~1 s to import).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import torch
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY,
    DCP_VERSION_KEY,
    FORMAT_KEY,
    FORMAT_VALUE,
    HF_DCP_VERSION,
    SAVED_OFFSETS_KEY,
    _gen_file_name,
)
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

# safetensors' names of the dtypes a state holds (bool leaves are written as uint8 by the manager).
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
}


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without copying them (a contiguous tensor is only viewed)."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class StreamingSafetensorsWriter(HuggingFaceStorageWriter):
    """``HuggingFaceStorageWriter(save_distributed=True)`` whose files are streamed, not built in memory."""

    def __init__(self, path: str) -> None:
        super().__init__(path, save_distributed=True)
        self.written: dict[str, tuple[str, int]] = {}  # file name -> (sha256, bytes), hashed while writing

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        shard_index = plan.storage_data.get("shard_index") if isinstance(plan.storage_data, dict) else None
        items = list(plan.items)
        results: list[WriteResult] = []
        if items:
            name = _gen_file_name(1, 1, shard_index)
            results = self._write_file(os.path.join(str(self.path), name), name, items, planner)
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def _write_file(self, path: str, name: str, items: list[Any], planner: SavePlanner) -> list[WriteResult]:
        entries: list[tuple[Any, torch.Tensor]] = []
        for item in items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"ShardedCheckpointManager: {item.index.fqn!r} is not a tensor; the safetensors storage holds tensors only")
            tensor = planner.resolve_data(item)
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                raise TypeError(f"ShardedCheckpointManager: {item.index.fqn!r} must be a CPU tensor to be written, got {tensor!r:.60}")
            if tensor.dtype not in _DTYPES:
                raise TypeError(f"ShardedCheckpointManager: {item.index.fqn!r} has dtype {tensor.dtype}, which safetensors cannot hold")
            entries.append((item, tensor))
        header: dict[str, Any] = {}
        sharding: dict[str, Any] = {}
        at = 0
        for item, tensor in entries:
            fqn = item.index.fqn
            nbytes = tensor.numel() * tensor.element_size()
            header[fqn] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [at, at + nbytes]}
            sharding[fqn] = {SAVED_OFFSETS_KEY: list(item.tensor_data.chunk.offsets)}
            at += nbytes
        header["__metadata__"] = {CUSTOM_METADATA_KEY: json.dumps(sharding), DCP_VERSION_KEY: str(HF_DCP_VERSION), FORMAT_KEY: FORMAT_VALUE}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        results = []
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for piece in (struct.pack("<Q", len(text)), text):
                f.write(piece)
                h.update(piece)
            start = f.tell()
            for item, tensor in entries:
                offset = f.tell() - start
                data = _raw(tensor)
                f.write(data)
                h.update(data)
                length = tensor.numel() * tensor.element_size()
                results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length)))
            f.flush()
            os.fsync(f.fileno())
            self.written[name] = (h.hexdigest(), f.tell())
        return results
