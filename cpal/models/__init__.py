"""Networks: backbone, CAM classifier, CPAL module."""
