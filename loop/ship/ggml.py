"""Export a saved Whisper to the GGML model file whisper.cpp loads (`ggml-model.bin`), written here from the
format's definition (whisper.cpp's `whisper_model_load`; the layout its models/convert-pt-to-ggml.py writes):

    int32 magic 0x67676d6c ("ggml")
    int32 hyperparameters: n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_text_ctx,
          n_text_state, n_text_head, n_text_layer, n_mels, ftype (0 f32, 1 f16; quantized: the type + 1000 * 2,
          the quantization version)
    int32 n_mels, int32 n_fft_bins (201), float32 mel filters (n_mels, 201)
    int32 n_tokens, then per token: int32 length, its bytes (the byte-level BPE token turned back into bytes)
    tensors until the end: int32 n_dims, int32 name length, int32 type, int32 dims (innermost first), name, data

Tensors carry openai-whisper's names (`encoder.blocks.0.attn.query.weight`); whisper.cpp allocates each with a
fixed type, so each is written in it: positional embeddings, biases and layer norms float32; convolution weights
float16; linear weights and the token embedding in the file's type, quantized in 32-value
blocks (q8_0: a float16 scale and 32 int8; q5_0 and q4_0: a scale and 5- or 4-bit values), as whisper.cpp's own
`quantize` tool does. The conv biases are stored as (n_state, 1), the shape whisper.cpp reads.

whisper.cpp assumes the special tokens' ids of OpenAI's vocabularies (<|endoftext|> 50256, one more in
multilingual ones) and a 30-s window (1500 encoder positions), so other layouts are refused. It computes its own
log-mel features from the audio (with the filters written here). No float32 file is offered: whisper.cpp's CPU
convolution takes float16 kernels only (an assertion aborts the process), as its own converter writes them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from loop.files import write_json_atomic, write_text_atomic
from loop.ship.export import ExportError, SourceModel, check_output_dir, write_staged

MAGIC = 0x67676D6C
GGML_FILE = "ggml-model.bin"
QK = 32  # values per quantization block
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, stored as ftype + 1000 * version
# ggml_type of each tensor type, and whisper.cpp's ftype of each file type
TYPES = {"float32": 0, "float16": 1, "q4_0": 2, "q5_0": 6, "q8_0": 8}
FTYPES = {"float32": 0, "float16": 1, "q4_0": 2, "q8_0": 7, "q5_0": 8}
WINDOW_POSITIONS = 1500  # encoder positions of a 30-s window
MULTILINGUAL_EOT = 50257  # <|endoftext|> in OpenAI's multilingual vocabulary; 50256 in the English-only one

LAYER_PARTS = {  # transformers' name inside a layer -> openai-whisper's
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln", "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
TOP_NAMES = {
    "model.encoder.conv1": "encoder.conv1", "model.encoder.conv2": "encoder.conv2",
    "model.encoder.embed_positions.weight": "encoder.positional_embedding",
    "model.encoder.layer_norm": "encoder.ln_post", "model.decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "model.decoder.embed_positions.weight": "decoder.positional_embedding", "model.decoder.layer_norm": "decoder.ln",
}


def whisper_name(name: str) -> str | None:
    """openai-whisper's name of a transformers parameter, None for the output projection (tied to the embedding)."""
    if name.startswith("proj_out"):
        return None
    for prefix, new in TOP_NAMES.items():
        if name.startswith(prefix):
            return new + name[len(prefix):]
    pieces = name.split(".", 4)  # model, encoder|decoder, layers, N, rest
    if len(pieces) != 5 or pieces[0] != "model" or pieces[2] != "layers":
        raise ExportError(f"the model has a parameter whisper.cpp does not know: {name}")
    stack, number, rest = pieces[1], pieces[3], pieces[4]
    part, _, kind = rest.rpartition(".")
    if part not in LAYER_PARTS:
        raise ExportError(f"the model has a parameter whisper.cpp does not know: {name}")
    return f"{stack}.blocks.{number}.{LAYER_PARTS[part]}.{kind}"


def tensor_type(name: str, dims: int, quantization: str) -> str:
    """The type whisper.cpp allocates the tensor in (module docstring)."""
    if dims == 1 or "positional_embedding" in name or name.startswith("encoder.conv") and name.endswith(".bias"):
        return "float32"
    if name.startswith("encoder.conv"):
        return "float32" if quantization == "float32" else "float16"
    return quantization


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape[:-1], -1)


