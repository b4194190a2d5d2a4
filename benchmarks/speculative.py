"""Decoding time per clip of a teacher, its student, and the teacher with the student as assistant:

    python -m benchmarks.speculative --model runs/wb-teacher/best --student runs/wb-distil/best \\
        [--data.path assets/cv-corpus-17.0-synthetic] [--split test] [--clips 30] [--threads 2] [--output FILE]

Every clip is decoded one at a time (batch 1, the models' own window and generation config) in turn by each way,
so that a change in the machine's load falls on all of them alike:
- `encoder`: the teacher's encoder alone (the fixed cost every way pays once);
- `teacher`: plain greedy decoding, `loop.model.decoding.generate_ids` (transformers' generate), as evaluation does;
- `student`: the same for the student;
- `assisted`: speculative decoding, `loop.model.decoding.assisted_ids` with the student as assistant;
- `transformers_assisted`: transformers' own assisted generation (`generate(..., assistant_model=student)`), the
  student encoding the clip itself and each draft a `generate` call, for comparison.
Prints a markdown table (seconds per clip, speed-up against the teacher, tokens per clip, WER / CER against the
references, transcripts identical to the teacher's, teacher passes per token) and writes it as JSON with --output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loop.data.audio import SAMPLE_RATE, decode_audio
from loop.data.sources import SkipLog, find_common_voice_dir, read_common_voice_split
from loop.eval.metrics import compute_metrics
from loop.model.decoding import assisted_ids, generate_ids, without_prompt
from loop.model.encoder_window import batch_features
from loop.model.features import LogMel, pad_waveforms
from loop.model.loading import load_for_inference
from loop.model.speculative import DraftCounts

WAYS = ("encoder", "teacher", "student", "assisted", "transformers_assisted")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the teacher (a model folder)")
    parser.add_argument("--student", required=True, help="the student (a model folder with the teacher's tokenizer)")
    parser.add_argument("--data.path", dest="data_path", default="assets/cv-corpus-17.0-synthetic",
                        help="a Common Voice release folder (default: %(default)s)")
    parser.add_argument("--split", default="test", help="the split whose first clips are decoded (default: %(default)s)")
    parser.add_argument("--clips", type=int, default=30, help="clips to decode (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, processor = load_for_inference(args.model)
    student, _ = load_for_inference(args.student)
    tokenizer, log_mel = processor.tokenizer, LogMel(processor.feature_extractor)
    rows = read_common_voice_split(find_common_voice_dir(args.data_path), args.split, SkipLog())[:args.clips]
    seconds = {way: 0.0 for way in WAYS}
    texts = {way: [] for way in WAYS[1:]}
    tokens = {way: 0 for way in WAYS[1:]}
    counts, settings = DraftCounts(), teacher.generation_config
    ways = {
        "encoder": lambda features, _: teacher.get_encoder()(features),
        "teacher": lambda features, duration: generate_ids(teacher, features, seconds=duration),
        "student": lambda features, duration: generate_ids(student, features, seconds=duration),
        "assisted": lambda features, duration: assisted_ids(teacher, student, features, seconds=duration,
                                                            counts=counts),
        "transformers_assisted": lambda features, _: without_prompt(teacher.generate(
            input_features=features, assistant_model=student, language=settings.language, task=settings.task,
            use_cache=True, force_unique_generate_call=True), settings),
    }
    for number, row in enumerate([rows[0], *rows]):  # the first clip once more, untimed: warm-up
        waveform = torch.as_tensor(decode_audio(row["audio_path"]))
        audio, _ = pad_waveforms([waveform])
        duration = torch.tensor([len(waveform) / SAMPLE_RATE])
        features = batch_features(teacher, log_mel, audio)
        for way, decode in ways.items():
            started = time.perf_counter()
            with torch.no_grad():
                ids = decode(features, duration)
            if number == 0:
                continue
            seconds[way] += time.perf_counter() - started
            if way != "encoder":
                texts[way].append(tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
                tokens[way] += int((ids != teacher.generation_config.pad_token_id).sum())
        if number == 0:
            counts = DraftCounts()  # the warm-up's drafts are not counted (the lambda reads `counts` when called)
    references = [row["text"] for row in rows]
    language = teacher.generation_config.language
    results = {"clips": len(rows), "threads": args.threads, "model": args.model, "student": args.student,
               "tokens_per_teacher_pass": round(counts.tokens / max(counts.model_passes, 1), 3),
               "draft_acceptance": round(counts.accepted / max(counts.drafted, 1), 3), "ways": {}}
    for way in WAYS:
        entry = {"seconds_per_clip": round(seconds[way] / len(rows), 4),
                 "speed_up": round(seconds["teacher"] / seconds[way], 3)}
        if way != "encoder":
            metrics = compute_metrics(references, texts[way], language)
            entry.update(wer=round(metrics["wer"], 2), cer=round(metrics["cer"], 2),
                         tokens_per_clip=round(tokens[way] / len(rows), 1),
                         identical_to_teacher=sum(a == b for a, b in zip(texts[way], texts["teacher"])))
        results["ways"][way] = entry
    print(table(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


def table(results: dict) -> str:
    lines = ["| way | s per clip | speed-up | WER / CER | tokens per clip | identical to the teacher |",
             "|---|---|---|---|---|---|"]
    for way, entry in results["ways"].items():
        scores = f"{entry['wer']:.2f} / {entry['cer']:.2f}" if "wer" in entry else "-"
        lines.append(f"| {way} | {entry['seconds_per_clip']:.3f} | {entry['speed_up']:.2f} x | {scores} | "
                     f"{entry.get('tokens_per_clip', '-')} | "
                     f"{entry.get('identical_to_teacher', '-')} of {results['clips']} |")
    lines.append(f"\nspeculative decoding: {results['tokens_per_teacher_pass']} tokens per teacher pass, "
                 f"{100 * results['draft_acceptance']:.1f}% of draft tokens kept")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
