"""The Tinker training API's HTTP routes (`/api/v1/...`, the paths the official `tinker` SDK calls), as a FastAPI
router the studio mounts on its app: the studio's key and checks (guard.py) cover it like every other route, so
nothing here looks at credentials. Point the SDK at the studio:

    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=$(cat HOME/.token) python my_loop.py

The work is tinker_service.py's; this file turns requests into its calls and its results and errors into the
shapes the SDK reads: JSON bodies, protobuf for forward/backward in and its output and samples out, futures as
`{"request_id"}` answered by `/api/v1/retrieve_future` -- a result, `{"type": "try_again"}` while the work is queued or
running (the poll is held up to `POLL_SECONDS` first), or `{"error", "category"}`. Client errors are 400/404/429 with
a message; nothing the server knows (a path, a traceback) is in a response.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Callable, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tunesmith.studio import tinker_protocol as proto
from tunesmith.studio.tinker_model import UserError
from tunesmith.studio.tinker_service import Limits, TinkerService

POLL_SECONDS = 20.0  # a retrieve_future is held this long for its result before answering try_again (SDK timeout: 45 s)
CHUNK_BYTES = 700_000  # the SDK splits forward_backward calls into requests of about this size (the body limit is 1 MiB)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": None}},
                        status_code=status)


def tinker_router(home: Path, resolve_base: Callable[[str], Optional[Path]], offered: Callable[[], list[str]],
                  limits: Optional[Limits] = None, resolve_run: Callable[[str], Optional[Path]] = lambda name: None,
                  runs: Callable[[], list[str]] = lambda: []) -> APIRouter:
    """`resolve_base(name)`: the model folder a base model name may load (None: not offered); `offered()`: the names
    the capabilities list as trainable; `resolve_run(name)` / `runs()`: finished LoRA runs, offered for sampling."""
    limits = limits or Limits()
    service = TinkerService(home, resolve_base, offered, limits, resolve_run)
    router = APIRouter(prefix="/api/v1")
    router.service = service  # for tests and the app's shutdown
    _session_routes(router, service, offered, runs)
    _training_routes(router, service, limits)
    _sampling_routes(router, service)
    _future_routes(router, service, limits)
    return router


async def _call(fn, *args):
    """The service's work off the event loop; a client's mistake becomes its status and message."""
    try:
        return await asyncio.to_thread(fn, *args)
    except UserError as e:
        return _error(e.status, str(e))


def _future_body(result) -> dict | JSONResponse:
    if isinstance(result, JSONResponse):
        return result
    return {"request_id": result.id}


def _session_routes(router: APIRouter, service: TinkerService, offered: Callable[[], list[str]],
                    runs: Callable[[], list[str]]) -> None:
    """The service: health, the SDK's client config, capabilities, sessions and their heartbeats."""
    call = _call

    @router.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @router.post("/client/config")
    async def client_config(req: proto.ClientConfigRequest):
        return {"pjwt_auth_enabled": False, "credential_default_source": "api_key", "parallel_fwdbwd_chunks": False,
                "proto_compress_fwdbwd": False, "fwdbwd_max_chunk_bytes_count": CHUNK_BYTES,
                "use_pyqwest_transport": False, "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False, "sample_join_sampling_session": True}

    @router.post("/client/dynamic_config")
    async def dynamic_config(req: proto.ClientConfigRequest):
        return {"refresh_interval_sec": 3600, "sample_cancel_enabled": False}

    @router.get("/get_server_capabilities")
    async def capabilities():
        names, finished = await asyncio.to_thread(lambda: (offered(), runs()))
        return {"supported_models": [{"model_name": n, "trainable": True, "sampleable": True} for n in names]
                + [{"model_name": n, "trainable": False, "sampleable": True} for n in finished]}

    @router.post("/telemetry")
    async def telemetry():
        return {"status": "accepted"}  # the SDK's usage reports: not kept

    @router.post("/create_session")
    async def create_session(req: proto.CreateSessionRequest):
        return {"type": "create_session", "session_id": service.create_session()}

    @router.post("/session_heartbeat")
    async def heartbeat(req: proto.SessionRequest):
        try:
            service.touch(req.session_id)
        except UserError:
            return _error(410, f"session {req.session_id!r} has ended")  # the SDK stops its heartbeat on 410
        return {"type": "session_heartbeat"}

    @router.post("/sessions/{session_id}/finish")
    async def finish(session_id: str):
        await asyncio.to_thread(service.finish_session, session_id)
        return {}

    @router.get("/tunesmith/status")
    async def status():
        """What the Tinker side holds now: sessions, training clients, samplers, base models in memory, adapters."""
        return service.status()

    @router.post("/tunesmith/export_run")
    async def export_run(req: proto.ExportRunRequest):
        """A saved state (`tinker://.../weights/NAME`) becomes a studio run: listed in the page, served by name."""
        result = await call(service.export_run, req.path, req.name)
        if isinstance(result, JSONResponse):
            return result
        return {"run": result}


def _training_routes(router: APIRouter, service: TinkerService, limits: Limits) -> None:
    """Training clients: create/unload, forward/backward (protobuf in), the optimizer step, weights saved and loaded."""
    call, future_body = _call, _future_body

    @router.post("/create_model")
    async def create_model(req: proto.CreateModelRequest):
        return future_body(await call(service.create_model, req))

    @router.post("/get_info")
    async def get_info(req: proto.ModelRequest):
        return await call(service.get_info, req.model_id)

    @router.post("/unload_model")
    async def unload_model(req: proto.ModelRequest):
        return future_body(await call(service.unload_model, req.model_id))

    @router.post("/forward_backward")
    async def forward_backward(request: Request):
        if request.headers.get("content-encoding"):
            return _error(400, "compressed bodies are not accepted here (the studio's client config says so)")
        body = await request.body()
        try:
            fb = proto.read_forward_backward(body, limits.max_request_tokens)
        except ValueError as e:
            return _error(400, str(e))
        except RuntimeError as e:  # the tinker package is missing on the server
            return _error(501, str(e))
        return future_body(await call(service.forward_backward, fb))

    @router.post("/optim_step")
    async def optim_step(req: proto.OptimStepRequest):
        return future_body(await call(service.optim_step, req))

    @router.post("/save_weights")
    async def save_weights(req: proto.SaveWeightsRequest):
        return future_body(await call(service.save_weights, req))

    @router.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(req: proto.SaveWeightsForSamplerRequest):
        return future_body(await call(service.save_weights_for_sampler, req))

    @router.post("/load_weights")
    async def load_weights(req: proto.LoadWeightsRequest):
        return future_body(await call(service.load_weights, req))

    @router.post("/weights_info")
    async def weights_info(req: proto.WeightsInfoRequest):
        return await call(service.weights_info, req.tinker_path)


def _sampling_routes(router: APIRouter, service: TinkerService) -> None:
    """Sampling sessions and their samples (answered through futures)."""
    call = _call

    @router.post("/create_sampling_session")
    async def create_sampling_session(req: proto.CreateSamplingSessionRequest):
        result = await call(service.create_sampler, req)
        if isinstance(result, JSONResponse):
            return result
        return {"type": "create_sampling_session", "sampling_session_id": result}

    @router.post("/join_sampling_session")
    async def join_sampling_session(req: proto.JoinSamplingSessionRequest):
        result = await call(service.join_sampler, req.sampling_session_id)
        if isinstance(result, JSONResponse):
            return result
        return {"type": "join_sampling_session", "client_counter": result}

    @router.get("/samplers/{sampler_id}")
    async def sampler(sampler_id: str):
        result = await call(service.sampler, sampler_id)
        if isinstance(result, JSONResponse):
            return result
        return {"sampler_id": result.sampler_id, "base_model": result.base_model, "model_path": result.model_path}

    @router.post("/asample")
    async def asample(req: proto.SampleRequest):
        result = await call(service.sample, req)
        if isinstance(result, JSONResponse):
            return result
        fut, ids = result
        return {"request_id": fut.id, "sample_sequence_ids": ids}


def _future_routes(router: APIRouter, service: TinkerService, limits: Limits) -> None:
    """`retrieve_future`: a result, try_again while queued or running (held up to POLL_SECONDS first), or an error."""
    @router.post("/retrieve_future")
    async def retrieve_future(req: proto.FutureRetrieveRequest):
        fut = service.future(req.request_id)
        if fut is None:
            return _error(404, f"no request {req.request_id!r} (unknown, or its result was dropped after "
                               f"{limits.futures_kept_seconds:g} s)")
        woken = asyncio.Event()
        if fut.wake_when_done(asyncio.get_running_loop(), woken):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken.wait(), POLL_SECONDS)
        if not fut.done.is_set():
            return {"type": "try_again", "request_id": fut.id, "queue_state": "active"}
        if fut.error is not None:
            return {"error": fut.error, "category": fut.category}
        if isinstance(fut.result, bytes):
            return Response(fut.result, media_type=proto.PROTOBUF)
        return fut.result


