"""A browser demo of a saved model: record, upload or click a clip, read the transcript.

    python scripts/demo.py --model runs/whisper-small-hi/best [--port 7860] [--host 127.0.0.1] [--share]

Listens on 127.0.0.1 only unless --host says otherwise; --share asks Gradio for a public link. Requests queue
(--max_queue) and run one at a time; audio over the window is decoded with Whisper's sequential long-form decoding.
"""

import argparse
import sys

from loop.extras import MissingExtra
from loop.model.loading import ModelLoadError

try:
    from loop.ship.demo import DEFAULT_MAX_DURATION_S, DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_QUEUE, build_app, launch
except MissingExtra as missing:  # said in one line, before any argument is parsed
    sys.exit(f"error: {missing}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", required=True,
                        help="model folder (runs/NAME/best or runs/NAME/checkpoints/step_N) or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max_duration_s", type=float, default=DEFAULT_MAX_DURATION_S,
                        help="longest audio transcribed, in seconds")
    parser.add_argument("--encoder_window", default=None, choices=["full", "dynamic"],
                        help="decode at the full window or cut to the clip (default: the model's own, from config.json)")
    parser.add_argument("--assistant_model", default=None,
                        help="a smaller model with the same tokenizer (e.g. a distilled student) for speculative "
                             "decoding: the same transcripts, sooner (clips within the window; docs/distillation.md)")
    parser.add_argument("--max_file_size", default=DEFAULT_MAX_FILE_SIZE, help="largest upload, e.g. 100mb")
    parser.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait at once (more are told the queue is full)")
    parser.add_argument("--examples", default="", help="Common Voice folder whose test split gives clips to click "
                        "(default: the synthetic corpus in assets/; 'none': no clips)")
    args = parser.parse_args(argv)
    try:
        app = build_app(args.model, max_duration_s=args.max_duration_s, encoder_window=args.encoder_window,
                        examples=None if args.examples == "none" else args.examples, max_queue=args.max_queue,
                        assistant_model=args.assistant_model)
    except ModelLoadError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    launch(app, host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
