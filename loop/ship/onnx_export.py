"""Export a saved Whisper to ONNX with `torch.onnx` (the TorchScript exporter; optimum's exporter pins an older
transformers), as two graphs that `loop.ship.onnx_decode` runs greedily in onnxruntime:

    encoder.onnx  input_features (batch, n_mels, 3000) float32
                  -> cross_k, cross_v (decoder_layers, batch, heads, 1500, head_dim): every decoder layer's
                     cross-attention keys and values, computed once per clip
    decoder.onnx  input_ids (batch, tokens) int64, self_k, self_v (decoder_layers, batch, heads, past, head_dim)
                  (past = tokens decoded so far; 0 at the first step), cross_k, cross_v
                  -> logits (batch, tokens, vocab), self_k_out, self_v_out (past + tokens positions)

plus the model's tokenizer and processor files (`save_pretrained`) and `whisper_onnx.json`: the prompt tokens
(<|startoftranscript|>, language, task, <|notimestamps|>), <|endoftext|>, suppress and begin-suppress tokens, the
length cap, mel bins and window. The features are the model's own log-mel (the feature extractor saved beside the
graphs, or `loop.model.features.LogMel`), so a float32 export reproduces transformers' transcripts.

`--quantization int8` then rewrites both graphs with onnxruntime's dynamic quantization (`quantize_graphs`): the
weight of every matrix product by a stored weight becomes int8 (one scale per tensor), the output projection
included (then stored as its own int8 copy of the embedding, which the decoder's input lookup keeps in float32),
and onnxruntime quantizes that product's input to 8 bits at run time; the products of two activations (attention
scores and values) and the convolutions stay float32. The gate holds it to the WER tolerance, like every quantized
export.

The decoder step is written out here over the model's own weights (layer norms, projections, attention with a
causal mask over past and new tokens, the MLP), because the transformers decoder's cache objects do not trace
into a graph with dynamic past length; the encoder is transformers' own module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loop.files import write_json_atomic, write_text_atomic
from loop.ship.export import ExportError, SourceModel, check_output_dir, write_staged

ENCODER_FILE, DECODER_FILE, SETTINGS_FILE = "encoder.onnx", "decoder.onnx", "whisper_onnx.json"
OPSET = 17
WINDOW_POSITIONS = 1500  # encoder positions of Whisper's 30-s window
FALLBACK_LANGUAGE = "hindi"  # load_for_inference's default for a checkpoint that names no language


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, length, d_model) -> (batch, heads, length, head_dim)."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention over (batch, heads, length, head_dim); returns (batch, length, d_model)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    out = torch.softmax(scores, dim=-1) @ v
    batch, heads, length, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


class EncoderGraph(torch.nn.Module):
    """Features -> the decoder layers' cross-attention keys and values, stacked."""

    def __init__(self, model):
        super().__init__()
        self.encoder, self.layers = model.model.encoder, model.model.decoder.layers
        self.heads = model.config.decoder_attention_heads

    def forward(self, input_features: torch.Tensor):
        hidden = self.encoder(input_features).last_hidden_state
        keys = [split_heads(layer.encoder_attn.k_proj(hidden), self.heads) for layer in self.layers]
        values = [split_heads(layer.encoder_attn.v_proj(hidden), self.heads) for layer in self.layers]
        return torch.stack(keys), torch.stack(values)


class DecoderGraph(torch.nn.Module):
    """One decoding step over new tokens, with the self-attention cache of the tokens before them."""

    def __init__(self, model):
        super().__init__()
        decoder = model.model.decoder
        self.decoder, self.heads = decoder, model.config.decoder_attention_heads
        self.embed_scale = float(getattr(decoder, "embed_scale", 1.0) or 1.0)

    def forward(self, input_ids, self_k, self_v, cross_k, cross_v):
        decoder, past, length = self.decoder, self_k.shape[3], input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device) + past
        x = decoder.embed_tokens(input_ids) * self.embed_scale + decoder.embed_positions.weight[positions]
        # Token i (at position past + i) sees positions up to past + i: a causal mask over past and new tokens.
        seen = torch.arange(past + length, device=input_ids.device)[None, :] <= positions[:, None]
        mask = torch.zeros(seen.shape, dtype=x.dtype).masked_fill(~seen, float("-inf"))
        keys, values = [], []
        for index, layer in enumerate(decoder.layers):
            h = layer.self_attn_layer_norm(x)
            attn = layer.self_attn
            k = torch.cat([self_k[index], split_heads(attn.k_proj(h), self.heads)], dim=2)
            v = torch.cat([self_v[index], split_heads(attn.v_proj(h), self.heads)], dim=2)
            keys.append(k)
            values.append(v)
            x = x + attn.out_proj(attend(split_heads(attn.q_proj(h), self.heads), k, v, mask))
            h = layer.encoder_attn_layer_norm(x)
            cross = layer.encoder_attn
            x = x + cross.out_proj(attend(split_heads(cross.q_proj(h), self.heads), cross_k[index], cross_v[index],
                                          None))
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        logits = decoder.layer_norm(x) @ decoder.embed_tokens.weight.T  # proj_out is tied to the embedding
        return logits, torch.stack(keys), torch.stack(values)


