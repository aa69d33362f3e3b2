"""The Tinker training API's wire format, as the official `tinker` SDK (0.38.0, pinned in the `tinker` extra) speaks
it: the JSON request bodies as pydantic models, and the two protobuf messages (a forward/backward request in, its
output and a sample's result out) read and written through the SDK's own compiled schema
(`tinker.proto.tinker_public_pb2`) rather than a copy of it, so the server cannot drift from the client it answers.

Only the fields the studio acts on are declared; unknown fields are ignored (a newer SDK adds fields, and the
hosted service ignores what it does not use too). Plain data in, plain data out: no torch here (tinker_service.py
does the work, tinker_routes.py the HTTP).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------- JSON request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ClientConfigRequest(_Body):
    sdk_version: str = ""


class CreateSessionRequest(_Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: Optional[dict[str, Any]] = None
    sdk_version: str = ""
    display_name: Optional[str] = None


class SessionRequest(_Body):
    session_id: str


class LoraSettings(_Body):
    rank: int = Field(ge=1, le=1024)
    seed: Optional[int] = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(_Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    user_metadata: Optional[dict[str, Any]] = None
    lora_config: Optional[LoraSettings] = None


class ModelRequest(_Body):
    model_id: str


class AdamSettings(_Body):
    learning_rate: float = Field(default=1e-4, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=0.0, ge=0)
    type: Optional[str] = None


class OptimStepRequest(_Body):
    model_id: str
    seq_id: Optional[int] = None
    adam_params: Optional[AdamSettings] = None
    optimizer_params: Optional[dict[str, Any]] = None


class SaveWeightsRequest(_Body):
    model_id: str
    path: Optional[str] = None
    seq_id: Optional[int] = None


class SaveWeightsForSamplerRequest(_Body):
    model_id: str
    path: Optional[str] = None
    sampling_session_seq_id: Optional[int] = None
    kind: str = "snapshot"
    seq_id: Optional[int] = None


class LoadWeightsRequest(_Body):
    model_id: Optional[str] = None
    seq_id: Optional[int] = None
    session_id: Optional[str] = None
    model_seq_id: Optional[int] = None
    base_model: Optional[str] = None
    path: str
    optimizer: bool = False


class WeightsInfoRequest(_Body):
    tinker_path: str


class CreateSamplingSessionRequest(_Body):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: Optional[str] = None
    model_path: Optional[str] = None


class JoinSamplingSessionRequest(_Body):
    sampling_session_id: str


class EncodedText(_Body):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]


class OtherChunk(_Body):
    type: str


class ModelInput(_Body):
    chunks: list[Union[EncodedText, OtherChunk]]


class SamplingSettings(_Body):
    max_tokens: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], list[int], None] = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)


class SampleRequest(_Body):
    num_samples: int = Field(default=1, ge=1)
    prompt: ModelInput
    sampling_params: SamplingSettings
    base_model: Optional[str] = None
    model_path: Optional[str] = None
    sampling_session_id: Optional[str] = None
    seq_id: Optional[int] = None
    prompt_logprobs: Optional[bool] = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: Optional[int] = None
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: Optional[dict[str, Any]] = None


class FutureRetrieveRequest(_Body):
    request_id: str
    allow_metadata_only: bool = False


class FinishSessionRequest(_Body):
    detail: Optional[str] = None


class ExportRunRequest(_Body):
    """tunesmith's one addition: a saved state (`tinker://...`) becomes a studio run."""
    path: str
    name: Optional[str] = None


def prompt_tokens(model_input: ModelInput) -> list[int]:
    """The token ids of a text-only model input; other chunk kinds (images, audio) are refused."""
    tokens: list[int] = []
    for chunk in model_input.chunks:
        if not isinstance(chunk, EncodedText):
            raise ValueError(f"model input chunk of type {chunk.type!r}: only encoded_text is supported here")
        tokens.extend(chunk.tokens)
    return tokens


# ---------------------------------------------------------------- forward/backward (protobuf)


@dataclass
class Datum:
    tokens: list[int]
    inputs: dict[str, np.ndarray]   # loss_fn_inputs by name, dense


@dataclass
class ForwardBackwardInput:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, Union[float, str]]
    forward_only: bool
    data: list[Datum] = field(default_factory=list)


def _pb():
    try:
        from tinker.proto import tinker_public_pb2
    except ImportError as e:  # the `tinker` extra is what the route needs
        raise RuntimeError("the Tinker API needs the tinker package: pip install 'tunesmith[tinker]'") from e
    return tinker_public_pb2


_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32}


def _dense(tensor, pb) -> np.ndarray:
    np_dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}.get(tensor.dtype)
    if np_dtype is None:
        raise ValueError(f"tensor dtype {tensor.dtype}: only float32, int64 and int32 are supported")
    shape = list(tensor.shape)
    if tensor.HasField("sparse_csr"):
        csr = tensor.sparse_csr
        values = np.frombuffer(csr.values, dtype=np_dtype)
        crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
            raise ValueError("a sparse tensor's shape and indices do not agree")
        out = np.zeros(shape, dtype=np_dtype)
        for row in range(shape[0]):
            out[row, col[crow[row]:crow[row + 1]]] = values[crow[row]:crow[row + 1]]
        return out
    values = np.frombuffer(tensor.dense, dtype=np_dtype).copy()
    if shape and math.prod(shape) != values.size:
        raise ValueError(f"a tensor of shape {shape} holds {values.size} values")
    return values.reshape(shape) if shape else values


def read_forward_backward(body: bytes, max_tokens: int) -> ForwardBackwardInput:
    """Decode the SDK's ForwardBackwardRequest; ValueError names what is wrong."""
    pb = _pb()
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception:  # protobuf's DecodeError
        raise ValueError("the body is not a ForwardBackwardRequest protobuf message") from None
    config: dict[str, Union[float, str]] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    out = ForwardBackwardInput(msg.model_id, int(msg.seq_id), msg.loss_fn, config, bool(msg.forward_only))
    total = 0
    for i, d in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in d.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise ValueError(f"data[{i}]: model input chunk {chunk.WhichOneof('chunk')!r}: only encoded_text is supported")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        total += len(tokens)
        if total > max_tokens:
            raise ValueError(f"the request holds more than {max_tokens} tokens; send fewer datums per call")
        out.data.append(Datum(tokens, {name: _dense(t, pb) for name, t in d.loss_fn_inputs.items()}))
    return out


def write_forward_backward_output(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput: one ArrayRecord of per-datum 1-D float32 fields (`logprobs`, ...), batched."""
    pb = _pb()
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for k, v in metrics.items():
        msg.metrics[k] = float(v)
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(outputs))
    for name in (outputs[0] if outputs else {}):
        arrays = [np.ascontiguousarray(o[name], dtype=np.float32).reshape(-1) for o in outputs]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
        bt = record.fields[name]
        bt.data = b"".join(a.tobytes() for a in arrays)
        bt.offsets = offsets.tobytes()
        bt.dtype = pb.DTYPE_FLOAT32
    return msg.SerializeToString()


# ---------------------------------------------------------------- sampling (protobuf)


@dataclass
class Sequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]


def write_sample_response(sequences: list[Sequence], prompt_logprobs: Optional[list[float]]) -> bytes:
    pb = _pb()
    msg = pb.SampleResponse()
    for s in sequences:
        seq = msg.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if s.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s.tokens, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(s.logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()  # NaN where none
    return msg.SerializeToString()


PROTOBUF = "application/x-protobuf"
