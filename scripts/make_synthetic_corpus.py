"""Synthesize a small corpus (Hindi by default) in Common Voice's release layout, offline, with espeak-ng.

Writes `<output>/<version-name>/<locale>/` with `clips/*.mp3` (mono, 48 kHz, constant bitrate, like real Common
Voice clips), `train.tsv`, `dev.tsv`, `test.tsv`, `validated.tsv` (the three splits' rows) and `clip_durations.tsv`.
Sentences are shuffled with the seed and split into disjoint sets; every train sentence is read by one or two
synthetic speakers, every dev and test sentence by one. A speaker is a fixed espeak-ng voice variant (of the --voice language), speed
and pitch. The same seed gives the same speakers, splits, rows and file names (MP3 bytes may differ by encoder).

    python scripts/make_synthetic_corpus.py --sentences assets/hindi_sentences.txt --output assets --overwrite

The English guard set (`eval.guard_sets` in the quickstart preset: what fine-tuning on Hindi costs in English):

    python scripts/make_synthetic_corpus.py --sentences assets/english_sentences.txt --locale en \
        --test-sentences 40 --dev-sentences 2 --speakers 4 --overwrite
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

CV_COLUMNS = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes",
              "age", "gender", "accents", "variant", "locale", "segment")  # Common Voice v17 header, in order
SPLITS = ("train", "dev", "test")
SAMPLE_RATE = 48_000  # Hz, the rate of real Common Voice clips
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")  # espeak-ng voice variants (`-v hi+m3`)
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")
AGES = ("teens", "twenties", "twenties", "thirties", "thirties", "fourties", "fifties")  # CV's spelling
SPEED_RANGE = (130, 185)  # words per minute, espeak-ng `-s`
PITCH_RANGE = (30, 70)  # espeak-ng `-p`, 0-99
SPEED_JITTER = 6  # words per minute, drawn per clip so one speaker's clips are not all the same tempo
SILENCE_THRESHOLD = 0.01  # of full scale; quieter samples at either end count as silence
MARGIN_S = 0.2  # seconds of silence kept (or padded) before and after speech
SECOND_READER_PROBABILITY = 0.4  # chance a train sentence gets a second speaker: about 1.4 clips per sentence


@dataclass(frozen=True)
class Speaker:
    """One synthetic contributor: a fixed voice, speed and pitch, and the CV metadata that goes with them."""

    client_id: str  # 64 hex characters, stable for a given seed
    voice: str  # espeak-ng voice with variant, e.g. `hi+f2`
    speed: int  # words per minute
    pitch: int  # espeak-ng pitch, 0-99
    gender: str
    age: str


@dataclass(frozen=True)
class Clip:
    """One row of a split: a sentence read by a speaker at this clip's speed, stored as `path` under clips/."""

    split: str
    path: str
    sentence: str
    speaker: Speaker
    speed: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--sentences", type=Path, default=Path("assets/hindi_sentences.txt"),
                        help="UTF-8 text file, one sentence per line")
    parser.add_argument("--output", type=Path, default=Path("assets"), help="folder that receives the release")
    parser.add_argument("--version-name", default="cv-corpus-17.0-synthetic", help="name of the release folder")
    parser.add_argument("--locale", default="hi", help="locale folder and `locale` column")
    parser.add_argument("--voice", default="",
                        help="espeak-ng voice language (`espeak-ng --voices`); empty: the locale (hi, en, ...)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--speakers", type=int, default=8, help="number of synthetic speakers")
    parser.add_argument("--test-sentences", type=int, default=30)
    parser.add_argument("--dev-sentences", type=int, default=30)
    parser.add_argument("--compression-level", type=float, default=0.99,
                        help="libsndfile MP3 compression in [0, 1): 0 is 320 kbps, 0.99 is 32 kbps (the MPEG-1 floor)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <version-name>/<locale> folder")
    args = parser.parse_args(argv)
    problems = []
    if args.speakers < 2:
        problems.append(f"--speakers {args.speakers}: need at least 2 (train sentences may have two readers)")
    if min(args.test_sentences, args.dev_sentences) < 1:
        problems.append("--test-sentences and --dev-sentences must be at least 1")
    if not 0 <= args.compression_level < 1:
        problems.append(f"--compression-level {args.compression_level}: must be in [0, 1) (libsndfile rejects 1.0)")
    if problems:
        parser.error("; ".join(problems))
    return args


