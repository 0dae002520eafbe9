"""Run by tests/test_training.py under torchrun: trains with DDP on gloo, then each rank
writes a digest of its weights and validation outputs so the test can compare ranks."""

import hashlib
import json
import os
import sys

import numpy as np
import torch

import chestxray.training.loop as training
from chestxray.training.loop import TrainConfig, Trainer

out, cache, root, report = sys.argv[1:5]
cfg = TrainConfig(
    root=root,
    out=out,
    model="resnet18",
    weights="none",
    freeze="all",
    epochs=2,
    batch_size=8,
    lr=1e-3,
    image_size=32,
    cache=cache,
    device=os.environ.get("CHESTXRAY_DDP_DEVICE", "cpu"),
    val_fraction=0.3,
)
training.shutdown = lambda info: None  # keep the group for the comparison below
trainer = Trainer(cfg)
trainer.run()
rank = int(os.environ["RANK"])
digest = hashlib.sha256()
for k, v in sorted(trainer.model.state_dict().items()):
    digest.update(k.encode())
    digest.update(v.detach().cpu().numpy().tobytes())
probs, loss = trainer.predict_val()
with open(f"{report}/rank{rank}.json", "w") as fh:
    json.dump(
        {
            "weights": digest.hexdigest(),
            "val_loss": loss,
            "probs_sum": float(np.sum(probs)),
            "history": trainer.history,
            "n_val_rows": int(probs.shape[0]),
        },
        fh,
    )
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# Skip interpreter teardown: under heavy load a background C++ thread pool torn down at exit
# once aborted a rank ("terminate called without an active exception") after its work was done.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
