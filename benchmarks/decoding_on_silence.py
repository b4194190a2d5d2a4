"""Each decoding option of `loop.model.decoding_options` on a model that loops: zero-shot whisper-base
(`python -m benchmarks.decoding_on_silence whisper-base`) decoding 12 clips of silence and quiet noise with Hindi
forced, where it repeats a syllable to its length limit. Prints loops, over-compressible share and words per clip."""
import json
import sys

import numpy as np
import torch

from loop.config import EvalConfig
from loop.data.audio import SAMPLE_RATE
from loop.data.no_speech import synthesize
from loop.eval.hallucination import hallucination_metrics
from loop.model.decoding import decode_ids
from loop.model.decoding_options import apply_decoding_options
from loop.model.loading import load_for_inference

torch.set_num_threads(2)
rng = np.random.default_rng(2024)
kinds = ["silence", "white", "pink"]
clips = [synthesize(kinds[i % 3], int(rng.uniform(1, 6) * SAMPLE_RATE), rng.uniform(-70, -40), rng) for i in range(12)]
seconds = torch.tensor([len(c) / SAMPLE_RATE for c in clips])
model, processor = load_for_inference(sys.argv[1], language="hindi", max_length=128)
feats = processor.feature_extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
results = {}
for name, options in [("greedy", EvalConfig()), ("no_repeat_ngram_size=3", EvalConfig(no_repeat_ngram_size=3)),
                      ("max_new_tokens_per_second=20", EvalConfig(max_new_tokens_per_second=20.0)),
                      ("temperature_fallback", EvalConfig(temperature_fallback=True))]:
    apply_decoding_options(model.generation_config, options)
    ids = decode_ids(model, feats, processor.tokenizer, seconds=seconds)
    texts = [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    m = hallucination_metrics([""] * len(texts), texts)
    results[name] = {"loop_share": m["loop_share"], "compressible_share": m["compressible_share"],
                     "mean_words": sum(len(t.split()) for t in texts) / len(texts), "example": texts[0][:80]}
    print(name, json.dumps(results[name], ensure_ascii=False), flush=True)
