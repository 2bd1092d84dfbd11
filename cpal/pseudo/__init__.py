"""Pseudo-masks (stage `pseudo_labels`) from seeds, CRF or IRN maps, and their evaluation (`eval_pseudo`: of the
pseudo-masks and of each host's CRF and IRN maps)."""
