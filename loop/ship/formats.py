"""The export formats `scripts/export.py --format` writes, each with the weight types it can store, and one call
that writes any of them: ct2 (CTranslate2, for faster-whisper: `loop.ship.export`), ggml (whisper.cpp's model
file: `loop.ship.ggml`) and onnx (encoder and decoder for onnxruntime: `loop.ship.onnx_export`). Every export is
then checked by the same parity gate (`loop.ship.parity`)."""

from __future__ import annotations

from pathlib import Path

from loop.ship.export import QUANTIZATIONS as CT2_QUANTIZATIONS
from loop.ship.export import ExportError, SourceModel, export_ct2, export_readme

QUANTIZATIONS = {
    "ct2": CT2_QUANTIZATIONS,
    # No float32: whisper.cpp's CPU convolution takes float16 kernels only (an assertion aborts the process on a
    # float32 file), and whisper.cpp's own converter writes float16 too.
    "ggml": ("float16", "q8_0", "q5_0", "q4_0"),
    # int8: onnxruntime's dynamic quantization of the weight matrices (loop.ship.onnx_export.quantize_graphs).
    "onnx": ("float32", "int8"),
}
FORMATS = tuple(QUANTIZATIONS)
DESCRIPTIONS = {
    "ct2": "CTranslate2, for faster-whisper",
    "ggml": "whisper.cpp's GGML model file",
    "onnx": "encoder and decoder with past key values, for onnxruntime",
}


def export_model(export_format: str, source: SourceModel, output_dir: str | Path, quantization: str, *,
                 overwrite: bool = False) -> Path:
    """Writes `source` as `export_format` with `quantization` weights into `output_dir` (staged, moved into place
    once complete); an ExportError names what cannot be exported."""
    if export_format not in QUANTIZATIONS:
        raise ExportError(f"--format {export_format!r} is not one of {', '.join(FORMATS)}")
    if quantization not in QUANTIZATIONS[export_format]:
        raise ExportError(f"--quantization {quantization} is not offered for --format {export_format}: choose one of "
                          f"{', '.join(QUANTIZATIONS[export_format])}")
    if export_format == "ct2":
        return export_ct2(source, output_dir, quantization, overwrite=overwrite,
                          readme=export_readme(source, output_dir, quantization))
    if export_format == "ggml":
        from loop.ship.ggml import export_ggml

        return export_ggml(source, output_dir, quantization, overwrite=overwrite)
    from loop.ship.onnx_export import export_onnx

    return export_onnx(source, output_dir, quantization, overwrite=overwrite)