def read_sentences(path: Path) -> list[str]:
    """Non-empty lines of `path`; duplicates and tabs are errors because they would corrupt splits and TSVs."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"cannot read sentences from {path}: {error}") from error
    sentences, seen = [], {}
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        if "\t" in line:
            raise SystemExit(f"{path} line {number}: contains a tab, which would break the TSV columns")
        if line in seen:
            raise SystemExit(f"{path} line {number}: duplicate of line {seen[line]}: {line}")
        seen[line] = number
        sentences.append(line)
    return sentences


def make_speakers(count: int, rng: random.Random, language: str = "hi") -> list[Speaker]:
    """`count` speakers alternating male and female, each a distinct voice variant while variants last."""
    males, females = rng.sample(MALE_VARIANTS, len(MALE_VARIANTS)), rng.sample(FEMALE_VARIANTS, len(FEMALE_VARIANTS))
    speakers = []
    for index in range(count):
        pool, gender = (males, "male_masculine") if index % 2 == 0 else (females, "female_feminine")
        variant = pool[(index // 2) % len(pool)]
        speed, pitch = rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE)
        identity = f"whisper-loop synthetic speaker {index}: {language}+{variant} s{speed} p{pitch}"
        client_id = hashlib.sha256(identity.encode()).hexdigest()
        speakers.append(Speaker(client_id, f"{language}+{variant}", speed, pitch, gender, rng.choice(AGES)))
    return speakers


def split_sentences(sentences: list[str], n_test: int, n_dev: int, rng: random.Random) -> dict[str, list[str]]:
    """Disjoint test, dev and train sentence sets, drawn after a seeded shuffle."""
    if len(sentences) < n_test + n_dev + 1:
        raise SystemExit(f"{len(sentences)} sentences cannot fill {n_test} test + {n_dev} dev and leave train any")
    shuffled = rng.sample(sentences, len(sentences))
    return {"test": shuffled[:n_test], "dev": shuffled[n_test:n_test + n_dev], "train": shuffled[n_test + n_dev:]}


def assign_clips(splits: dict[str, list[str]], speakers: list[Speaker], locale: str, rng: random.Random) -> list[Clip]:
    """Readers for every sentence (one or two in train, one in dev and test) and unique CV-style clip names."""
    readings = []
    for split in SPLITS:
        for sentence in splits[split]:
            readers = 2 if split == "train" and rng.random() < SECOND_READER_PROBABILITY else 1
            readings += [(split, sentence, speaker) for speaker in rng.sample(speakers, readers)]
    numbers = rng.sample(range(10_000_000, 100_000_000), len(readings))  # 8 digits, like real CV clip ids
    return [
        Clip(split, f"common_voice_{locale}_{number}.mp3", sentence, speaker,
             speaker.speed + rng.randint(-SPEED_JITTER, SPEED_JITTER))
        for (split, sentence, speaker), number in zip(readings, numbers)
    ]


def synthesize(text: str, voice: str, speed: int, pitch: int, workdir: Path) -> tuple[np.ndarray, int]:
    """espeak-ng's reading of `text`: float32 samples of shape (n,) and their sample rate (22050 Hz)."""
    wav = workdir / "speech.wav"
    command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"espeak-ng failed on {text!r} with voice {voice}: {error.stderr.strip()}") from error
    audio, rate = sf.read(wav, dtype="float32")
    return audio, rate


def trim_silence(audio: np.ndarray, rate: int) -> np.ndarray:
    """`audio` with exactly `MARGIN_S` of silence before and after the first and last audible samples."""
    audible = np.flatnonzero(np.abs(audio) > SILENCE_THRESHOLD)
    if audible.size == 0:
        raise RuntimeError("espeak-ng produced only silence")
    margin = np.zeros(int(MARGIN_S * rate), dtype=audio.dtype)
    return np.concatenate([margin, audio[audible[0]:audible[-1] + 1], margin])


def write_mp3(path: Path, audio: np.ndarray, rate: int, compression_level: float) -> float:
    """Resample to 48 kHz with soxr, write a constant-bitrate mono MP3, and return its decoded duration in seconds."""
    resampled = soxr.resample(audio, rate, SAMPLE_RATE)
    sf.write(path, resampled, SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III",
             compression_level=compression_level, bitrate_mode="CONSTANT")
    return sf.info(path).duration  # may exceed the samples written: small CBR frames leave no room for a gapless tag


