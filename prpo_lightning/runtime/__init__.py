"""Runtime support shared by every stage: model loading, checkpoints, distributed helpers, DeepSpeed ZeRO-3 and
version compatibility."""
