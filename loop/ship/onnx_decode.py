"""Greedy decoding of an ONNX export (`loop.ship.onnx_export`) in onnxruntime, and the parity gate's runtime for it.

Per clip: the model's own log-mel features (`loop.model.features.LogMel`, the clip padded to the window as
evaluation pads it) -> encoder.onnx (cross-attention keys and values) -> decoder.onnx on the prompt tokens, then one
token at a time with the self-attention cache it returns, taking the most likely token after the suppressed ones
(and, at the first step, the begin-suppressed ones) are masked, until <|endoftext|> or the length cap: what
transformers' greedy `generate` does with the same settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loop.extras import require
from loop.ship.onnx_export import SETTINGS_FILE
from loop.ship.parity import ParitySettings, Runtime


class OnnxWhisper:
    """An ONNX export folder, ready to transcribe 16-kHz waveforms."""

    def __init__(self, folder: str | Path, threads: int = 1, max_new_tokens: int | None = None):
        onnxruntime = require("onnxruntime", "onnx", "decoding an ONNX export")
        from transformers import WhisperFeatureExtractor, WhisperTokenizer

        from loop.model.features import LogMel

        folder = Path(folder)
        self.settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        files = self.settings["files"]
        self.encoder = onnxruntime.InferenceSession(str(folder / files["encoder"]), options,
                                                    providers=["CPUExecutionProvider"])
        self.decoder = onnxruntime.InferenceSession(str(folder / files["decoder"]), options,
                                                    providers=["CPUExecutionProvider"])
        self.log_mel = LogMel(WhisperFeatureExtractor.from_pretrained(folder))
        self.tokenizer = WhisperTokenizer.from_pretrained(folder)
        self.max_new_tokens = max_new_tokens or self.settings["max_new_tokens"]

    def features(self, waveform: np.ndarray) -> np.ndarray:
        import torch

        from loop.model.features import pad_waveforms

        audio, _ = pad_waveforms([waveform])
        with torch.no_grad():
            return self.log_mel(audio).numpy()

    def token_ids(self, waveform: np.ndarray) -> list[int]:
        """The generated tokens of one clip, without the prompt and the end token."""
        s = self.settings
        cross_k, cross_v = self.encoder.run(None, {"input_features": self.features(waveform)})
        empty = np.zeros((s["decoder_layers"], 1, s["decoder_heads"], 0, s["head_dim"]), dtype=np.float32)
        self_k, self_v = empty, empty
        tokens, generated = np.array([s["prompt_tokens"]], dtype=np.int64), []
        suppress, begin = np.array(s["suppress_tokens"], dtype=np.int64), np.array(s["begin_suppress_tokens"],
                                                                                  dtype=np.int64)
        for step in range(self.max_new_tokens):
            logits, self_k, self_v = self.decoder.run(None, {"input_ids": tokens, "self_k": self_k, "self_v": self_v,
                                                             "cross_k": cross_k, "cross_v": cross_v})
            scores = logits[0, -1].copy()
            scores[suppress] = -np.inf
            if step == 0:
                scores[begin] = -np.inf
            token = int(scores.argmax())
            if token == s["end_token"]:
                break
            generated.append(token)
            tokens = np.array([[token]], dtype=np.int64)
        return generated

    def transcribe(self, waveforms: list[np.ndarray]) -> list[str]:
        return [self.tokenizer.decode(self.token_ids(w), skip_special_tokens=True).strip() for w in waveforms]


def onnx_runtime(export_dir: str | Path, settings: ParitySettings) -> Runtime:
    """The gate's runtime: the export's greedy loop in onnxruntime, with the gate's length cap, fed the model's own
    features (so a float32 export must reproduce the transcripts)."""
    model = OnnxWhisper(export_dir, threads=settings.threads, max_new_tokens=settings.max_new_tokens)
    return Runtime("onnxruntime", model.transcribe, {"onnx_max_new_tokens": model.max_new_tokens})