def write_clips(clips: list[Clip], folder: Path, compression_level: float) -> dict[str, float]:
    """Synthesize, trim and encode every clip into `folder`; returns seconds per clip path, in `clips` order."""
    durations = {}
    with tempfile.TemporaryDirectory() as workdir:
        for clip in clips:
            audio, rate = synthesize(clip.sentence, clip.speaker.voice, clip.speed, clip.speaker.pitch, Path(workdir))
            try:
                durations[clip.path] = write_mp3(folder / clip.path, trim_silence(audio, rate), rate, compression_level)
            except (RuntimeError, sf.LibsndfileError) as error:
                raise RuntimeError(f"clip {clip.path} ({clip.sentence!r}, {clip.speaker.voice}): {error}") from error
    return durations


def tsv_row(clip: Clip, locale: str) -> str:
    """One tab-joined CV row; no quoting, because CV sentences keep their quote marks verbatim."""
    speaker = clip.speaker
    values = {
        "client_id": speaker.client_id, "path": clip.path,
        "sentence_id": hashlib.sha256(clip.sentence.encode("utf-8")).hexdigest(), "sentence": clip.sentence,
        "up_votes": "2", "down_votes": "0", "age": speaker.age, "gender": speaker.gender, "locale": locale,
    }
    return "\t".join(values.get(column, "") for column in CV_COLUMNS)


def write_tsv(path: Path, header: tuple[str, ...], rows: list[str]) -> None:
    """`header` and `rows` as a UTF-8, LF-terminated TSV."""
    path.write_text("\n".join(["\t".join(header), *rows]) + "\n", encoding="utf-8")


def prepare_folder(release: Path, overwrite: bool) -> Path:
    """An empty `<release>/clips/`; an existing release folder is replaced only with `--overwrite`."""
    if release.exists():
        if not overwrite:
            raise SystemExit(f"{release} already exists; pass --overwrite to replace it")
        shutil.rmtree(release)
    (release / "clips").mkdir(parents=True)
    return release


def require_espeak() -> None:
    """Fail early, with the install command, when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found on PATH; install espeak-ng: apt-get install espeak-ng")


def print_summary(release: Path, clips: list[Clip], durations: dict[str, float], speakers: list[Speaker]) -> None:
    """Clips, sentences, speakers and seconds per split, the corpus size, and who the speakers are."""
    seconds = np.array(list(durations.values()))
    size_mb = sum(p.stat().st_size for p in (release / "clips").iterdir()) / 1e6
    print(f"wrote {release}")
    for split in SPLITS:
        rows = [c for c in clips if c.split == split]
        print(f"  {split:5s}: {len(rows):4d} clips, {len({c.sentence for c in rows}):4d} sentences, "
              f"{len({c.speaker.client_id for c in rows})} speakers, {sum(durations[c.path] for c in rows):6.1f} s")
    print(f"  total: {len(clips)} clips, {seconds.sum() / 60:.1f} min, {size_mb:.2f} MB of MP3; clip length "
          f"min {seconds.min():.2f} s, median {np.median(seconds):.2f} s, max {seconds.max():.2f} s")
    for speaker in speakers:
        print(f"  speaker {speaker.client_id[:8]}: {speaker.voice:6s} -s {speaker.speed} -p {speaker.pitch} "
              f"{speaker.gender}, {speaker.age}")


def main(argv: list[str] | None = None) -> None:
    """Speakers, splits and readers from the seed, then the clips, the TSVs and a summary."""
    args = parse_args(argv)
    require_espeak()
    rng = random.Random(args.seed)
    sentences = read_sentences(args.sentences)
    speakers = make_speakers(args.speakers, rng, args.voice or args.locale)
    clips = assign_clips(split_sentences(sentences, args.test_sentences, args.dev_sentences, rng), speakers,
                         args.locale, rng)
    release = prepare_folder(args.output / args.version_name / args.locale, args.overwrite)

    durations = write_clips(clips, release / "clips", args.compression_level)
    for split in SPLITS:
        write_tsv(release / f"{split}.tsv", CV_COLUMNS, [tsv_row(c, args.locale) for c in clips if c.split == split])
    write_tsv(release / "validated.tsv", CV_COLUMNS, [tsv_row(c, args.locale) for c in clips])
    write_tsv(release / "clip_durations.tsv", ("clip", "duration[ms]"),
              [f"{path}\t{round(seconds * 1000)}" for path, seconds in durations.items()])
    print_summary(release, clips, durations, speakers)


if __name__ == "__main__":
    main()
