"""Held-out acceptance of a drafter on another run's held-out split (train-draft's measure)."""
import json, sys
from pathlib import Path
import torch
from specdec import models
from specdec.eagle import EagleDrafter
from specdec.train_draft import TargetView, TrainOptions, heldout_acceptance, load_conversations, split_heldout
model, tok = models.load_model("smollm2"), models.load_tokenizer("smollm2")
for data in sys.argv[2:]:
    convs, _ = load_conversations(Path(data))
    held, _ = split_heldout(convs, 0.05, 0)
    for folder in sys.argv[1].split(","):
        d = EagleDrafter.load(Path(folder))
        view = TargetView(model, tuple(d.config.feature_layers), len(tok))
        r = heldout_acceptance(d, view, held, TrainOptions())
        print(data, folder, round(r["tokens_per_step_k5"], 3), {k: round(v["tokens_per_step_k5"], 3) for k, v in r["by_kind"].items()}, flush=True)