def onnx_settings(source: SourceModel) -> dict:
    """whisper_onnx.json: what a greedy loop needs besides the graphs (module docstring)."""
    from loop.model.loading import load_processor

    config, generation = source.config, source.generation
    # A checkpoint that names no language (a Hub base model) decodes in the fallback language, as
    # `loop.model.loading.load_for_inference` decodes it.
    language = getattr(generation, "language", None) or FALLBACK_LANGUAGE
    task = getattr(generation, "task", None) or "transcribe"
    prompt = [int(t) for t in load_processor(str(source.folder), language, task).tokenizer.prefix_tokens]
    tokenizer = source.processor.tokenizer
    return {
        "prompt_tokens": prompt, "end_token": int(tokenizer.eos_token_id),
        "suppress_tokens": [int(t) for t in generation.suppress_tokens or []],
        "begin_suppress_tokens": [int(t) for t in generation.begin_suppress_tokens or []],
        "max_new_tokens": int(min(generation.max_length, config.max_target_positions - len(prompt))),
        "num_mel_bins": config.num_mel_bins, "window_frames": 2 * config.max_source_positions,
        "decoder_layers": config.decoder_layers, "decoder_heads": config.decoder_attention_heads,
        "head_dim": config.d_model // config.decoder_attention_heads,
        "language": language, "task": task,
        "files": {"encoder": ENCODER_FILE, "decoder": DECODER_FILE},
    }


def write_graphs(model, settings: dict, folder: Path, fold_constants: bool = False) -> None:
    layers, heads, head_dim = settings["decoder_layers"], settings["decoder_heads"], settings["head_dim"]
    features = torch.zeros(1, settings["num_mel_bins"], settings["window_frames"])
    with torch.no_grad():
        cross_k, cross_v = EncoderGraph(model)(features)
    torch.onnx.export(EncoderGraph(model), (features,), str(folder / ENCODER_FILE), dynamo=False, opset_version=OPSET,
                      input_names=["input_features"], output_names=["cross_k", "cross_v"],
                      dynamic_axes={"input_features": {0: "batch"}, "cross_k": {1: "batch"}, "cross_v": {1: "batch"}})
    past = torch.zeros(layers, 1, heads, 2, head_dim)
    ids = torch.tensor([settings["prompt_tokens"][:2]])
    # No constant folding: it would store the output projection (the embedding transposed) as a second copy of
    # the embedding; unfolded, the graph transposes the one copy, and onnxruntime folds it in memory at load.
    # Folded for int8 (`fold_constants`): the quantizer finds only weights stored as they are multiplied, and the
    # second copy is then int8.
    torch.onnx.export(DecoderGraph(model), (ids, past, past, cross_k, cross_v), str(folder / DECODER_FILE),
                      dynamo=False, opset_version=OPSET, do_constant_folding=fold_constants,
                      input_names=["input_ids", "self_k", "self_v", "cross_k", "cross_v"],
                      output_names=["logits", "self_k_out", "self_v_out"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "self_k": {1: "batch", 3: "past"},
                                    "self_v": {1: "batch", 3: "past"}, "cross_k": {1: "batch"},
                                    "cross_v": {1: "batch"}, "logits": {0: "batch", 1: "tokens"},
                                    "self_k_out": {1: "batch", 3: "total"}, "self_v_out": {1: "batch", 3: "total"}})


def quantize_graphs(folder: Path) -> None:
    """Both graphs in `folder`, rewritten with int8 weights (module docstring). Only the MatMul nodes whose second
    input is a stored weight are named to the quantizer: left to itself it would also quantize the attention
    products, whose both inputs are activations."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in (ENCODER_FILE, DECODER_FILE):
        path, original = folder / name, folder / f"{name}.float32"
        path.rename(original)
        graph = onnx.load(str(original), load_external_data=False).graph
        weights = {initializer.name for initializer in graph.initializer}
        matmuls = [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
        quantize_dynamic(str(original), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=matmuls)
        original.unlink()


def export_onnx(source: SourceModel, output_dir: str | Path, quantization: str = "float32", *,
                overwrite: bool = False) -> Path:
    """Writes encoder.onnx, decoder.onnx (with `quantization` "float32" or "int8" weights), whisper_onnx.json, the
    processor's files, export.json and README.md into `output_dir`, staged in a sibling folder and moved into place
    once complete. Returns the folder."""
    from loop.model.loading import load_weights

    output_dir = Path(output_dir)
    check_output_dir(output_dir, source.folder, overwrite)
    if source.config.max_source_positions != WINDOW_POSITIONS:
        raise ExportError(f"--model {source.folder} has a window of {source.config.max_source_positions} encoder "
                          f"positions; the ONNX export takes Whisper's 30-s window ({WINDOW_POSITIONS})")
    model = load_weights(str(source.folder), attn_implementation="eager").eval()
    settings = onnx_settings(source)

    def write(staging: Path) -> None:
        write_graphs(model, settings, staging, fold_constants=quantization == "int8")
        if quantization == "int8":
            quantize_graphs(staging)
        source.processor.save_pretrained(staging)
        write_json_atomic(staging / SETTINGS_FILE, settings)
        write_json_atomic(staging / "export.json", {"source": str(source.folder), "format": "onnx",
                                                    "quantization": quantization, "opset": OPSET,
                                                    "torch": torch.__version__})
        write_text_atomic(staging / "README.md", onnx_readme(source, output_dir))

    write_staged(output_dir, write)
    return output_dir


def onnx_readme(source: SourceModel, output_dir: Path) -> str:
    return "\n".join([
        f"# {Path(source.folder).resolve().name} for onnxruntime", "",
        f"`{source.folder}` exported by whisper-loop's `scripts/export.py --format onnx`: `{ENCODER_FILE}` "
        f"(features -> cross-attention keys and values), `{DECODER_FILE}` (one step with its self-attention cache) "
        f"and `{SETTINGS_FILE}` (prompt, end and suppressed tokens). `parity.json`, when present, compares its "
        "transcripts with the transformers model's on the same audio.", "",
        "```python", "from loop.data.audio import decode_audio", "from loop.ship.onnx_decode import OnnxWhisper", "",
        f'model = OnnxWhisper("{output_dir}")', 'print(model.transcribe([decode_audio("clip.wav")])[0])', "```", ""])
