"""Training: the loop (`fit`, `train_step`), its state and callbacks, optimisers, schedules, checkpoints, and the
online kNN monitor."""
