"""The classifier phase (stage `train_cls`): the CAM / SIPE / CPAL network and its resumable training."""
