"""Transport over ``torch.distributed`` (``torchrun``, DDP): Gloo on the CPU, NCCL on GPUs.

The process group is the one the launcher set up (``init_process_group`` from
``torchrun``'s environment if nobody did yet; backend NCCL when CUDA is available,
else Gloo), or any group passed in: a ``dist.new_group(ranks)`` plays the part of a
Horovod process set (ranks outside it have ``included = False`` and ``rank == -1``).

Collectives are the native ones: ``all_gather_into_tensor`` (``all_gather_single``
from torch 2.14 on, its new name; every rank gathers a
tensor of the same shape, as with the mpi4py transport: the optimizer checks the
model's shapes across ranks first), ``all_to_all_single``, ``all_reduce`` and
``broadcast``. Tensors travel on the backend's device (the CPU for Gloo, this
rank's GPU for NCCL) and come back on the caller's.

Gloo and NCCL match collectives by their order on a group, not by name. So
:meth:`TorchDistTransport.prepare` gives each named collective (each gradient
bucket) a group of its own, and buckets may start in any order; unprepared names
share the main group, in program order.

Object messages never unpickle another rank's bytes (and an allgathered one is at
most ``MAX_GATHERED_BYTES`` a rank, so no rank can make the others allocate without
bound; ``broadcast_object`` carries rank 0's checkpoint and is not bounded): :func:`encode_object` writes
a bounded JSON tree (plain data: ``None``, bools, ints, floats, strings, lists,
tuples, dicts with such keys) with tensors and ``bytes`` as raw blobs described in
the JSON, and :func:`decode_object` rebuilds only those types (tensor dtypes from
a fixed list, sizes checked), raising ``ValueError`` naming the sender otherwise.

Byte counts are the kernel's TCP counts (:mod:`.traffic`): all of Gloo's traffic;
NCCL's shared-memory, NVLink and InfiniBand transfers are not seen.
"""

from __future__ import annotations

import json
import os
import struct

import torch
import torch.distributed as dist

from .base import Handle, Transport, collective_timeout, wait_until

MAGIC = b"FAHVD-OBJ1"
MAX_HEADER_BYTES = 16 << 20  # the JSON part of an object message
MAX_DEPTH = 64  # nesting of lists, tuples and dicts
MAX_GATHERED_BYTES = 256 << 20  # one rank's object in allgather_object (each rank pads to the largest)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
DTYPES = {str(t): t for t in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class _TorchHandle(Handle):
    def __init__(self, work, output, device, name):
        # ``output`` is held (and returned) once the backend is done with it.
        self.work, self.output, self.device, self.name = work, output, device, name


class TorchDistTransport(Transport):
    name = "torch"

    def __init__(self, group=None):
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        self.group = self.process_set = group if group is not None else dist.group.WORLD
        self.included = self.group != dist.GroupMember.NON_GROUP_MEMBER
        self.ranks = dist.get_process_group_ranks(self.group) if self.included else []
        self.rank = dist.get_rank(self.group) if self.included else -1
        self.size = len(self.ranks)
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.backend = dist.get_backend(self.group) if self.included else dist.get_backend()
        self.device = (torch.device("cuda", self.local_rank % torch.cuda.device_count()) if self.backend == "nccl"
                       else torch.device("cpu"))
        self.timeout = collective_timeout()
        self._channels: dict[str, object] = {}

    def prepare(self, names: list[str]) -> None:
        for name in names:
            if name not in self._channels:
                self._channels[name] = dist.new_group(self.ranks, use_local_synchronization=True)

    def _group(self, name: str):
        return self._channels.get(name, self.group)

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.device).contiguous()

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Handle:
        send = self._on_device(tensor)
        output = torch.empty((self.size * send.shape[0],) + tuple(send.shape[1:]), dtype=send.dtype,
                             device=self.device)
        work = _ALL_GATHER(output, send, group=self._group(name), async_op=True)
        return _TorchHandle(work, output, tensor.device, name)

    def wait(self, handle: Handle) -> torch.Tensor:
        wait_until(handle.work.is_completed, self.timeout, f"fa_hvd: rank {self.rank}: {handle.name!r}")
        handle.work.wait()
        return handle.output.to(handle.device)

    def alltoall_async(self, tensor: torch.Tensor, splits: list[int], name: str,
                       received: list[int] | None = None) -> Handle:
        group = self._group(name)
        send = self._on_device(tensor)
        if received is None:
            counts = torch.tensor(splits, dtype=torch.int64, device=self.device)
            theirs = torch.empty_like(counts)
            dist.all_to_all_single(theirs, counts, group=group)
            received = theirs.tolist()
        output = torch.empty((sum(received),) + tuple(send.shape[1:]), dtype=send.dtype, device=self.device)
        work = dist.all_to_all_single(output, send, output_split_sizes=list(received),
                                      input_split_sizes=list(splits), group=group, async_op=True)
        return _TorchHandle(work, output, tensor.device, name)

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        buffer = self._on_device(tensor)
        dist.broadcast(buffer, src=self.ranks[root], group=self.group)
        if buffer is not tensor:
            with torch.no_grad():
                tensor.copy_(buffer)
        return tensor

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        total = tensor.detach().to(self.device, copy=True).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.to(tensor.device)

    def allgather_object(self, obj, name: str) -> list:
        payload = self._on_device(torch.frombuffer(bytearray(encode_object(obj)), dtype=torch.uint8))
        sizes = self.allgather(torch.tensor([payload.numel()], dtype=torch.int64), name=f"{name}.sizes").tolist()
        for rank, size in enumerate(sizes):  # every rank sees the same sizes: the same decision everywhere
            if not 0 < size <= MAX_GATHERED_BYTES:
                raise ValueError(f"fa_hvd: rank {rank} announced a {size}-byte object message for {name!r} "
                                 f"(at most {MAX_GATHERED_BYTES} per rank)")
        padded = torch.zeros(max(sizes), dtype=torch.uint8, device=self.device)
        padded[: payload.numel()] = payload
        everyone = self.allgather(padded.reshape(1, -1), name=name).cpu()
        return [decode_object(everyone[r, :size].numpy().tobytes(), f"rank {r}") for r, size in enumerate(sizes)]

    def broadcast_object(self, obj, root: int, name: str):
        payload = encode_object(obj) if self.rank == root else b""
        size = self.broadcast_(torch.tensor([len(payload)], dtype=torch.int64), root, name=f"{name}.size")
        buffer = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == root
                  else torch.empty(int(size), dtype=torch.uint8))
        self.broadcast_(buffer, root, name=name)
        return decode_object(buffer.numpy().tobytes(), f"rank {root}")


