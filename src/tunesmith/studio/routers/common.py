"""What several routers share: an OpenAI error whose message names no server path, and a run by name or its 404."""
from __future__ import annotations

from fastapi import Request

from tunesmith.export.serve import openai_error
from tunesmith.studio.jobs import public_text


def public_error(request: Request, status: int, message: str, param=None, code=None, headers=None):
    """OpenAI's error body with a message that names no server path (the studio home and the operator's folders are
    replaced by their public names: jobs.public_text)."""
    state = request.app.state
    return openai_error(status, public_text(message, state.home, state.policy), param, code, headers)


def run_or_404(request: Request, name: str):
    """(the run named `name`, None) or (None, its 404)."""
    run = request.app.state.runs.find(name)
    return (run, None) if run else (None, public_error(request, 404, f"no run named {name!r}", "run", "run_not_found"))
