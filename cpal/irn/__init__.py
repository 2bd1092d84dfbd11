"""IRN (Ahn et al., CVPR 2019) for semantic pseudo-labels: inter-pixel relation labels from seeds, the
class-boundary branch on a frozen backbone, and the random walk that propagates seeds up to boundaries.

Folders of per-image files are staged and resumed with cpal.core.io.partial_folder / publish_folder.
"""

