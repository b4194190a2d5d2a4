"""An HTTP server with OpenAI's audio transcription API shape, for a saved model or a CTranslate2 export
(`scripts/serve.py` is the command line; `loop.ship.serve_backends` transcribes):

- `POST /v1/audio/transcriptions`, multipart: `file` (the audio), `model` (any name: one model is served),
  `language` (ISO code or Whisper name; default the model's), `prompt`, `response_format` (json, text,
  verbose_json, srt, vtt), `temperature` (0: greedy as evaluated; above 0 samples);
- `GET /health`: {"status": "ok", "model": ..., "queue": ...}.

Uploads pass the demo's checks (`loop.ship.uploads`): an empty file or recording is 400, a file over
`max_file_bytes` or audio over `max_duration_s` 413, a file that is not audio 415; errors have OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`, so that the `openai` client raises them with their message.
Requests run one at a time (the backend's lock) in a worker thread; at most `max_queue` wait, and past that a
request is answered 503 at once rather than held. With an API key every transcription needs
`Authorization: Bearer KEY` (401 otherwise); /health needs none.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations at runtime, and its types are
# imported inside build_app (FastAPI is an optional extra).
import os
import secrets
import tempfile
import threading
from pathlib import Path

from loop.extras import require
from loop.languages import is_whisper_language
from loop.ship.serve_backends import subtitles
from loop.ship.uploads import TOO_LARGE, AudioInputError, read_audio

DEFAULT_MAX_FILE_BYTES = 100 * 2**20  # the demo's 100 MB
DEFAULT_MAX_DURATION_S = 600.0  # the demo's 10 minutes
DEFAULT_MAX_QUEUE = 32  # requests waiting at once; more are answered 503
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


def error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Gate:
    """The bounded queue: admits a request when fewer than `limit` are waiting or running beyond the one running."""

    def __init__(self, limit: int):
        self.limit, self.pending, self.lock = limit, 0, threading.Lock()

    def enter(self) -> bool:
        with self.lock:
            if self.pending > self.limit:
                return False
            self.pending += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.pending -= 1


def build_app(backend, model_name: str, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
              max_duration_s: float = DEFAULT_MAX_DURATION_S, max_queue: int = DEFAULT_MAX_QUEUE,
              api_key: str | None = None):
    """The FastAPI app serving `backend` (`loop.ship.serve_backends.load_backend`) under the name `model_name`."""
    require("fastapi", "serve", "scripts/serve.py")
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse

    app, gate = FastAPI(title=f"whisper-loop: {model_name}"), Gate(max_queue)

    def refuse(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, code, param), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):  # a missing `file`: 400 in OpenAI's shape
        problem = error.errors()[0]
        field = str(problem.get("loc", ["", "?"])[-1])
        return refuse(400, f"{field}: {problem.get('msg', 'invalid')}", "invalid_request", field)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "queue": gate.pending, "max_queue": max_queue}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(model_name),  # noqa: B008
                             language: str | None = Form(None), prompt: str | None = Form(None),  # noqa: B008
                             response_format: str = Form("json"), temperature: float = Form(0.0)):  # noqa: B008
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("Incorrect or missing API key: send Authorization: Bearer KEY",
                                               "invalid_api_key", kind="authentication_error"), status_code=401)
        if response_format not in RESPONSE_FORMATS:
            return refuse(400, f"response_format {response_format!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                          "invalid_value", "response_format")
        if not 0.0 <= temperature <= 1.0:
            return refuse(400, f"temperature {temperature:g} is not between 0 and 1", "invalid_value", "temperature")
        data = await file.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            return refuse(TOO_LARGE, f"{file.filename} is larger than the {max_file_bytes} bytes this server "
                          "accepts (--max_file_mb)", "file_too_large", "file")
        if not data:
            return refuse(400, f"{file.filename} is an empty file: upload audio", "empty_file", "file")
        if not gate.enter():
            return JSONResponse(error_body(f"the server is busy: {max_queue} requests are waiting; retry later",
                                           "server_busy", kind="server_error"), status_code=503)
        try:
            result = await run_in_threadpool(transcribe_upload, backend, data, file.filename or "upload",
                                             max_duration_s, language, prompt, temperature,
                                             response_format in ("verbose_json", "srt", "vtt"))
        except AudioInputError as error:
            return refuse(error.status, str(error), error.code, "language" if error.code == "invalid_language" else "file")
        finally:
            gate.leave()
        if response_format == "text":
            return PlainTextResponse(result.text)
        if response_format in ("srt", "vtt"):
            return PlainTextResponse(subtitles(result.segments, response_format),
                                     media_type="text/vtt" if response_format == "vtt" else "text/plain")
        if response_format == "json":
            return {"text": result.text}
        return {"task": "transcribe", "language": result.language, "duration": round(result.duration, 3),
                "text": result.text, "segments": [
                    {"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": s.tokens,
                     "temperature": temperature} for i, s in enumerate(result.segments)]}

    return app


def transcribe_upload(backend, data: bytes, filename: str, max_duration_s: float, language: str | None,
                      prompt: str | None, temperature: float, timestamps: bool):
    """One upload, written to a temporary file (soundfile reads the duration from its header), checked, then
    transcribed; an AudioInputError says what is wrong with it."""
    suffix = Path(filename).suffix[:16]
    with tempfile.TemporaryDirectory(prefix="whisper-loop-upload-") as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        waveform = read_audio(path, max_duration_s, service="this server")
    if language and not is_whisper_language(language):
        raise AudioInputError(f"language {language!r} is not one Whisper knows: pass an ISO code such as 'hi'",
                              400, "invalid_language")
    return backend.transcribe(waveform, language, prompt, temperature, timestamps)


def api_key_from(env_name: str | None) -> str | None:
    """The key in the environment variable `env_name` (None: no key needed); an unset or empty one is an error."""
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise ValueError(f"--api_key_env {env_name}: the environment variable is unset or empty; export it first")
    return key
