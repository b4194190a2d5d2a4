"""Serve a model with OpenAI's audio transcription API on this machine:

    python scripts/serve.py --model runs/whisper-small-hi/best --port 8000

then, with the `openai` client (any api_key unless --api_key_env is given):

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    print(client.audio.transcriptions.create(model="whisper-loop", file=open("clip.wav", "rb")).text)

--model is a saved model folder (runs/NAME/best, or any folder the project loads) or a CTranslate2 export of
scripts/export.py (faster-whisper then decodes). Transcripts are the ones scripts/evaluate.py gives; audio longer
than the model's window goes through the long-form path. The server listens on 127.0.0.1 unless --host says
otherwise; with --api_key_env NAME every request needs `Authorization: Bearer $NAME`.
"""

import argparse
import sys

from loop.cli import one_line
from loop.config import resolve_path
from loop.extras import MissingExtra, require
from loop.ship.serve import DEFAULT_MAX_DURATION_S, DEFAULT_MAX_QUEUE, api_key_from, build_app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model folder or a CTranslate2 export")
    parser.add_argument("--assistant_model", default=None,
                        help="a smaller model of the same tokenizer (scripts/make_student.py) for speculative "
                             "decoding: the model's own greedy transcripts, sooner (docs/distillation.md)")
    parser.add_argument("--model_name", default="whisper-loop", help="the name /health reports (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--max_file_mb", type=float, default=100.0, help="largest upload, in MB (default: %(default)g)")
    parser.add_argument("--max_duration_s", type=float, default=DEFAULT_MAX_DURATION_S,
                        help="longest audio transcribed, in seconds (default: %(default)g)")
    parser.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait; more are answered 503 (default: %(default)s)")
    parser.add_argument("--api_key_env", default=None,
                        help="environment variable holding the API key clients must send as a bearer token")
    args = parser.parse_args(argv)
    for name in ("max_file_mb", "max_duration_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be above 0, got {getattr(args, name):g}")
    if args.max_queue < 0:
        parser.error(f"--max_queue must be 0 or more, got {args.max_queue}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from loop.ship.serve_backends import load_backend

    try:
        uvicorn = require("uvicorn", "serve", "scripts/serve.py")
        key = api_key_from(args.api_key_env)
        assistant = args.assistant_model and resolve_path(args.assistant_model)
        backend = load_backend(resolve_path(args.model), assistant)
        app = build_app(backend, args.model_name, max_file_bytes=int(args.max_file_mb * 2**20),
                        max_duration_s=args.max_duration_s, max_queue=args.max_queue, api_key=key)
    except (ValueError, OSError, RuntimeError, MissingExtra) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
