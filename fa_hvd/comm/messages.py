"""Object messages between ranks without pickle: bounded, validated JSON and weights-only state.

``pickle.loads`` of bytes another rank sent runs whatever code that rank chose, so
no rank's bytes are unpickled. Messages are either

* JSON (:func:`encode_json` / :func:`decode_json`): at most ``limit`` bytes,
  strict JSON (no NaN, no Infinity), nested no deeper than Python's recursion
  limit allows, and of the shape a :data:`schema <check>` names; or
* tensor state (:func:`encode_state` / :func:`decode_state`): ``torch.save`` bytes
  read back with ``torch.load(weights_only=True)``, whose unpickler admits only
  tensors, numbers, strings and containers (the loader fa_hvd's checkpoints use).

A message that breaks any of this raises :class:`MessageError` naming the rank
that sent it; the collective that carried it completed on every rank, so every
rank raises alike.
"""

from __future__ import annotations

import io
import json

import torch

MAX_MESSAGE_BYTES = 16 << 20  # JSON messages: model signatures (a large model: ~1 MB), errors, counts
MAX_STATE_BYTES = 1 << 30  # tensor state: a rank's generators and buffers, an optimizer's state


def model_state_limit(tensors, copies: int) -> int:
    """The limit of a state message that carries per-parameter tensors (an optimizer's state, worker
    momentum): ``MAX_STATE_BYTES`` plus ``copies`` fp64 copies of ``tensors``, so a model of any size
    fits and a sender still cannot announce more than its model's worth."""
    return MAX_STATE_BYTES + copies * 8 * sum(t.numel() for t in tensors)


class MessageError(ValueError):
    """A rank sent a message that is too long, not what the format allows, or not of the expected shape."""


class Optional:
    """Schema: ``None`` or ``inner``."""

    def __init__(self, inner):
        self.inner = inner


def check(value, schema) -> None:
    """Raise ``ValueError`` unless ``value`` has the shape ``schema`` names.

    A schema is a type (``int``, ``float``, ``str``, ``bool``; an ``int`` is not a
    ``bool``, a ``float`` accepts an ``int``), ``[inner]`` (a list of any length),
    a tuple of schemas (a list of exactly that length), ``{str: inner}`` (a dict with
    string keys) or :class:`Optional`.
    """
    if isinstance(schema, Optional):
        if value is not None:
            check(value, schema.inner)
    elif isinstance(schema, list):
        _require(isinstance(value, list), value, "a list")
        for item in value:
            check(item, schema[0])
    elif isinstance(schema, tuple):
        _require(isinstance(value, list) and len(value) == len(schema), value, f"a list of {len(schema)}")
        for item, inner in zip(value, schema):
            check(item, inner)
    elif isinstance(schema, dict):
        _require(isinstance(value, dict), value, "an object")
        (inner,) = schema.values()
        for item in value.values():
            check(item, inner)
    elif schema is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), value, "a number")
    elif schema is int:
        _require(isinstance(value, int) and not isinstance(value, bool), value, "an integer")
    else:
        _require(isinstance(value, schema), value, schema.__name__)


def _require(ok: bool, value, what: str) -> None:
    if not ok:
        raise ValueError(f"expected {what}, got {type(value).__name__}")


def encode_json(obj, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    data = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(data) > limit:
        raise MessageError(f"fa_hvd: a message of {len(data)} bytes is over the limit of {limit}")
    return data


def decode_json(data: bytes, schema, sender: int, what: str):
    """``data`` (from rank ``sender``) as JSON of shape ``schema``; :class:`MessageError` otherwise."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        check(value, schema)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"fa_hvd: rank {sender} sent a malformed {what} message: {exc}") from None
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def encode_state(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def decode_state(data: bytes, sender: int, what: str):
    """``data`` (from rank ``sender``) loaded weights-only; :class:`MessageError` if it is anything else."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any failure to read another rank's bytes is theirs
        raise MessageError(f"fa_hvd: rank {sender} sent a malformed {what} message: {exc}") from None


def check_length(sender: int, length: int, limit: int, what: str) -> None:
    """An announced length within ``[0, limit]``, else :class:`MessageError` naming ``sender``."""
    if not 0 <= length <= limit:
        raise MessageError(f"fa_hvd: rank {sender} announced a {what} message of {length} bytes "
                           f"(the limit is {limit})")
