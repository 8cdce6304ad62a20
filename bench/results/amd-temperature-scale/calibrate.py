"""First-draft acceptance of a drafter by q's temperature scale on conversations the target writes
afresh (train-draft's data, never Spec-Bench's prompts): bench.rules.temperature_calibration.

    python bench/results/amd-temperature-scale/calibrate.py drafters/smollm2-eagle3 OUT.json [CONVERSATIONS]
"""
import json
import random
import sys
import time
from pathlib import Path

import torch

from specdec import models
from specdec.eagle import EagleDrafter
from bench.rules import temperature_calibration
from specdec.train_draft import TargetView, TrainOptions, synthesize

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
count = int(sys.argv[3]) if len(sys.argv) > 3 else 64
torch.manual_seed(1)
drafter = EagleDrafter.load(folder)
model, tokenizer = models.load_model(drafter.config.target), models.load_tokenizer(drafter.config.target)
options = TrainOptions(conversations=count, batch_conversations=16, data_minutes=30, seed=1, progress=False)
began = time.perf_counter()
conversations = synthesize(model, tokenizer, options, random.Random(1), log=lambda line: None)
written = time.perf_counter() - began
view = TargetView(model, tuple(drafter.config.feature_layers), len(tokenizer))
result = temperature_calibration(drafter, view, conversations, options)
result.update(conversations=len(conversations), answer_tokens=sum(len(c.answer) for c in conversations),
              data_seconds=round(written, 1), drafter=str(folder))
out.write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
