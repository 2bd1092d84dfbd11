"""AMN as a second CPAL host: the paper claims CPAL is a plug-in and reports it on AMN.

AMN (Lee et al., CVPR 2022, "Threshold Matters in WSSS"; github gaviotas/AMN) sits between the CAM
classifier and IRN: classifier CAMs -> IR labels (cpal/irn/labels.py) -> AMN trained on them with a
label-smoothed, class-balanced cross-entropy (cpal/amn/loss.py) -> AMN's maps (cpal/amn/seeds.py, in the
seed format of cpal/seeds/store.py) -> IR labels again -> IRN -> pseudo-masks.

The CPAL plug-in attaches at two points (``amn.plugin``): ``classifier``, the IR labels AMN trains on
come from CPAL's classifier (params.method cpal); ``loss``, CPAL's L_self is added to AMN's own training,
the plug-in (cpal/plugin.py) running on AMN's features and maps with its support bank kept in AMN's
checkpoint; ``both``; ``none`` is AMN as published. docs/method.md, "AMN host", lists every departure.
"""
