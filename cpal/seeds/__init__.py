"""Seeds (stages `make_seeds`, `eval_seeds`): multi-scale CAM and PACAM maps, their files, and their evaluation."""
