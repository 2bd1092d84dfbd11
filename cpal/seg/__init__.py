"""DeepLab segmentation: the last step of the WSSS chain (stages train_seg / eval_seg).

Trained on pseudo-masks (the weakly supervised result) or on ground-truth masks (the fully supervised
upper bound); evaluated on the val split with multi-scale + flip inference and optional dense CRF.
"""