def quantize(values: np.ndarray, kind: str) -> bytes:
    """`values` (rows, n) with n a multiple of 32, as ggml blocks of `kind` (q8_0, q5_0, q4_0), row after row."""
    blocks = values.astype(np.float32).reshape(-1, QK)
    if kind == "q8_0":
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
        inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        quants = np.round(blocks * inverse).astype(np.int8).view(np.uint8)
        return np.concatenate([fp16_bytes(scale), quants], axis=1).tobytes()
    levels = 16 if kind == "q5_0" else 8
    # The value of largest magnitude, sign kept, maps to -levels: the scale is negative when it is positive.
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    scale = peak / -levels
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    quants = np.minimum(2 * levels - 1, (blocks * inverse + levels + 0.5).astype(np.int8)).astype(np.uint8)
    low, high = quants[:, :QK // 2], quants[:, QK // 2:]
    nibbles = (low & 0x0F) | ((high & 0x0F) << 4)
    if kind == "q4_0":
        return np.concatenate([fp16_bytes(scale), nibbles], axis=1).tobytes()
    fifth = ((quants >> 4) & 1).astype(np.uint32)  # bit j: value j's fifth bit, value j + 16's at bit j + 16
    bits = (fifth << np.arange(QK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return np.concatenate([fp16_bytes(scale), bits[:, None].view(np.uint8), nibbles], axis=1).tobytes()


def tensor_record(name: str, values: np.ndarray, kind: str) -> bytes:
    """One tensor as the file stores it: header, dims innermost first, name, data."""
    if kind in ("q8_0", "q5_0", "q4_0") and values.shape[-1] % QK:
        kind = "float16"  # rows that do not split into blocks stay float16, as whisper.cpp's quantize leaves them
    encoded = name.encode()
    header = struct.pack(f"<3i{values.ndim}i", values.ndim, len(encoded), TYPES[kind], *reversed(values.shape))
    if kind == "float32":
        data = values.astype("<f4").tobytes()
    elif kind == "float16":
        data = values.astype("<f2").tobytes()
    else:
        data = quantize(values.reshape(-1, values.shape[-1]), kind)
    return header + encoded + data


def ggml_problems(source: SourceModel) -> list[str]:
    """What keeps whisper.cpp from running `source` as transformers does; empty when nothing does."""
    config, tokenizer, problems = source.config, source.processor.tokenizer, []
    if config.max_source_positions != WINDOW_POSITIONS:
        problems.append(f"its window has {config.max_source_positions} encoder positions; whisper.cpp decodes "
                        f"30-s windows ({WINDOW_POSITIONS} positions)")
    if config.num_mel_bins not in (80, 128):
        problems.append(f"it takes {config.num_mel_bins} mel bins; whisper.cpp knows 80 and 128")
    expected = MULTILINGUAL_EOT if config.vocab_size >= 51865 else MULTILINGUAL_EOT - 1
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if eot != expected:
        problems.append(f"its <|endoftext|> is token {eot}; whisper.cpp assumes {expected}, the id in OpenAI's "
                        "vocabulary, and would take the wrong tokens for language, task and timestamps")
    return problems


def byte_characters() -> dict[int, str]:
    """Byte-level BPE's byte -> character map (GPT-2's, which Whisper's tokenizer uses): printable Latin-1 bytes
    stand for themselves, the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + n) for n, byte in enumerate(others)}}


def vocabulary_bytes(tokenizer) -> list[bytes]:
    """The regular (byte-level BPE) tokens in id order, as bytes; whisper.cpp names the special ones itself."""
    byte_of = {char: byte for byte, char in byte_characters().items()}
    vocab = tokenizer.get_vocab()
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    by_id = {index: token for token, index in vocab.items() if index < eot}
    try:
        return [bytes(byte_of[char] for char in by_id[index]) for index in range(eot)]
    except KeyError as error:
        raise ExportError(f"the vocabulary has a token that is not byte-level BPE: {error}") from error


def read_vocabulary(path: str | Path) -> list[bytes]:
    """The regular tokens a GGML file stores, in id order (the vocabulary section of the layout above)."""
    with open(path, "rb") as handle:
        handle.seek(4 * 12)  # magic and the 11 hyperparameters
        n_mels, n_fft = struct.unpack("<2i", handle.read(8))
        handle.seek(4 * n_mels * n_fft, 1)
        (count,) = struct.unpack("<i", handle.read(4))
        tokens = []
        for _ in range(count):
            (length,) = struct.unpack("<i", handle.read(4))
            tokens.append(handle.read(length))
    return tokens


def ggml_bytes(source: SourceModel, state: dict, quantization: str):
    """The file's parts in order (module docstring), from the model's `state_dict` as numpy arrays."""
    config, fe = source.config, source.processor.feature_extractor
    hyper = [config.vocab_size, config.max_source_positions, config.d_model, config.encoder_attention_heads,
             config.encoder_layers, config.max_target_positions, config.d_model, config.decoder_attention_heads,
             config.decoder_layers, config.num_mel_bins,
             FTYPES[quantization] + (1000 * QUANTIZATION_VERSION if quantization.startswith("q") else 0)]
    yield struct.pack(f"<{1 + len(hyper)}i", MAGIC, *hyper)
    filters = np.asarray(fe.mel_filters, dtype=np.float32).T  # (n_mels, n_fft // 2 + 1)
    yield struct.pack("<2i", *filters.shape) + filters.astype("<f4").tobytes()
    tokens = vocabulary_bytes(source.processor.tokenizer)
    yield struct.pack("<i", len(tokens)) + b"".join(struct.pack("<i", len(t)) + t for t in tokens)
    for name, values in state.items():
        new = whisper_name(name)
        if new is None:
            continue
        if new in ("encoder.conv1.bias", "encoder.conv2.bias"):
            values = values.reshape(-1, 1)
        yield tensor_record(new, values, tensor_type(new, values.ndim, quantization))


def export_ggml(source: SourceModel, output_dir: str | Path, quantization: str, *, overwrite: bool = False) -> Path:
    """Writes `output_dir/ggml-model.bin` (weights as `quantization`), export.json and README.md, staged in a
    sibling folder and moved into place once complete. Returns the folder."""
    from loop.model.loading import load_weights

    output_dir = Path(output_dir)
    check_output_dir(output_dir, source.folder, overwrite)
    problems = ggml_problems(source)
    if problems:
        raise ExportError(f"--model {source.folder} cannot be exported for whisper.cpp: {'; '.join(problems)}")
    model = load_weights(str(source.folder))
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}

    def write(staging: Path) -> None:
        with open(staging / GGML_FILE, "wb") as handle:
            for part in ggml_bytes(source, state, quantization):
                handle.write(part)
        write_json_atomic(staging / "export.json", {
            "source": str(source.folder), "format": "ggml", "quantization": quantization, "file": GGML_FILE,
            "num_mel_bins": source.config.num_mel_bins, "language": getattr(source.generation, "language", None),
            "task": getattr(source.generation, "task", None)})
        write_text_atomic(staging / "README.md", ggml_readme(source, output_dir, quantization))

    write_staged(output_dir, write)
    return output_dir


def ggml_readme(source: SourceModel, output_dir: Path, quantization: str) -> str:
    from loop.languages import language_code

    language = language_code(getattr(source.generation, "language", None) or "en")
    return "\n".join([
        f"# {Path(source.folder).resolve().name} for whisper.cpp ({quantization})", "",
        f"`{GGML_FILE}` is `{source.folder}` in whisper.cpp's GGML model format, written by whisper-loop's "
        "`scripts/export.py --format ggml`. `parity.json`, when present, compares its transcripts with the "
        "transformers model's on the same audio.", "",
        "With whisper.cpp's command line (16-kHz WAV input):", "",
        "```bash", f"whisper-cli -m {output_dir / GGML_FILE} -l {language} -nf --no-flash-attn --suppress-nst -f clip.wav", "```", "",
        "From Python with pywhispercpp:", "",
        "```python", "from pywhispercpp.model import Model", "",
        "# Greedy, without temperature fallback, previous-text context or flash attention, suppressing",
        "# non-speech tokens: as the parity gate decodes.",
        f'model = Model("{output_dir / GGML_FILE}", context_params={{"flash_attn": False}}, print_progress=False,',
        '              no_context=True, temperature_inc=0.0, suppress_nst=True)',
        f'print(" ".join(segment.text for segment in model.transcribe("clip.wav", language="{language}")))',
        "```", ""])
