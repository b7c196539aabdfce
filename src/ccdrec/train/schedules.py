"""Default single-model training schedules per model family (method.md 4: "faster schedules are
welcome if they reach at least the same validation quality").

BPR models use large batches, a high Adam learning rate decayed by 3% per epoch, and L2 on the
batch's ego embeddings instead of Adam's coupled weight decay: at these batch sizes coupled decay (the
reference 1e-4) pulls rarely updated rows to zero faster than BPR moves them, and the model never
leaves the popularity ranking (measured on Yelp D_0: validation Recall@20 stays at 0.086-0.090).
Chosen on Yelp D_0 validation Recall@20 (LightGCN-128, best epoch in brackets): L2 1e-2 without
decay 0.1159 (56); L2 1e-3 without decay 0.1214 (50, noisy from epoch to epoch); L2 1e-3 with decay
0.1245 (56); L2 3e-3 with decay 0.1277 (72).
"""

from __future__ import annotations

from ccdrec.config import TrainConfig

BPR_SCHEDULE = TrainConfig(
    epochs=150, batch_size=4096, lr=1e-2, lr_decay=0.97, weight_decay=0.0, l2=3e-3, negatives=4, eval_every=2, patience=6
)
VAE_SCHEDULE = TrainConfig(epochs=100, batch_size=256, lr=1e-3, weight_decay=0.0, eval_every=2, patience=6, anneal_steps=2000)


def default_schedule(kind: str) -> TrainConfig:
    """The block-0 schedule of a model family (``mf``, ``lightgcn`` or ``vae``)."""
    return (VAE_SCHEDULE if kind == "vae" else BPR_SCHEDULE).model_copy()