# -- object messages: bounded JSON and raw blobs, never pickle ------------------------------------------
def encode_object(obj) -> bytes:
    """``obj`` (plain data and tensors) as ``MAGIC, len(header), header JSON, blobs``."""
    blobs: list[bytes] = []
    header = json.dumps({"tree": _tree(obj, blobs, 0), "blobs": [len(b) for b in blobs]},
                        separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"fa_hvd: object message too large ({len(header)} bytes of JSON, at most "
                         f"{MAX_HEADER_BYTES}); send tensors as tensors")
    return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(blobs)


def _tree(obj, blobs: list[bytes], depth: int):
    if depth > MAX_DEPTH:
        raise ValueError(f"fa_hvd: object message nested deeper than {MAX_DEPTH}")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        if str(t.dtype) not in DTYPES:
            raise ValueError(f"fa_hvd: object message: tensors of {t.dtype} are not sent")
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return ["T", str(t.dtype), list(t.shape), len(blobs) - 1]
    if isinstance(obj, (bytes, bytearray)):
        blobs.append(bytes(obj))
        return ["B", len(blobs) - 1]
    if isinstance(obj, (list, tuple)):
        return ["L" if isinstance(obj, list) else "U", [_tree(x, blobs, depth + 1) for x in obj]]
    if isinstance(obj, dict):
        return ["D", [[_tree(k, blobs, depth + 1), _tree(v, blobs, depth + 1)] for k, v in obj.items()]]
    raise ValueError(f"fa_hvd: object message: {type(obj).__name__} is not plain data")


def decode_object(data: bytes, sender: str = "a rank"):
    """The object :func:`encode_object` wrote; ``ValueError`` naming ``sender`` for anything else."""
    try:
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
            raise ValueError("no object header")
        (length,) = struct.unpack_from("<Q", data, len(MAGIC))
        start = len(MAGIC) + 8
        if length > MAX_HEADER_BYTES or start + length > len(data):
            raise ValueError(f"a {length}-byte header")
        header = json.loads(data[start : start + length])
        sizes = header["blobs"]
        if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
            raise ValueError("bad blob sizes")
        offsets, position = [], start + length
        for s in sizes:
            offsets.append(position)
            position += s
        if position != len(data):
            raise ValueError(f"{len(data)} bytes, the header describes {position}")
        blobs = [data[o : o + s] for o, s in zip(offsets, sizes)]
        return _build(header["tree"], blobs, 0)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError, RuntimeError) as exc:
        raise ValueError(f"fa_hvd: malformed object message from {sender}: {exc}") from None


def _build(node, blobs: list[bytes], depth: int):
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    tag, *rest = node
    if tag == "T":
        dtype, shape, index = rest
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"bad tensor shape {shape!r}")
        kind = DTYPES[dtype]
        raw = blobs[index]
        if len(raw) != torch.Size(shape).numel() * kind.itemsize:
            raise ValueError(f"a {dtype} tensor of shape {shape} in {len(raw)} bytes")
        if not raw:
            return torch.empty(shape, dtype=kind)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(kind).reshape(shape)
    if tag == "B":
        return blobs[rest[0]]
    if tag in ("L", "U"):
        items = [_build(x, blobs, depth + 1) for x in rest[0]]
        return items if tag == "L" else tuple(items)
    if tag == "D":
        return {_build(k, blobs, depth + 1): _build(v, blobs, depth + 1) for k, v in rest[0]}
    raise ValueError(f"unknown tag {tag!r}")