def studio_tinker_router(home: Path, studio) -> APIRouter:
    """The router as the studio mounts it: base models are what its jobs may name -- the installed bundled models and
    the models under the operator's `--models` folders (jobs.Policy), by the same rules."""
    from tunesmith.models.load import resolve_model_dir
    from tunesmith.studio.jobs import model_in_folders
    from tunesmith.studio.pool import installed_bundled

    roots = tuple(Path(d) for d in getattr(studio, "models_dirs", ()) or ())

    def resolve_base(name: str) -> Optional[Path]:
        if name in installed_bundled():
            return resolve_model_dir(name)
        found = model_in_folders(name, roots)
        return resolve_model_dir(str(found[0])) if found else None

    def offered() -> list[str]:
        names = list(installed_bundled())
        for root in roots:
            if root.is_dir():
                names += sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        return names

    def resolve_run(name: str) -> Optional[Path]:
        """A finished LoRA run in the studio's runs folder (a job's or an exported state's), by its name."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or ""):
            return None
        final = Path(home) / "runs" / name / "final"
        return final if (final / "adapter_config.json").is_file() else None

    def runs() -> list[str]:
        folder = Path(home) / "runs"
        return sorted(p.name for p in folder.iterdir() if resolve_run(p.name)) if folder.is_dir() else []

    return tinker_router(home, resolve_base, offered, resolve_run=resolve_run, runs=runs)
